"""BLIP-2 stage 1: the Q-Former's three pre-training losses on image-text pairs (no LLM).

ITC (image-text contrastive): the best-matching query of each image against each text's [CLS], over the
global batch. ITM (image-text matching): a binary head on the queries after a bidirectional pass with
the text, on the positive pairs and on hard negatives drawn from ITC's similarities. ITG (image-grounded
text generation): the text decoded causally, reading the queries through their cached keys/values.
Li et al. 2023, section 3.1.

Shapes: B batch (this rank), B_all global batch, N image tokens, Dv image width, Q queries, E embed_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from vlbridge.core.dist import gather_no_grad, gather_with_grad, world
from vlbridge.models.blip2.configuration import HARD_NEGATIVES

if TYPE_CHECKING:
    from vlbridge.models.blip2.modeling import Blip2


@dataclass
class Blip2PretrainOutput:
    loss: torch.Tensor
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    loss_itg: torch.Tensor


def soft_cross_entropy(logits: torch.Tensor, positives: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy against targets spread evenly over each row's positives, with label smoothing.

    With one positive per row this equals F.cross_entropy(..., label_smoothing=smoothing); with
    several (captions of the same image in one batch) none of them is pushed away as a negative.
    """
    target = positives.float() / positives.sum(1, keepdim=True)
    target = target * (1 - smoothing) + smoothing / logits.shape[1]
    return -(target * logits.float().log_softmax(dim=1)).sum(1).mean()


@torch.no_grad()
def sample_hard_negatives(
    sim: torch.Tensor,
    positives: torch.Tensor,
    generator: torch.Generator | None = None,
    rule: str = "exclude_positives",
):
    """For each row of the global similarities `sim` (B_all, B_all), draw one column from softmax(sim).

    rule "exclude_positives" (vlbridge's default): every positive (`positives`, same image) has weight 0.
    A row whose columns are all positives has no negative to give: it is marked invalid (and gets a dummy
    index) instead of producing NaN weights. One batched draw.
    rule "lavis": LAVIS 1.0.2's Blip2Qformer: weights softmax(sim) + 1e-4 with only the row's own pair
    (the diagonal) set to 0, and one torch.multinomial call per row, in row order, so that the same RNG
    state draws the same negatives as LAVIS (in one process: under DDP each LAVIS rank draws its own rows
    from its own RNG, here every rank draws all rows the same way). Other positives of the row stay drawable.
    Returns (index (B_all,), valid (B_all,)). generator: draw from it instead of torch's global RNG.
    """
    if not torch.isfinite(sim).all():
        raise FloatingPointError("non-finite ITC similarities: cannot sample ITM hard negatives")
    if rule == "lavis":
        weights = sim.float().softmax(dim=1) + 1e-4
        weights.fill_diagonal_(0)
        valid = (weights > 0).any(dim=1)  # false only for a global batch of one
        weights = torch.where(valid[:, None], weights, torch.ones_like(weights))
        index = [torch.multinomial(row, 1, generator=generator) for row in weights]
        return torch.cat(index), valid
    if rule != "exclude_positives":
        raise ValueError(f"hard-negative rule {rule!r}: expected one of {HARD_NEGATIVES}")
    valid = ~positives.all(dim=1)
    weights = sim.float().masked_fill(positives, float("-inf")).softmax(dim=1)
    weights = torch.where(valid[:, None], weights, torch.ones_like(weights))
    return torch.multinomial(weights, 1, generator=generator).squeeze(1), valid


