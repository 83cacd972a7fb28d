"""Generation through the frozen LM: cached = uncached, batched (padded) = one by one, length
limits, seeded sampling, and agreement with the training forward pass.

The bridge is randomised so that the visual prompt matters. Tiny random LMs with tied embeddings
tend to repeat one token forever; `no_repeat_ngram_size=1` forces every step to a different token,
so that a comparison of two decodings compares many independent argmax decisions.
"""

import pytest
import torch

LM_KINDS = ("gpt2", "opt", "llama", "t5")
PROMPTS = ["a photo of", "question what color is the circle ? answer", "how many", "red"]
Q = 4
VARIED = dict(no_repeat_ngram_size=1)  # applies to the new tokens only (transformers warns: intended)
pytestmark = pytest.mark.filterwarnings("ignore:Passing `no_repeat_ngram_size` with `inputs_embeds`")


@pytest.fixture(scope="module")
def model_of(build):
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = build(kind, randomize=True)
        return cache[kind]

    return get


def _inputs(proc, images, prompts=PROMPTS, seed=0):
    b = proc(text=prompts)
    return images(len(prompts), seed=seed), b["input_ids"], b["attention_mask"]


def _distinct_rows(ids):
    return len({tuple(r) for r in ids.tolist()})


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("kind", LM_KINDS)
def test_cached_and_uncached_decoding_agree(model_of, images, kind, beams):
    model, proc = model_of(kind)
    px, ids, mask = _inputs(proc, images)
    for extra in ({}, VARIED):
        kw = dict(max_new_tokens=8, num_beams=beams, **extra)
        cached = model.generate(px, ids, mask, **kw)
        uncached = model.generate(px, ids, mask, use_cache=False, **kw)
        assert cached.shape[0] == 4 and 1 <= cached.shape[1] <= 8
        assert torch.equal(cached, uncached), (extra, cached, uncached)
    assert _distinct_rows(cached) > 1


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("kind", LM_KINDS)
def test_batched_padded_generation_matches_one_by_one(model_of, images, kind, beams):
    model, proc = model_of(kind)
    px, ids, mask = _inputs(proc, images)
    pad_side = "right" if kind == "t5" else "left"
    assert (mask[:, -1] == 0).any() if pad_side == "right" else (mask[:, 0] == 0).any()
    pad = model.lm.generation_config.pad_token_id
    batch = model.generate(px, ids, mask, max_new_tokens=8, num_beams=beams, **VARIED)
    for i, prompt in enumerate(PROMPTS):
        one = proc(text=[prompt])
        assert one["attention_mask"].all()  # alone: no padding at all
        alone = model.generate(
            px[i : i + 1], one["input_ids"], one["attention_mask"], max_new_tokens=8, num_beams=beams, **VARIED
        )[0]
        n = len(alone)
        assert torch.equal(batch[i, :n], alone), (i, batch[i], alone)
        filler = (batch[i, n:] == pad) | (batch[i, n:] == proc.tokenizer.eos_token_id)  # beam search pads with eos
        assert filler.all() and (n == 8 or alone[-1] == proc.tokenizer.eos_token_id)


@pytest.mark.parametrize("kind", LM_KINDS)
def test_images_change_generations(model_of, images, kind):
    model, proc = model_of(kind)
    px, ids, mask = _inputs(proc, images, prompts=["a photo of"] * 4)
    px[3] = px[0]  # the same image twice
    out = model.generate(px, ids, mask, max_new_tokens=6, **VARIED)
    assert torch.equal(out[3], out[0])
    assert _distinct_rows(out) > 1, out  # same prompt, other images: other text somewhere


@pytest.mark.parametrize("kind", LM_KINDS)
def test_min_and_max_new_tokens(model_of, images, kind):
    model, proc = model_of(kind)
    px, ids, mask = _inputs(proc, images, prompts=PROMPTS[:2])
    pad = model.lm.generation_config.pad_token_id
    free = model.generate(px, ids, mask, max_new_tokens=6, **VARIED)
    assert free.shape[1] <= 6 and model.generate(px, ids, mask, max_new_tokens=2).shape[1] <= 2
    stop = free[0, 0].item()  # declare the first token of row 0 an eos token: that row ends at once...
    stopped = model.generate(px, ids, mask, max_new_tokens=6, eos_token_id=stop, **VARIED)
    assert stopped[0, 0] == stop and (stopped[0, 1:] == pad).all()
    held = model.generate(px, ids, mask, max_new_tokens=6, min_new_tokens=4, eos_token_id=stop, **VARIED)
    assert held.shape[1] >= 4 and (held[:, :4] != stop).all()  # ...unless min_new_tokens holds it open
    exact = model.generate(px, ids, mask, min_new_tokens=5, max_new_tokens=5)
    assert exact.shape == (2, 5) and (exact != proc.tokenizer.eos_token_id).all()


@pytest.mark.parametrize("kind", LM_KINDS)
def test_sampling_is_reproducible_with_a_seed(model_of, images, kind):
    model, proc = model_of(kind)
    px, ids, mask = _inputs(proc, images, prompts=PROMPTS[:2])
    kw = dict(do_sample=True, top_k=0, max_new_tokens=8, min_new_tokens=8)

    def sample(seed):
        torch.manual_seed(seed)
        return model.generate(px, ids, mask, **kw)

    a = sample(0)
    assert torch.equal(a, sample(0))
    assert any(not torch.equal(a, sample(s)) for s in range(1, 4))


@pytest.mark.parametrize("kind", LM_KINDS)
def test_forward_agrees_with_greedy_generation(model_of, images, kind):
    """Teacher-forcing the generated tokens through `forward` predicts exactly those tokens again:
    training and generation see the visual prompt, the prompt and the target at the same places."""
    model, proc = model_of(kind)
    px, ids, mask = _inputs(proc, images)
    gen = model.generate(px, ids, mask, min_new_tokens=5, max_new_tokens=5)
    assert gen.shape == (4, 5)
    if kind == "t5":
        logits = model(px, ids, mask, labels=gen).logits
    else:
        logits = model(px, torch.cat([ids, gen], 1), torch.cat([mask, torch.ones_like(gen)], 1)).logits
        start = Q + ids.shape[1] - 1  # the position that predicts the first new token
        logits = logits[:, start : start + 5]
    logits = logits.clone()
    logits[..., proc.tokenizer.eos_token_id] = float("-inf")  # min_new_tokens kept eos out of `gen`
    assert torch.equal(logits.argmax(-1), gen)
