"""EVE's config (and the Fuyu baseline's)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlbridge.core.config import LMConfig, VisionConfig

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
