"""EVE's Patch Aligning Layer (PAL, training only): LM hidden states at the image cells -> the frozen
teacher's patch features, loss 1 - cosine. Two designs, chosen by `EVEConfig.pal`:

- "official" (`OfficialAligner`, `official_pal_loss`): the design of EVE's `VisionCompressor`
  (baaivision/EVE, EVEv1). Per listed layer LayerNorm + bias-free Linear; the last listed layer's
  projection queries the others with multi-head attention (no q/k projections, scores scaled by the
  teacher width ** -0.5 over the whole width); output = Linear(the query layer's raw state) +
  Linear(fused). In EVE the query layer is the LM's last (pal_layers 0, 4, ..., 32 of 32 layers).
  Loss: 1 - mean cosine per image, then the mean over images. The teacher sees each image resized with
  its aspect ratio kept and centred on its square canvas (padded with the mean colour); only the
  teacher patches the image covers count. A student grid finer than the teacher's by an integer
  factor (EVE-HD) is average-pooled before the head, as in EVE.
- "vlbridge" (`LayerFusionAligner`, `pal_loss`): one-head fusion with learned q/k whose output is a
  convex mix of the layer projections, no residual; the loss over all cells of the batch; the teacher
  sees each image stretched to its square input, and the finer grid is pooled onto the coarser.

Shapes: L PAL layers, H LM width, Dt teacher width, (h, w) an image's cell grid, g the teacher's patch
grid (g x g), n cells of one image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# ------------------------------------------------------------------------------------------ official
class OfficialAligner(nn.Module):
    """hidden (n, L, H), the query layer last -> (n, Dt)."""

    def __init__(self, lm_width: int, teacher_width: int, num_layers: int, heads: int):
        super().__init__()
        if teacher_width % heads:
            raise ValueError(f"official PAL: teacher width {teacher_width} does not split into {heads} heads")
        self.heads, self.scale = heads, teacher_width**-0.5  # the whole width, as EVE scales
        self.norms = nn.ModuleList(nn.LayerNorm(lm_width) for _ in range(num_layers))
        self.projs = nn.ModuleList(nn.Linear(lm_width, teacher_width, bias=False) for _ in range(num_layers))
        self.input_proj = nn.Linear(lm_width, teacher_width)  # the residual path from the raw query layer
        self.output_proj = nn.Linear(teacher_width, teacher_width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        f = torch.stack([p(norm(hidden[:, i])) for i, (norm, p) in enumerate(zip(self.norms, self.projs))], 1)
        n, L, Dt = f.shape
        q = f[:, -1].view(n, self.heads, 1, Dt // self.heads)  # (n, heads, 1, d)
        kv = f[:, :-1].view(n, L - 1, self.heads, Dt // self.heads).transpose(1, 2)  # (n, heads, L-1, d)
        weights = ((q * self.scale) * kv).sum(-1).softmax(-1)  # (n, heads, L-1); no keys: an empty mix, 0
        fused = (weights.unsqueeze(-1) * kv).sum(-2).reshape(n, Dt)
        return self.input_proj(hidden[:, -1]) + self.output_proj(fused)


def grid_ratio(max_cells: int, teacher_grid: int) -> tuple[int, int]:
    """(r, m): the student grid is average-pooled by r, the teacher's covered patches by m (one is 1).

    EVE (672 px, 28-px cells; a 336-px teacher with 14-px patches) has r = m = 1: a cell is one teacher
    patch. EVE-HD's student is finer (r = 2); its factor must divide, as EVE asserts. A teacher finer
    than the student (which EVE never has) sees each cell as m x m patches, m = g // max_cells."""
    if max_cells >= teacher_grid:
        if max_cells % teacher_grid:
            raise ValueError(
                f"official PAL: the student's largest grid ({max_cells} cells a side) is not a multiple of the "
                f"teacher's ({teacher_grid} patches); choose max_image_size so that it is"
            )
        return max_cells // teacher_grid, 1
    return 1, teacher_grid // max_cells


