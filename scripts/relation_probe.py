"""Can a BLIP-2 bridge learn the yes/no relation questions while its LM stays frozen?

"is the red circle above the blue star?" is an XOR (the answer flips with the order the objects are named
in and with the relation word) that the shipped LM answers at chance even from the true scene
(README, "What limits VQA"), and a stage-2 model answers at chance too. This continues a stage-2 model
on those questions alone (train split, AdamW at a constant learning rate, the frozen encoder and LM as
in stage 2) and scores them on test scenes every `--every` steps: accuracy, and how often it says "yes"
(always "yes" scores 0.5). A bridge whose Q-Former reads the question (qformer_question) can carry the
answer to the LM; one that does not has to serve every possible question with the same queries.

    PYTHONPATH=src .venv/bin/python scripts/relation_probe.py STAGE2_DIR [--steps 1000] [--lr 5e-4] [--out J]

Measured on this project's 2-core machine: see README "What limits VQA".
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from vlbridge import Blip2, Blip2Processor
from vlbridge.data import shapesworld as sw
from vlbridge.evaluation import evaluate as ev


def yes_no_items(split: str, n: int, world) -> list[tuple]:
    return [(s, qa) for s in sw.make_split(split, n, world) for qa in s.qa if qa.yes_no_relation]


def probe(
    model,
    processor,
    world,
    steps: int,
    lr: float,
    every: int,
    batch_size: int = 64,
    n_train: int = 6000,
    n_test: int = 300,
    seed: int = 0,
) -> list[dict]:
    """Train the bridge on yes/no relation questions; returns the test curve [{step, loss, accuracy, said_yes}]."""
    torch.manual_seed(seed)
    train_items = yes_no_items("train", n_train, world)
    test_scenes = sw.make_split("test", n_test, world)
    test_images = [sw.render(s, world) for s in test_scenes]

    def score():
        return ev.shapesworld_yes_no(model, processor, test_scenes, world, 128, test_images)

    model.lm.set_attn_implementation("eager")  # as train(): fused attention backward is slow on CPU in bf16
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    rng = np.random.default_rng(seed)
    curve = [{"step": 0, **score()}]
    t0 = time.time()
    for step in range(1, steps + 1):
        model.train()
        batch = [train_items[i] for i in rng.integers(len(train_items), size=batch_size)]
        with torch.no_grad():
            features = model.vision(processor.images([sw.render(s, world) for s, _ in batch]))
        text = processor(
            text=[model.config.vqa_prompt.format(qa.question) for _, qa in batch],
            targets=[qa.answer for _, qa in batch],
            **({"qformer_text": [qa.question for _, qa in batch]} if model.config.qformer_question else {}),
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(image_features=features, **text).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % every == 0 or step == steps:
            model.eval()
            curve.append(
                {"step": step, "loss": round(loss.item(), 4), **score(), "seconds": round(time.time() - t0, 1)}
            )
            print(json.dumps(curve[-1]), flush=True)
    return curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a stage-2 BLIP-2 directory (e.g. demo-output/stage2/final)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--every", type=int, default=200)
    p.add_argument("--out", help="write the curve here as JSON")
    args = p.parse_args()
    model, processor = Blip2.from_pretrained(args.model), Blip2Processor.from_pretrained(args.model)
    curve = probe(model, processor, sw.ShapesWorldConfig(), args.steps, args.lr, args.every)
    result = {
        "model": args.model,
        "qformer_question": model.config.qformer_question,
        "steps": args.steps,
        "lr": args.lr,
        "curve": curve,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
