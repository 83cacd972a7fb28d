"""EVE: token layout and counts, masks (batch padding, local attention), labels, the PAL loss by
hand, the stage freezing policy, no teacher at inference, generation, Fuyu, save/load, overfitting.

Tiny backbones from conftest (GPT-2 / Llama 32 wide, CLIP tower 32 px with 8 px patches as the
teacher); PEL patches of 4 px, so one cell (2x2 patches) is 8 px and a 32 px image is a 4x4 grid.
"""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlbridge import LMConfig, VisionConfig
from vlbridge.core import backbones
from vlbridge.core.config import from_dict, to_dict
from vlbridge.models.eve.modeling import EVE, EVEConfig, EVEProcessor, create_eve
from vlbridge.models.eve.pal import pal_loss

pytestmark = pytest.mark.filterwarnings("ignore:Passing `no_repeat_ngram_size` with `inputs_embeds`")
PROMPTS = ["a photo of", "<image> question what color is the circle ? answer", "how many", "red"]
TARGETS = ["red circle", "blue", "two", "a large yellow square"]
SIZES = [(32, 32), (32, 16), (12, 30), (8, 8)]  # (width, height) in pixels: square, wide, tall, one cell
VARIED = dict(no_repeat_ngram_size=1)  # tiny LMs repeat one token; this makes every step a new decision


@pytest.fixture(scope="module")
def config(tiny_configs):
    return EVEConfig(
        lm=LMConfig(tiny_configs["gpt2"].lm.name_or_path),
        teacher=VisionConfig(tiny_configs[None].vision.name_or_path, feature_layer=-2),
        patch_size=4,
        pel_width=16,
        pel_heads=2,
        max_image_size=32,
        pal_layers=[1, 2],
    )


@pytest.fixture(scope="module")
def make(config, tiny_configs):
    """make(kind="eve", lm="gpt2", teacher=True, seed=0, **config_fields) -> (model in eval mode, processor)."""

    def _make(kind="eve", lm="gpt2", teacher=True, seed=0, **fields):
        cfg = dataclasses.replace(copy.deepcopy(config), **fields)
        cfg.kind, cfg.lm = kind, LMConfig(tiny_configs[lm].lm.name_or_path)
        cfg.teacher = cfg.teacher if teacher else None
        torch.manual_seed(seed)
        model, proc = create_eve(cfg)
        return model.eval(), proc

    return _make


