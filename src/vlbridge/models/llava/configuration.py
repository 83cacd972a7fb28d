"""LLaVA's config (the MLP projector baseline)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlbridge.core.config import LMConfig, VisionConfig

PROJECTORS = ("mlp2x_gelu", "linear")  # LlavaConfig.projector


@dataclass
class LlavaConfig:
    # The frozen tower; LLaVA-1.5 reads the penultimate layer (feature_layer -2)
    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)  # decoder-only
    # "mlp2x_gelu": Linear(Dv, H) -> GELU -> Linear(H, H), LLaVA-1.5 (transformers' LlavaMultiModalProjector).
    # "linear": one Linear(Dv, H), LLaVA-1: fewer parameters, a little weaker in the paper's ablation.
    projector: str = "mlp2x_gelu"
    projector_bias: bool = True
    # True: drop the tower's first token (CLS), LLaVA's vision_feature_select_strategy "default", for
    # towers that have one (CLIP). False: every token the tower makes ("full"; SigLIP has no CLS).
    drop_cls: bool = True
    image_token: str = "<image>"
    image_token_id: int | None = None  # filled from the tokenizer by create_llava
    num_image_tokens: int = 0  # visual tokens per image: filled from the vision tower when it is loaded
    caption_prompt: str = "a photo of"  # the prompts training and evaluation put after the image
    vqa_prompt: str = "Question: {} Answer:"

    def __post_init__(self):  # runs in from_dict too: a bad recipe fails when it is read
        if self.projector not in PROJECTORS:
            raise ValueError(f"LlavaConfig.projector must be one of {PROJECTORS}, got {self.projector!r}")
        if self.num_image_tokens < 0:
            raise ValueError(f"LlavaConfig.num_image_tokens must be >= 0, got {self.num_image_tokens}")
