"""Parity with transformers' InstructBLIP: an `InstructBlipForConditionalGeneration` directory loads into
vlbridge's Blip2 (its Q-Former reads the instruction, qformer_question) and gives the same logits and
generations; its processor feeds the prompt to both tokenizers as transformers' does; export writes the
same tensors back, and transformers and vlbridge read them again.

Every reference model is a tiny transformers model built here and re-drawn with `randomize_`, so that a
wrongly mapped tensor moves the logits far beyond the tolerance (shown by perturbing one tensor by 1%).
The layout without image_token_index (old configs; transformers 5 cannot run them) is compared with what
transformers did before image tokens: the projected queries concatenated before the prompt embeddings.
"""

import dataclasses
import json

import pytest
import torch
import transformers as tf
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import vlbridge
from vlbridge import Blip2, Blip2Processor, VisionConfig, create_blip2
from vlbridge.models.blip2 import convert_instructblip  # noqa: F401  registers the layout
from vlbridge.testing import assert_same_weights, randomize_, tiny_lm_config, word_tokenizer

PROMPTS = ["a photo of", "question what color is the circle ? answer", "how many"]
OTHER = ["is there a square ?", "what shape is left of the red circle ?", "a photo of two"]
TOL = 1e-4
T5_DECODER_IDS = torch.tensor([[0, 9, 10, 11, 12], [0, 5, 6, 7, 8], [0, 20, 21, 22, 23]])


def _qformer_tokenizer():
    """BERT + [DEC], cutting long instructions from the left, as transformers' InstructBLIP conversion saves it."""
    tok = word_tokenizer("bert")
    tok.truncation_side = tok.init_kwargs["truncation_side"] = "left"  # init_kwargs: saved with it
    tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def make_checkpoint(path, kind="opt", image_token=True, Q=4, freq=1, seed=0):
    """A random transformers InstructBlipForConditionalGeneration and its InstructBlipProcessor, saved at `path`."""
    tok, qtok = word_tokenizer("lm"), _qformer_tokenizer()
    cfg = tf.InstructBlipConfig(
        vision_config=tf.InstructBlipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ).to_dict(),
        qformer_config=tf.InstructBlipQFormerConfig(
            vocab_size=len(qtok),
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=48,
            cross_attention_frequency=freq,
            max_position_embeddings=64,
        ).to_dict(),
        text_config=tiny_lm_config(kind, len(tok) + 1).to_dict(),  # + <image>, which the processor appends
        num_query_tokens=Q,
        image_token_index=len(tok) if image_token else None,
    )
    torch.manual_seed(seed)
    hf = randomize_(tf.InstructBlipForConditionalGeneration(cfg), seed=seed).eval()
    hf.save_pretrained(path)
    image_processor = tf.BlipImageProcessor(size={"height": 32, "width": 32})
    tf.InstructBlipProcessor(image_processor, tok, qtok, num_query_tokens=Q if image_token else None).save_pretrained(
        path
    )
    return hf


def _images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _reference(hf, px, batch, image_token, generate=None, **extra):
    """transformers' logits (generate=None) or generated ids for our processor's batch."""
    q = {k: batch[k] for k in ("qformer_input_ids", "qformer_attention_mask")}
    with torch.no_grad():
        if image_token:
            if generate is not None:
                return hf.generate(pixel_values=px, **batch, **generate)
            return hf(pixel_values=px, **batch, **extra).logits
        # before image tokens: the projected queries (B, Q, H) went in front of the prompt embeddings
        queries = hf.get_image_features(px, **q).pooler_output
        embeds = torch.cat([queries, hf.get_input_embeddings()(batch["input_ids"])], dim=1)
        mask = torch.cat([torch.ones(queries.shape[:2], dtype=torch.long), batch["attention_mask"]], dim=1)
        extra = {k: v for k, v in batch.items() if k.startswith("decoder_")}
        if generate is not None:
            return hf.language_model.generate(inputs_embeds=embeds, attention_mask=mask, **generate)
        return hf.language_model(inputs_embeds=embeds, attention_mask=mask, **extra).logits


