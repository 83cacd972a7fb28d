"""Official EVE checkpoints (baaivision/EVE, EVEv1) <-> vlbridge's `EVE`.

EVE saves `EVELlamaForCausalLM`: a transformers LLaMA whose config.json says `model_type: "eve"` and
carries `mm_vision_tower` (a directory whose preprocessor_config.json gives the patch size and image
size), `mm_hidden_size` (the patch embedding's width) and `mm_projector_type: "mlp2x_gelu"`. Its
tensors: the LLaMA's (`model.layers...`, `lm_head.weight`), the patch embedding `VisionTokenizer`
(`model.vision_tower.*`) and the projector (`model.mm_projector.*`). Every name goes through ONE
table, `KEY_MAP`, in both directions (`EVE.from_pretrained(dir)`, `vlbridge.load(dir)`,
`model.save_pretrained(path, format="official")`); a tensor the table does not place, or a model
tensor the checkpoint does not fill, is an error naming the first one and the format expected.

Facts the mapping rests on (read from EVE's vision_tokenizer.py and eve_arch.py):
- The LM becomes a plain transformers `LlamaForCausalLM` (EVE's config minus its `mm_*` keys); saved
  as vlbridge's it is `lm/` like any other LM.
- `VisionTokenizer` = our `PatchEmbedding` with `pel_attention="official"`: the same attention (8
  heads, bias-free q and k/v, scores scaled by the whole width ** -0.5), so tensors are only renamed;
  `class_embedding` (D,) is our `cls` (1, 1, D). `q` / `kv` are Sequential(LayerNorm, Linear): .0 is
  our norm, .1 our Linear; kv's rows are [k; v].
- The teacher (`model.vision_clip.*`) and `VisionCompressor` (`model.vision_tower_compressor.*`) are
  training-only and absent from released checkpoints; if present they are skipped (logged).
- Image size and normalisation come from preprocessor_config.json (in the checkpoint directory, else
  in the `mm_vision_tower` directory); without one, EVE-7B's: 672 px, CLIP's mean and std.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch

from vlbridge.core.base import CheckpointFormat
from vlbridge.core.config import LMConfig
from vlbridge.core.keymap import KeyMap
from vlbridge.models.eve.configuration import EVEConfig
from vlbridge.models.eve.modeling import EVE, default_pal_layers
from vlbridge.models.eve.processing import EVEProcessor

log = logging.getLogger(__name__)

ARCHITECTURE = "EVELlamaForCausalLM"
EXPECTED = (
    f"an official EVE checkpoint ({ARCHITECTURE}: LLaMA tensors, model.vision_tower.* (VisionTokenizer), "
    "model.mm_projector.* (mlp2x_gelu))"
)
HEADS = 8  # VisionTokenizer's LocalAttention / GlobalAttention always split into 8 heads
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]

# (EVE name, vlbridge name). {p}: weight|bias, {i}: an index, {rest}: any suffix; the first match wins.
# Shapes: D pel_width, p patch_size, H LM width.
_V = "model.vision_tower."
KEY_MAP = KeyMap(
    [
        (_V + "patch_embedding.weight", "pel.conv.weight"),  # (D, 3, p, p), no bias
        (_V + "class_embedding", "pel.cls"),  # (D,) theirs, (1, 1, D) ours
        (_V + "split_embedding", "pel.split"),  # (D,)
        *(
            pair
            for theirs, ours in (("local_attention", "local_attn"), ("global_attention", "global_attn"))
            for pair in (
                (f"{_V}{theirs}.q.0.{{p}}", f"pel.{ours}.norm_q.{{p}}"),
                (f"{_V}{theirs}.q.1.weight", f"pel.{ours}.q.weight"),  # (D, D)
                (f"{_V}{theirs}.kv.0.{{p}}", f"pel.{ours}.norm_kv.{{p}}"),
                (f"{_V}{theirs}.kv.1.weight", f"pel.{ours}.kv.weight"),  # (2D, D): [k; v]
                (f"{_V}{theirs}.proj.{{p}}", f"pel.{ours}.proj.{{p}}"),
            )
        ),
        ("model.mm_projector.{i}.{p}", "pel.projector.{i}.{p}"),  # Linear(D, H), GELU, Linear(H, H)
        ("model.{rest}", "lm.model.{rest}"),  # the LLaMA (after the vision entries: they win)
        ("lm_head.weight", "lm.lm_head.weight"),
    ]
)
TRAINING_ONLY = ("model.vision_clip.", "model.vision_tower_compressor.")  # teacher and PAL: never loaded
RESHAPED = {"pel.cls": (1, 1, -1)}  # ours -> theirs is .flatten()
# EVE's config keys that are no LLaMA's
_EVE_KEYS = {"requires_cliploss", "use_mm_proj", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "image_aspect_ratio"}
_EVE_KEYS |= {"tokenizer_padding_side", "tokenizer_model_max_length", "vision_tower", "vision_tower_clip"}


# ---------------------------------------------------------------------------------- reading
def _read_config(root: Path) -> dict | None:
    path = Path(root) / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def is_official_checkpoint(root: Path) -> bool:
    cfg = _read_config(root)
    return cfg is not None and (ARCHITECTURE in (cfg.get("architectures") or []) or "mm_hidden_size" in cfg)


def read_tensors(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint: safetensors (single or sharded), else PyTorch .bin shards read with
    weights_only=True (plain tensors only, nothing unpickled)."""
    from safetensors.torch import load_file

    for single, index, read in (
        ("model.safetensors", "model.safetensors.index.json", lambda f: load_file(str(f))),
        ("pytorch_model.bin", "pytorch_model.bin.index.json", lambda f: torch.load(f, "cpu", weights_only=True)),
    ):
        if (root / single).is_file():
            return dict(read(root / single))
        if (root / index).is_file():
            state = {}
            for shard in sorted(set(json.loads((root / index).read_text())["weight_map"].values())):
                state.update(read(root / shard))
            return state
    raise ValueError(f"{root}: no model.safetensors or pytorch_model.bin (or their .index.json); expected {EXPECTED}")


