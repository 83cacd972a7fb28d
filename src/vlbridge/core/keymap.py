"""One engine for translating tensor names between a foreign checkpoint layout and vlbridge's.

Every converter (transformers' BLIP-2, BERT -> Q-Former, OpenFlamingo, ...) keeps its own table of
(theirs, ours) name templates next to its code, as documentation; this module only reads them. A
template is a tensor name with placeholders in braces:
- free placeholders, matched by a pattern from PLACEHOLDERS (`{i}` a layer index, `{p}` weight|bias,
  `{m}` a module name: lower case and `_`, no dots; `{rest}` any suffix), copied from one side to
  the other; both sides of an entry hold the same free placeholders;
- fixed placeholders (like `{layers}`, the LM's decoder-layer path), whose value depends on the
  model and is bound with `bind(layers="model.layers")` before names are translated.
The first entry whose template matches the whole name wins, in both directions; a name that no
entry matches translates to None, so callers can list every tensor they could not place.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterable, Mapping
from typing import Any

PLACEHOLDERS = {"i": r"\d+", "p": "weight|bias", "m": "[a-z_]+", "rest": ".+"}

_BRACES = re.compile(r"\{(\w+)\}")


class KeyMap:
    """A table of (theirs, ours) name templates, translating single names or whole state dicts."""

    def __init__(
        self,
        pairs: Iterable[tuple[str, str]],
        placeholders: Mapping[str, str] = PLACEHOLDERS,
        fixed: Mapping[str, str] | None = None,
    ):
        self.pairs = list(pairs)
        self.placeholders, self.fixed = dict(placeholders), dict(fixed or {})
        self._entries = []  # (theirs regex, ours regex, theirs, ours); regexes None while a fixed value is unbound
        for theirs, ours in self.pairs:
            free = [
                {n for n in _BRACES.findall(t) if n in self.placeholders and n not in self.fixed}
                for t in (theirs, ours)
            ]
            if free[0] != free[1]:
                raise ValueError(f"({theirs!r}, {ours!r}): both sides must hold the same placeholders")
            self._entries.append((self._regex(theirs), self._regex(ours), theirs, ours))

    def bind(self, **fixed: str) -> KeyMap:
        """This table with fixed placeholders filled, e.g. bind(layers="model.decoder.layers")."""
        return KeyMap(self.pairs, self.placeholders, {**self.fixed, **fixed})

    def _regex(self, template: str) -> re.Pattern | None:
        parts = _BRACES.split(template)  # literal, name, literal, name, ...
        body = []
        for n, s in enumerate(parts):
            if n % 2 == 0:
                body.append(re.escape(s))
            elif s in self.fixed:
                body.append(re.escape(self.fixed[s]))
            elif s in self.placeholders:
                body.append(f"(?P<{s}>{self.placeholders[s]})")
            else:
                return None  # an unbound fixed placeholder: an error once a name reaches this entry
        return re.compile("".join(body))

    def _translate(self, name: str, to_ours: bool) -> str | None:
        for theirs_rx, ours_rx, theirs, ours in self._entries:
            if theirs_rx is None or ours_rx is None:
                named = {*_BRACES.findall(theirs), *_BRACES.findall(ours)}
                unbound = sorted(named - self.placeholders.keys() - self.fixed.keys())
                raise ValueError(f"({theirs!r}, {ours!r}) needs {unbound} bound: KeyMap.bind(name=value)")
            hit = (theirs_rx if to_ours else ours_rx).fullmatch(name)
            if hit:
                return (ours if to_ours else theirs).format(**self.fixed, **hit.groupdict())
        return None

    def to_ours(self, name: str) -> str | None:
        """vlbridge's name for a foreign tensor name (None: no entry matches)."""
        return self._translate(name, to_ours=True)

    def to_theirs(self, name: str) -> str | None:
        """The foreign name for a vlbridge tensor name (None: no entry matches)."""
        return self._translate(name, to_ours=False)

    def map_state(
        self, state: Mapping[str, Any], to_ours: bool = True, targets: Container[str] | None = None
    ) -> tuple[dict[str, Any], list[str]]:
        """(state under the translated names, the names it could not place), both in `state`'s order.
        A name is unplaced when no entry matches it or, given `targets` (e.g. the model's own
        state_dict), when its translation is not among them. Values pass through untouched."""
        out, unplaced = {}, []
        for name, value in state.items():
            new = self._translate(name, to_ours)
            if new is None or (targets is not None and new not in targets):
                unplaced.append(name)
            else:
                out[new] = value
        return out, unplaced
