"""`vlbridge serve`, second increment: Prometheus /metrics, the queue limit (429), the API key (401), remote
and local images (a local HTTP server on 127.0.0.1 only) and /v1/embeddings on a BLIP-2 stage-1 model, whose
image-text dot products equal the model's ITC similarity."""

from __future__ import annotations

import functools
import http.server
import re
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from test_serving import data_url, free_port, png, user  # noqa: E402

import vlbridge  # noqa: E402
from vlbridge.evaluation.generation import answer  # noqa: E402
from vlbridge.serving import create_app  # noqa: E402

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def start(app):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started
    return f"http://127.0.0.1:{port}", server, thread


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An --allow-path directory with an image, an image outside it, and a directory served over HTTP on
    127.0.0.1 with an image and a file over the 1 MB byte limit."""
    root = tmp_path_factory.mktemp("images")
    (root / "allowed").mkdir()
    (root / "web").mkdir()
    png("red").save(root / "allowed" / "red.png")
    png("red").save(root / "secret.png")
    png("red").save(root / "web" / "red.png")
    (root / "web" / "big.png").write_bytes(b"\0" * 1_200_000)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def handle(self):
            try:
                super().handle()
            except BrokenPipeError:  # the server stopped reading at its byte limit
                pass

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root / "web")))
    threading.Thread(target=web.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{web.server_address[1]}"
    web.shutdown()


@pytest.fixture(scope="module")
def servers(build, tmp_path_factory, files):
    """ "gen": a BLIP-2 with an LM, behind an API key, a queue of 1, remote images and one allowed
    directory; "ret": a stage-1 BLIP-2 (retrieval heads, no LM) with default options. Each with a
    reference copy of its model."""
    root = tmp_path_factory.mktemp("serving_api")
    out, running = {}, []
    for name, lm, options in (
        ("gen", "gpt2", dict(api_key=KEY, max_queue=1, allow_remote_images=True, allow_paths=[files[0] / "allowed"])),
        ("ret", None, {}),
    ):
        model, processor = build(lm, randomize=True)
        if lm is not None:
            model.drop_text_branch()  # a stage-2 model: no retrieval heads
        model.save_pretrained(root / name, processor=processor)
        served, served_processor = vlbridge.load(root / name, device="cpu")
        app = create_app(served, served_processor, name, max_wait_ms=5, max_body_mb=1, **options)
        base, server, thread = start(app)
        running.append((server, thread))
        out[name] = (base, app, *vlbridge.load(root / name, device="cpu"))
    yield out
    for server, thread in running:
        server.should_exit = True
        thread.join(timeout=10)


def client(base: str, key: str = KEY):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_]+="[^"]*",?)*\})? (-?[0-9.e+-]+|\+Inf|NaN)$')


def metrics(base: str) -> dict[str, float]:
    """GET /metrics parsed: every line a comment (# HELP / # TYPE) or a sample in the text format."""
    r = httpx.get(f"{base}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for line in r.text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+$", line), line
            continue
        m = SAMPLE.match(line)
        assert m, f"not a Prometheus sample: {line!r}"
        out[line.rsplit(" ", 1)[0]] = float(line.rsplit(" ", 1)[1])
    return out


def test_metrics_parse_and_move(servers):
    base = servers["gen"][0]
    before = metrics(base)
    r = client(base).chat.completions.create(
        model="gen", messages=user(png("red"), "what?"), temperature=0, max_tokens=4
    )
    assert httpx.post(f"{base}/v1/chat/completions", json={"model": "gen"}, headers=AUTH).status_code == 400
    after = metrics(base)
    ok = 'vlbridge_requests_total{route="/v1/chat/completions",status="200"}'
    bad = 'vlbridge_requests_total{route="/v1/chat/completions",status="400"}'
    assert after[ok] == before.get(ok, 0) + 1 and after[bad] == before.get(bad, 0) + 1
    errors = 'vlbridge_errors_total{route="/v1/chat/completions"}'
    assert after[errors] == before.get(errors, 0) + 1
    assert after["vlbridge_batch_size_count"] == before["vlbridge_batch_size_count"] + 1
    assert after["vlbridge_queue_wait_seconds_count"] == before["vlbridge_queue_wait_seconds_count"] + 1
    assert after["vlbridge_queue_wait_seconds_sum"] >= before["vlbridge_queue_wait_seconds_sum"]
    gained = after["vlbridge_generated_tokens_total"] - before["vlbridge_generated_tokens_total"]
    assert gained == r.usage.completion_tokens
    assert after["vlbridge_tokens_per_second"] > 0 and after["vlbridge_generate_seconds_total"] > 0
    assert after['vlbridge_batch_size_bucket{le="+Inf"}'] == after["vlbridge_batch_size_count"]
    assert after["vlbridge_pending_requests"] == 0


def test_queue_limit_answers_429_and_serves_on(servers):
    base, app, _, _ = servers["gen"]
    body = {"model": "gen", "messages": user(png("red"), "what?"), "temperature": 0, "max_tokens": 3}
    app.state.batcher.max_wait_s = 3  # the first request waits in the batcher, holding the one place
    first = {}
    thread = threading.Thread(
        target=lambda: first.update(r=httpx.post(f"{base}/v1/chat/completions", json=body, headers=AUTH, timeout=60))
    )
    try:
        thread.start()
        deadline = time.time() + 10
        while httpx.get(f"{base}/health").json()["pending"] < 1:
            assert time.time() < deadline
            time.sleep(0.01)
        rejected = metrics(base)["vlbridge_rejected_total"]
        r = httpx.post(f"{base}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and "--max-queue" in error["message"]
        with pytest.raises(openai.RateLimitError):  # streams and the client see it too
            client(base).chat.completions.create(**body, stream=True)
        assert metrics(base)["vlbridge_rejected_total"] == rejected + 2
        thread.join(timeout=60)
    finally:
        app.state.batcher.max_wait_s = 0.005
    assert first["r"].status_code == 200
    assert httpx.get(f"{base}/health").json()["pending"] == 0
    assert httpx.post(f"{base}/v1/chat/completions", json=body, headers=AUTH, timeout=60).status_code == 200
    assert list(client(base).chat.completions.create(**body, stream=True))  # a stream holds its place while it runs
    assert httpx.get(f"{base}/health").json()["pending"] == 0  # and gives it back
    long = {**body, "max_tokens": 60, "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=long, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200 and next(r.iter_lines()).startswith("data:")  # then the client leaves
    deadline = time.time() + 30
    while httpx.get(f"{base}/health").json()["pending"]:  # a stream the client left gives its place back too
        assert time.time() < deadline
        time.sleep(0.05)
    assert httpx.post(f"{base}/v1/chat/completions", json=body, headers=AUTH, timeout=60).status_code == 200


def test_api_key(servers):
    base = servers["gen"][0]
    with pytest.raises(openai.AuthenticationError):
        client(base, key="wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        client(base, key="wrong").chat.completions.create(model="gen", messages=user(png("red")), max_tokens=2)
    assert [m.id for m in client(base).models.list()] == ["gen"]
    r = httpx.get(f"{base}/v1/models")  # no header
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{base}/health").status_code == 200 and httpx.get(f"{base}/metrics").status_code == 200
    assert httpx.get(f"{servers['ret'][0]}/v1/models").status_code == 200  # no key set: open


def _ask(base: str, url: str) -> httpx.Response:
    content = [{"type": "text", "text": "what color?"}, {"type": "image_url", "image_url": {"url": url}}]
    body = {"model": "gen", "messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 3}
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers=AUTH, timeout=60)


def test_remote_and_local_images(servers, files):
    base, _, model, processor = servers["gen"]
    root, web = files
    expected = answer(model, processor, [png("red")], ["what color?"], num_beams=1, max_new_tokens=3)[0]
    allowed = root / "allowed"
    for url in (f"{web}/red.png", str(allowed / "red.png"), (allowed / "red.png").as_uri()):
        r = _ask(base, url)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == expected
    refused = {
        f"{web}/big.png": "limit",  # over the byte limit (max_body_mb=1)
        f"{web}/missing.png": "could not fetch",
        str(allowed / ".." / "secret.png"): "outside",  # escapes the directory with ..
        (root / "secret.png").as_uri(): "outside",
        str(allowed / "nothing.png"): "not a file",
    }
    for url, message in refused.items():
        r = _ask(base, url)
        assert r.status_code == 400 and message in r.json()["error"]["message"], (url, r.text)
    # a server with default options fetches nothing and reads no file
    ret = servers["ret"][0]
    for url, message in ((f"{web}/red.png", "--allow-remote-images"), ((allowed / "red.png").as_uri(), "--allow-path")):
        r = httpx.post(f"{ret}/v1/embeddings", json={"model": "ret", "input": url})
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert httpx.get(f"{base}/health").json()["status"] == "ok"


def test_embeddings_match_itc(servers):
    base, _, model, processor = servers["ret"]
    texts, image = ["a red square", "two blue circles"], png("red")
    c = client(base)
    r = c.embeddings.create(model="ret", input=[texts[0], data_url(image), texts[1]])  # base64 by default
    floats = httpx.post(
        f"{base}/v1/embeddings", json={"model": "ret", "input": [texts[0], data_url(image), texts[1]]}
    ).json()
    for f, d in zip(floats["data"], r.data):
        assert torch.allclose(torch.tensor(f["embedding"]), torch.tensor(d.embedding), atol=1e-6)
    t0, im, t1 = (torch.tensor(d.embedding) for d in r.data)
    q, e = model.config.qformer.num_query_tokens, t0.numel()
    assert im.numel() == q * e
    assert torch.allclose(t0.norm(), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(im.view(q, e).norm(dim=-1), torch.ones(q), atol=1e-5)
    inputs = processor(images=[image], qformer_text=texts)
    itc = model.itc(inputs["qformer_input_ids"], inputs["qformer_attention_mask"], inputs["pixel_values"])[0]
    dots = torch.stack([(im.view(q, e) @ t).amax() for t in (t0, t1)])
    assert torch.allclose(dots, itc, atol=1e-5)
    assert r.usage.prompt_tokens == int(inputs["qformer_attention_mask"].sum()) + q
    one = c.embeddings.create(model="ret", input="a red square")  # a single string
    assert torch.allclose(torch.tensor(one.data[0].embedding), t0, atol=1e-6)


def test_embeddings_errors(servers):
    with pytest.raises(openai.BadRequestError, match="retrieval"):
        client(servers["gen"][0]).embeddings.create(model="gen", input="a red square")
    ret = servers["ret"][0]
    with pytest.raises(openai.NotFoundError):
        client(ret).embeddings.create(model="other", input="a red square")
    for body in ({"model": "ret", "input": []}, {"model": "ret", "input": [[1, 2]]}, {"model": "ret"}):
        r = httpx.post(f"{ret}/v1/embeddings", json=body)
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(f"{ret}/v1/embeddings", json={"model": "ret", "input": "data:image/png;base64,@@"})
    assert r.status_code == 400
    with pytest.raises(openai.BadRequestError, match="generates no text"):
        client(ret).chat.completions.create(model="ret", messages=user(png("red")))


def test_cli_parses_the_new_serve_flags():
    from vlbridge.cli import build_parser

    args = build_parser().parse_args(
        [
            "serve",
            "m",
            "--max-queue",
            "4",
            "--api-key",
            "k",
            "--allow-remote-images",
            "--allow-path",
            "a",
            "--allow-path",
            "b",
        ]
    )
    assert (args.max_queue, args.api_key, args.allow_remote_images, args.allow_path) == (4, "k", True, ["a", "b"])
    args = build_parser().parse_args(["serve", "m"])
    assert (args.max_queue, args.api_key, args.allow_remote_images, args.allow_path) == (None, None, False, None)
    assert (args.max_images, args.index, args.index_cache) == (16, None, None)
    args = build_parser().parse_args(["serve", "m", "--max-images", "4", "--index", "d", "--index-cache", "c"])
    assert (args.max_images, args.index, args.index_cache) == (4, "d", "c")
    with pytest.raises(SystemExit):  # at least one image
        build_parser().parse_args(["serve", "m", "--max-images", "0"])
