"""experiments.compare_study end to end in its --quick form: every shipped recipe trained for two steps on
tiny data, then the four designs measured the same way through the one interface. The numbers mean
nothing here; the test checks that every design gets every measure, that the frozen LMs come out
unchanged, that the training budgets follow the stages back through init_from, and the picture."""

import json

import pytest

from experiments import compare_study
from vlbridge.training.recipe import RECIPES
from vlbridge.training.train import load_recipe, train

TINY = ["steps=2", "data.num_samples=16", "batch_size=4", "save_every=0", "log_every=1"]
# few-shot numbers are passed in, in flamingo_study.json's form (the study itself is not rerun)
FEWSHOT = {
    "flamingo": {
        "summary": {
            "vqa": {"0": 0.1, "4": 0.5},
            "caption_random": {
                k: {"color": c, "shape": c, "size": c, "count": c, "exact": 0.0} for k, c in (("0", 0.2), ("4", 0.6))
            },
            "incontext": {"0": {"accuracy": 0.25}, "4": {"accuracy": 0.75}},
            "binding": {"0": {"accuracy": 0.125}, "4": {"accuracy": 0.5}},
        }
    }
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """design -> final model of each shipped recipe, two steps each (BLIP-2 and EVE through all stages)."""
    runs = tmp_path_factory.mktemp("runs")
    stage1 = train(load_recipe("blip2_shapesworld_stage1", [f"out_dir={runs / 'stage1'}", *TINY]))
    stage2 = train(
        load_recipe("blip2_shapesworld_stage2", [f"out_dir={runs / 'stage2'}", f"init_from={stage1}", *TINY])
    )
    datasets = json.loads((RECIPES / "flamingo_shapesworld.json").read_text())["datasets"]
    datasets = [{**d, "batch_size": 2, "num_samples": 16} for d in datasets]
    flamingo = train(
        load_recipe(
            "flamingo_shapesworld",
            [f"out_dir={runs / 'flamingo'}", "steps=2", "save_every=0", f"datasets={json.dumps(datasets)}"],
        )
    )
    eve = None
    for stage in (1, 2, 3):
        init = [f"init_from={eve}"] if eve else []
        eve = train(
            load_recipe(f"eve_shapesworld_stage{stage}", [f"out_dir={runs / 'eve' / f'stage{stage}'}", *init, *TINY])
        )
    return {"stage1": stage1, "blip2": stage2, "flamingo": flamingo, "eve": eve}


@pytest.fixture(scope="module")
def study(trained, tmp_path_factory) -> tuple[dict, object]:
    """The study's --quick command line on the trained models: (compare_study.json, its folder)."""
    tmp_path = tmp_path_factory.mktemp("study")
    (tmp_path / "flamingo_study.json").write_text(json.dumps(FEWSHOT))
    out = tmp_path / "compare"
    compare_study.main(
        [
            "--out",
            str(out),
            "--quick",
            "--models",
            *(f"{name}={trained[name]}" for name in ("blip2", "flamingo", "eve")),  # llava: trained by the study
            "--retrieval",
            f"blip2={trained['stage1']}",
            "--fewshot",
            f"flamingo={tmp_path / 'flamingo_study.json'}",
        ]
    )
    return json.loads((out / "compare_study.json").read_text()), out


def test_quick_study_measures_every_design_the_same_way(study, tmp_path):
    report, out = study
    assert list(report) == ["blip2", "flamingo", "eve", "llava"]
    for name, r in report.items():
        for split in ("test", "compositional"):
            assert {"color", "shape", "count"} <= set(r[split]["captions"]["metrics"]), name
            assert 0 <= r[split]["vqa"]["accuracy"] <= 1, name
        assert 0 < r["parameters"]["trainable"] <= r["parameters"]["total"], name
        assert r["tokens_per_image"]["in_sequence"] >= 1, name
        assert r["latency"]["seconds_per_image"] > 0 and r["latency"]["new_tokens"] == 20, name
        assert set(r["language_loss"]["after"]) == {"caption", "qa"}, name
        assert r["budget"]["samples"] > 0 and r["budget"]["train_seconds"] > 0, name
    # retrieval: only BLIP-2, through its stage-1 model; few-shot: only Flamingo, as passed in
    assert [n for n, r in report.items() if r["test"]["retrieval"]] == ["blip2"]
    assert report["blip2"]["test"]["retrieval"]["itc_itm"]["i2t_r1"] is not None
    assert [n for n, r in report.items() if r["fewshot"]] == ["flamingo"]
    assert report["flamingo"]["fewshot"]["shots"]["4"] == {
        "vqa": 0.5,
        "caption_color": 0.6,
        "caption_shape": 0.6,
        "caption_count": 0.6,
        "incontext": 0.75,
        "binding": 0.5,
    }
    # the frozen LMs give exactly the shipped LM's text-only loss; EVE's, trained in stages 2 and 3, does not
    for name in ("blip2", "flamingo", "llava"):
        lang = report[name]["language_loss"]
        assert lang["after"] == lang["before"] and lang["unchanged"] and lang["lm_max_weight_change"] == 0, name
    assert (
        not report["eve"]["language_loss"]["unchanged"] and report["eve"]["language_loss"]["lm_max_weight_change"] > 0
    )
    # tokens per image: BLIP-2's queries, LLaVA's patches in the sequence; Flamingo one <image> + its latents
    assert report["blip2"]["tokens_per_image"]["in_sequence"] == 9  # the recipe's num_query_tokens
    assert report["flamingo"]["tokens_per_image"]["in_sequence"] == 1
    assert report["flamingo"]["tokens_per_image"]["cross_attended"] == 16  # the recipe's num_latents
    assert all(report[n]["tokens_per_image"]["cross_attended"] == 0 for n in ("blip2", "eve", "llava"))
    # budgets follow init_from: BLIP-2 two runs, EVE three, each 2 steps of 4; LLaVA's quick recipe 3 of 8
    assert [len(report[n]["budget"]["runs"]) for n in report] == [2, 1, 3, 1]
    assert report["eve"]["budget"]["samples"] == 24 and report["llava"]["budget"]["samples"] == 24
    assert report["flamingo"]["budget"]["samples"] == 12  # three datasets of 2 a step
    # trainable: EVE's LM trains in stages 2 and 3, so everything it has; LLaVA's stage 1 only the projector
    assert report["eve"]["parameters"]["trainable"] == report["eve"]["parameters"]["total"]
    assert report["llava"]["parameters"]["trainable"] == report["llava"]["parameters"]["parts"]["projector"]
    assert (out / compare_study.PLOT).stat().st_size > 0

    page = compare_study.html_section(report, tmp_path)
    assert "id='compare'" in page and page.count("<tr>") == 5 and (tmp_path / compare_study.PLOT).exists()


def test_fewshot_and_retrieval_must_name_a_model(tmp_path):
    with pytest.raises(ValueError, match="not among the models"):
        compare_study.run(tmp_path, {"blip2": "x"}, fewshot=FEWSHOT)


def test_write_results_shows_the_designs_side_by_side(study):
    from experiments import write_results as wr

    report = {"compare": study[0]}
    page = wr.render(report, {})
    assert "## Designs side by side" in page
    for name in ("blip2", "flamingo", "eve", "llava"):
        assert page.count(f"| `{name}` ({name}) |") >= 2, name  # a row in the quality and the cost tables
    assert "(0-shot)" in page and "| 1 + 16 |" in page and "4-shot 0.500" in page
    llava = study[0]["llava"]["test"]
    row = next(line for line in wr.headline(report).splitlines() if line.startswith("| LLaVA"))
    assert wr.slash(llava["captions"]["metrics"], ("color", "shape", "count")) in row
    assert wr.fmt(llava["vqa"]["accuracy"]) in row
    assert "LLaVA" not in wr.headline({"compare": {k: v for k, v in study[0].items() if k != "llava"}})


def test_train_seconds_adds_up_resumed_runs():
    rows = [{"step": 1, "elapsed_s": 1.0}, {"step": 2, "elapsed_s": 3.0, "probe": 0.5}, {"step": 2, "elapsed_s": 0.5}]
    assert compare_study.train_seconds(rows) == 3.5 and compare_study.train_seconds([{"step": 1}]) is None
