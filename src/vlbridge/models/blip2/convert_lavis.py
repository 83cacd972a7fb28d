"""LAVIS' BLIP-2 checkpoints <-> vlbridge's `Blip2`.

LAVIS (salesforce-lavis 1.0.2) saves `torch.save({"model": state_dict, ...})` to a .pth file, for
`blip2` / `blip2_feature_extractor` (stage 1: Blip2Qformer), `blip2_opt` and `blip2_t5` (stage 2). Its
trainer keeps only the trained parameters and the buffers, so released files usually hold neither the
frozen EVA-ViT nor the LLM: the caller names them (`vision=`, `lm=`). No config is stored: the Q-Former's
shape follows from tensor shapes and key names. Every tensor name goes through ONE table, `KEY_MAP`, in
both directions (`Blip2.from_pretrained` / `vlbridge.load`, `save_pretrained(format="lavis")`); a name
the table does not place, or a model tensor the file does not fill, is one ValueError naming the first.

Facts the mapping rests on (read from LAVIS 1.0.2: blip2.py, blip2_qformer.py, Qformer.py, eva_vit.py,
blip2_opt.py, blip2_t5.py):
- `ln_vision` is a plain nn.LayerNorm: eps 1e-5 (transformers' post_layernorm has the tower's 1e-6).
- The ITG head `Qformer.cls.predictions` is BERT's MLM head; its decoder weight is the word-embedding
  table and its decoder bias the head's `bias` (aliases, checked equal on import, rewritten on export).
  `Qformer.bert.embeddings.position_ids` is a buffer (arange): accepted and rewritten, never read.
- EVA-ViT (`visual_encoder.*`, eva_clip_g: 39 blocks, eps 1e-6, exact GELU, width / 88 heads) has the
  structure of transformers' Blip2VisionModel, whose merged `qkv.bias` is LAVIS' (q_bias, 0, v_bias):
  the key bias is zero in both. LAVIS' clip_L tower (vit "pretrain_vitL") has another layout: pass it
  by `vision=` instead.
- `temp` is kept; LAVIS' BLIP-2 never clamps it. Training numerics (clamp, hard negatives) are the
  recipe's choice (Blip2Config.itc_temperature_clamp / hard_negatives), not the file's: loading keeps
  every output LAVIS computes at inference, training stays vlbridge's unless the recipe asks for LAVIS'.
- Blip2T5 runs its T5 with exact GELU feed-forwards (`t5_config.dense_act_fn = "gelu"`); the LM named
  by `lm=` is loaded with that setting for a blip2_t5 file.
"""

from __future__ import annotations

import copy
import logging
import pickle
from pathlib import Path

import torch

from vlbridge.core import backbones
from vlbridge.core.base import CheckpointFormat
from vlbridge.core.config import LMConfig, VisionConfig
from vlbridge.core.keymap import KeyMap
from vlbridge.models.blip2.configuration import Blip2Config, QFormerConfig
from vlbridge.models.blip2.modeling import Blip2
from vlbridge.models.blip2.processing import Blip2Processor, check_qformer_tokenizer

log = logging.getLogger(__name__)

SUFFIXES = (".pth", ".pt")
FORMAT = (
    "a LAVIS BLIP-2 checkpoint is torch.save({'model': state_dict}) of blip2 / blip2_feature_extractor / "
    "blip2_opt / blip2_t5, tensors only"
)

