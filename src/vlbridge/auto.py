"""`vlbridge.load`: any saved vlbridge model and its processor, whatever the design.

The design is read from `model_type` in config.json ("blip2", "flamingo", "eve", "llava"); a foreign
layout a converter registered (transformers' BLIP-2: model_type "blip-2"; LAVIS' .pth files, which have
no config.json) loads through that design's class. transformers' LLaVA also says model_type "llava": its
converter recognises it by its config's keys (text_config, vision_config), and is asked before the name
decides. Directories written before config.json carried a model_type are told apart by their config's keys.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from vlbridge.core.backbones import local_dir
from vlbridge.core.base import VLModel
from vlbridge.models.blip2 import Blip2
from vlbridge.models.eve import EVE
from vlbridge.models.flamingo import Flamingo
from vlbridge.models.llava import Llava

MODEL_TYPES: dict[str, type[VLModel]] = {cls.model_type: cls for cls in (Blip2, Flamingo, EVE, Llava)}
# config keys that only one design has: how directories saved without model_type are recognised
_LEGACY_KEYS = {"perceiver_depth": Flamingo, "pel_width": EVE, "qformer": Blip2}


def model_class(name_or_path: str | Path) -> type[VLModel]:
    """The design a saved directory (or hub id) holds."""
    root = local_dir(name_or_path)
    path = root / "config.json"
    if not path.is_file():  # a foreign layout without config.json (LAVIS' .pth), or nothing vlbridge reads
        for cls in MODEL_TYPES.values():
            if cls.foreign_format(root) is not None:
                return cls
        raise ValueError(f"{name_or_path}: no config.json (not a saved model directory)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type in MODEL_TYPES and MODEL_TYPES[model_type].foreign_format(root) is None:
        return MODEL_TYPES[model_type]  # vlbridge's own (transformers' LLaVA shares the name "llava")
    for cls in MODEL_TYPES.values():
        if cls.foreign_format(root) is not None:
            return cls
    if model_type is None and isinstance(config, dict):
        for key, cls in _LEGACY_KEYS.items():
            if key in config:
                return cls
    raise ValueError(
        f"{path}: model_type {model_type!r} is not one vlbridge loads "
        f"({', '.join(sorted(MODEL_TYPES))}, or a registered foreign layout)"
    )


def load(
    name_or_path: str | Path,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    **kwargs,
) -> tuple[VLModel, object]:
    """(model, processor) of a saved model, in eval mode on `device` ("auto": CUDA when present), cast to
    `dtype` if given ("float32", "bfloat16", "float16"). kwargs go to the design's from_pretrained or, for
    a registered foreign layout, to its converter's loader; a converter whose processor loader takes
    keywords (LAVIS: the checkpoint holds no tokenizer, so vision=, lm=, qformer_tokenizer=) gets them too."""
    cls = model_class(name_or_path)
    root = local_dir(name_or_path)
    fmt = cls.foreign_format(root)
    if fmt is None:
        model, processor = cls.from_pretrained(root, **kwargs), cls.processor_class.from_pretrained(root)
    else:
        model = fmt.load_model(root, str(root), **kwargs)
        if fmt.load_processor is None:
            processor = cls.processor_class.from_pretrained(root)
        else:
            takes = inspect.signature(fmt.load_processor).parameters
            processor = fmt.load_processor(root, str(root), **{k: v for k, v in kwargs.items() if k in takes})
    return model.place(device, dtype).eval(), processor
