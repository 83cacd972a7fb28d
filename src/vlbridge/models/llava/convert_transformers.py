"""Published checkpoints: transformers' LLaVA layout <-> vlbridge's `Llava`.

transformers writes LLaVA as `LlavaForConditionalGeneration` (a vision tower, `multi_modal_projector`,
a language model and `lm_head`); its config.json says `model_type: "llava"`, the same name as ours, so
this layout is recognised by what only it has: `text_config` / `vision_config` (or its architecture).
transformers itself reads the files (its own on-disk names, older checkpoints' included, are its
business); every tensor of the model it builds then goes through ONE table, `KEY_MAP`, into ours, and
back on export, where transformers writes the files again. A tensor the table does not place, or one of
ours the checkpoint does not fill, is an error that lists them.

Facts the mapping rests on (transformers' modeling_llava.py):
- The tower's output at `vision_feature_layer` feeds the projector ("default" strategy: without its
  first token, CLS; "full": every token). Ours cuts the tower there (feature_layer, drop_cls). The
  layers after it never run; their tensors are kept aside (`Llava.tower_tail`) so that the tower is
  written back whole. A model built by vlbridge has none: it is written with the tower as cut
  (`vision_feature_layer` -1).
- `multi_modal_projector` is Linear - act - Linear (`projector_hidden_act`, exact GELU in LLaVA-1.5):
  our "mlp2x_gelu" projector; our "linear" one has no counterpart there.
- The processor writes (image_size / patch)^2 + num_additional_image_tokens (1: CLS) - 1 ("default")
  copies of the image token; the image token id lies inside the LM's vocabulary (its row is never read).
  Ours may lie past it: on export the LM's tables grow to hold it with zero rows, and the written
  generation config suppresses it, as vlbridge never generates it.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch

from vlbridge.core.backbones import VisionBackbone, freeze
from vlbridge.core.base import CheckpointFormat
from vlbridge.core.config import LMConfig, VisionConfig
from vlbridge.core.keymap import KeyMap
from vlbridge.models.llava.configuration import LlavaConfig
from vlbridge.models.llava.modeling import Llava
from vlbridge.models.llava.processing import LlavaProcessor

log = logging.getLogger(__name__)

ARCHITECTURE = "LlavaForConditionalGeneration"

# (transformers' LlavaForConditionalGeneration, vlbridge's Llava), names of the modules as built in memory.
# {rest}: any suffix, {p}: weight | bias. Bound per LM: {base} the causal LM's
# base-model attribute (Llama, Mistral, Qwen2: "model"). Shapes: Dv tower width, H LM width, V vocabulary.
KEY_MAP = KeyMap(
    [
        ("model.vision_tower.{rest}", "vision.model.{rest}"),  # the frozen tower, cut at vision_feature_layer
        ("model.multi_modal_projector.linear_1.{p}", "projector.linear_1.{p}"),  # (H, Dv)
        ("model.multi_modal_projector.linear_2.{p}", "projector.linear_2.{p}"),  # (H, H)
        ("model.language_model.{rest}", "lm.{base}.{rest}"),  # the decoder (embed_tokens (V, H), layers, norm)
        ("lm_head.weight", "lm.lm_head.weight"),  # (V, H)
    ]
)


def _keys(lm) -> KeyMap:
    return KEY_MAP.bind(base=lm.base_model_prefix)


# ---------------------------------------------------------------------------------- reading
def is_transformers_llava(root: Path) -> bool:
    path = Path(root) / "config.json"
    if not path.is_file():
        return False
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    if not isinstance(cfg, dict) or cfg.get("model_type") != "llava":
        return False
    return ARCHITECTURE in (cfg.get("architectures") or []) or "text_config" in cfg or "vision_config" in cfg


def _hf_config(root: Path):
    from transformers import LlavaConfig as HFLlavaConfig

    hf = HFLlavaConfig.from_pretrained(root)
    if not isinstance(hf.vision_feature_layer, int):
        raise ValueError(f"{root}: vision_feature_layer {hf.vision_feature_layer} (several layers) is not supported")
    if hf.projector_hidden_act != "gelu":
        raise ValueError(f"{root}: projector activation {hf.projector_hidden_act!r}; vlbridge's is exact gelu")
    return hf


def vlbridge_config(hf, source: str, num_image_tokens: int = 0) -> LlavaConfig:
    """Our LlavaConfig for a transformers LlavaConfig; the backbones are named by `source`."""
    return LlavaConfig(
        vision=VisionConfig(source, feature_layer=hf.vision_feature_layer, hidden_size=hf.vision_config.hidden_size),
        lm=LMConfig(source, hidden_size=hf.text_config.hidden_size),
        projector="mlp2x_gelu",
        projector_bias=hf.multimodal_projector_bias,
        drop_cls=hf.vision_feature_select_strategy == "default",
        image_token_id=hf.image_token_id,
        num_image_tokens=num_image_tokens,
    )


def load_transformers(root: Path, source: str) -> Llava:
    """A vlbridge Llava holding a transformers LLaVA checkpoint (see Llava.from_pretrained)."""
    from transformers import AutoModel, AutoModelForCausalLM, LlavaForConditionalGeneration

    hf = _hf_config(root)
    reference = LlavaForConditionalGeneration.from_pretrained(root, dtype=torch.float32)
    config = vlbridge_config(hf, source)
    vision = freeze(VisionBackbone(AutoModel.from_config(hf.vision_config), hf.vision_feature_layer))
    lm = freeze(AutoModelForCausalLM.from_config(hf.text_config))
    model = Llava(config, vision, lm)

    keys, own = _keys(lm), model.state_dict()
    tied = {f"lm.{k}" for k in (getattr(lm, "all_tied_weights_keys", None) or {})}
    state, unplaced = keys.map_state(reference.state_dict(), to_ours=True, targets=own)
    kept = vision.model.config.num_hidden_layers  # VisionBackbone cut the layers after the feature layer
    tail = {k: v for k, v in reference.state_dict().items() if k in unplaced and _tail_layer(k, kept)}
    unknown = [k for k in unplaced if k not in tail]
    missing = [k for k in own if k not in state and k not in tied]
    if unknown or missing:
        raise ValueError(
            f"{root}: checkpoint does not match vlbridge's LLaVA: unknown keys {sorted(unknown)}, "
            f"missing keys {sorted(missing)}"
        )
    model.load_state_dict(state, strict=False, assign=True)  # the reference's tensors, not copies
    model.lm.tie_weights()  # an LM that ties its head to its input table keeps doing so
    model.tower_tail = tail
    model.freeze_for_stage(1)  # assign brought the reference's requires_grad along
    return model


def _tail_layer(name: str, kept: int) -> bool:
    """A tower tensor of an encoder layer at or after `kept` (the ones the cut removed)."""
    parts = name.split(".")
    if not name.startswith("model.vision_tower.") or "layers" not in parts:
        return False
    i = parts.index("layers") + 1
    return i < len(parts) and parts[i].isdigit() and int(parts[i]) >= kept


def _processor_settings(root: Path) -> dict:
    path = Path(root) / "processor_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def load_transformers_processor(root: Path, source: str) -> LlavaProcessor:
    """A vlbridge LlavaProcessor from the processor files of a transformers LLaVA directory: its image
    processor, its tokenizer (holding the image token) and as many image tokens as its LlavaProcessor writes."""
    from transformers import AutoImageProcessor, AutoTokenizer

    hf = _hf_config(root)
    image_processor = AutoImageProcessor.from_pretrained(root, backend="pil")
    tok = AutoTokenizer.from_pretrained(root)
    settings = _processor_settings(root)
    patch = settings.get("patch_size") or hf.vision_config.patch_size
    crop = getattr(image_processor, "crop_size", None) or {"height": hf.vision_config.image_size}
    height, width = crop["height"], crop.get("width", crop["height"])
    # transformers' rule (LlavaProcessor.replace_image_token); num_additional_image_tokens counts CLS
    extra = settings.get("num_additional_image_tokens", 1 if hf.vision_config.model_type == "clip_vision_model" else 0)
    n = (height // patch) * (width // patch) + extra - int(hf.vision_feature_select_strategy == "default")
    config = vlbridge_config(hf, source, num_image_tokens=n)
    config.image_token = settings.get("image_token") or tok.convert_ids_to_tokens(hf.image_token_id)
    return LlavaProcessor(image_processor, tok, config)


# ---------------------------------------------------------------------------------- writing
def save_transformers(model: Llava, path: str | Path, processor=None) -> None:
    """Write `model` as transformers' LlavaForConditionalGeneration (+ its LlavaProcessor files)."""
    from transformers import LlavaConfig as HFLlavaConfig
    from transformers import LlavaForConditionalGeneration

    cfg, tower = model.config, model.vision.model
    if cfg.projector != "mlp2x_gelu":
        raise ValueError(
            f"transformers' LLaVA has a two-layer MLP projector, not {cfg.projector!r}: save with format='vlbridge'"
        )
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}  # written from the CPU
    tied = {f"lm.{k}" for k in (getattr(model.lm, "all_tied_weights_keys", None) or {})}
    state, unplaced = _keys(model.lm).map_state({k: v for k, v in state.items() if k not in tied}, to_ours=False)
    if unplaced:
        raise ValueError(f"no place in transformers' LLaVA layout for {unplaced}")
    tail = {k: v.to(tower.dtype) for k, v in model.tower_tail.items()}
    state.update(tail)
    n_tail = len({k.split("layers.")[1].split(".")[0] for k in tail})
    vision_config = tower.config.to_dict()
    vision_config["num_hidden_layers"] = tower.config.num_hidden_layers + n_tail
    text_config = copy.deepcopy(model.lm.config)
    generation = copy.deepcopy(model.lm.generation_config)
    if cfg.image_token_id >= text_config.vocab_size:  # ours lies past the vocabulary: grow the tables to hold it
        state, text_config.vocab_size = _grow_tables(state, cfg.image_token_id + 1), cfg.image_token_id + 1
        generation.suppress_tokens = sorted({*(generation.suppress_tokens or []), cfg.image_token_id})
    hf = HFLlavaConfig(
        vision_config=vision_config,
        text_config=text_config.to_dict(),
        image_token_index=cfg.image_token_id,
        image_seq_length=cfg.num_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default" if cfg.drop_cls else "full",
        vision_feature_layer=-1 - n_tail,
        multimodal_projector_bias=cfg.projector_bias,
        tie_word_embeddings=bool(tied),
    )
    hf.architectures = [ARCHITECTURE]
    with torch.device("meta"):
        out = LlavaForConditionalGeneration(hf)
    out.load_state_dict(state, strict=not tied, assign=True)
    if tied:
        out.tie_weights()  # the head is the input table again (it was left out of `state`)
    out.generation_config = generation
    out.save_pretrained(path)
    if processor is not None:
        _transformers_processor(model, processor).save_pretrained(path)


