"""Typed configs that round-trip through JSON.

Every config is a plain dataclass. `to_dict` / `from_dict` are exact inverses, and `from_dict`
refuses unknown keys (a typo in a recipe must not be silently ignored).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict) -> T:
    """Build dataclass `cls` from a dict, recursing into nested dataclass fields."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}; known keys are {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        sub = _dataclass_in(hints[name])
        kwargs[name] = from_dict(sub, value) if sub is not None and value is not None else value
    return cls(**kwargs)


def _dataclass_in(hint) -> type | None:
    """The dataclass type in `hint` (also inside `X | None`), or None."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def save_json(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


def load_json(cls: type[T], path: str | Path) -> T:
    return from_dict(cls, json.loads(Path(path).read_text()))


@dataclass
class VisionConfig:
    """A frozen Hugging Face vision backbone that yields patch tokens."""

    name_or_path: str = ""
    # Which layer's hidden states feed the bridge: -1 = last layer, -2 = penultimate (BLIP-2).
    # Layers after it are removed at load time, so they cost neither compute nor memory.
    feature_layer: int = -2
    dtype: str = "float32"  # dtype the frozen weights are held in: float32 | bfloat16 | float16
    hidden_size: int = 0  # filled from the backbone when it is loaded


@dataclass
class LMConfig:
    """A frozen Hugging Face language model: causal (OPT, GPT-2, Llama, Qwen2) or encoder-decoder (T5)."""

    name_or_path: str = ""
    dtype: str = "float32"
    hidden_size: int = 0  # filled from the LM when it is loaded
    is_encoder_decoder: bool = False  # filled from the LM when it is loaded