def pictures(sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def test_config_round_trips_through_json(config):
    for cfg in (config, EVEConfig(kind="fuyu", patch_size=30, max_image_size=1080, image_mean=[0.5, 0.4, 0.3])):
        assert from_dict(EVEConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg
    # the paper's token budgets: 672 px -> 24x24 cells of 28 px -> 601 tokens; HD 1344 px -> 2353
    assert EVEConfig().num_image_tokens(24, 24) == 601 and EVEConfig().num_image_tokens(48, 48) == 2353
    fuyu = EVEConfig(kind="fuyu", patch_size=30, max_image_size=1080)
    assert fuyu.cell_size == 30 and fuyu.num_image_tokens(2, 3) == 8  # no CLS, a newline a row
    with pytest.raises(ValueError, match="unknown keys"):
        from_dict(EVEConfig, {**to_dict(config), "pal_wieght": 2.0})
    with pytest.raises(ValueError, match="kind"):
        EVEConfig(kind="llava")
    with pytest.raises(ValueError, match="multiple"):
        EVEConfig(patch_size=14, max_image_size=600)


@pytest.mark.parametrize("kind", ["eve", "fuyu"])
def test_token_count_is_cls_plus_rows_with_split(make, kind):
    model, proc = make(kind)
    cell = model.config.cell_size
    assert cell == (8 if kind == "eve" else 4)
    batch = proc(images=pictures(), text=PROMPTS)
    # (height, width) rounded up to the cell: 12 px wide -> 16 (EVE, 8 px cells) or 12 (Fuyu, 4 px)
    assert batch["image_sizes"].tolist() == [[32, 32], [16, 32], [32, 16 if kind == "eve" else 12], [8, 8]]
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    grids = (batch["image_sizes"] // cell).tolist()
    expected = [(kind == "eve") + h * (w + 1) for h, w in grids]
    assert (batch["input_ids"] == proc.image_token_id).sum(1).tolist() == expected
    image = model.image_tokens(batch["pixel_values"], batch["image_sizes"])
    hp = wp = 32 // cell
    assert image.embeds.shape == (4, (kind == "eve") + hp * (wp + 1), 32)
    assert image.valid.sum(1).tolist() == expected
    # one contiguous run of image ids: at the placeholder, or first when the prompt has none
    ids = [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"])]
    img, words = proc.image_token_id, proc.tokenizer.convert_tokens_to_ids
    assert ids[0] == [img] * expected[0] + words(["a", "photo", "of"])
    assert ids[1][: expected[1] + 1] == [img] * expected[1] + words(["question"])
    for i, im in enumerate(pictures()):  # alone, each image gives the same count as in the batch
        alone = proc(images=[im], text=[PROMPTS[i]])
        assert (alone["input_ids"] == proc.image_token_id).sum().item() == expected[i]
    train = proc(images=pictures(), text=PROMPTS, targets=TARGETS)
    assert model(**train).logits.shape[:2] == train["input_ids"].shape


def test_large_images_are_scaled_down_keeping_aspect(make):
    _, proc = make()
    out = proc.images(pictures([(64, 32), (100, 10), (7, 3)]))
    assert out["image_sizes"].tolist() == [[16, 32], [8, 32], [8, 8]]


def test_padding_never_influences_valid_tokens(make):
    model, proc = make()
    batch = proc.images(pictures())
    px, sizes = batch["pixel_values"], batch["image_sizes"]
    base = model.image_tokens(px, sizes)
    noisy = px.clone()
    pad = torch.ones_like(px, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes.tolist()):
        pad[i, :, :h, :w] = False
    noisy[pad] = torch.randn(int(pad.sum())) * 100
    again = model.image_tokens(noisy, sizes)
    assert torch.equal(base.valid, again.valid)
    assert torch.equal(base.embeds[base.valid], again.embeds[again.valid])
    assert not torch.equal(base.embeds[~base.valid], again.embeds[~again.valid])  # the padding did change
    for i, (h, w) in enumerate(sizes.tolist()):  # and alone, unpadded, each image gives the same tokens
        alone = model.image_tokens(px[i : i + 1, :, :h, :w])
        torch.testing.assert_close(alone.embeds[0], base.embeds[i][base.valid[i]], rtol=1e-5, atol=1e-6)


def test_local_attention_sees_only_its_own_sub_patches(make):
    model, proc = make()
    px = proc.images(pictures([(32, 32)]))["pixel_values"]  # 8x8 patches, 4x4 cells
    base = model.image_tokens(px).embeds[0]
    for r, c in [(0, 0), (2, 3), (3, 1)]:
        for sub_r, sub_c in [(0, 0), (1, 1)]:
            x = px.clone()
            pr, pc = 2 * r + sub_r, 2 * c + sub_c  # the patch, 4 px a side
            x[..., 4 * pr : 4 * pr + 4, 4 * pc : 4 * pc + 4] += 1.0
            changed = (model.image_tokens(x).embeds[0] != base).any(-1).nonzero().flatten().tolist()
            assert changed == [0, 1 + r * 5 + c]  # CLS and the one cell; other cells and SPL untouched


def test_labels_ignore_image_positions(make):
    model, proc = make()
    batch = proc(images=pictures(), text=PROMPTS, targets=TARGETS)
    slots = batch["input_ids"] == proc.image_token_id
    assert (batch["labels"][slots] == -100).all() and (batch["labels"] != -100).any()
    # the model masks image positions itself, whatever labels it is given
    _, _, labels, model_slots, _ = model.lm_inputs(
        batch["pixel_values"],
        batch["image_sizes"],
        batch["input_ids"],
        batch["attention_mask"],
        batch["input_ids"].clone(),
    )
    assert torch.equal(model_slots, slots) and (labels[slots] == -100).all()
    assert torch.equal(labels[~slots], batch["input_ids"][~slots])
    decoded = proc.tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100])
    assert decoded.split() == ["red", "circle", "</s>"]
    with pytest.raises(ValueError, match="one image a sample"):
        proc(images=pictures()[:1], text=["<image> a <image>"])
    with pytest.raises(ValueError, match="for 0 image"):
        proc(text=["<image> a photo"])
    text_only = proc(text=PROMPTS[:1] + PROMPTS[2:], targets=TARGETS[:1] + TARGETS[2:])  # no image: plain LM
    assert not (text_only["input_ids"] == proc.image_token_id).any() and torch.isfinite(model(**text_only).loss)
    short = dict(batch, input_ids=batch["input_ids"][:, 1:], attention_mask=batch["attention_mask"][:, 1:])
    short.pop("labels")
    with pytest.raises(ValueError, match="image tokens per sample"):
        model(**short)


def test_pal_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 3, 8, generator=g)
    full = torch.tensor([[3, 3], [3, 3]])
    assert pal_loss(t.clone(), t, full).abs() < 1e-6  # identical features
    assert pal_loss(2 * t, t, full).abs() < 1e-6  # cosine: scale-free
    s = t.clone()
    s[0, 1, 1] = -t[0, 1, 1]  # one opposite cell of 18: 2 / 18
    torch.testing.assert_close(pal_loss(s, t, full), torch.tensor(2 / 18))
    # masking: image 1 is one row of a padded 3-row grid; its padded cells never count, and the
    # teacher's 3 rows are pooled to the student's one. Mean over the 9 + 3 valid cells.
    s[1, 0] = t[1].mean(0)
    for garbage in (torch.zeros(2, 3, 8), torch.randn(2, 3, 8, generator=g) * 100):
        s[1, 1:] = garbage
        torch.testing.assert_close(pal_loss(s, t, torch.tensor([[3, 3], [1, 3]])), torch.tensor(2 / 12))
    # grid matching: a teacher finer than the student (4x6 vs 2x3) is average-pooled onto it ...
    fine = torch.randn(1, 4, 6, 8, generator=g)
    coarse = fine.view(1, 2, 2, 3, 2, 8).mean((2, 4))  # (1, 2, 3, 8): the 2x2 block means
    padded = torch.full((1, 3, 4, 8), 1e3)
    padded[:, :2, :3] = coarse
    assert pal_loss(padded, fine, torch.tensor([[2, 3]])).abs() < 1e-6
    # ... and a student finer than the teacher (EVE-HD) is pooled onto the teacher's grid
    assert pal_loss(fine, coarse, torch.tensor([[4, 6]])).abs() < 1e-6
    assert pal_loss(fine, -coarse, torch.tensor([[4, 6]])).item() == pytest.approx(2.0)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_freezing_policy(make, stage):
    model, proc = make()
    counts = model.freeze_for_stage(stage)
    assert counts["teacher"]["trainable"] == 0 and counts["teacher"]["frozen"] > 0
    assert counts["pel"]["frozen"] == counts["pal"]["frozen"] == 0
    assert (counts["lm"]["trainable"] > 0) == (stage >= 2)
    assert model.parameter_counts()["trainable"] == sum(c["trainable"] for c in counts.values())
    model.train()
    assert not model.teacher.training and model.lm.training == (stage >= 2) and model.pel.training
    before = _snapshot(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # all of them: the frozen ones get no gradient
    out = model(**proc(images=pictures(), text=PROMPTS, targets=TARGETS))
    assert out.loss_pal is not None and torch.isfinite(out.loss)
    out.loss.backward()
    opt.step()
    trains = ("pel.", "pal.") + (("lm.",) if stage >= 2 else ())
    for name, p in model.named_parameters():
        if name.startswith(trains):
            assert p.requires_grad, name
        else:
            assert not p.requires_grad and p.grad is None and torch.equal(p, before[name]), name
    for group in trains:  # every trained part moved (the LM's tied input embeddings included)
        assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n.startswith(group)), group
    with pytest.raises(ValueError):
        model.freeze_for_stage(4)


def test_pal_only_in_training_with_a_teacher(make):
    model, proc = make()
    batch = proc(images=pictures(), text=PROMPTS, targets=TARGETS)
    evaluated = model.eval()(**batch)
    assert evaluated.loss_pal is None and torch.equal(evaluated.loss, evaluated.loss_ce)
    trained = model.train()(**batch)  # the frozen LM has no dropout: same CE
    torch.testing.assert_close(trained.loss_ce, evaluated.loss_ce)
    torch.testing.assert_close(trained.loss, trained.loss_ce + model.config.pal_weight * trained.loss_pal)
    assert 0 < trained.loss_pal < 2


def test_teacher_absent_at_inference(make, tmp_path, monkeypatch):
    model, proc = make()
    model.save_pretrained(tmp_path, processor=proc)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "model.safetensors", "lm"}
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["teacher"]["name_or_path"] == model.config.teacher.name_or_path  # named, not copied
    with monkeypatch.context() as m:
        m.setattr(backbones, "load_vision", lambda *a, **k: pytest.fail("the teacher was loaded"))
        loaded = EVE.from_pretrained(tmp_path).eval()
    assert loaded.teacher is None and loaded.pal is None
    assert not any(n.startswith(("teacher.", "pal.")) for n in loaded.state_dict())
    assert not any("CLIP" in type(m).__name__ for m in loaded.modules())
    teacher_size = sum(p.numel() for p in model.teacher.parameters()) + sum(p.numel() for p in model.pal.parameters())
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters()) - teacher_size
    inputs = EVEProcessor.from_pretrained(tmp_path)(images=pictures(), text=PROMPTS)
    assert torch.equal(loaded.generate(**inputs, max_new_tokens=5), model.generate(**inputs, max_new_tokens=5))
    # to go on training, the teacher comes back from where the config names it, with the saved PAL
    again = EVE.from_pretrained(tmp_path, load_teacher=True)
    assert again.teacher is not None
    assert all(torch.equal(v, model.pal.state_dict()[k]) for k, v in again.pal.state_dict().items())


