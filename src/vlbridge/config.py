"""Typed configs that round-trip through JSON.

Every config is a plain dataclass. `to_dict` / `from_dict` are exact inverses, and `from_dict`
refuses unknown keys (a typo in a recipe must not be silently ignored).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
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


@dataclass
class QFormerConfig:
    """BERT-style Q-Former. Defaults are BLIP-2's (BERT-base, 32 queries, cross-attention every 2nd layer)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    num_query_tokens: int = 32
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408  # width of the image features; set from the vision backbone
    vocab_size: int = 30523  # bert-base-uncased + [DEC]
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    attention_dropout: float = 0.1
    # The text side (word/position embeddings, text FFNs) reads captions in stage 1 and, with
    # Blip2Config.qformer_question, questions in stage 2; without that, stage 2 drops it.
    text_branch: bool = True
    # The stage-1 heads (ITG here; ITC projections, temperature and ITM head in Blip2): stage 2 drops them.
    pretrain_heads: bool = True
    pad_token_id: int = 0
    bos_token_id: int = 30522  # [DEC]: replaces [CLS] as the first token for image-grounded generation


@dataclass
class Blip2Config:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    lm: LMConfig | None = None  # None: a stage-1 model (no LLM)
    qformer_tokenizer: str = ""  # BERT tokenizer (+ [DEC]) for the Q-Former's text side
    embed_dim: int = 256  # ITC embedding width
    init_temperature: float = 0.07
    label_smoothing: float = 0.1  # ITC and ITG, as in LAVIS
    max_text_length: int = 32  # Q-Former text tokens in stage 1
    # transformers' newer BLIP-2 layout: the LM prompt holds num_query_tokens copies of this token
    # and the projected queries are written there. None: queries are prepended to the text.
    image_token_id: int | None = None
    caption_prompt: str = "a photo of"
    vqa_prompt: str = "Question: {} Answer:"
    # Stage 2: the Q-Former also reads the question (its tokens share self-attention with the queries,
    # bidirectionally), so the queries can pick what the question asks about; BLIP-2's VQA fine-tuning
    # (paper section 4.3). Captions (no question) run the queries alone, as without it.
    qformer_question: bool = False


@dataclass
class FlamingoConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    # Perceiver Resampler (OpenFlamingo: 6 layers, 64 latents, 8 heads x 64, FFN x4)
    perceiver_depth: int = 6
    num_latents: int = 64
    perceiver_heads: int = 8
    perceiver_dim_head: int = 64
    perceiver_ff_mult: int = 4
    max_media: int | None = None  # learned media-time embeddings for up to this many images (None: none)
    # Gated cross-attention before decoder layer i when (i + 1) % cross_attn_every == 0 (OpenFlamingo's rule)
    cross_attn_every: int = 1
    xattn_heads: int = 8
    xattn_dim_head: int = 64
    xattn_ff_mult: int = 4
    only_attend_immediate_media: bool = True  # False: each token sees all images up to its latest one
    # "tanh": x + tanh(alpha) * f(x), alpha = 0 at init (the frozen LM exactly). "none": x + f(x), the
    # paper's ablation without gating (the LM is perturbed from the first step).
    gating: str = "tanh"
    image_token: str = "<image>"
    eoc_token: str = "<|endofchunk|>"
    image_token_id: int | None = None  # filled from the tokenizer by create_flamingo
    eoc_token_id: int | None = None

    def __post_init__(self):  # runs in from_dict too: a bad recipe fails when it is read
        if self.gating not in ("tanh", "none"):
            raise ValueError(f"FlamingoConfig.gating must be 'tanh' or 'none', got {self.gating!r}")


EVE_KINDS = ("eve", "fuyu")  # EVEConfig.kind


@dataclass
class EVEConfig:
    lm: LMConfig = field(default_factory=LMConfig)  # decoder-only
    teacher: VisionConfig | None = None  # training only (PAL target); from_pretrained never loads it
    kind: str = "eve"  # "eve" (conv + local/global attention + CLS) | "fuyu" (Linear on raw patches)
    patch_size: int = 14
    pel_width: int = 1024
    pel_heads: int = 8
    max_image_size: int = 672  # bound on the longer side in pixels; a multiple of cell_size
    # Indices into the LM's hidden_states (0 = embeddings); [] = every 4th, counting back from the last.
    pal_layers: list[int] = field(default_factory=list)
    pal_weight: float = 1.0
    image_token: str = "<image>"
    image_token_id: int | None = None  # filled from the tokenizer by create_eve
    image_mean: list[float] | None = None  # None: the teacher's (filled by create_eve), else 0.5
    image_std: list[float] | None = None
    caption_prompt: str = "a photo of"  # the prompts training and evaluation put after the image
    vqa_prompt: str = "Question: {} Answer:"

    @property
    def cell_size(self) -> int:  # pixels a side of one token: EVE pools 2x2 patches, Fuyu does not
        return self.patch_size * (2 if self.kind == "eve" else 1)

    def num_image_tokens(self, h: int, w: int) -> int:
        return (self.kind == "eve") + h * (w + 1)

    def __post_init__(self):  # runs in from_dict too: a bad recipe fails when it is read
        if self.kind not in EVE_KINDS:
            raise ValueError(f"EVEConfig.kind must be one of {EVE_KINDS}, got {self.kind!r}")
        if self.max_image_size % self.cell_size:
            raise ValueError(f"max_image_size {self.max_image_size} is not a multiple of the cell {self.cell_size}")
