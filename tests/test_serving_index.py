"""`vlbridge serve --index DIR`: a folder of images embedded once (unreadable files skipped and logged),
cached in safetensors under a key that changes with the files and the weights, searched through
POST /v1/retrieve with the same ranking as vlbridge.evaluation.generation.rank_images, and served through
GET /v1/index/images/NAME (indexed files only)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from test_serving_api import metrics, start  # noqa: E402

import vlbridge  # noqa: E402
from vlbridge.data import shapesworld  # noqa: E402
from vlbridge.evaluation.generation import rank_images  # noqa: E402
from vlbridge.serving import create_app  # noqa: E402
from vlbridge.serving.index import ImageIndex  # noqa: E402

QUERY = "a small red circle"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Six ShapesWorld scenes (one in a subfolder), a file that is not an image, a text file (ignored),
    and a secret beside the folder."""
    root = tmp_path_factory.mktemp("index")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    for i, scene in enumerate(shapesworld.make_split("test", 6)):
        shapesworld.render(scene).save(images / ("sub" if i == 5 else ".") / f"scene{i}.png")
    (images / "broken.png").write_bytes(b"not an image")
    (images / "notes.txt").write_text("not indexed")
    (root / "secret.png").write_bytes((images / "scene0.png").read_bytes())
    return images


@pytest.fixture(scope="module")
def servers(build, folder, tmp_path_factory):
    """ "ret": a stage-1 BLIP-2 serving the folder; "plain": the same model without --index."""
    root = tmp_path_factory.mktemp("serving_index")
    model, processor = build(None, randomize=True)
    model.save_pretrained(root / "ret", processor=processor)
    out, running = {}, []
    for name, options in (("ret", dict(index=folder, index_cache=root / "cache")), ("plain", {})):
        served, served_processor = vlbridge.load(root / "ret", device="cpu")
        base, server, thread = start(create_app(served, served_processor, "ret", **options))
        running.append((server, thread))
        out[name] = base
    yield out, *vlbridge.load(root / "ret", device="cpu")
    for server, thread in running:
        server.should_exit = True
        thread.join(timeout=10)


def retrieve(base: str, **body) -> httpx.Response:
    return httpx.post(f"{base}/v1/retrieve", json={"model": "ret", "query": QUERY, **body}, timeout=60)


def test_search_ranks_as_rank_images(servers, folder):
    (bases, model, processor) = servers
    base = bases["ret"]
    info = httpx.get(f"{base}/v1/index").json()
    assert (info["images"], info["skipped"]) == (6, 1)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("scene*.png"))
    r = retrieve(base, top_k=3, rerank=5)
    assert r.status_code == 200, r.text
    hits = r.json()["data"]
    expected = rank_images(model, processor, [folder / n for n in names], QUERY, k=5)[:3]
    assert [h["name"] for h in hits] == [names[i] for i, _ in expected]
    assert torch.allclose(torch.tensor([h["score"] for h in hits]), torch.tensor([s for _, s in expected]), atol=1e-4)
    assert r.json()["usage"]["prompt_tokens"] == int(processor.qformer_text([QUERY])["attention_mask"].sum())

    by_itc = retrieve(base, top_k=6, rerank=0).json()["data"]  # ITC alone: Blip2.itc's order and cosines
    inputs = processor(images=[folder / n for n in names], qformer_text=[QUERY])
    itc = model.itc(inputs["qformer_input_ids"], inputs["qformer_attention_mask"], inputs["pixel_values"])[:, 0]
    assert [h["name"] for h in by_itc] == [names[i] for i in itc.argsort(descending=True).tolist()]
    assert torch.allclose(torch.tensor([h["itc"] for h in by_itc]), itc.sort(descending=True).values, atol=1e-5)
    assert [h["score"] for h in by_itc] == [h["itc"] for h in by_itc]

    image = httpx.get(base + hits[0]["url"])  # each hit's image, as the file on disk
    assert image.status_code == 200 and image.content == (folder / hits[0]["name"]).read_bytes()
    assert metrics(base)['vlbridge_requests_total{route="/v1/index/images",status="200"}'] >= 1


@pytest.mark.parametrize(
    "path",
    ["notes.txt", "broken.png", "missing.png", "../secret.png", "%2E%2E/secret.png", "sub/../../secret.png"],
)
def test_only_indexed_files_are_served(servers, path):
    base = servers[0]["ret"]
    r = httpx.get(f"{base}/v1/index/images/{path}")
    assert r.status_code == 404 and r.json()["error"]["message"], r.text


BAD = {
    "empty query": ({"query": ""}, 400),
    "top_k 0": ({"top_k": 0}, 400),
    "rerank below top_k": ({"top_k": 5, "rerank": 2}, 400),
    "unknown rule": ({"rule": "best"}, 400),
    "query too long": ({"query": "red " * 40}, 400),
    "another model": ({"model": "other"}, 404),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_searches(servers, case):
    base = servers[0]["ret"]
    body, status = BAD[case]
    r = retrieve(base, **body)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert retrieve(base, top_k=1).status_code == 200  # and the server serves on


def test_no_index(servers, build):
    base = servers[0]["plain"]
    for r in (retrieve(base), httpx.get(f"{base}/v1/index"), httpx.get(f"{base}/v1/index/images/scene0.png")):
        assert r.status_code == 404 and "--index" in r.json()["error"]["message"], r.text
    model, processor = build("gpt2", randomize=True)
    model.drop_text_branch()  # stage 2: no retrieval heads
    with pytest.raises(ValueError, match="retrieval"):
        create_app(model, processor, "gen", index=".")


def test_cache_is_keyed_by_files_and_weights(build, folder, tmp_path, caplog):
    model, processor = build(None, randomize=True)
    with caplog.at_level(logging.INFO, logger="vlbridge.serving"):
        first = ImageIndex.build(model, processor, folder, tmp_path)
    assert not first.from_cache and first.cache_path.suffix == ".safetensors"
    assert [n for n, _ in first.skipped] == ["broken.png"]
    assert "skipped 1 unreadable" in caplog.text and "broken.png" in caplog.text
    again = ImageIndex.build(model, processor, folder, tmp_path)
    assert again.from_cache and again.cache_path == first.cache_path
    assert again.names == first.names and again.skipped == first.skipped
    assert torch.equal(again.queries, first.queries) and torch.equal(again.features, first.features)

    touched = folder / "scene1.png"
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:  # a changed file: a new key, embedded again
        assert not ImageIndex.build(model, processor, folder, tmp_path).from_cache
    finally:
        os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert ImageIndex.build(model, processor, folder, tmp_path).from_cache
    other, _ = build(None, seed=1, randomize=True)  # other weights: another key
    assert not ImageIndex.build(other, processor, folder, tmp_path).from_cache
    assert len(list(tmp_path.glob("index-*.safetensors"))) == 3
