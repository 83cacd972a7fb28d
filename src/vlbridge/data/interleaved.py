"""Interleaved image-text documents for Flamingo training, all in one sequence format.

A document is {"text": "<image>a red circle.<|endofchunk|><image>a blue star.<|endofchunk|>",
"images": [PIL, PIL]}: the i-th image belongs to the i-th <image>. Sources:

    ShapesWorldDocs      several scenes per document, each followed by its caption (M3W-like)
                         with max_images=1 it is an image-text pair source (ALIGN/LTIP-like)
    ConversationDocs     1..max_images scenes, each followed by a multi-turn Q&A about it whose
                         follow-ups refer to "the object" named earlier (data.conversations)
    InContextDocs        a ShapesWorld in-context task: every document answers ONE attribute
                         (color, shape, size or count), chosen per document and never named, so only
                         the demonstrations tell a query which attribute to answer
    BindingDocs          a harder one: every document binds two words of its own to two values of
                         colour or shape, so one demonstration is ambiguous and several resolve it
    read_mmc4            MMC4-style JSONL (text_list + image_info with matched_text_index); unusable
                         images and documents are skipped and counted, never fatal
    pair_document        an (image, caption) pair from any reader, in the same format

DocumentStream turns a source into training batches, a pure function of (seed, dataset, step,
micro-step) like data.batches.BatchStream, so a resumed run replays exactly the same batches.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlbridge.data import shapesworld as sw
from vlbridge.data.conversations import plain_text, scene_conversation
from vlbridge.data.readers import SkipCounter, decode_image

log = logging.getLogger(__name__)

IMAGE, EOC = "<image>", "<|endofchunk|>"
KINDS = (
    "shapesworld_docs",
    "shapesworld_pairs",
    "shapesworld_incontext",
    "shapesworld_binding",
    "shapesworld_conversation",
    "mmc4",
)
ATTRIBUTES = ("color", "shape", "size", "count")  # the in-context task's per-document answer kinds
ANSWERS = {"color": sw.COLORS, "shape": sw.SHAPES, "size": sw.SIZES, "count": ("1", "2", "3", "4")}
# The binding task's made-up words: words of the shipped LM's vocabulary that name no colour or shape
# (the LM has no word outside its 56), so a word's meaning comes only from the demonstrations.
BINDING_WORDS = ("above", "below", "left", "right", "photo", "object", "there", "many")
BINDING_ATTRIBUTES = ("color", "shape")


@dataclass
class DocumentData:
    """One training dataset of a Flamingo recipe; its loss counts `weight` times (lambda_m)."""

    name: str = "docs"
    kind: str = "shapesworld_docs"  # one of KINDS
    weight: float = 1.0
    batch_size: int = 8  # documents per micro-batch
    max_images: int = 4  # images per document (shapesworld_docs draws 1..max_images)
    num_samples: int = 5000  # ShapesWorld: scenes in the pool
    split: str = "train"
    width: int = 64
    height: int = 64
    seed: int = 0
    turns: int = 3  # shapesworld_conversation: questions per scene at most
    prompt: str = "Question: {} Answer:"  # shapesworld_conversation: each question in the model's VQA prompt
    path: str = ""  # mmc4: the JSONL file
    image_root: str = ""  # mmc4: where image_info's image names live


def chunk(caption: str) -> str:
    return f"{IMAGE}{caption}{EOC}"


def pair_document(image, caption: str) -> dict:
    """An image-text pair as a one-image document."""
    return {"text": chunk(caption), "images": [image]}


class ShapesWorldDocs:
    """Document i: 1..max_images scenes of a fixed pool (all of them when pairs=False and
    fixed_length=True), each followed by its caption. A function of (seed, i)."""

    def __init__(self, cfg: DocumentData, fixed_length: bool = False):
        self.cfg, self.fixed_length = cfg, fixed_length
        self.world = sw.ShapesWorldConfig(width=cfg.width, height=cfg.height, seed=cfg.seed)
        self.scenes = sw.make_split(cfg.split, cfg.num_samples, self.world)

    def __len__(self):
        return len(self.scenes)

    def _scenes(self, i: int) -> tuple[np.random.Generator, list[sw.Scene]]:
        rng = np.random.default_rng([self.cfg.seed, 19, i])
        n = self.cfg.max_images if self.fixed_length else int(rng.integers(1, self.cfg.max_images + 1))
        return rng, [self.scenes[int(j)] for j in rng.choice(len(self.scenes), n, replace=False)]

    def render(self, scene: sw.Scene):
        return sw.render(scene, self.world)

    def document(self, i: int) -> dict:
        _, scenes = self._scenes(i)
        return {"text": "".join(chunk(s.caption) for s in scenes), "images": [self.render(s) for s in scenes]}


def answer(scene: sw.Scene, attribute: str) -> str:
    """The in-context task's answer: the count of objects, or an attribute of the first object (the
    caption's first, i.e. leftmost, then topmost)."""
    return str(len(scene.objects)) if attribute == "count" else getattr(scene.objects[0], attribute)


