"""Parity with transformers' BLIP-2 and BERT: checkpoints written by transformers load into vlbridge
and give the same logits, generations, ITM/ITC scores; export writes them back tensor for tensor.

Every reference model is a tiny transformers model built here and re-drawn with `randomize_`, so
that a wrongly mapped tensor moves the outputs far beyond the tolerances. The older config layout
(no image_token_index: queries prepended to the prompt) cannot run in transformers 5, which only
scatters into image tokens; its reference is what transformers did before: the projected queries
(`get_image_features`) concatenated before the prompt embeddings, into transformers' own LM.
"""

import dataclasses

import pytest
import torch
import transformers as tf
from PIL import Image
from safetensors.torch import load_file, save_file

from vlbridge import Blip2, Blip2Processor, QFormerConfig
from vlbridge.models.blip2.convert_bert import init_qformer_from_bert
from vlbridge.models.blip2.qformer import QFormer
from vlbridge.testing import assert_same_weights, randomize_, tiny_lm_config, word_tokenizer

PROMPTS = ["a photo of", "question what color is the circle ? answer", "how many"]
TEXTS = ["a red circle", "two blue squares above a small triangle", "a green triangle"]
TOL = 1e-4


def _vision_config():
    return tf.Blip2VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-6,
    )


def _qformer_config(text_input=False, freq=2, vocab=64):
    return tf.Blip2QFormerConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=48,
        cross_attention_frequency=freq,
        max_position_embeddings=64,
        use_qformer_text_input=text_input,
    )


def _save_processor(path, tokenizer, num_query_tokens):
    image_processor = tf.BlipImageProcessor(size={"height": 32, "width": 32})
    tf.Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens).save_pretrained(path)


def make_generation_checkpoint(path, kind, image_token, Q, freq, seed=0):
    """A random transformers Blip2ForConditionalGeneration (OPT or T5) and its processor, saved at `path`."""
    tok = word_tokenizer("lm")
    image_id = len(tok)  # transformers' processor appends <image> to the tokenizer
    cfg = tf.Blip2Config(
        vision_config=_vision_config().to_dict(),
        qformer_config=_qformer_config(freq=freq).to_dict(),
        text_config=tiny_lm_config(kind, len(tok) + 1).to_dict(),
        num_query_tokens=Q,
        image_token_index=image_id if image_token else None,
    )
    torch.manual_seed(seed)
    model = randomize_(tf.Blip2ForConditionalGeneration(cfg), seed=seed).eval()
    model.save_pretrained(path)
    _save_processor(path, tok, Q if image_token else None)
    return model


def make_retrieval_checkpoint(path, image_token, Q=4, seed=0):
    tok = word_tokenizer("bert")
    tok.add_special_tokens({"bos_token": "[DEC]"})  # BERT + [DEC] (the last Q-Former row), as LAVIS trained it
    cfg = tf.Blip2Config(
        vision_config=_vision_config().to_dict(),
        qformer_config=_qformer_config(text_input=True, freq=1, vocab=len(tok)).to_dict(),
        num_query_tokens=Q,
        image_text_hidden_size=16,
        image_token_index=len(tok) if image_token else None,
    )
    torch.manual_seed(seed)
    model = randomize_(tf.Blip2ForImageTextRetrieval(cfg), seed=seed).eval()
    model.save_pretrained(path)
    _save_processor(path, tok, Q if image_token else None)
    return model


def _images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _prepend_reference(hf, px, ids, mask):
    """Inputs for transformers' LM as transformers built them for configs without image_token_index."""
    queries = hf.get_image_features(px).pooler_output  # (B, Q, H): the projected query outputs
    embeds = torch.cat([queries, hf.get_input_embeddings()(ids)], dim=1)
    return embeds, torch.cat([torch.ones(queries.shape[:2], dtype=mask.dtype), mask], dim=1)


GENERATION_CASES = [  # (LM, image-token layout, queries, cross-attention frequency)
    ("opt", True, 4, 1),
    ("opt", False, 3, 2),
    ("t5", True, 3, 2),
    ("t5", False, 4, 1),
]


@pytest.fixture(
    scope="module",
    params=GENERATION_CASES,
    ids=lambda c: f"{c[0]}-{'image_token' if c[1] else 'prepend'}-q{c[2]}-x{c[3]}",
)
def generation_case(request, tmp_path_factory):
    kind, image_token, Q, freq = request.param
    path = tmp_path_factory.mktemp(f"hf-{kind}")
    hf = make_generation_checkpoint(path, kind, image_token, Q, freq)
    return request.param, path, hf, Blip2.from_pretrained(path).eval(), Blip2Processor.from_pretrained(path)


