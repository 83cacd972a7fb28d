"""Stage-1 losses (ITC, ITM, ITG), their helpers, and the retrieval / feature API, each checked
against a computation written out by hand from the model's parts."""

import math

import pytest
import torch
import torch.nn.functional as F

import vlbridge.models.blip2.pretraining as pretrain_module
from vlbridge.models.blip2.pretraining import sample_hard_negatives, soft_cross_entropy

CAPTIONS = ["a red circle", "two blue squares above a small triangle", "a green triangle", "yellow square left"]
MORE = CAPTIONS + ["how many circles", "one large blue square and a small red circle"]
EPS = 0.1
Q = 4


@pytest.fixture(scope="module")
def stage1(build, images):
    """A randomised stage-1 model, its processor, Q-Former tokens of CAPTIONS and 4 images' features."""
    model, proc = build(None, randomize=True)
    q = proc.qformer_text(CAPTIONS)
    with torch.no_grad():
        feats = model.vision(images(4))
    return model, proc, q["input_ids"], q["attention_mask"], feats


# ---------------------------------------------------------------------------------- soft_cross_entropy
def test_soft_cross_entropy_one_positive_is_label_smoothed_ce():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g) * 3
    target = torch.tensor([3, 0, 6, 2, 2])
    positives = F.one_hot(target, 7).bool()
    for eps in (0.0, 0.1, 0.3):
        expected = F.cross_entropy(logits, target, label_smoothing=eps)
        assert torch.allclose(soft_cross_entropy(logits, positives, eps), expected, atol=1e-6)


def test_soft_cross_entropy_hand_computed():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    positives = torch.tensor([[True, False, False], [False, False, True]])
    lse = math.log(math.e + math.e**2 + math.e**3)
    row0 = -((0.9 + 0.1 / 3) * (1 - lse) + (0.1 / 3) * (2 - lse) + (0.1 / 3) * (3 - lse))
    row1 = math.log(3)  # uniform logits: -log(1/3) whatever the target
    expected = (row0 + row1) / 2
    assert abs(expected - 1.7031091) < 1e-6
    assert abs(soft_cross_entropy(logits, positives, 0.1).item() - expected) < 1e-6


def test_soft_cross_entropy_duplicates_share_target_mass():
    logits = torch.tensor([[2.0, 1.0, 0.5], [0.3, 1.0, -1.0]], requires_grad=True)
    dup = torch.tensor([[True, True, False], [True, True, False]])
    loss = soft_cross_entropy(logits, dup, EPS)
    target = torch.tensor([[0.45, 0.45, 0.0]] * 2) + EPS / 3
    expected = -(target * logits.detach().log_softmax(1)).sum(1).mean()
    assert torch.allclose(loss, expected, atol=1e-6)
    # the two positives are interchangeable; a positive and a negative are not
    assert torch.allclose(soft_cross_entropy(logits[:, [1, 0, 2]], dup, EPS), loss, atol=1e-6)
    assert not torch.allclose(soft_cross_entropy(logits[:, [0, 2, 1]], dup, EPS), loss, atol=1e-3)
    # the duplicate caption (column 1 in row 0) is pulled up, not pushed away as a negative
    loss.backward()
    assert logits.grad[0, 1] < 0
    single = logits.detach().clone().requires_grad_(True)
    soft_cross_entropy(single, torch.tensor([[True, False, False], [False, True, False]]), EPS).backward()
    assert single.grad[0, 1] > 0


# ---------------------------------------------------------------------------------- hard negatives
def test_hard_negatives_are_never_positives():
    image_ids = torch.tensor([0, 0, 1, 1, 2, 3])
    positives = image_ids[:, None] == image_ids[None, :]
    sim = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    seen = torch.zeros(6, 6, dtype=torch.bool)
    rows = torch.arange(6)
    for _ in range(300):
        idx, valid = sample_hard_negatives(sim, positives)
        assert valid.all()
        assert not positives[rows, idx].any()
        seen[rows, idx] = True
    assert torch.equal(seen, ~positives)  # and every negative can be drawn


