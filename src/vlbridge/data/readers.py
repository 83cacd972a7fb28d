"""Readers for the caption and VQA formats users already have, producing plain dict samples.

A reader never decodes images: a sample's "image" is a reference (a path, or the raw bytes of a file
inside a tar shard). `decode_image` / `decode_samples` decode one sample at a time and turn a missing
or corrupt image into a counted skip (`SkipCounter`) rather than an exception, so one bad JPEG in ten
million cannot end a training run. Annotation files are different: a file with a missing key is a
user error and raises ValueError naming the file and the key.

Sample layouts (plain dicts)
    caption: {"image", "caption", "captions": all references of that image, "image_id"}
    vqa:     {"image", "question", "answers": <= 10 strings, "answer": multiple_choice_answer or the
              most common answer (None without annotations), "question_id", "image_id"}

Readers
    read_coco_captions  COCO captions_*.json: images[{id, file_name}], annotations[{image_id, caption}]
    read_karpathy       dataset_coco.json / dataset_flickr30k.json; split "train" includes "restval"
    read_vqa            VQAv2 questions (+ annotations) joined on question_id
    read_jsonl/read_csv one sample per row; columns: image (path, relative to image_root unless
                        absolute) and either caption / captions or question with answer / answers,
                        optional image_id, question_id. In CSV, list columns (captions, answers) are
                        "|"-separated strings; in JSONL they are lists. Rows are not grouped by image.
    read_webdataset     numbered .tar shards (img2dataset layout), streamed with tarfile; sharded over
                        ranks x DataLoader workers. find_shards: shard paths from brace lists and globs.
The JSON readers return lists (map-style, len() known); read_webdataset is a generator (no length).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from PIL import Image

from vlbridge.core.images import ImageError, load_image

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class SkipCounter:
    """Counts samples seen and skipped, remembering the first `keep` skips with their reasons.

    Each DataLoader worker holds its own copy; to report once, count in the main process (e.g. have
    the dataset return None for a bad sample and count the Nones in the collate function) or `merge`.
    """

    def __init__(self, keep: int = 20):
        self.keep, self.seen, self.skipped = keep, 0, 0
        self.examples: list[tuple[str, str]] = []
        self.reasons: Counter[str] = Counter()

    def ok(self) -> None:
        self.seen += 1

    def skip(self, ref, reason: str) -> None:
        self.seen += 1
        self.skipped += 1
        self.reasons[reason.split(" (")[0]] += 1  # "cannot decode (details)" counts as "cannot decode"
        if len(self.examples) < self.keep:
            self.examples.append((str(ref), reason))

    def merge(self, other: SkipCounter) -> None:
        self.seen += other.seen
        self.skipped += other.skipped
        self.reasons.update(other.reasons)
        self.examples.extend(other.examples[: max(0, self.keep - len(self.examples))])

    def summary(self) -> str:
        s = f"skipped {self.skipped:,} of {self.seen:,} samples"
        if self.reasons:
            s += " (" + ", ".join(f"{n:,} {why}" for why, n in self.reasons.most_common()) + ")"
        if self.examples:
            s += ": " + "; ".join(f"{ref}: {why}" for ref, why in self.examples)
            if self.skipped > len(self.examples):
                s += f"; ... ({self.skipped - len(self.examples):,} more)"
        return s

    __str__ = summary


# ---------------------------------------------------------------- decoding


def decode_image(ref, skips: SkipCounter | None = None, name: str | None = None) -> Image.Image | None:
    """Path, bytes or PIL image -> RGB PIL image; None (recorded in `skips`, else logged) when unusable."""
    name = name or (f"<{len(ref)} bytes>" if isinstance(ref, (bytes, bytearray, memoryview)) else str(ref))
    try:
        if isinstance(ref, (bytes, bytearray, memoryview)):
            with Image.open(io.BytesIO(bytes(ref))) as im:
                im.load()
                ref = im.copy()
        image = load_image(ref, name=name)
    except Exception as e:  # ImageError, and whatever PIL raises for bad bytes or decompression bombs
        if isinstance(e, ImageError):
            reason = str(e).removeprefix(f"image {name}: ")
        else:
            reason = f"cannot decode ({type(e).__name__}: {e})"
        if skips is not None:
            skips.skip(name, reason)
        else:
            log.warning("skipping image %s: %s", name, reason)
        return None
    if skips is not None:
        skips.ok()
    return image


def decode_sample(sample: dict, skips: SkipCounter | None = None) -> dict | None:
    """A copy of `sample` with "image" decoded, or None if the image is unusable (for map-style datasets:
    return this from __getitem__ and drop the Nones in the collate function)."""
    ref = sample["image"]
    name = None if isinstance(ref, (str, Path)) else str(sample.get("key", sample.get("image_id")))
    image = decode_image(ref, skips, name=name)
    return None if image is None else {**sample, "image": image}


def decode_samples(samples: Iterable[dict], skips: SkipCounter | None = None) -> Iterator[dict]:
    for sample in samples:
        if (out := decode_sample(sample, skips)) is not None:
            yield out


# ---------------------------------------------------------------- annotation files


def _load_json(path) -> dict | list:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _need(d, key: str, path, where: str):
    if not isinstance(d, dict) or key not in d:
        raise ValueError(f"{path}: {where} has no key {key!r}")
    return d[key]


def _join(root, rel) -> Path:
    return Path(rel) if root is None else Path(root) / rel


def read_coco_captions(annotation_json, image_root, *, per_image: bool = False) -> list[dict]:
    """One sample per caption (training), or with `per_image` one per image (evaluation; images
    without captions are kept, with caption None and captions [])."""
    data = _load_json(annotation_json)
    files = {}
    for i, img in enumerate(_need(data, "images", annotation_json, "the top level")):
        where = f"images[{i}]"
        files[_need(img, "id", annotation_json, where)] = _need(img, "file_name", annotation_json, where)
    refs: dict = {iid: [] for iid in files}
    for i, ann in enumerate(_need(data, "annotations", annotation_json, "the top level")):
        iid = _need(ann, "image_id", annotation_json, f"annotations[{i}]")
        if iid not in refs:
            raise ValueError(f"{annotation_json}: annotations[{i}] refers to image_id {iid!r}, which is not in images")
        refs[iid].append(_need(ann, "caption", annotation_json, f"annotations[{i}]").strip())
    return _caption_samples(((_join(image_root, files[iid]), iid, caps) for iid, caps in refs.items()), per_image)


def _caption_samples(items, per_image: bool) -> list[dict]:
    out = []
    for image, iid, caps in items:  # every sample of an image shares one `captions` list
        if per_image:
            out.append({"image": image, "caption": caps[0] if caps else None, "captions": caps, "image_id": iid})
        else:
            out.extend({"image": image, "caption": c, "captions": caps, "image_id": iid} for c in caps)
    return out


def read_karpathy(dataset_json, image_root, split: str, *, per_image: bool | None = None) -> list[dict]:
    """Karpathy splits. image = image_root/filepath/filename; image_id = cocoid (COCO) or imgid (Flickr30k).
    `per_image` defaults to False for "train" (one sample per caption) and True otherwise (evaluation)."""
    if split not in ("train", "val", "test", "restval"):
        raise ValueError(f"split must be train, val, test or restval, got {split!r}")
    wanted = {"train", "restval"} if split == "train" else {split}
    per_image = split != "train" if per_image is None else per_image
    items = []
    for i, img in enumerate(_need(_load_json(dataset_json), "images", dataset_json, "the top level")):
        where = f"images[{i}]"
        if _need(img, "split", dataset_json, where) not in wanted:
            continue
        iid = img["cocoid"] if "cocoid" in img else _need(img, "imgid", dataset_json, where)
        sentences = _need(img, "sentences", dataset_json, where)
        caps = [_need(s, "raw", dataset_json, f"{where}.sentences").strip() for s in sentences]
        rel = Path(img.get("filepath", "")) / _need(img, "filename", dataset_json, where)
        items.append((_join(image_root, rel), iid, caps))
    return _caption_samples(items, per_image)


def read_vqa(
    questions_json,
    annotations_json=None,
    image_root=None,
    image_pattern: str | Callable = "COCO_{split}_{image_id:012d}.jpg",
    split: str | None = None,
) -> list[dict]:
    """VQAv2. `image_pattern` is a format string with {split} and {image_id}, or a callable
    image_id -> path; paths are relative to image_root. `split` defaults to the questions file's
    "data_subtype" (e.g. "val2014"). Without annotations (test sets) answers is [] and answer None."""
    q = _load_json(questions_json)
    split = split or (q.get("data_subtype") if isinstance(q, dict) else None)
    if isinstance(image_pattern, str) and "{split}" in image_pattern and split is None:
        raise ValueError(f"{questions_json}: no 'data_subtype' to fill {{split}} in {image_pattern!r}; pass split=")
    anns = {}
    if annotations_json is not None:
        for i, a in enumerate(_need(_load_json(annotations_json), "annotations", annotations_json, "the top level")):
            anns[_need(a, "question_id", annotations_json, f"annotations[{i}]")] = (i, a)
    out = []
    for i, item in enumerate(_need(q, "questions", questions_json, "the top level")):
        where = f"questions[{i}]"
        qid, iid = _need(item, "question_id", questions_json, where), _need(item, "image_id", questions_json, where)
        answers, answer = [], None
        if annotations_json is not None:
            if qid not in anns:
                raise ValueError(f"{annotations_json}: no annotation for question_id {qid} ({questions_json} {where})")
            j, a = anns[qid]
            raw = _need(a, "answers", annotations_json, f"annotations[{j}]")
            answers = [_need(x, "answer", annotations_json, f"annotations[{j}].answers") for x in raw]
            answer = a.get("multiple_choice_answer") or (Counter(answers).most_common(1)[0][0] if answers else None)
        rel = image_pattern(iid) if callable(image_pattern) else image_pattern.format(split=split, image_id=iid)
        out.append(
            {
                "image": _join(image_root, rel),
                "question": _need(item, "question", questions_json, where),
                "answers": answers,
                "answer": answer,
                "question_id": qid,
                "image_id": iid,
            }
        )
    return out


def _as_list(v, sep: str | None) -> list[str]:
    if isinstance(v, list):
        return [str(x) for x in v]
    return [s.strip() for s in str(v).split(sep)] if sep else [str(v)]


def _row_sample(row, image_root, path, n: int, sep: str | None) -> dict:
    where = f"{path}:{n}"
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with an 'image' key, got {type(row).__name__}")
    row = {k: v for k, v in row.items() if v not in (None, "")}  # empty CSV cells count as absent
    if "image" not in row:
        raise ValueError(f"{where}: row has no key 'image'")
    image = row["image"]
    ref = _join(None if Path(image).is_absolute() else image_root, image)
    sample = {"image": ref, "image_id": row.get("image_id", image)}
    if "question" in row:
        answers = _as_list(row.get("answers", row.get("answer", [])), sep)
        answer = row.get("answer", Counter(answers).most_common(1)[0][0] if answers else None)
        return {
            **sample,
            "question": row["question"],
            "answers": answers,
            "answer": answer,
            "question_id": row.get("question_id", n),
        }
    if "caption" in row or "captions" in row:
        caps = _as_list(row["captions"], sep) if "captions" in row else [str(row["caption"]).strip()]
        return {**sample, "caption": str(row.get("caption", caps[0] if caps else "")).strip(), "captions": caps}
    raise ValueError(f"{where}: row has neither 'caption'/'captions' nor 'question'")


def read_jsonl(path, image_root=None) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
                out.append(_row_sample(row, image_root, path, n, sep=None))
    return out


def read_csv(path, image_root=None, sep: str = "|") -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return [_row_sample(row, image_root, path, n, sep) for n, row in enumerate(csv.DictReader(f), 2)]


# ---------------------------------------------------------------- webdataset shards


def expand_shards(pattern: str | Iterable[str]) -> list[str]:
    """Brace expansion: "d/{00000..00002}.tar" -> d/00000.tar d/00001.tar d/00002.tar (zero padding kept
    from the first number); "{a,b}" alternatives; several groups; a list of patterns."""
    if not isinstance(pattern, str):
        return [s for p in pattern for s in expand_shards(p)]
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    if (r := re.fullmatch(r"(\d+)\.\.(\d+)", body)) is not None:
        lo, hi = int(r.group(1)), int(r.group(2))
        if hi < lo:
            raise ValueError(f"shard pattern {pattern!r}: range {body} runs backwards")
        parts = [str(i).zfill(len(r.group(1))) for i in range(lo, hi + 1)]
    elif "," in body:
        parts = body.split(",")
    else:
        raise ValueError(f"shard pattern {pattern!r}: {{{body}}} is neither a range a..b nor a list a,b")
    return [s for p in parts for s in expand_shards(head + p + tail)]


def find_shards(pattern: str | Iterable[str]) -> list[str]:
    """Shard paths from brace patterns (expand_shards) whose parts may be globs: "d/*.tar" (sorted),
    "{a,b}/part-*.tar". A glob that matches nothing is an error, not an empty run."""
    out = []
    for p in expand_shards(pattern):
        if any(c in p for c in "*?["):
            if not (found := sorted(glob.glob(p))):
                raise ValueError(f"shard pattern {p!r} matches no file")
            out.extend(found)
        else:
            out.append(p)
    return out


def _split_name(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the file name."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def _wds_sample(key: str, files: dict[str, bytes], shard: str, skips: SkipCounter) -> dict | None:
    image = next((files[e] for e in IMAGE_EXTS if e in files), None)
    if image is None:
        skips.skip(f"{shard}:{key}", f"no image file (has {sorted(files)})")
        return None
    try:
        meta = json.loads(files["json"]) if "json" in files else {}
        caption = files["txt"].decode("utf-8").strip() if "txt" in files else meta.get("caption")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        skips.skip(f"{shard}:{key}", f"bad text/json ({e})")
        return None
    return {
        "image": image,
        "caption": caption,
        "captions": [] if caption is None else [caption],
        "image_id": key,
        "key": key,
        "shard": shard,
        "metadata": meta,
    }


def _iter_tar(shard: str, skips: SkipCounter) -> Iterator[dict]:
    key, files, n = None, {}, 0
    try:
        with tarfile.open(shard, "r|*") as tf:  # streaming: reads members in order, no index
            for m in tf:
                if not m.isfile():
                    continue
                k, ext = _split_name(m.name)
                if k != key and files:
                    if (s := _wds_sample(key, files, shard, skips)) is not None:
                        n += 1
                        yield s
                    files = {}
                key, files[ext] = k, tf.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        skips.skip(shard, f"unreadable shard (stopped after {n} samples: {type(e).__name__}: {e})")
        return
    if files and (s := _wds_sample(key, files, shard, skips)) is not None:
        yield s


def read_webdataset(
    shards,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    worker_id: int | None = None,
    num_workers: int | None = None,
    skips: SkipCounter | None = None,
) -> Iterator[dict]:
    """Stream samples from .tar shards (a brace pattern or a list). Reader g = rank * num_workers +
    worker_id of world_size * num_workers reads shards[g::world_size * num_workers], so every reader
    needs at least one shard. Defaults: rank/world_size from torch.distributed, worker_id/num_workers
    from torch.utils.data.get_worker_info() (call this inside IterableDataset.__iter__).

    Samples: {"image": bytes, "caption", "captions", "image_id" = "key", "shard", "metadata" (.json)}.
    Ranks can see different sample counts when shards differ in size: train DDP for a fixed number
    of steps rather than to the end of the iterator. Unreadable shards and samples without an image
    are recorded in `skips`; decoding happens later (decode_samples). A shard cut inside a file is
    recorded; one cut exactly between headers just ends early (tarfile cannot tell it apart)."""
    shards = expand_shards(shards)
    if rank is None or world_size is None:
        from vlbridge.core.dist import world

        rank, world_size = world()
    if worker_id is None or num_workers is None:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    readers = world_size * num_workers
    if len(shards) < readers:
        raise ValueError(
            f"{len(shards)} shards cannot feed {world_size} ranks x {num_workers} workers = {readers} "
            f"readers: each needs at least one shard (write more, smaller shards or use fewer workers)"
        )
    skips = skips if skips is not None else SkipCounter()
    for shard in shards[rank * num_workers + worker_id :: readers]:
        yield from _iter_tar(shard, skips)
