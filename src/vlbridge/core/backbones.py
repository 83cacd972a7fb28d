"""Frozen Hugging Face backbones: any vision model that yields patch tokens, any causal or
encoder-decoder LM. Loaded by hub id or local directory through transformers' own `from_pretrained`.

Frozen means: requires_grad=False, kept in eval mode (the owning model re-applies it in `train()`),
never handed to an optimizer, optionally held in bf16/fp16.

Inside `deferred_weights()` a backbone is built from its config with its parameters on the meta device
(no memory, no values) and its buffers real (they are computed, not read); the yielded WeightSources
records which safetensors file and key holds each parameter, so that FSDP training can read each rank's
slice of the files once the model is sharded (dist.materialize) instead of loading every backbone whole
on every rank.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import json
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
    dtype = resolve_dtype(cfg.dtype)
    deferred = _DEFERRED.get()
    model = deferred.vision(path, dtype) if deferred is not None else None
    if model is None:
        model = _load_vision_model(path, dtype)
    backbone = VisionBackbone(model, cfg.feature_layer)
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
    deferred = _DEFERRED.get() if cfg.quantization is None else None  # bitsandbytes loads its own way
    lm = deferred.build(auto, config, path, resolve_dtype(cfg.dtype)) if deferred is not None else None
    if lm is None:
        lm = auto.from_pretrained(path, dtype=resolve_dtype(cfg.dtype), **quantization_kwargs(cfg))
    cfg.hidden_size = lm.get_input_embeddings().embedding_dim
    cfg.is_encoder_decoder = bool(config.is_encoder_decoder)
    return freeze(lm)


# ---------------------------------------------------------------- deferred loading (FSDP over several ranks)

_DEFERRED: contextvars.ContextVar[WeightSources | None] = contextvars.ContextVar("deferred_weights", default=None)


class WeightSources:
    """Where the values of the backbone parameters built on the meta device are: (safetensors file, key)
    per parameter. A backbone whose keys cannot all be matched to its files (a layout transformers renames
    on load) is loaded whole as usual, with a warning."""

    def __init__(self):
        self._by_param: dict[int, tuple[nn.Parameter, str, str]] = {}  # id -> (param, file, key)

    def build(self, auto, config, path: str, dtype: torch.dtype, attr: str | None = None) -> nn.Module | None:
        """`auto.from_config(config)` (then its `attr` submodule) with meta parameters, its keys matched to
        the safetensors files of `path`; None when they cannot be (the caller loads it whole)."""
        files = _safetensors_keys(Path(path))
        if not files:
            log.warning("%s: no safetensors files to read slices of: loaded whole on every rank", path)
            return None
        make = getattr(auto, "from_config", None) or auto._from_config  # an Auto class, or a model class
        # Some modules draw their initial values while being built (CLIP's class_embedding = randn(...)):
        # from_pretrained builds on the meta device, where that draws nothing, and so must this (the
        # bridge's initial weights come from the same global RNG afterwards).
        with _parameters_on_meta(), torch.random.fork_rng(devices=[]):
            model = make(config, dtype=dtype)
        model = getattr(model, attr) if attr else model
        params = dict(model.named_parameters())
        if not all(p.is_meta for p in params.values()):  # set past register_parameter: would keep random values
            log.warning("%s: not every parameter could be built on the meta device: loaded whole on every rank", path)
            return None
        found = _match_keys({n: tuple(p.shape) for n, p in params.items()}, files)
        if found is None:
            log.warning("%s: its parameter names do not map onto its files' keys: loaded whole on every rank", path)
            return None
        keys, rename = found
        for name, p in params.items():
            self._by_param[id(p)] = (p, files[keys[name]][0], keys[name])
        # Persistent buffers the files hold (a BatchNorm's running statistics) are read now, as
        # from_pretrained reads them; they are small. The others keep the values they were built with.
        from safetensors import safe_open

        persistent = model.state_dict().keys()
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                key = rename(name)
                if name in persistent and key in files:
                    with safe_open(files[key][0], framework="pt") as f:
                        buffer.copy_(f.get_tensor(key))
        return model.eval()

    def vision(self, path: str, dtype: torch.dtype) -> nn.Module | None:
        """A vision model as _load_vision_model builds it: a composite checkpoint's vision-only class."""
        import transformers
        from transformers import MODEL_MAPPING, AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(path)
        vision_config = getattr(config, "vision_config", None)
        if vision_config is not None:
            cls = MODEL_MAPPING.get(type(vision_config), None)
            if cls is not None:
                return self.build(cls, vision_config, path, dtype)
            return self.build(AutoModel, config, path, dtype, attr="vision_model")
        if config.architectures and not _auto_model_knows(config):
            return self.build(getattr(transformers, config.architectures[0]), config, path, dtype)
        return self.build(AutoModel, config, path, dtype)

    def by_name(self, model: nn.Module) -> dict[str, tuple[str, str]] | None:
        """{parameter name in `model`: (file, key)} for every meta parameter; None when one has no source
        (e.g. a bridge tensor computed from a backbone's weights, or LoRA adapters on a meta layer): then
        the model must be built again without deferral."""
        found = {}
        for name, p in model.named_parameters():
            if p.is_meta:
                if id(p) not in self._by_param:
                    log.info("%s was made from weights not loaded yet", name)
                    return None
                found[name] = self._by_param[id(p)][1:]
        return found