# (LAVIS name, vlbridge name). {i}: layer index, {p}: weight|bias, {rest}: any suffix, {llm}: "opt" or
# "t5" (fixed per file: opt_proj / t5_proj, opt_model / t5_model). First match wins, both directions.
# Shapes: d Q-Former width, Dv vision width, H LM width, Q queries, V vocabulary, E ITC width.
_L = "Qformer.bert.encoder.layer.{i}."
_Q = "qformer.layers.{i}."
_V = "visual_encoder.blocks.{i}."
_T = "vision.model.encoder.layers.{i}."
KEY_MAP = KeyMap(
    [
        ("query_tokens", "qformer.query_tokens"),  # (1, Q, d)
        ("Qformer.bert.embeddings.word_embeddings.weight", "qformer.word_embeddings.weight"),  # (V, d), stage 1
        ("Qformer.bert.embeddings.position_embeddings.weight", "qformer.position_embeddings.weight"),
        ("Qformer.bert.embeddings.LayerNorm.{p}", "qformer.layernorm.{p}"),  # LN over [queries; text]
        (_L + "attention.self.query.{p}", _Q + "attention.query.{p}"),  # self-attention over [queries; text]
        (_L + "attention.self.key.{p}", _Q + "attention.key.{p}"),
        (_L + "attention.self.value.{p}", _Q + "attention.value.{p}"),
        (_L + "attention.output.dense.{p}", _Q + "attention.dense.{p}"),
        (_L + "attention.output.LayerNorm.{p}", _Q + "attention.norm.{p}"),
        (_L + "crossattention.self.query.{p}", _Q + "crossattention.query.{p}"),  # queries -> image, key (d, Dv)
        (_L + "crossattention.self.key.{p}", _Q + "crossattention.key.{p}"),
        (_L + "crossattention.self.value.{p}", _Q + "crossattention.value.{p}"),
        (_L + "crossattention.output.dense.{p}", _Q + "crossattention.dense.{p}"),
        (_L + "crossattention.output.LayerNorm.{p}", _Q + "crossattention.norm.{p}"),
        (_L + "intermediate_query.dense.{p}", _Q + "ffn_query.intermediate.{p}"),  # FFN of the query positions
        (_L + "output_query.dense.{p}", _Q + "ffn_query.output.{p}"),
        (_L + "output_query.LayerNorm.{p}", _Q + "ffn_query.norm.{p}"),
        (_L + "intermediate.dense.{p}", _Q + "ffn.intermediate.{p}"),  # FFN of the text positions, stage 1
        (_L + "output.dense.{p}", _Q + "ffn.output.{p}"),
        (_L + "output.LayerNorm.{p}", _Q + "ffn.norm.{p}"),
        ("Qformer.cls.predictions.transform.dense.{p}", "qformer.lm_head.dense.{p}"),  # ITG head
        ("Qformer.cls.predictions.transform.LayerNorm.{p}", "qformer.lm_head.norm.{p}"),
        ("Qformer.cls.predictions.bias", "qformer.lm_head.bias"),  # (V,)
        ("ln_vision.{p}", "ln_vision.{p}"),  # (Dv,)
        ("vision_proj.{p}", "vision_proj.{p}"),  # (E, d)
        ("text_proj.{p}", "text_proj.{p}"),  # (E, d)
        ("itm_head.{p}", "itm_head.{p}"),  # (2, d)
        ("temp", "temp"),  # ()
        ("{llm}_proj.{p}", "lm_proj.{p}"),  # (H, d), stage 2
        ("{llm}_model.{rest}", "lm.{rest}"),  # the frozen LM, when a file holds it (LAVIS' trainer leaves it out)
        # EVA-ViT into transformers' Blip2VisionModel; qkv.bias is assembled from q_bias / v_bias first
        ("visual_encoder.cls_token", "vision.model.embeddings.class_embedding"),  # (1, 1, Dv)
        ("visual_encoder.pos_embed", "vision.model.embeddings.position_embedding"),  # (1, 1 + patches, Dv)
        ("visual_encoder.patch_embed.proj.{p}", "vision.model.embeddings.patch_embedding.{p}"),
        (_V + "norm1.{p}", _T + "layer_norm1.{p}"),
        (_V + "attn.qkv.{p}", _T + "self_attn.qkv.{p}"),  # (3 Dv, Dv)
        (_V + "attn.proj.{p}", _T + "self_attn.projection.{p}"),
        (_V + "norm2.{p}", _T + "layer_norm2.{p}"),
        (_V + "mlp.fc1.{p}", _T + "mlp.fc1.{p}"),
        (_V + "mlp.fc2.{p}", _T + "mlp.fc2.{p}"),
    ]
)
POSITION_IDS = "Qformer.bert.embeddings.position_ids"  # a buffer, arange(max_position_embeddings)
ALIASES = {  # LAVIS name -> the LAVIS name it is tied to
    "Qformer.cls.predictions.decoder.weight": "Qformer.bert.embeddings.word_embeddings.weight",
    "Qformer.cls.predictions.decoder.bias": "Qformer.cls.predictions.bias",
}
TOWER_NORM = "vision.model.post_layernorm."  # never applied (ln_vision is); a copy of ln_vision
LAVIS_LN_EPS = 1e-5


