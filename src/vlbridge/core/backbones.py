"""Frozen Hugging Face backbones: any vision model that yields patch tokens, any causal or
encoder-decoder LM. Loaded by hub id or local directory through transformers' own `from_pretrained`.

Frozen means: requires_grad=False, kept in eval mode (the owning model re-applies it in `train()`),
never handed to an optimizer, optionally held in bf16/fp16.
"""

from __future__ import annotations

import functools
import inspect
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlbridge.core.config import LMConfig, VisionConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[name]


SAVED_PARTS = ("vision", "lm", "qformer_tokenizer")  # the folders save_pretrained writes beside config.json


def resolve_path(name_or_path: str, root: str | Path | None) -> str:
    """A path relative to a checkpoint directory wins over a hub id of the same spelling; a part that
    save_pretrained writes there and that is missing is an error, not a hub id to fetch."""
    if root is not None and name_or_path:
        if (Path(root) / name_or_path).exists():
            return str(Path(root) / name_or_path)
        if name_or_path in SAVED_PARTS:
            raise ValueError(f"{root} has no {name_or_path}/ folder: the saved model is incomplete")
    return name_or_path


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def _layer_list(model: nn.Module, num_layers: int) -> tuple[nn.Module, str, nn.ModuleList]:
    """Find the encoder's ModuleList of transformer layers (encoder.layers, encoder.layer, ...)."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    if not found:
        raise ValueError(f"{type(model).__name__}: cannot find its list of {num_layers} layers to cut at feature_layer")
    name, layers = found[0]
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return parent, name.rsplit(".", 1)[-1], layers


class VisionBackbone(nn.Module):
    """Wraps a transformers vision model; returns the hidden states of the chosen layer, (B, N, D).

    N counts every token the model makes (CLS and registers included, as BLIP-2 uses them).
    Layers after `feature_layer` are cut off at load time.
    """

    def __init__(self, model: nn.Module, feature_layer: int = -2):
        super().__init__()
        cfg = model.config
        total = cfg.num_hidden_layers
        keep = total + 1 + feature_layer if feature_layer < 0 else feature_layer
        if not 1 <= keep <= total:
            raise ValueError(f"feature_layer={feature_layer} is out of range for a {total}-layer vision model")
        if keep < total:
            parent, attr, layers = _layer_list(model, total)
            setattr(parent, attr, nn.ModuleList(list(layers)[:keep]))
            cfg.num_hidden_layers = keep
        self.model = model
        self.hidden_size = cfg.hidden_size
        self.image_size = getattr(cfg, "image_size", None)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values.to(self.dtype), output_hidden_states=True)
        # hidden_states[-1] is the raw output of the last kept layer (before any final norm,
        # which some models apply to last_hidden_state and others don't).
        return out.hidden_states[-1]

    def save_pretrained(self, path: str | Path):
        self.model.save_pretrained(path)


def _load_vision_model(path: str, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path)
    vision_config = getattr(config, "vision_config", None)
    if vision_config is not None:
        # A composite checkpoint (CLIP, SigLIP, BLIP-2, ...): try its vision-only class first, which
        # loads just the vision weights; fall back to the full model if the keys don't line up.
        from transformers import MODEL_MAPPING

        cls = MODEL_MAPPING.get(type(vision_config), None)  # _LazyAutoMapping.get needs a default
        if cls is not None:
            # The text tower's weights are expected leftovers here: keep transformers' report of them quiet.
            from transformers.utils import logging as hf_logging

            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                model, info = cls.from_pretrained(path, dtype=dtype, output_loading_info=True)
            finally:
                hf_logging.set_verbosity(verbosity)
            if not info["missing_keys"]:
                return model
        model = AutoModel.from_pretrained(path, dtype=dtype)
        return model.vision_model
    if config.architectures and not _auto_model_knows(config):  # e.g. Blip2VisionModel, absent from AutoModel
        import transformers

        return getattr(transformers, config.architectures[0]).from_pretrained(path, dtype=dtype)
    return AutoModel.from_pretrained(path, dtype=dtype)


def _auto_model_knows(config) -> bool:
    from transformers import MODEL_MAPPING

    return MODEL_MAPPING.get(type(config), None) is not None


def load_vision(cfg: VisionConfig, root: str | Path | None = None) -> VisionBackbone:
    """Load and freeze a vision backbone; fills cfg.hidden_size."""
    path = resolve_path(cfg.name_or_path, root)
    if not path:
        raise ValueError("VisionConfig.name_or_path is empty: name a hub id or a local directory")
    backbone = VisionBackbone(_load_vision_model(path, resolve_dtype(cfg.dtype)), cfg.feature_layer)
    cfg.hidden_size = backbone.hidden_size
    return freeze(backbone)


def load_lm(cfg: LMConfig, root: str | Path | None = None) -> nn.Module:
    """Load and freeze a causal or encoder-decoder LM; fills cfg.hidden_size / is_encoder_decoder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    path = resolve_path(cfg.name_or_path, root)
    if not path:
        raise ValueError("LMConfig.name_or_path is empty: name a hub id or a local directory")
    config = AutoConfig.from_pretrained(path)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    lm = auto.from_pretrained(path, dtype=resolve_dtype(cfg.dtype), **quantization_kwargs(cfg))
    cfg.hidden_size = lm.get_input_embeddings().embedding_dim
    cfg.is_encoder_decoder = bool(config.is_encoder_decoder)
    return freeze(lm)


