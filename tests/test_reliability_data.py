"""Lose nothing, fail loudly: every kind of bad input the data pipeline meets, made on the fly.

Each bad row, shard or image must be skipped (the good ones around it kept), counted under its reason
and reported with its place (file:line, file + record index, shard + member); strict mode must raise
with that place. The module prints one summary line with the number of bad inputs tried
(docs/reliability.md quotes it).
"""

import contextlib
import gzip
import io
import json
import logging
import os
import struct
import tarfile
import warnings
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from vlbridge.core import images as core_images
from vlbridge.core.images import ImageError, load_image
from vlbridge.data.batches import DataConfig, FeatureCache, FilesPool, ShardStream
from vlbridge.data.readers import (
    RowReport,
    SkipCounter,
    decode_image,
    decode_samples,
    read_coco_captions,
    read_csv,
    read_jsonl,
    read_karpathy,
    read_vqa,
    read_webdataset,
)

TRIED: Counter = Counter()  # bad inputs tried, by kind
STOPPED = Counter()  # runs stopped with the place of the bad input: strict mode, missing shards


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    line = f"data reliability: {sum(TRIED.values())} bad inputs tried, each reported with its reason and place ("
    line += ", ".join(f"{n} {k}" for k, n in sorted(TRIED.items()))
    line += f"); {STOPPED['runs']} strict or missing-shard runs stopped at the bad input"
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is None:
        print(line)
    else:
        with capture.global_and_fixture_disabled():  # shown without -s
            print("\n" + line)


@contextlib.contextmanager
def _stops(match: str):
    """The run ends with a ValueError naming the bad input's place (strict mode, shards that do not exist)."""
    with pytest.raises(ValueError, match=match):
        yield
    STOPPED["runs"] += 1


def _expect(report: SkipCounter, reasons: dict, places: list[str], kind: str) -> None:
    """Skips counted by reason exactly as expected, reported at these places (in this order)."""
    assert dict(report.reasons) == reasons, report.summary()
    assert report.skipped == sum(reasons.values())
    assert [ref for ref, _ in report.examples] == places, report.examples
    TRIED[kind] += report.skipped


# ---------------------------------------------------------------- CSV


def test_csv_bad_rows_are_skipped_counted_and_placed(tmp_path, caplog):
    rows = [
        b"image,caption,license",
        b"a.png,a red box,cc",
        b'b.png,"an unterminated quote,cc',  # 3
        b"c.png,a green box,cc",
        b"d.png,one,two,cc",  # 5: an unquoted comma
        b"e.png,short",  # 6
        b"f.png,caf\xe9 in Latin-1,cc",  # 7
        b'g.png,"quoted"junk,cc',  # 8
        b",no image,cc",  # 9
        b"h.png,,cc",  # 10: no caption
        b'i.png,"a ""quoted"" word, and a comma",cc',
        b"",
        b"j.png,the last row,cc",
    ]
    path = tmp_path / "d.csv"
    path.write_bytes(b"\r\n".join(rows) + b"\r\n")
    report = RowReport(path)
    with caplog.at_level(logging.INFO, "vlbridge.data.readers"):
        out = read_csv(path, tmp_path, report=report)
    assert [s["image"].name for s in out] == ["a.png", "c.png", "i.png", "j.png"]  # the rest after line 3 is kept
    assert out[2]["caption"] == 'a "quoted" word, and a comma'
    _expect(
        report,
        {
            "unterminated quote": 1,
            "wrong number of fields": 2,
            "not UTF-8": 1,
            "malformed CSV": 1,
            "no key 'image'": 1,
            "neither 'caption'/'captions' nor 'question'": 1,
        },
        [f"{path}:{n}" for n in (3, 5, 6, 7, 8, 9, 10)],
        "CSV rows",
    )
    assert report.seen == 11 and report.ignored == {"license"}
    summaries = [r.message for r in caplog.records if "read 11 rows, kept 4, skipped 7" in r.message]
    assert len(summaries) == 1 and "1 unterminated quote" in summaries[0]  # logged once
    assert sum("columns not read: license" in r.message for r in caplog.records) == 1
    with _stops(r"d\.csv:3: unterminated quote"):
        read_csv(path, tmp_path, strict=True)


