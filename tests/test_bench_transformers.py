"""The benchmark against transformers compares like with like: on a small Q-Former, the ITC + ITM it
builds from transformers' BLIP-2 modules gives vlbridge's losses and gradients on converted weights."""

import torch

from benchmarks.bench_transformers import loss_parity, make_inputs, retrieval_checkpoint, retrieval_pair

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    vocab_size=1100,
    max_position_embeddings=64,
)


def test_transformers_itc_itm_matches_vlbridge(tmp_path):
    retrieval_checkpoint(tmp_path, image_width=48, **SMALL)
    ours, wrapped = retrieval_pair(tmp_path, torch.device("cpu"))
    feats, ids, mask = make_inputs(6, 1100, torch.device("cpu"), image_tokens=17, image_width=48, text_len=12)
    diffs, itc, itm = loss_parity(ours, wrapped, feats, ids, mask)
    assert float(itc) > 0.1 and float(itm) > 0.1
    assert max(diffs.values()) < 1e-5, diffs

    # the same gradients too: query tokens, the first cross-attention's keys, the ITM head
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    ours.pretrain_losses(ids, mask, image_features=feats, generator=gen(), itg=False).loss.backward()
    hf = wrapped["sdpa"]
    sum(hf(feats, ids, mask, gen())).backward()
    pairs = [
        (ours.qformer.query_tokens, hf.hf.query_tokens),
        (
            ours.qformer.layers[0].crossattention.key.weight,
            hf.hf.qformer.encoder.layer[0].crossattention.attention.key.weight,
        ),
        (ours.itm_head.weight, hf.hf.itm_head.weight),
        (ours.ln_vision.weight, hf.hf.vision_model.post_layernorm.weight),
    ]
    for a, b in pairs:
        assert a.grad.abs().max() > 0
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
