"""LLaVA (the MLP projector): shapes, where the visual tokens go, what trains in each stage and where
gradients flow, generation (cached = uncached, a padded batch = its rows one by one), save / load, and a
few steps through the training entry point. Tiny backbones from conftest (CLIP 32 px in patches of 8:
16 patches + CLS; Llama or GPT-2 32 wide)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlbridge import LlavaConfig, LMConfig, VisionConfig, create_llava
from vlbridge.assets import SHAPESWORLD
from vlbridge.core.adapters import LoraConfig
from vlbridge.core.config import ConfigError, from_dict, to_dict
from vlbridge.models.llava import Llava, LlavaProcessor
from vlbridge.testing import randomize_
from vlbridge.training.recipe import TrainConfig, load_recipe
from vlbridge.training.train import train

PROMPTS = ["a photo of", "question what color is the <image> circle ? answer", "how many", "red"]
TARGETS = ["red circle", "blue", "two", "a large yellow square"]


def pictures(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def make(tiny_configs):
    cache = {}

    def _make(lm="llama", **kw):
        key = (lm, tuple(sorted(kw.items())))
        if key not in cache:
            torch.manual_seed(0)
            config = LlavaConfig(
                vision=VisionConfig(tiny_configs[None].vision.name_or_path),
                lm=LMConfig(tiny_configs[lm].lm.name_or_path),
                **kw,
            )
            model, processor = create_llava(config)
            randomize_(model.projector, seed=3)  # visual tokens at a scale where the image shows in the output
            cache[key] = model.eval(), processor
        return cache[key]

    return _make


def test_config_round_trips_and_is_checked():
    config = LlavaConfig(projector="linear", drop_cls=False, num_image_tokens=5)
    assert from_dict(LlavaConfig, json.loads(json.dumps(to_dict(config)))) == config
    with pytest.raises(ConfigError, match="projector must be one of"):
        from_dict(LlavaConfig, {"projector": "mlp3x"})


def test_shapes_and_projectors(make):
    model, processor = make()
    assert model.config.num_image_tokens == 16  # (32 / 8)^2 patches, CLS dropped
    assert [type(m).__name__ for m in model.projector] == ["Linear", "GELU", "Linear"]
    assert model.projector.linear_1.in_features == model.vision.hidden_size == 32
    feats = model.encode_images(processor.images(pictures(2)))
    assert feats.shape == (2, 16, model.lm.config.hidden_size)
    linear, _ = make(projector="linear", drop_cls=False)
    assert linear.config.num_image_tokens == 17 and [type(m).__name__ for m in linear.projector] == ["Linear"]
    batch = make()[1](images=pictures(), text=PROMPTS, targets=TARGETS)
    out = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, model.lm.config.vocab_size) and out.loss.ndim == 0


def test_image_tokens_go_where_the_placeholder_was(make):
    model, processor = make()
    N, image_id = model.config.num_image_tokens, model.config.image_token_id
    batch = processor(images=pictures(), text=PROMPTS, targets=TARGETS)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert (mask[:, 0] == 0).any() and (mask[:, -1] == 1).all()  # padded on the left, for generation
    tok = processor.tokenizer
    for row, prompt in enumerate(PROMPTS):
        real = ids[row][mask[row].bool()].tolist()
        where = [i for i, t in enumerate(real) if t == image_id]
        assert len(where) == N and where == list(range(where[0], where[0] + N))  # one run of N image ids
        text = prompt if "<image>" in prompt else f"<image> {prompt}"  # no placeholder: the image opens it
        before = tok(text.split("<image>")[0]).input_ids if text.split("<image>")[0] else tok("").input_ids
        assert real[: where[0]] == before  # <bos> and the words before <image>
    # labels: the target and eos only; never the prompt, the image or the padding
    assert ((labels != -100) <= (mask == 1) & (ids != image_id)).all()
    assert tok.decode(labels[0][labels[0] != -100]).split() == ["red", "circle", tok.eos_token]
    # the projected tokens are exactly what the LM reads at those positions, in order
    embeds, _, _ = model.lm_inputs(ids, mask, batch["pixel_values"])
    visual = model.encode_images(batch["pixel_values"])
    for row in range(len(ids)):
        assert torch.equal(embeds[row][ids[row] == image_id], visual[row])
    text = ids != image_id
    assert torch.equal(embeds[text], model.lm.get_input_embeddings()(ids[text]))


def test_wrong_inputs_are_one_clear_error(make):
    model, processor = make()
    batch = processor(images=pictures(2), text=PROMPTS[:2])
    ids = batch["input_ids"].clone()
    ids[0, (ids[0] == model.config.image_token_id).nonzero()[0]] = 5  # one image id fewer in row 0
    with pytest.raises(ValueError, match="one image a row"):
        model(ids, pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(batch["input_ids"])
    with pytest.raises(ValueError, match="2 images for 3 prompts"):
        processor(images=pictures(2), text=PROMPTS[:3])
    with pytest.raises(ValueError, match="one image a sample"):
        processor(images=pictures(1), text=["<image> a <image>"])
    with pytest.raises(ValueError, match="takes one image per prompt"):
        processor.prompt_inputs(pictures(1), ["a"], examples=[(pictures(1)[0], "a", "b")])


def test_what_trains_per_stage(make):
    model, processor = make()
    counts = model.freeze_for_stage(1)
    assert counts["projector"]["frozen"] == 0 and counts["lm"]["trainable"] == counts["vision"]["trainable"] == 0
    assert model.frozen_backbones() == [model.vision, model.lm]
    counts = model.freeze_for_stage(2)
    assert counts["lm"]["frozen"] == 0 and counts["vision"]["trainable"] == 0
    assert model.frozen_backbones() == [model.vision]
    model.train()
    assert model.lm.training and not model.vision.training
    model.freeze_for_stage(1)
    model.eval()


@pytest.mark.parametrize("stage", [1, 2])
def test_gradients_only_where_they_should_be(make, stage):
    model, processor = make()
    model.freeze_for_stage(stage)
    try:
        model.zero_grad(set_to_none=True)
        model(**processor(images=pictures(), text=PROMPTS, targets=TARGETS)).loss.backward()
        for name, p in model.named_parameters():
            trains = name.startswith("projector.") or (stage == 2 and name.startswith("lm."))
            assert p.requires_grad == trains, name
            if not trains:
                assert p.grad is None, name
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
        assert model.lm.get_input_embeddings().weight.grad is not None or stage == 1
    finally:
        model.zero_grad(set_to_none=True)
        model.freeze_for_stage(1)


def test_grad_checkpointing_gives_the_same_gradients(make):
    model, processor = make()
    batch = processor(images=pictures(), text=PROMPTS, targets=TARGETS)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        assert model.lm.is_activation_checkpointing == enable
        model.train()
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        grads.append(model.projector.linear_1.weight.grad.clone())
    model.set_grad_checkpointing(False)
    model.zero_grad(set_to_none=True)
    model.eval()
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_lora_in_stage_2_trains_adapters_not_the_lm(tiny_configs):
    torch.manual_seed(0)
    model, _ = create_llava(
        LlavaConfig(
            vision=VisionConfig(tiny_configs[None].vision.name_or_path),
            lm=LMConfig(tiny_configs["llama"].lm.name_or_path),
        )
    )
    model.add_lora(LoraConfig(r=2))
    counts = model.freeze_for_stage(2)
    assert counts["lm"]["trainable"] == 0 and counts["lm.lora"]["trainable"] > 0 and counts["projector"]["frozen"] == 0
    assert model.lm in model.frozen_backbones()
    with pytest.raises(ConfigError, match="LoRA belongs to stage 2"):
        from_dict(TrainConfig, {"model_kind": "llava", "stage": 1, "llava": {}, "lora": {"r": 2}})


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("lm", ["llama", "gpt2"])
def test_cached_and_uncached_generation_agree(make, lm, beams):
    model, processor = make(lm)
    inputs = processor.prompt_inputs(pictures(), PROMPTS)
    kw = dict(max_new_tokens=6, num_beams=beams, no_repeat_ngram_size=1)
    cached = model.generate(**inputs, **kw)
    assert torch.equal(cached, model.generate(**inputs, use_cache=False, **kw))
    assert len({tuple(r) for r in cached.tolist()}) > 1  # the image decides: rows differ


def test_batched_padded_generation_equals_one_by_one(make):
    model, processor = make()
    batch = model.generate(**processor.prompt_inputs(pictures(), PROMPTS), max_new_tokens=6, no_repeat_ngram_size=1)
    for i, image in enumerate(pictures()):
        alone = model.generate(
            **processor.prompt_inputs([image], [PROMPTS[i]]), max_new_tokens=6, no_repeat_ngram_size=1
        )
        assert torch.equal(batch[i, : alone.shape[1]], alone[0])


def test_save_and_load(make, tmp_path):
    model, processor = make()
    model.save_pretrained(tmp_path, processor=processor)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llava"
    loaded, loaded_processor = Llava.from_pretrained(tmp_path).eval(), LlavaProcessor.from_pretrained(tmp_path)
    assert loaded.config.num_image_tokens == 16 and loaded.config.vision.feature_layer == -1  # saved already cut
    inputs = loaded_processor.prompt_inputs(pictures(), PROMPTS)
    assert torch.equal(inputs["input_ids"], processor.prompt_inputs(pictures(), PROMPTS)["input_ids"])
    assert torch.equal(loaded.generate(**inputs, max_new_tokens=5), model.generate(**inputs, max_new_tokens=5))


def test_shipped_recipe_parses():
    cfg = load_recipe("llava_shapesworld")
    assert (cfg.model_kind, cfg.stage, cfg.llava.projector) == ("llava", 1, "mlp2x_gelu")
    assert "{assets}" not in cfg.llava.vision.name_or_path + cfg.llava.lm.name_or_path
    with pytest.raises(ConfigError, match="needs `llava`"):
        from_dict(TrainConfig, {"model_kind": "llava", "stage": 1})
    with pytest.raises(ConfigError, match="trains in stages"):
        from_dict(TrainConfig, {"model_kind": "llava", "stage": 3, "llava": {}})


DATA = {
    "source": "shapesworld",
    "num_samples": 64,
    "group_size": 1,
    "width": 32,
    "height": 32,
    "tasks": ["caption", "vqa"],
}


def _log(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def test_training_lowers_the_loss_then_stage_2_trains_the_lm(tmp_path):
    # the shipped ShapesWorld backbones: an LM that knows the captions, so aligning the image shows in the loss
    llava = {"vision": {"name_or_path": str(SHAPESWORLD / "vision")}, "lm": {"name_or_path": str(SHAPESWORLD / "lm")}}
    common = dict(model_kind="llava", data=DATA, batch_size=8, log_every=1, precision="fp32")
    one = from_dict(
        TrainConfig,
        dict(
            stage=1,
            llava=llava,
            steps=20,
            optim={"lr": 2e-3, "warmup_steps": 5},
            out_dir=str(tmp_path / "one"),
            **common,
        ),
    )
    final = train(one)
    losses = [r["loss"] for r in _log(tmp_path / "one")]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    lm_before = Llava.from_pretrained(final).lm.state_dict()
    # stage 2 from stage 1's model: the projector goes on training, the LM trains too (saved in lm/)
    stage2 = dict(stage=2, init_from=str(final), steps=2, save_every=1, optim={"lr": 1e-3, "warmup_steps": 1})
    two = from_dict(TrainConfig, dict(**stage2, out_dir=str(tmp_path / "two"), **common))
    final2 = train(two)
    assert (tmp_path / "two" / "checkpoints" / "step-000001" / "lm" / "model.safetensors").is_file()
    after = Llava.from_pretrained(final2)
    assert any(not torch.equal(v, after.lm.state_dict()[k]) for k, v in lm_before.items())