@pytest.fixture(scope="module")
def generator(make):
    cache = {}

    def get(lm):
        if lm not in cache:
            cache[lm] = make(lm=lm, teacher=False, seed=3)
        return cache[lm]

    return get


@pytest.mark.parametrize("beams", [1, 3])
@pytest.mark.parametrize("lm", ["gpt2", "llama"])
def test_cached_and_uncached_generation_agree(generator, lm, beams):
    model, proc = generator(lm)
    inputs = proc(images=pictures(), text=PROMPTS)
    kw = dict(max_new_tokens=8, num_beams=beams, **VARIED)
    cached = model.generate(**inputs, **kw)
    assert torch.equal(cached, model.generate(**inputs, use_cache=False, **kw))
    assert cached.shape[0] == 4 and len({tuple(r) for r in cached.tolist()}) > 1


@pytest.mark.parametrize("lm", ["gpt2", "llama"])
def test_batched_padded_generation_equals_one_by_one(generator, lm):
    model, proc = generator(lm)
    inputs = proc(images=pictures(), text=PROMPTS)
    assert (inputs["attention_mask"][:, 0] == 0).any()  # left padding, and images of four sizes
    batch = model.generate(**inputs, max_new_tokens=8, **VARIED)
    for i, im in enumerate(pictures()):
        one = proc(images=[im], text=[PROMPTS[i]])
        assert one["attention_mask"].all() and one["pixel_values"].shape[-2:] == tuple(one["image_sizes"][0])
        alone = model.generate(**one, max_new_tokens=8, **VARIED)[0]
        assert torch.equal(batch[i, : len(alone)], alone), (i, batch[i], alone)


