"""Published checkpoints: transformers' BLIP-2 layout <-> vlbridge's `Blip2`.

transformers writes BLIP-2 as `Blip2ForConditionalGeneration` (vision tower, Q-Former, projection,
OPT/T5/... LM) or `Blip2ForImageTextRetrieval` (vision tower, Q-Former with its text side, ITC/ITM
heads); its config.json says `model_type: "blip-2"`. Every tensor name goes through ONE table,
`KEY_MAP`, in both directions (`Blip2.from_pretrained`, `save_pretrained(format="transformers")`);
a name the table does not place, or a model tensor the checkpoint does not fill, is an error that
lists them. transformers'
InstructBLIP (convert_instructblip) reuses the table's Q-Former and backbone parts and the reading and
writing helpers (`load_checkpoint`, `transformers_state`, `write_checkpoint`).

Facts the mapping rests on (read from transformers' modeling_blip_2.py):
- Its vision tower ends with `post_layernorm`, applied to the last layer's output. That LayerNorm is
  LAVIS' trainable `ln_vision`, so it becomes ours and the tower keeps all its layers
  (feature_layer=-1). VisionBackbone reads the last layer's raw output, so the tower's own
  post_layernorm is never applied; it gets a copy anyway, so that the tower saved alone is the
  published one.
- The frozen tower and LM stay transformers' own classes (Blip2VisionModel, OPTForCausalLM,
  T5ForConditionalGeneration, ...), built from the sub-configs: their tensors keep their names.
- Newer configs carry `image_token_index`: prompts hold num_query_tokens image tokens that the
  projected queries replace. Older configs lack it; then the queries are prepended to the prompt
  (what transformers did before the image tokens existed; transformers 5 cannot run such a config).
- `Blip2ForImageTextRetrieval` has no ITG head and no temperature: ours start fresh on import and
  are left out (with a warning) on export.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from torch import nn

from vlbridge.core.base import CheckpointFormat
from vlbridge.core.config import LMConfig, VisionConfig
from vlbridge.core.keymap import KeyMap
from vlbridge.models.blip2.configuration import Blip2Config, QFormerConfig
from vlbridge.models.blip2.modeling import Blip2
from vlbridge.models.blip2.processing import Blip2Processor

log = logging.getLogger(__name__)

GENERATION, RETRIEVAL = "Blip2ForConditionalGeneration", "Blip2ForImageTextRetrieval"

# (transformers name, vlbridge name). {i}: layer index, {p}: weight|bias, {rest}: any suffix.
# The first entry that matches wins, in both directions (vlbridge.core.keymap). Shapes: d Q-Former
# width, Dv vision width, H LM width, Q queries, V Q-Former vocabulary, E ITC width.
_L = "qformer.encoder.layer.{i}."
# The Q-Former's layers: named alike in transformers' BLIP-2 and InstructBLIP (convert_instructblip).
QFORMER_LAYER_KEYS = [
    # shared self-attention over [queries; text]
    (_L + "attention.attention.query.{p}", "qformer.layers.{i}.attention.query.{p}"),
    (_L + "attention.attention.key.{p}", "qformer.layers.{i}.attention.key.{p}"),
    (_L + "attention.attention.value.{p}", "qformer.layers.{i}.attention.value.{p}"),
    (_L + "attention.output.dense.{p}", "qformer.layers.{i}.attention.dense.{p}"),
    (_L + "attention.output.LayerNorm.{p}", "qformer.layers.{i}.attention.norm.{p}"),
    # cross-attention, queries -> image (key/value weights (d, Dv)), every cross_attention_frequency layers
    (_L + "crossattention.attention.query.{p}", "qformer.layers.{i}.crossattention.query.{p}"),
    (_L + "crossattention.attention.key.{p}", "qformer.layers.{i}.crossattention.key.{p}"),
    (_L + "crossattention.attention.value.{p}", "qformer.layers.{i}.crossattention.value.{p}"),
    (_L + "crossattention.output.dense.{p}", "qformer.layers.{i}.crossattention.dense.{p}"),
    (_L + "crossattention.output.LayerNorm.{p}", "qformer.layers.{i}.crossattention.norm.{p}"),
    # feed-forward of the query positions, then of the text positions (retrieval, InstructBLIP)
    (_L + "intermediate_query.dense.{p}", "qformer.layers.{i}.ffn_query.intermediate.{p}"),
    (_L + "output_query.dense.{p}", "qformer.layers.{i}.ffn_query.output.{p}"),
    (_L + "output_query.LayerNorm.{p}", "qformer.layers.{i}.ffn_query.norm.{p}"),
    (_L + "intermediate.dense.{p}", "qformer.layers.{i}.ffn.intermediate.{p}"),
    (_L + "output.dense.{p}", "qformer.layers.{i}.ffn.output.{p}"),
    (_L + "output.LayerNorm.{p}", "qformer.layers.{i}.ffn.norm.{p}"),
]
# Around the Q-Former: named alike in both designs too.
BACKBONE_KEYS = [
    # frozen vision tower; its final LayerNorm is our trainable ln_vision (listed first: it wins)
    ("vision_model.post_layernorm.{p}", "ln_vision.{p}"),  # (Dv,)
    ("vision_model.{rest}", "vision.model.{rest}"),
    # stage 2: projection into the LM and the frozen LM itself
    ("language_projection.{p}", "lm_proj.{p}"),  # (H, d)
    ("language_model.{rest}", "lm.{rest}"),
]
KEY_MAP = KeyMap(
    [
        ("query_tokens", "qformer.query_tokens"),  # (1, Q, d)
        ("qformer.layernorm.{p}", "qformer.layernorm.{p}"),  # LN over [queries; text embeddings]
        ("embeddings.word_embeddings.weight", "qformer.word_embeddings.weight"),  # (V, d), retrieval only
        ("embeddings.position_embeddings.weight", "qformer.position_embeddings.weight"),  # (512, d), text only
        *QFORMER_LAYER_KEYS,
        *BACKBONE_KEYS,
        # stage 1 heads (retrieval)
        ("vision_projection.{p}", "vision_proj.{p}"),  # (E, d)
        ("text_projection.{p}", "text_proj.{p}"),  # (E, d)
        ("itm_head.{p}", "itm_head.{p}"),  # (2, d)
    ]
)
# Ours, with no place in transformers' retrieval model: fresh on import, left out on export.
NOT_IN_TRANSFORMERS = ("temp", "qformer.lm_head.")
TOWER_NORM = "vision.model.post_layernorm."  # never applied by vlbridge: ln_vision is transformers' post_layernorm


# ---------------------------------------------------------------------------------- reading
def is_transformers_checkpoint(root: Path) -> bool:
    cfg = Path(root) / "config.json"
    return cfg.exists() and json.loads(cfg.read_text()).get("model_type") == "blip-2"


def checkpoint_shards(root: Path) -> list[Path]:
    if (root / "model.safetensors").exists():
        return [root / "model.safetensors"]
    index = root / "model.safetensors.index.json"
    if index.exists():
        return [root / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    raise FileNotFoundError(f"{root}: no model.safetensors(.index.json); only safetensors checkpoints are read")


def _transformers_config(root: Path):
    from transformers import Blip2Config as HFBlip2Config

    hf = HFBlip2Config.from_pretrained(root)
    archs = hf.architectures or []
    kind = RETRIEVAL if RETRIEVAL in archs else GENERATION if (GENERATION in archs or not archs) else None
    if kind is None:
        raise ValueError(f"{root}: architectures {archs} - vlbridge reads {GENERATION} and {RETRIEVAL}")
    if hf.qformer_config.hidden_act != "gelu":
        raise ValueError(f"{root}: Q-Former activation {hf.qformer_config.hidden_act!r}; vlbridge's is exact gelu")
    return hf, kind


def vlbridge_config(hf, kind: str, source: str) -> Blip2Config:
    """Our Blip2Config for a transformers Blip2Config; the backbones are named by `source`."""
    q, v = hf.qformer_config, hf.vision_config
    qformer = QFormerConfig(
        hidden_size=q.hidden_size,
        num_layers=q.num_hidden_layers,
        num_heads=q.num_attention_heads,
        intermediate_size=q.intermediate_size,
        num_query_tokens=hf.num_query_tokens,
        cross_attention_frequency=q.cross_attention_frequency,
        encoder_hidden_size=v.hidden_size,
        vocab_size=q.vocab_size,
        max_position_embeddings=q.max_position_embeddings,
        layer_norm_eps=q.layer_norm_eps,
        dropout=q.hidden_dropout_prob,
        attention_dropout=q.attention_probs_dropout_prob,
        text_branch=kind == RETRIEVAL,
        pad_token_id=q.pad_token_id or 0,
        bos_token_id=q.vocab_size - 1,
    )  # [DEC] is the last row (LAVIS appends it to bert-base-uncased)
    lm = None
    if kind == GENERATION:
        lm = LMConfig(
            source, hidden_size=hf.text_config.hidden_size, is_encoder_decoder=bool(hf.text_config.is_encoder_decoder)
        )
    return Blip2Config(
        vision=VisionConfig(source, feature_layer=-1, hidden_size=v.hidden_size),
        qformer=qformer,
        lm=lm,
        qformer_tokenizer=source if kind == RETRIEVAL else "",
        embed_dim=getattr(hf, "image_text_hidden_size", Blip2Config.embed_dim),  # InstructBLIP's config has none
        image_token_id=hf.image_token_index,
    )


def load_transformers(
    root: Path, source: str, lm=None, drop_text_branch: bool = False, load_vision: bool = True, load_lm: bool = True
):
    """A vlbridge Blip2 holding a transformers BLIP-2 checkpoint (see Blip2.from_pretrained)."""
    from transformers import Blip2VisionModel

    hf, kind = _transformers_config(root)
    config = vlbridge_config(hf, kind, source)
    model = load_checkpoint(root, hf, config, Blip2VisionModel, KEY_MAP, f"BLIP-2 ({kind})", lm, load_vision, load_lm)
    if kind == RETRIEVAL:
        log.info("%s: no ITG head or ITC temperature in transformers' retrieval model; they start fresh", root)
    if drop_text_branch:
        model.drop_text_branch()
    return model


def load_checkpoint(
    root: Path,
    hf,
    config: Blip2Config,
    tower_class: type,
    key_map: KeyMap,
    what: str,
    lm=None,
    load_vision: bool = True,
    load_lm: bool = True,
) -> Blip2:
    """A Blip2 for `config` on transformers' tower (`tower_class`) and LM built from the sub-configs of
    `hf` (a transformers BLIP-2 or InstructBLIP config), filled from the safetensors shards in `root`
    through `key_map`; an unknown or missing tensor is one error naming them all. `what` names the layout
    in that error. lm: another LM instead of the saved one (fresh projection, queries prepended)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from vlbridge.core import backbones

    has_lm = config.lm is not None
    skip = []  # checkpoint prefixes deliberately not loaded
    vision = None
    if load_vision:
        vision = backbones.freeze(backbones.VisionBackbone(tower_class(hf.vision_config), feature_layer=-1))
    else:
        skip.append("vision_model.")
    lm_module = None
    if lm is not None:  # another LM: neither the saved LM, its projection nor its image token is wanted
        config.lm = copy.deepcopy(lm) if isinstance(lm, LMConfig) else LMConfig(name_or_path=str(lm))
        config.image_token_id = None  # the new LM's prompts get the queries prepended
        lm_module = backbones.load_lm(config.lm) if load_lm else None
        skip += ["language_model.", "language_projection."]
    elif has_lm and load_lm:
        auto = AutoModelForSeq2SeqLM if hf.text_config.is_encoder_decoder else AutoModelForCausalLM
        lm_module = auto.from_config(hf.text_config)
    elif has_lm:
        skip += ["language_model.", "language_projection."]
    model = Blip2(config, vision, lm_module)
    model.ln_vision.eps = hf.vision_config.layer_norm_eps  # post_layernorm's (Blip2 finds it itself from a tower)

    own = model.state_dict()
    loaded, unknown = set(), []
    for shard in checkpoint_shards(root):
        tensors = {
            name: tensor
            for name, tensor in load_file(str(shard)).items()
            if not name.startswith(tuple(skip)) or name.startswith("vision_model.post_layernorm.")
        }
        state, unplaced = key_map.map_state(tensors, to_ours=True, targets=own)
        unknown += unplaced
        model.load_state_dict(state, strict=False)
        loaded |= state.keys()
    fresh = NOT_IN_TRANSFORMERS + (TOWER_NORM,) + (("lm.", "lm_proj.") if lm is not None else ())
    missing = [k for k in own if k not in loaded and k not in tied_lm_names(model.lm) and not k.startswith(fresh)]
    if unknown or missing:
        raise ValueError(
            f"{root}: checkpoint does not match vlbridge's {what}: unknown keys {sorted(unknown)}, "
            f"missing keys {sorted(missing)}"
        )
    if vision is not None:
        vision.model.post_layernorm.load_state_dict(model.ln_vision.state_dict())
    return model


