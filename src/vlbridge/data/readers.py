"""Readers for the caption and VQA formats users already have, producing plain dict samples.

A reader never decodes images: a sample's "image" is a reference (a path, or the raw bytes of a file
inside a tar shard). `decode_image` / `decode_samples` decode one sample at a time and turn a missing
or corrupt image into a counted skip (`SkipCounter`) rather than an exception, so one bad JPEG in ten
million cannot end a training run.

Bad rows are handled the same way. Each reader checks every row (a CSV or JSONL line, a JSON record,
a tar member) and skips a malformed one, reporting it with its place: "file:line" (CSV, JSONL),
"file images[3]" (a JSON record), "shard.tar: member 0001.txt" (tar). A `RowReport` counts the rows
read, kept and skipped by reason; it logs the first bad rows as they come and a summary once, at the
end of reading. With strict=True (data.strict) the first bad row raises ValueError with that place
and reason instead. A file that cannot be read as a whole (not JSON, no "images" list, a CSV header
without an "image" column, a webdataset shard that does not exist) raises ValueError in either mode.
Text is UTF-8 (a BOM is fine); a row with other bytes is one bad row, not the end of the file.

Sample layouts (plain dicts)
    caption: {"image", "caption", "captions": all references of that image, "image_id"}
    vqa:     {"image", "question", "answers": <= 10 strings, "answer": multiple_choice_answer or the
              most common answer (None without annotations), "question_id", "image_id"}

Readers
    read_coco_captions  COCO captions_*.json: images[{id, file_name}], annotations[{image_id, caption}]
    read_karpathy       dataset_coco.json / dataset_flickr30k.json; split "train" includes "restval"
    read_vqa            VQAv2 questions (+ annotations) joined on question_id
    read_jsonl/read_csv one sample per row; columns: image (path, relative to image_root unless
                        absolute) and either caption (one string) / captions (several) or question
                        with answer / answers, optional image_id, question_id. In CSV, list columns
                        (captions, answers) are "|"-separated strings; in JSONL they are lists of
                        strings (a list under "caption" is a bad row, not several captions). A JSONL
                        null counts as absent, a row left without image, caption or question is bad.
                        CSV rows are single lines: a quoted field may not hold a line break, so an
                        unterminated quote costs its own line, not the rest of the file; a row with
                        more or fewer fields than the header is bad. Columns or keys a reader does not
                        read are logged once by name. Rows are not grouped by image.
    read_webdataset     numbered .tar shards (img2dataset layout), streamed with tarfile; sharded over
                        ranks x DataLoader workers. find_shards: shard paths from brace lists and globs;
                        check_shards: missing shards are an error (or, allowed, a counted warning).
The JSON readers return lists (map-style, len() known); read_webdataset is a generator (no length).
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import re
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from PIL import Image

from vlbridge.core.images import ImageError, load_image

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
ROW_KEYS = ("image", "caption", "captions", "question", "answer", "answers", "image_id", "question_id")


class SkipCounter:
    """Counts samples seen and skipped, remembering the first `keep` skips with their reasons.

    Each DataLoader worker holds its own copy; to report once, count in the main process (e.g. have
    the dataset return None for a bad sample and count the Nones in the collate function) or `merge`.
    A reason reads "what (details)": the part before " (" is what gets counted.
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

    def __str__(self) -> str:
        return self.summary()


class RowReport(SkipCounter):
    """What a reader made of one annotation file: rows read (= kept + skipped), bad rows by reason with
    the first `keep` places, and (`ignored`) the columns it does not read. `skip` logs the first `keep` bad rows
    as warnings (the rest at debug level); `log_summary` logs the totals once. strict: `skip` raises
    ValueError("<place>: <reason>") instead, so a run stops at the first bad row."""

    def __init__(self, source, strict: bool = False, keep: int = 20):
        super().__init__(keep)
        self.source, self.strict = str(source), strict
        self.ignored: set[str] = set()

    def skip(self, ref, reason: str) -> None:
        if self.strict:
            raise ValueError(f"{ref}: {reason}")
        (log.warning if self.skipped < self.keep else log.debug)("skipping %s: %s", ref, reason)
        super().skip(ref, reason)

    def summary(self) -> str:
        rows = "row" if self.seen == 1 else "rows"
        s = f"{self.source}: read {self.seen:,} {rows}, kept {self.seen - self.skipped:,}, skipped {self.skipped:,}"
        if self.reasons:
            s += " (" + ", ".join(f"{n:,} {why}" for why, n in self.reasons.most_common()) + ")"
            s += "; first: " + "; ".join(f"{ref}: {why}" for ref, why in self.examples[:3])
        return s

    def log_summary(self) -> None:
        (log.warning if self.skipped else log.info)("%s", self.summary())


