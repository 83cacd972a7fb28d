"""`make demo` end to end in its --quick form (a few steps per run, tiny evaluation sizes) on the
shipped backbones: every part runs, report.json holds each part's results and report.html each
section. The real numbers come from the full demo (README)."""

import json

from experiments import demo


def test_quick_demo_writes_every_part(tmp_path):
    demo.main(["--out", str(tmp_path), "--quick"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert {"test_captions", "test_vqa", "test_retrieval", "compositional_captions", "targets"} <= set(report)
    assert set(report["flamingo"]) == {"flamingo", "no_tanh", "all_images"}
    assert all(set(r["summary"]["vqa"]) == {"0", "1"} for r in report["flamingo"].values())
    assert {"eve", "eve_no_pal", "eve_skip_stage1", "eve_nonsquare", "latency"} <= set(report["eve"])
    assert (
        "language_loss_after_stage2" in report["eve"]["eve"]
        and "stage1" not in report["eve"]["eve_skip_stage1"]["timings_s"]
    )
    assert report["eve"]["latency"]["blip2"]["seconds_per_image"] > 0
    # "before" is the shipped LM, whatever the variant trains first
    assert report["eve"]["eve_skip_stage1"]["language_loss_before"] == report["eve"]["eve"]["language_loss_before"]
    assert set(report["compare"]) == {"blip2", "flamingo", "eve", "llava"}
    assert {"flamingo_binding_8shot", "flamingo_binding_rises", "vqa_accuracy"} <= set(report["targets"])
    page = (tmp_path / "report.html").read_text()
    for anchor in ("targets", "curves", "samples", "attention", "flamingo", "eve", "compare"):
        assert f"id='{anchor}'" in page
    assert (tmp_path / "curve_flamingo_loss.png").exists()


def test_recipe_overrides_reach_the_blip2_stages(tmp_path):
    demo.main(["--out", str(tmp_path), "--quick", "--parts", "blip2", "--stage1", "steps=3", "--stage2", "steps=2"])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["recipes"]["stage1"]["steps"] == 3 and report["recipes"]["stage2"]["steps"] == 2
    assert [r["step"] for r in report["curves"]["stage1"] if "loss" in r][-1] == 3
    assert "flamingo" not in report and "eve" not in report and "compare" not in report
