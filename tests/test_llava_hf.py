"""Parity with transformers' LLaVA: a checkpoint written by transformers' LlavaForConditionalGeneration loads
into vlbridge's Llava (through Llava.from_pretrained and vlbridge.load, although both say model_type
"llava") and gives the same logits and generations; export writes it back tensor for tensor, and a model
built by vlbridge exports into a directory transformers runs with the same outputs.

The reference is a tiny CLIP + Llama LLaVA built here and re-drawn with `randomize_` (matrices
N(0, 1/fan_in), norm weights 1 +/- 0.2, biases N(0, 0.2)), so that a wrongly mapped tensor moves the
outputs far beyond the tolerance."""

import json

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image

import vlbridge
from vlbridge import LlavaConfig, LMConfig, VisionConfig, create_llava
from vlbridge.models.llava import Llava, LlavaProcessor
from vlbridge.models.llava.convert_transformers import is_transformers_llava
from vlbridge.testing import randomize_, tiny_lm_config, word_tokenizer

TOL = 1e-4
PROMPTS = [
    "<image> what color is the small circle ?",
    "how many <image> red circle is there ?",
]  # one length: no padding


def make_reference(path, strategy="default", feature_layer=-2, seed=0, tie=False):
    """A random transformers LLaVA (CLIP tower 32 px, patches of 8, 3 layers; Llama 48 wide) and its
    processor, saved at `path`."""
    tok = word_tokenizer("lm")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})  # inside the LM's vocabulary, as in LLaVA
    config = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ).to_dict(),
        text_config=tiny_lm_config(
            "llama",
            len(tok),
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            tie_word_embeddings=tie,
        ).to_dict(),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    reference = randomize_(tf.LlavaForConditionalGeneration(config), seed=seed).eval()
    reference.save_pretrained(path)
    image_processor = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tf.LlavaProcessor(
        image_processor, tok, patch_size=8, vision_feature_select_strategy=strategy, num_additional_image_tokens=1
    ).save_pretrained(path)
    return reference


def pictures(n=2, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-llava")
    return path, make_reference(path)


@pytest.fixture(scope="module")
def loaded(hf_dir):
    path, _ = hf_dir
    return vlbridge.load(path, device="cpu")


def _hf_inputs(path, images, prompts):
    hf_processor = tf.LlavaProcessor.from_pretrained(path)
    return hf_processor(images=images, text=prompts, return_tensors="pt")


def test_recognised_by_its_config_not_its_name(hf_dir, tmp_path):
    path, _ = hf_dir
    assert json.loads((path / "config.json").read_text())["model_type"] == "llava" and is_transformers_llava(path)
    own = tmp_path / "own"  # vlbridge's own llava config.json (saved models: tests/test_interface.py)
    own.mkdir()
    (own / "config.json").write_text(json.dumps({"model_type": "llava", "vision": {}, "lm": {}}))
    assert not is_transformers_llava(own)


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_logits_match(hf_dir, loaded, tmp_path, strategy):
    if strategy == "default":
        (path, reference), (model, processor) = hf_dir, loaded
    else:
        path, reference = tmp_path, make_reference(tmp_path, strategy="full", feature_layer=-1, seed=1)
        model, processor = vlbridge.load(path, device="cpu")
    assert type(model) is Llava and type(processor) is LlavaProcessor
    images = pictures()
    theirs = _hf_inputs(path, images, PROMPTS)
    ours = processor(images=images, text=PROMPTS)
    assert torch.equal(ours["input_ids"], theirs["input_ids"]) and torch.equal(
        ours["pixel_values"], theirs["pixel_values"]
    )
    assert (ours["input_ids"] == model.config.image_token_id).sum(1).tolist() == [model.config.num_image_tokens] * 2
    assert model.config.num_image_tokens == 16 + (strategy == "full")  # (32 / 8)^2 patches, CLS kept by "full"
    with torch.no_grad():
        diff = (model(**ours).logits - reference(**theirs).logits).abs().max().item()
    print(f"LLaVA logits max |diff| ({strategy}): {diff:.3g}")
    assert diff <= TOL


@pytest.mark.parametrize("beams", [1, 3])
def test_generation_matches(hf_dir, loaded, beams):
    (path, reference), (model, processor) = hf_dir, loaded
    images = pictures(1, seed=2)
    inputs = _hf_inputs(path, images, PROMPTS[:1])
    kw = dict(max_new_tokens=8, num_beams=beams, do_sample=False)
    theirs = reference.generate(**inputs, **kw)[:, inputs["input_ids"].shape[1] :]
    ours = model.generate(**processor(images=images, text=PROMPTS[:1]), **kw)
    assert torch.equal(ours, theirs) and len(set(ours[0].tolist())) > 1


def test_a_perturbed_tensor_fails_the_comparison(hf_dir, loaded):
    """The tolerance catches a 1% error in one mapped tensor (so the parity above means something)."""
    (path, reference), (model, processor) = hf_dir, loaded
    images = pictures()
    theirs, ours = _hf_inputs(path, images, PROMPTS), processor(images=images, text=PROMPTS)
    weight = model.projector.linear_1.weight
    original = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1.01)
            diff = (model(**ours).logits - reference(**theirs).logits).abs().max().item()
    finally:
        with torch.no_grad():
            weight.copy_(original)
    assert diff > TOL