def test_generation_logits_and_decoding_match_transformers(generation_case):
    (kind, image_token, Q, _), _, hf, model, proc = generation_case
    assert model.config.image_token_id == hf.config.image_token_index and model.config.qformer.num_query_tokens == Q
    px = _images(3)
    batch = proc(text=PROMPTS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any()  # a padded batch
    kw = {}
    if kind == "t5":
        kw["decoder_input_ids"] = torch.tensor([[0, 9, 10, 11, 12], [0, 5, 6, 7, 8], [0, 20, 21, 22, 23]])
    ours = model(pixel_values=px, input_ids=ids, attention_mask=mask, **kw).logits
    with torch.no_grad():
        if image_token:
            ref = hf(pixel_values=px, input_ids=ids, attention_mask=mask, **kw).logits
        else:
            embeds, full_mask = _prepend_reference(hf, px, ids, mask)
            ref = hf.language_model(inputs_embeds=embeds, attention_mask=full_mask, **kw).logits
    assert ours.shape == ref.shape
    if kind == "t5":
        text = torch.ones(ours.shape[:2], dtype=torch.bool)  # decoder positions
    else:
        full = mask if image_token else torch.cat([torch.ones(3, Q, dtype=mask.dtype), mask], 1)
        text = full.bool()
        text[:, :Q] = False  # query slots: every other position is text
    diff = (ours - ref).abs()[text].max().item()
    print(f"max |logit diff| {generation_case[0]}: {diff:.2e}")
    assert diff < TOL

    for gen in (dict(max_new_tokens=6), dict(max_new_tokens=6, num_beams=5)):
        ours = model.generate(px, ids, mask, **gen)
        with torch.no_grad():
            if image_token:
                ref = hf.generate(pixel_values=px, input_ids=ids, attention_mask=mask, **gen)
            else:
                embeds, full_mask = _prepend_reference(hf, px, ids, mask)
                ref = hf.language_model.generate(inputs_embeds=embeds, attention_mask=full_mask, **gen)
        # transformers returns the prompt first (decoder-only) or the decoder start token (T5)
        ref = ref[:, 1:] if kind == "t5" else ref[:, ids.shape[1] :] if image_token else ref
        assert torch.equal(ours, ref), (gen, ours, ref)
    assert len({tuple(r) for r in ours.tolist()}) > 1  # the rows really differ
    if image_token:  # no prompt at all: transformers' default, the image tokens and bos
        with torch.no_grad():
            ref = hf.generate(pixel_values=px, max_new_tokens=4)
        assert torch.equal(model.generate(px, max_new_tokens=4), ref[:, 1:] if kind == "t5" else ref[:, Q + 1 :])


def test_processor_matches_transformers(generation_case):
    (kind, image_token, Q, _), path, _, _, proc = generation_case
    hf_proc = tf.Blip2Processor.from_pretrained(path)
    hf_proc.tokenizer.padding_side = "right" if kind == "t5" else "left"  # vlbridge's choice, for batched generation
    g = torch.Generator().manual_seed(0)
    images = [
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())
        for h, w in ((40, 50), (32, 64), (80, 24))
    ]
    ref = hf_proc(images=images, text=PROMPTS, padding=True, return_tensors="pt")
    ours = proc(images=images, text=PROMPTS)
    assert ours.keys() == ref.keys() == {"pixel_values", "input_ids", "attention_mask"}
    for k in ours:
        assert torch.equal(ours[k], ref[k]), k
    n_image = (ours["input_ids"] == hf_proc.tokenizer.convert_tokens_to_ids("<image>")).sum(1)
    assert n_image.tolist() == [Q if image_token else 0] * 3


def test_round_trip_reproduces_the_transformers_tensors(generation_case, tmp_path):
    (kind, image_token, _, _), path, hf, model, proc = generation_case
    model.save_pretrained(tmp_path, processor=proc, format="transformers")
    assert_same_weights(path, tmp_path)
    back, info = tf.Blip2ForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert back.config.image_token_index == hf.config.image_token_index
    hf_proc = tf.Blip2Processor.from_pretrained(tmp_path)
    assert hf_proc.num_query_tokens == (hf.config.num_query_tokens if image_token else None)
    if image_token:  # and transformers runs it as before
        px, batch = _images(2), proc(text=PROMPTS[:2])
        with torch.no_grad():
            assert torch.equal(
                back.eval()(
                    pixel_values=px,
                    **batch,
                    **({"decoder_input_ids": torch.tensor([[0, 5], [0, 6]])} if kind == "t5" else {}),
                ).logits,
                hf(
                    pixel_values=px,
                    **batch,
                    **({"decoder_input_ids": torch.tensor([[0, 5], [0, 6]])} if kind == "t5" else {}),
                ).logits,
            )


