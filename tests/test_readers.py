"""Readers on tiny fixtures in every format: parsing, skip counting of bad images, sharding."""

import csv
import io
import json
import tarfile

import pytest
from PIL import Image

from vlbridge.data.readers import (
    SkipCounter,
    decode_image,
    decode_samples,
    expand_shards,
    read_coco_captions,
    read_csv,
    read_jsonl,
    read_karpathy,
    read_vqa,
    read_webdataset,
)


def _png(color=(255, 0, 0), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), color).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def images(tmp_path):
    """img/ with a.png, b.jpg, bad.jpg (corrupt); missing.jpg is referenced but absent."""
    root = tmp_path / "img"
    root.mkdir()
    (root / "a.png").write_bytes(_png())
    (root / "b.jpg").write_bytes(_png((0, 0, 255), "JPEG"))
    (root / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


# ---------------------------------------------------------------- decoding and skips


def test_decode_paths_bytes_and_skips(images):
    skips = SkipCounter(keep=1)
    assert decode_image(images / "a.png", skips).size == (4, 3)
    im = decode_image(_png(fmt="PNG"), skips)
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (255, 0, 0)
    assert decode_image(images / "bad.jpg", skips) is None
    assert decode_image(images / "missing.jpg", skips) is None
    assert decode_image(b"garbage", skips) is None
    assert (skips.seen, skips.skipped) == (5, 3)
    assert "bad.jpg" in skips.summary() and "cannot decode" in skips.summary()
    assert skips.summary().startswith("skipped 3 of 5 samples") and "(2 more)" in skips.summary()
    assert decode_image(images / "missing.jpg") is None  # no counter: logged, still no exception


def test_decode_samples_skips_bad_images(images):
    samples = [{"image": images / n, "image_id": i} for i, n in enumerate(["a.png", "bad.jpg", "missing.jpg", "b.jpg"])]
    skips = SkipCounter()
    out = list(decode_samples(samples, skips))
    assert [s["image_id"] for s in out] == [0, 3] and all(isinstance(s["image"], Image.Image) for s in out)
    assert (skips.seen, skips.skipped) == (4, 2)
    assert "file not found" in str(skips) and samples[0]["image"] == images / "a.png"  # inputs untouched
    other = SkipCounter()
    other.skip("x", "broken")
    skips.merge(other)
    assert (skips.seen, skips.skipped) == (5, 3)


# ---------------------------------------------------------------- COCO, Karpathy


def test_coco_captions(tmp_path, images):
    ann = _write(
        tmp_path / "captions.json",
        {
            "images": [
                {"id": 1, "file_name": "a.png"},
                {"id": 2, "file_name": "missing.jpg"},
                {"id": 3, "file_name": "b.jpg"},
            ],
            "annotations": [
                {"image_id": 1, "id": 10, "caption": " A red box. "},
                {"image_id": 2, "id": 11, "caption": "gone"},
                {"image_id": 1, "id": 12, "caption": "red"},
            ],
        },
    )
    samples = read_coco_captions(ann, images)
    assert [(s["image_id"], s["caption"]) for s in samples] == [(1, "A red box."), (1, "red"), (2, "gone")]
    assert samples[0]["captions"] == ["A red box.", "red"] and samples[0]["image"] == images / "a.png"
    per_image = read_coco_captions(ann, images, per_image=True)
    assert [(s["image_id"], s["captions"]) for s in per_image] == [(1, ["A red box.", "red"]), (2, ["gone"]), (3, [])]
    skips = SkipCounter()
    assert [s["image_id"] for s in decode_samples(samples, skips)] == [1, 1]
    assert skips.skipped == 1


def test_coco_malformed(tmp_path):
    # a bad record is skipped and counted (tests/test_reliability_data.py), or with strict raises
    bad = _write(tmp_path / "c.json", {"images": [{"id": 1}], "annotations": []})
    assert read_coco_captions(bad, tmp_path) == []
    with pytest.raises(ValueError, match=r"c\.json images\[0\]: no key 'file_name'"):
        read_coco_captions(bad, tmp_path, strict=True)
    bad = _write(tmp_path / "d.json", {"images": [{"id": 1, "file_name": "a"}]})
    with pytest.raises(ValueError, match="d.json.*'annotations'"):  # a whole file's problem: raises either way
        read_coco_captions(bad, tmp_path)
    bad = _write(tmp_path / "e.json", {"images": [], "annotations": [{"image_id": 5, "caption": "x"}]})
    assert read_coco_captions(bad, tmp_path) == []
    with pytest.raises(ValueError, match=r"e\.json annotations\[0\]: unknown image_id \(5 "):
        read_coco_captions(bad, tmp_path, strict=True)
    (tmp_path / "f.json").write_text("{not json")
    with pytest.raises(ValueError, match="f.json: not valid JSON"):
        read_coco_captions(tmp_path / "f.json", tmp_path)


def test_karpathy_splits(tmp_path):
    def img(i, split):
        return {
            "filepath": "val2014",
            "filename": f"{i}.jpg",
            "cocoid": i,
            "split": split,
            "sentences": [{"raw": f"caption {i} one"}, {"raw": f"caption {i} two "}],
        }

    path = _write(
        tmp_path / "dataset_coco.json",
        {"images": [img(1, "train"), img(2, "restval"), img(3, "val"), img(4, "test"), img(5, "test")]},
    )
    train = read_karpathy(path, tmp_path, "train")
    assert [s["image_id"] for s in train] == [1, 1, 2, 2] and train[1]["caption"] == "caption 1 two"
    assert [s["image_id"] for s in read_karpathy(path, tmp_path, "restval")] == [2]
    test = read_karpathy(path, tmp_path, "test")  # evaluation: one sample per image with all references
    assert [s["image_id"] for s in test] == [4, 5] and test[0]["captions"] == ["caption 4 one", "caption 4 two"]
    assert test[0]["image"] == tmp_path / "val2014" / "4.jpg"
    assert len(read_karpathy(path, tmp_path, "val", per_image=False)) == 2
    with pytest.raises(ValueError, match="split must be"):
        read_karpathy(path, tmp_path, "dev")
    flickr = _write(
        tmp_path / "f.json",
        {"images": [{"filename": "x.jpg", "imgid": 7, "split": "test", "sentences": [{"raw": "a"}]}]},
    )
    assert read_karpathy(flickr, tmp_path, "test")[0]["image_id"] == 7
    bad = _write(tmp_path / "bad.json", {"images": [{"filename": "x.jpg", "cocoid": 1, "split": "test"}]})
    assert read_karpathy(bad, tmp_path, "test") == []
    with pytest.raises(ValueError, match=r"bad\.json images\[0\]: no key 'sentences'"):
        read_karpathy(bad, tmp_path, "test", strict=True)


# ---------------------------------------------------------------- VQA


def test_vqa_join(tmp_path):
    q = _write(
        tmp_path / "q.json",
        {
            "data_subtype": "val2014",
            "questions": [
                {"image_id": 42, "question": "What color?", "question_id": 420},
                {"image_id": 7, "question": "How many?", "question_id": 70},
            ],
        },
    )
    answers = ["red"] * 6 + ["maroon"] * 4
    a = _write(
        tmp_path / "a.json",
        {
            "annotations": [
                {
                    "question_id": 70,
                    "image_id": 7,
                    "multiple_choice_answer": "2",
                    "answers": [{"answer": x, "answer_id": i + 1} for i, x in enumerate(["2"] * 9 + ["3"])],
                },
                {"question_id": 420, "image_id": 42, "answers": [{"answer": x} for x in answers]},
            ]
        },
    )
    out = read_vqa(q, a, tmp_path)
    assert out[0]["image"] == tmp_path / "COCO_val2014_000000000042.jpg"
    assert out[0]["answers"] == answers and out[0]["answer"] == "red"  # most common when no multiple_choice_answer
    assert out[1]["answer"] == "2" and out[1]["question_id"] == 70 and out[1]["question"] == "How many?"
    test = read_vqa(q, None, tmp_path, image_pattern=lambda i: f"imgs/{i}.png")
    assert test[1]["answers"] == [] and test[1]["answer"] is None and test[1]["image"] == tmp_path / "imgs/7.png"
    partial = _write(tmp_path / "p.json", {"annotations": [{"question_id": 420, "answers": []}]})
    assert [s["question_id"] for s in read_vqa(q, partial, tmp_path)] == [420]  # question 70 skipped
    with pytest.raises(ValueError, match=r"q\.json questions\[1\]: no annotation \(question_id 70 is not in .*p\.json"):
        read_vqa(q, partial, tmp_path, strict=True)
    nosplit = _write(tmp_path / "n.json", {"questions": []})
    with pytest.raises(ValueError, match="pass split="):
        read_vqa(nosplit, None, tmp_path)
    assert read_vqa(nosplit, None, tmp_path, split="test2015") == []


# ---------------------------------------------------------------- JSONL, CSV


def test_jsonl_and_csv(tmp_path, images):
    rows = [
        {"image": "a.png", "caption": "a red box"},
        {"image": str(images / "b.jpg"), "captions": ["blue", "a blue box"], "image_id": "b"},
        {"image": "a.png", "question": "color?", "answers": ["red", "red", "pink"], "question_id": 5},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = read_jsonl(tmp_path / "d.jsonl", images)
    assert out[0] == {"image": images / "a.png", "image_id": "a.png", "caption": "a red box", "captions": ["a red box"]}
    assert out[1]["image"] == images / "b.jpg" and out[1]["caption"] == "blue" and out[1]["image_id"] == "b"
    assert out[2]["answer"] == "red" and out[2]["question_id"] == 5
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["image", "caption", "question", "answer", "answers"])
        w.writeheader()
        w.writerow({"image": "a.png", "caption": "a red box"})
        w.writerow({"image": "b.jpg", "question": "color?", "answers": "blue | navy|blue"})
        w.writerow({"image": "b.jpg", "question": "shape?", "answer": "box"})
    out = read_csv(tmp_path / "d.csv", images)
    assert out[0]["caption"] == "a red box" and out[0]["image"] == images / "a.png"
    assert out[1]["answers"] == ["blue", "navy", "blue"] and out[1]["answer"] == "blue" and out[1]["question_id"] == 3
    assert out[2]["answers"] == ["box"] and out[2]["answer"] == "box"
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "caption": "x"}\n{"caption": "y"}\n')
    assert [s["caption"] for s in read_jsonl(tmp_path / "bad.jsonl", images)] == ["x"]  # line 2 skipped
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: no key 'image'"):
        read_jsonl(tmp_path / "bad.jsonl", images, strict=True)
    (tmp_path / "bad2.jsonl").write_text('{"image": "a.png"}\n')
    with pytest.raises(ValueError, match=r"bad2\.jsonl:1: neither 'caption'"):
        read_jsonl(tmp_path / "bad2.jsonl", images, strict=True)


