"""Training batches for BLIP-2, a pure function of (seed, step, micro-step).

Because a batch depends on nothing but its step, resuming at step s replays exactly the batches an
uninterrupted run would have seen, and N ranks can each take their slice of the same global batch.
Webdataset shards are streamed instead (ShardStream): each rank reads its own shards, and a batch
is a function of (step, micro-step) through its position in this rank's stream.

Samples are dicts: {"image": PIL image | None, "key": int (pool index), "caption": str,
"image_id": int, "prompt": str, "target": str, "question": str | None (a VQA sample's raw question)}.
A `FeatureCache` replaces images by the frozen encoder's stored features.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from vlbridge.core import images as core_images
from vlbridge.data import conversations
from vlbridge.data import shapesworld as sw

log = logging.getLogger(__name__)


SOURCES = ("shapesworld", "coco", "karpathy", "vqa", "jsonl", "csv", "webdataset")
TASKS = ("caption", "vqa", "conversation")  # DataConfig.tasks; "conversation": ShapesWorld only


@dataclass
class DataConfig:
    """Where training samples come from. shapesworld: generated scenes (split, num_samples, group_size,
    tasks, width, height, seed). Your files (one sample per caption or question, images decoded when a
    batch needs them): coco (path = captions_*.json), karpathy (path = dataset_*.json at `split`), vqa
    (path = questions JSON, annotations = its annotations JSON), jsonl / csv (see data.readers); image
    paths relative to image_root. webdataset: path = .tar shards as a brace list and/or glob
    ("shards/{00000..00099}.tar", "shards/*.tar"), images with .txt or .json captions, streamed
    (ShardStream; num_samples does not apply). Malformed rows are skipped and reported with their place,
    or with `strict` end the run (data.readers)."""

    source: str = "shapesworld"
    split: str = "train"
    num_samples: int = 20000  # size of the pool of scenes (files: 0 = all samples, else the first N)
    group_size: int = 4  # stage 1: contrast groups of this many minimal edits share a batch
    # stage 2, drawn uniformly per sample: "caption", "vqa", and (ShapesWorld) "conversation": one turn of
    # a multi-turn Q&A about the scene, the earlier turns in the prompt (data.conversations)
    tasks: list[str] = field(default_factory=lambda: ["caption"])
    turns: int = 3  # "conversation": questions per conversation at most
    # stage 2 ShapesWorld VQA: a question's chance to be drawn is its kind's weight (default 1 each), e.g.
    # {"relation": 3} triples the relation questions' share
    qa_weights: dict[str, float] = field(default_factory=dict)
    width: int = 64
    height: int = 64
    seed: int = 0
    path: str = ""
    image_root: str = ""
    annotations: str = ""  # vqa: the annotations JSON (answers)
    image_pattern: str = "COCO_{split}_{image_id:012d}.jpg"  # vqa: image file name from split and image_id
    # False: a malformed row (line, record, tar member) is skipped, counted and reported with its place;
    # True: the first one stops the run with that place (data.readers)
    strict: bool = False
    # webdataset: False: a shard that does not exist is an error naming it; True: a warning, counted
    allow_missing_shards: bool = False

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"data.source {self.source!r}: expected one of {SOURCES}")
        if self.source != "shapesworld" and not self.path:
            raise ValueError(f"data.source {self.source!r} needs data.path")
        if not self.tasks or set(self.tasks) - set(TASKS):
            raise ValueError(f"data.tasks {self.tasks}: expected one or more of {TASKS}")
        if "conversation" in self.tasks and self.source != "shapesworld":
            raise ValueError("data.tasks 'conversation' is generated from ShapesWorld scenes: data.source shapesworld")
        if self.turns < 1:
            raise ValueError(f"data.turns {self.turns}: expected >= 1")
        unknown = sorted(set(self.qa_weights) - set(sw.QA_KINDS))
        if unknown or any(w < 0 for w in self.qa_weights.values()):
            raise ValueError(
                f"data.qa_weights {self.qa_weights}: kinds are {sw.QA_KINDS}, weights >= 0 ({unknown} unknown)"
            )
        if self.qa_weights and self.source != "shapesworld":
            raise ValueError("data.qa_weights applies to ShapesWorld questions only")


class ShapesWorldPool:
    """A fixed pool of ShapesWorld scenes: contrast groups (group_size > 1) or independent scenes."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.world = sw.ShapesWorldConfig(width=cfg.width, height=cfg.height, seed=cfg.seed)
        k = max(cfg.group_size, 1)
        if k > 1:
            groups = [
                sw.contrast_group(np.random.default_rng([cfg.seed, 7, g]), self.world, k, cfg.split)
                for g in range(cfg.num_samples // k)
            ]
            self.scenes = [s for g in groups for s in g]
        else:
            self.scenes = sw.make_split(cfg.split, cfg.num_samples, self.world)
        self.group_size = k
        self.bad: set[int] = set()  # generated scenes always render (FilesPool records its bad images here)

    def __len__(self):
        return len(self.scenes)

    def usable(self, i: int) -> int:
        return i

    def image(self, i: int):
        return sw.render(self.scenes[i], self.world)

    def sample(self, i: int, rng: np.random.Generator, vqa_prompt: str, caption_prompt: str) -> dict:
        """The sample for pool index i; for stage 2 a task drawn from cfg.tasks by `rng`."""
        scene = self.scenes[i]
        task = self.cfg.tasks[int(rng.integers(len(self.cfg.tasks)))]
        qa = None
        if task == "conversation" and (messages := conversations.scene_conversation(scene, rng, self.cfg.turns)):
            k = int(rng.integers(len(messages) // 2))  # the turn to answer; the ones before it are context
            question, target = messages[2 * k]["content"], messages[2 * k + 1]["content"]
            prompt = conversations.plain_text(messages[: 2 * k + 1], vqa_prompt)
            return self._sample(i, prompt, target, question)
        if task == "vqa" and scene.qa:
            if self.cfg.qa_weights:
                weights = np.array([self.cfg.qa_weights.get(x.kind, 1.0) for x in scene.qa])
                if weights.sum() > 0:
                    qa = scene.qa[int(rng.choice(len(scene.qa), p=weights / weights.sum()))]
            else:  # uniform, drawn as before qa_weights existed (same runs)
                qa = scene.qa[int(rng.integers(len(scene.qa)))]
        if qa is not None:
            return self._sample(i, vqa_prompt.format(qa.question), qa.answer, qa.question)
        return self._sample(i, caption_prompt, scene.caption, None)

    def _sample(self, i: int, prompt: str, target: str, question: str | None) -> dict:
        caption = self.scenes[i].caption
        return {"key": i, "caption": caption, "image_id": i, "prompt": prompt, "target": target, "question": question}


class FilesPool:
    """A user's caption or VQA files as a training pool: one sample per caption / question, images
    decoded when a batch needs them. A sample whose image is missing or corrupt is replaced by the next
    usable one (so batches keep their size on every rank), and counted in `skips`."""

    def __init__(self, cfg: DataConfig):
        from vlbridge.data import readers as r

        self.cfg, self.group_size, self.skips = cfg, 1, r.SkipCounter()
        root = cfg.image_root or None
        strict = cfg.strict
        read = {
            "coco": lambda: r.read_coco_captions(cfg.path, root, strict=strict),
            "karpathy": lambda: r.read_karpathy(cfg.path, root, cfg.split, per_image=False, strict=strict),
            "vqa": lambda: r.read_vqa(cfg.path, cfg.annotations or None, root, cfg.image_pattern, strict=strict),
            "jsonl": lambda: r.read_jsonl(cfg.path, root, strict=strict),
            "csv": lambda: r.read_csv(cfg.path, root, strict=strict),
        }
        samples = read[cfg.source]()
        self.samples = samples[: cfg.num_samples] if cfg.num_samples else samples
        if not self.samples:
            raise ValueError(f"{cfg.path}: no training samples")
        if any(s.get("question") is not None and s.get("answer") is None for s in self.samples):
            raise ValueError(f"{cfg.path}: questions without answers cannot be trained on (give data.annotations)")
        ids: dict = {}  # ITC positives are samples of the same image: int ids per distinct image_id
        self.image_ids = [ids.setdefault(s.get("image_id", str(s["image"])), len(ids)) for s in self.samples]
        self.bad: set[int] = set()
        self._decoded: dict[int, object] = {}

    def __len__(self):
        return len(self.samples)

    def _decode(self, i: int):
        from vlbridge.data.readers import decode_image

        if i in self.bad:
            return None
        if i not in self._decoded:
            if len(self._decoded) > 1024:
                self._decoded.clear()
            image = decode_image(self.samples[i]["image"], self.skips)
            if image is None:
                self.bad.add(i)
                log.warning("training data: %s", self.skips.summary())
                return None
            self._decoded[i] = image
        return self._decoded[i]

    def usable(self, i: int) -> int:
        """i, or the next pool index (cyclically) whose image decodes."""
        for k in range(len(self)):
            j = (i + k) % len(self)
            if self._decode(j) is not None:
                return j
        raise ValueError(f"{self.cfg.path}: not one image decodes ({self.skips.summary()})")

    def image(self, i: int):
        image = self._decode(i)
        return image if image is not None else self._decode(self.usable(i))

    def sample(self, i: int, rng: np.random.Generator, vqa_prompt: str, caption_prompt: str) -> dict:
        s = self.samples[i]
        question = s.get("question")
        if question is not None:
            prompt, target = vqa_prompt.format(question), s["answer"]
        else:
            prompt, target = caption_prompt, s["caption"]
        return {
            "key": i,
            "caption": s.get("caption"),
            "image_id": self.image_ids[i],
            "prompt": prompt,
            "target": target,
            "question": question,
        }


def make_pool(cfg: DataConfig):
    if cfg.source == "webdataset":
        raise ValueError("webdataset shards are streamed (ShardStream), not held as an indexable pool")
    return ShapesWorldPool(cfg) if cfg.source == "shapesworld" else FilesPool(cfg)


class FeatureCache:
    """The frozen vision encoder's output for every pool image, computed once and stored on disk
    (safetensors, bf16) under a name that hashes what determines it."""

    def __init__(self, features: torch.Tensor):
        self.features = features  # (N, T, D)

    @staticmethod
    def identity(vision, pool: ShapesWorldPool, processor) -> str:
        """A digest of everything the features depend on: the encoder's weights (not its path: stage 2
        loads the same encoder from stage 1's checkpoint), the image preprocessing and loading, and the
        images: for ShapesWorld the generator's config and seed, for a user's files the annotation files
        and every image file, by path, size and modification time (stat only: a file rewritten in place
        within the file system's mtime resolution, at the same size, goes unseen)."""
        h = hashlib.sha256()
        for name, t in sorted(vision.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().contiguous().numpy().tobytes())
        c = pool.cfg
        keys = (
            "source",
            "split",
            "num_samples",
            "group_size",
            "width",
            "height",
            "seed",
            "path",
            "image_root",
            "annotations",
            "image_pattern",
        )
        data = {k: getattr(c, k) for k in keys}
        if c.path:  # a user's file: its size and modification time stand for its content
            st = Path(c.path).stat()
            data["file"] = [st.st_size, st.st_mtime_ns]
        if c.annotations:
            st = Path(c.annotations).stat()
            data["annotations_file"] = [st.st_size, st.st_mtime_ns]
        if isinstance(pool, FilesPool):
            data["images"] = _image_files_digest(pool)
        # how files become pixels (EXIF orientation applied, the pixel limit): caches written before differ
        data["image_loading"] = ["exif_transpose", core_images.MAX_PIXELS]
        h.update(json.dumps([data, processor.image_processor.to_dict()], sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]

    @classmethod
    def build(
        cls, vision, pool: ShapesWorldPool, processor, cache_dir: str | Path, batch_size: int = 256
    ) -> FeatureCache:
        from safetensors.torch import load_file, save_file

        path = Path(cache_dir) / f"features-{cls.identity(vision, pool, processor)}.safetensors"
        if path.exists():
            log.info("feature cache: loading %s", path)
            stored = load_file(str(path))
            if "bad" in stored:  # images that did not decode when the cache was written
                pool.bad.update(stored["bad"].tolist())
            return cls(stored["features"])
        chunks = []
        with torch.no_grad():
            for s in tqdm(range(0, len(pool), batch_size), desc="caching frozen image features"):
                images = [pool.image(i) for i in range(s, min(s + batch_size, len(pool)))]
                chunks.append(vision(processor.images(images)).to(torch.bfloat16))
        features = torch.cat(chunks)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"features": features.contiguous()}
        if pool.bad:
            tensors["bad"] = torch.tensor(sorted(pool.bad))
        save_file(tensors, str(path))
        log.info("feature cache: wrote %s %s", path, tuple(features.shape))
        return cls(features)


def _image_files_digest(pool: FilesPool) -> str:
    """Path, size and modification time of every image file of the pool (one stat each)."""
    h = hashlib.sha256()
    for ref in dict.fromkeys(str(s["image"]) for s in pool.samples):
        try:
            st = os.stat(ref)
            h.update(f"{ref}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{ref}\tmissing\n".encode())
    return h.hexdigest()


class BatchStream:
    """batch(step, micro) -> model inputs; indices from a per-epoch permutation seeded by cfg.seed.
    qformer_question: stage-2 batches also carry the questions in Q-Former tokens (Blip2Config.qformer_question)."""

    def __init__(
        self,
        pool: ShapesWorldPool,
        processor,
        batch_size: int,
        grad_accum: int,
        stage: int,
        prompts: tuple[str, str],
        seed: int = 0,
        cache: FeatureCache | None = None,
        rank: int = 0,
        world_size: int = 1,
        qformer_question: bool = False,
    ):
        self.pool, self.processor, self.stage, self.cache = pool, processor, stage, cache
        self.qformer_question = qformer_question
        self.caption_prompt, self.vqa_prompt = prompts
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.rank, self.world_size = rank, world_size
        k = pool.group_size if stage == 1 else 1
        if batch_size % k:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the contrast group size {k}")
        self.k = k
        self.units_per_batch = batch_size // k  # groups (stage 1) or samples per micro-batch
        self.num_units = len(pool) // k
        if self.num_units < self.units_per_batch * grad_accum * world_size:
            raise ValueError(f"the pool holds {self.num_units} units, fewer than one optimizer step needs")

    def indices(self, step: int, micro: int) -> list[int]:
        """Pool indices of this rank's micro-batch."""
        per_step = self.units_per_batch * self.grad_accum * self.world_size
        start = (step * self.grad_accum + micro) * self.units_per_batch * self.world_size
        start += self.rank * self.units_per_batch
        # Epochs hold whole steps (the remainder of the pool waits for the next permutation).
        epoch, offset = divmod(start, self.num_units - self.num_units % per_step)
        perm = np.random.default_rng([self.seed, 11, epoch]).permutation(self.num_units)
        units = perm[offset : offset + self.units_per_batch]
        return [int(u) * self.k + j for u in units for j in range(self.k)]

    def sample_rng(self, step: int, micro: int, index: int) -> np.random.Generator:
        """The draws of one sample (its task, its question): a function of the sample and the step, not of
        the rank or its place in the batch, so N ranks draw what 1 process on their global batch draws."""
        return np.random.default_rng([self.seed, 13, step, micro, index])

    def samples(self, step: int, micro: int) -> tuple[list[int], list[dict]]:
        """This rank's pool indices (a sample whose image does not decode replaced by the next usable one)
        and their samples."""
        idx = [self.pool.usable(i) for i in self.indices(step, micro)]
        return idx, [
            self.pool.sample(i, self.sample_rng(step, micro, i), self.vqa_prompt, self.caption_prompt) for i in idx
        ]

    def batch(self, step: int, micro: int = 0) -> dict:
        idx, samples = self.samples(step, micro)
        if self.cache is not None:
            batch = {"image_features": self.cache.features[idx].float()}
        else:
            batch = {"pixel_values": self.processor.images([self.pool.image(i) for i in idx])}
        return {**batch, **text_inputs(self.processor, samples, self.stage, self.world_size > 1, self.qformer_question)}


def text_inputs(processor, samples: list[dict], stage: int, gathered: bool, qformer_question: bool = False) -> dict:
    """The text side of a BLIP-2 batch. Stage 1: Q-Former tokens qformer_input_ids / qformer_attention_mask
    (B, T) and ITC image ids (B,); when the
    ranks all-gather their texts (ITM negatives) T is max_text_length on every rank. Stage 2: the LM's
    prompt + target tokens with labels, and with qformer_question the questions in Q-Former tokens
    (qformer_input_ids / qformer_attention_mask; a sample without a question gets an all-0 mask row,
    so its queries run as if alone), or with the processor's qformer_reads_prompt (InstructBLIP) the
    prompts. Every such batch carries them, even one of captions only: then the
    text side still runs (on padding no query sees) and DDP gets a gradient, zero, for each of its
    parameters, as it expects every step."""
    if stage != 1:
        out = processor.lm_text([s["prompt"] for s in samples], [s["target"] for s in samples])
        if qformer_question:
            if processor.qformer_reads_prompt:  # InstructBLIP: the Q-Former reads every prompt, captions' too
                asked, texts = [True] * len(samples), [s["prompt"] for s in samples]
            else:
                asked, texts = [s.get("question") is not None for s in samples], [s["question"] or "" for s in samples]
            q = processor.qformer_text(texts, truncate=True)
            out["qformer_input_ids"] = q["input_ids"]
            out["qformer_attention_mask"] = q["attention_mask"] * torch.tensor(asked, dtype=torch.long)[:, None]
        return out
    q = processor.qformer_text([s["caption"] for s in samples], truncate=True)
    if gathered:
        pad = (0, processor.max_text_length - q["input_ids"].shape[1])
        q = {
            "input_ids": F.pad(q["input_ids"], pad, value=processor.qformer_tokenizer.pad_token_id),
            "attention_mask": F.pad(q["attention_mask"], pad),
        }
    return {
        "qformer_input_ids": q["input_ids"],
        "qformer_attention_mask": q["attention_mask"],
        "image_ids": torch.tensor([s["image_id"] for s in samples]),
    }


class ProcessorStream(BatchStream):
    """Image + prompt -> target batches built by a processor's __call__(images=, text=, targets=) (EVE,
    whose images become LM tokens and so cannot be cached as encoder features). Same indices, tasks
    and rank slices as BatchStream's stage 2."""

    def __init__(
        self,
        pool: ShapesWorldPool,
        processor,
        batch_size: int,
        grad_accum: int,
        prompts: tuple[str, str],
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(pool, processor, batch_size, grad_accum, 2, prompts, seed, None, rank, world_size)

    def batch(self, step: int, micro: int = 0) -> dict:
        idx, samples = self.samples(step, micro)
        return self.processor(
            images=[self.pool.image(i) for i in idx],
            text=[s["prompt"] for s in samples],
            targets=[s["target"] for s in samples],
        )


class ShardStream:
    """batch(step, micro) -> model inputs streamed from webdataset .tar shards (data.source "webdataset").

    Rank r of N reads its own shards (read_webdataset: shards[r::N] of an order shuffled per epoch by
    the seed; within a shard, the order written) and its micro-batch (step, micro) is the batch_size
    samples at position (step * grad_accum + micro) * batch_size of its stream. Shards that do not exist
    are an error (data.allow_missing_shards: a counted warning); a shard cut short gives the samples
    before the cut (read_webdataset). A sample without a caption (data.strict: an error) or whose image
    does not decode is counted in `skips`, logged, and its place taken by the next usable sample of the
    same micro-batch (cyclically), so batches keep their size and positions depend on the step alone.
    Resuming at step s therefore skips s * grad_accum * batch_size samples of each rank's stream (tar
    members read, images not decoded) and, with the same world size and batch size, sees exactly what
    an uninterrupted run would. On another world size the shards are split differently: the run goes
    on deterministically, but not with the same samples."""

    def __init__(
        self,
        cfg: DataConfig,
        processor,
        batch_size: int,
        grad_accum: int,
        stage: int,
        prompts: tuple[str, str],
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        qformer_question: bool = False,
    ):
        from vlbridge.data.readers import SkipCounter, check_shards, find_shards

        if stage == 2 and list(cfg.tasks) != ["caption"]:
            raise ValueError(f"webdataset shards hold captions: stage 2 trains data.tasks ['caption'], not {cfg.tasks}")
        self.skips = SkipCounter()  # what this process read: a resumed run counts from its restart
        self.strict, self.allow_missing_shards = cfg.strict, cfg.allow_missing_shards
        self.shards = check_shards(find_shards(cfg.path), cfg.allow_missing_shards, self.skips)
        self.processor, self.batch_size, self.grad_accum, self.stage = processor, batch_size, grad_accum, stage
        self.caption_prompt, self.seed, self.rank, self.world_size = prompts[0], seed, rank, world_size
        self.qformer_question = qformer_question
        self._it, self._pos = self._stream(), 0

    def _stream(self):
        """This rank's samples, epoch after epoch."""
        from vlbridge.data.readers import read_webdataset

        for epoch in itertools.count():
            order = np.random.default_rng([self.seed, 23, epoch]).permutation(len(self.shards))
            n = 0
            for sample in read_webdataset(
                [self.shards[i] for i in order],
                rank=self.rank,
                world_size=self.world_size,
                worker_id=0,
                num_workers=1,
                skips=self.skips,
                strict=self.strict,
                allow_missing_shards=self.allow_missing_shards,
            ):
                n += 1
                yield sample
            if n == 0:
                raise ValueError(f"rank {self.rank}: its shards hold no samples ({self.skips.summary()})")

    def _take(self, start: int) -> list[dict]:
        """Stream positions start .. start + batch_size - 1; a position behind us restarts the stream."""
        if start < self._pos:
            self._it, self._pos = self._stream(), 0
        for _ in range(start - self._pos):
            next(self._it)
        self._pos = start + self.batch_size
        return [next(self._it) for _ in range(self.batch_size)]

    def batch(self, step: int, micro: int = 0) -> dict:
        from vlbridge.data.readers import decode_image

        raw = self._take((step * self.grad_accum + micro) * self.batch_size)
        images = []
        for s in raw:
            ref = f"{s['shard']}:{s['key']}"
            if not s["caption"]:
                if self.strict:
                    raise ValueError(f"{ref}: no caption (data.strict)")
                self.skips.skip(ref, "no caption")
                images.append(None)
            else:
                images.append(decode_image(s["image"], self.skips, name=ref))
        usable = [i for i, im in enumerate(images) if im is not None]
        if not usable:
            raise ValueError(
                f"rank {self.rank}, step {step}: no sample of the micro-batch is usable ({self.skips.summary()})"
            )
        if len(usable) < len(raw):
            log.warning("training data: %s", self.skips.summary())
        pick = [min((j for j in usable if j >= i), default=usable[0]) for i in range(len(raw))]
        samples = [
            {
                "caption": raw[j]["caption"],
                "image_id": image_id(raw[j]),
                "prompt": self.caption_prompt,
                "target": raw[j]["caption"],
            }
            for j in pick
        ]
        batch = {"pixel_values": self.processor.images([images[j] for j in pick])}
        return {**batch, **text_inputs(self.processor, samples, self.stage, self.world_size > 1, self.qformer_question)}


def image_id(sample: dict) -> int:
    """A streamed sample's ITC id: a 56-bit hash of shard and key, equal on every rank for the same sample
    (a replaced bad sample shares its stand-in's id, so the two count as one image)."""
    digest = hashlib.blake2b(f"{sample['shard']}:{sample['key']}".encode(), digest_size=7).digest()
    return int.from_bytes(digest, "big")
