"""Instruction tuning on ShapesWorld conversations: does a BLIP-2 that trains on multi-turn Q&A use the
earlier turns, and what does it cost its single-turn VQA?

Two stage-2 runs from one stage-1 checkpoint, same steps and batch:
    instruct     the shipped `blip2_shapesworld_instruct` recipe: captions, VQA and one turn of a
                 conversation per sample (earlier turns in the prompt); the Q-Former reads the whole
                 prompt, as InstructBLIP's does
    single_turn  the same recipe trained on captions and VQA only (what stage 2 trains today)
Each is evaluated on held-out conversations, every turn answered after its history (multi-turn) and
alone (single-turn; a follow-up then names its object only as "the object"), and on the test split's
VQA. Writes <out>/instruct.json.

    python -m experiments.instruct_study --out instruct-output --stage1 demo-output/stage1/final [--steps N]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from vlbridge.data import shapesworld as sw
from vlbridge.data.conversations import shapesworld_conversations
from vlbridge.evaluation import evaluate as ev
from vlbridge.models.blip2 import Blip2, Blip2Processor
from vlbridge.training.train import load_recipe, train

log = logging.getLogger("experiments.instruct_study")

VARIANTS = {"instruct": [], "single_turn": ['data.tasks=["caption","vqa"]']}
SIZES = {"full": dict(conversations=150, vqa_scenes=150), "quick": dict(conversations=6, vqa_scenes=4)}


def run(out: Path, stage1: str, steps: int | None = None, quick: bool = False) -> dict:
    size = SIZES["quick" if quick else "full"]
    quick_overrides = ["data.num_samples=64", "batch_size=16", "save_every=0"] if quick else []
    report: dict = {"stage1": str(stage1), "variants": {}}
    for name, overrides in VARIANTS.items():
        t = time.time()
        cfg = load_recipe(
            "blip2_shapesworld_instruct",
            [f"out_dir={out / name}", f"init_from={stage1}", *overrides, *quick_overrides]
            + ([f"steps={steps}"] if steps else []),
        )
        world = sw.ShapesWorldConfig(width=cfg.data.width, height=cfg.data.height)
        final = train(cfg)
        train_s = time.time() - t
        model, processor = Blip2.from_pretrained(final), Blip2Processor.from_pretrained(final)
        convs = shapesworld_conversations("test", size["conversations"], world, turns=cfg.data.turns)
        scenes = ev.split_scenes("test", size["vqa_scenes"], world)
        report["variants"][name] = {
            "tasks": cfg.data.tasks,
            "steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "conversation": ev.shapesworld_conversation(model, processor, convs, world),
            "vqa": ev.shapesworld_vqa(model, processor, scenes, world),
            "train_seconds": train_s,
        }
    (out / "instruct.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def table(report: dict) -> str:
    """Follow-up and first-turn accuracy with and without the history, and test VQA, per variant."""
    rows = ["variant       follow-up (history / alone)  first turn  test VQA"]
    for name, v in report["variants"].items():
        c = v["conversation"]
        rows.append(
            f"{name:<13} {c['multi_turn']['follow_up']:.3f} / {c['single_turn']['follow_up']:.3f}"
            f"{'':15}{c['multi_turn']['first_turn']:.3f}       {v['vqa']['accuracy']:.3f}"
        )
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("instruct-output"))
    p.add_argument(
        "--stage1", required=True, help="a BLIP-2 stage-1 checkpoint (make demo writes demo-output/stage1/final)"
    )
    p.add_argument("--steps", type=int, default=None, help="training steps of each run (default: the recipe's)")
    p.add_argument("--quick", action="store_true", help="a few steps only (a smoke test of the pipeline)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    report = run(args.out, args.stage1, 4 if args.quick else args.steps, args.quick)
    print(table(report))


if __name__ == "__main__":
    main()
