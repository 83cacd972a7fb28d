"""Evaluation of BLIP-2 models: captioning, VQA and retrieval; ShapesWorld attribute accuracy.

Every result dict records the decoding settings it was measured with.
"""

from __future__ import annotations

import time

import torch

from .data import shapesworld as sw
from .metrics import retrieval_recall, vqa_accuracy

CAPTION_DECODE = dict(num_beams=1, max_new_tokens=40)
VQA_DECODE = dict(num_beams=1, max_new_tokens=4)


@torch.no_grad()
def _generate(model, processor, images, prompts, decode, batch_size):
    out = []
    for s in range(0, len(images), batch_size):
        batch = processor(images=images[s:s + batch_size], text=prompts[s:s + batch_size])
        out += processor.batch_decode(model.generate(**batch, **decode))
    return out


def shapesworld_captions(model, processor, scenes, world, decode=None, batch_size=64) -> dict:
    """Generated captions scored per attribute against the scene truth (see sw.attribute_accuracy)."""
    decode = {**CAPTION_DECODE, **(decode or {})}
    model.eval()
    t0 = time.time()
    images = [sw.render(s, world) for s in scenes]
    preds = _generate(model, processor, images, [model.config.caption_prompt] * len(scenes), decode, batch_size)
    metrics = sw.attribute_accuracy(preds, scenes)
    return {"metrics": metrics, "decode": decode, "n": len(scenes), "seconds": time.time() - t0,
            "samples": [{"caption": s.caption, "predicted": p} for s, p in zip(scenes[:16], preds[:16])]}


def shapesworld_vqa(model, processor, scenes, world, decode=None, batch_size=64) -> dict:
    """Every question of every scene; VQA accuracy overall and per question kind."""
    decode = {**VQA_DECODE, **(decode or {})}
    model.eval()
    t0 = time.time()
    items = [(i, qa) for i, s in enumerate(scenes) for qa in s.qa]
    images = [sw.render(scenes[i], world) for i, _ in items]
    prompts = [model.config.vqa_prompt.format(qa.question) for _, qa in items]
    preds = _generate(model, processor, images, prompts, decode, batch_size)
    answers = [[qa.answer] for _, qa in items]
    by_kind = {}
    for kind in sw.QA_KINDS:
        idx = [j for j, (_, qa) in enumerate(items) if qa.kind == kind]
        if idx:
            by_kind[kind] = vqa_accuracy([preds[j] for j in idx], [answers[j] for j in idx])
    return {"accuracy": vqa_accuracy(preds, answers), "by_kind": by_kind, "decode": decode, "n": len(items),
            "seconds": time.time() - t0,
            "samples": [{"question": qa.question, "answer": qa.answer, "predicted": p}
                        for (_, qa), p in list(zip(items, preds))[:16]]}


@torch.no_grad()
def shapesworld_retrieval(model, processor, scenes, world, k: int = 16, batch_size: int = 128) -> dict:
    """Image<->caption retrieval among len(scenes) candidates: ITC alone, and ITC top-k re-ranked by ITM."""
    model.eval()
    t0 = time.time()
    pixel_values = torch.cat([processor.images([sw.render(s, world) for s in scenes[i:i + batch_size]])
                              for i in range(0, len(scenes), batch_size)])
    q = processor.qformer_text([s.caption for s in scenes], truncate=True)
    scores = model.retrieval_scores(q["input_ids"], q["attention_mask"], pixel_values=pixel_values, k=k,
                                    batch_size=batch_size)
    truth = list(range(len(scenes)))  # caption j belongs to image j
    itc = retrieval_recall(scores.itc, text_to_image=truth)
    # Re-ranked scores differ per direction: read image->text from i2t and text->image from t2i.
    i2t = retrieval_recall(scores.i2t, text_to_image=truth)
    t2i = retrieval_recall(scores.t2i.t(), text_to_image=truth)
    reranked = {k: v for k, v in i2t.items() if k.startswith("i2t")} | {k: v for k, v in t2i.items() if k.startswith("t2i")}
    return {"itc": itc, "itc_itm": reranked, "k": k, "n": len(scenes), "seconds": time.time() - t0}