# ---------------------------------------------------------------------------------- reading
def is_lavis_checkpoint(root: Path) -> bool:
    """A .pth / .pt file, or a directory without config.json that holds one."""
    root = Path(root)
    if root.is_file():
        return root.suffix in SUFFIXES
    return root.is_dir() and not (root / "config.json").exists() and any(_checkpoint_files(root))


def _checkpoint_files(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix in SUFFIXES)


def checkpoint_file(root: Path) -> Path:
    root = Path(root)
    if root.is_file():
        return root
    files = _checkpoint_files(root)
    if len(files) != 1:
        raise ValueError(f"{root}: holds {len(files)} .pth files ({[p.name for p in files]}): name the one to load")
    return files[0]


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """checkpoint["model"] of a LAVIS file, read with weights_only=True (never arbitrary unpickling),
    memory-mapped when the file is in torch's zip format (tensors are then read as they are used)."""
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # a file in torch's legacy format cannot be mapped: read it whole
            if "mmap" not in str(e):
                raise
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({first}); vlbridge never unpickles "
            f"arbitrary objects: {FORMAT}"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e}); {FORMAT}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        found = sorted(map(str, ckpt))[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: no 'model' state dict (found {found}); {FORMAT}")
    state = ckpt["model"]
    bad = next((k for k, v in state.items() if not torch.is_tensor(v)), None)
    if bad is not None:
        raise ValueError(f"{path}: model[{bad!r}] is not a tensor; {FORMAT}")
    return state


def llm_kind(state) -> str | None:
    """ "opt" (blip2_opt), "t5" (blip2_t5) or None (stage 1), from the projection's name."""
    kinds = [k for k in ("opt", "t5") if f"{k}_proj.weight" in state]
    if len(kinds) > 1:
        raise ValueError("the checkpoint holds both opt_proj and t5_proj: not one LAVIS BLIP-2 model")
    return kinds[0] if kinds else None


def _layer_ids(state, prefix: str) -> list[int]:
    return sorted({int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)})


def _require(state, path, *names):
    for name in names:
        if name not in state:
            raise ValueError(f"{path}: missing key {name!r}; {FORMAT}")


