"""Text-in, text-out helpers on top of any model and its processor: captions, answers, ranking.

model, processor = vlbridge.load("my-model")
caption(model, processor, ["cat.jpg"], num_beams=5)           -> ["a cat on a sofa"]
answer(model, processor, ["cat.jpg"], ["what animal is it?"])  -> ["cat"]
rank_images(model, processor, ["a.jpg", "b.jpg"], "a cat")     -> [(1, 3.2), (0, -1.5)]
"""

from __future__ import annotations

import logging

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)

# Decoding defaults of each evaluation protocol, in transformers' generate keywords; what a caller passes
# goes over them, and every result records what it ran with.
DECODING = {
    "caption": dict(num_beams=5, max_new_tokens=30, min_new_tokens=8),  # BLIP-2's caption evaluation
    "vqa": dict(num_beams=5, max_new_tokens=10, length_penalty=-1.0),  # BLIP-2's VQA evaluation: short answers
    # ShapesWorld: one-word answers and captions of at most 23 tokens: greedy, short limits
    "shapesworld_caption": dict(num_beams=1, max_new_tokens=40),
    "shapesworld_vqa": dict(num_beams=1, max_new_tokens=4),
    "fewshot_caption": dict(num_beams=3, max_new_tokens=20),  # OpenFlamingo's few-shot evaluation
    "fewshot_vqa": dict(num_beams=3, max_new_tokens=5),
}


@torch.no_grad()
def generate_texts(
    model,
    processor,
    images,
    prompts,
    generate_kwargs: dict,
    batch_size: int,
    progress: bool = False,
    desc: str = "generate",
    questions: list[str] | None = None,
    examples=None,
) -> list[str]:
    """One generated text per (image, prompt), in batches, on the model's device. questions: the raw
    questions (a BLIP-2 whose Q-Former reads them gets them). examples: in-context demonstrations
    (image, prompt, target) before every sample, for models that take them."""
    if questions is not None and len(questions) != len(images):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    if examples:
        model.require_task("in_context")
    cut = getattr(processor, "num_truncated", 0)
    model.eval()
    out = []
    for s in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
        batch = processor.prompt_inputs(
            images[s : s + batch_size],
            prompts[s : s + batch_size],
            None if questions is None else questions[s : s + batch_size],
            examples,
        )
        out += processor.batch_decode(model.generate(**model.prepare_inputs(batch), **generate_kwargs))
    if getattr(processor, "num_truncated", 0) > cut:
        log.warning(
            "%d of %d questions were cut to the Q-Former's %d tokens",
            processor.num_truncated - cut,
            len(questions or ()),
            processor.max_text_length,
        )
    return out


def caption(
    model, processor, images, prompt: str | None = None, batch_size: int = 16, examples=None, **generate_kwargs
) -> list[str]:
    """Captions for a list of images (PIL, numpy, paths); prompt defaults to the model's caption prompt.
    examples: (image, caption) pairs shown first, for models that learn in context."""
    model.require_task("caption")
    prompt = model.config.caption_prompt if prompt is None else prompt
    shots = [(im, prompt, text) for im, text in examples or ()]
    return generate_texts(
        model,
        processor,
        list(images),
        [prompt] * len(images),
        {**DECODING["caption"], **generate_kwargs},
        batch_size,
        examples=shots,
    )


def answer(
    model,
    processor,
    images,
    questions,
    template: str | None = None,
    batch_size: int = 16,
    examples=None,
    **generate_kwargs,
) -> list[str]:
    """One answer per (image, question); template defaults to the model's VQA prompt ("Question: {} Answer:").
    examples: (image, question, answer) triples shown first, for models that learn in context."""
    model.require_task("vqa")
    template = model.config.vqa_prompt if template is None else template
    if template.count("{}") != 1:
        raise ValueError(f"VQA template {template!r} must hold one {{}} for the question")
    if not all(q.strip() for q in questions):
        raise ValueError("a question is empty")
    prompts = [template.format(q) for q in questions]
    shots = [(im, template.format(q), a) for im, q, a in examples or ()]
    return generate_texts(
        model,
        processor,
        list(images),
        prompts,
        {**DECODING["vqa"], **generate_kwargs},
        batch_size,
        questions=list(questions),
        examples=shots,
    )


@torch.no_grad()
def _scores(model, processor, images, texts, k: int, rerank: str, truncate: bool = False):
    """Re-ranked retrieval scores: ITC for all pairs, ITM + ITC (`rerank`, Blip2.retrieval_scores) for
    each row's top k."""
    model.require_task("retrieval")
    model.eval()
    cut = processor.num_truncated
    batch = model.prepare_inputs(processor(images=images, qformer_text=texts, truncate=truncate))
    if processor.num_truncated > cut:
        log.warning(
            "%d of %d texts were cut to the Q-Former's %d tokens",
            processor.num_truncated - cut,
            len(texts),
            processor.max_text_length,
        )
    scores = model.retrieval_scores(
        batch["qformer_input_ids"],
        batch["qformer_attention_mask"],
        pixel_values=batch["pixel_values"],
        k=k,
        rerank=rerank,
    )
    return scores


def rank_images(
    model, processor, images, text: str, k: int = 128, rerank: str = "log_odds", truncate: bool = False
) -> list[tuple[int, float]]:
    """Images ordered by how well they match `text`: [(image index, score)], best first. A text longer than
    the Q-Former takes is refused, or cut (with a warning) with truncate=True."""
    s = _scores(model, processor, images, [text], k, rerank, truncate).t2i[0]
    order = s.argsort(descending=True)
    return [(int(i), float(s[i])) for i in order if torch.isfinite(s[i])]


def rank_texts(
    model, processor, image, texts: list[str], k: int = 128, rerank: str = "log_odds", truncate: bool = False
) -> list[tuple[int, float]]:
    """Texts ordered by how well they match `image`: [(text index, score)], best first (truncate: as
    rank_images)."""
    s = _scores(model, processor, [image], list(texts), k, rerank, truncate).i2t[0]
    order = s.argsort(descending=True)
    return [(int(i), float(s[i])) for i in order if torch.isfinite(s[i])]
