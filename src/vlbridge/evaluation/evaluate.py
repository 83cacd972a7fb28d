"""Evaluation tasks: captioning, VQA and retrieval, on files or on ShapesWorld, for any model that can do them.

    caption_eval      COCO captions / Karpathy split: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap)
    vqa_eval          VQAv2: official 10-answer accuracy, overall and per answer_type
    retrieval_eval    Recall@1/5/10 image->text and text->image, ITC alone and ITC top-k re-ranked by ITM
    shapesworld_*     the same three on generated scenes, captions scored per attribute, and multi-turn
                      conversations (each turn answered after the earlier ones, against the question alone)

`vlbridge eval` (evaluation.run) loads a saved model and runs these.

Every result records the decoding settings it was measured with (`decode`, prompt included), its
size `n` and its time. Unusable images are skipped and counted (`images`: seen / skipped / reasons),
never fatal.
"""

from __future__ import annotations

import json
import logging
import time

import torch
from tqdm import tqdm

from vlbridge.data import shapesworld as sw
from vlbridge.data.conversations import plain_text
from vlbridge.data.readers import SkipCounter, decode_image
from vlbridge.evaluation.generation import DECODING, generate_texts
from vlbridge.evaluation.metrics import caption_metrics, conversation_accuracy, retrieval_recall, vqa_accuracy

log = logging.getLogger(__name__)

# What transformers uses for these when neither we nor the LM's generation_config set them.
_HF_DEFAULTS = dict(num_beams=1, max_new_tokens=None, min_new_tokens=0, length_penalty=1.0, do_sample=False)


def decode_record(model, decode: dict, prompt: str) -> dict:
    """The settings generation really ran with: ours over the LM's generation_config over transformers'
    defaults, and the prompt."""
    gc = model.lm.generation_config
    lm = {k: getattr(gc, k, None) for k in _HF_DEFAULTS}
    return {**_HF_DEFAULTS, **{k: v for k, v in lm.items() if v is not None}, **decode, "prompt": prompt}


def _merge(defaults: dict, decode: dict | None) -> dict:
    """decode over a task's defaults; a default min_new_tokens never exceeds a given max_new_tokens."""
    out = {**defaults, **(decode or {})}
    if "min_new_tokens" not in (decode or {}) and out.get("min_new_tokens", 0) > out.get("max_new_tokens", 1 << 30):
        out["min_new_tokens"] = out["max_new_tokens"]
    return out


def _skips(skips: SkipCounter) -> dict:
    return {
        "seen": skips.seen,
        "skipped": skips.skipped,
        "reasons": dict(skips.reasons),
        "examples": [{"image": ref, "reason": why} for ref, why in skips.examples],
    }


def _decoded_batches(samples: list[dict], batch_size: int, skips: SkipCounter, desc: str):
    """Yield (kept samples, their decoded images) per batch of `samples`.

    Samples whose image is unusable are dropped; every distinct image is counted once in `skips`
    (VQA has several questions per image). Images are decoded per batch, never all held at once.
    """
    good, bad = set(), set()
    with tqdm(total=len(samples), desc=desc, unit="sample") as bar:
        for s in range(0, len(samples), batch_size):
            chunk, decoded, kept = samples[s : s + batch_size], {}, []
            for x in chunk:
                ref = x["image"]
                if ref in bad:
                    continue
                if ref not in decoded:
                    image = decode_image(ref, None if ref in good else skips)
                    if image is None:
                        bad.add(ref)
                        continue
                    good.add(ref)
                    decoded[ref] = image
                kept.append(x)
            bar.update(len(chunk))
            if kept:
                yield kept, [decoded[x["image"]] for x in kept]
    if skips.skipped:
        log.warning("%s: %s", desc, skips.summary())


# ---------------------------------------------------------------- files: COCO / Karpathy / VQAv2


def caption_eval(
    model, processor, samples: list[dict], decode: dict | None = None, prompt: str | None = None, batch_size: int = 16
) -> tuple[dict, list[dict]]:
    """Caption per-image samples (read_coco_captions(per_image=True) or read_karpathy) and score them.

    Returns (result, predictions in COCO results format [{image_id, caption}]). Images without
    reference captions are not evaluated (`no_references`). Without Java or pycocoevalcap the
    predictions are still made and `metrics` holds {"error": why}.
    """
    decode = _merge(DECODING["caption"], decode)
    prompt = model.config.caption_prompt if prompt is None else prompt
    model.eval()
    t0 = time.time()
    with_refs = [x for x in samples if x["captions"]]
    skips, preds, refs = SkipCounter(), {}, {}
    for chunk, images in _decoded_batches(with_refs, batch_size, skips, "captions"):
        texts = generate_texts(model, processor, images, [prompt] * len(images), decode, batch_size)
        for x, text in zip(chunk, texts):
            preds[x["image_id"]], refs[x["image_id"]] = text, x["captions"]
    t_gen = time.time() - t0
    try:
        metrics = caption_metrics(preds, refs) if preds else {}
    except (RuntimeError, ImportError) as e:  # no Java / pycocoevalcap: keep the predictions
        log.error("caption metrics not computed: %s", e)
        metrics = {"error": str(e)}
    result = {
        "metrics": metrics,
        "n": len(preds),
        "no_references": len(samples) - len(with_refs),
        "images": _skips(skips),
        "decode": decode_record(model, decode, prompt),
        "generation_seconds": t_gen,
        "seconds": time.time() - t0,
    }
    return result, [{"image_id": i, "caption": c} for i, c in preds.items()]