def _logit_diff(model, hf, batch, kind, image_token, Q, px):
    """Max |ours - transformers'| over the positions that are text (not query slots, not padding)."""
    ours = model(pixel_values=px, **batch).logits
    extra = {}
    if kind == "llama":
        # transformers' forward numbers a LLaMA's positions from the left padding on (its generate does not);
        # ours skip the padding in both: given those positions, transformers' forward agrees
        extra["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    ref = _reference(hf, px, batch, image_token, **extra)
    assert ours.shape == ref.shape
    if kind == "t5":
        text = torch.ones(ours.shape[:2], dtype=torch.bool)  # decoder positions
    else:
        mask = batch["attention_mask"]
        text = (mask if image_token else torch.cat([torch.ones(len(mask), Q, dtype=mask.dtype), mask], 1)).bool()
        text[:, :Q] = False  # the query slots open every row
    return (ours - ref).abs()[text].max().item()


def _batch(proc, kind, prompts=PROMPTS):
    batch = proc(text=prompts)  # Q image tokens + prompt for the LM, the same prompt in Q-Former tokens
    if kind == "t5":
        batch["decoder_input_ids"] = T5_DECODER_IDS[: len(prompts)]
    return batch


CASES = [  # (LM, image-token layout, queries, cross-attention frequency)
    ("opt", True, 4, 1),
    ("t5", True, 3, 2),
    ("opt", False, 3, 2),
    ("llama", True, 4, 2),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{'image_token' if c[1] else 'prepend'}-q{c[2]}")
def case(request, tmp_path_factory):
    kind, image_token, Q, freq = request.param
    path = tmp_path_factory.mktemp(f"instructblip-{kind}")
    hf = make_checkpoint(path, kind, image_token, Q, freq)
    model, proc = vlbridge.load(path, device="cpu")  # found by config.json's model_type "instructblip"
    return request.param, path, hf, model, proc


def test_logits_and_decoding_match_transformers(case):
    (kind, image_token, Q, _), _, hf, model, proc = case
    assert isinstance(model, Blip2) and model.config.qformer_question and model.qformer.lm_head is None
    assert model.config.image_token_id == hf.config.image_token_index and model.config.qformer.num_query_tokens == Q
    px, batch = _images(3), _batch(proc, kind)
    assert (batch["attention_mask"] == 0).any() and (batch["qformer_attention_mask"] == 0).any()  # padded batches
    diff = _logit_diff(model, hf, batch, kind, image_token, Q, px)
    print(f"InstructBLIP {kind} {'image tokens' if image_token else 'prepended'}: max |logit diff| {diff:.2e}")
    assert diff < TOL

    # the instruction reaches the queries: other Q-Former text, other logits
    other = {**batch, **{k: v for k, v in proc(text=OTHER).items() if k.startswith("qformer_")}}
    assert (model(pixel_values=px, **other).logits - model(pixel_values=px, **batch).logits).abs().max() > 1e-2

    lm_inputs = {k: v for k, v in batch.items() if not k.startswith("decoder_")}
    for gen in (dict(max_new_tokens=6), dict(max_new_tokens=6, num_beams=5)):
        ours = model.generate(px, **lm_inputs, **gen)
        ref = _reference(hf, px, lm_inputs, image_token, generate=gen)
        # transformers returns the prompt first (decoder-only with image tokens) or the decoder start token (T5)
        ref = ref[:, 1:] if kind == "t5" else ref[:, lm_inputs["input_ids"].shape[1] :] if image_token else ref
        assert torch.equal(ours, ref), (gen, ours, ref)
    assert len({tuple(r) for r in ours.tolist()}) > 1  # the rows really differ
    if image_token:  # no LM prompt: transformers' default, the image tokens and bos; the Q-Former still reads
        q = {k: v for k, v in lm_inputs.items() if k.startswith("qformer_")}
        with torch.no_grad():
            ref = hf.generate(pixel_values=px, **q, max_new_tokens=4)
        assert torch.equal(model.generate(px, **q, max_new_tokens=4), ref[:, 1:] if kind == "t5" else ref[:, Q + 1 :])


@pytest.mark.parametrize(
    "name",
    [
        "qformer.embeddings.word_embeddings.weight",
        "qformer.embeddings.position_embeddings.weight",
        "qformer.embeddings.layernorm.bias",
        "qformer.encoder.layer.0.intermediate.dense.weight",  # the instruction's feed-forward
        "qformer.encoder.layer.1.crossattention.attention.key.weight",
    ],
)
def test_a_one_percent_error_in_one_tensor_fails_the_comparison(tmp_path, name):
    hf = make_checkpoint(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state[name] = state[name] * 1.01
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model, proc = Blip2.from_pretrained(tmp_path).eval(), Blip2Processor.from_pretrained(tmp_path)
    diff = _logit_diff(model, hf, _batch(proc, "opt"), "opt", True, 4, _images(3))
    print(f"{name} x 1.01: max |logit diff| {diff:.2e}")
    assert diff > 10 * TOL


def test_processor_matches_transformers(case):
    (kind, image_token, Q, _), path, _, _, proc = case
    hf_proc = tf.InstructBlipProcessor.from_pretrained(path)
    hf_proc.tokenizer.padding_side = "right" if kind == "t5" else "left"  # vlbridge's choice, for batched generation
    g = torch.Generator().manual_seed(0)
    images = [
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())
        for h, w in ((40, 50), (32, 64), (80, 24))
    ]
    # transformers' processor needs num_query_tokens for images: without image tokens, compare the text alone
    given = dict(images=images) if image_token else {}
    ref = hf_proc(**given, text=PROMPTS, padding=True, return_tensors="pt")
    ours = proc(**given, text=PROMPTS)
    assert ours.keys() == ref.keys() >= {"input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask"}
    for k in ours:
        assert torch.equal(ours[k], ref[k]), k
    n_image = (ours["input_ids"] == hf_proc.tokenizer.convert_tokens_to_ids("<image>")).sum(1)
    assert n_image.tolist() == [Q if image_token else 0] * 3
    # answering: the Q-Former reads the whole prompt, as in LAVIS, not the bare question
    prompted = proc.prompt_inputs(images, PROMPTS, questions=OTHER)
    assert torch.equal(prompted["qformer_input_ids"], ours["qformer_input_ids"])
    # an instruction longer than the limit is cut from the left (its end, the question, stays) when asked to
    long = " ".join(PROMPTS * 8)
    with pytest.raises(ValueError, match="truncate=True"):
        proc(text=[long])
    cut = hf_proc.qformer_tokenizer([long], truncation=True, max_length=proc.max_text_length, return_tensors="pt")
    assert proc.max_text_length == 64 and torch.equal(
        proc.qformer_text([long], truncate=True)["input_ids"], cut.input_ids
    )


def test_export_round_trip_is_exact(case, tmp_path):
    (kind, image_token, _, _), path, hf, model, proc = case
    model.save_pretrained(tmp_path, processor=proc, format="instructblip")
    assert_same_weights(path, tmp_path)
    back, info = tf.InstructBlipForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert back.config.image_token_index == hf.config.image_token_index
    written_cfg, original_cfg = (tf.InstructBlipConfig.from_pretrained(p).to_dict() for p in (tmp_path, path))
    assert written_cfg["qformer_config"] == original_cfg["qformer_config"]
    px, batch = _images(3), _batch(proc, kind)
    hf_proc, written_proc = (
        tf.InstructBlipProcessor.from_pretrained(path),
        tf.InstructBlipProcessor.from_pretrained(tmp_path),
    )
    assert written_proc.num_query_tokens == hf_proc.num_query_tokens
    assert written_proc(text=PROMPTS, padding=True).data == hf_proc(text=PROMPTS, padding=True).data
    if image_token:  # transformers runs it as before
        assert torch.equal(_reference(back.eval(), px, batch, True), _reference(hf, px, batch, True))
    # and back into vlbridge: the same model
    again, again_proc = Blip2.from_pretrained(tmp_path).eval(), Blip2Processor.from_pretrained(tmp_path)
    again_batch = _batch(again_proc, kind)
    assert all(torch.equal(again_batch[k], v) for k, v in batch.items())
    assert torch.equal(again(pixel_values=px, **again_batch).logits, model(pixel_values=px, **batch).logits)


def test_vlbridge_format_round_trip_of_an_imported_model(case, tmp_path):
    (kind, _, _, _), _, _, model, proc = case
    model.save_pretrained(tmp_path, processor=proc)
    again, again_proc = Blip2.from_pretrained(tmp_path).eval(), Blip2Processor.from_pretrained(tmp_path)
    assert again.config.qformer_question and again.ln_vision.eps == model.ln_vision.eps == 1e-6
    assert type(again.vision.model) is tf.InstructBlipVisionModel
    px, batch = _images(3), _batch(proc, kind)
    assert torch.equal(again(pixel_values=px, **batch).logits, model(pixel_values=px, **batch).logits)
    q = again_proc.qformer_text(PROMPTS)
    assert torch.equal(q["input_ids"], batch["qformer_input_ids"])


def test_vlbridge_format_keeps_the_prompt_going_to_the_qformer(tmp_path):
    make_checkpoint(tmp_path / "hf")
    model, proc = vlbridge.load(tmp_path / "hf", device="cpu")
    model.save_pretrained(tmp_path / "ours", processor=proc)
    assert Blip2Processor.from_pretrained(tmp_path / "ours").qformer_reads_prompt


# ---------------------------------------------------------------------------------- errors
def test_export_needs_an_instruction_reading_qformer_and_blip2s_tower(build, tmp_path):
    stage1, _ = build(None)
    with pytest.raises(ValueError, match="has none"):
        stage1.save_pretrained(tmp_path, format="instructblip")
    model, _ = build("opt")  # a plain BLIP-2: its Q-Former reads no instruction
    model.drop_text_branch()
    with pytest.raises(ValueError, match="does not read the instruction"):
        model.save_pretrained(tmp_path, format="instructblip")
    model, _ = build("opt")
    model.config.qformer_question = True
    with pytest.raises(ValueError, match="drop_text_branch"):  # the stage-1 heads are still there
        model.save_pretrained(tmp_path, format="instructblip")
    model.drop_text_branch()
    with pytest.raises(ValueError, match="InstructBlipVisionModel"):  # a CLIP tower
        model.save_pretrained(tmp_path, format="instructblip")


def test_bad_directories_get_one_clear_error(tmp_path):
    make_checkpoint(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["qformer.layernorm.weight"] = state.pop("qformer.embeddings.layernorm.weight")  # BLIP-2's name
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"InstructBLIP: unknown keys \['qformer.layernorm.weight'\], "):
        Blip2.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"missing keys \['qformer.layernorm.weight'\]"):
        Blip2.from_pretrained(tmp_path)

    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Blip2.from_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["InstructBlipQFormerModel"]}))
    with pytest.raises(ValueError, match="InstructBlipForConditionalGeneration"):
        Blip2.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))

    for f in (tmp_path / "qformer_tokenizer").iterdir():
        f.unlink()
    (tmp_path / "qformer_tokenizer").rmdir()
    with pytest.raises(ValueError, match="no qformer_tokenizer/ folder"):
        Blip2Processor.from_pretrained(tmp_path)