# ---------------------------------------------------------------- webdataset


def _shard(path, samples):
    with tarfile.open(path, "w") as tf:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path):
    """4 shards x 2 samples; shard 1 holds a corrupt image and a sample without an image."""
    for s in range(4):
        files = []
        for j in range(2):
            key = f"{s:05d}{j:04d}"
            files += [
                (f"{key}.jpg", _png((s * 60, j * 100, 0), "JPEG")),
                (f"{key}.txt", f"shard {s} sample {j}".encode()),
                (f"{key}.json", json.dumps({"width": 4}).encode()),
            ]
        if s == 1:
            files[0] = ("000010000.jpg", b"corrupt")
            files = files + [("000010002.txt", b"caption without image")]
        _shard(tmp_path / f"data-{s:05d}.tar", files)
    return str(tmp_path / "data-{00000..00003}.tar")


def test_webdataset_reads_groups_and_skips(shards):
    skips = SkipCounter()
    samples = list(read_webdataset(shards, rank=0, world_size=1, skips=skips))
    assert [s["key"] for s in samples] == [f"{s:05d}{j:04d}" for s in range(4) for j in range(2)]
    assert samples[3]["caption"] == "shard 1 sample 1" and samples[3]["metadata"] == {"width": 4}
    assert isinstance(samples[0]["image"], bytes) and samples[0]["captions"] == ["shard 0 sample 0"]
    assert skips.skipped == 1 and "no image" in str(skips)  # the .txt-only sample
    decoded = list(decode_samples(samples, skips))
    assert len(decoded) == 7 and decoded[0]["image"].size == (4, 3)
    assert skips.skipped == 2 and "000010000" in str(skips)


