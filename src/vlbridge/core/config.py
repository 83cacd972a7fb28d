"""Typed configs that round-trip through JSON.

Every config is a plain dataclass. `to_dict` / `from_dict` are exact inverses, and `from_dict`
checks what it reads against the fields' type hints: unknown keys (a typo in a recipe must not be
silently ignored) and values of the wrong type are refused with one message naming the key path
(`TrainConfig.steps: expected int, got 'abc'`), before anything is built from them.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from vlbridge.core.adapters import LoraConfig

T = TypeVar("T")


class ConfigError(ValueError, TypeError):
    """A config value of the wrong type or out of range; the message starts with its key path. Both a
    ValueError and a TypeError, so that callers catching either (the CLI catches ValueError) see it."""


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], data: dict, path: str = "") -> T:
    """Build dataclass `cls` from a dict, recursing into nested dataclasses (also in lists and `X | None`).
    Every value is checked against its field's type hint: JSON ints are taken for float fields (and
    become floats), JSON lists for tuples; a bool is not an int. `path` names `cls` in messages."""
    path = path or cls.__name__
    where = path if path == cls.__name__ else f"{path} ({cls.__name__})"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known keys are {sorted(names)}")
    kwargs = {name: _convert(hints[name], value, f"{path}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # a range check in __post_init__: say where in the recipe it is
        raise ConfigError(f"{where}: {e}") from e


def _convert(hint, value, path: str):
    """`value` checked against type hint `hint` (and converted: int -> float, list -> tuple, dict ->
    dataclass); ConfigError naming `path` if it does not fit. Hints a JSON file cannot hold
    (callables, tensors) are not checked."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:  # X | None: X's own message (a nested config names its inner key)
            return _convert(arms[0], value, path)
        for arm in arms:
            try:
                return _convert(arm, value, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: expected {_name(hint)}, got {_show(value)}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return from_dict(hint, value, path)
    if hint is bool or hint is str:
        if not isinstance(value, hint):
            raise ConfigError(f"{path}: expected {hint.__name__}, got {_show(value)}")
        return value
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected int, got {_show(value)}")
        return value
    if hint is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected float, got {_show(value)}")
        return float(value)
    if hint in (list, tuple, dict) or origin in (list, tuple, dict):
        kind = origin or hint
        if not isinstance(value, (list, tuple) if kind is not dict else dict):
            raise ConfigError(f"{path}: expected {_name(hint)}, got {_show(value)}")
        if kind is dict:
            if not args:
                return value
            return {k: _convert(args[1], v, f"{path}[{k!r}]") for k, v in value.items()}
        if kind is list:
            return [_convert(args[0], v, f"{path}[{i}]") if args else v for i, v in enumerate(value)]
        if args and args[-1] is not Ellipsis and len(args) != len(value):
            raise ConfigError(f"{path}: expected {_name(hint)} ({len(args)} values), got {_show(value)}")
        items = args[:1] * len(value) if args and args[-1] is Ellipsis else args or (Any,) * len(value)
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(items, value)))
    return value


def _name(hint) -> str:
    return hint.__name__ if isinstance(hint, type) and not typing.get_args(hint) else str(hint).replace("typing.", "")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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


QUANTIZATIONS = ("8bit", "4bit")  # LMConfig.quantization (or None)


@dataclass
class LMConfig:
    """A frozen Hugging Face language model: causal (OPT, GPT-2, Llama, Qwen2) or encoder-decoder (T5)."""

    name_or_path: str = ""
    dtype: str = "float32"
    hidden_size: int = 0  # filled from the LM when it is loaded
    is_encoder_decoder: bool = False  # filled from the LM when it is loaded
    # None, or hold the LM's Linear weights in 8 or 4 bits (bitsandbytes, CUDA only): a quarter / an eighth
    # of fp32's memory for a little accuracy; it can then only be adapted with LoRA, not trained itself
    quantization: str | None = None
    # LoRA adapters on this LM (and optionally the bridge): set by the trainer from a recipe's `lora` or by
    # VLModel.add_lora, so that a saved model knows its adapters (in lm_adapter/ beside config.json)
    lora: LoraConfig | None = None

    def __post_init__(self):  # runs in from_dict too: a bad recipe fails when it is read
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"LMConfig.quantization must be None, '8bit' or '4bit', got {self.quantization!r}")