def test_hard_negatives_all_positive_row_is_invalid():
    positives = torch.tensor([[True, True, True], [False, True, False], [False, False, True]])
    sim = torch.randn(3, 3, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    for _ in range(20):
        idx, valid = sample_hard_negatives(sim, positives)
        assert valid.tolist() == [False, True, True]
        assert 0 <= idx[0] < 3 and idx[1] in (0, 2) and idx[2] in (0, 1)
    idx, valid = sample_hard_negatives(sim, torch.ones(3, 3, dtype=torch.bool))
    assert not valid.any() and ((idx >= 0) & (idx < 3)).all()


def test_hard_negatives_follow_softmax_weights():
    # column 0 is the positive (and the most similar: it must still never be drawn); column 1 dominates
    sim = torch.tensor([[10.0, 3.0, 0.0, 0.0]]).repeat(4000, 1)
    positives = torch.zeros(4000, 4, dtype=torch.bool)
    positives[:, 0] = True
    torch.manual_seed(0)
    idx, valid = sample_hard_negatives(sim, positives)
    freq = torch.bincount(idx, minlength=4).float() / 4000
    p1 = math.exp(3) / (math.exp(3) + 2)  # 0.909
    assert valid.all() and freq[0] == 0
    assert abs(freq[1] - p1) < 0.03
    assert abs(freq[2] - (1 - p1) / 2) < 0.02 and abs(freq[3] - (1 - p1) / 2) < 0.02


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_hard_negatives_refuse_non_finite(bad):
    sim = torch.zeros(3, 3)
    sim[1, 2] = bad
    with pytest.raises(FloatingPointError):
        sample_hard_negatives(sim, torch.eye(3, dtype=torch.bool))


# ---------------------------------------------------------------------------------- pretrain_losses
def test_pretrain_losses_finite_and_add_up(stage1, images):
    model, _, ids, mask, feats = stage1
    torch.manual_seed(0)
    out = model.pretrain_losses(ids, mask, image_features=feats)
    parts = torch.stack([out.loss_itc, out.loss_itm, out.loss_itg])
    assert torch.isfinite(parts).all() and (parts > 0).all()
    assert torch.allclose(out.loss, parts.sum(), atol=1e-6)
    assert out.loss.requires_grad
    # pixel_values go through the (frozen) vision tower to the same features
    torch.manual_seed(0)
    again = model.pretrain_losses(ids, mask, pixel_values=images(4))
    assert torch.allclose(again.loss, out.loss, atol=1e-6)


def _cosine_sims(model, ids, mask, feats):
    """(I, T) max over queries of cos(vision_proj(query), text_proj(text [CLS])), written out longhand."""
    img = model.image_embeds(image_features=feats)
    query = model.qformer(image_embeds=img)  # (I, Q, d)
    cls = model.qformer(ids, mask)[:, 0]  # (T, d)
    cos = F.cosine_similarity(model.vision_proj(query)[:, None], model.text_proj(cls)[None, :, None], dim=-1)
    return cos.amax(-1)


@pytest.mark.parametrize("temp", [0.07, 0.7])
def test_itc_loss_by_hand(stage1, temp):
    model, _, ids, mask, feats = stage1
    with torch.no_grad():
        model.temp.fill_(temp)
    try:
        torch.manual_seed(0)
        out = model.pretrain_losses(ids, mask, image_features=feats)
        sim = _cosine_sims(model, ids, mask, feats) / min(temp, 0.5)  # the temperature is clamped to [0.001, 0.5]
        labels = torch.arange(4)
        manual = (
            F.cross_entropy(sim, labels, label_smoothing=EPS) + F.cross_entropy(sim.t(), labels, label_smoothing=EPS)
        ) / 2
        assert torch.allclose(out.loss_itc, manual, atol=1e-5)
        assert torch.allclose(model.itc(ids, mask, image_features=feats), sim * min(temp, 0.5), atol=1e-5)

        # samples 0 and 1 show the same image: each is a positive of the other, in both directions
        image_ids = torch.tensor([7, 7, 8, 9])
        out = model.pretrain_losses(ids, mask, image_features=feats, image_ids=image_ids)
        pos = (image_ids[:, None] == image_ids[None, :]).float()
        target = pos / pos.sum(1, keepdim=True) * (1 - EPS) + EPS / 4
        manual = (-(target * sim.log_softmax(1)).sum(1).mean() - (target * sim.t().log_softmax(1)).sum(1).mean()) / 2
        assert torch.allclose(out.loss_itc, manual, atol=1e-5)
    finally:
        with torch.no_grad():
            model.temp.fill_(0.07)


def test_itm_loss_by_hand(stage1, monkeypatch):
    model, _, ids, mask, feats = stage1
    neg = torch.tensor([1, 2, 3, 0])
    monkeypatch.setattr(
        pretrain_module, "sample_hard_negatives", lambda sim, positives: (neg, torch.ones(4, dtype=torch.bool))
    )
    out = model.pretrain_losses(ids, mask, image_features=feats)
    logits = torch.cat(
        [
            model.itm(ids, mask, image_features=feats),  # positives
            model.itm(ids, mask, image_features=feats[neg]),  # each text with a negative image
            model.itm(ids[neg], mask[neg], image_features=feats),
        ]
    )  # each image with a negative text
    labels = torch.tensor([1] * 4 + [0] * 8)
    assert torch.allclose(out.loss_itm, F.cross_entropy(logits, labels), atol=1e-5)


def test_itc_itm_only_and_indexed_images(stage1):
    model, _, ids, mask, feats = stage1
    full = model.pretrain_losses(ids, mask, image_features=feats, generator=torch.Generator().manual_seed(3))
    short = model.pretrain_losses(
        ids, mask, image_features=feats, generator=torch.Generator().manual_seed(3), itg=False
    )
    assert float(full.loss_itg) > 0 and float(short.loss_itg) == 0.0
    assert torch.allclose(short.loss_itc, full.loss_itc) and torch.allclose(short.loss_itm, full.loss_itm)
    assert torch.allclose(short.loss, short.loss_itc + short.loss_itm)
    # Pairs that repeat images: indexing 4 distinct images (with an image mask) = the repeated images.
    img = model.image_embeds(image_features=feats)
    index = torch.tensor([2, 0, 2, 3])
    image_mask = torch.ones(4, img.shape[1], dtype=torch.long)
    image_mask[2, -3:] = 0
    with torch.no_grad():
        indexed = model.qformer(ids, mask, image_embeds=img, image_mask=image_mask, image_index=index)
        repeated = model.qformer(ids, mask, image_embeds=img[index], image_mask=image_mask[index])
        assert torch.allclose(indexed, repeated, atol=1e-5)
        assert not torch.allclose(indexed, model.qformer(ids, mask, image_embeds=img[index]), atol=1e-4)


def test_itg_loss_by_hand(stage1):
    model, proc, ids, mask, feats = stage1
    dec_id = model.config.qformer.bos_token_id
    assert dec_id == proc.qformer_tokenizer.convert_tokens_to_ids("[DEC]")
    assert (ids[:, 0] == proc.qformer_tokenizer.cls_token_id).all() and (mask[:, -1] == 0).any()
    torch.manual_seed(0)
    out = model.pretrain_losses(ids, mask, image_features=feats)

    def manual_itg(first_token):
        dec = ids.clone()
        dec[:, 0] = first_token
        img = model.image_embeds(image_features=feats)
        h = model.qformer(dec, mask, image_embeds=img, use_queries=True, mask_kind="causal")[:, Q:]  # one pass
        logp = model.qformer.itg_logits(h).log_softmax(-1)
        terms = []
        for b in range(ids.shape[0]):
            for t in range(1, int(mask[b].sum())):  # predict each real token from the ones before it
                lp = logp[b, t - 1]
                terms.append((1 - EPS) * -lp[dec[b, t]] + EPS * -lp.mean())
        return torch.stack(terms).mean()

    assert torch.allclose(out.loss_itg, manual_itg(dec_id), atol=1e-5)
    assert not torch.allclose(out.loss_itg, manual_itg(proc.qformer_tokenizer.cls_token_id), atol=1e-4)


def test_all_same_image_still_finite(stage1):
    """No negatives exist: ITM sees only the positive pairs, ITC has uniform targets; nothing is NaN."""
    model, _, ids, mask, feats = stage1
    same = feats[:1].expand(4, -1, -1)
    out = model.pretrain_losses(ids, mask, image_features=same, image_ids=torch.zeros(4, dtype=torch.long))
    assert torch.isfinite(torch.stack([out.loss, out.loss_itc, out.loss_itm, out.loss_itg])).all()
    itm = model.itm(ids, mask, image_features=same)
    assert torch.allclose(out.loss_itm, F.cross_entropy(itm, torch.ones(4, dtype=torch.long)), atol=1e-5)
    sim = _cosine_sims(model, ids, mask, same) / 0.07
    manual = (-(sim.log_softmax(1)).mean(1).mean() - (sim.t().log_softmax(1)).mean(1).mean()) / 2
    assert torch.allclose(out.loss_itc, manual, atol=1e-5)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------- retrieval, features
def test_retrieval_scores(stage1, images):
    model, proc, *_ = stage1
    q = proc.qformer_text(MORE)
    ids, mask = q["input_ids"], q["attention_mask"]
    with torch.no_grad():
        feats = model.vision(images(5, seed=3))
    k = 2
    r = model.retrieval_scores(ids, mask, image_features=feats, k=k, batch_size=2)
    itc = model.itc(ids, mask, image_features=feats)
    assert r.itc.shape == (5, 6) and torch.allclose(r.itc, itc, atol=1e-6)
    assert r.i2t.shape == (5, 6) and r.t2i.shape == (6, 5)
    for scores, sim in ((r.i2t, itc), (r.t2i, itc.t())):
        finite = torch.isfinite(scores)
        assert (finite.sum(1) == k).all()
        top = torch.zeros_like(finite).scatter(1, sim.topk(k, dim=1).indices, True)
        assert torch.equal(finite, top)  # re-ranked: exactly each row's ITC top k
        assert (scores[~finite] == float("-inf")).all()
    temp = model.temp.clamp(0.001, 0.5).item()
    lavis = model.retrieval_scores(ids, mask, image_features=feats, k=k, batch_size=2, rerank="lavis")
    for i, t in torch.isfinite(r.i2t).nonzero().tolist():
        itm = model.itm(ids[t : t + 1], mask[t : t + 1], image_features=feats[i : i + 1])[0]
        assert torch.allclose(r.i2t[i, t], itm[1] - itm[0] + itc[i, t] / temp, atol=1e-4), (i, t)
        assert torch.allclose(lavis.i2t[i, t], itm[1] + itc[i, t], atol=1e-5), (i, t)
    for t, i in torch.isfinite(r.t2i).nonzero().tolist():
        itm = model.itm(ids[t : t + 1], mask[t : t + 1], image_features=feats[i : i + 1])[0]
        assert torch.allclose(r.t2i[t, i], itm[1] - itm[0] + itc[i, t] / temp, atol=1e-4), (t, i)
        assert torch.allclose(lavis.t2i[t, i], itm[1] + itc[i, t], atol=1e-5), (t, i)
    with pytest.raises(ValueError, match="rerank"):
        model.retrieval_scores(ids, mask, image_features=feats, k=k, rerank="sum")
    # the ITM term matters: re-ranked scores are not just the ITC similarities
    assert not torch.allclose(r.i2t[torch.isfinite(r.i2t)], itc[torch.isfinite(r.i2t)] / temp, atol=1e-3)
    everything = model.retrieval_scores(ids, mask, image_features=feats, k=100, batch_size=4)
    assert torch.isfinite(everything.i2t).all() and torch.isfinite(everything.t2i).all()
    assert torch.allclose(everything.i2t, everything.t2i.t(), atol=1e-5)


def test_extract_features(stage1):
    model, _, ids, mask, feats = stage1
    f = model.extract_features(ids, mask, image_features=feats)
    T = ids.shape[1]
    assert f.image_embeds.shape == (4, Q, 32) and f.image_embeds_proj.shape == (4, Q, 16)
    assert f.text_embeds.shape == (4, T, 32) and f.text_embeds_proj.shape == (4, 16)
    assert f.multimodal_embeds.shape == (4, Q, 32)
    assert torch.allclose(f.image_embeds_proj.norm(dim=-1), torch.ones(4, Q), atol=1e-5)
    assert torch.allclose(f.text_embeds_proj.norm(dim=-1), torch.ones(4), atol=1e-5)
    combined = torch.einsum("iqe,te->itq", f.image_embeds_proj, f.text_embeds_proj).amax(-1)
    assert torch.allclose(combined, model.itc(ids, mask, image_features=feats), atol=1e-6)
    # multimodal embeds are the queries after a bidirectional pass with the text: what ITM reads
    assert torch.allclose(
        model.itm_head(f.multimodal_embeds).mean(1), model.itm(ids, mask, image_features=feats), atol=1e-5
    )
    assert not torch.allclose(f.multimodal_embeds, f.image_embeds, atol=1e-3)
    image_only = model.extract_features(image_features=feats)
    assert torch.equal(image_only.image_embeds, f.image_embeds) and image_only.text_embeds is None
    text_only = model.extract_features(ids, mask)
    assert text_only.image_embeds is None and text_only.multimodal_embeds is None
    assert torch.equal(text_only.text_embeds_proj, f.text_embeds_proj)
