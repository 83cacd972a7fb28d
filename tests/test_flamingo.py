"""Flamingo: shapes, media masks, exact identity with the frozen LM at init (five LM families),
what trains, batches with different numbers of images, generation through transformers' generate (against a
reference loop, cached vs uncached, beams, sampling, streamers, processors, stopping), no state
carried between calls, save/load, the OpenFlamingo key map, and parity with open_flamingo's own
PerceiverResampler and GatedCrossAttentionBlock (open_flamingo/src/helpers.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM

from vlbridge.core.config import LMConfig, VisionConfig, from_dict, to_dict
from vlbridge.models.flamingo.convert_openflamingo import load_openflamingo, openflamingo_key, openflamingo_state_dict
from vlbridge.models.flamingo.modeling import (
    Flamingo,
    FlamingoConfig,
    FlamingoLayer,
    FlamingoProcessor,
    GatedCrossAttentionBlock,
    MaskedCrossAttention,
    PerceiverResampler,
    create_flamingo,
)
from vlbridge.testing import make_lm, make_vision, randomize_, word_tokenizer

KINDS = ("opt", "gpt2", "llama", "gpt_neox", "qwen2")
TEXTS = ["a photo of <image> red circle <|endofchunk|> <image> blue square", "<image> what color is the circle"]


def _make_lm(path: Path, kind: str) -> str:
    """make_lm's kinds, plus GPT-NeoX and Qwen2 built the same way (WordLevel tokenizer, re-drawn weights)."""
    if kind not in ("gpt_neox", "qwen2"):
        return make_lm(path, kind)
    import transformers as tf

    tok = word_tokenizer("lm")
    common = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    if kind == "gpt_neox":
        model = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**common))
    else:
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, **common))
    randomize_(model, seed=1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("flamingo")
    out = {"vision": make_vision(root / "vision")}
    out.update({kind: _make_lm(root / kind, kind) for kind in KINDS})
    return out


def tiny_config(paths, kind: str, **overrides) -> FlamingoConfig:
    cfg = FlamingoConfig(
        vision=VisionConfig(paths["vision"]),
        lm=LMConfig(paths[kind]),
        perceiver_depth=2,
        num_latents=4,
        perceiver_heads=2,
        perceiver_dim_head=8,
        max_media=4,
        cross_attn_every=1,
        xattn_heads=2,
        xattn_dim_head=8,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def build(paths):
    """build(kind, open_gates=False, seed=0, **config) -> (model in eval mode, processor). open_gates
    re-draws the bridge at a scale where it matters and sets every gate to 1."""

    def _build(kind: str = "gpt2", open_gates: bool = False, seed: int = 0, **overrides):
        torch.manual_seed(seed)
        model, proc = create_flamingo(tiny_config(paths, kind, **overrides))
        if open_gates:
            randomize_(torch.nn.ModuleDict({"p": model.perceiver, "x": model.xattn}), seed=seed)
            with torch.no_grad():
                for block in model.xattn.values():
                    block.attn_gate.fill_(1.0)
                    block.ff_gate.fill_(1.0)
        return model.eval(), proc

    return _build


def pixels(B: int, N: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, N, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def batch(proc, texts=TEXTS, seed: int = 0) -> dict:
    out = proc(texts, return_labels=True)
    counts = (out["input_ids"] == proc.image_token_id).sum(1)
    out["pixel_values"] = pixels(len(texts), int(counts.max()), seed)
    out["image_mask"] = torch.arange(int(counts.max()))[None] < counts[:, None]
    return out


def frozen_lm_logits(model, path, input_ids, attention_mask):
    """The untouched LM, loaded afresh, on the same embeddings (the added rows included) and positions."""
    lm = AutoModelForCausalLM.from_pretrained(path).eval()
    emb = model.lm.get_input_embeddings()(input_ids)
    kwargs = {"position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0)}
    with torch.no_grad():
        return lm(inputs_embeds=emb, attention_mask=attention_mask, **kwargs).logits


# ---------------------------------------------------------------------- config and modules
def test_config_round_trips_through_json(paths):
    cfg = tiny_config(paths, "opt", only_attend_immediate_media=False, image_token_id=5, eoc_token_id=6)
    assert from_dict(FlamingoConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        from_dict(FlamingoConfig, {**to_dict(cfg), "cross_attn_every_n": 2})


def test_perceiver_shapes_and_media_time():
    torch.manual_seed(0)
    p = PerceiverResampler(dim=32, depth=2, num_latents=5, heads=2, dim_head=8, ff_mult=4, max_media=3)
    x = torch.randn(2, 3, 2, 7, 32)  # (B, T_img, F, v, D)
    out = p(x)
    assert out.shape == (2, 3, 5, 32)
    same = x[:, :1].expand(-1, 3, -1, -1, -1)  # one image three times: media-time embeddings tell them apart
    assert not torch.allclose(p(same)[:, 0], p(same)[:, 1])
    with pytest.raises(ValueError, match="media-time"):
        p(torch.randn(1, 4, 1, 7, 32))


@pytest.mark.parametrize("immediate", [True, False])
def test_cross_attention_media_masks(immediate):
    torch.manual_seed(0)
    attn = randomize_(
        MaskedCrossAttention(dim=16, dim_visual=12, heads=2, dim_head=8, only_attend_immediate_media=immediate)
    )
    x, media = torch.randn(2, 7, 16), torch.randn(2, 3, 4, 12)  # (B, T, D), (B, N, n, Dv)
    time = torch.tensor([[0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1]])  # row 1 has one image; slots 2, 3 pad
    out = attn(x, media, time)
    assert (out[time == 0] == 0).all()  # text before the first image: exactly zero, never an average
    assert (out[time > 0].abs().sum(-1) > 0).all()

    def changed(image: int) -> torch.Tensor:  # (B, T): which outputs move when `image` (0-based) changes
        other = media.clone()
        other[:, image] += 1
        return (attn(x, other, time) != out).any(-1)

    seen_by = (time == 1) if immediate else (time >= 1)  # who sees the first image
    assert torch.equal(changed(0), seen_by)
    assert torch.equal(changed(1), time == 2)  # later images are never seen by earlier text
    assert not changed(2).any()  # padding slots are never seen


def test_gated_block_is_identity_at_init():
    block = GatedCrossAttentionBlock(dim=16, dim_visual=12, heads=2, dim_head=8, ff_mult=4)
    x = torch.randn(2, 5, 16)
    assert torch.equal(block(x, torch.randn(2, 2, 3, 12), torch.tensor([[0, 1, 1, 2, 2]] * 2)), x)


def test_ungated_ablation_adds_the_block_outputs_in_full():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(dim=16, dim_visual=12, heads=2, dim_head=8, ff_mult=4, tanh_gating=False)
    x, media, time = torch.randn(2, 5, 16), torch.randn(2, 2, 3, 12), torch.tensor([[0, 1, 1, 2, 2]] * 2)
    h = x + block.attn(x, media, time)
    torch.testing.assert_close(block(x, media, time), h + block.ff(h))  # x + f(x): no gate at all
    assert not block.attn_gate.requires_grad and not block.ff_gate.requires_grad
    with pytest.raises(ValueError, match="gating"):
        FlamingoConfig(gating="sigmoid")


# ---------------------------------------------------------------------- the model around a frozen LM
@pytest.mark.parametrize("kind", KINDS)
def test_init_equals_the_frozen_lm(build, paths, kind):
    model, proc = build(kind)
    randomize_(model.perceiver)  # the visual path is live; only the closed gates keep it out
    assert all(isinstance(layer, FlamingoLayer) for layer in model.lm.get_submodule(model.decoder_path))
    b = batch(proc)
    V = AutoModelForCausalLM.from_pretrained(paths[kind]).config.vocab_size
    with torch.no_grad():
        logits = model(**b).logits
    assert logits.shape[-1] == max(V, proc.eoc_token_id + 1)
    assert torch.equal(logits[..., :V], frozen_lm_logits(model, paths[kind], b["input_ids"], b["attention_mask"]))
    # text only, through input_ids end to end
    text = proc(["a photo of the red circle", "how many"])
    with torch.no_grad():
        ours = model(**text).logits[..., :V]
        lm = AutoModelForCausalLM.from_pretrained(paths[kind]).eval()
        ref = lm(**text, position_ids=(text["attention_mask"].cumsum(-1) - 1).clamp(min=0)).logits
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("immediate", [True, False])
def test_text_before_the_first_image_is_untouched(build, paths, immediate):
    model, proc = build("llama", open_gates=True, only_attend_immediate_media=immediate)
    for block in model.xattn.values():
        block.ff_gate.data.zero_()  # cross-attention only: text with no image must see the plain LM
    b = batch(proc)
    with torch.no_grad():
        logits = model(**b).logits[..., : proc.image_token_id]
    ref = frozen_lm_logits(model, paths["llama"], b["input_ids"], b["attention_mask"])[..., : proc.image_token_id]
    before = model.text_time(b["input_ids"]) == 0
    assert before.any() and (~before).any()
    assert torch.equal(logits[before], ref[before])
    assert (logits[~before] != ref[~before]).any(-1).all()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])  # tied and untied embeddings
def test_only_the_bridge_and_the_added_rows_train(build, kind):
    model, proc = build(kind)
    model.train()
    b = batch(proc)
    frozen = {
        k: v.clone()
        for k, v in model.state_dict().items()
        if k.startswith(("vision.", "lm.")) and ".gated_xattn." not in k and ".added." not in k
    }
    emb, old_ids = model.lm.get_input_embeddings(), torch.arange(proc.image_token_id)
    old_rows = emb(old_ids).detach().clone()
    added_ids = torch.tensor([proc.image_token_id, proc.eoc_token_id])
    added_before = emb(added_ids).detach().clone()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.startswith(("perceiver.", "xattn.", "new_tokens.")) for n, _ in trainable)
    assert ("new_tokens.output" in dict(trainable)) == (kind == "llama")
    opt = torch.optim.AdamW([p for _, p in trainable], lr=1e-2, weight_decay=0.1)

    model(**b).loss.backward()  # at init only the gates and the added rows can see a gradient
    grads = {n: p.grad for n, p in trainable}
    assert all(grads[n].abs().sum() > 0 for n in grads if n.endswith("_gate") or n.startswith("new_tokens."))
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    opt.step()
    opt.zero_grad()
    model(**b).loss.backward()  # gates open: gradient reaches every part of the bridge
    missing = [n for n, p in trainable if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing
    opt.step()

    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    assert torch.equal(emb(old_ids), old_rows)  # every row of the LM's own tokens: bit-identical
    assert (emb(added_ids) != added_before).any(-1).all()


def test_added_rows_look_up_and_sum_their_gradient_exactly():
    """ExtendedEmbedding: an added id gets its own row; a row's gradient is the sum over the positions
    that hold its id, the same in every run (the lookup is a one-hot sum, not an index backward)."""
    from vlbridge.models.flamingo.modeling import AddedTokens, ExtendedEmbedding

    torch.manual_seed(0)
    table = torch.nn.Embedding(10, 8)
    added = AddedTokens([10, 11], table.weight, table.weight, tied=True)
    with torch.no_grad():
        added.input.normal_()
    emb = ExtendedEmbedding(table, added)
    ids = torch.randint(0, 12, (4, 300))
    upstream = torch.randn(4, 300, 8)
    out = emb(ids)
    for k, token in enumerate((10, 11)):
        assert torch.equal(out[ids == token], added.input[k].expand(int((ids == token).sum()), -1))
    assert torch.equal(out[ids < 10], table(ids[ids < 10]))
    grads = []
    for _ in range(3):
        added.input.grad = None
        (emb(ids) * upstream).sum().backward()
        grads.append(added.input.grad.clone())
    want = torch.stack([upstream[ids == t].double().sum(0) for t in (10, 11)]).float()
    torch.testing.assert_close(grads[0], want, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(g, grads[0]) for g in grads)


def test_sequences_with_different_numbers_of_images(build):
    model, proc = build("opt", open_gates=True)
    texts = [
        "<image> red circle <|endofchunk|> <image> blue square <|endofchunk|> <image> green",
        "the answer is <image> yes",
    ]
    b = batch(proc, texts)
    assert b["pixel_values"].shape[:2] == (2, 3) and b["image_mask"].tolist() == [[True] * 3, [True, False, False]]
    with torch.no_grad():
        out = model(**b)
        for row in range(2):  # each row alone, unpadded, with only its own images
            keep = b["attention_mask"][row].bool()
            n = int(b["image_mask"][row].sum())
            alone = model(b["input_ids"][row, keep][None], pixel_values=b["pixel_values"][row, :n][None])
            torch.testing.assert_close(out.logits[row, keep], alone.logits[0], rtol=0, atol=1e-5)
        other = b["pixel_values"].clone()
        other[1, 1:] = 5.0  # padding slots are never encoded or attended
        assert torch.equal(model(**{**b, "pixel_values": other}).logits, out.logits)
    with pytest.raises(ValueError, match="images per row"):
        model(**{**b, "image_mask": torch.ones(2, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="image slots"):
        model(b["input_ids"], b["attention_mask"], pixel_values=b["pixel_values"][:, :2])


# ---------------------------------------------------------------------- generation (transformers' generate)
MIXED = [
    "<image> red circle <|endofchunk|> <image> blue square <|endofchunk|> <image> green",
    "the answer is <image> yes",
]  # three images and one, the second row left-padded


def prompt_of(b: dict) -> dict:
    return {k: b[k] for k in ("input_ids", "attention_mask", "pixel_values") if k in b}


def greedy_reference(model, proc, b: dict, steps: int) -> torch.Tensor:
    """Greedy decoding the slow way: the whole sequence through forward at every step, no cache; new
    tokens see the prompt's last image because forward counts the <image> tokens before them. A row
    that has ended goes on with the pad id, as in transformers."""
    ids, mask = b["input_ids"], b["attention_mask"]
    media = model.encode_images(b["pixel_values"], image_mask=b["image_mask"]) if "pixel_values" in b else None
    eos = torch.tensor([proc.eoc_token_id, model.lm.config.eos_token_id])
    pad = model.lm.generation_config.pad_token_id
    done, new = torch.zeros(len(ids), dtype=torch.bool), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids, mask, media=media).logits[:, -1]
            logits[:, proc.image_token_id] = float("-inf")
            token = logits.argmax(-1).masked_fill(done, pad)
            new.append(token)
            done |= torch.isin(token, eos)
            ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if done.all():
                break
    return torch.stack(new, 1)


@pytest.mark.parametrize("kind", ["opt", "gpt2", "llama", "qwen2"])
def test_greedy_equals_a_reference_loop(build, kind):
    model, proc = build(kind, open_gates=True)
    b = batch(proc, MIXED)
    assert b["attention_mask"][1, 0] == 0 and b["image_mask"].sum(1).tolist() == [3, 1]
    want = greedy_reference(model, proc, b, steps=8)
    assert want.shape[1] > 1
    assert torch.equal(model.generate(**prompt_of(b), max_new_tokens=8), want)
    # the prompt in chunks: calls that start inside it, after some of its images
    assert torch.equal(model.generate(**prompt_of(b), max_new_tokens=8, prefill_chunk_size=3), want)
    media = model.encode_images(b["pixel_values"], image_mask=b["image_mask"])  # images encoded beforehand
    assert torch.equal(model.generate(b["input_ids"], b["attention_mask"], media=media, max_new_tokens=8), want)


def test_text_only_rows(build):
    model, proc = build("llama", open_gates=True)
    text = proc(["a photo of the red circle", "how many"])  # no image anywhere, no pixels
    assert torch.equal(model.generate(**text, max_new_tokens=6), greedy_reference(model, proc, text, 6))
    mixed = batch(proc, ["what color is the circle", "<image> a photo of"])  # one row without an image
    assert mixed["image_mask"].tolist() == [[False], [True]]
    assert torch.equal(
        model.generate(**prompt_of(mixed), image_mask=mixed["image_mask"], max_new_tokens=6),
        greedy_reference(model, proc, mixed, 6),
    )


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gpt_neox", "qwen2"])
def test_cached_and_uncached_generation_agree(build, kind):
    model, proc = build(kind, open_gates=True)
    b = batch(proc, MIXED)
    for beams in (1, 3):
        cached = model.generate(**prompt_of(b), max_new_tokens=6, num_beams=beams)
        uncached = model.generate(**prompt_of(b), max_new_tokens=6, num_beams=beams, use_cache=False)
        assert cached.shape[0] == 2 and 1 <= cached.shape[1] <= 6
        assert torch.equal(cached, uncached), (beams, cached, uncached)


def test_beam_search_returns_the_best_beam(build):
    """Every returned beam's score is its log-probability under a plain forward pass over prompt and
    beam (so each beam saw the right images through expansion and cache reordering), divided by
    length ** length_penalty; the beams come best first, and num_beams alone returns the best."""
    model, proc = build("llama", open_gates=True)
    b = batch(proc, MIXED)
    K, lp = 3, 0.5
    best = model.generate(**prompt_of(b), num_beams=K, length_penalty=lp, max_new_tokens=6)
    out = model.generate(
        **prompt_of(b),
        num_beams=K,
        length_penalty=lp,
        max_new_tokens=6,
        num_return_sequences=K,
        return_dict_in_generate=True,
        output_scores=True,
    )
    seqs, scores = out.sequences, out.sequences_scores
    assert seqs.shape[0] == 2 * K and (scores.view(2, K).diff(dim=1) <= 0).all()
    pad = model.lm.generation_config.pad_token_id
    assert torch.equal(seqs[::K, : best.shape[1]], best) and (seqs[::K, best.shape[1] :] == pad).all()
    media = model.encode_images(b["pixel_values"], image_mask=b["image_mask"])
    eos = torch.tensor([proc.eoc_token_id, model.lm.config.eos_token_id])
    for row, seq in enumerate(seqs):
        s = row // K
        ends = torch.isin(seq, eos).nonzero()
        seq = seq[: int(ends[0]) + 1] if len(ends) else seq
        ids = torch.cat([b["input_ids"][s], seq])[None]
        mask = torch.cat([b["attention_mask"][s], torch.ones_like(seq)])[None]
        with torch.no_grad():
            logits = model(ids, mask, media=media[s : s + 1]).logits[0, -len(seq) - 1 : -1].float()
        logp = logits.log_softmax(-1).gather(-1, seq[:, None]).sum()
        torch.testing.assert_close(scores[row], logp / len(seq) ** lp, rtol=0, atol=1e-4)


def test_sampling_streamer_processors_and_stopping(build):
    from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    model, proc = build("qwen2", open_gates=True)
    b = prompt_of(batch(proc, MIXED))
    T0, image = b["input_ids"].shape[1], proc.image_token_id

    def sample(seed, **kw):
        torch.manual_seed(seed)
        return model.generate(**b, do_sample=True, temperature=1.5, top_k=20, top_p=0.95, max_new_tokens=8, **kw)

    assert torch.equal(sample(0), sample(0))
    assert any(not torch.equal(sample(0), sample(seed)) for seed in (1, 2, 3))
    many = sample(0, num_return_sequences=4, min_new_tokens=8, repetition_penalty=1.3)
    assert many.shape == (8, 8)

    class PreferImage(LogitsProcessor):  # makes <image> by far the likeliest token: it is still never generated
        def __call__(self, input_ids, scores):
            return scores.index_fill(-1, torch.tensor([image]), 1e4)

    assert not (sample(0, logits_processor=LogitsProcessorList([PreferImage()]), num_return_sequences=4) == image).any()

    word = proc.tokenizer.convert_tokens_to_ids("green")

    class Force(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return torch.full_like(scores, float("-inf")).index_fill(-1, torch.tensor([word]), 0.0)

    assert (model.generate(**b, logits_processor=LogitsProcessorList([Force()]), max_new_tokens=5) == word).all()

    class StopAfterTwo(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((len(input_ids),), input_ids.shape[1] >= T0 + 2, dtype=torch.bool)

    greedy = model.generate(**b, max_new_tokens=10, min_new_tokens=10)
    stopped = model.generate(
        **b, max_new_tokens=10, min_new_tokens=10, stopping_criteria=StoppingCriteriaList([StopAfterTwo()])
    )
    assert greedy.shape[1] == 10 and torch.equal(stopped, greedy[:, :2])

    class Record(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value)

        def end(self):
            self.ended = True

    streamer = Record()
    one = {k: v[1:] for k, v in b.items()}  # streamers follow one sequence
    out = model.generate(**one, max_new_tokens=6, streamer=streamer)
    assert torch.equal(streamer.chunks[0], one["input_ids"]) and streamer.ended  # the prompt first, then each token
    assert torch.equal(torch.cat([c.reshape(-1) for c in streamer.chunks[1:]]), out[0])


def test_no_state_survives_a_call(build):
    import threading

    from transformers import StoppingCriteria, StoppingCriteriaList

    from vlbridge.models.flamingo.generation import visual_context

    model, proc = build("gpt2", open_gates=True)
    b = batch(proc)
    with torch.no_grad():
        first = model(**b).logits
        other = model(**{**b, "pixel_values": pixels(2, 2, seed=7)}).logits
        assert not torch.equal(first, other)
        bad = b["input_ids"].clone()
        bad[0, -1] = 10_000  # fails inside the LM, after the images went in
        with pytest.raises(IndexError):
            model(**{**b, "input_ids": bad})
        generated = model.generate(**prompt_of(b), max_new_tokens=3)
        assert torch.equal(model(**b).logits, first)

    class Fail(StoppingCriteria):  # a generate that fails half way still takes its hook away
        def __call__(self, input_ids, scores, **kwargs):
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        model.generate(**prompt_of(b), stopping_criteria=StoppingCriteriaList([Fail()]))
    assert not model.lm._forward_pre_hooks
    # the layers keep no tensors between calls, and the LM refuses a call without its visual context
    for layer in model.lm.get_submodule(model.decoder_path):
        assert not layer._buffers and not any(isinstance(v, torch.Tensor) for v in vars(layer).values())
    with pytest.raises(ValueError, match="FlamingoContext"):
        model.lm(input_ids=b["input_ids"])
    assert generated.shape[0] == 2
    # while one thread holds the visual context (as its generate does), a call from another thread gets none
    errors = []

    def call():
        try:
            model.lm(input_ids=b["input_ids"])
        except ValueError as e:
            errors.append(e)

    with visual_context(
        model.lm, model.encode_images(b["pixel_values"]), model.text_time(b["input_ids"]), proc.image_token_id
    ):
        thread = threading.Thread(target=call)
        thread.start()
        thread.join()
        assert model.lm(input_ids=b["input_ids"]).logits.shape[:2] == b["input_ids"].shape  # this thread: it does
    assert len(errors) == 1 and "FlamingoContext" in str(errors[0])


def test_processor_labels_and_images(build):
    _, proc = build("gpt2")
    ims = [Image.new("RGB", (40, 30), c) for c in ("red", "blue", "green")]
    out = proc(
        ["the <image> red circle <|endofchunk|> two <image> blue", "<image> a"],
        images=[[ims[0], ims[1]], ims[2]],
        return_labels=True,
    )
    assert out["pixel_values"].shape == (2, 2, 3, 32, 32) and out["image_mask"].tolist() == [
        [True, True],
        [True, False],
    ]
    assert (out["pixel_values"][1, 1] == 0).all()
    tok = proc.tokenizer
    ids = out["input_ids"][0].tolist()
    assert tok.convert_ids_to_tokens(ids) == [
        "the",
        "<image>",
        "red",
        "circle",
        "<|endofchunk|>",
        "two",
        "<image>",
        "blue",
    ]
    kept = [tok.convert_ids_to_tokens(i) for i, label in zip(ids, out["labels"][0].tolist()) if label != -100]
    assert kept == ["red", "circle", "<|endofchunk|>", "blue"]  # not before the first image, nor between chunks
    assert out["attention_mask"][1].tolist() == [0] * 6 + [1, 1] and (out["labels"][1, :7] == -100).all()
    with pytest.raises(ValueError, match="images per text"):
        proc(["<image> a <image> b"], images=[ims[0]])


# ---------------------------------------------------------------------- checkpoints
def test_save_load_round_trip(build, paths, tmp_path):
    model, proc = build("llama", open_gates=True)
    model.save_pretrained(tmp_path, processor=proc)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors", "vision", "lm"}
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["image_token_id"], saved["eoc_token_id"]) == (proc.image_token_id, proc.eoc_token_id)
    loaded, proc2 = Flamingo.from_pretrained(tmp_path).eval(), FlamingoProcessor.from_pretrained(tmp_path)
    a, b = model.bridge_state_dict(), loaded.bridge_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(proc(TEXTS)[k], proc2(TEXTS)[k]) for k in ("input_ids", "attention_mask"))
    x = batch(proc2)
    with torch.no_grad():
        assert torch.equal(model(**x).logits, loaded(**x).logits)
    gen = dict(
        input_ids=x["input_ids"], attention_mask=x["attention_mask"], pixel_values=x["pixel_values"], num_beams=2
    )
    assert torch.equal(model.generate(**gen), loaded.generate(**gen))
    # lm/ is the untouched LM in transformers' format
    ids = proc(["a photo of the red circle"])["input_ids"]
    fresh, original = (
        AutoModelForCausalLM.from_pretrained(tmp_path / "lm"),
        AutoModelForCausalLM.from_pretrained(paths["llama"]),
    )
    assert torch.equal(fresh(ids).logits, original(ids).logits)
    # a checkpoint that does not match is refused, naming the tensors
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "model.safetensors"))
    del state["xattn.1.attn_gate"]
    state["xattn.9.attn_gate"] = torch.zeros(1)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"xattn\.1\.attn_gate.*xattn\.9\.attn_gate"):
        Flamingo.from_pretrained(tmp_path)


@pytest.mark.parametrize("kind", ["opt", "llama"])  # tied and untied
def test_openflamingo_key_map_round_trip(build, kind):
    model, proc = build(kind, open_gates=True, cross_attn_every=2)
    assert list(model.xattn) == ["1"]  # OpenFlamingo's placement: before layer i when (i + 1) % n == 0
    sd = openflamingo_state_dict(model)
    layers = "model.decoder.layers" if kind == "opt" else "model.layers"
    embed = "model.decoder.embed_tokens" if kind == "opt" else "model.embed_tokens"
    assert {
        "perceiver.layers.1.0.to_kv.weight",
        "perceiver.layers.0.1.3.weight",
        "perceiver.media_time_embs",
        f"lang_encoder.{layers}.1.gated_cross_attn_layer.attn_gate",
        f"lang_encoder.{layers}.1.gated_cross_attn_layer.ff.0.bias",
        f"lang_encoder.{embed}.weight",
    } <= set(sd)
    assert sd[f"lang_encoder.{embed}.weight"].shape[0] == proc.eoc_token_id + 1

    other, _ = build(kind, seed=1, cross_attn_every=2)
    frozen_extras = {
        f"lang_encoder.{layers}.0.decoder_layer.self_attn.k_proj.weight": torch.zeros(1),
        "vision_encoder.conv1.weight": torch.zeros(1),
    }  # frozen parts: skipped
    load_openflamingo(other, {**sd, **frozen_extras})
    a, b = model.bridge_state_dict(), other.bridge_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k != "new_tokens.output")
    b_ = batch(proc)
    with torch.no_grad():
        if kind == "opt":  # tied: the whole model is restored
            assert torch.equal(model(**b_).logits, other(**b_).logits)

    with pytest.raises(ValueError, match=r"missing \['perceiver\.latents'\].*lang_encoder\.bogus"):
        load_openflamingo(
            other, {**{k: v for k, v in sd.items() if k != "perceiver.latents"}, "lang_encoder.bogus": torch.zeros(1)}
        )
    trained = {k: v.clone() for k, v in sd.items()}
    trained[f"lang_encoder.{embed}.weight"][3] += 1  # a checkpoint that trained the LM's own rows
    with pytest.raises(ValueError, match="LM's own tokens"):
        load_openflamingo(other, trained)
    load_openflamingo(other, trained, check_embeddings=False)


