"""Few-shot (in-context) evaluation of Flamingo models, OpenFlamingo style.

A k-shot prompt is k demonstrations then the query image, e.g. for captioning
    "<image>Output:a red circle.<|endofchunk|><image>Output:a blue star.<|endofchunk|><image>Output:"
with the k demonstration images followed by the query image. Demonstrations come from a support set,
chosen at random (seeded) or by RICES: the support images most similar to the query (cosine of
mean-pooled frozen vision features; OpenFlamingo uses CLIP image embeddings), the most similar LAST,
nearest to the query. Zero-shot uses `zero_shot_text_demos` text-only demonstrations (OpenFlamingo: 2)
so the model sees the answer format without any image.

    fewshot_eval(model, processor, "caption" | "vqa", support, queries, shots=(0, 4), ...)
    incontext_eval(model, processor, source, shots)   the ShapesWorld in-context tasks (data.interleaved):
                                                     InContextDocs (which attribute) and BindingDocs
                                                     (which word names which colour or shape)

Every result records the decoding settings, the prompt template, the selection and n.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from vlbridge.data import shapesworld as sw
from vlbridge.data.interleaved import (
    ANSWERS,
    BINDING_ATTRIBUTES,
    BINDING_WORDS,
    IMAGE,
    BindingDocs,
    DocumentData,
    InContextDocs,
)
from vlbridge.evaluation.generation import DECODING
from vlbridge.evaluation.metrics import normalize_vqa_answer, vqa_accuracy

CAPTION_TEMPLATE = "<image>Output:{answer}<|endofchunk|>"
VQA_TEMPLATE = "<image>Question:{question} Short answer:{answer}<|endofchunk|>"


def query_prompt(template: str, sample: dict) -> str:
    """The template up to the answer slot: "<image>Output:" or "<image>Question:q Short answer:"."""
    head = template.split("{answer}")[0]
    return head.format(question=sample.get("question", ""))


@torch.no_grad()
def image_embeddings(model, processor, images, batch_size: int = 64) -> torch.Tensor:
    """(N, Dv) unit vectors: the frozen vision encoder's patch tokens, mean-pooled."""
    out = []
    for s in range(0, len(images), batch_size):
        px = processor.image_processor(images=list(images[s : s + batch_size]), return_tensors="pt")["pixel_values"]
        out.append(model.vision(model.prepare_inputs({"px": px})["px"]).float().mean(1))
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


def rices(query: torch.Tensor, support: torch.Tensor, k: int) -> torch.Tensor:
    """query (Q, D), support (S, D) unit vectors -> (Q, k) support indices, ordered by increasing
    similarity: the most similar demonstration comes last, right before the query."""
    top = (query @ support.T).topk(k, dim=1).indices  # (Q, k), most similar first
    return top.flip(1)