def tied_lm_names(lm: nn.Module | None) -> set[str]:
    # LM tensors that alias another (lm_head = input embeddings, T5's shared table): transformers writes one of each
    return {f"lm.{k}" for k in (getattr(lm, "all_tied_weights_keys", None) or {})} if lm is not None else set()


def load_transformers_processor(root: Path, source: str):
    """A vlbridge Blip2Processor from the processor files of a transformers BLIP-2 directory."""
    from transformers import AutoImageProcessor, AutoTokenizer

    hf, kind = _transformers_config(root)
    config = vlbridge_config(hf, kind, source)
    image_processor = AutoImageProcessor.from_pretrained(root, backend="pil")
    tok = AutoTokenizer.from_pretrained(root)
    Q = config.qformer.num_query_tokens
    if kind == RETRIEVAL:  # its one tokenizer is the Q-Former's (BERT); our ITC/ITM take no image tokens
        return Blip2Processor(image_processor, tok, None, num_query_tokens=Q, max_text_length=config.max_text_length)
    image_token = None if hf.image_token_index is None else tok.convert_ids_to_tokens(hf.image_token_index)
    return Blip2Processor(
        image_processor,
        None,
        tok,
        num_query_tokens=Q,
        is_encoder_decoder=config.lm.is_encoder_decoder,
        image_token=image_token,
        max_text_length=config.max_text_length,
    )