def _preprocessor(root: Path, cfg: dict) -> dict:
    """preprocessor_config.json of the checkpoint, else of its mm_vision_tower directory; {} if neither."""
    tower = cfg.get("mm_vision_tower") or ""
    for where in (root, root / tower if tower else None, Path(tower) if tower else None):
        if where is not None and (where / "preprocessor_config.json").is_file():
            return json.loads((where / "preprocessor_config.json").read_text())
    log.warning("%s: no preprocessor_config.json (here or at mm_vision_tower): EVE-7B's 672 px and CLIP stats", root)
    return {}


def official_config(root: Path, source: str, patch_size: int) -> tuple[EVEConfig, object]:
    """Our EVEConfig and the LLaMA config for the official checkpoint at root."""
    from transformers import LlamaConfig

    cfg = _read_config(root)
    if cfg.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise ValueError(f"{root}: mm_projector_type {cfg.get('mm_projector_type')!r}; vlbridge reads mlp2x_gelu")
    pre = _preprocessor(root, cfg)
    if pre.get("conv_stride", 2) != 2 or pre.get("patch_stride", patch_size) != patch_size:
        raise ValueError(
            f"{root}: conv_stride {pre.get('conv_stride')} / patch_stride {pre.get('patch_stride')}; vlbridge's "
            f"patch embedding pools 2x2 patches of the conv's {patch_size} px"
        )
    lm_cfg = {k: v for k, v in cfg.items() if not k.startswith("mm_") and k not in _EVE_KEYS}
    lm_cfg.pop("model_type", None)
    lm_cfg["architectures"] = ["LlamaForCausalLM"]
    llama = LlamaConfig.from_dict(lm_cfg)
    config = EVEConfig(
        lm=LMConfig(source, hidden_size=llama.hidden_size),
        kind="eve",
        patch_size=patch_size,
        pel_width=cfg["mm_hidden_size"],
        pel_heads=HEADS,
        pel_attention="official",
        max_image_size=pre.get("image_size", 672),
        pal="official",
        pal_layers=default_pal_layers("official", llama.num_hidden_layers),
        image_mean=[float(x) for x in pre.get("image_mean", CLIP_MEAN)],
        image_std=[float(x) for x in pre.get("image_std", CLIP_STD)],
    )
    return config, llama