def test_csv_unterminated_quote_does_not_swallow_the_file(tmp_path):
    """The reproduction: 48 rows, one open quote at row 10, used to give 10 samples, one 1,155 characters long."""
    lines = ["image,caption"] + [f"{i}.png,caption number {i}" for i in range(48)]
    lines[10] = '9.png,"caption number 9'
    (tmp_path / "q.csv").write_text("\n".join(lines) + "\n")
    report = RowReport("q.csv")
    out = read_csv(tmp_path / "q.csv", report=report)
    assert len(out) == 47 and max(len(s["caption"]) for s in out) < 20
    _expect(report, {"unterminated quote": 1}, [f"{tmp_path / 'q.csv'}:11"], "CSV rows")


def test_csv_latin1_file_and_bom(tmp_path):
    rows = ["image,caption", "a.png,plain", "b.png,café", "c.png,naïve", "d.png,also plain"]
    (tmp_path / "l1.csv").write_bytes("\n".join(rows).encode("latin-1"))
    report = RowReport("l1")
    out = read_csv(tmp_path / "l1.csv", report=report)  # was UnicodeDecodeError for the whole file
    assert [s["caption"] for s in out] == ["plain", "also plain"]
    _expect(report, {"not UTF-8": 2}, [f"{tmp_path / 'l1.csv'}:{n}" for n in (3, 4)], "CSV rows")
    assert "byte 0xe9" in report.examples[0][1]
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + "\n".join(rows).encode("utf-8"))
    out = read_csv(tmp_path / "bom.csv")
    assert [s["caption"] for s in out] == ["plain", "café", "naïve", "also plain"]
    (tmp_path / "h.csv").write_text("img,caption\na.png,x\n")
    with pytest.raises(ValueError, match=r"h\.csv:1: the header has no 'image' column"):  # the whole file
        read_csv(tmp_path / "h.csv")


# ---------------------------------------------------------------- JSONL


def test_jsonl_bad_rows(tmp_path):
    rows = [
        b'{"image": "a.png", "caption": "ok"}',
        b'{"image": "b.png", "caption": ["a", "b"]}',
        b'{"image": "c.png", "captions": ["first", "second"]}',
        b'{"image": "d.png", "caption": null}',
        b'{"image": "e.png", "captions": "one string"}',
        b'{"image": "f.png", "caption": "unterminated',
        b'["image", "x"]',
        b'{"image": 5, "caption": "x"}',
        b'{"caption": "no image"}',
        b'{"image": "g.png", "caption": "caf\xe9"}',
        b'{"image": "h.png", "caption": "   "}',
        b'{"image": "i.png", "captions": ["ok", 3]}',
        b'{"image": "j.png", "question": "how many?", "answer": 2}',
        b'{"image": "k.png", "caption": "x", "image_id": [1]}',
        b'{"image": "l.png", "caption": "kept", "url": "http://x"}',
        b'{"image": null, "caption": "x"}',
    ]
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n")
    report = RowReport(path)
    out = read_jsonl(path, report=report)
    assert [s["image"].name for s in out] == ["a.png", "c.png", "j.png", "l.png"]
    assert out[1]["captions"] == ["first", "second"] and out[1]["caption"] == "first"  # a list is several
    assert out[2]["answer"] == "2" and not any(s.get("caption", "").startswith("[") for s in out)
    _expect(
        report,
        {
            "'caption' is a list": 1,
            "'caption' is null": 1,
            "'captions' is not a list": 1,
            "not valid JSON": 1,
            "not an object": 1,
            "'image' is not a string": 1,
            "no key 'image'": 1,
            "not UTF-8": 1,
            "'caption' is empty": 1,
            "an item of 'captions' is not a string": 1,
            "'image_id' is not an integer or string": 1,
            "'image' is null": 1,
        },
        [f"{path}:{n}" for n in (2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16)],
        "JSONL rows",
    )
    assert report.ignored == {"url"}
    with _stops(r"d\.jsonl:2: 'caption' is a list \(2 items; several captions go under"):
        read_jsonl(path, strict=True)