# ---------------------------------------------------------------------------------- writing
def save_transformers(model, path: str | Path, processor=None):
    """Write `model` as transformers' Blip2ForConditionalGeneration (with an LM) or
    Blip2ForImageTextRetrieval (stage 1), plus the processor files if given."""
    from transformers import Blip2Config as HFBlip2Config
    from transformers import Blip2QFormerConfig, Blip2VisionModel

    cfg, q = model.config, model.config.qformer
    if model.lm is not None and cfg.qformer_question:
        raise ValueError(
            "this Q-Former reads the question (qformer_question): transformers' "
            "Blip2ForConditionalGeneration cannot; save with format='vlbridge'"
        )
    tower = getattr(model.vision, "model", None)
    if not isinstance(tower, Blip2VisionModel):
        raise ValueError(
            f"transformers' BLIP-2 holds a Blip2VisionModel tower, not {type(tower).__name__}: "
            f"save with format='vlbridge'"
        )
    if model.lm is not None and q.text_branch:
        raise ValueError(
            "Blip2ForConditionalGeneration has no Q-Former text branch: call model.drop_text_branch() "
            "first, or save with format='vlbridge'"
        )
    if model.lm is None and not q.text_branch:
        raise ValueError("a model with neither an LM nor a Q-Former text branch has no transformers counterpart")
    if model.ln_vision.eps != tower.config.layer_norm_eps:
        log.warning("ln_vision eps %g becomes post_layernorm eps %g", model.ln_vision.eps, tower.config.layer_norm_eps)
    kind = GENERATION if model.lm is not None else RETRIEVAL
    qformer_config = Blip2QFormerConfig(**qformer_config_fields(q), use_qformer_text_input=q.text_branch)
    hf = HFBlip2Config(
        vision_config=tower.config.to_dict(),
        qformer_config=qformer_config.to_dict(),
        text_config=model.lm.config.to_dict() if model.lm is not None else None,
        num_query_tokens=q.num_query_tokens,
        image_text_hidden_size=cfg.embed_dim,
        image_token_index=cfg.image_token_id,
    )
    hf.architectures = [kind]
    hf_processor = _transformers_processor(model, processor) if processor is not None else None

    state, left_out = transformers_state(model, KEY_MAP, "BLIP-2")
    if left_out:
        log.warning("not written (transformers' retrieval model has no ITG head or temperature): %s", left_out)
    write_checkpoint(model, path, hf, state, hf_processor)