def _report(source, strict: bool, report: RowReport | None) -> RowReport:
    if report is None:
        return RowReport(source, strict)
    report.strict = report.strict or strict
    return report


# ---------------------------------------------------------------- decoding


def decode_image(ref, skips: SkipCounter | None = None, name: str | None = None) -> Image.Image | None:
    """Path, bytes or PIL image -> RGB PIL image (core.images.load_image: EXIF orientation applied, a
    pixel limit, the first frame of an animation); None (recorded in `skips`, else logged) when unusable."""
    name = name or (f"<{len(ref)} bytes>" if isinstance(ref, (bytes, bytearray, memoryview)) else str(ref))
    try:
        image = load_image(ref, name=name)
    except Exception as e:  # ImageError, and whatever else a broken input raises
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


# ---------------------------------------------------------------- checking rows


class _Bad(Exception):
    """A malformed row; the reader's loop reports it with the row's place."""


_NOT_UTF8 = re.compile(r"[\ud800-\udfff]")  # what bytes that are not UTF-8 become under "surrogateescape"


def _str(v, what: str, numbers: bool = False) -> str:
    """v as a stripped, non-empty string (numbers: also an int or float, as written)."""
    if v is None:
        raise _Bad(f"{what} is null")
    if numbers and isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    if not isinstance(v, str):
        raise _Bad(f"{what} is not a string ({type(v).__name__}: {str(v)[:40]})")
    if _NOT_UTF8.search(v):
        raise _Bad(f"not UTF-8 ({what} holds bytes that are not UTF-8 text)")
    if not (v := v.strip()):
        raise _Bad(f"{what} is empty")
    return v


def _field(rec, key: str, numbers: bool = False) -> str:
    if not isinstance(rec, dict):
        raise _Bad(f"not an object ({type(rec).__name__})")
    if key not in rec:
        raise _Bad(f"no key {key!r}")
    if key == "caption" and isinstance(rec[key], list):
        raise _Bad(f"'caption' is a list ({len(rec[key])} items; several captions go under 'captions')")
    return _str(rec[key], repr(key), numbers)


def _id(rec, key: str, default=None):
    """An id: an integer or a string (default when absent, if given)."""
    if not isinstance(rec, dict):
        raise _Bad(f"not an object ({type(rec).__name__})")
    if rec.get(key) is None and default is not None:
        return default
    if key not in rec:
        raise _Bad(f"no key {key!r}")
    v = rec[key]
    if v is None or isinstance(v, bool) or not isinstance(v, (int, str)):
        raise _Bad(f"{key!r} is not an integer or string ({type(v).__name__})")
    return v


def _strs(rec: dict, key: str, sep: str | None, numbers: bool = False) -> list[str]:
    """A list column: a JSON list of strings, or (CSV) a `sep`-separated string."""
    v = rec[key]
    if sep is not None:
        return [p for p in (s.strip() for s in _str(v, repr(key)).split(sep)) if p]
    if not isinstance(v, list):
        raise _Bad(f"{key!r} is not a list ({type(v).__name__})")
    return [_str(x, f"an item of {key!r}", numbers) for x in v]


def _decode_line(raw: bytes, n: int) -> str:
    if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    raw = raw.rstrip(b"\r\n")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad(
            f"not UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line; is the file in "
            f"another encoding? save it as UTF-8)"
        ) from None


# ---------------------------------------------------------------- annotation files


