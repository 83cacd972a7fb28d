"""EVE through the training entry point: the three shipped stage recipes, what each stage trains
(and leaves untouched), the teacher loaded only while PAL has weight, and exact resume of a stage
that trains the LM. Tiny backbones from conftest, ShapesWorld scenes at 32 px."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlbridge.core.config import LMConfig, VisionConfig, to_dict
from vlbridge.models.eve.modeling import EVE, EVEConfig
from vlbridge.training.train import load_recipe, train

DATA = {
    "source": "shapesworld",
    "split": "train",
    "num_samples": 64,
    "group_size": 1,
    "width": 32,
    "height": 32,
    "tasks": ["caption"],
}


@pytest.fixture(scope="module")
def eve_config(tiny_configs) -> EVEConfig:
    return EVEConfig(
        lm=LMConfig(tiny_configs["gpt2"].lm.name_or_path),
        teacher=VisionConfig(tiny_configs[None].vision.name_or_path, feature_layer=-2),
        patch_size=4,
        pel_width=16,
        pel_heads=2,
        max_image_size=32,
        pal_layers=[1, 2],
    )


def _recipe(tmp_path, name, stage, **kw) -> str:
    r = {
        "model_kind": "eve",
        "stage": stage,
        "data": DATA,
        "steps": 4,
        "batch_size": 4,
        "log_every": 1,
        "optim": {"warmup_steps": 1, "lr": 1e-2},
        "precision": "fp32",
        "out_dir": str(tmp_path / name),
    }
    r.update(kw)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(r))
    return str(path)


def _log(out_dir):
    return [json.loads(x) for x in (out_dir / "log.jsonl").read_text().splitlines()]


def _lm_weights(final) -> dict:
    return load_file(str(final / "lm" / "model.safetensors"))


def test_shipped_recipes_parse():
    one = load_recipe("eve_shapesworld_stage1")
    assert (one.model_kind, one.stage, one.eve.kind) == ("eve", 1, "eve") and one.eve.pal_weight > 0
    assert (one.eve.pal, one.eve.pel_attention) == ("official", "official")  # EVE's own designs
    assert "{assets}" not in one.eve.lm.name_or_path + one.eve.teacher.name_or_path
    for stage in (2, 3):
        cfg = load_recipe(f"eve_shapesworld_stage{stage}")
        assert cfg.stage == stage and cfg.init_from.endswith(f"stage{stage - 1}/final")
        assert cfg.optim.lr < one.optim.lr  # the LM trains from stage 2 on: a low learning rate
    assert load_recipe("eve_shapesworld_stage3").eve.pal_weight == 0


def test_recipe_without_a_model_is_refused(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"model_kind": "eve", "stage": 1}))
    with pytest.raises(ValueError, match="eve"):
        load_recipe(path)
    with pytest.raises(ValueError, match="stage 1, 2 or 3"):
        load_recipe(path, ["stage=4", "init_from=x"])


def test_three_stages_train_what_the_paper_says(tmp_path, eve_config):
    lm_before = load_file(str(Path(eve_config.lm.name_or_path) / "model.safetensors"))

    one = train(load_recipe(_recipe(tmp_path, "s1", 1, eve=to_dict(eve_config))))
    rows = _log(tmp_path / "s1")
    assert {"loss_ce", "loss_pal"} <= set(rows[0])
    assert all(r["loss"] == pytest.approx(r["loss_ce"] + r["loss_pal"], rel=1e-5) for r in rows)
    assert rows[-1]["loss_pal"] < rows[0]["loss_pal"]  # the patch embedding aligns to the teacher
    lm_one = _lm_weights(one)
    assert all(torch.equal(lm_one[k], lm_before[k]) for k in lm_before)  # stage 1: the LM is frozen
    pel_one = load_file(str(one / "model.safetensors"))

    two = train(load_recipe(_recipe(tmp_path, "s2", 2, init_from=str(one), eve={"pal_weight": 0.5})))
    rows = _log(tmp_path / "s2")
    assert all(r["loss"] == pytest.approx(r["loss_ce"] + 0.5 * r["loss_pal"], rel=1e-5) for r in rows)
    lm_two, pel_two = _lm_weights(two), load_file(str(two / "model.safetensors"))
    assert any(not torch.equal(lm_two[k], lm_one[k]) for k in lm_one)  # stage 2: the LM trains
    assert any(not torch.equal(pel_two[k], pel_one[k]) for k in pel_one if k.startswith("pel."))

    three = train(
        load_recipe(
            _recipe(tmp_path, "s3", 3, init_from=str(two), eve={"pal_weight": 0.0}, data={**DATA, "tasks": ["vqa"]})
        )
    )
    rows = _log(tmp_path / "s3")
    assert "loss_pal" not in rows[0] and all(r["loss"] == pytest.approx(r["loss_ce"]) for r in rows)
    assert json.loads((three / "config.json").read_text())["pal_weight"] == 0.0
    model = EVE.from_pretrained(three)
    assert model.teacher is None and model.pal is None  # inference never loads the teacher


def test_stage2_resumes_exactly(tmp_path, eve_config):
    one = train(load_recipe(_recipe(tmp_path, "s1", 1, eve=to_dict(eve_config), steps=2)))
    straight = train(load_recipe(_recipe(tmp_path, "straight", 2, init_from=str(one), steps=4)))
    cut = _recipe(tmp_path, "cut", 2, init_from=str(one), steps=4, save_every=2)
    train(load_recipe(cut, ["steps=3"]))  # checkpoint at step 2 (same learning rates so far), then one more
    log = tmp_path / "cut" / "log.jsonl"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:2]))
    resumed = train(load_recipe(cut))
    a, b = _log(tmp_path / "straight"), _log(tmp_path / "cut")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-6)
    for x, y in (
        (_lm_weights(straight), _lm_weights(resumed)),
        (load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))),
    ):
        assert all(torch.allclose(x[k], y[k], atol=1e-6) for k in x)
