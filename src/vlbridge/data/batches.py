"""Training batches for BLIP-2, a pure function of (seed, step, micro-step).

Because a batch depends on nothing but its step, resuming at step s replays exactly the batches an
uninterrupted run would have seen, and N ranks can each take their slice of the same global batch.

Samples are dicts: {"image": PIL image | None, "key": int (pool index), "caption": str,
"image_id": int, "prompt": str, "target": str}. A `FeatureCache` replaces images by the frozen
encoder's stored features.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import shapesworld as sw

log = logging.getLogger(__name__)


SOURCES = ("shapesworld", "coco", "karpathy", "vqa", "jsonl", "csv")


@dataclass
class DataConfig:
    """Where training samples come from. shapesworld: generated scenes (split, num_samples, group_size,
    tasks, width, height, seed). Your files (one sample per caption or question, images decoded when a
    batch needs them): coco (path = captions_*.json), karpathy (path = dataset_*.json at `split`), vqa
    (path = questions JSON, annotations = its annotations JSON), jsonl / csv (see data.readers); image
    paths relative to image_root."""

    source: str = "shapesworld"
    split: str = "train"
    num_samples: int = 20000  # size of the pool of scenes (files: 0 = all samples, else the first N)
    group_size: int = 4  # stage 1: contrast groups of this many minimal edits share a batch
    tasks: list[str] = field(default_factory=lambda: ["caption"])  # stage 2: "caption" and/or "vqa"
    width: int = 64
    height: int = 64
    seed: int = 0
    path: str = ""
    image_root: str = ""
    annotations: str = ""  # vqa: the annotations JSON (answers)
    image_pattern: str = "COCO_{split}_{image_id:012d}.jpg"  # vqa: image file name from split and image_id

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"data.source {self.source!r}: expected one of {SOURCES}")
        if self.source != "shapesworld" and not self.path:
            raise ValueError(f"data.source {self.source!r} needs data.path")


class ShapesWorldPool:
    """A fixed pool of ShapesWorld scenes: contrast groups (group_size > 1) or independent scenes."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.world = sw.ShapesWorldConfig(width=cfg.width, height=cfg.height, seed=cfg.seed)
        k = max(cfg.group_size, 1)
        if k > 1:
            groups = [sw.contrast_group(np.random.default_rng([cfg.seed, 7, g]), self.world, k, cfg.split)
                      for g in range(cfg.num_samples // k)]
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
        if task == "vqa" and scene.qa:
            qa = scene.qa[int(rng.integers(len(scene.qa)))]
            prompt, target = vqa_prompt.format(qa.question), qa.answer
        else:
            prompt, target = caption_prompt, scene.caption
        return {"key": i, "caption": scene.caption, "image_id": i, "prompt": prompt, "target": target}


class FilesPool:
    """A user's caption or VQA files as a training pool: one sample per caption / question, images
    decoded when a batch needs them. A sample whose image is missing or corrupt is replaced by the next
    usable one (so batches keep their size on every rank), and counted in `skips`."""

    def __init__(self, cfg: DataConfig):
        from . import readers as r

        self.cfg, self.group_size, self.skips = cfg, 1, r.SkipCounter()
        root = cfg.image_root or None
        read = {"coco": lambda: r.read_coco_captions(cfg.path, root),
                "karpathy": lambda: r.read_karpathy(cfg.path, root, cfg.split, per_image=False),
                "vqa": lambda: r.read_vqa(cfg.path, cfg.annotations or None, root, cfg.image_pattern),
                "jsonl": lambda: r.read_jsonl(cfg.path, root), "csv": lambda: r.read_csv(cfg.path, root)}
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
        from .readers import decode_image

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
        if s.get("question") is not None:
            prompt, target = vqa_prompt.format(s["question"]), s["answer"]
        else:
            prompt, target = caption_prompt, s["caption"]
        return {"key": i, "caption": s.get("caption"), "image_id": self.image_ids[i], "prompt": prompt, "target": target}


def make_pool(cfg: DataConfig):
    return ShapesWorldPool(cfg) if cfg.source == "shapesworld" else FilesPool(cfg)


class FeatureCache:
    """The frozen vision encoder's output for every pool image, computed once and stored on disk
    (safetensors, bf16) under a name that hashes what determines it."""

    def __init__(self, features: torch.Tensor):
        self.features = features  # (N, T, D)

    @staticmethod
    def identity(vision, pool: ShapesWorldPool, processor) -> str:
        """A digest of everything the features depend on: the encoder's weights (not its path: stage 2
        loads the same encoder from stage 1's checkpoint), the image preprocessing and the scenes."""
        h = hashlib.sha256()
        for name, t in sorted(vision.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().contiguous().numpy().tobytes())
        c = pool.cfg
        keys = ("source", "split", "num_samples", "group_size", "width", "height", "seed", "path", "image_root",
                "annotations", "image_pattern")
        data = {k: getattr(c, k) for k in keys}
        if c.path:  # a user's file: its size and modification time stand for its content
            st = Path(c.path).stat()
            data["file"] = [st.st_size, st.st_mtime_ns]
        h.update(json.dumps([data, processor.image_processor.to_dict()], sort_keys=True, default=str).encode())
        return h.hexdigest()[:16]

    @classmethod
    def build(cls, vision, pool: ShapesWorldPool, processor, cache_dir: str | Path,
              batch_size: int = 256) -> "FeatureCache":
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


class BatchStream:
    """batch(step, micro) -> model inputs; indices from a per-epoch permutation seeded by cfg.seed."""

    def __init__(self, pool: ShapesWorldPool, processor, batch_size: int, grad_accum: int, stage: int,
                 prompts: tuple[str, str], seed: int = 0, cache: FeatureCache | None = None,
                 rank: int = 0, world_size: int = 1):
        self.pool, self.processor, self.stage, self.cache = pool, processor, stage, cache
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
        units = perm[offset: offset + self.units_per_batch]
        return [int(u) * self.k + j for u in units for j in range(self.k)]

    def sample_rng(self, step: int, micro: int, index: int) -> np.random.Generator:
        """The draws of one sample (its task, its question): a function of the sample and the step, not of
        the rank or its place in the batch, so N ranks draw what 1 process on their global batch draws."""
        return np.random.default_rng([self.seed, 13, step, micro, index])

    def samples(self, step: int, micro: int) -> tuple[list[int], list[dict]]:
        """This rank's pool indices (a sample whose image does not decode replaced by the next usable one)
        and their samples."""
        idx = [self.pool.usable(i) for i in self.indices(step, micro)]
        return idx, [self.pool.sample(i, self.sample_rng(step, micro, i), self.vqa_prompt, self.caption_prompt)
                     for i in idx]

    def batch(self, step: int, micro: int = 0) -> dict:
        idx, samples = self.samples(step, micro)
        if self.cache is not None:
            batch = {"image_features": self.cache.features[idx].float()}
        else:
            batch = {"pixel_values": self.processor.images([self.pool.image(i) for i in idx])}
        if self.stage == 1:
            q = self.processor.qformer_text([s["caption"] for s in samples], truncate=True)
            if self.world_size > 1:  # the ranks all-gather their texts (ITM negatives): one common length
                pad = (0, self.processor.max_text_length - q["input_ids"].shape[1])
                q = {"input_ids": F.pad(q["input_ids"], pad, value=self.processor.qformer_tokenizer.pad_token_id),
                     "attention_mask": F.pad(q["attention_mask"], pad)}
            batch.update(input_ids=q["input_ids"], attention_mask=q["attention_mask"],
                         image_ids=torch.tensor([s["image_id"] for s in samples]))
        else:
            batch.update(self.processor.lm_text([s["prompt"] for s in samples], [s["target"] for s in samples]))
        return batch


class ProcessorStream(BatchStream):
    """Image + prompt -> target batches built by a processor's __call__(images=, text=, targets=) (EVE,
    whose images become LM tokens and so cannot be cached as encoder features). Same indices, tasks
    and rank slices as BatchStream's stage 2."""

    def __init__(self, pool: ShapesWorldPool, processor, batch_size: int, grad_accum: int, prompts: tuple[str, str],
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(pool, processor, batch_size, grad_accum, 2, prompts, seed, None, rank, world_size)

    def batch(self, step: int, micro: int = 0) -> dict:
        idx, samples = self.samples(step, micro)
        return self.processor(images=[self.pool.image(i) for i in idx], text=[s["prompt"] for s in samples],
                              targets=[s["target"] for s in samples])
