"""EVE: an encoder-free VLM. Image patches go straight into the LM; a vision encoder is only a
training-time teacher. Diao et al., "Unveiling Encoder-Free Vision-Language Models", NeurIPS 2024
(baaivision/EVE, EVEv1). `kind="fuyu"`: Fuyu-8B (Adept, 2023), the simplest encoder-free baseline.

- Patch Embedding Layer (PEL): Conv2d patches; each 2x2-pooled cell attends to its own four
  sub-patches; a <CLS> token (learned query, global attention); a learned <SPL> after every row; an
  MLP projector into the LM. [CLS, row 1, SPL, row 2, SPL, ...]: 1 + h*(w+1) tokens for h x w cells,
  any aspect ratio, no 2-D position embeddings. The processor expands one "<image>" per prompt into
  that many ids, the model writes the PEL outputs there. Images of a batch are padded to a common
  grid; padded cells are masked out of attention and never reach the LM.
- Patch Aligning Layer (PAL, training only; pal.py): LM hidden states of several layers at the cells ->
  per-layer LayerNorm + Linear -> attention over layers -> 1 - cosine to the frozen teacher's patch
  features. Loss = CE + pal_weight * PAL. `from_pretrained` (inference) loads no teacher and no PAL.
  `pal="official"` is EVE's VisionCompressor, `pal="vlbridge"` an earlier design of this library.
- `freeze_for_stage`: 1 = PEL + PAL train (LM frozen); 2 and 3 = all but the teacher train.

Shapes: B batch, D PEL width, H LM width, Dt teacher width, (h, w) an image's cell grid, (hp, wp)
the batch's padded one (a cell: 2x2 patches in EVE, one in Fuyu), N = [1 +] hp*(wp+1) image tokens,
T LM tokens, L PAL layers.
Its config is config.EVEConfig, its processor processor.EVEProcessor.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlbridge.core import backbones
from vlbridge.core.backbones import freeze, next_token_loss, position_kwargs
from vlbridge.core.base import VLModel, read_model_config, read_weights
from vlbridge.core.generation import generate_from_embeds
from vlbridge.models.eve import pal as pal_designs
from vlbridge.models.eve.configuration import EVEConfig
from vlbridge.models.eve.processing import EVEProcessor, image_stats

log = logging.getLogger(__name__)


@dataclass
class EVEOutput:
    loss: torch.Tensor | None  # loss_ce + pal_weight * loss_pal, of the parts computed
    logits: torch.Tensor  # (B, T, V)
    loss_ce: torch.Tensor | None = None
    loss_pal: torch.Tensor | None = None  # only in training with a teacher


@dataclass
class ImageTokens:
    embeds: torch.Tensor  # (B, N, H) on the padded grid
    valid: torch.Tensor  # (B, N) bool: the tokens that go into the LM, in this order
    grid: torch.Tensor  # (B, 2) each image's own (h, w)
    padded: tuple[int, int]  # (hp, wp)


# ---------------------------------------------------------------------------------------- modules
class PatchAttention(nn.Module):
    """EVE's own attention (pel_attention="official"): queries x (B, Nq, D) attend over ctx (B, Nk, D)
    where valid (B, Nk); residual + output projection. Pre-norm (conv patch features have no fixed
    scale); q and k/v bias-free; the scores are scaled by D ** -0.5 although split into `heads` heads,
    as in EVE's LocalAttention / GlobalAttention, so official weights load without rescaling."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"pel_width {dim} does not split into {heads} heads")
        self.heads, self.scale = heads, dim**-0.5
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv = nn.Linear(dim, dim, bias=False), nn.Linear(dim, 2 * dim, bias=False)  # kv: [k; v]
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, ctx, valid=None):
        (B, Nq, D), Nk = x.shape, ctx.shape[1]
        q = self.q(self.norm_q(x)).view(B, Nq, self.heads, -1).transpose(1, 2)  # (B, heads, Nq, D/heads)
        k, v = self.kv(self.norm_kv(ctx)).view(B, Nk, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = None if valid is None else valid[:, None, None, :]  # SDPA: True = attended
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return x + self.proj(out.transpose(1, 2).reshape(B, Nq, D))


class CrossAttention(nn.Module):
    """pel_attention="mha": as PatchAttention but through nn.MultiheadAttention (biases on q, k, v; scores
    scaled per head). Pre-norm, because conv patch features have no fixed scale."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x, ctx, valid=None):
        ctx = self.norm_kv(ctx)
        mask = None if valid is None else ~valid  # MultiheadAttention: True = not attended
        return x + self.attn(self.norm_q(x), ctx, ctx, key_padding_mask=mask, need_weights=False)[0]


def cell_mask(grid: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
    """(B, hp, wp) bool: the cell is part of image b (its top-left h_b x w_b cells)."""
    r, c = torch.arange(hp, device=grid.device), torch.arange(wp, device=grid.device)
    return (r[None, :, None] < grid[:, 0, None, None]) & (c[None, None, :] < grid[:, 1, None, None])


def layout(cells, valid, split, cls=None):
    """cells (B, hp, wp, D) -> tokens (B, [1 +] hp*(wp+1), D) and their validity (B, N).

    Each row's split token sits at column wp, after the padded cells: as only valid tokens reach the
    LM, in order, image b still reads [CLS] + (w_b cells, SPL) x h_b."""
    B, hp, wp, D = cells.shape
    rows = torch.cat([cells, split.expand(B, hp, 1, D).to(cells.dtype)], dim=2)  # (B, hp, wp+1, D)
    row_valid = torch.cat([valid, valid[:, :, :1]], dim=2)  # a split token is valid iff its row is
    tokens, ok = rows.flatten(1, 2), row_valid.flatten(1, 2)
    if cls is not None:
        tokens, ok = torch.cat([cls, tokens], 1), torch.cat([ok.new_ones(B, 1), ok], 1)
    return tokens, ok


class PatchEmbedding(nn.Module):
    """EVE's PEL + projector: pixels (B, 3, 2p*hp, 2p*wp) -> (B, 1 + hp*(wp+1), H) and validity."""

    def __init__(self, config: EVEConfig, out_width: int):
        super().__init__()
        D = config.pel_width
        self.conv = nn.Conv2d(3, D, config.patch_size, stride=config.patch_size, bias=False)
        attention = PatchAttention if config.pel_attention == "official" else CrossAttention
        self.local_attn = attention(D, config.pel_heads)  # a cell reads its own 2x2 sub-patches
        self.global_attn = attention(D, config.pel_heads)  # <CLS> reads every valid cell
        self.cls = nn.Parameter(torch.randn(1, 1, D) * 0.02)
        self.split = nn.Parameter(torch.randn(D) * 0.02)
        self.projector = nn.Sequential(nn.Linear(D, out_width), nn.GELU(), nn.Linear(out_width, out_width))

    def forward(self, pixel_values, grid):
        x = self.conv(pixel_values)  # (B, D, 2hp, 2wp)
        B, D, hp, wp = x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2
        sub = x.view(B, D, hp, 2, wp, 2).permute(0, 2, 4, 3, 5, 1).reshape(B * hp * wp, 4, D)
        # query = avg_pool2d(x, 2), (B*hp*wp, 1, D). No mask: a cell is all image or all padding
        # (sizes are multiples of 2p) and reads only its own four sub-patches.
        cells = self.local_attn(sub.mean(1, keepdim=True), sub).view(B, hp, wp, D)
        valid = cell_mask(grid, hp, wp)
        cls = self.global_attn(self.cls.expand(B, 1, D), cells.view(B, hp * wp, D), valid.view(B, -1))
        tokens, ok = layout(cells, valid, self.split, cls)
        return self.projector(tokens), ok


class FuyuPatchEmbedding(nn.Module):
    """Fuyu: Linear(p*p*3 -> H) on raw patches, a learned newline after each row, no CLS."""

    def __init__(self, config: EVEConfig, out_width: int):
        super().__init__()
        self.patch_size = config.patch_size
        self.proj = nn.Linear(3 * config.patch_size**2, out_width)
        self.newline = nn.Parameter(torch.randn(out_width) * 0.02)

    def forward(self, pixel_values, grid):
        (B, C, Hpx, Wpx), p = pixel_values.shape, self.patch_size
        hp, wp = Hpx // p, Wpx // p
        patches = pixel_values.view(B, C, hp, p, wp, p).permute(0, 2, 4, 3, 5, 1).reshape(B, hp, wp, p * p * C)
        return layout(self.proj(patches), cell_mask(grid, hp, wp), self.newline)


# ------------------------------------------------------------------------------------------ model
class EVE(VLModel):
    model_type = "eve"
    config_class = EVEConfig
    processor_class = EVEProcessor
    backbone_prefixes = ("lm.", "teacher.")  # the LM goes to lm/ in transformers' format; the teacher nowhere
    stages = (1, 2, 3)

    def __init__(
        self,
        config: EVEConfig,
        lm: nn.Module,
        teacher: nn.Module | None = None,
        teacher_stats: tuple[list[float], list[float]] | None = None,
    ):
        super().__init__()
        if config.lm.is_encoder_decoder:
            raise ValueError("EVE puts the image inside a decoder-only LM; encoder-decoder LMs are not supported")
        self.config, self.lm = config, lm
        width = lm.get_input_embeddings().embedding_dim
        self.pel = (PatchEmbedding if config.kind == "eve" else FuyuPatchEmbedding)(config, width)
        self.teacher = self.pal = None
        if teacher is not None:
            depth = lm.config.get_text_config().num_hidden_layers
            if not config.pal_layers or not all(0 <= i <= depth for i in config.pal_layers):
                raise ValueError(f"pal_layers {config.pal_layers}: indices into the LM's {depth + 1} hidden states")
            self.teacher = freeze(teacher)
            if config.pal == "official":
                self.pal = pal_designs.OfficialAligner(
                    width, teacher.hidden_size, len(config.pal_layers), config.pal_heads
                )
                g = teacher.image_size // teacher.model.config.patch_size
                self.pal_ratio = pal_designs.grid_ratio(config.max_image_size // config.cell_size, g)
            else:
                self.pal = pal_designs.LayerFusionAligner(width, teacher.hidden_size, len(config.pal_layers))
            # the teacher's input = our pixels * scale + shift, where the two normalisations differ
            mean, std = torch.tensor(config.image_mean or [0.5] * 3), torch.tensor(config.image_std or [0.5] * 3)
            t_mean, t_std = (torch.tensor(x) for x in (teacher_stats or (mean, std)))
            self.register_buffer("teacher_scale", (std / t_std).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("teacher_shift", ((mean - t_mean) / t_std).view(1, 3, 1, 1), persistent=False)
        self.freeze_for_stage(1)

    # ------------------------------------------------------------------ building, saving, loading
    @classmethod
    def from_config(cls, config: EVEConfig, root: str | Path | None = None, load_teacher: bool = True) -> EVE:
        """Load the LM (and, unless load_teacher=False, the teacher) that `config` names."""
        config = copy.deepcopy(config)
        config.lm.name_or_path = backbones.resolve_path(config.lm.name_or_path, root)
        lm = backbones.load_lm(config.lm)
        if not config.pal_layers:
            config.pal_layers = default_pal_layers(config.pal, lm.config.num_hidden_layers)
        teacher = stats = None
        if config.teacher is not None and load_teacher:
            config.teacher.name_or_path = backbones.resolve_path(config.teacher.name_or_path, root)
            teacher, stats = backbones.load_vision(config.teacher), image_stats(config.teacher.name_or_path)
        return cls(config, lm, teacher, stats)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, load_teacher: bool = False) -> EVE:
        """Load a checkpoint for inference: no teacher, no PAL. load_teacher=True (to go on training)
        loads the teacher from where config.teacher names it and restores the saved PAL."""
        return super().from_pretrained(name_or_path, load_teacher=load_teacher)

    @classmethod
    def read_config(cls, root: Path) -> EVEConfig:
        """config.json; one saved before pel_attention / pal existed holds the designs of then."""
        config = read_model_config(cls.config_class, Path(root) / "config.json", cls.model_type)
        saved = json.loads((Path(root) / "config.json").read_text())
        return replace(config, **{k: v for k, v in LEGACY_DESIGNS.items() if k not in saved})

    @classmethod
    def load_vlbridge(cls, root: Path, load_teacher: bool = False) -> EVE:
        model = cls.from_config(cls.read_config(root), root, load_teacher=load_teacher)
        model.load_bridge_state(
            read_weights(root / "model.safetensors"), root, skip=("pal.",) if model.pal is None else ()
        )
        return model

    def _write_backbones(self, path: Path, include_backbones: bool, processor) -> EVEConfig:
        """lm/ in transformers' format, even with include_backbones=False (a trainer's checkpoint): from
        stage 2 on it is trained. The teacher is only named in the config."""
        config = copy.deepcopy(self.config)
        self.lm.save_pretrained(path / "lm")
        config.lm.name_or_path = "lm"
        return config

    # ------------------------------------------------------------------ freezing
    def freeze_for_stage(self, stage: int) -> dict[str, dict[str, int]]:
        """1 (LLM-guided pre-aligning): PEL + projector + PAL train, the LM frozen. 2 (generative
        pre-training), 3 (SFT): all but the teacher train. Logs and returns counts per part."""
        self.check_stage(stage)
        for name, p in self.named_parameters():
            p.requires_grad_(not name.startswith("teacher.") and (stage >= 2 or not name.startswith("lm.")))
        self.train(self.training)  # frozen parts back to eval mode
        return super().freeze_for_stage(stage)

    # ------------------------------------------------------------------ what it can do
    @property
    def tasks(self) -> frozenset[str]:
        return frozenset({"caption", "vqa"})

    def frozen_backbones(self) -> list[nn.Module]:
        frozen = [self.teacher] if self.teacher is not None else []
        return frozen + ([self.lm] if not any(p.requires_grad for p in self.lm.parameters()) else [])

    def training_loss(self, batch, generator=None, loss_weights=None):
        """CE on the target text + pal_weight * PAL; logs both parts."""
        if loss_weights:
            raise ValueError("loss_weights: EVE weighs PAL with its config's pal_weight")
        out = self(**batch)
        return out.loss, {
            k: v.item() for k, v in (("loss_ce", out.loss_ce), ("loss_pal", out.loss_pal)) if v is not None
        }

    # ------------------------------------------------------------------ images into the LM
    def image_tokens(self, pixel_values, image_sizes=None) -> ImageTokens:
        """PEL outputs for pixel_values (B, 3, Hmax, Wmax). image_sizes (B, 2): the (height, width) in
        pixels each image covers at the top left; None: the whole canvas."""
        cell = self.config.cell_size
        if pixel_values.shape[-2] % cell or pixel_values.shape[-1] % cell:
            raise ValueError(
                f"pixel_values {tuple(pixel_values.shape)}: height and width must be multiples of "
                f"{cell} (the processor pads them)"
            )
        sizes = torch.tensor([pixel_values.shape[-2:]] * len(pixel_values)) if image_sizes is None else image_sizes
        grid = torch.div(sizes.to(pixel_values.device), cell, rounding_mode="floor")
        embeds, valid = self.pel(pixel_values.to(next(self.pel.parameters()).dtype), grid)
        padded = (pixel_values.shape[-2] // cell, pixel_values.shape[-1] // cell)
        return ImageTokens(embeds, valid, grid, padded)

    def lm_inputs(self, pixel_values=None, image_sizes=None, input_ids=None, attention_mask=None, labels=None):
        """inputs_embeds (B, T, H) with the image tokens at the placeholder ids, attention mask,
        labels (-100 at image positions), the placeholder mask slots (B, T) and the ImageTokens."""
        image_id = self.config.image_token_id
        slots = input_ids == image_id if image_id is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        # the placeholder id may lie past the LM's vocabulary: it is never looked up
        embeds = self.lm.get_input_embeddings()(input_ids.masked_fill(slots, 0))
        image = None
        if pixel_values is not None:
            image = self.image_tokens(pixel_values, image_sizes)
            need, have = image.valid.sum(1).tolist(), slots.sum(1).tolist()
            if need != have:
                raise ValueError(
                    f"image tokens per sample: the images need {need} but input_ids hold {have} "
                    f"(id {image_id}); EVEProcessor expands the placeholder"
                )
            embeds = embeds.masked_scatter(slots[..., None], image.embeds[image.valid].to(embeds.dtype))
        elif slots.any():
            raise ValueError("input_ids hold image tokens but no pixel_values were given")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return embeds, mask, None if labels is None else labels.masked_fill(slots, -100), slots, image

    # ------------------------------------------------------------------ PAL
    @torch.no_grad()
    def teacher_grid(self, x) -> torch.Tensor:
        """(B, g, g, Dt): the frozen teacher's patch features at its feature layer (CLS and registers
        dropped) for x (B, 3, S, S) in the student's normalisation."""
        feats = self.teacher(x * self.teacher_scale + self.teacher_shift)  # (B, specials + g*g, Dt)
        g = self.teacher.image_size // self.teacher.model.config.patch_size
        return feats[:, -g * g :].unflatten(1, (g, g))

    def alignment_loss(self, hidden_states, slots, image: ImageTokens, pixel_values) -> torch.Tensor:
        """The PAL loss of config.pal (models/eve/pal.py) for the LM's hidden_states."""
        hidden = self.student_grid(hidden_states, slots, image)  # (B, hp, wp, L, H)
        hidden = hidden.to(next(self.pal.parameters()).dtype)
        if self.config.pal == "official":
            r, m = self.pal_ratio
            patch = self.teacher.model.config.patch_size
            g = self.teacher.image_size // patch
            x, boxes = pal_designs.teacher_canvas(pixel_values, image.grid, self.config.cell_size, patch, g, r, m)
            return pal_designs.official_pal_loss(self.pal, hidden, image.grid, self.teacher_grid(x), boxes, r, m)
        sizes = image.grid * self.config.cell_size
        target = self.teacher_grid(pal_designs.stretched_teacher_input(pixel_values, sizes, self.teacher.image_size))
        return pal_designs.pal_loss(self.pal(hidden), target, image.grid)

    def student_grid(self, hidden_states, slots, image: ImageTokens) -> torch.Tensor:
        """(B, hp, wp, L, H): the pal_layers' hidden states at the cells (CLS and SPL dropped), on
        the padded grid (padded cells are zeros)."""
        cells = torch.stack([hidden_states[i][slots] for i in self.config.pal_layers], dim=1)  # (M, L, H)
        buf = cells.new_zeros(*image.valid.shape, *cells.shape[1:])  # (B, N, L, H)
        buf[image.valid] = cells  # both in (sample, position) order
        hp, wp = image.padded
        return buf[:, int(self.config.kind == "eve") :].unflatten(1, (hp, wp + 1))[:, :, :wp]  # CLS, SPL out

    # ------------------------------------------------------------------ forward and generate
    def forward(
        self, pixel_values=None, image_sizes=None, input_ids=None, attention_mask=None, labels=None
    ) -> EVEOutput:
        """CE on labels (prompt and image positions -100) + pal_weight * PAL when training with a
        teacher. input_ids hold the expanded placeholders (EVEProcessor)."""
        embeds, mask, labels, slots, image = self.lm_inputs(
            pixel_values, image_sizes, input_ids, attention_mask, labels
        )
        align = self.pal is not None and self.training and image is not None and self.config.pal_weight > 0
        out = self.lm(
            inputs_embeds=embeds, attention_mask=mask, output_hidden_states=align, **position_kwargs(self.lm, mask)
        )
        loss = loss_ce = loss_pal = None
        if labels is not None:
            loss = loss_ce = next_token_loss(out.logits, labels)
        if align:
            loss_pal = self.alignment_loss(out.hidden_states, slots, image, pixel_values)
            loss = self.config.pal_weight * loss_pal + (0 if loss is None else loss)
        return EVEOutput(loss, out.logits, loss_ce, loss_pal)

    @torch.no_grad()
    def generate(self, pixel_values=None, image_sizes=None, input_ids=None, attention_mask=None, **generate_kwargs):
        """transformers' generate on inputs_embeds (continued from a cache of the prompt filled once per
        image, core/generation.py), with its keywords (max_new_tokens, num_beams, ...).
        Returns the new token ids only (B, L); batched prompts must be left-padded (the processor does)."""
        embeds, mask, _, _, _ = self.lm_inputs(pixel_values, image_sizes, input_ids, attention_mask)
        if "max_new_tokens" not in generate_kwargs and "max_length" not in generate_kwargs:
            generate_kwargs["max_new_tokens"] = 30
        self.check_context(embeds.shape[1], generate_kwargs)
        return generate_from_embeds(self.lm, embeds, mask, **generate_kwargs)


# saved configs without these keys were written when these were the only designs
LEGACY_DESIGNS = {"pel_attention": "mha", "pal": "vlbridge"}


def default_pal_layers(pal: str, num_layers: int) -> list[int]:
    """Every 4th hidden state counting back from the last, ascending (the query layer last). Official
    (EVE's VisionCompressor): 0, 4, ..., 32 for 32 layers, the embedding output included; vlbridge: 4, ..., 32."""
    return list(range(num_layers, -1 if pal == "official" else 0, -4))[::-1]


def create_eve(config: EVEConfig, root: str | Path | None = None) -> tuple[EVE, EVEProcessor]:
    """A new EVE (fresh PEL and PAL) on the LM and teacher `config` names, and its processor.
    Fills image_token_id (adding "<image>" to the tokenizer) and, when unset, image_mean / image_std
    from the teacher's image processor."""
    from transformers import AutoTokenizer

    config = copy.deepcopy(config)
    if config.teacher is not None:
        mean, std = image_stats(backbones.resolve_path(config.teacher.name_or_path, root))
        config.image_mean, config.image_std = config.image_mean or mean, config.image_std or std
    config.image_token_id = None
    tokenizer = AutoTokenizer.from_pretrained(backbones.resolve_path(config.lm.name_or_path, root))
    processor = EVEProcessor(tokenizer, config)
    config.image_token_id = processor.image_token_id
    model = EVE.from_config(config, root)
    processor.config = model.config
    return model, processor
