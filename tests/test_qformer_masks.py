"""Q-Former attention masks, proved on the model itself (dropout 0, random weights).

Every "does not change" check is paired with a "does change" check on the same inputs, so a mask
that lets nothing (or everything) through cannot pass.
"""

import pytest
import torch

import vlbridge.models.blip2.qformer as qformer_module
from vlbridge.models.blip2.configuration import QFormerConfig
from vlbridge.models.blip2.qformer import QFormer, build_mask
from vlbridge.testing import randomize_

Q, N, ENC, V, T = 4, 5, 24, 40, 6


def make_qformer(**overrides) -> QFormer:
    cfg = dict(
        hidden_size=32,
        num_layers=3,
        num_heads=4,
        intermediate_size=64,
        num_query_tokens=Q,
        cross_attention_frequency=2,
        encoder_hidden_size=ENC,
        vocab_size=V,
        max_position_embeddings=32,
        dropout=0.0,
        attention_dropout=0.0,
    )
    cfg.update(overrides)
    torch.manual_seed(0)
    return randomize_(QFormer(QFormerConfig(**cfg)), seed=0).eval()


def make_inputs(B: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (B, T), generator=g)
    img = torch.randn(B, N, ENC, generator=g)
    return ids, img


def other_tokens(ids: torch.Tensor, cols) -> torch.Tensor:
    """ids with the tokens at `cols` replaced by different (non-pad) tokens."""
    out = ids.clone()
    out[:, cols] = (ids[:, cols] - 5 + 7) % (V - 5) + 5
    assert (out[:, cols] != ids[:, cols]).all()
    return out


def same(a, b, atol=1e-6):
    return torch.allclose(a, b, atol=atol, rtol=0)


def changed(a, b):
    """Every sample (dim 0) changed somewhere by a clear margin."""
    return bool(((a - b).abs().flatten(1).amax(1) > 1e-3).all())