def teacher_canvas(pixel_values, grid, cell: int, patch: int, teacher_grid: int, r: int, m: int):
    """The teacher's input (B, 3, g*patch, g*patch) in the student's normalisation (padding = 0, the
    mean colour) and each image's box (top, left, height, width) in teacher patches.

    Image b covers its top-left h x w cells; the cells EVE keeps after pooling by r (h // r * r rows)
    are resized to (h // r * m, w // r * m) patches, aspect kept, and centred on whole patches."""
    B, size = len(pixel_values), teacher_grid * patch
    canvas = pixel_values.new_zeros(B, 3, size, size, dtype=torch.float32)
    boxes = []
    for b, (h, w) in enumerate(grid.tolist()):
        th, tw = h // r * m, w // r * m
        top, left = (teacher_grid - th) // 2, (teacher_grid - tw) // 2
        region = pixel_values[b : b + 1, :, : h // r * r * cell, : w // r * r * cell].float()
        region = F.interpolate(region, size=(th * patch, tw * patch), mode="bilinear", antialias=True)
        canvas[b, :, top * patch : (top + th) * patch, left * patch : (left + tw) * patch] = region[0]
        boxes.append((top, left, th, tw))
    return canvas, boxes


def official_pal_loss(aligner: OfficialAligner, hidden, grid, teacher_feats, boxes, r: int, m: int):
    """Mean over images of (1 - mean cosine over the image's cells).

    hidden (B, hp, wp, L, H): the PAL layers at the padded cell grid; grid (B, 2) each image's (h, w);
    teacher_feats (B, g, g, Dt); boxes from `teacher_canvas`."""
    losses = []
    for b, ((h, w), (top, left, th, tw)) in enumerate(zip(grid.tolist(), boxes)):
        x = hidden[b, :h, :w]  # (h, w, L, H)
        if r > 1:  # EVE-HD: pool the hidden states onto the teacher's grid before the head
            x = F.avg_pool2d(x.flatten(2).permute(2, 0, 1), r).permute(1, 2, 0).unflatten(-1, x.shape[2:])
        t = teacher_feats[b, top : top + th, left : left + tw]  # (th, tw, Dt)
        if m > 1:  # a teacher finer than the student: its m x m patches of a cell, averaged
            t = F.avg_pool2d(t.permute(2, 0, 1), m).permute(1, 2, 0)
        student = aligner(x.flatten(0, 1))  # (n, Dt)
        losses.append(1 - F.cosine_similarity(student.float(), t.flatten(0, 1).float(), dim=-1).mean())
    return torch.stack(losses).mean()


# ------------------------------------------------------------------------------------------ vlbridge
class LayerFusionAligner(nn.Module):
    """hidden of one cell at L layers (..., L, H) -> (..., Dt), the teacher's space.

    Fusion is attention over the layers, query from the last one: each cell weighs the depths that best
    match the teacher (shallow layers keep more local detail), which one learned weighted sum for all
    cells cannot. The values are the per-layer projections themselves: the output is a convex mix of them."""

    def __init__(self, lm_width: int, teacher_width: int, num_layers: int):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(lm_width) for _ in range(num_layers))
        self.projs = nn.ModuleList(nn.Linear(lm_width, teacher_width) for _ in range(num_layers))
        self.q, self.k = nn.Linear(teacher_width, teacher_width), nn.Linear(teacher_width, teacher_width)

    def forward(self, hidden):
        f = torch.stack(
            [proj(norm(hidden[..., i, :])) for i, (norm, proj) in enumerate(zip(self.norms, self.projs))], dim=-2
        )  # (..., L, Dt)
        scores = self.k(f) @ self.q(f[..., -1, :]).unsqueeze(-1) / math.sqrt(f.shape[-1])  # (..., L, 1)
        return (scores.softmax(-2) * f).sum(-2)


def stretched_teacher_input(pixel_values, image_sizes, size: int) -> torch.Tensor:
    """(B, 3, size, size): each image's own region resized to the teacher's square input, so student cell
    (r, c) and the same relative place of the teacher's grid see the same pixels."""
    regions = [pixel_values[b : b + 1, :, :h, :w].float() for b, (h, w) in enumerate(image_sizes.tolist())]
    return torch.cat([F.interpolate(x, size=(size, size), mode="bilinear", antialias=True) for x in regions])


def pal_loss(student, teacher, grid) -> torch.Tensor:
    """Mean of 1 - cosine over the valid cells of the batch (each cell counts once).

    student (B, hp, wp, Dt): image b's cells are the top-left grid[b] = (h, w); teacher (B, gh, gw, Dt)
    all valid. Where the grids differ, each axis is brought to the coarser of the two by (adaptive)
    average pooling: a finer teacher is pooled onto the student's grid, a finer student (EVE-HD)
    onto the teacher's."""
    losses = []
    gh, gw = teacher.shape[1:3]
    for b, (h, w) in enumerate(grid.tolist()):
        s, t = student[b, :h, :w].permute(2, 0, 1).float(), teacher[b].permute(2, 0, 1).float()  # (Dt, ., .)
        size = (min(h, gh), min(w, gw))
        s, t = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
        losses.append(1 - F.cosine_similarity(s, t, dim=0).flatten())
    return torch.cat(losses).mean()