def test_webdataset_rank_and_worker_sharding(shards):
    def keys(**kw):
        return [s["key"][:5] for s in read_webdataset(shards, **kw) if s["key"].endswith("0000")]

    assert keys(rank=0, world_size=2) == ["00000", "00002"] and keys(rank=1, world_size=2) == ["00001", "00003"]
    got = [keys(rank=r, world_size=2, worker_id=w, num_workers=2) for r in range(2) for w in range(2)]
    assert got == [["00000"], ["00001"], ["00002"], ["00003"]]  # reader r * workers + w reads shard r * workers + w
    with pytest.raises(ValueError, match="4 shards cannot feed 2 ranks x 3 workers = 6 readers"):
        next(read_webdataset(shards, rank=0, world_size=2, worker_id=0, num_workers=3))


def test_webdataset_truncated_and_missing_shard(tmp_path, shards):
    good = expand_shards(shards)[0]
    data = open(good, "rb").read()
    (tmp_path / "cut.tar").write_bytes(data[:1000])  # ends inside the first image's data
    skips = SkipCounter()
    listed = [str(tmp_path / "cut.tar"), str(tmp_path / "nope.tar"), good]
    with pytest.raises(ValueError, match="1 of 3 shards do not exist: .*nope.tar"):  # no longer skipped silently
        next(read_webdataset(listed, rank=0, world_size=1, skips=skips))
    out = list(read_webdataset(listed, rank=0, world_size=1, skips=skips, allow_missing_shards=True))
    assert [s["key"] for s in out] == ["000000000", "000000001"]  # the good shard is still read
    assert skips.skipped == 2 and dict(skips.reasons) == {"missing shard": 1, "truncated shard": 1}
    assert "cut.tar: member 000000000.jpg" in str(skips)


def test_expand_shards():
    assert expand_shards("data/{00000..00002}.tar") == ["data/00000.tar", "data/00001.tar", "data/00002.tar"]
    assert expand_shards("{a,b}/{8..10}.tar") == ["a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar", "b/10.tar"]
    assert expand_shards(["x.tar", "y{1..2}.tar"]) == ["x.tar", "y1.tar", "y2.tar"]
    assert len(expand_shards("s/{000000..001023}.tar")) == 1024
    with pytest.raises(ValueError, match="backwards"):
        expand_shards("{5..1}.tar")
    with pytest.raises(ValueError, match="neither a range"):
        expand_shards("{abc}.tar")