def episode_document(source, i: int) -> dict:
    """An in-context source's episode i as a document: each scene followed by its answer."""
    attribute, scenes, answers = source.episode(i)
    return {
        "text": "".join(chunk(a) for a in answers),
        "images": [source.render(s) for s in scenes],
        "attribute": attribute,
    }


class InContextDocs(ShapesWorldDocs):
    """Document i: max_images scenes, each followed by the answer for ONE attribute drawn per document.
    The query image alone cannot say whether "red", "circle", "small" or "2" is wanted; k
    demonstrations of the same document can, so k-shot should beat 0-shot by a wide margin."""

    def __init__(self, cfg: DocumentData):
        super().__init__(cfg, fixed_length=True)

    def episode(self, i: int) -> tuple[str, list[sw.Scene], list[str]]:
        rng, scenes = self._scenes(i)
        attribute = ATTRIBUTES[int(rng.integers(len(ATTRIBUTES)))]
        return attribute, scenes, [answer(s, attribute) for s in scenes]

    def document(self, i: int) -> dict:
        return episode_document(self, i)

    def valid_answers(self, i: int) -> frozenset[str]:
        """The answers of episode i's kind: what a query is right to answer in form."""
        return frozenset(ANSWERS[self.episode(i)[0]])


class BindingDocs:
    """Document i: max_images one-object scenes, each followed by one of two words from BINDING_WORDS
    that the episode binds to two values of ONE attribute, colour or shape, drawn per episode and never
    named (e.g. "left" = red, "photo" = blue). Each scene's other attribute is drawn at random, so one
    demonstration cannot say whether its word names the colour or the shape, and the query's value may
    not have been shown: a model must compare several demonstrations, and accuracy should rise with
    their number. The scenes are sw.object_scenes of cfg.split; what no training episode holds is the
    binding. A function of (seed, i)."""

    def __init__(self, cfg: DocumentData):
        self.cfg = cfg
        self.world = sw.ShapesWorldConfig(width=cfg.width, height=cfg.height, seed=cfg.seed)
        scenes = sw.object_scenes(cfg.split, cfg.num_samples, self.world)
        self.by_value = {
            a: {v: [s for s in scenes if getattr(s.objects[0], a) == v] for v in ANSWERS[a]} for a in BINDING_ATTRIBUTES
        }
        empty = [f"{a}={v}" for a, pool in self.by_value.items() for v, found in pool.items() if not found]
        if empty:
            raise ValueError(f"dataset {cfg.name!r}: no {cfg.split} scene with {empty[:3]}: raise num_samples")

    def __len__(self):
        return self.cfg.num_samples

    def render(self, scene: sw.Scene):
        return sw.render(scene, self.world)

    def _draw(self, i: int):
        rng = np.random.default_rng([self.cfg.seed, 31, i])
        attribute = BINDING_ATTRIBUTES[int(rng.integers(len(BINDING_ATTRIBUTES)))]
        values = rng.choice(ANSWERS[attribute], 2, replace=False)
        words = rng.choice(BINDING_WORDS, 2, replace=False)
        return rng, attribute, [str(v) for v in values], [str(w) for w in words]

    def episode(self, i: int) -> tuple[str, list[sw.Scene], list[str]]:
        rng, attribute, values, words = self._draw(i)
        which = rng.integers(2, size=self.cfg.max_images)
        pools = [self.by_value[attribute][values[j]] for j in which]
        scenes = [pool[int(rng.integers(len(pool)))] for pool in pools]
        return attribute, scenes, [words[j] for j in which]

    def valid_answers(self, i: int) -> frozenset[str]:
        """Episode i's two words."""
        return frozenset(self._draw(i)[3])

    def document(self, i: int) -> dict:
        return episode_document(self, i)


class ConversationDocs(ShapesWorldDocs):
    """Document i: 1..max_images scenes, each followed by a conversation about it (questions in
    cfg.prompt, answers after them; data.conversations.plain_text), so later turns, and later images,
    are read with everything before them in context."""

    def document(self, i: int) -> dict:
        rng, scenes = self._scenes(i)
        talks = [scene_conversation(s, rng, self.cfg.turns) for s in scenes]
        kept = [(s, t) for s, t in zip(scenes, talks) if t is not None]  # a scene with nothing to name: left out
        return {
            "text": "".join(chunk(plain_text(t, self.cfg.prompt)) for _, t in kept),
            "images": [self.render(s) for s, _ in kept],
        }