def _load_json(path) -> dict | list:
    """A whole JSON file. Bytes that are not UTF-8 do not fail the file: they reach the strings as
    surrogates, which `_str` reports as a bad record."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8-sig", errors="surrogateescape")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _need(d, key: str, path, where: str):
    if not isinstance(d, dict) or key not in d:
        raise ValueError(f"{path}: {where} has no key {key!r}")
    if not isinstance(d[key], list):
        raise ValueError(f"{path}: {where}'s {key!r} is not a list ({type(d[key]).__name__})")
    return d[key]


def _join(root, rel) -> Path:
    return Path(rel) if root is None else Path(root) / rel


def read_coco_captions(
    annotation_json, image_root, *, per_image: bool = False, strict: bool = False, report: RowReport | None = None
) -> list[dict]:
    """One sample per caption (training), or with `per_image` one per image (evaluation; images
    without captions are kept, with caption None and captions []). Rows: images[i] and annotations[i]
    records; a bad one (no id or file_name, a null or non-string caption, an image_id not among the
    images read, a duplicate image id) is skipped and reported as "<file> annotations[i]"."""
    path, rep = annotation_json, _report(annotation_json, strict, report)
    data = _load_json(path)
    files: dict = {}
    for i, img in enumerate(_need(data, "images", path, "the top level")):
        try:
            iid, name = _id(img, "id"), _field(img, "file_name")
            if iid in files:
                raise _Bad(f"duplicate image id ({iid!r})")
        except _Bad as e:
            rep.skip(f"{path} images[{i}]", str(e))
            continue
        files[iid] = name
        rep.ok()
    refs: dict = {iid: [] for iid in files}
    for i, ann in enumerate(_need(data, "annotations", path, "the top level")):
        try:
            iid = _id(ann, "image_id")
            if iid not in refs:
                raise _Bad(f"unknown image_id ({iid!r} is not among the images read)")
            caption = _field(ann, "caption")
        except _Bad as e:
            rep.skip(f"{path} annotations[{i}]", str(e))
            continue
        refs[iid].append(caption)
        rep.ok()
    rep.log_summary()
    return _caption_samples(((_join(image_root, files[iid]), iid, caps) for iid, caps in refs.items()), per_image)


def _caption_samples(items, per_image: bool) -> list[dict]:
    out = []
    for image, iid, caps in items:  # every sample of an image shares one `captions` list
        if per_image:
            out.append({"image": image, "caption": caps[0] if caps else None, "captions": caps, "image_id": iid})
        else:
            out.extend({"image": image, "caption": c, "captions": caps, "image_id": iid} for c in caps)
    return out


def read_karpathy(
    dataset_json,
    image_root,
    split: str,
    *,
    per_image: bool | None = None,
    strict: bool = False,
    report: RowReport | None = None,
) -> list[dict]:
    """Karpathy splits. image = image_root/filepath/filename; image_id = cocoid (COCO) or imgid (Flickr30k).
    `per_image` defaults to False for "train" (one sample per caption) and True otherwise (evaluation).
    Rows: the sentences of the split's images, and image records of the split that are broken as a
    whole; a bad sentence costs that caption only."""
    if split not in ("train", "val", "test", "restval"):
        raise ValueError(f"split must be train, val, test or restval, got {split!r}")
    path, rep = dataset_json, _report(dataset_json, strict, report)
    wanted = {"train", "restval"} if split == "train" else {split}
    per_image = split != "train" if per_image is None else per_image
    items = []
    for i, img in enumerate(_need(_load_json(path), "images", path, "the top level")):
        where = f"{path} images[{i}]"
        try:
            if _field(img, "split") not in wanted:
                continue
            iid = _id(img, "cocoid") if "cocoid" in img else _id(img, "imgid")
            rel = Path(_str(img["filepath"], "'filepath'") if img.get("filepath") else "") / _field(img, "filename")
            if not isinstance(img.get("sentences"), list):
                raise _Bad("no key 'sentences'" if "sentences" not in img else "'sentences' is not a list")
        except _Bad as e:
            rep.skip(where, str(e))
            continue
        caps = []
        for j, sentence in enumerate(img["sentences"]):
            try:
                caps.append(_field(sentence, "raw"))
            except _Bad as e:
                rep.skip(f"{where}.sentences[{j}]", str(e))
                continue
            rep.ok()
        items.append((_join(image_root, rel), iid, caps))
    rep.log_summary()
    return _caption_samples(items, per_image)


def read_vqa(
    questions_json,
    annotations_json=None,
    image_root=None,
    image_pattern: str | Callable = "COCO_{split}_{image_id:012d}.jpg",
    split: str | None = None,
    *,
    strict: bool = False,
    report: RowReport | None = None,
) -> list[dict]:
    """VQAv2. `image_pattern` is a format string with {split} and {image_id}, or a callable
    image_id -> path; paths are relative to image_root. `split` defaults to the questions file's
    "data_subtype" (e.g. "val2014"). Without annotations (test sets) answers is [] and answer None.
    Rows: the questions; a question that is malformed, or (with annotations) has no annotation or a
    malformed one, is skipped and reported, as are annotation records without a usable question_id."""
    q = _load_json(questions_json)
    rep = _report(questions_json, strict, report)
    split = split or (q.get("data_subtype") if isinstance(q, dict) else None)
    if isinstance(image_pattern, str) and "{split}" in image_pattern and split is None:
        raise ValueError(f"{questions_json}: no 'data_subtype' to fill {{split}} in {image_pattern!r}; pass split=")
    anns = {}
    if annotations_json is not None:
        for j, a in enumerate(_need(_load_json(annotations_json), "annotations", annotations_json, "the top level")):
            try:
                anns[_id(a, "question_id")] = j, a
            except _Bad as e:
                rep.skip(f"{annotations_json} annotations[{j}]", str(e))
    out = []
    for i, item in enumerate(_need(q, "questions", questions_json, "the top level")):
        where = f"{questions_json} questions[{i}]"
        try:
            qid, iid, question = _id(item, "question_id"), _id(item, "image_id"), _field(item, "question")
            try:
                rel = image_pattern(iid) if callable(image_pattern) else image_pattern.format(split=split, image_id=iid)
            except (ValueError, TypeError, KeyError, IndexError) as e:
                raise _Bad(f"image_id {iid!r} does not fit the image pattern ({type(e).__name__}: {e})") from None
            answers, answer = [], None
            if annotations_json is not None:
                if qid not in anns:
                    raise _Bad(f"no annotation (question_id {qid!r} is not in {annotations_json})")
                j, a = anns[qid]
                where = f"{annotations_json} annotations[{j}]"
                if not isinstance(a.get("answers"), list):
                    raise _Bad("no key 'answers'" if "answers" not in a else "'answers' is not a list")
                answers = [_field(x, "answer", numbers=True) for x in a["answers"]]
                mc = a.get("multiple_choice_answer")
                answer = mc.strip() if isinstance(mc, str) and mc.strip() else None
                answer = answer or (Counter(answers).most_common(1)[0][0] if answers else None)
        except _Bad as e:
            rep.skip(where, str(e))
            continue
        rep.ok()
        out.append(
            {
                "image": _join(image_root, rel),
                "question": question,
                "answers": answers,
                "answer": answer,
                "question_id": qid,
                "image_id": iid,
            }
        )
    rep.log_summary()
    return out


def _row_sample(row, image_root, n: int, sep: str | None) -> dict:
    """One JSONL object or CSV row (a dict, CSV's empty cells already dropped) -> sample; _Bad says why
    not. n: the row's line, its question_id unless it has one. A JSONL null counts as absent, but a row
    left without image, caption or question by a null is reported as such."""
    if not isinstance(row, dict):
        raise _Bad(f"not an object ({type(row).__name__})")
    nulls = [k for k in ROW_KEYS if k in row and row[k] is None]
    row = {k: v for k, v in row.items() if v is not None}
    if "image" not in row:
        raise _Bad("'image' is null" if "image" in nulls else "no key 'image'")
    image = _field(row, "image")
    ref = _join(None if Path(image).is_absolute() else image_root, image)
    sample = {"image": ref, "image_id": _id(row, "image_id", default=image)}
    if "question" in row:
        question = _field(row, "question")
        if "answers" in row:
            answers = _strs(row, "answers", sep, numbers=True)
        else:
            answers = [_field(row, "answer", numbers=True)] if "answer" in row else []
        answer = _field(row, "answer", numbers=True) if "answer" in row else None
        answer = answer or (Counter(answers).most_common(1)[0][0] if answers else None)
        return {
            **sample,
            "question": question,
            "answers": answers,
            "answer": answer,
            "question_id": _id(row, "question_id", n),
        }
    if "caption" in row or "captions" in row:
        caption = _field(row, "caption") if "caption" in row else None
        caps = _strs(row, "captions", sep) if "captions" in row else [caption]
        if not caps:
            raise _Bad("'captions' is empty")
        return {**sample, "caption": caption or caps[0], "captions": caps}
    if absent := [k for k in ("caption", "captions", "question") if k in nulls]:
        raise _Bad(f"{absent[0]!r} is null")
    raise _Bad("neither 'caption'/'captions' nor 'question'")


def read_jsonl(path, image_root=None, *, strict: bool = False, report: RowReport | None = None) -> list[dict]:
    """One JSON object per line (blank lines ignored); a bad line is reported as "<file>:<line>"."""
    rep, out = _report(path, strict, report), []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                if not (line := _decode_line(raw, n)).strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise _Bad(f"not valid JSON ({e})") from None
                sample = _row_sample(row, image_root, n, sep=None)
            except _Bad as e:
                rep.skip(f"{path}:{n}", str(e))
                continue
            rep.ok()
            rep.ignored.update(k for k in row if k not in ROW_KEYS)
            out.append(sample)
    if rep.ignored:
        log.warning("%s: keys not read: %s (read: %s)", path, ", ".join(sorted(rep.ignored)), ", ".join(ROW_KEYS))
    rep.log_summary()
    return out


def read_csv(
    path, image_root=None, sep: str = "|", *, strict: bool = False, report: RowReport | None = None
) -> list[dict]:
    """A header line, then one row per line; a bad line is reported as "<file>:<line>". Each line is
    parsed on its own (csv, strict quoting), so a quote left open ends at its line's end."""
    rep, out, header = _report(path, strict, report), [], None
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                if not (line := _decode_line(raw, n)).strip():
                    continue
                try:
                    fields = next(csv.reader([line], strict=True))
                except csv.Error as e:
                    if "unexpected end of data" in str(e):
                        raise _Bad("unterminated quote (a quoted field runs to the end of the line)") from None
                    raise _Bad(f"malformed CSV ({e})") from None
            except _Bad as e:
                if header is None:
                    raise ValueError(f"{path}:{n}: the header line is unreadable: {e}") from None
                rep.skip(f"{path}:{n}", str(e))
                continue
            if header is None:
                header = _csv_header(fields, path, n)
                rep.ignored.update(c for c in header if c not in ROW_KEYS)
                if rep.ignored:
                    log.warning("%s: columns not read: %s", path, ", ".join(sorted(rep.ignored)))
                continue
            try:
                if len(fields) != len(header):
                    raise _Bad(f"wrong number of fields ({len(fields)}, the header has {len(header)})")
                sample = _row_sample({k: v for k, v in zip(header, fields) if v != ""}, image_root, n, sep)
            except _Bad as e:
                rep.skip(f"{path}:{n}", str(e))
                continue
            rep.ok()
            out.append(sample)
    rep.log_summary()
    return out


def _csv_header(fields: list[str], path, n: int) -> list[str]:
    header = [c.strip() for c in fields]
    if dup := sorted(c for c, k in Counter(header).items() if k > 1):
        raise ValueError(f"{path}:{n}: the header repeats columns {dup}")
    if "image" not in header:
        raise ValueError(f"{path}:{n}: the header has no 'image' column (columns: {header})")
    if not {"caption", "captions", "question"} & set(header):
        raise ValueError(f"{path}:{n}: the header has no 'caption', 'captions' or 'question' column ({header})")
    return header


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


def check_shards(shards: list[str], allow_missing: bool = False, skips: SkipCounter | None = None) -> list[str]:
    """The shards that exist. A missing one is a ValueError naming the missing ones, or with
    `allow_missing` (data.allow_missing_shards) a warning, each counted in `skips` as "missing shard"."""
    missing = [s for s in shards if not os.path.exists(s)]
    if not missing:
        return list(shards)
    named = ", ".join(missing[:10]) + (f" and {len(missing) - 10:,} more" if len(missing) > 10 else "")
    if len(missing) == len(shards) or not allow_missing:
        raise ValueError(
            f"{len(missing):,} of {len(shards):,} shards do not exist: {named}"
            + ("" if allow_missing else " (data.allow_missing_shards: true trains on the others)")
        )
    log.warning("%d of %d shards do not exist, reading the others: %s", len(missing), len(shards), named)
    if skips is not None:
        for s in missing:
            skips.skip(s, "missing shard")
    gone = set(missing)
    return [s for s in shards if s not in gone]


def _split_name(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the file name."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def _wds_sample(key: str, files: dict[str, bytes], shard: str) -> dict:
    image = next((files[e] for e in IMAGE_EXTS if e in files), None)
    if image is None:
        raise _Bad(f"no image file (has {sorted(files)})")
    try:
        meta = json.loads(files["json"]) if "json" in files else {}
        caption = files["txt"].decode("utf-8").strip() if "txt" in files else meta.get("caption")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise _Bad(f"bad text/json ({e})") from None
    if caption is not None and not isinstance(caption, str):
        raise _Bad(f"bad text/json (the caption is a {type(caption).__name__}, not a string)")
    return {
        "image": image,
        "caption": caption,
        "captions": [] if caption is None else [caption],
        "image_id": key,
        "key": key,
        "shard": shard,
        "metadata": meta,
    }


def _end_probe():
    """A TarInfo class for tarfile.open(tarinfo=) that notes whether the last header block tarfile read
    was the end-of-archive zero block. tarfile stops without an error both there and where a cut file
    runs out at (or inside) a member header; only the first is a whole shard."""
    state = {"end": False}

    class Probe(tarfile.TarInfo):
        @classmethod
        def frombuf(cls, buf, encoding, errors):
            state["end"] = len(buf) == tarfile.BLOCKSIZE and buf.count(0) == tarfile.BLOCKSIZE
            return super().frombuf(buf, encoding, errors)

    return Probe, state


def _iter_tar(shard: str, skips: SkipCounter, strict: bool) -> Iterator[dict]:
    """The samples of one shard in the order written. A shard cut short keeps the samples before the
    cut and is reported as "truncated shard" with the member where it broke."""

    def bad(where: str, reason: str) -> None:
        if strict:
            raise ValueError(f"{where}: {reason}")
        skips.skip(where, reason)

    def sample(key, files):
        try:
            return _wds_sample(key, files, shard)
        except _Bad as e:
            bad(f"{shard}:{key}", str(e))

    probe, state = _end_probe()
    key, files, n, member, last = None, {}, 0, None, None  # member: being read; last: the last read whole
    problem = None  # (where, what, how, error): reported once the samples before it are out
    try:
        with tarfile.open(shard, "r|*", tarinfo=probe) as tf:  # streaming: reads members in order, no index
            for m in tf:
                if not m.isfile():
                    continue
                k, ext = _split_name(m.name)
                if k != key and files:
                    if (s := sample(key, files)) is not None:
                        n += 1
                        yield s
                    files = {}
                member = m.name
                key, files[ext] = k, tf.extractfile(m).read()
                member, last = None, m.name
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        error = f"{type(e).__name__}: {e}"
        if member is None and last is None:
            bad(shard, f"unreadable shard ({error})")
            return
        what = "truncated shard" if isinstance(e, EOFError) or "unexpected end of data" in str(e) else "corrupt shard"
        if member is not None:  # the sample whose member broke is incomplete: dropped with it
            files, problem = {}, (f"{shard}: member {member}", what, "broke inside it", error)
        else:
            problem = (f"{shard}: member {last}", what, "broke after it", error)
    else:
        if not state["end"]:
            where = f"{shard}: member {last}" if last else shard
            problem = (where, "truncated shard", "ends after it without the end-of-archive blocks", None)
    if files and (s := sample(key, files)) is not None:
        n += 1
        yield s
    if problem is not None:
        where, what, how, error = problem
        kept = f"{n} sample{'' if n == 1 else 's'} of the shard kept"
        bad(where, f"{what} ({how}; {kept}" + (f"; {error})" if error else ")"))


def read_webdataset(
    shards,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    worker_id: int | None = None,
    num_workers: int | None = None,
    skips: SkipCounter | None = None,
    strict: bool = False,
    allow_missing_shards: bool = False,
) -> Iterator[dict]:
    """Stream samples from .tar shards (a brace pattern or a list). Reader g = rank * num_workers +
    worker_id of world_size * num_workers reads shards[g::world_size * num_workers], so every reader
    needs at least one shard. Defaults: rank/world_size from torch.distributed, worker_id/num_workers
    from torch.utils.data.get_worker_info() (call this inside IterableDataset.__iter__).

    Samples: {"image": bytes, "caption", "captions", "image_id" = "key", "shard", "metadata" (.json)}.
    Ranks can see different sample counts when shards differ in size: train DDP for a fixed number
    of steps rather than to the end of the iterator. A shard that does not exist is an error (see
    check_shards, allow_missing_shards). Samples without an image or with unreadable text, and shards
    that are unreadable, corrupt or truncated (wherever the cut: inside a member or between two; the
    samples before the cut are kept) are recorded in `skips` with the shard and key or member, or with
    `strict` raise ValueError; decoding happens later (decode_samples)."""
    skips = skips if skips is not None else SkipCounter()
    shards = check_shards(expand_shards(shards), allow_missing_shards, skips)
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
    for shard in shards[rank * num_workers + worker_id :: readers]:
        yield from _iter_tar(shard, skips, strict)