# ---------------------------------------------------------------------- parity with open_flamingo
def _open_flamingo_helpers():
    """open_flamingo/src/helpers.py, loaded by path: the package's __init__ needs open_clip and
    torchvision, this file only torch, einops and einops_exts."""
    spec = importlib.util.find_spec("open_flamingo")
    missing = [m for m in ("einops", "einops_exts") if importlib.util.find_spec(m) is None]
    if spec is None or missing:
        pytest.skip(
            "open-flamingo / einops / einops-exts not installed (make install: pip install --no-deps "
            "open-flamingo==2.0.1 einops einops-exts)"
        )
    path = Path(spec.submodule_search_locations[0]) / "src" / "helpers.py"
    helpers_spec = importlib.util.spec_from_file_location("open_flamingo_helpers", path)
    module = importlib.util.module_from_spec(helpers_spec)
    helpers_spec.loader.exec_module(module)
    return module


def _through_key_map(theirs: torch.nn.Module, prefix: str, ours_prefix: str, paths: dict) -> dict:
    out = {}
    for key, value in theirs.state_dict().items():
        mapped = openflamingo_key(prefix + key, paths)
        assert mapped is not None and mapped.startswith(ours_prefix), key
        out[mapped.removeprefix(ours_prefix)] = value
    return out