def test_fuyu_variant(make):
    model, proc = make("fuyu")
    assert not hasattr(model.pel, "cls") and model.pel.proj.in_features == 3 * 4 * 4
    batch = proc(images=pictures(), text=PROMPTS, targets=TARGETS)
    image = model.image_tokens(batch["pixel_values"], batch["image_sizes"])
    assert image.embeds.shape == (4, 8 * 9, 32)  # no CLS
    out = model.train()(**batch)
    assert out.loss_pal is not None and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.pel.newline.grad is not None and model.pal.projs[0].weight.grad is not None
    assert model.eval().generate(**proc(images=pictures(), text=PROMPTS), max_new_tokens=3).shape[0] == 4


def test_save_load_round_trip_is_exact(make, tmp_path):
    model, proc = make(seed=1)
    model.freeze_for_stage(2)  # a stage-2 model: its LM is trained, so it must be saved
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()(**proc(images=pictures(), text=PROMPTS, targets=TARGETS)).loss.backward()
    opt.step()
    model.eval().save_pretrained(tmp_path, processor=proc)
    loaded = EVE.from_pretrained(tmp_path, load_teacher=True).eval()
    expected = copy.deepcopy(model.config)
    expected.lm.name_or_path = str(tmp_path / "lm")  # the saved LM, trained in stage 2
    assert loaded.config == expected
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    proc2 = EVEProcessor.from_pretrained(tmp_path)
    batch = proc(images=pictures(), text=PROMPTS, targets=TARGETS)
    batch2 = proc2(images=pictures(), text=PROMPTS, targets=TARGETS)
    assert batch.keys() == batch2.keys() and all(torch.equal(batch[k], batch2[k]) for k in batch)
    x, y = model(**batch), loaded(**batch)
    assert torch.equal(x.logits, y.logits) and torch.equal(x.loss, y.loss)