def vqa_answer_types(annotations_json) -> dict:
    """{question_id: answer_type} ("yes/no", "number", "other") from a VQAv2 annotations file."""
    with open(annotations_json, encoding="utf-8") as f:
        return {a["question_id"]: a.get("answer_type", "unknown") for a in json.load(f)["annotations"]}


def vqa_eval(
    model,
    processor,
    samples: list[dict],
    answer_types: dict | None = None,
    decode: dict | None = None,
    template: str | None = None,
    batch_size: int = 16,
) -> tuple[dict, list[dict]]:
    """Answer read_vqa samples; accuracy (official formula, metrics.vqa_accuracy) over the questions
    with answers, overall and per answer type. Returns (result, [{question_id, answer}])."""
    decode = _merge(DECODING["vqa"], decode)
    template = model.config.vqa_prompt if template is None else template
    model.eval()
    t0 = time.time()
    skips, done = SkipCounter(), []
    for chunk, images in _decoded_batches(samples, batch_size, skips, "vqa"):
        questions = [x["question"] for x in chunk]
        answers = generate_texts(
            model, processor, images, [template.format(q) for q in questions], decode, batch_size, questions=questions
        )
        done += zip(chunk, answers)
    scored = [(x, a) for x, a in done if x["answers"]]  # test sets come without answers

    def accuracy(pairs):
        return vqa_accuracy([a for _, a in pairs], [x["answers"] for x, _ in pairs]) if pairs else None

    by_type = {}
    for x, a in scored:
        by_type.setdefault((answer_types or {}).get(x["question_id"], "unknown"), []).append((x, a))
    result = {
        "accuracy": accuracy(scored),
        "by_answer_type": {t: accuracy(p) for t, p in sorted(by_type.items())},
        "n": len(done),
        "scored": len(scored),
        "questions_skipped": len(samples) - len(done),
        "images": _skips(skips),
        "decode": decode_record(model, decode, template),
        "seconds": time.time() - t0,
    }
    return result, [{"question_id": x["question_id"], "answer": a} for x, a in done]


@torch.no_grad()
def retrieval_recalls(
    model,
    processor,
    pixel_values: torch.Tensor,
    texts: list[str],
    text_to_image: list[int],
    k: int,
    batch_size: int,
    rerank: str = "log_odds",
) -> dict:
    """Recall@1/5/10 both ways of `texts` against images (pixel_values (Ni, 3, H, W)), text j showing
    image text_to_image[j]: ITC for all pairs, and each row's ITC top k re-ranked by ITM + ITC
    (`rerank`: how the two are combined, Blip2.retrieval_scores)."""
    q = model.prepare_inputs(processor.qformer_text(texts, truncate=True))
    scores = model.retrieval_scores(
        q["input_ids"],
        q["attention_mask"],
        pixel_values=pixel_values.to(model.device),
        k=k,
        batch_size=batch_size,
        rerank=rerank,
    )
    itc = retrieval_recall(scores.itc, text_to_image=text_to_image)
    # Re-ranked scores differ per direction: image->text from i2t (Ni, Nt), text->image from t2i (Nt, Ni).
    i2t = retrieval_recall(scores.i2t, text_to_image=text_to_image)
    t2i = retrieval_recall(scores.t2i.t(), text_to_image=text_to_image)
    reranked = {m: v for m, v in i2t.items() if m.startswith("i2t")} | {
        m: v for m, v in t2i.items() if m.startswith("t2i")
    }
    reranked["mean"] = sum(reranked.values()) / len(reranked)
    return {"itc": itc, "itc_itm": reranked, "k": k, "rerank": rerank}


