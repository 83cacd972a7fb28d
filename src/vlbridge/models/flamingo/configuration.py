"""Flamingo's config."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlbridge.core.config import LMConfig, VisionConfig


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
    # What follows a query image for a caption / an answer (OpenFlamingo's evaluation prompts); in-context
    # examples are "<image>{prompt} {target}<|endofchunk|>"
    caption_prompt: str = "Output:"
    vqa_prompt: str = "Question:{} Short answer:"

    def __post_init__(self):  # runs in from_dict too: a bad recipe fails when it is read
        if self.gating not in ("tanh", "none"):
            raise ValueError(f"FlamingoConfig.gating must be 'tanh' or 'none', got {self.gating!r}")