def pretrain_losses(
    model: Blip2,
    input_ids,
    attention_mask,
    pixel_values=None,
    image_features=None,
    image_ids=None,
    generator: torch.Generator | None = None,
    itg: bool = True,
) -> Blip2PretrainOutput:
    """ITC + ITM + ITG. input_ids/attention_mask: Q-Former tokens (B, T) starting with [CLS].

    image_ids (B,): samples with equal ids show the same image (several captions per image);
    they are positives for each other in ITC and never drawn as ITM negatives.
    generator: draws the ITM hard negatives (else torch's global RNG). Every rank draws for all
    rows of the global batch and keeps its own, so with one generator seeded per step the
    negatives depend on the global batch only, not on how many processes share it.
    itg=False: ITC + ITM only (loss_itg is 0), e.g. a retrieval fine-tune or a like-for-like
    comparison with transformers' Blip2ForImageTextRetrieval, which has no ITG head.
    """
    model.require_text_branch()
    eps = model.config.label_smoothing
    img = model.image_embeds(pixel_values, image_features)  # (B, N, Dv)
    B = img.shape[0]
    rank, _ = world()
    if image_ids is None:
        image_ids = torch.arange(B, device=img.device) + rank * B

    # ITC: unimodal passes (queries alone with the image; text alone).
    query, image_feats, query_cache = model.query_features(img, use_cache=itg)
    _, text_feat = model.text_features(input_ids, attention_mask)
    image_feats_all, text_feat_all = gather_with_grad(image_feats), gather_with_grad(text_feat)
    ids_all = gather_no_grad(image_ids)
    temp = model.itc_temperature
    sim_i2t = torch.einsum("bqe,te->btq", image_feats, text_feat_all).amax(-1) / temp  # (B, B_all)
    sim_t2i = torch.einsum("te,bqe->tbq", text_feat, image_feats_all).amax(-1) / temp  # (B, B_all)
    positives = image_ids[:, None] == ids_all[None, :]
    loss_itc = (soft_cross_entropy(sim_i2t, positives, eps) + soft_cross_entropy(sim_t2i, positives, eps)) / 2

    # ITM: B positive pairs, then per text a hard-negative image, per image a hard-negative text.
    img_all = gather_with_grad(img)
    ids_text_all, mask_text_all = gather_no_grad(input_ids), gather_no_grad(attention_mask)
    # Drawn from the global (B_all, B_all) similarities for every global row; this rank keeps its rows.
    mine, positives_all = slice(rank * B, (rank + 1) * B), ids_all[:, None] == ids_all[None, :]
    # keywords only where they differ from the defaults; LAVIS, too, draws the negative images first
    draw = {"generator": generator} if generator is not None else {}
    if model.config.hard_negatives != "exclude_positives":
        draw["rule"] = model.config.hard_negatives
    neg_img, valid_t = sample_hard_negatives(gather_no_grad(sim_t2i.detach()), positives_all, **draw)
    neg_txt, valid_i = sample_hard_negatives(gather_no_grad(sim_i2t.detach()), positives_all, **draw)
    neg_img, valid_t, neg_txt, valid_i = neg_img[mine], valid_t[mine], neg_txt[mine], valid_i[mine]
    itm_ids = torch.cat([input_ids, input_ids[valid_t], ids_text_all[neg_txt[valid_i]]])
    itm_mask = torch.cat([attention_mask, attention_mask[valid_t], mask_text_all[neg_txt[valid_i]]])
    own = torch.arange(rank * B, (rank + 1) * B, device=img.device)  # this rank's rows of img_all
    itm_img = torch.cat([own, neg_img[valid_t], own[valid_i]])  # (~3B,) rows of img_all
    itm_labels = torch.zeros(len(itm_ids), dtype=torch.long, device=img.device)
    itm_labels[:B] = 1
    loss_itm = F.cross_entropy(model.itm_logits(img_all, itm_ids, itm_mask, itm_img).float(), itm_labels)
    if not itg:
        zero = loss_itm.new_zeros(())
        return Blip2PretrainOutput(loss_itc + loss_itm, loss_itc, loss_itm, zero)

    # ITG: [DEC] replaces [CLS]; text attends to the cached query keys/values (queries never see
    # text, so the ITC pass computed exactly the query states ITG needs) and causally to itself.
    dec_ids = input_ids.clone()
    dec_ids[:, 0] = model.config.qformer.bos_token_id
    labels = dec_ids.masked_fill(attention_mask == 0, -100)
    h = model.qformer(dec_ids, attention_mask, past_key_values=query_cache, mask_kind="causal")
    logits = model.qformer.itg_logits(h)
    loss_itg = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, label_smoothing=eps
    )
    return Blip2PretrainOutput(loss_itc + loss_itm + loss_itg, loss_itc, loss_itm, loss_itg)