def load_official(root: Path, source: str, load_teacher: bool = False) -> EVE:
    """A vlbridge EVE holding an official EVE checkpoint (for inference: no teacher, no PAL)."""
    from transformers import LlamaForCausalLM

    if load_teacher:
        raise ValueError(
            f"{root}: an official EVE checkpoint holds no teacher vlbridge can load; save it with "
            "format='vlbridge' and name a teacher in its config to train on"
        )
    tensors = read_tensors(root)
    config, llama = official_config(root, source, _conv(tensors, root).shape[-1])
    processor = load_official_processor(root, source, (config, llama))
    config.image_token_id = processor.image_token_id
    model = EVE(config, LlamaForCausalLM(llama).float())

    skipped = [k for k in tensors if k.startswith(TRAINING_ONLY)]
    if skipped:
        log.info("%s: %d training-only tensors (teacher, VisionCompressor) not loaded", root, len(skipped))
    own = model.state_dict()
    state, unplaced = KEY_MAP.map_state({k: v for k, v in tensors.items() if k not in skipped}, True, own)
    for name, shape in RESHAPED.items():
        if name in state:
            state[name] = state[name].reshape(shape)
    tied = _tied_names(model.lm)
    missing = [k for k in own if k not in state and k not in tied]
    if unplaced or missing:
        first = f"unexpected key {unplaced[0]}" if unplaced else f"missing key {KEY_MAP.to_theirs(missing[0])}"
        raise ValueError(f"{root}: {first} ({len(unplaced)} unexpected, {len(missing)} missing); expected {EXPECTED}")
    bad = [k for k, v in state.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(
            f"{root}: {KEY_MAP.to_theirs(bad[0])} has shape {tuple(state[bad[0]].shape)}, "
            f"the config gives {tuple(own[bad[0]].shape)}"
        )
    model.load_state_dict(state, strict=False)
    return model.eval()


def _conv(tensors: dict, root: Path) -> torch.Tensor:
    if _V + "patch_embedding.weight" not in tensors:
        raise ValueError(f"{root}: missing key {_V}patch_embedding.weight; expected {EXPECTED}")
    return tensors[_V + "patch_embedding.weight"]


def _tied_names(lm) -> set[str]:
    # LM tensors that alias another (lm_head = input embeddings when tied): written once
    return {f"lm.{k}" for k in (getattr(lm, "all_tied_weights_keys", None) or {})}


def load_official_processor(root: Path, source: str, configs: tuple | None = None) -> EVEProcessor:
    """Our processor for an official EVE directory: its tokenizer (LLaMA's, "<image>" added as a special
    token that never reaches the LM's table) and its preprocessor's image size and normalisation."""
    from transformers import AutoTokenizer

    if configs is None:  # the patch size from the preprocessor config, else from the conv's weight
        patch = _preprocessor(root, _read_config(root)).get("patch_stride") or _conv(read_tensors(root), root).shape[-1]
        configs = official_config(root, source, patch)
    config, llama = configs
    try:  # given the LLaMA config: config.json's model_type "eve" is no tokenizer's
        tokenizer = AutoTokenizer.from_pretrained(root, config=llama)
    except (OSError, ValueError) as e:
        raise ValueError(f"{root}: no tokenizer files beside the official EVE checkpoint ({e})") from None
    return EVEProcessor(tokenizer, config)


# ---------------------------------------------------------------------------------- writing
def save_official(model: EVE, path: str | Path, processor: EVEProcessor | None = None):
    """Write `model` as EVE's EVELlamaForCausalLM (config.json, model.safetensors, generation config,
    preprocessor_config.json and, with a processor, the tokenizer). The PAL and teacher are training-only
    and not written. `mm_vision_tower` names this directory, which holds the preprocessor config."""
    from safetensors.torch import save_file

    cfg = model.config
    if cfg.kind != "eve" or cfg.pel_attention != "official" or cfg.pel_heads != HEADS:
        raise ValueError(
            f"EVE's VisionTokenizer is kind='eve', pel_attention='official', pel_heads={HEADS}; this model has "
            f"{cfg.kind!r}, {cfg.pel_attention!r}, {cfg.pel_heads}: save with format='vlbridge'"
        )
    if type(model.lm).__name__ != "LlamaForCausalLM":
        raise ValueError(f"EVELlamaForCausalLM is a LLaMA, not {type(model.lm).__name__}: save with format='vlbridge'")
    path = Path(path)
    tied = _tied_names(model.lm)
    ours = {
        k: v.detach().reshape(-1) if k in RESHAPED else v.detach()
        for k, v in model.state_dict().items()
        if k not in tied and not k.startswith(("pal.", "teacher."))
    }
    state, unplaced = KEY_MAP.map_state(ours, to_ours=False)
    if unplaced:
        raise ValueError(f"no place in EVE's {ARCHITECTURE} layout for {unplaced[0]} ({len(unplaced)} in all)")
    if model.pal is not None:
        log.info("the PAL and teacher are training-only: not written to the official layout")
    path.mkdir(parents=True, exist_ok=True)
    hf = model.lm.config.to_dict()
    hf.update(
        model_type="eve",
        architectures=[ARCHITECTURE],
        mm_vision_tower=str(path.resolve()),
        mm_hidden_size=cfg.pel_width,
        mm_projector_type="mlp2x_gelu",
        use_mm_proj=True,
        requires_cliploss=False,
    )
    (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    pre = {
        "image_processor_type": "CLIPImageProcessor",
        "image_size": cfg.max_image_size,
        "patch_stride": cfg.patch_size,
        "conv_stride": 2,
        "image_mean": cfg.image_mean or [0.5] * 3,
        "image_std": cfg.image_std or [0.5] * 3,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    model.lm.generation_config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    if processor is not None:
        copy.deepcopy(processor.tokenizer).save_pretrained(path)


# EVE.from_pretrained, EVEProcessor.from_pretrained and vlbridge.load read this layout;
# EVE.save_pretrained(format="official") writes it
OFFICIAL = CheckpointFormat(
    "official",
    detect=is_official_checkpoint,
    load_model=load_official,
    load_processor=lambda root, source: load_official_processor(root, source),
    save=save_official,
)
EVE.register_format(OFFICIAL)
EVEProcessor.register_format(OFFICIAL)