def test_export_round_trip_is_exact(hf_dir, loaded, tmp_path):
    (path, reference), (model, processor) = hf_dir, loaded
    model.save_pretrained(tmp_path, processor=processor, format="transformers")
    again = tf.LlavaForConditionalGeneration.from_pretrained(tmp_path).state_dict()
    want = reference.state_dict()
    assert set(again) == set(want) and all(torch.equal(again[k], v) for k, v in want.items())
    assert json.loads((tmp_path / "config.json").read_text())["vision_feature_layer"] == -2  # the tower whole
    # the processor files too: transformers' processor gives the same inputs
    images = pictures()
    assert torch.equal(
        _hf_inputs(tmp_path, images, PROMPTS)["input_ids"], _hf_inputs(path, images, PROMPTS)["input_ids"]
    )
    # and the exported directory loads back into vlbridge
    back, _ = vlbridge.load(tmp_path, device="cpu")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())


def test_an_lm_with_tied_embeddings(tmp_path):
    reference = make_reference(tmp_path, seed=2, tie=True)
    model, processor = vlbridge.load(tmp_path, device="cpu")
    assert model.lm.lm_head.weight is model.lm.get_input_embeddings().weight  # still tied
    images = pictures()
    with torch.no_grad():
        diff = (
            model(**processor(images=images, text=PROMPTS)).logits
            - reference(**_hf_inputs(tmp_path, images, PROMPTS)).logits
        )
    assert diff.abs().max() <= TOL
    model.save_pretrained(tmp_path / "again", format="transformers")
    again = tf.LlavaForConditionalGeneration.from_pretrained(tmp_path / "again").state_dict()
    assert all(torch.equal(again[k], v) for k, v in reference.state_dict().items())


def test_a_vlbridge_model_exports_to_transformers(tiny_configs, tmp_path):
    """A model built by vlbridge (its <image> id past the LM's vocabulary, the tower cut) runs in transformers
    with the same logits (over the LM's own vocabulary) and the same greedy ids."""
    torch.manual_seed(0)
    model, processor = create_llava(
        LlavaConfig(
            vision=VisionConfig(tiny_configs[None].vision.name_or_path),
            lm=LMConfig(tiny_configs["llama"].lm.name_or_path),
        )
    )
    randomize_(model.projector, seed=3)
    model.eval()
    assert model.config.image_token_id >= model.lm.config.vocab_size
    model.save_pretrained(tmp_path, processor=processor, format="transformers")
    reference = tf.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    images = pictures()
    inputs = _hf_inputs(tmp_path, images, ["<image> a photo of"] * 2)
    ours = processor(images=images, text=["a photo of"] * 2)
    assert torch.equal(ours["input_ids"], inputs["input_ids"])
    V = model.lm.config.vocab_size
    with torch.no_grad():
        assert (model(**ours).logits - reference(**inputs).logits[..., :V]).abs().max() <= TOL
    kw = dict(max_new_tokens=6, do_sample=False)
    theirs = reference.generate(**inputs, **kw)[:, inputs["input_ids"].shape[1] :]
    assert torch.equal(model.generate(**ours, **kw), theirs)


def test_unsupported_layouts_are_one_clear_error(hf_dir, tmp_path, tiny_configs):
    path, _ = hf_dir
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "vision_feature_layer": [-2, -1]}))
    with pytest.raises(ValueError, match="several layers"):
        Llava.from_pretrained(tmp_path)
    model, _ = create_llava(
        LlavaConfig(
            vision=VisionConfig(tiny_configs[None].vision.name_or_path),
            lm=LMConfig(tiny_configs["llama"].lm.name_or_path),
            projector="linear",
        )
    )
    with pytest.raises(ValueError, match="two-layer MLP projector"):
        model.save_pretrained(tmp_path / "out", format="transformers")