def qformer_config(state, path, num_heads: int | None = None) -> QFormerConfig:
    """The Q-Former's shape from tensor shapes and key names; heads are not stored (default: width / 64)."""
    L = "Qformer.bert.encoder.layer."
    _require(
        state, path, "query_tokens", f"{L}0.crossattention.self.key.weight", f"{L}0.intermediate_query.dense.weight"
    )
    _, Q, d = state["query_tokens"].shape
    layers = _layer_ids(state, L)
    if layers != list(range(len(layers))):
        raise ValueError(f"{path}: Q-Former layers {layers} are not numbered 0..n-1")
    cross = [i for i in layers if f"{L}{i}.crossattention.self.key.weight" in state]
    freq = cross[1] - cross[0] if len(cross) > 1 else len(layers)
    if cross != list(range(0, len(layers), freq)):
        raise ValueError(f"{path}: cross-attention in layers {cross}; vlbridge's Q-Former has it every n layers from 0")
    heads = num_heads or max(d // 64, 1)  # BERT's head width; pass num_heads for other Q-Formers
    if d % heads:
        raise ValueError(f"{path}: Q-Former width {d} is not divisible by num_heads={heads}: pass num_heads")
    words = state.get("Qformer.bert.embeddings.word_embeddings.weight")
    if "Qformer.bert.embeddings.position_embeddings.weight" in state:  # (P, d)
        positions = state["Qformer.bert.embeddings.position_embeddings.weight"].shape[0]
    else:  # stage 2 keeps only the position_ids buffer (1, P)
        positions = state[POSITION_IDS].shape[-1] if POSITION_IDS in state else QFormerConfig.max_position_embeddings
    vocab = words.shape[0] if words is not None else QFormerConfig.vocab_size
    return QFormerConfig(
        hidden_size=d,
        num_layers=len(layers),
        num_heads=heads,
        intermediate_size=state[f"{L}0.intermediate_query.dense.weight"].shape[0],
        num_query_tokens=Q,
        cross_attention_frequency=freq,
        encoder_hidden_size=state[f"{L}0.crossattention.self.key.weight"].shape[1],
        vocab_size=vocab,
        max_position_embeddings=positions,
        text_branch=words is not None,
        pretrain_heads=words is not None and "itm_head.weight" in state,
        pad_token_id=0,  # BERT's [PAD]
        bos_token_id=vocab - 1,  # [DEC]: LAVIS appends it to bert-base-uncased
    )


def eva_config(state, path, vision_heads: int | None = None):
    """transformers' Blip2VisionConfig for the EVA-ViT in `visual_encoder.*` (heads: width / 88, EVA ViT-g's)."""
    from transformers import Blip2VisionConfig

    if "visual_encoder.cls_token" not in state:
        first = next(k for k in state if k.startswith("visual_encoder."))
        raise ValueError(
            f"{path}: unknown key {first!r}: vlbridge maps LAVIS' EVA-ViT (eva_clip_g) only; leave visual_encoder.* "
            f"out of the file and pass the tower as vision=..."
        )
    _require(state, path, "visual_encoder.pos_embed", "visual_encoder.patch_embed.proj.weight")
    D = state["visual_encoder.cls_token"].shape[-1]
    patch = state["visual_encoder.patch_embed.proj.weight"].shape[-1]
    side = round((state["visual_encoder.pos_embed"].shape[1] - 1) ** 0.5)
    heads = vision_heads or (D // 88 if D % 88 == 0 else None)
    if heads is None:
        raise ValueError(f"{path}: EVA-ViT width {D}: pass vision_heads (the number of attention heads)")
    return Blip2VisionConfig(
        hidden_size=D,
        intermediate_size=state["visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=len(_layer_ids(state, "visual_encoder.blocks.")),
        num_attention_heads=heads,
        image_size=side * patch,
        patch_size=patch,
        layer_norm_eps=1e-6,  # create_eva_vit_g's norm_layer
        hidden_act="gelu",
        qkv_bias="visual_encoder.blocks.0.attn.q_bias" in state,
    )


def merge_qkv_bias(state: dict, path) -> dict:
    """EVA's q_bias / v_bias -> one qkv.bias (q, 0, v), as transformers' Blip2Attention holds it."""
    state = dict(state)
    for i in _layer_ids(state, "visual_encoder.blocks."):
        a = f"visual_encoder.blocks.{i}.attn."
        if a + "q_bias" in state or a + "v_bias" in state:
            _require(state, path, a + "q_bias", a + "v_bias")
            q, v = state.pop(a + "q_bias"), state.pop(a + "v_bias")
            state[a + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    return state


def split_qkv_bias(state: dict) -> dict:
    """The inverse of merge_qkv_bias; a non-zero key bias has no place in LAVIS' EVA."""
    out = {}
    for name, tensor in state.items():
        if name.startswith("visual_encoder.blocks.") and name.endswith(".attn.qkv.bias"):
            q, k, v = tensor.chunk(3)
            if k.any():
                raise ValueError(f"{name}: a non-zero key bias has no place in LAVIS' EVA-ViT (q_bias, v_bias)")
            out[name.replace("qkv.bias", "q_bias")], out[name.replace("qkv.bias", "v_bias")] = q, v
        else:
            out[name] = tensor
    return out


def _vision_config(vision) -> VisionConfig:
    if isinstance(vision, VisionConfig):
        return copy.deepcopy(vision)
    return VisionConfig(str(vision), feature_layer=-1)  # a tower already cut as LAVIS uses it (BLIP-2's own)


def _load_lm(cfg: LMConfig, kind: str | None):
    """The LM named by lm=; for blip2_t5 with exact-GELU feed-forwards, as Blip2T5 runs its T5."""
    if kind != "t5":
        return backbones.load_lm(cfg)
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    hf = AutoConfig.from_pretrained(cfg.name_or_path)
    hf.dense_act_fn = "gelu"
    lm = AutoModelForSeq2SeqLM.from_pretrained(
        cfg.name_or_path, config=hf, dtype=backbones.resolve_dtype(cfg.dtype), **backbones.quantization_kwargs(cfg)
    )
    cfg.hidden_size, cfg.is_encoder_decoder = lm.get_input_embeddings().embedding_dim, True
    return backbones.freeze(lm)


def load_lavis(
    root: Path,
    source: str = "",
    vision: str | VisionConfig | None = None,
    lm: str | LMConfig | None = None,
    qformer_tokenizer: str = "",
    num_heads: int | None = None,
    vision_heads: int | None = None,
    drop_text_branch: bool = False,
    load_vision: bool = True,
    load_lm: bool = True,
) -> Blip2:
    """A vlbridge Blip2 holding a LAVIS checkpoint (a .pth file, or a directory holding one).

    vision: the frozen tower when the file has none (hub id / directory, cut as LAVIS uses it, or a
        VisionConfig); lm: the LM of a blip2_opt / blip2_t5 file (or a new LM for a stage-1 file: its
        projection starts fresh); qformer_tokenizer: BERT's (+ [DEC]), recorded for the processor;
        num_heads / vision_heads: attention heads, which no tensor shape gives (defaults: width / 64 for
        the Q-Former, width / 88 for EVA-ViT).
    """
    path = checkpoint_file(root)
    state = read_state(path)
    kind = llm_kind(state)
    config = Blip2Config(qformer=qformer_config(state, path, num_heads), qformer_tokenizer=str(qformer_tokenizer or ""))
    if config.qformer_tokenizer and config.qformer.text_branch:
        _qformer_tokenizer(config)  # its [PAD] / [DEC] ids, for ITG
    if "vision_proj.weight" in state:
        config.embed_dim = state["vision_proj.weight"].shape[0]
    in_file = any(k.startswith("visual_encoder.") for k in state)
    skip = []  # LAVIS prefixes deliberately not loaded
    tower = None
    if in_file and vision is not None:
        raise ValueError(f"{path}: the file holds its vision tower (visual_encoder.*): do not pass vision=")
    if in_file:
        config.vision = VisionConfig("", feature_layer=-1, hidden_size=config.qformer.encoder_hidden_size)
        if load_vision:
            from transformers import Blip2VisionModel

            model = Blip2VisionModel(eva_config(state, path, vision_heads))
            tower = backbones.freeze(backbones.VisionBackbone(model, feature_layer=-1))
        else:
            skip.append("visual_encoder.")
    elif vision is not None:
        config.vision = _vision_config(vision)
        tower = backbones.load_vision(config.vision) if load_vision else None
    elif load_vision:
        raise ValueError(
            f"{path}: no vision tower in the file (LAVIS saves trained tensors only): pass vision=... "
            f"(e.g. the EVA ViT-g of 'Salesforce/blip2-opt-2.7b'), or load_vision=False"
        )
    if kind is not None and lm is None and load_lm:
        raise ValueError(
            f"{path}: a blip2_{kind} checkpoint: pass lm=... (the LM it was trained with), or load_lm=False"
        )
    lm_module = None
    if lm is not None:
        config.lm = copy.deepcopy(lm) if isinstance(lm, LMConfig) else LMConfig(str(lm))
        lm_module = _load_lm(config.lm, kind) if load_lm else None
    if lm_module is None or kind is None:  # no LM here, or a new one for a stage-1 file (fresh projection)
        skip += [f"{kind}_proj.", f"{kind}_model."] if kind else []
    config.ln_vision_eps = LAVIS_LN_EPS
    blip2 = Blip2(config, tower, lm_module)

    own = blip2.state_dict()
    state = {k: v for k, v in merge_qkv_bias(state, path).items() if not k.startswith(tuple(skip))}
    for alias, target in ALIASES.items():  # tied in LAVIS: the same tensor under two names
        if alias in state and target in state and not torch.equal(state[alias], state[target]):
            raise ValueError(f"{path}: {alias!r} differs from {target!r}; LAVIS ties them")
    extra = (POSITION_IDS, *ALIASES)
    names = KEY_MAP.bind(llm=kind or "opt")
    mapped, unknown = names.map_state({k: v for k, v in state.items() if k not in extra}, to_ours=True, targets=own)
    loaded_lm = any(k.startswith("lm.") for k in mapped)
    required = [
        k
        for k in own
        if not k.startswith(TOWER_NORM)
        and not (k.startswith("vision.") and not in_file)
        and not (k.startswith("lm.") and not loaded_lm)
        and not (k.startswith("lm_proj.") and kind is None)  # a new LM's projection starts fresh
    ]
    missing = [k for k in required if k not in mapped]
    if unknown or missing:
        more = lambda keys: f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
        problems = [f"unknown key {unknown[0]!r}{more(unknown)}"] if unknown else []
        if missing:
            problems.append(f"missing key {names.to_theirs(missing[0]) or missing[0]!r}{more(missing)}")
        raise ValueError(f"{path}: does not match vlbridge's BLIP-2: {'; '.join(problems)}; {FORMAT}")
    for name, tensor in mapped.items():
        if tensor.shape != own[name].shape:
            theirs = names.to_theirs(name)
            raise ValueError(
                f"{path}: {theirs!r} has shape {tuple(tensor.shape)}, the model expects {tuple(own[name].shape)}"
            )
    blip2.load_state_dict(mapped, strict=False)
    if in_file and tower is not None:  # the tower saved alone then carries LAVIS' ln_vision as its final LN
        tower.model.post_layernorm.load_state_dict(blip2.ln_vision.state_dict())
    log.info("%s: LAVIS %s checkpoint, %d tensors", path, f"blip2_{kind}" if kind else "blip2 (stage 1)", len(mapped))
    if drop_text_branch:
        blip2.drop_text_branch()
    return blip2


def _qformer_tokenizer(config: Blip2Config):
    """BERT's tokenizer with [DEC] (added as LAVIS' init_tokenizer adds it when missing); the Q-Former's
    [PAD] / [DEC] ids are taken from it (no tensor says them), after checking it fits the vocabulary."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(config.qformer_tokenizer)
    if tok.bos_token is None:
        tok.add_special_tokens({"bos_token": "[DEC]"})
    config.qformer.pad_token_id, config.qformer.bos_token_id = tok.pad_token_id, tok.bos_token_id
    check_qformer_tokenizer(tok, config)
    return tok


def lavis_processor(config: Blip2Config, image_size: int | None = None) -> Blip2Processor:
    """The processor for a model loaded from a LAVIS file: the image processor of the tower named by
    config.vision or, for an EVA-ViT from the file, LAVIS' eval transform (bicubic resize to
    `image_size`, CLIP's mean and std: transformers' BlipImageProcessor); the tokenizers config names."""
    from transformers import AutoImageProcessor, AutoTokenizer, BlipImageProcessorPil

    if config.vision.name_or_path:
        image_processor = AutoImageProcessor.from_pretrained(config.vision.name_or_path, backend="pil")
    else:
        image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    qtok = None
    if config.qformer_tokenizer:
        qtok = _qformer_tokenizer(config)
    elif config.qformer.pretrain_heads:
        raise ValueError(
            "a stage-1 LAVIS checkpoint reads text with BERT + [DEC]: vlbridge.load(path, qformer_tokenizer=...) "
            "or load_lavis_processor(path, qformer_tokenizer=...)"
        )
    tok = AutoTokenizer.from_pretrained(config.lm.name_or_path) if config.lm is not None else None
    return Blip2Processor(
        image_processor,
        qtok,
        tok,
        num_query_tokens=config.qformer.num_query_tokens,
        is_encoder_decoder=bool(config.lm and config.lm.is_encoder_decoder),
        max_text_length=config.max_text_length,
    )


def load_lavis_processor(
    root: Path,
    source: str = "",
    vision: str | VisionConfig | None = None,
    lm: str | LMConfig | None = None,
    qformer_tokenizer: str = "",
    num_heads: int | None = None,
) -> Blip2Processor:
    """The processor of a LAVIS file; a LAVIS file holds no tokenizer, so vlbridge.load hands this the
    same vision= / lm= / qformer_tokenizer= as the model (its other keywords are the model's only)."""
    path = checkpoint_file(root)
    state = read_state(path)
    config = Blip2Config(qformer=qformer_config(state, path, num_heads))
    config.qformer_tokenizer = str(qformer_tokenizer or "")
    image_size = None
    if vision is not None:
        config.vision = _vision_config(vision)
    elif "visual_encoder.pos_embed" in state:
        image_size = (
            round((state["visual_encoder.pos_embed"].shape[1] - 1) ** 0.5)
            * state["visual_encoder.patch_embed.proj.weight"].shape[-1]
        )
    else:
        raise ValueError(f"{path}: no vision tower in the file: pass vision=... for its image processor")
    if lm is not None:
        from transformers import AutoConfig

        config.lm = copy.deepcopy(lm) if isinstance(lm, LMConfig) else LMConfig(str(lm))
        config.lm.is_encoder_decoder = bool(AutoConfig.from_pretrained(config.lm.name_or_path).is_encoder_decoder)
    elif llm_kind(state) is not None:
        raise ValueError(f"{path}: a blip2_{llm_kind(state)} checkpoint: pass lm=... for its tokenizer")
    return lavis_processor(config, image_size)


# ---------------------------------------------------------------------------------- writing
def lavis_state_dict(model: Blip2) -> dict[str, torch.Tensor]:
    """`model` under LAVIS' names, as LAVIS' trainer saves it: the trained tensors (Q-Former, queries,
    ln_vision, heads, temp, projection) and the position_ids buffer; the frozen EVA-ViT too when it came
    from a LAVIS file (nothing else names it); never the LM, which LAVIS loads by name."""
    cfg = model.config
    if cfg.qformer_question:
        raise ValueError(
            "this Q-Former reads the question (qformer_question): LAVIS' BLIP-2 cannot; use format='vlbridge'"
        )
    kind = None
    if model.lm is not None:
        kind = {"opt": "opt", "t5": "t5"}.get(model.lm.config.model_type)
        if kind is None:
            raise ValueError(
                f"LAVIS' BLIP-2 has OPT (blip2_opt) and T5 (blip2_t5) LMs, not {model.lm.config.model_type!r}: "
                f"use format='vlbridge'"
            )
    if model.ln_vision.eps != LAVIS_LN_EPS:
        log.warning("ln_vision eps %g is written where LAVIS uses %g", model.ln_vision.eps, LAVIS_LN_EPS)
    tower_from_file = not cfg.vision.name_or_path and model.vision is not None
    ours = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("lm.") or name.startswith(TOWER_NORM):
            continue
        if name.startswith("vision.") and not tower_from_file:
            continue
        ours[name] = tensor.detach().cpu().contiguous()
    names = KEY_MAP.bind(llm=kind or "opt")
    state, unplaced = names.map_state(ours, to_ours=False)
    if unplaced:
        raise ValueError(f"no place in LAVIS' BLIP-2 layout for {unplaced[0]!r} ({len(unplaced)} tensors); {FORMAT}")
    state = split_qkv_bias(state)
    state[POSITION_IDS] = torch.arange(cfg.qformer.max_position_embeddings)[None]
    for alias, target in ALIASES.items():
        if target in state:
            state[alias] = state[target]  # one tensor under both names, as LAVIS' tied modules save it
    return state


def save_lavis(model: Blip2, path: str | Path, processor=None) -> None:
    """Write `model` as a LAVIS checkpoint: `path` ending in .pth / .pt is the file, otherwise a directory
    that gets checkpoint.pth. LAVIS keeps no processor files: a processor given is not written."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        path.mkdir(parents=True, exist_ok=True)
        path = path / "checkpoint.pth"
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    if processor is not None:
        log.info("LAVIS checkpoints hold no tokenizer or image settings: the processor is not written")
    torch.save({"model": lavis_state_dict(model)}, path)


# Blip2.from_pretrained / vlbridge.load read LAVIS files; Blip2.save_pretrained(format="lavis") writes them
LAVIS = CheckpointFormat(
    "lavis", detect=is_lavis_checkpoint, load_model=load_lavis, load_processor=load_lavis_processor, save=save_lavis
)
Blip2.register_format(LAVIS)
Blip2Processor.register_format(LAVIS)
