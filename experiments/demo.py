"""make demo: the three designs trained and evaluated on ShapesWorld with the shipped tiny backbones, on a CPU.

blip2     stage 1 (ITC + ITM + ITG) then stage 2 (soft prompt into the frozen LM), both from the shipped
          recipes; evaluation on the held-out test split and the compositional split (colour-shape
          pairs never seen in training)
flamingo  the shipped recipe and the tanh-gating / immediate-vs-all-images ablations, 0/1/4/8-shot
          (experiments.flamingo_study)
eve       the three-stage recipe and its ablations against BLIP-2, language ability, latency
          (experiments.eve_study)
compare   BLIP-2, Flamingo, EVE and the LLaVA-style MLP projector (trained here) measured the same way
          (experiments.compare_study)
Writes <out>/report.json (metrics, decode settings, timings, curves) and <out>/report.html (samples,
retrieval examples, training curves, query attention maps, the Flamingo and EVE tables).

    python -m experiments.demo --out demo-output [--parts blip2,flamingo,eve,compare] [--quick]
                            [--stage1 KEY=VALUE ...] [--stage2 KEY=VALUE ...]
--stage1 / --stage2 override the BLIP-2 recipes as `vlbridge train` does, e.g. `--stage1 steps=600` or
`--stage1 model.vision.name_or_path=DIR` (stage 2 and the evaluation take stage 1's encoder).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import time
from pathlib import Path

import torch

from experiments import compare_study, eve_study, flamingo_study
from experiments.report import choose, write_html
from vlbridge.assets import SHAPESWORLD
from vlbridge.data import shapesworld as sw
from vlbridge.evaluation import evaluate as ev
from vlbridge.models.blip2.modeling import Blip2
from vlbridge.models.blip2.processing import Blip2Processor
from vlbridge.training.train import load_recipe, train

log = logging.getLogger("experiments.demo")

# Evaluation sizes (full / --quick).
SIZES = {
    "full": dict(retrieval=1000, captions=500, vqa_scenes=300, curve=200, curve_every=100),
    "quick": dict(retrieval=32, captions=16, vqa_scenes=8, curve=16, curve_every=2),
}
TARGETS = {
    "caption_color": 0.90,
    "caption_shape": 0.90,
    "caption_count": 0.95,
    "vqa_accuracy": 0.85,
    "itc_i2t_r1": 0.80,
}


PARTS = ("blip2", "flamingo", "eve", "compare")


def run(out: Path, quick: bool = False, overrides: tuple[list[str], list[str]] = ([], []), parts=PARTS) -> dict:
    """BLIP-2 always runs (the other parts compare against it); flamingo, eve and compare when in `parts`
    (compare takes the Flamingo and EVE models of this run when they are trained)."""
    size = SIZES["quick" if quick else "full"]
    t_start = time.time()
    report: dict = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "timings_s": {},
    }

    # ---- stage 1
    cfg1 = load_recipe("blip2_shapesworld_stage1", [f"out_dir={out / 'stage1'}", *overrides[0]])
    world = sw.ShapesWorldConfig(width=cfg1.data.width, height=cfg1.data.height)
    curve_scenes = ev.retrieval_scenes("test", size["curve"], world)

    def stage1_probe(step, model, processor, elapsed):
        r = ev.shapesworld_retrieval(model, processor, curve_scenes, world, k=4)
        return {"probe_itc_i2t_r1": r["itc"]["i2t_r1"], "probe_n": len(curve_scenes)}

    t = time.time()
    stage1_dir = train(cfg1, stage1_probe, size["curve_every"])
    report["timings_s"]["stage1_train"] = time.time() - t

    # ---- stage 2
    cfg2 = load_recipe(
        "blip2_shapesworld_stage2", [f"out_dir={out / 'stage2'}", f"init_from={stage1_dir}", *overrides[1]]
    )
    curve_caps = curve_scenes[: max(8, size["curve"] // 4)]

    def stage2_probe(step, model, processor, elapsed):
        r = ev.shapesworld_captions(model, processor, curve_caps, world)
        return {f"probe_caption_{k}": v for k, v in r["metrics"].items()} | {"probe_n": len(curve_caps)}

    t = time.time()
    stage2_dir = train(cfg2, stage2_probe, size["curve_every"])
    report["timings_s"]["stage2_train"] = time.time() - t

    # ---- evaluation
    t = time.time()
    m1, p1 = Blip2.from_pretrained(stage1_dir), Blip2Processor.from_pretrained(stage1_dir)
    m2, p2 = Blip2.from_pretrained(stage2_dir), Blip2Processor.from_pretrained(stage2_dir)
    for split in ("test", "compositional"):
        candidates = ev.retrieval_scenes(split, size["retrieval"], world)  # pairwise distinct captions
        report[f"{split}_retrieval"] = ev.shapesworld_retrieval(m1, p1, candidates, world)
        scenes = ev.split_scenes(split, max(size["captions"], size["vqa_scenes"]), world)
        report[f"{split}_captions"] = ev.shapesworld_captions(m2, p2, scenes[: size["captions"]], world)
        report[f"{split}_vqa"] = ev.shapesworld_vqa(m2, p2, scenes[: size["vqa_scenes"]], world)
    report["timings_s"]["evaluation"] = time.time() - t
    report["curves"] = {"stage1": _read_log(out / "stage1"), "stage2": _read_log(out / "stage2")}
    report["recipes"] = {
        "stage1": json.loads((out / "stage1" / "recipe.json").read_text()),
        "stage2": json.loads((out / "stage2" / "recipe.json").read_text()),
    }
    # What the backbones can do at best (measured by scripts/pretrain_backbones.py): the LM given the
    # true caption as text, linear probes of the vision features, and the BERT the Q-Former starts from.
    report["backbone_ceilings"] = {
        name: json.loads((SHAPESWORLD / f"{name}.json").read_text())
        for name in ("lm_ceiling", "vision_probe", "bert_probe")
    }
    report["targets"] = _targets(report)
    report["timings_s"]["blip2_total"] = time.time() - t_start
    sections = []
    if "flamingo" in parts:
        t = time.time()
        report["flamingo"] = flamingo_study.run(out / "flamingo", list(flamingo_study.VARIANTS), quick=quick)
        report["timings_s"]["flamingo"] = time.time() - t
        report["targets"].update(report["flamingo"].get("flamingo", {}).get("targets", {}))  # the shipped recipe's
        sections.append(flamingo_study.html_section(report["flamingo"], out))
    if "eve" in parts:
        t = time.time()
        report["eve"] = eve_study.run(out / "eve", list(eve_study.VARIANTS), blip2=str(stage2_dir), quick=quick)
        report["timings_s"]["eve"] = time.time() - t
        sections.append(
            eve_study.html_section(report["eve"], {"captions": report["test_captions"], "vqa": report["test_vqa"]})
        )
    if "compare" in parts:
        t = time.time()
        models = {"blip2": stage2_dir}
        if "flamingo" in report:
            models["flamingo"] = report["flamingo"]["flamingo"]["final"]
        if "eve" in report:
            models["eve"] = report["eve"]["eve"]["final"]
        models["llava"] = compare_study.train_llava(out / "llava", quick)
        fewshot = {"flamingo": report["flamingo"]["flamingo"]["summary"]} if "flamingo" in report else None
        report["compare"] = compare_study.run(
            out / "compare", models, retrieval={"blip2": stage1_dir}, fewshot=fewshot, quick=quick
        )
        report["timings_s"]["compare"] = time.time() - t
        sections.append(compare_study.html_section(report["compare"], out))
    report["timings_s"]["total"] = time.time() - t_start
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    write_html(report, out, m1, p1, m2, p2, world, sections)
    return report


def _read_log(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]


def _targets(report: dict) -> dict:
    """Each issue target next to what was reached on the held-out test split."""
    caps, vqa, ret = report["test_captions"]["metrics"], report["test_vqa"], report["test_retrieval"]
    reached = {
        "caption_color": caps["color"],
        "caption_shape": caps["shape"],
        "caption_count": caps["count"],
        "vqa_accuracy": vqa["accuracy"],
        "itc_i2t_r1": ret["itc"]["i2t_r1"],
    }
    rows = {k: {"target": TARGETS[k], "reached": v, "met": v >= TARGETS[k]} for k, v in reached.items()}
    rows["itm_improves_r1"] = {
        "itc": ret["itc"]["i2t_r1"],
        "itc_itm": ret["itc_itm"]["i2t_r1"],
        "met": ret["itc_itm"]["i2t_r1"] > ret["itc"]["i2t_r1"],
    }
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo-output")
    p.add_argument("--quick", action="store_true", help="a few steps only (a smoke test of the pipeline)")
    p.add_argument("--parts", default=",".join(PARTS), help="blip2 always runs; add flamingo, eve and/or compare")
    p.add_argument("--stage1", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the stage-1 recipe")
    p.add_argument("--stage2", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the stage-2 recipe")
    args = p.parse_args(argv)
    parts = choose(args.parts, PARTS, "parts")
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("vlbridge").setLevel(logging.INFO)
    out = Path(args.out)
    for stage in (
        "stage1",
        "stage2",
        "flamingo",
        "eve",
        "llava",
        "compare",
    ):  # a demo always starts from scratch (no resume, fresh logs)
        shutil.rmtree(out / stage, ignore_errors=True)
    quick = ["steps=4", "data.num_samples=64", "batch_size=16", "save_every=0"] if args.quick else []
    report = run(out, args.quick, (quick + args.stage1, quick + args.stage2), parts)
    print(json.dumps({"targets": report["targets"], "timings_s": report["timings_s"]}, indent=2))
    print(f"wrote {out / 'report.json'}")


if __name__ == "__main__":
    main()
