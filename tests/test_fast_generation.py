"""core/generation.py: generation from prompt embeddings with the prompt prefilled once per row gives
the ids (and scores) of plain `lm.generate(inputs_embeds=...)`: greedy, beam search, several return
sequences, seeded sampling; left-padded batches; beams that end at eos; and the cases it leaves to
plain generate. Tiny random LMs (fp32) behind a randomised BLIP-2 bridge, as in test_blip2_generation;
`no_repeat_ngram_size=1` makes every step a fresh argmax decision (a tiny LM otherwise repeats one token).
"""

import pytest
import torch
from transformers import DynamicCache

from vlbridge.core import generation
from vlbridge.core.generation import generate_from_embeds

DECODER_ONLY = ("gpt2", "opt", "llama")
PROMPTS = ["a photo of", "question what color is the circle ? answer", "how many", "red"]
VARIED = dict(no_repeat_ngram_size=1)
pytestmark = pytest.mark.filterwarnings("ignore:Passing `no_repeat_ngram_size` with `inputs_embeds`")


@pytest.fixture(scope="module")
def prompt_of(build, images):
    """prompt_of(kind) -> (lm, inputs_embeds (4, T, D), attention_mask (4, T) left-padded)."""
    cache = {}

    def get(kind):
        if kind not in cache:
            model, proc = build(kind, randomize=True)
            b = proc(text=PROMPTS)
            embeds, mask, _, _ = model.lm_inputs(images(len(PROMPTS)), b["input_ids"], b["attention_mask"])
            cache[kind] = model.lm, embeds, mask
        return cache[kind]

    return get


@pytest.fixture
def prefills(monkeypatch):
    """The (batch, length) of every prompt that core.generation prefilled itself."""
    seen = []
    original = generation.prefill

    def spy(lm, embeds, mask):
        seen.append(tuple(embeds.shape[:2]))
        return original(lm, embeds, mask)

    monkeypatch.setattr(generation, "prefill", spy)
    return seen


def both(lm, embeds, mask, **kw):
    plain = lm.generate(inputs_embeds=embeds, attention_mask=mask, **kw)
    fast = generate_from_embeds(lm, embeds, mask, **kw)
    return plain, fast


@pytest.mark.parametrize("beams", [1, 3, 5])
@pytest.mark.parametrize("kind", DECODER_ONLY)
def test_same_ids_as_plain_generate_on_a_padded_batch(prompt_of, prefills, kind, beams):
    lm, embeds, mask = prompt_of(kind)
    assert (mask == 0).any()  # padded rows in the batch
    for extra in ({}, VARIED, dict(length_penalty=0.0, early_stopping=True)):
        plain, fast = both(lm, embeds, mask, max_new_tokens=10, num_beams=beams, do_sample=False, **extra)
        assert torch.equal(plain, fast), (extra, plain, fast)
    assert prefills == [(4, embeds.shape[1] - 1)] * 3  # the prompt but its last token, once per row


@pytest.mark.parametrize("kind", DECODER_ONLY)
def test_beams_that_end_at_eos(prompt_of, kind):
    """eos set to a token the beams do produce (length_penalty 0 favours the short hypotheses that end
    there): finished hypotheses, padding after eos, early stopping."""
    lm, embeds, mask = prompt_of(kind)
    kw = dict(max_new_tokens=8, num_beams=3, do_sample=False, length_penalty=0.0, **VARIED)
    eos = int(lm.generate(inputs_embeds=embeds, attention_mask=mask, **kw)[0, 1])
    for early in (False, True, "never"):
        plain, fast = both(lm, embeds, mask, early_stopping=early, eos_token_id=eos, pad_token_id=0, **kw)
        assert torch.equal(plain, fast), (early, plain, fast)
        assert (plain == eos).any()


@pytest.mark.parametrize("kind", DECODER_ONLY)
def test_several_sequences_scores_and_sampling(prompt_of, prefills, kind):
    lm, embeds, mask = prompt_of(kind)
    kw = dict(max_new_tokens=6, num_beams=4, num_return_sequences=2, do_sample=False)
    kw.update(return_dict_in_generate=True, output_scores=True, **VARIED)
    plain, fast = both(lm, embeds, mask, **kw)
    assert torch.equal(plain.sequences, fast.sequences) and plain.sequences.shape[0] == 8
    torch.testing.assert_close(plain.sequences_scores, fast.sequences_scores)
    outs = []
    for fn in (lm.generate, lambda **k: generate_from_embeds(lm, **k)):
        torch.manual_seed(7)  # sampling: the same draws in the same order
        outs.append(
            fn(
                inputs_embeds=embeds,
                attention_mask=mask,
                max_new_tokens=6,
                do_sample=True,
                num_return_sequences=3,
                top_k=20,
            )
        )
    assert torch.equal(*outs) and outs[0].shape[0] == 12
    assert prefills == [(4, embeds.shape[1] - 1)] * 2


@pytest.mark.parametrize(
    "kw",
    [dict(use_cache=False), dict(cache_implementation="static"), dict(cache="user's")],
    ids=["no cache", "static cache", "a user's cache"],
)
def test_left_to_plain_generate(prompt_of, prefills, kw):
    lm, embeds, mask = prompt_of("gpt2")
    kw = dict(dict(max_new_tokens=6, num_beams=3, do_sample=False, **VARIED), **kw)
    if "cache" in kw:  # a fresh one per call
        plain = lm.generate(inputs_embeds=embeds, attention_mask=mask, **dict(kw, cache=DynamicCache()))
        fast = generate_from_embeds(lm, embeds, mask, **dict(kw, cache=DynamicCache()))
    else:
        plain, fast = both(lm, embeds, mask, **kw)
    assert torch.equal(plain, fast) and prefills == []


def test_encoder_decoder_lm_is_left_to_plain_generate(build, images, prefills):
    model, proc = build("t5", randomize=True)
    b = proc(text=PROMPTS)
    px = images(4)
    out = model.generate(px, b["input_ids"], b["attention_mask"], max_new_tokens=6, num_beams=3, **VARIED)
    assert out.shape[0] == 4 and prefills == []


@pytest.mark.parametrize("kind", DECODER_ONLY)
def test_blip2_generate_takes_the_fast_path(build, images, prefills, kind):
    model, proc = build(kind, randomize=True)
    b = proc(text=PROMPTS)
    px = images(4)
    out = model.generate(px, b["input_ids"], b["attention_mask"], max_new_tokens=6, num_beams=3, **VARIED)
    embeds, mask, _, _ = model.lm_inputs(px, b["input_ids"], b["attention_mask"])
    plain = model.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, num_beams=3, **VARIED)
    assert torch.equal(out, plain) and prefills == [(4, embeds.shape[1] - 1)]


def test_no_attention_mask_means_no_padding(prompt_of, prefills):
    lm, embeds, mask = prompt_of("llama")
    row = embeds[1:2]  # the longest prompt: nothing padded
    assert mask[1].all()
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, **VARIED)
    assert torch.equal(lm.generate(inputs_embeds=row, **kw), generate_from_embeds(lm, row, **kw))
    assert prefills == [(1, embeds.shape[1] - 1)]