def mmc4_document(doc: dict, image_root: str | Path | None, max_images: int, skips: SkipCounter) -> dict | None:
    """One MMC4 record -> a document, or None. Each usable image goes before its matched sentence; a
    new chunk starts at every image after the first. Text before the first image stays (the labels
    mask it). At most one image per sentence and max_images per document, in sentence order."""
    texts = doc["text_list"]
    placed: dict[int, object] = {}  # sentence index -> image
    for info in sorted(doc.get("image_info") or [], key=lambda x: x.get("matched_text_index", -1)):
        if len(placed) == max_images:
            break
        name, where = info.get("image_name") or info.get("image_path"), info.get("matched_text_index")
        if not name or not isinstance(where, int) or not 0 <= where < len(texts) or where in placed:
            skips.skip(name, f"unusable image_info entry (matched_text_index {where!r})")
            continue
        image = decode_image(Path(image_root) / name if image_root else Path(name), skips)
        if image is not None:
            placed[where] = image
    if not placed:
        return None
    parts = []
    for i, sentence in enumerate(texts):
        if i in placed:
            parts.append((EOC if any(j < i for j in placed) else "") + IMAGE)  # a new chunk per image
        parts.append(sentence)
    return {"text": " ".join(parts) + EOC, "images": [placed[i] for i in sorted(placed)]}


def read_mmc4(
    path: str | Path,
    image_root: str | Path | None = None,
    max_images: int = 5,
    image_skips: SkipCounter | None = None,
    doc_skips: SkipCounter | None = None,
) -> list[dict]:
    """Documents of an MMC4-style JSONL file ({"text_list": [...], "image_info": [{"image_name",
    "matched_text_index"}, ...]} per line). Bad images (missing, undecodable) are skipped and counted in
    image_skips; bad lines and documents left without an image in doc_skips. Both are logged."""
    image_skips = image_skips if image_skips is not None else SkipCounter()
    doc_skips = doc_skips if doc_skips is not None else SkipCounter()
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            ref = f"{path}:{n}"
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text_list"), list):
                    raise ValueError("no text_list")
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                doc_skips.skip(ref, f"bad record ({e})")
                continue
            doc = mmc4_document(record, image_root, max_images, image_skips)
            if doc is None:
                doc_skips.skip(ref, "no usable image")
            else:
                doc_skips.ok()
                docs.append(doc)
    log.info("%s: %d documents; documents %s; images %s", path, len(docs), doc_skips, image_skips)
    return docs


class ListDocs:
    def __init__(self, docs: list[dict]):
        if not docs:
            raise ValueError("no usable documents")
        self.docs = docs

    def __len__(self):
        return len(self.docs)

    def document(self, i: int) -> dict:
        return self.docs[i]


def make_source(cfg: DocumentData):
    if cfg.kind == "shapesworld_docs":
        return ShapesWorldDocs(cfg)
    if cfg.kind == "shapesworld_pairs":
        return ShapesWorldDocs(DocumentData(**{**vars(cfg), "max_images": 1}))
    if cfg.kind == "shapesworld_incontext":
        return InContextDocs(cfg)
    if cfg.kind == "shapesworld_binding":
        return BindingDocs(cfg)
    if cfg.kind == "shapesworld_conversation":
        if cfg.prompt.count("{}") != 1 or cfg.turns < 1:
            raise ValueError(f"dataset {cfg.name!r}: prompt must hold one {{}} and turns be >= 1")
        return ConversationDocs(cfg)
    if cfg.kind == "mmc4":
        return ListDocs(read_mmc4(cfg.path, cfg.image_root or None, cfg.max_images))
    raise ValueError(f"unknown dataset kind {cfg.kind!r}; known: {KINDS}")


class DocumentStream:
    """batch(step, micro) -> FlamingoProcessor output with labels for this rank. The global batch,
    batch_size * world_size documents, is drawn (with replacement) by an rng seeded with (seed, dataset
    index, step, micro) and rank r takes its r-th slice: N ranks x batch_size see exactly the documents
    1 process x N * batch_size sees, and a resumed run (any world size) sees what an uninterrupted one would."""

    def __init__(self, source, processor, batch_size: int, seed: int, index: int, rank: int = 0, world_size: int = 1):
        self.source, self.processor, self.batch_size, self.seed, self.index = source, processor, batch_size, seed, index
        self.rank, self.world_size = rank, world_size

    def batch(self, step: int, micro: int = 0) -> dict:
        rng = np.random.default_rng([self.seed, 17, self.index, step, micro])
        drawn = rng.integers(len(self.source), size=self.batch_size * self.world_size)  # (N * batch_size,)
        mine = drawn[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        docs = [self.source.document(int(i)) for i in mine]
        return self.processor([d["text"] for d in docs], [d["images"] for d in docs], return_labels=True)