@pytest.mark.parametrize("stage", [1, 2])
def test_overfits_one_batch(make, stage):
    """Stage 1 (LM frozen: only the image tokens can lower the loss) and stage 2 (all but the teacher)."""
    model, proc = make(seed=2)
    model.freeze_for_stage(stage)
    batch = proc(images=pictures(), text=["a photo of"] * 4, targets=TARGETS)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2 if stage == 1 else 1e-2)
    model.train()
    losses = []
    for _ in range(30):
        out = model(**batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append((out.loss.item(), out.loss_ce.item(), out.loss_pal.item()))
    print(losses)
    (first, first_ce, first_pal), (last, last_ce, last_pal) = losses[0], losses[-1]
    assert last < 0.6 * first and last_pal < 0.7 * first_pal
    assert last_ce < (0.7 if stage == 1 else 0.1) * first_ce


def test_earlier_designs_as_options(make, tmp_path):
    """pel_attention="mha" and pal="vlbridge" (the designs before the official ones became the default)
    train, save and load; a directory saved before the options existed loads with them."""
    model, proc = make(seed=4, pel_attention="mha", pal="vlbridge")
    assert isinstance(model.pel.local_attn.attn, torch.nn.MultiheadAttention) and hasattr(model.pal, "q")
    batch = proc(images=pictures(), text=PROMPTS, targets=TARGETS)
    out = model.train()(**batch)
    assert 0 < out.loss_pal < 2
    out.loss.backward()
    assert model.pal.q.weight.grad is not None and model.pel.local_attn.attn.in_proj_weight.grad is not None
    model.eval().save_pretrained(tmp_path, processor=proc)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["pel_attention"], saved["pal"]) == ("mha", "vlbridge")
    for key in ("pel_attention", "pal", "pal_heads"):  # as written before these options existed
        del saved[key]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = EVE.from_pretrained(tmp_path, load_teacher=True).eval()
    assert (loaded.config.pel_attention, loaded.config.pal) == ("mha", "vlbridge")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the default: EVE's own attention and PAL
    official, _ = make(seed=4)
    assert not hasattr(official.pel.local_attn, "attn") and official.pel.local_attn.q.bias is None
    assert type(official.pal).__name__ == "OfficialAligner"