# ---------------------------------------------------------------- COCO, Karpathy, VQA


def test_coco_bad_records(tmp_path):
    data = {
        "images": [
            {"id": 1, "file_name": "a.png"},
            {"id": 2},
            {"id": 1, "file_name": "dup.png"},
            "junk",
            {"id": 3, "file_name": "c.png"},
        ],
        "annotations": [
            {"image_id": 1, "caption": "ok"},
            {"image_id": 1, "caption": None},  # was AttributeError
            {"image_id": 9, "caption": "x"},
            {"image_id": 3, "caption": ["a"]},
            {"image_id": 3, "caption": "LATIN1"},
            {"caption": "x"},
            {"image_id": 3, "caption": "fine"},
        ],
    }
    path = tmp_path / "c.json"
    path.write_bytes(json.dumps(data).encode().replace(b"LATIN1", b"caf\xe9"))  # was UnicodeDecodeError
    report = RowReport(path)
    out = read_coco_captions(path, tmp_path, report=report)
    assert [(s["image_id"], s["caption"]) for s in out] == [(1, "ok"), (3, "fine")]
    _expect(
        report,
        {
            "no key 'file_name'": 1,
            "duplicate image id": 1,
            "not an object": 1,
            "'caption' is null": 1,
            "unknown image_id": 1,
            "'caption' is a list": 1,
            "not UTF-8": 1,
            "no key 'image_id'": 1,
        },
        [f"{path} images[{i}]" for i in (1, 2, 3)] + [f"{path} annotations[{i}]" for i in (1, 2, 3, 4, 5)],
        "JSON records",
    )
    assert report.seen == 12  # 5 images + 7 annotations
    null = tmp_path / "null.json"
    null.write_text(
        json.dumps({"images": [{"id": 1, "file_name": "a"}], "annotations": [{"image_id": 1, "caption": None}]})
    )
    with _stops(r"null\.json annotations\[0\]: 'caption' is null"):
        read_coco_captions(null, tmp_path, strict=True)


def test_karpathy_bad_records(tmp_path):
    def img(i, **kw):
        return {"filepath": "d", "filename": f"{i}.jpg", "cocoid": i, "split": "train", **kw}

    data = {
        "images": [
            img(0, sentences=[{"raw": "one"}, {"raw": "two"}]),
            img(1),
            img(2, sentences=[{"raw": None}, {"tokens": []}, {"raw": "fine"}]),
            {"cocoid": 3, "split": "train", "sentences": [{"raw": "x"}]},
            img(4, split="test", sentences="not checked: another split"),
        ]
    }
    path = tmp_path / "k.json"
    path.write_text(json.dumps(data))
    report = RowReport(path)
    out = read_karpathy(path, tmp_path, "train", report=report)
    assert [(s["image_id"], s["caption"]) for s in out] == [(0, "one"), (0, "two"), (2, "fine")]
    _expect(
        report,
        {"no key 'sentences'": 1, "'raw' is null": 1, "no key 'raw'": 1, "no key 'filename'": 1},
        [f"{path} images[1]", f"{path} images[2].sentences[0]", f"{path} images[2].sentences[1]", f"{path} images[3]"],
        "JSON records",
    )
    with _stops(r"k\.json images\[1\]: no key 'sentences'"):
        read_karpathy(path, tmp_path, "train", strict=True)


