"""Text-in, text-out helpers on top of a model and its processor: captions, answers, ranking.

    model = Blip2.from_pretrained("my-blip2"); processor = Blip2Processor.from_pretrained("my-blip2")
    caption(model, processor, ["cat.jpg"], num_beams=5)           -> ["a cat on a sofa"]
    answer(model, processor, ["cat.jpg"], ["what animal is it?"])  -> ["cat"]
    rank_images(model, processor, ["a.jpg", "b.jpg"], "a cat")     -> [(1, 3.2), (0, -1.5)]
"""

from __future__ import annotations

import logging

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)

# BLIP-2's evaluation settings: captions 5 beams, 8..30 tokens; VQA 5 beams, short answers.
CAPTION_DEFAULTS = dict(num_beams=5, max_new_tokens=30, min_new_tokens=8)
VQA_DEFAULTS = dict(num_beams=5, max_new_tokens=10, length_penalty=-1.0)


@torch.no_grad()
def generate_texts(model, processor, images, prompts, generate_kwargs: dict, batch_size: int, progress: bool = False,
                   desc: str = "generate", questions: list[str] | None = None) -> list[str]:
    """One generated text per (image, prompt), in batches. questions: the raw questions, which a BLIP-2
    whose Q-Former reads them (config.qformer_question) also gets; other models ignore them."""
    if questions is not None and len(questions) != len(images):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    reads = questions is not None and getattr(model.config, "qformer_question", False)
    cut = getattr(processor, "num_truncated", 0)
    model.eval()
    out = []
    for s in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
        extra = {"qformer_text": questions[s:s + batch_size], "truncate": True} if reads else {}
        batch = processor(images=images[s:s + batch_size], text=prompts[s:s + batch_size], **extra)
        out += processor.batch_decode(model.generate(**batch, **generate_kwargs))
    if reads and processor.num_truncated > cut:
        log.warning("%d of %d questions were cut to the Q-Former's %d tokens", processor.num_truncated - cut,
                    len(questions), processor.max_text_length)
    return out


def _generate(model, processor, images, prompts, defaults, batch_size, questions=None, **generate_kwargs) -> list[str]:
    return generate_texts(model, processor, images, prompts, {**defaults, **generate_kwargs}, batch_size,
                          questions=questions)


def caption(model, processor, images, prompt: str | None = None, batch_size: int = 16, **generate_kwargs) -> list[str]:
    """Captions for a list of images (PIL, numpy, paths); prompt defaults to the model's caption prompt."""
    prompt = model.config.caption_prompt if prompt is None else prompt
    return _generate(model, processor, list(images), [prompt] * len(images), CAPTION_DEFAULTS, batch_size,
                     **generate_kwargs)


def answer(model, processor, images, questions, template: str | None = None, batch_size: int = 16,
           **generate_kwargs) -> list[str]:
    """One answer per (image, question); template defaults to the model's VQA prompt ("Question: {} Answer:")."""
    template = model.config.vqa_prompt if template is None else template
    prompts = [template.format(q) for q in questions]
    return _generate(model, processor, list(images), prompts, VQA_DEFAULTS, batch_size, list(questions),
                     **generate_kwargs)


@torch.no_grad()
def _scores(model, processor, images, texts, k: int, rerank: str):
    """Re-ranked retrieval scores: ITC for all pairs, ITM + ITC (`rerank`, Blip2.retrieval_scores) for
    each row's top k."""
    model.eval()
    batch = processor(images=images, qformer_text=texts)
    scores = model.retrieval_scores(batch["qformer_input_ids"], batch["qformer_attention_mask"],
                                    pixel_values=batch["pixel_values"], k=k, rerank=rerank)
    return scores


def rank_images(model, processor, images, text: str, k: int = 128, rerank: str = "log_odds") -> list[tuple[int, float]]:
    """Images ordered by how well they match `text`: [(image index, score)], best first."""
    s = _scores(model, processor, images, [text], k, rerank).t2i[0]
    order = s.argsort(descending=True)
    return [(int(i), float(s[i])) for i in order if torch.isfinite(s[i])]


def rank_texts(model, processor, image, texts: list[str], k: int = 128, rerank: str = "log_odds"
               ) -> list[tuple[int, float]]:
    """Texts ordered by how well they match `image`: [(text index, score)], best first."""
    s = _scores(model, processor, [image], list(texts), k, rerank).i2t[0]
    order = s.argsort(descending=True)
    return [(int(i), float(s[i])) for i in order if torch.isfinite(s[i])]