def qformer_config_fields(q: QFormerConfig) -> dict:
    """Our Q-Former's shape as the keywords that transformers' BLIP-2 and InstructBLIP Q-Former configs share."""
    return dict(
        vocab_size=q.vocab_size,
        hidden_size=q.hidden_size,
        num_hidden_layers=q.num_layers,
        num_attention_heads=q.num_heads,
        intermediate_size=q.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=q.dropout,
        attention_probs_dropout_prob=q.attention_dropout,
        max_position_embeddings=q.max_position_embeddings,
        layer_norm_eps=q.layer_norm_eps,
        pad_token_id=q.pad_token_id,
        cross_attention_frequency=q.cross_attention_frequency,
        encoder_hidden_size=q.encoder_hidden_size,
    )


def transformers_state(model, key_map: KeyMap, layout: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """`model`'s tensors under the names of `key_map`'s foreign layout (named `layout` in the error), and
    our tensors that have no place there (NOT_IN_TRANSFORMERS). Aliases of tied LM tensors are written
    once, as transformers does; the tower's own post_layernorm is written as ln_vision."""
    ours, left_out = {}, []
    tied = tied_lm_names(model.lm)
    for name, tensor in model.state_dict().items():
        if name in tied or name.startswith(TOWER_NORM):  # aliases; the tower's unused LN (ln_vision is written)
            continue
        if name.startswith(NOT_IN_TRANSFORMERS):
            left_out.append(name)
            continue
        ours[name] = tensor.detach().contiguous()
    state, unplaced = key_map.map_state(ours, to_ours=False)
    if unplaced:
        raise ValueError(f"no place in transformers' {layout} layout for {unplaced}")
    return state, left_out


def write_checkpoint(model, path: str | Path, hf_config, state: dict[str, torch.Tensor], hf_processor=None) -> None:
    """A transformers directory: config.json, the LM's generation_config.json, model.safetensors, and the
    processor files when a processor is given."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(path)
    if model.lm is not None:
        model.lm.generation_config.save_pretrained(path)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    if hf_processor is not None:
        hf_processor.save_pretrained(path)


def _transformers_processor(model, processor):
    """transformers' Blip2Processor with our image processor and tokenizer (copied: it adds <image>)."""
    from transformers import Blip2Processor as HFBlip2Processor

    tok = processor.tokenizer if model.lm is not None else processor.qformer_tokenizer
    image_token_id = model.config.image_token_id
    Q = model.config.qformer.num_query_tokens
    hf = HFBlip2Processor(
        processor.image_processor, copy.deepcopy(tok), num_query_tokens=Q if image_token_id is not None else None
    )
    check_image_token(hf, image_token_id)
    return hf


def check_image_token(hf_processor, image_token_id: int | None) -> None:
    """transformers' processors append <image> to the LM tokenizer: its id must be the model's image token."""
    inserted = hf_processor.tokenizer.convert_tokens_to_ids(str(hf_processor.image_token))
    if image_token_id is not None and inserted != image_token_id:
        raise ValueError(
            f"transformers' processor would insert {hf_processor.image_token} (id {inserted}), not the model's "
            f"image token (id {image_token_id})"
        )


# Blip2.from_pretrained and Blip2Processor.from_pretrained read this layout;
# Blip2.save_pretrained(format="transformers") writes it
TRANSFORMERS = CheckpointFormat(
    "transformers",
    detect=is_transformers_checkpoint,
    load_model=load_transformers,
    load_processor=load_transformers_processor,
    save=save_transformers,
)
Blip2.register_format(TRANSFORMERS)
Blip2Processor.register_format(TRANSFORMERS)
