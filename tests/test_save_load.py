"""save_pretrained / from_pretrained: bit-identical bridge, identical outputs, self-contained
directories, attaching a new LM, and loud failures on mismatching checkpoints."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlbridge import Blip2, Blip2Processor
from vlbridge.testing import make_lm

CAPTIONS = ["a red circle", "two blue squares above a small triangle", "a green triangle", "yellow square left"]
PROMPTS = ["a photo of", "how many", "question what color is the circle ? answer", "red"]
TARGETS = ["red circle", "two", "blue", "a large yellow square"]


def _stage1_losses(model, proc, px):
    q = proc.qformer_text(CAPTIONS)
    torch.manual_seed(0)  # ITM hard negatives are sampled
    out = model.pretrain_losses(q["input_ids"], q["attention_mask"], pixel_values=px)
    return torch.stack([out.loss_itc, out.loss_itm, out.loss_itg])


def _assert_same_bridge(a, b):
    sa, sb = a.bridge_state_dict(), b.bridge_state_dict()
    assert sa.keys() == sb.keys() and len(sa) > 10
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _assert_same_processor_outputs(p1, p2, images, lm):
    imgs = [(images(1, seed=s)[0].permute(1, 2, 0).clamp(-1, 1).numpy() + 1) / 2 for s in range(2)]
    kw = dict(images=imgs, qformer_text=CAPTIONS[:2])
    if lm is not None:
        kw.update(text=PROMPTS[:2], targets=TARGETS[:2])
    a, b = p1(**kw), p2(**kw)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("lm", [None, "gpt2", "t5"])
def test_round_trip_is_identical(build, images, tmp_path, lm):
    model, proc = build(lm, randomize=True)
    px = images(4)
    path = tmp_path / "ckpt"
    model.save_pretrained(path, processor=proc)
    expected = {"config.json", "model.safetensors", "vision", "qformer_tokenizer"} | ({"lm"} if lm else set())
    assert {p.name for p in path.iterdir()} == expected
    saved = json.loads((path / "config.json").read_text())
    # the vision tower is saved already cut at its feature layer: loading must not cut it again
    assert saved["vision"] == {**saved["vision"], "name_or_path": "vision", "feature_layer": -1}
    assert saved["qformer_tokenizer"] == "qformer_tokenizer" and (lm is None or saved["lm"]["name_or_path"] == "lm")

    loaded = Blip2.from_pretrained(path).eval()
    _assert_same_bridge(model, loaded)
    assert loaded.vision.model.config.num_hidden_layers == model.vision.model.config.num_hidden_layers == 2
    assert torch.equal(loaded.vision(px), model.vision(px))
    assert torch.equal(_stage1_losses(loaded, proc, px), _stage1_losses(model, proc, px))

    proc2 = Blip2Processor.from_pretrained(path)
    _assert_same_processor_outputs(proc, proc2, images, lm)
    if lm is not None:
        assert proc2.is_encoder_decoder == (lm == "t5")
        assert proc2.tokenizer.padding_side == ("right" if lm == "t5" else "left")
        batch = proc2(text=PROMPTS, targets=TARGETS)
        a, b = model(px, **batch), loaded(px, **batch)
        assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
        prompts = proc2(text=PROMPTS)
        assert torch.equal(
            model.generate(px, **prompts, max_new_tokens=5), loaded.generate(px, **prompts, max_new_tokens=5)
        )


def test_without_backbones_points_at_the_originals(build, images, tiny_configs, tmp_path):
    model, proc = build("gpt2", randomize=True)
    model.save_pretrained(tmp_path, include_backbones=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["vision"]["name_or_path"] == tiny_configs["gpt2"].vision.name_or_path
    assert (
        saved["vision"]["feature_layer"] == -2 and saved["lm"]["name_or_path"] == tiny_configs["gpt2"].lm.name_or_path
    )
    loaded = Blip2.from_pretrained(tmp_path).eval()
    _assert_same_bridge(model, loaded)
    px = images(4)
    batch = proc(text=PROMPTS, targets=TARGETS)
    assert torch.equal(model(px, **batch).logits, loaded(px, **batch).logits)
    assert torch.equal(_stage1_losses(loaded, proc, px), _stage1_losses(model, proc, px))


def test_stage1_checkpoint_into_stage2_with_a_new_lm(build, images, tiny_configs, tmp_path):
    stage1, proc = build(None, randomize=True)
    stage1.save_pretrained(tmp_path / "s1", processor=proc)
    model = Blip2.from_pretrained(tmp_path / "s1", lm=tiny_configs["t5"].lm.name_or_path, drop_text_branch=True)
    assert model.lm is not None and model.config.lm.is_encoder_decoder and model.config.lm.hidden_size == 32
    assert model.qformer.word_embeddings is None and model.qformer.lm_head is None
    assert not any(hasattr(model, n) for n in ("vision_proj", "text_proj", "itm_head", "temp"))
    assert not model.config.qformer.text_branch
    # what is left of the Q-Former is the stage-1 one; the projection is new
    s1 = stage1.bridge_state_dict()
    kept = {k: v for k, v in model.bridge_state_dict().items() if not k.startswith("lm_proj.")}
    assert kept and all(torch.equal(v, s1[k]) for k, v in kept.items())
    assert "lm_proj.weight" in model.bridge_state_dict() and "lm_proj.weight" not in s1
    proc2 = Blip2Processor.from_config(model.config)
    assert proc2.is_encoder_decoder
    out = model(images(4), **proc2(text=PROMPTS, targets=TARGETS))
    assert torch.isfinite(out.loss)
    # the stage-2 model saves and loads as it is (no text branch expected in the checkpoint)
    model.save_pretrained(tmp_path / "s2", processor=proc2)
    again = Blip2.from_pretrained(tmp_path / "s2").eval()
    _assert_same_bridge(model.eval(), again)
    batch = proc2(text=PROMPTS, targets=TARGETS)
    assert torch.equal(model(images(4), **batch).logits, again(images(4), **batch).logits)


def test_new_lm_gets_a_fresh_projection(build, images, tiny_configs, tmp_path):
    """A stage-2 checkpoint moved to another LM: the old projection is not reused, whatever its width."""
    model, proc = build("gpt2", randomize=True)
    model.save_pretrained(tmp_path / "ckpt", processor=proc)
    same_width = Blip2.from_pretrained(tmp_path / "ckpt", lm=tiny_configs["opt"].lm.name_or_path)
    assert same_width.lm_proj.weight.shape == model.lm_proj.weight.shape
    assert not torch.equal(same_width.lm_proj.weight, model.lm_proj.weight)
    assert torch.equal(same_width.qformer.query_tokens, model.qformer.query_tokens)
    wide = Blip2.from_pretrained(tmp_path / "ckpt", lm=make_lm(tmp_path / "opt48", "opt", hidden=48))
    assert wide.lm_proj.weight.shape == (48, 32) and wide.config.lm.hidden_size == 48
    batch = Blip2Processor.from_config(wide.config)(text=PROMPTS, targets=TARGETS)
    assert torch.isfinite(wide(images(4), **batch).loss)


def test_mismatching_checkpoint_names_the_keys(build, tmp_path):
    model, proc = build("gpt2")
    model.save_pretrained(tmp_path, processor=proc)
    Blip2.from_pretrained(tmp_path)  # fine as saved
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["qformer.query_tokens"]
    state["qformer.bogus.weight"] = torch.zeros(3)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"qformer\.query_tokens") as err:
        Blip2.from_pretrained(tmp_path)
    assert "qformer.bogus.weight" in str(err.value)
    # a stage-2 checkpoint that lost its projection is incomplete too
    del state["qformer.bogus.weight"]
    state["qformer.query_tokens"] = model.qformer.query_tokens.detach().clone()
    del state["lm_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lm_proj\.weight"):
        Blip2.from_pretrained(tmp_path)


def test_dropped_text_branch_refuses_text_tasks(build, images):
    model, proc = build("gpt2", randomize=True)
    px = images(2)
    q = proc.qformer_text(CAPTIONS[:2])
    ids, mask = q["input_ids"], q["attention_mask"]
    assert model.itc(ids, mask, pixel_values=px).shape == (2, 2)  # works before
    model.drop_text_branch()
    calls = [
        lambda: model.itc(ids, mask, pixel_values=px),
        lambda: model.itm(ids, mask, pixel_values=px),
        lambda: model.pretrain_losses(ids, mask, pixel_values=px),
        lambda: model.retrieval_scores(ids, mask, pixel_values=px, k=1),
        lambda: model.extract_features(ids, mask, pixel_values=px),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="text branch"):
            call()
    # image features and generation still work
    assert model.extract_features(pixel_values=px).image_embeds.shape == (2, 4, 32)
    assert model.generate(px, **proc(text=PROMPTS[:2]), max_new_tokens=3).shape[0] == 2