def test_vqa_bad_records(tmp_path):
    q = tmp_path / "q.json"
    a = tmp_path / "a.json"
    q.write_text(
        json.dumps(
            {
                "data_subtype": "val2014",
                "questions": [
                    {"question_id": 1, "image_id": 1, "question": "ok?"},
                    {"image_id": 2, "question": "no id"},
                    {"question_id": 3, "image_id": 3, "question": None},
                    {"question_id": 4, "image_id": 4, "question": "no annotation"},
                    {"question_id": 5, "image_id": "abc", "question": "does not fit {image_id:012d}"},
                    {"question_id": 7, "image_id": 7, "question": "a null answer"},
                ],
            }
        )
    )
    good = [{"answer": "yes"}] * 3
    a.write_text(
        json.dumps(
            {
                "annotations": [
                    {"question_id": 1, "answers": good},
                    {"answers": good},
                    {"question_id": 5, "answers": good},
                    {"question_id": 7, "answers": [{"answer": "yes"}, {"answer": None}]},
                ]
            }
        )
    )
    report = RowReport(q)
    out = read_vqa(q, a, tmp_path, report=report)
    assert [(s["question_id"], s["answer"]) for s in out] == [(1, "yes")]
    _expect(
        report,
        {
            "no key 'question_id'": 2,
            "'question' is null": 1,
            "no annotation": 1,
            "image_id 'abc' does not fit the image pattern": 1,
            "'answer' is null": 1,
        },
        [f"{a} annotations[1]"] + [f"{q} questions[{i}]" for i in (1, 2, 3, 4)] + [f"{a} annotations[3]"],
        "JSON records",
    )
    with _stops(r"a\.json annotations\[1\]: no key 'question_id'"):
        read_vqa(q, a, tmp_path, strict=True)


def test_data_config_strict_reaches_the_readers(tmp_path, caplog):
    (tmp_path / "d.csv").write_text('image,caption\na.png,fine\nb.png,"open\nc.png,fine too\n')
    with caplog.at_level(logging.INFO, "vlbridge.data.readers"):
        pool = FilesPool(DataConfig(source="csv", path=str(tmp_path / "d.csv"), num_samples=0))
    assert [s["caption"] for s in pool.samples] == ["fine", "fine too"]
    assert sum("read 3 rows, kept 2, skipped 1" in r.message for r in caplog.records) == 1
    TRIED["CSV rows"] += 1
    with _stops(r"d\.csv:3: unterminated quote"):
        FilesPool(DataConfig(source="csv", path=str(tmp_path / "d.csv"), strict=True))
    assert DataConfig().strict is False and DataConfig().allow_missing_shards is False


# ---------------------------------------------------------------- webdataset


def _png(color=(255, 0, 0), size=(4, 3), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    return buf.getvalue()


def _tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _members(n=3):
    return [
        m
        for i in range(n)
        for m in ((f"k{i}.jpg", _png((i * 80, 0, 0), (30, 30), "JPEG")), (f"k{i}.txt", b"cap %d" % i))
    ]


def test_missing_shards_are_an_error_or_counted(tmp_path, caplog):
    for k in (0, 1):
        (tmp_path / f"s-{k}.tar").write_bytes(_tar(_members(1)))
    pattern = str(tmp_path / "s-{0..9}.tar")  # 10 listed, 2 exist (was: 2 used, exit 0)
    with _stops(r"8 of 10 shards do not exist: .*s-2\.tar, .*s-9\.tar \(data\.allow_missing"):
        next(read_webdataset(pattern, rank=0, world_size=1))
    with _stops("8 of 10 shards do not exist"):
        ShardStream(DataConfig(source="webdataset", path=pattern), None, 2, 1, 1, ("", ""))
    skips = SkipCounter()
    with caplog.at_level(logging.WARNING, "vlbridge.data.readers"):
        out = list(read_webdataset(pattern, rank=0, world_size=1, skips=skips, allow_missing_shards=True))
    assert len(out) == 2 and any("8 of 10 shards do not exist" in r.message for r in caplog.records)
    _expect(skips, {"missing shard": 8}, [str(tmp_path / f"s-{k}.tar") for k in range(2, 10)], "shards")
    stream = ShardStream(
        DataConfig(source="webdataset", path=pattern, allow_missing_shards=True), None, 2, 1, 1, ("", "")
    )
    assert len(stream.shards) == 2 and stream.skips.reasons == {"missing shard": 8}
    with pytest.raises(ValueError, match="10 of 10 shards do not exist"):  # allowed, but nothing left
        next(read_webdataset(str(tmp_path / "none-{0..9}.tar"), rank=0, world_size=1, allow_missing_shards=True))


def _offsets(data: bytes) -> dict:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name: (m.offset, m.offset_data) for m in tf.getmembers()}