def test_vlbridge_format_round_trip_of_an_imported_model(generation_case, tmp_path):
    (kind, _, _, _), _, _, model, proc = generation_case
    model.save_pretrained(tmp_path, processor=proc)
    again, proc2 = Blip2.from_pretrained(tmp_path).eval(), Blip2Processor.from_pretrained(tmp_path)
    assert again.ln_vision.eps == model.ln_vision.eps == 1e-6
    px, batch = _images(3), proc2(text=PROMPTS)
    assert all(torch.equal(batch[k], v) for k, v in proc(text=PROMPTS).items())
    assert torch.equal(again.generate(px, **batch, max_new_tokens=4), model.generate(px, **batch, max_new_tokens=4))


@pytest.mark.parametrize("image_token", [True, False], ids=["image_token", "no_image_token"])
def test_retrieval_matches_transformers_and_round_trips(tmp_path, image_token):
    hf = make_retrieval_checkpoint(tmp_path / "hf", image_token)
    model, proc = Blip2.from_pretrained(tmp_path / "hf").eval(), Blip2Processor.from_pretrained(tmp_path / "hf")
    assert model.lm is None and model.config.qformer.text_branch and model.config.embed_dim == 16
    px = _images(3)
    q = proc.qformer_text(TEXTS)  # [CLS] text [SEP], right-padded; no image tokens
    hf_proc = tf.Blip2Processor.from_pretrained(tmp_path / "hf")
    ref_in = hf_proc(
        text=TEXTS,
        images=[(p.permute(1, 2, 0).clamp(0, 1) * 255).byte().numpy() for p in px],
        padding=True,
        return_tensors="pt",
    )
    Q = model.config.qformer.num_query_tokens if image_token else 0
    assert torch.equal(ref_in["input_ids"][:, Q:], q["input_ids"])
    with torch.no_grad():
        itm_ref = hf(px, ref_in["input_ids"], ref_in["attention_mask"], use_image_text_matching_head=True)
        itc_ref = hf(px, ref_in["input_ids"], ref_in["attention_mask"], use_image_text_matching_head=False)
    itm = model.itm(q["input_ids"], q["attention_mask"], pixel_values=px)
    itc = model.itc(q["input_ids"], q["attention_mask"], pixel_values=px)
    d_itm = (itm - itm_ref.logits_per_image).abs().max().item()
    d_itc = (itc - itc_ref.logits_per_image).abs().max().item()
    print(
        f"retrieval ({'image_token' if image_token else 'no image token'}): max |ITM diff| {d_itm:.2e}, "
        f"max |ITC diff| {d_itc:.2e}"
    )
    assert itc.shape == (3, 3) and d_itm < TOL and d_itc < TOL
    assert itm_ref.logits_per_image.std() > 0.1  # not a degenerate comparison

    model.save_pretrained(tmp_path / "back", processor=proc, format="transformers")
    original, written = (
        load_file(str(tmp_path / "hf/model.safetensors")),
        load_file(str(tmp_path / "back/model.safetensors")),
    )
    assert original.keys() == written.keys() and all(torch.equal(original[k], written[k]) for k in original)
    _, info = tf.Blip2ForImageTextRetrieval.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info

    model.save_pretrained(tmp_path / "ours", processor=proc)  # and vlbridge's own format
    again, proc2 = Blip2.from_pretrained(tmp_path / "ours").eval(), Blip2Processor.from_pretrained(tmp_path / "ours")
    assert (
        again.config.qformer.bos_token_id == proc2.qformer_tokenizer.bos_token_id == model.config.qformer.vocab_size - 1
    )
    q2 = proc2.qformer_text(TEXTS)
    assert torch.equal(again.itm(q2["input_ids"], q2["attention_mask"], pixel_values=px), itm)


def test_retrieval_checkpoint_into_stage_2(tmp_path, tiny_configs):
    """A published stage-1 model gets an LM (fresh projection) and loses its text side for stage 2."""
    make_retrieval_checkpoint(tmp_path, image_token=True)
    model = Blip2.from_pretrained(tmp_path, lm=tiny_configs["opt"].lm.name_or_path, drop_text_branch=True).eval()
    assert model.lm is not None and not model.config.qformer.text_branch and model.qformer.word_embeddings is None
    proc = Blip2Processor.from_config(model.config)
    assert model.generate(_images(2), **proc(text=PROMPTS[:2]), max_new_tokens=3).shape[0] == 2