def retrieval_eval(
    model, processor, samples: list[dict], k: int = 128, batch_size: int = 16, rerank: str = "log_odds"
) -> dict:
    """Image<->text retrieval over per-image caption samples: every image against every caption.

    All pixel_values are held at once (as retrieval_scores needs them): ~0.6 MB per 224px image.
    """
    model.eval()
    t0 = time.time()
    skips, pixels, texts, text_to_image = SkipCounter(), [], [], []
    n_images = 0
    for chunk, images in _decoded_batches([x for x in samples if x["captions"]], batch_size, skips, "retrieval"):
        pixels.append(processor.images(images))
        for x in chunk:
            texts += x["captions"]
            text_to_image += [n_images] * len(x["captions"])
            n_images += 1
    if not n_images:
        raise ValueError(f"retrieval: no usable image with captions ({skips.summary()})")
    truncated = processor.num_truncated
    result = retrieval_recalls(model, processor, torch.cat(pixels), texts, text_to_image, k, batch_size, rerank)
    return {
        **result,
        "n_images": n_images,
        "n_texts": len(texts),
        "texts_truncated": processor.num_truncated - truncated,
        "images": _skips(skips),
        "seconds": time.time() - t0,
    }


# ---------------------------------------------------------------- ShapesWorld


def split_scenes(split: str, n: int, world: sw.ShapesWorldConfig | None = None) -> list[sw.Scene]:
    """Scenes 0..n-1 of a ShapesWorld split (deterministic, so every run sees the same ones)."""
    return sw.make_split(split, n, world)


def retrieval_scenes(split: str, n: int, world: sw.ShapesWorldConfig | None = None) -> list[sw.Scene]:
    """The first n scenes of a split whose captions are pairwise distinct: retrieval's candidates.

    Different scenes can share a caption (a lone object's caption does not say where it is; a relation
    word covers several layouts): 232 of the first 1,000 test scenes do. Identical captions score
    identically, and ties count against the model (retrieval_recall), so with them in the pool an image
    whose caption appears twice can never be a hit at R@1 - the first 1,000 test scenes cap image->text
    R@1 at 0.77 whatever the model. With distinct captions each image has exactly one right text."""
    world, seen, scenes, i = world or sw.ShapesWorldConfig(), set(), [], 0
    while len(scenes) < n:
        if i >= 100 * n + 1000:
            raise ValueError(f"{split}: only {len(scenes)} distinct captions in its first {i} scenes, {n} asked for")
        scene = sw.split_scene(split, i, world)
        if scene.caption not in seen:
            seen.add(scene.caption)
            scenes.append(scene)
        i += 1
    return scenes


def shapesworld_captions(
    model, processor, scenes, world, decode=None, batch_size=64, prompt: str | None = None, progress: bool = False
) -> dict:
    """Generated captions scored per attribute against the scene truth (see sw.attribute_accuracy)."""
    decode = _merge(DECODING["shapesworld_caption"], decode)
    prompt = model.config.caption_prompt if prompt is None else prompt
    model.eval()
    t0 = time.time()
    images = [sw.render(s, world) for s in scenes]
    preds = generate_texts(model, processor, images, [prompt] * len(scenes), decode, batch_size, progress, "captions")
    return {
        "metrics": sw.attribute_accuracy(preds, scenes),
        "decode": decode_record(model, decode, prompt),
        "n": len(scenes),
        "seconds": time.time() - t0,
        "samples": [{"caption": s.caption, "predicted": p} for s, p in zip(scenes[:16], preds[:16])],
    }


def shapesworld_vqa(
    model, processor, scenes, world, decode=None, batch_size=64, template: str | None = None, progress: bool = False
) -> dict:
    """Every question of every scene; VQA accuracy overall and per question kind."""
    decode = _merge(DECODING["shapesworld_vqa"], decode)
    template = model.config.vqa_prompt if template is None else template
    model.eval()
    t0 = time.time()
    items = [(i, qa) for i, s in enumerate(scenes) for qa in s.qa]
    images = [sw.render(scenes[i], world) for i, _ in items]
    prompts = [template.format(qa.question) for _, qa in items]
    preds = generate_texts(
        model,
        processor,
        images,
        prompts,
        decode,
        batch_size,
        progress,
        "vqa",
        questions=[qa.question for _, qa in items],
    )
    answers = [[qa.answer] for _, qa in items]
    by_kind = {}
    for kind in sw.QA_KINDS:
        idx = [j for j, (_, qa) in enumerate(items) if qa.kind == kind]
        if idx:
            by_kind[kind] = vqa_accuracy([preds[j] for j in idx], [answers[j] for j in idx])
    return {
        "accuracy": vqa_accuracy(preds, answers),
        "by_kind": by_kind,
        "decode": decode_record(model, decode, template),
        "n": len(items),
        "seconds": time.time() - t0,
        "samples": [
            {"question": qa.question, "answer": qa.answer, "predicted": p}
            for (_, qa), p in list(zip(items, preds))[:16]
        ],
    }


