"""Where does a stage-2 BLIP-2 lose its VQA answers: in what the queries carry, or in how the LM reads them?

For every attribute question of a ShapesWorld scene ("what color is the star?", "what shape is the red
object?", "what size is the red star?") the model answers it, and its own caption of the same image is
parsed for the same attribute. Each answer then falls in one of four cells:
    answer right / wrong  x  caption right / caption wrong (or silent: it names no unique such object)
A wrong answer whose caption was right means the soft prompt held the attribute and the LM, reading it
for a question, still missed it: the limit is the reading, not the bridge's content. The yes/no relation
questions, which no caption answers directly, are scored apart (`relation_yes_no`).

    PYTHONPATH=src .venv/bin/python scripts/vqa_errors.py STAGE2_DIR [--split test] [--n 300]

Measured on this project's 2-core machine with the demo's stage 2 (2,000 steps), test split, 300
scenes: see README "What limits VQA".
"""

from __future__ import annotations

import argparse
import json

from vlbridge import Blip2, Blip2Processor
from vlbridge.data import shapesworld as sw
from vlbridge.evaluation import evaluate as ev
from vlbridge.evaluation.generation import DECODING, generate_texts

KINDS = ("color", "shape", "size")


def caption_answer(question: str, kind: str, caption: str) -> str | None:
    """The answer the caption gives to an attribute question, None if it names no unique such object."""
    objs = sw.parse_caption(caption)
    words = question.rstrip("?").split()
    if kind == "color":  # what color is the {shape}?
        hits = [o.color for o in objs if o.shape == words[-1]]
    elif kind == "shape":  # what shape is the {color} object?
        hits = [o.shape for o in objs if o.color == words[-2]]
    else:  # what size is the {color} {shape}?
        hits = [o.size for o in objs if (o.color, o.shape) == (words[-2], words[-1])]
    return hits[0] if len(hits) == 1 else None


def vqa_errors(model, processor, scenes, world, batch_size: int = 64) -> dict:
    model.eval()
    images = [sw.render(s, world) for s in scenes]
    captions = generate_texts(
        model,
        processor,
        images,
        [model.config.caption_prompt] * len(scenes),
        DECODING["shapesworld_caption"],
        batch_size,
    )
    items = [(i, qa) for i, s in enumerate(scenes) for qa in s.qa if qa.kind in KINDS]
    answers = generate_texts(
        model,
        processor,
        [images[i] for i, _ in items],
        [model.config.vqa_prompt.format(qa.question) for _, qa in items],
        DECODING["shapesworld_vqa"],
        batch_size,
        questions=[qa.question for _, qa in items],
    )
    cells = {
        k: {"right/caption_right": 0, "right/caption_wrong": 0, "wrong/caption_right": 0, "wrong/caption_wrong": 0}
        for k in KINDS
    }
    examples = []
    for (i, qa), pred in zip(items, answers):
        said = caption_answer(qa.question, qa.kind, captions[i])
        cell = (
            f"{'right' if pred.strip() == qa.answer else 'wrong'}/caption_{'right' if said == qa.answer else 'wrong'}"
        )
        cells[qa.kind][cell] += 1
        if cell == "wrong/caption_right" and len(examples) < 8:
            examples.append({"question": qa.question, "answer": qa.answer, "predicted": pred, "caption": captions[i]})
    total = {c: sum(k[c] for k in cells.values()) for c in cells[KINDS[0]]}
    wrong = total["wrong/caption_right"] + total["wrong/caption_wrong"]
    return {
        "cells": cells,
        "all": total,
        "wrong_with_caption_right": round(total["wrong/caption_right"] / wrong, 4) if wrong else None,
        "examples": examples,
        "relation_yes_no": ev.shapesworld_yes_no(model, processor, scenes, world, batch_size, images),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a stage-2 BLIP-2 directory (e.g. demo-output/stage2/final)")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=300)
    args = p.parse_args()
    model, processor = Blip2.from_pretrained(args.model), Blip2Processor.from_pretrained(args.model)
    world = sw.ShapesWorldConfig()
    out = vqa_errors(model, processor, ev.split_scenes(args.split, args.n, world), world)
    print(json.dumps({"model": args.model, "split": args.split, "n": args.n, **out}, indent=1))


if __name__ == "__main__":
    main()
