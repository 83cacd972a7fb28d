"""EVE's config (and the Fuyu baseline's)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlbridge.core.config import LMConfig, VisionConfig

EVE_KINDS = ("eve", "fuyu")  # EVEConfig.kind
PEL_ATTENTIONS = ("official", "mha")  # EVEConfig.pel_attention
PALS = ("official", "vlbridge")  # EVEConfig.pal


@dataclass
class EVEConfig:
    lm: LMConfig = field(default_factory=LMConfig)  # decoder-only
    teacher: VisionConfig | None = None  # training only (PAL target); from_pretrained never loads it
    kind: str = "eve"  # "eve" (conv + local/global attention + CLS) | "fuyu" (Linear on raw patches)
    patch_size: int = 14
    pel_width: int = 1024
    pel_heads: int = 8
    # "official": EVE's own attention (bias-free q and k/v, scores scaled by pel_width ** -0.5 over the
    # whole width although split into pel_heads heads): official checkpoints load and export exactly.
    # "mha": nn.MultiheadAttention (biases, per-head scaling); the same function class, no exact export.
    pel_attention: str = "official"
    max_image_size: int = 672  # bound on the longer side in pixels; a multiple of cell_size
    # "official": EVE's VisionCompressor (the last listed layer queries the others, multi-head, plus a
    # residual from it; loss per image, then over images; the teacher sees the image aspect kept and
    # padded). "vlbridge": one-head fusion with learned q/k, a convex mix of the layers, the loss over all
    # cells, the teacher sees each image stretched to its square. models/eve/pal.py has both.
    pal: str = "official"
    pal_heads: int = 8  # official PAL: heads of the fusion (the teacher's width must divide by it)
    # Indices into the LM's hidden_states (0 = embeddings), the query layer last. [] = every 4th counting
    # back from the last: official 0, 4, ..., 32 for 32 layers (embeddings included); vlbridge 4, ..., 32.
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
        if self.pel_attention not in PEL_ATTENTIONS:
            raise ValueError(f"EVEConfig.pel_attention must be one of {PEL_ATTENTIONS}, got {self.pel_attention!r}")
        if self.pal not in PALS:
            raise ValueError(f"EVEConfig.pal must be one of {PALS}, got {self.pal!r}")
        if self.pal_heads < 1:
            raise ValueError(f"EVEConfig.pal_heads must be >= 1, got {self.pal_heads}")
        if self.max_image_size % self.cell_size:
            raise ValueError(f"max_image_size {self.max_image_size} is not a multiple of the cell {self.cell_size}")