def quantization_kwargs(cfg: LMConfig) -> dict:
    """from_pretrained's arguments for a quantised LM: bitsandbytes through transformers'
    BitsAndBytesConfig, on the current CUDA device. There is no standard CPU path (transformers' CPU
    int8 backends need torchao or optimum-quanto): on CPU, or without bitsandbytes, one clear error."""
    if cfg.quantization is None:
        return {}
    import importlib.util

    if not torch.cuda.is_available():
        raise ValueError(
            f"LMConfig.quantization {cfg.quantization!r} needs a CUDA GPU and bitsandbytes (pip install "
            "bitsandbytes); this machine has no CUDA: set quantization to null to load the LM unquantised"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            f"LMConfig.quantization {cfg.quantization!r} needs the bitsandbytes package: pip install bitsandbytes"
        )
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    else:  # NF4 with double quantisation, computing in the LM's dtype (QLoRA's setting)
        compute = resolve_dtype(cfg.dtype) if cfg.dtype != "float32" else torch.bfloat16
        bnb = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
        )
    return {"quantization_config": bnb, "device_map": {"": torch.cuda.current_device()}}


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding, so a left-padded row is numbered like an unpadded one."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def position_kwargs(lm: nn.Module, mask: torch.Tensor) -> dict:
    """{"position_ids": ...} numbered past left padding (position_ids) for an LM whose forward takes
    them; {} for one that numbers positions itself."""
    return {"position_ids": position_ids(mask)} if _takes_position_ids(type(lm)) else {}


@functools.cache
def _takes_position_ids(lm_class: type) -> bool:
    return "position_ids" in inspect.signature(lm_class.forward).parameters


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against aligned targets (B, T), -100 ignored; an error when every
    target is ignored (a prompt that fills the whole sequence), rather than a silent NaN."""
    if not (targets != -100).any():
        raise ValueError("every label is -100: there is no target text to learn from")
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A decoder-only LM's loss: position t predicts label t + 1."""
    return lm_loss(logits[:, :-1], labels[:, 1:])


def local_dir(name_or_path: str | Path) -> Path:
    """A local directory as is; a checkpoint file (.pth / .pt) as is, for the registered formats to
    recognise; a hub id ("org/name") fetched with huggingface_hub. Anything that can only be a local path
    (absolute, relative with ./ or ../, more than one /) and is missing is an error."""
    path, text = Path(name_or_path), str(name_or_path)
    if path.is_dir():
        return path
    if path.is_file() and path.suffix in (".pth", ".pt"):  # LAVIS' {"model": state_dict}, and the like
        return path
    if path.exists():
        raise ValueError(f"{text}: a file, not a model directory (nor a .pth / .pt checkpoint)")
    if path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text:
        raise ValueError(f"{text}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text))
    except Exception as e:  # invalid id, unknown repo, no network: one message naming what was asked for
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{text}: not a local directory, and the Hugging Face Hub did not provide it ({first})") from e