def random_demos(num_queries: int, num_support: int, k: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng([seed, 23, k])
    return torch.tensor(
        np.stack([rng.choice(num_support, k, replace=False) for _ in range(num_queries)])
        if k
        else np.zeros((num_queries, 0), dtype=np.int64)
    )


@torch.no_grad()
def generate_answers(
    model, processor, prompts: list[str], images: list[list], decode: dict, batch_size: int = 16
) -> list[str]:
    out = []
    for s in range(0, len(prompts), batch_size):
        batch = model.prepare_inputs(processor(prompts[s : s + batch_size], images[s : s + batch_size]))
        out += processor.batch_decode(model.generate(**batch, **decode))
    return out


def _exact(prediction: str, answer: str) -> float:
    clean = lambda s: " ".join(normalize_vqa_answer(s).replace(".", " ").split())  # noqa: E731
    return float(clean(prediction) == clean(answer))


def fewshot_eval(
    model,
    processor,
    task: str,
    support: list[dict],
    queries: list[dict],
    shots=(0, 4),
    selection: str = "random",
    template: str | None = None,
    decode: dict | None = None,
    zero_shot_text_demos: int = 2,
    seed: int = 0,
    batch_size: int = 16,
) -> dict:
    """k-shot captioning ("caption": samples {"image", "answer"}) or VQA ("vqa": {"image", "question",
    "answer", optional "answers": [10 answers]}). Returns {"shots": {k: metrics}, "decode", ...}:
    captions: exact match, plus per-attribute accuracy (colour, shape, size, count, relation) when
    the queries carry their ShapesWorld "scene"; VQA: VQA accuracy (official when "answers" are given)."""
    if task not in ("caption", "vqa"):
        raise ValueError(f"task {task!r}: expected 'caption' or 'vqa'")
    template = template or (CAPTION_TEMPLATE if task == "caption" else VQA_TEMPLATE)
    decode = {**DECODING[f"fewshot_{task}"], **(decode or {})}
    if selection == "rices":
        q_emb = image_embeddings(model, processor, [q["image"] for q in queries])
        s_emb = image_embeddings(model, processor, [s["image"] for s in support])
    elif selection != "random":
        raise ValueError(f"selection {selection!r}: expected 'random' or 'rices'")
    results = {}
    for k in shots:
        t0 = time.time()
        text_only = k == 0 and zero_shot_text_demos > 0
        n = zero_shot_text_demos if text_only else k
        chosen = (
            rices(q_emb, s_emb, n) if selection == "rices" and n else random_demos(len(queries), len(support), n, seed)
        )
        prompts, images = [], []
        for q, idx in zip(queries, chosen.tolist()):
            demos = [support[i] for i in idx]
            text = "".join(template.format(question=d.get("question", ""), answer=d["answer"]) for d in demos)
            if text_only:  # the format without any image (OpenFlamingo's zero-shot prompt)
                text = text.replace(IMAGE, "")
            prompts.append(text + query_prompt(template, q))
            images.append(([] if text_only else [d["image"] for d in demos]) + [q["image"]])
        preds = generate_answers(model, processor, prompts, images, decode, batch_size)
        if task == "vqa":
            refs = [q.get("answers") or [q["answer"]] for q in queries]
            metrics = {"vqa_accuracy": vqa_accuracy(preds, refs, official=all("answers" in q for q in queries))}
        else:
            metrics = {"exact_match": float(np.mean([_exact(p, q["answer"]) for p, q in zip(preds, queries)]))}
            if all("scene" in q for q in queries):
                metrics["attributes"] = sw.attribute_accuracy(preds, [q["scene"] for q in queries])
        results[k] = {
            **metrics,
            "n": len(queries),
            "seconds": time.time() - t0,
            "examples": preds[:5],
            "prompt_example": prompts[0],
        }
    return {
        "task": task,
        "selection": selection,
        "template": template,
        "decode": decode,
        "zero_shot_text_demos": zero_shot_text_demos,
        "seed": seed,
        "shots": results,
    }


def incontext_eval(
    model,
    processor,
    source: InContextDocs | BindingDocs,
    shots=(0, 4),
    num_queries: int = 64,
    decode: dict | None = None,
    template: str = "<image>{answer}<|endofchunk|>",
    batch_size: int = 16,
) -> dict:
    """A ShapesWorld in-context task: episode i's first k scenes (with answers) are the
    demonstrations, its last scene the query. accuracy (with its standard error): the right answer;
    format_accuracy: an answer of the episode's kind (source.valid_answers: a colour when the episode
    answers colours, one of the episode's two words in the binding task), which only the
    demonstrations reveal. Without text-only demos: they would tell the kind at 0 shots."""
    decode = {**DECODING["fewshot_vqa"], "num_beams": 1, **(decode or {})}
    top = max(shots)
    if top >= source.cfg.max_images:
        raise ValueError(f"{top} shots need documents of more than {top} images (max_images {source.cfg.max_images})")
    episodes = [source.episode(i) for i in range(num_queries)]
    valid = [source.valid_answers(i) for i in range(num_queries)]
    results = {}
    for k in shots:
        t0 = time.time()
        prompts, images = [], []
        for _, scenes, answers in episodes:
            demos = [{"answer": a} for a in answers[-1 - k : -1]]  # the k scenes before the query
            prompts.append("".join(template.format(answer=d["answer"]) for d in demos) + query_prompt(template, {}))
            images.append([source.render(s) for s in scenes[-1 - k :]])
        preds = [
            p.replace(".", " ").split() for p in generate_answers(model, processor, prompts, images, decode, batch_size)
        ]
        first = [p[0] if p else "" for p in preds]
        right = np.array([f == e[2][-1] for f, e in zip(first, episodes)], dtype=float)
        results[k] = {
            "accuracy": float(right.mean()),
            "stderr": float(right.std() / np.sqrt(len(right))),
            "format_accuracy": float(np.mean([f in v for f, v in zip(first, valid)])),
            "n": num_queries,
            "seconds": time.time() - t0,
            "examples": first[:8],
        }
    task = "shapesworld_binding" if isinstance(source, BindingDocs) else "shapesworld_incontext"
    return {"task": task, "template": template, "decode": decode, "shots": results}


def binding_ideal(source: BindingDocs, shots=(0, 4), num_queries: int = 64) -> dict[int, float]:
    """The binding task's ceiling on the episodes incontext_eval uses: the accuracy of the Bayes-optimal
    learner, who knows the task's form and picks the word most hypotheses consistent with the k
    demonstrations give the query (ties and no consistent guess: the first candidate). Hypotheses:
    attribute x ordered value pair x ordered word pair, all equally likely a priori."""
    import itertools

    words = {w: i for i, w in enumerate(BINDING_WORDS)}
    hyps = np.array(
        [
            (a, v1, v2, w1, w2)
            for a, attr in enumerate(BINDING_ATTRIBUTES)
            for v1, v2 in itertools.permutations(range(len(ANSWERS[attr])), 2)
            for w1, w2 in itertools.permutations(range(len(BINDING_WORDS)), 2)
        ]
    )  # (H, 5)
    a, v1, v2, w1, w2 = hyps.T
    out = {}
    for k in shots:
        right = []
        for i in range(num_queries):
            _, scenes, answers = source.episode(i)
            feats = np.array(
                [[ANSWERS[attr].index(getattr(s.objects[0], attr)) for attr in BINDING_ATTRIBUTES] for s in scenes]
            )  # (n, 2): each scene's value index per attribute
            said = np.array([words[w] for w in answers])
            f, w = feats[-1 - k : -1][:, a], said[-1 - k : -1, None]  # (k, H): each demo's value under each hypothesis
            ok = (((f == v1) & (w == w1)) | ((f == v2) & (w == w2))).all(0)  # (H,)
            q = feats[-1][a]
            votes = np.bincount(np.where(q == v1, w1, w2)[ok & ((q == v1) | (q == v2))], minlength=len(words))
            right.append(int(votes.argmax()) == said[-1])
        out[k] = float(np.mean(right))
    return out


@torch.no_grad()
def binding_text(lm, tokenizer, source: BindingDocs, shots=(1, 4), num_queries: int = 64) -> dict[int, float]:
    """What the LM alone can do with the binding task told in words: each image replaced by its object
    ("a red circle. left a blue square. photo ... a red square."), the accuracy of its forced choice
    between the episode's two words after the query (chance 0.5). A frozen LM that cannot bind words
    in context from text gives a Flamingo built on it no mechanism to do so from images."""
    lm = lm.eval()
    out = {}
    for k in shots:
        right = []
        for i in range(num_queries):
            _, scenes, answers = source.episode(i)
            said = [f"a {s.objects[0].color} {s.objects[0].shape}." for s in scenes]
            text = " ".join(f"{obj} {w}" for obj, w in zip(said[-1 - k : -1], answers[-1 - k : -1]))
            ids = tokenizer(f"{text} {said[-1]}".strip(), return_tensors="pt").input_ids
            logits = lm(input_ids=ids).logits[0, -1]
            words = sorted(source.valid_answers(i))
            pick = max(words, key=lambda w: float(logits[tokenizer.convert_tokens_to_ids(w)]))
            right.append(pick == answers[-1])
        out[k] = float(np.mean(right))
    return out


SHAPESWORLD_CAPTION = "<image>{answer}<|endofchunk|>"  # how the ShapesWorld Flamingo recipe pairs images and text
SHAPESWORLD_VQA = "<image>Question: {question} Answer: {answer}<|endofchunk|>"  # the shipped LM's QA format


def shapesworld_fewshot(
    model,
    processor,
    shots=(0, 1, 4, 8),
    n: int = 64,
    beams: int = 3,
    support_size: int = 200,
    world=None,
    split: str = "val",
) -> dict:
    """0/1/4/8-shot ShapesWorld captioning (random and RICES demonstrations; exact match and per-attribute
    accuracy), VQA (one question per query scene, demonstrations of other scenes and questions) and
    the two in-context tasks: n queries from `split`, demonstrations from the first support_size train
    scenes (the in-context tasks' episodes are all from `split`)."""
    world = world or sw.ShapesWorldConfig()
    scenes = sw.make_split("train", support_size, world) + sw.make_split(split, n, world)
    images = [sw.render(s, world) for s in scenes]
    captions = [{"image": im, "answer": s.caption, "scene": s} for im, s in zip(images, scenes)]
    rng = np.random.default_rng([0, 29])
    vqa = []
    for im, s in zip(images, scenes):
        q, a = s.qa[int(rng.integers(len(s.qa)))]
        vqa.append({"image": im, "question": q, "answer": a})
    decode = {"num_beams": beams}
    report = {
        "caption": {
            sel: fewshot_eval(
                model,
                processor,
                "caption",
                captions[:support_size],
                captions[support_size:],
                shots,
                sel,
                template=SHAPESWORLD_CAPTION,
                decode=decode,
            )
            for sel in ("random", "rices")
        },
        "vqa": fewshot_eval(
            model,
            processor,
            "vqa",
            vqa[:support_size],
            vqa[support_size:],
            shots,
            "random",
            template=SHAPESWORLD_VQA,
            decode=decode,
        ),
    }
    for name, kind in (("incontext", InContextDocs), ("binding", BindingDocs)):
        data = DocumentData(
            kind=f"shapesworld_{name}",
            split=split,
            max_images=max(shots) + 1,
            num_samples=500,
            width=world.width,
            height=world.height,
        )
        report[name] = incontext_eval(model, processor, kind(data), shots, n)
        if kind is BindingDocs:
            report[name]["ideal"] = binding_ideal(kind(data), shots, n)
    for r in (*report["caption"].values(), report["vqa"], report["incontext"], report["binding"]):
        for m in r["shots"].values():
            m.pop("prompt_example", None)
    return report


def fewshot_summary(report: dict) -> dict:
    """The headline numbers per shot count."""
    out = {}
    for sel, r in report["caption"].items():
        out[f"caption_{sel}"] = {
            k: {"exact": m["exact_match"], **{a: m["attributes"][a] for a in ("color", "shape", "size", "count")}}
            for k, m in r["shots"].items()
        }
    out["vqa"] = {k: m["vqa_accuracy"] for k, m in report["vqa"]["shots"].items()}
    for name in ("incontext", "binding"):
        out[name] = {
            k: {key: m[key] for key in ("accuracy", "stderr", "format_accuracy") if key in m}
            for k, m in report.get(name, {}).get("shots", {}).items()
        }
    if "ideal" in report.get("binding", {}):
        out["binding_ideal"] = report["binding"]["ideal"]
    return out
