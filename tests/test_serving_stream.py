"""`vlbridge serve`: streamed requests share batched generate calls with each other and with plain requests
(greedy text equal to unbatched answers), and a client that leaves a stream frees its place and stops its
row while the rest of its batch goes on."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from test_serving import png, user  # noqa: E402
from test_serving_api import metrics, start  # noqa: E402

import vlbridge  # noqa: E402
from vlbridge.evaluation.generation import answer  # noqa: E402
from vlbridge.serving import create_app  # noqa: E402

QUESTIONS = ["what color?", "is there a big shape on the left?", "how many?", "what shape is it"]
COLORS = ("red", "blue", "green", "yellow")


@pytest.fixture(scope="module")
def server(build, tmp_path_factory):
    """(base URL, app, reference model, processor): a tiny BLIP-2 batching up to 4 requests."""
    root = tmp_path_factory.mktemp("serving_stream")
    model, processor = build("gpt2", randomize=True)
    model.drop_text_branch()
    model.save_pretrained(root / "m", processor=processor)
    served, served_processor = vlbridge.load(root / "m", device="cpu")
    app = create_app(served, served_processor, "m", max_batch_size=4, max_wait_ms=5)
    base, srv, thread = start(app)
    yield (base, app, *vlbridge.load(root / "m", device="cpu"))
    srv.should_exit = True
    thread.join(timeout=10)


def client(base: str):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="EMPTY", max_retries=0, timeout=60)


def _streamed(base: str, question: str, image, max_tokens: int, **extra) -> str:
    chunks = client(base).chat.completions.create(
        model="m", messages=user(question, image), temperature=0, max_tokens=max_tokens, stream=True, **extra
    )
    return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


def _plain(base: str, question: str, image, max_tokens: int) -> str:
    r = client(base).chat.completions.create(
        model="m", messages=user(question, image), temperature=0, max_tokens=max_tokens
    )
    return r.choices[0].message.content


@pytest.mark.parametrize("kinds", [("stream",) * 4, ("stream", "plain", "stream", "plain")], ids=["streams", "mixed"])
def test_streams_are_batched_and_equal_unbatched(server, kinds):
    base, app, model, processor = server
    images = [png(c) for c in COLORS]
    expected = [
        answer(model, processor, [im], [q], num_beams=1, max_new_tokens=5)[0] for im, q in zip(images, QUESTIONS)
    ]
    calls = len(app.state.engine.batch_sizes)
    app.state.batcher.max_wait_s = 30  # the four fill a batch, however slow the machine
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [
                pool.submit(_streamed if kind == "stream" else _plain, base, q, im, 5)
                for kind, q, im in zip(kinds, QUESTIONS, images)
            ]
            got = [f.result() for f in futures]
    finally:
        app.state.batcher.max_wait_s = 0.005
    assert app.state.engine.batch_sizes[calls:] == [4], "concurrent streams were not batched"
    assert got == expected


@pytest.fixture
def slow_lm(server):
    """Every LM call sleeps 100 ms, so that a stream is still generating when its client leaves."""
    lm = server[1].state.engine.model.lm
    handle = lm.register_forward_pre_hook(lambda module, args: time.sleep(0.1))
    yield
    handle.remove()


def test_a_client_that_leaves_a_stream_frees_its_slot(server, slow_lm):
    """Two streams in one batch; one client closes its connection after the first chunk of text: its
    row stops (fewer tokens generated than asked), its place is given back and counted as cancelled, the
    other stream ends as unbatched, and the server goes on answering."""
    base, app, model, processor = server
    before = metrics(base)
    app.state.batcher.max_batch_size, app.state.batcher.max_wait_s = 2, 30
    kept, n = {}, 20  # both rows forced to n tokens: 2 s at 100 ms a step unless a row stops
    body = {"model": "m", "messages": user("what color?", png("red")), "temperature": 0, "stream": True}
    body.update(max_tokens=n, min_tokens=n)
    try:
        with ThreadPoolExecutor(1) as pool:
            other = pool.submit(_streamed, base, QUESTIONS[2], png("blue"), n, extra_body={"min_tokens": n})
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
                assert r.status_code == 200
                for line in r.iter_lines():  # the role chunk, then the first chunk with text
                    if line.startswith("data:") and '"content": "' in line and '"content": ""' not in line:
                        break
            kept["text"] = other.result(timeout=60)
    finally:
        app.state.batcher.max_batch_size, app.state.batcher.max_wait_s = 4, 0.005
    deadline = time.time() + 30
    while metrics(base)["vlbridge_pending_requests"]:
        assert time.time() < deadline, "the stream's place was not given back"
        time.sleep(0.05)
    after = metrics(base)
    assert after["vlbridge_cancelled_total"] == before["vlbridge_cancelled_total"] + 1
    assert after["vlbridge_batch_size_count"] == before["vlbridge_batch_size_count"] + 1  # one batch of two
    assert after["vlbridge_batch_size_sum"] == before["vlbridge_batch_size_sum"] + 2
    generated = after["vlbridge_generated_tokens_total"] - before["vlbridge_generated_tokens_total"]
    assert n < generated < 2 * n, "the left row went on generating"
    blue = png("blue")
    assert (
        kept["text"]
        == answer(model, processor, [blue], [QUESTIONS[2]], num_beams=1, max_new_tokens=n, min_new_tokens=n)[0]
    )
    assert _plain(base, "what color?", png("red"), 3)  # and the server answers on


def test_jobs_that_gathered_during_a_batch_run_when_it_ends(server, slow_lm):
    """A group that waited while the worker was busy runs as soon as the running batch ends, not after
    --max-wait-ms: the worker does not idle while jobs wait."""
    base, app, _, _ = server
    batcher, engine = app.state.batcher, app.state.engine
    calls = len(engine.batch_sizes)
    batcher.max_batch_size, batcher.max_wait_s = 2, 5
    try:
        with ThreadPoolExecutor(3) as pool:
            first = [pool.submit(_plain, base, q, png("red"), 4) for q in QUESTIONS[:2]]  # full: runs at once
            while not batcher.busy:
                time.sleep(0.01)
            sent = time.monotonic()
            later = pool.submit(_plain, base, "how many?", png("blue"), 3)  # other settings: a group of its own
            later.result(timeout=60)
            waited = time.monotonic() - sent
            [f.result(timeout=60) for f in first]
    finally:
        batcher.max_batch_size, batcher.max_wait_s = 4, 0.005
    assert engine.batch_sizes[calls:] == [2, 1]
    assert waited < 4, f"the waiting group sat out --max-wait-ms ({waited:.1f} s)"