# ---------------------------------------------------------------------------------- build_mask
_ = False
X = True
EXPECTED = {  # Q=2 queries, T=3 text tokens, the last one padding; keys [q0 q1 t0 t1 t2]
    "unimodal": [[X, X, _, _, _], [X, X, _, _, _], [_, _, X, X, _], [_, _, X, X, _], [_, _, X, X, _]],
    "bidirectional": [[X, X, X, X, _]] * 5,
    "causal": [[X, X, _, _, _], [X, X, _, _, _], [X, X, X, _, _], [X, X, X, X, _], [X, X, X, X, _]],
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_build_mask_hand_written(kind):
    text_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    mask = build_mask(kind, 2, text_mask, batch=2)
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    expected = torch.tensor(EXPECTED[kind])
    assert torch.equal(mask[0, 0], expected)
    # the second sample has no padding: its last key column is visible wherever t2's row/kind allows
    full = expected.clone()
    full[:, 4] = {
        "unimodal": torch.tensor([_, _, X, X, X]),
        "bidirectional": torch.ones(5, dtype=torch.bool),
        "causal": torch.tensor([_, _, _, _, X]),
    }[kind]
    assert torch.equal(mask[1, 0], full)
    cached = build_mask(kind, 2, text_mask, batch=2, cached_query=True)
    assert cached.shape == (2, 1, 3, 5)  # rows: text only; keys: cached queries + text
    assert torch.equal(cached[0, 0], expected[2:]) and torch.equal(cached[1, 0], full[2:])


def test_build_mask_edge_cases():
    assert build_mask("causal", 3, None, batch=2).shape == (2, 1, 3, 3)
    assert build_mask("unimodal", 3, None, batch=2).all()  # queries alone see each other
    with pytest.raises(ValueError, match="unknown mask kind 'casual'"):
        build_mask("casual", 2, torch.ones(1, 3), batch=1)


# ---------------------------------------------------------------------------------- ITC: unimodal
def test_unimodal_separates_queries_and_text():
    qf = make_qformer()
    ids, img = make_inputs()
    ids2, img2 = other_tokens(ids, [2, 4]), make_inputs(seed=1)[1]
    with torch.no_grad():
        h = qf(ids, image_embeds=img, mask_kind="unimodal")
        # one unimodal pass is exactly the ITC passes: queries alone, and text alone (positions from 0)
        assert same(h[:, :Q], qf(image_embeds=img), atol=1e-5)
        assert same(h[:, Q:], qf(ids), atol=1e-5)
        assert same(qf(ids2, image_embeds=img, mask_kind="unimodal")[:, :Q], h[:, :Q])  # text moved
        assert same(qf(ids, image_embeds=img2, mask_kind="unimodal")[:, Q:], h[:, Q:])  # image moved
        assert changed(qf(ids2, image_embeds=img, mask_kind="unimodal")[:, Q:], h[:, Q:])
        assert changed(qf(ids, image_embeds=img2, mask_kind="unimodal")[:, :Q], h[:, :Q])
        bi = qf(ids, image_embeds=img, mask_kind="bidirectional")
        assert changed(qf(ids2, image_embeds=img, mask_kind="bidirectional")[:, :Q], bi[:, :Q])
        assert changed(qf(ids, image_embeds=img2, mask_kind="bidirectional")[:, Q:], bi[:, Q:])


# ---------------------------------------------------------------------------------- ITG: causal
def test_causal_queries_ignore_text_and_text_is_causal():
    qf = make_qformer()
    ids, img = make_inputs()
    img2 = make_inputs(seed=1)[1]
    run = lambda i, im: qf(i, image_embeds=im, use_queries=True, mask_kind="causal")  # noqa: E731
    with torch.no_grad():
        h = run(ids, img)
        assert h.shape == (2, Q + T, 32)
        assert same(h[:, :Q], qf(image_embeds=img), atol=1e-5)
        assert same(run(other_tokens(ids, list(range(T))), img)[:, :Q], h[:, :Q])
        for j in range(T):  # change token j: positions < j are untouched, j and later move
            hj = run(other_tokens(ids, [j]), img)
            for i in range(T):
                if i < j:
                    assert same(hj[:, Q + i], h[:, Q + i]), (i, j)
                else:
                    assert changed(hj[:, Q + i], h[:, Q + i]), (i, j)
        h_img = run(ids, img2)
        for i in range(T):  # every text position sees the image (through the queries)
            assert changed(h_img[:, Q + i], h[:, Q + i]), i
        # the same pass without queries is a different computation: text does see them
        assert changed(qf(ids, mask_kind="causal"), h[:, Q:])


def test_cached_queries_match_one_pass():
    qf = make_qformer()
    ids, img = make_inputs()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        one_pass = qf(ids, mask, image_embeds=img, use_queries=True, mask_kind="causal")
        query, cache = qf(image_embeds=img, use_cache=True)
        assert len(cache) == 3 and cache[0][0].shape == (2, 4, Q, 8)  # per layer (k, v): (B, H, Q, d/H)
        assert same(query, one_pass[:, :Q], atol=1e-5)
        text = qf(ids, mask, past_key_values=cache, mask_kind="causal")
        assert text.shape == (2, T, 32)
        assert same(text, one_pass[:, Q:], atol=1e-5)
        # the cache really is used: another image's cache gives other text states
        _, cache2 = qf(image_embeds=make_inputs(seed=1)[1], use_cache=True)
        assert changed(qf(ids, mask, past_key_values=cache2, mask_kind="causal"), text)
    with pytest.raises(ValueError, match="not both"):
        qf(ids, mask, image_embeds=img, use_queries=True, past_key_values=cache)


# ---------------------------------------------------------------------------------- padding
@pytest.mark.parametrize("kind", ["unimodal", "bidirectional", "causal"])
def test_padding_tokens_are_never_seen(kind):
    qf = make_qformer()
    ids, img = make_inputs()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    real = torch.cat([torch.ones(2, Q, dtype=torch.bool), mask.bool()], dim=1)  # (B, Q+T) real positions
    ids_pad = ids.clone()
    ids_pad[0, 4:] = other_tokens(ids, [4, 5])[0, 4:]  # change only sample 0's padded tokens
    with torch.no_grad():
        h = qf(ids, mask, image_embeds=img, use_queries=True, mask_kind=kind)
        h_pad = qf(ids_pad, mask, image_embeds=img, use_queries=True, mask_kind=kind)
        assert same(h_pad[real], h[real])
        # the same token change at positions marked real does reach the other real positions
        full = torch.ones_like(mask)
        h_full = qf(ids, full, image_embeds=img, use_queries=True, mask_kind=kind)
        h_full2 = qf(ids_pad, full, image_embeds=img, use_queries=True, mask_kind=kind)
        if kind == "bidirectional":
            assert changed(h_full2[:1, : 4 + Q], h_full[:1, : 4 + Q])
        elif kind == "unimodal":
            assert changed(h_full2[:1, Q : Q + 4], h_full[:1, Q : Q + 4])
            assert same(h_full2[:, :Q], h_full[:, :Q])
        else:  # causal: later tokens are invisible even when real
            assert same(h_full2[:1, : 4 + Q], h_full[:1, : 4 + Q])
            assert changed(h_full2[:1, Q + 5], h_full[:1, Q + 5])
        if kind == "causal":  # the cached ITG path masks padding too
            _, cache = qf(image_embeds=img, use_cache=True)
            t = qf(ids, mask, past_key_values=cache, mask_kind="causal")
            t_pad = qf(ids_pad, mask, past_key_values=cache, mask_kind="causal")
            assert same(t_pad[mask.bool()], t[mask.bool()])


def test_image_mask_hides_image_tokens():
    qf = make_qformer()
    _, img = make_inputs()
    image_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    img2 = img.clone()
    img2[0, 3:] += 5.0
    with torch.no_grad():
        h = qf(image_embeds=img, image_mask=image_mask)
        assert same(qf(image_embeds=img2, image_mask=image_mask), h)
        assert changed(qf(image_embeds=img2)[:1], qf(image_embeds=img)[:1])


# ---------------------------------------------------------------------------------- structure
@pytest.mark.parametrize(
    "layers,freq,expected",
    [(4, 2, [True, False, True, False]), (4, 3, [True, False, False, True]), (3, 1, [True, True, True])],
)
def test_cross_attention_layers(layers, freq, expected):
    qf = make_qformer(num_layers=layers, cross_attention_frequency=freq)
    assert [layer.crossattention is not None for layer in qf.layers] == expected
    for layer in qf.layers:
        if layer.crossattention is not None:
            assert layer.crossattention.key.weight.shape == (32, ENC)
            assert layer.crossattention.value.weight.shape == (32, ENC)
        assert layer.attention.key.weight.shape == (32, 32)


def test_text_rows_never_cross_attend():
    qf = make_qformer()
    ids, img = make_inputs()
    rows = []
    hooks = [
        layer.crossattention.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
        for layer in qf.layers
        if layer.crossattention is not None
    ]
    with torch.no_grad():
        for kind in ("unimodal", "bidirectional", "causal"):
            qf(ids, image_embeds=img, use_queries=True, mask_kind=kind)
        assert rows == [Q] * 6  # 2 cross-attention layers x 3 passes, each on the Q query rows only
        rows.clear()
        text = qf(ids)  # a text-only pass needs no image at all
        assert rows == [] and text.shape == (2, T, 32) and torch.isfinite(text).all()
    for h in hooks:
        h.remove()
    with pytest.raises(ValueError, match="image_embeds"):
        qf(ids, use_queries=True)  # queries without an image cannot cross-attend


def test_queries_have_no_position_embeddings_and_text_starts_at_zero():
    qf = make_qformer()
    ids, img = make_inputs()
    with torch.no_grad():
        base = qf(ids, image_embeds=img, mask_kind="unimodal")
        qf.position_embeddings.weight[:T] += torch.randn(T, 32, generator=torch.Generator().manual_seed(5))
        moved = qf(ids, image_embeds=img, mask_kind="unimodal")
    assert same(moved[:, :Q], base[:, :Q])  # moving text positions moves text only
    assert changed(moved[:, Q:], base[:, Q:])


def test_gradient_checkpointing_identical(monkeypatch):
    qf = make_qformer().train()  # dropout is 0, so train mode is deterministic
    ids, img = make_inputs()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    weights = torch.randn(2, Q + T, 32, generator=torch.Generator().manual_seed(3))
    calls = []
    real_checkpoint = qformer_module.checkpoint
    monkeypatch.setattr(qformer_module, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))

    def run(enable):
        qf.set_grad_checkpointing(enable)
        qf.zero_grad()
        x = img.clone().requires_grad_(True)
        h = qf(ids, mask, image_embeds=x, use_queries=True, mask_kind="causal")
        (h * weights).sum().backward()
        return h.detach(), {n: p.grad.clone() for n, p in qf.named_parameters() if p.grad is not None}, x.grad

    h0, g0, x0 = run(False)
    assert calls == []
    h1, g1, x1 = run(True)
    assert len(calls) == 3  # one checkpointed call per layer
    assert torch.allclose(h1, h0, atol=1e-6, rtol=0)
    assert g1.keys() == g0.keys() and len(g0) > 20
    for name in g0:
        assert torch.allclose(g1[name], g0[name], atol=1e-6, rtol=1e-5), name
    assert torch.allclose(x1, x0, atol=1e-6, rtol=1e-5) and x0.abs().sum() > 0
    calls.clear()
    qf.eval()
    with torch.no_grad():
        qf(ids, mask, image_embeds=img, use_queries=True, mask_kind="causal")
    assert calls == []  # no checkpointing outside training


def test_drop_text_branch_keeps_query_path():
    qf = make_qformer()
    ids, img = make_inputs()
    with torch.no_grad():
        before = qf(image_embeds=img)
        n_before = sum(p.numel() for p in qf.parameters())
        qf.drop_text_branch()
        assert same(qf(image_embeds=img), before)
    assert sum(p.numel() for p in qf.parameters()) < n_before
    assert qf.word_embeddings is None and qf.lm_head is None and all(layer.ffn is None for layer in qf.layers)
    with pytest.raises(ValueError, match="no text branch"):
        qf(ids)


def test_explicit_cpu_attention_matches_fused_kernel():
    """The bf16 CPU path (explicit matmuls) agrees with the fused kernel, fully masked rows included."""
    from vlbridge.models.blip2.qformer import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    allowed = torch.rand(2, 1, 5, 5, generator=g) > 0.4
    allowed[0, 0, 2] = False  # a row that may see nothing
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.bfloat16).min)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask.bfloat16(), 0.0)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
