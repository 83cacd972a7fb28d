"""Reading a safetensors weights file with one clear error (no vlbridge imports: every layer may use it)."""

from __future__ import annotations

from pathlib import Path

import torch


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing, truncated or corrupt file is one error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path.parent}: no {path.name} beside config.json (the weights are missing)")
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