def test_export_of_a_model_built_on_blip2s_tower(tmp_path, tiny_configs):
    """A vlbridge model on BLIP-2's vision tower cut at its penultimate layer publishes as a
    transformers model whose post_layernorm is our ln_vision: transformers computes the same logits."""
    from torch import nn

    from vlbridge import VisionConfig, create_blip2

    torch.manual_seed(0)
    randomize_(tf.Blip2VisionModel(_vision_config())).save_pretrained(tmp_path / "tower")
    tf.BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "tower")
    cfg = dataclasses.replace(
        tiny_configs["opt"], vision=VisionConfig(str(tmp_path / "tower"), feature_layer=-2), image_token_id=1
    )  # the tiny LM has no <image>: its <unk> stands in
    model, proc = create_blip2(cfg)
    for i, name in enumerate(("ln_vision", "qformer", "lm_proj")):
        randomize_(nn.ModuleDict({name: getattr(model, name)}), seed=i)
    model.drop_text_branch()
    model.eval().save_pretrained(tmp_path / "hf", format="transformers")
    hf = tf.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.vision_config.num_hidden_layers == 1
    px, batch = _images(3), proc(text=PROMPTS)
    with torch.no_grad():
        ref = hf(pixel_values=px, **batch).logits
    ours = model(pixel_values=px, **batch).logits
    text = (batch["input_ids"] != 1) & batch["attention_mask"].bool()  # not the image slots, not padding
    assert (ours - ref).abs()[text].max() < TOL
    assert torch.equal(
        model.generate(px, **batch, max_new_tokens=4),
        hf.generate(pixel_values=px, **batch, max_new_tokens=4)[:, batch["input_ids"].shape[1] :],
    )


def test_unknown_and_missing_keys_are_named(tmp_path):
    make_generation_checkpoint(tmp_path, "opt", True, 2, 1)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["qformer.encoder.layer.1.output_query.dense.bias"]
    state["qformer.encoder.layer.0.bogus.weight"] = torch.zeros(3)
    state["vision_model.encoder.layers.7.mlp.fc1.weight"] = torch.zeros(3)  # a layer the config does not have
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"unknown keys .*bogus\.weight") as err:
        Blip2.from_pretrained(tmp_path)
    assert "vision_model.encoder.layers.7.mlp.fc1.weight" in str(err.value)
    assert "missing keys ['qformer.layers.1.ffn_query.output.bias']" in str(err.value)


def test_export_needs_blip2s_vision_tower_and_no_text_branch(build, tmp_path):
    model, _ = build("opt")  # a CLIP tower
    with pytest.raises(ValueError, match="Blip2VisionModel"):
        model.save_pretrained(tmp_path, format="transformers")
    with pytest.raises(ValueError, match="unknown format"):
        model.save_pretrained(tmp_path, format="onnx")


# ---------------------------------------------------------------------------------- BERT -> Q-Former
@pytest.mark.parametrize("head", [False, True], ids=["BertModel", "BertForMaskedLM"])
def test_qformer_text_path_reproduces_bert(tmp_path, head):
    tok = word_tokenizer("bert")
    bert_cfg = tf.BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    bert = randomize_((tf.BertForMaskedLM if head else tf.BertModel)(bert_cfg)).eval()
    bert.save_pretrained(tmp_path)
    qcfg = QFormerConfig(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        num_query_tokens=4,
        cross_attention_frequency=1,
        encoder_hidden_size=24,
        vocab_size=len(tok) + 1,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=len(tok),
    )
    qformer = QFormer(qcfg).eval()
    fresh = {k: v.clone() for k, v in qformer.state_dict().items()}
    init_qformer_from_bert(qformer, tmp_path)

    batch = tok(TEXTS, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        encoder = bert.bert if head else bert
        ref = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        ours = qformer(ids, mask)
    diff = (ours - ref).abs()[mask.bool()].max().item()
    print(f"BERT ({'MLM head' if head else 'BertModel'}): max |hidden diff| {diff:.2e}")
    assert diff < 1e-5 and ref.std() > 0.5
    state = qformer.state_dict()
    for k in state:
        if ".ffn_query." in k:  # query FFNs start as copies of the text FFNs
            assert torch.equal(state[k], state[k.replace(".ffn_query.", ".ffn.")]), k
        if ".crossattention." in k or k == "query_tokens":  # what BERT lacks stays fresh
            assert torch.equal(state[k], fresh[k]), k
    assert torch.equal(state["word_embeddings.weight"][-1], fresh["word_embeddings.weight"][-1])  # the [DEC] row
    if head:
        assert torch.equal(state["lm_head.dense.weight"], bert.cls.predictions.transform.dense.weight)
        assert torch.equal(state["lm_head.bias"][:-1], bert.cls.predictions.bias)


def test_bert_with_unknown_keys_is_refused(tmp_path):
    bert = tf.BertModel(
        tf.BertConfig(
            vocab_size=30,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    )
    bert.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    qformer = QFormer(
        QFormerConfig(
            hidden_size=32,
            num_layers=3,
            num_heads=4,
            intermediate_size=64,
            vocab_size=31,
            max_position_embeddings=64,
            bos_token_id=30,
        )
    )
    with pytest.raises(ValueError, match=r"rotary\.weight.*missing keys \['layers\.2\.attention\.dense\.bias'"):
        init_qformer_from_bert(qformer, tmp_path)