def shapesworld_yes_no(model, processor, scenes, world, batch_size: int = 64, images=None) -> dict:
    """The yes/no relation questions of `scenes` (half of them "yes"): accuracy and how often the model
    says "yes" (always "yes" scores 0.5). images: the scenes already rendered, if at hand."""
    items = [(i, qa) for i, s in enumerate(scenes) for qa in s.qa if qa.yes_no_relation]
    if not items:
        return {"n": 0}
    images = [sw.render(s, world) for s in scenes] if images is None else images
    said = generate_texts(
        model,
        processor,
        [images[i] for i, _ in items],
        [model.config.vqa_prompt.format(qa.question) for _, qa in items],
        DECODING["shapesworld_vqa"],
        batch_size,
        questions=[qa.question for _, qa in items],
    )
    said = [a.strip() for a in said]
    return {
        "n": len(items),
        "accuracy": round(sum(a == qa.answer for a, (_, qa) in zip(said, items)) / len(items), 4),
        "truth_yes": round(sum(qa.answer == "yes" for _, qa in items) / len(items), 4),
        "said_yes": round(said.count("yes") / len(items), 4),
    }


def shapesworld_conversation(
    model, processor, conversations: list[dict], world, decode=None, batch_size=64, template: str | None = None
) -> dict:
    """Every turn of every conversation (data.conversations.shapesworld_conversations) answered twice:
    multi-turn, after the earlier turns with their true answers (the prompt a "conversation" training
    sample holds), and single-turn, the question alone. A follow-up names its object only as "the
    object", so single-turn follow-ups show what can be answered without the conversation."""
    decode = _merge(DECODING["shapesworld_vqa"], decode)
    template = model.config.vqa_prompt if template is None else template
    model.eval()
    t0 = time.time()
    items = [(i, k) for i, c in enumerate(conversations) for k in range(len(c["messages"]) // 2)]
    scenes = [sw.render(c["scene"], world) for c in conversations]  # once per conversation, not per turn
    images = [scenes[i] for i, _ in items]
    questions = [conversations[i]["messages"][2 * k]["content"] for i, k in items]
    prompts = [plain_text(conversations[i]["messages"][: 2 * k + 1], template) for i, k in items]
    multi = generate_texts(model, processor, images, prompts, decode, batch_size, questions=questions)
    # alone: a first turn's prompt is the same with or without history, so only the follow-ups run again
    later = [j for j, (_, k) in enumerate(items) if k > 0]
    alone = generate_texts(
        model,
        processor,
        [images[j] for j in later],
        [template.format(questions[j]) for j in later],
        decode,
        batch_size,
        questions=[questions[j] for j in later],
    )
    single = list(multi)
    for j, y in zip(later, alone):
        single[j] = y
    truth = [c["messages"] for c in conversations]
    out = {}
    for name, preds in (("multi_turn", multi), ("single_turn", single)):
        per_conv = [[] for _ in conversations]
        for (i, _), y in zip(items, preds):
            per_conv[i].append(y)
        out[name] = conversation_accuracy(per_conv, truth)
    out["samples"] = [
        {"prompt": p, "answer": truth[i][2 * k + 1]["content"], "predicted": y}
        for (i, k), p, y in list(zip(items, prompts, multi))[:12]
    ]
    return {
        **out,
        "decode": decode_record(model, decode, template),
        "conversations": len(conversations),
        "n": len(items),
        "seconds": time.time() - t0,
    }


@torch.no_grad()
def shapesworld_retrieval(
    model, processor, scenes, world, k: int = 16, batch_size: int = 128, rerank: str = "log_odds"
) -> dict:
    """Image<->caption retrieval among len(scenes) candidates: ITC alone, and ITC top-k re-ranked by ITM.
    The captions must be pairwise distinct (see retrieval_scenes)."""
    first: dict[str, int] = {}
    for i, s in enumerate(scenes):
        if first.setdefault(s.caption, i) != i:
            raise ValueError(
                f"scenes {first[s.caption]} and {i} share the caption {s.caption!r}: identical texts tie, "
                "so neither could be retrieved at rank 1; draw the scenes with retrieval_scenes()"
            )
    model.eval()
    t0 = time.time()
    pixel_values = torch.cat(
        [
            processor.images([sw.render(s, world) for s in scenes[i : i + batch_size]])
            for i in range(0, len(scenes), batch_size)
        ]
    )
    result = retrieval_recalls(
        model, processor, pixel_values, [s.caption for s in scenes], list(range(len(scenes))), k, batch_size, rerank
    )  # caption j belongs to image j
    return {**result, "n": len(scenes), "seconds": time.time() - t0}