def test_parity_with_open_flamingo_perceiver():
    of = _open_flamingo_helpers()
    torch.manual_seed(0)
    theirs = randomize_(of.PerceiverResampler(dim=32, depth=2, dim_head=8, heads=4, num_latents=6, max_num_media=3))
    ours = PerceiverResampler(dim=32, depth=2, num_latents=6, heads=4, dim_head=8, ff_mult=4, max_media=3)
    ours.load_state_dict(_through_key_map(theirs, "perceiver.", "perceiver.", {}), strict=True)
    x = torch.randn(2, 3, 1, 10, 32)
    with torch.no_grad():
        diff = (ours(x) - theirs(x)).abs().max().item()
    print(f"perceiver parity: max |diff| = {diff:.2e}")
    assert diff < 1e-5


@pytest.mark.parametrize("immediate", [True, False])
def test_parity_with_open_flamingo_gated_cross_attention(immediate):
    of = _open_flamingo_helpers()
    torch.manual_seed(0)
    theirs = randomize_(
        of.GatedCrossAttentionBlock(
            dim=48, dim_visual=32, dim_head=8, heads=4, ff_mult=4, only_attend_immediate_media=immediate
        )
    )
    with torch.no_grad():  # gates at a size where every tensor of the block shows in the output
        theirs.attn_gate.fill_(0.8)
        theirs.ff_gate.fill_(-0.6)
    ours = GatedCrossAttentionBlock(
        dim=48, dim_visual=32, heads=4, dim_head=8, ff_mult=4, only_attend_immediate_media=immediate
    )
    paths = {"layers": "model.layers", "embed": "model.embed_tokens"}
    ours.load_state_dict(
        _through_key_map(theirs, "lang_encoder.model.layers.5.gated_cross_attn_layer.", "xattn.5.", paths)
    )
    x, media = torch.randn(2, 9, 48), torch.randn(2, 3, 6, 32)
    locations = torch.zeros(2, 9, dtype=torch.bool)
    locations[0, [2, 5]] = True  # row 0: text, image, text, image, text
    locations[1, [0, 3, 4]] = True  # row 1: three images, the first at the start
    time = locations.long().cumsum(-1)
    with torch.no_grad():
        a, b = ours(x, media, time), theirs(x, media, media_locations=locations)
        seen = time > 0
        diff = (a[seen] - b[seen]).abs().max().item()
        print(f"gated cross-attention parity (immediate={immediate}): max |diff| = {diff:.2e}")
        assert diff < 1e-5
        # text before the first image: ours is the FFN branch alone (cross-attention exactly 0) ...
        ff_only = x + ours.ff_gate.tanh() * ours.ff(x)
        assert torch.equal(a[~seen], ff_only[~seen])
        # ... as open_flamingo's when attending to the immediate image; attending to all previous
        # images, open_flamingo gives such text the average of every image's values (the leak we close)
        leak = (b[~seen] - a[~seen]).abs().max().item()
        assert leak < 1e-5 if immediate else leak > 1e-3
        # generation: new tokens see the last cached image (open_flamingo's use_cached_media)
        new = torch.randn(2, 3, 48)
        last = time[:, -1:].expand(-1, 3)
        diff = (
            (ours(new, media, last) - theirs(new, media, media_locations=locations, use_cached_media=True)).abs().max()
        )
        assert diff < 1e-5