@contextlib.contextmanager
def deferred_weights(enabled: bool = True):
    """Within: load_lm / load_vision build unquantised backbones with meta parameters and record their
    sources in the yielded WeightSources (None when not enabled)."""
    if not enabled:
        yield None
        return
    sources = WeightSources()
    token = _DEFERRED.set(sources)
    try:
        yield sources
    finally:
        _DEFERRED.reset(token)


@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter registered within goes to the meta device as it is registered, so nothing is
    allocated or initialised for it; buffers (rotary frequencies, position ids) stay real."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _safetensors_keys(root: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (file, shape)} of a transformers checkpoint directory (one file, or shards and their index)."""
    from safetensors import safe_open

    index = root / "model.safetensors.index.json"
    names = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else []
    if not names and (root / "model.safetensors").exists():
        names = ["model.safetensors"]
    found = {}
    for name in names:
        with safe_open(str(root / name), framework="pt") as f:
            for key in f.keys():
                found[key] = (str(root / name), tuple(f.get_slice(key).get_shape()))
    return found


def _match_keys(params: dict[str, tuple], files: dict[str, tuple[str, tuple]]):
    """Each parameter name's file key, of the same shape, and the renaming that gives it. The names and
    keys may differ by a prefix (a base model's "transformer." absent from the file, a composite's
    "vision_model." present): the one renaming `strip a prefix, add a prefix` that fits every parameter;
    None when none or several do."""
    if not params:
        return {}, lambda name: name
    anchor = next(iter(params))
    parts = anchor.split(".")
    renamings = set()
    for i in range(len(parts)):
        suffix = ".".join(parts[i:])
        strip = anchor[: len(anchor) - len(suffix)]
        for key in files:
            if key == suffix or key.endswith("." + suffix):
                renamings.add((strip, key[: len(key) - len(suffix)]))
    fits = {}  # the mapping -> one renaming that gives it
    for strip, add in sorted(renamings):
        keys = {n: add + n[len(strip) :] if n.startswith(strip) else None for n in params}
        if all(k in files and files[k][1] == params[n] for n, k in keys.items()):
            fits.setdefault(tuple(sorted(keys.items())), (strip, add))
    if len(fits) != 1:
        return None
    mapping, (strip, add) = fits.popitem()
    return dict(mapping), lambda name: add + name[len(strip) :] if name.startswith(strip) else name


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