def _read(path, **kw):
    skips = SkipCounter()
    keys = [s["key"] for s in read_webdataset(str(path), rank=0, world_size=1, skips=skips, **kw)]
    return keys, skips


def test_truncated_shards_keep_the_samples_before_the_cut(tmp_path):
    data = _tar(_members(3))
    at = _offsets(data)
    whole, skips = _read(_write(tmp_path / "whole.tar", data))
    assert whole == ["k0", "k1", "k2"] and skips.skipped == 0  # a whole shard is not flagged
    end = at["k2.txt"][1] + 512  # the last member's data (padded), without the end-of-archive blocks
    cases = {  # cut at -> samples kept, where it broke
        at["k1.txt"][1] + 3: (["k0"], "member k1.txt", "broke inside it"),  # inside a member's data
        at["k2.jpg"][0]: (["k0", "k1"], "member k1.txt", "ends after it"),  # exactly between two members
        at["k2.jpg"][0] + 100: (["k0", "k1"], "member k1.txt", "ends after it"),  # inside a header
        at["k2.jpg"][1] + 10: (["k0", "k1"], "member k2.jpg", "broke inside it"),
        end: (["k0", "k1", "k2"], "member k2.txt", "ends after it"),  # only the end blocks missing
    }
    for i, (cut, (kept, member, how)) in enumerate(cases.items()):
        path = _write(tmp_path / f"cut{i}.tar", data[:cut])
        keys, skips = _read(path)
        assert keys == kept, (cut, keys)
        _expect(skips, {"truncated shard": 1}, [f"{path}: {member}"], "shards")
        assert how in skips.examples[0][1] and f"; {len(kept)} sample{'s' * (len(kept) > 1)} of the shard kept" in str(
            skips
        )
        with _stops(rf"cut{i}\.tar: {member}: truncated shard"):
            _read(path, strict=True)
    gz = gzip.compress(data)
    keys, skips = _read(_write(tmp_path / "cut.tar.gz", gz[: len(gz) * 2 // 3]))
    assert skips.reasons == {"truncated shard": 1} and keys == ["k0", "k1"][: len(keys)]
    TRIED["shards"] += 1
    keys, skips = _read(_write(tmp_path / "junk.tar", b"not a tar at all" * 100))
    assert keys == [] and skips.reasons == {"unreadable shard": 1}
    TRIED["shards"] += 1


def test_bad_samples_in_a_shard(tmp_path):
    members = _members(4)
    members[1] = ("k0.txt", b"caf\xe9")  # not UTF-8
    members[3] = ("k1.json", json.dumps({"caption": ["a", "list"]}).encode())
    del members[4]  # k2 has no image
    path = _write(tmp_path / "s.tar", _tar(members))
    keys, skips = _read(path)
    assert keys == ["k3"]
    _expect(
        skips, {"bad text/json": 2, "no image file": 1}, [f"{path}:k0", f"{path}:k1", f"{path}:k2"], "shard samples"
    )
    with _stops(r"s\.tar:k0: bad text/json"):
        _read(path, strict=True)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- feature cache


class _Vision(torch.nn.Linear):
    def __init__(self):
        super().__init__(3, 4)

    def forward(self, x):  # (N, 3) mean colours -> (N, 1, 4)
        return super().forward(x)[:, None]


class _Processor:
    class image_processor:
        @staticmethod
        def to_dict():
            return {"size": 4}

    @staticmethod
    def images(images):
        return torch.tensor(np.stack([np.asarray(im, np.float32).mean((0, 1)) / 255 for im in images]))


def test_feature_cache_sees_replaced_images(tmp_path):
    root = tmp_path / "img"
    root.mkdir()
    for name in ("a.png", "b.png"):
        (root / name).write_bytes(_png((255, 0, 0), (8, 8)))
    (tmp_path / "d.jsonl").write_text(
        "".join(json.dumps({"image": n, "caption": n}) + "\n" for n in ("a.png", "b.png"))
    )
    cfg = DataConfig(source="jsonl", path=str(tmp_path / "d.jsonl"), image_root=str(root), num_samples=0, group_size=1)
    torch.manual_seed(0)
    vision, cache = _Vision(), tmp_path / "cache"
    red = FeatureCache.build(vision, FilesPool(cfg), _Processor, cache).features
    assert FeatureCache.build(vision, FilesPool(cfg), _Processor, cache).features.equal(red)  # loaded, same key
    for name in ("a.png", "b.png"):  # every image replaced by a black one; the annotation file untouched
        p = root / name
        p.write_bytes(_png((0, 0, 0), (8, 8)))
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later write, whatever the clock's tick
    black = FeatureCache.build(vision, FilesPool(cfg), _Processor, cache).features
    assert len(list(cache.glob("features-*.safetensors"))) == 2 and not black.equal(red)
    expected = vision(_Processor.images([Image.new("RGB", (8, 8))])).to(torch.bfloat16)
    assert torch.equal(black[:1], expected)
    with torch.no_grad():
        vision.weight.add_(1)  # other encoder weights: another key
    FeatureCache.build(vision, FilesPool(cfg), _Processor, cache)
    assert len(list(cache.glob("features-*.safetensors"))) == 3


# ---------------------------------------------------------------- images


def _png_header(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels in a few dozen bytes (its pixel data is never reached)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue, as the sensor wrote it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    stored.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    for image in (load_image(tmp_path / "phone.jpg"), decode_image((tmp_path / "phone.jpg").read_bytes())):
        assert image.size == (20, 40)  # upright: portrait
        top, bottom = image.getpixel((10, 5)), image.getpixel((10, 35))
        assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0], (top, bottom)


def test_decompression_bombs_are_one_bad_image(tmp_path, monkeypatch):
    folder = tmp_path / "img"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png())
    (folder / "b.jpg").write_bytes(_png((0, 0, 255), fmt="JPEG"))
    (folder / "bomb.png").write_bytes(_png_header(20000, 20000))  # over twice PIL's limit: PIL's error
    (folder / "big.png").write_bytes(_png_header(10000, 10000))  # over PIL's limit: PIL's warning
    (folder / "large.png").write_bytes(_png_header(9000, 8000))  # under PIL's limit, over ours
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning may escape
        with pytest.raises(ImageError, match=r"bomb\.png: too large \(400,000,000 pixels"):
            load_image(folder / "bomb.png")
        with pytest.raises(ImageError, match=r"big\.png: too large \(10000x10000 = 100,000,000 pixels; the limit"):
            load_image(folder / "big.png")
        with pytest.raises(ImageError, match=r"large\.png: too large \(9000x8000 = 72,000,000 pixels"):
            load_image(folder / "large.png")
        skips = SkipCounter()
        samples = [{"image": p, "name": p.name} for p in sorted(folder.iterdir())]
        out = list(decode_samples(samples, skips))
    assert [s["name"] for s in out] == ["a.png", "b.jpg"]  # the others in the folder go through
    _expect(skips, {"too large": 3}, [str(folder / n) for n in ("big.png", "bomb.png", "large.png")], "images")
    assert issubclass(ImageError, ValueError)
    monkeypatch.setattr(core_images, "MAX_PIXELS", 10)  # the module setting, e.g. set low
    with pytest.raises(ImageError, match=r"a\.png: too large \(4x3 = 12 pixels; the limit is 10"):
        load_image(folder / "a.png")
    assert load_image(folder / "a.png", max_pixels=12).size == (4, 3)
    TRIED["images"] += 1


def test_animated_images_give_their_first_frame_with_one_warning(tmp_path, caplog):
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    with caplog.at_level(logging.WARNING, "vlbridge.core.images"):
        first = load_image(tmp_path / "anim.gif")
        load_image(tmp_path / "anim.gif")
    assert first.mode == "RGB" and first.getpixel((3, 3)) == (255, 0, 0)
    warned = [r.message for r in caplog.records if "animated" in r.message]
    assert len(warned) == 1 and "anim.gif: animated (3 frames): using the first frame" in warned[0]
    TRIED["images"] += 1