def test_export_of_a_question_reading_model_built_on_blip2s_tower(tmp_path, tiny_configs):
    """A vlbridge BLIP-2 whose Q-Former reads the question, on BLIP-2's vision tower cut at its penultimate
    layer, publishes as InstructBLIP (the tower renamed InstructBlipVisionModel): transformers computes the
    same logits and generations from the same instruction."""
    torch.manual_seed(0)
    tower = tf.Blip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    randomize_(tf.Blip2VisionModel(tower)).save_pretrained(tmp_path / "tower")
    tf.BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "tower")
    cfg = dataclasses.replace(
        tiny_configs["opt"],
        vision=VisionConfig(str(tmp_path / "tower"), feature_layer=-2),
        image_token_id=1,  # the tiny LM has no <image>: its <unk> stands in
        qformer_question=True,
    )
    model, proc = create_blip2(cfg)
    for i, name in enumerate(("ln_vision", "qformer", "lm_proj")):
        randomize_(nn.ModuleDict({name: getattr(model, name)}), seed=i)
    model.drop_text_branch()  # the stage-1 heads go, the question side stays
    model.eval().save_pretrained(tmp_path / "hf", format="instructblip")
    hf = tf.InstructBlipForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.vision_config.model_type == "instructblip_vision_model"
    assert hf.config.vision_config.num_hidden_layers == 1
    px, batch = _images(3), proc(text=PROMPTS, qformer_text=PROMPTS)
    with torch.no_grad():
        ref = hf(pixel_values=px, **batch).logits
    ours = model(pixel_values=px, **batch).logits
    text = (batch["input_ids"] != 1) & batch["attention_mask"].bool()  # not the image slots, not padding
    assert (ours - ref).abs()[text].max() < TOL
    assert torch.equal(
        model.generate(px, **batch, max_new_tokens=4),
        hf.generate(pixel_values=px, **batch, max_new_tokens=4)[:, batch["input_ids"].shape[1] :],
    )