def _grow_tables(state: dict, rows: int) -> dict:
    """The LM's input table and head with zero rows appended up to `rows` (the image token's)."""
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if key in state:
            t = state[key]
            state[key] = torch.cat([t, t.new_zeros(rows - len(t), t.shape[1])])
    return state


def _transformers_processor(model: Llava, processor: LlavaProcessor):
    """transformers' LlavaProcessor writing as many image tokens as the model reads."""
    from transformers import LlavaProcessor as HFLlavaProcessor

    cfg, tower = model.config, model.vision.model.config
    crop = getattr(processor.image_processor, "crop_size", None) or {"height": tower.image_size}
    patches = (crop["height"] // tower.patch_size) * (crop.get("width", crop["height"]) // tower.patch_size)
    hf = HFLlavaProcessor(
        processor.image_processor,
        copy.deepcopy(processor.tokenizer),
        patch_size=tower.patch_size,
        vision_feature_select_strategy="default" if cfg.drop_cls else "full",
        image_token=cfg.image_token,
        num_additional_image_tokens=cfg.num_image_tokens + int(cfg.drop_cls) - patches,
    )
    if hf.image_token_id != cfg.image_token_id:
        raise ValueError(
            f"the tokenizer gives {cfg.image_token} id {hf.image_token_id}, the model {cfg.image_token_id}"
        )
    return hf


# Llava.from_pretrained, LlavaProcessor.from_pretrained and vlbridge.load read this layout;
# Llava.save_pretrained(format="transformers") writes it
TRANSFORMERS = CheckpointFormat(
    "transformers",
    detect=is_transformers_llava,
    load_model=load_transformers,
    load_processor=load_transformers_processor,
    save=save_transformers,
)
Llava.register_format(TRANSFORMERS)
LlavaProcessor.register_format(TRANSFORMERS)
