"""`vlbridge serve`: a real uvicorn server on 127.0.0.1 per design, called with the official openai client
(and httpx for bodies the client would not send). Greedy answers equal vlbridge.evaluation.generation's,
batched answers equal unbatched ones, and every bad request is a 4xx OpenAI-style error after which the
server still serves."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from test_interface import _create  # noqa: E402  (the tiny models of each design)

import vlbridge  # noqa: E402
from vlbridge.data.conversations import plain_text  # noqa: E402
from vlbridge.evaluation.generation import answer, caption, generate_texts  # noqa: E402
from vlbridge.serving import create_app  # noqa: E402

DESIGNS = ("blip2", "flamingo", "eve")
COLORS = ("red", "blue", "green", "yellow")
MAX_PIXELS = 64 * 64  # the servers' image limit, so that "too large" needs no big image


def png(color: str, size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), color)


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(*parts) -> list[dict]:
    """One user message: str parts are text, PIL images are image_url parts."""
    content = [
        {"type": "text", "text": p} if isinstance(p, str) else {"type": "image_url", "image_url": {"url": data_url(p)}}
        for p in parts
    ]
    return [{"role": "user", "content": content}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers(tiny_configs, build, tmp_path_factory):
    """{design: (base URL, app, reference model, processor)}: one server per design, and the same saved
    model loaded a second time for the reference answers."""
    root = tmp_path_factory.mktemp("serving")
    out, running = {}, []
    for design in DESIGNS:
        model, processor = _create(design, tiny_configs, build)
        model.save_pretrained(root / design, processor=processor)
        served, served_processor = vlbridge.load(root / design, device="cpu")
        app = create_app(
            served,
            served_processor,
            design,
            max_batch_size=4,
            max_wait_ms=20,
            max_body_mb=1,
            max_image_pixels=MAX_PIXELS,
        )
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        running.append((server, thread))
        reference, ref_processor = vlbridge.load(root / design, device="cpu")
        out[design] = (f"http://127.0.0.1:{port}", app, reference, ref_processor)
    for server, _ in running:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.02)
        assert server.started
    yield out
    for server, thread in running:
        server.should_exit = True
        thread.join(timeout=10)


def client(base: str):
    return openai.OpenAI(base_url=f"{base}/v1", api_key="EMPTY", max_retries=0, timeout=60)


@pytest.mark.parametrize("design", DESIGNS)
def test_greedy_answers_equal_the_library(servers, design):
    base, _, model, processor = servers[design]
    c = client(base)
    assert [m.id for m in c.models.list()] == [design]
    image = png("red")
    r = c.chat.completions.create(model=design, messages=user("what color is it?", image), temperature=0, max_tokens=3)
    expected = answer(model, processor, [image], ["what color is it?"], num_beams=1, max_new_tokens=3)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected[0]
    # usage: the prompt as the LM reads it (BLIP-2's query tokens sit in front of its input ids)
    batch = processor.prompt_inputs(
        [image], [model.config.vqa_prompt.format("what color is it?")], ["what color is it?"]
    )
    extra = model.config.qformer.num_query_tokens if design == "blip2" else 0
    assert r.usage.prompt_tokens == int(batch["attention_mask"].sum()) + extra
    assert 1 <= r.usage.completion_tokens <= 3
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 3 else "stop")

    # no text: a caption with the model's caption prompt; a plain string content is text too
    r = c.chat.completions.create(model=design, messages=user(image), temperature=0, max_completion_tokens=4)
    assert (
        r.choices[0].message.content
        == caption(model, processor, [image], num_beams=1, max_new_tokens=4, min_new_tokens=0)[0]
    )
    r = c.chat.completions.create(
        model=design,
        messages=[{"role": "system", "content": "be brief"}, *user("hi"), *user("how many?", image)],
        temperature=0,
        max_tokens=3,
    )
    vqa = model.config.vqa_prompt
    if design == "flamingo":  # the earlier turn stays in its context, a chunk of its own; no system prompt
        prompt = vqa.format("hi") + "<|endofchunk|><image>" + vqa.format("how many?")
        expected = generate_texts(model, processor, [[image]], [prompt], dict(num_beams=1, max_new_tokens=3), 1)
    else:  # one image: the earlier turn's text stays in the prompt, as a conversation in training
        prompt = plain_text([{"role": "user", "content": "hi"}, {"role": "user", "content": "how many?"}], vqa)
        expected = generate_texts(
            model, processor, [image], [prompt], dict(num_beams=1, max_new_tokens=3), 1, questions=["how many?"]
        )
    assert r.choices[0].message.content == expected[0]


@pytest.mark.parametrize("design", DESIGNS)
def test_stream_equals_plain(servers, design):
    base, _, _, _ = servers[design]
    c = client(base)
    kwargs = dict(model=design, messages=user(png("blue"), "what is it?"), temperature=0, max_tokens=6)
    plain = c.chat.completions.create(**kwargs)
    chunks = list(c.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == plain.choices[0].message.content
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish == [plain.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert not any(ch.usage for ch in c.chat.completions.create(**kwargs, stream=True))  # usage only when asked


@pytest.mark.parametrize("design", DESIGNS)
def test_concurrent_requests_are_batched_and_equal_unbatched(servers, design):
    base, app, model, processor = servers[design]
    c = client(base)
    questions = ["what color?", "is there a big shape on the left?", "how many?", "what shape is it"]
    images = [png(color) for color in COLORS]
    expected = [
        answer(model, processor, [im], [q], num_beams=1, max_new_tokens=4)[0] for im, q in zip(images, questions)
    ]
    calls = len(app.state.engine.batch_sizes)

    def ask(i):
        r = c.chat.completions.create(model=design, messages=user(questions[i], images[i]), temperature=0, max_tokens=4)
        return r.choices[0].message.content

    batcher = app.state.batcher
    batcher.max_wait_s = 30  # the four fill a batch (max_batch_size=4), however slow the machine
    try:
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(ask, range(4)))
    finally:
        batcher.max_wait_s = 0.02
    assert got == expected
    assert app.state.engine.batch_sizes[calls:] == [4], "concurrent requests were not batched"


def test_flamingo_interleaved_images(servers):
    base, _, model, processor = servers["flamingo"]
    red, blue = png("red"), png("blue")
    r = client(base).chat.completions.create(
        model="flamingo", messages=user(red, "a red square.", blue, "what color?"), temperature=0, max_tokens=4
    )
    prompt = "<image>a red square.<image>" + model.config.vqa_prompt.format("what color?")
    expected = generate_texts(model, processor, [[red, blue]], [prompt], dict(num_beams=1, max_new_tokens=4), 1)
    assert r.choices[0].message.content == expected[0]


def test_flamingo_conversation(servers):
    """Earlier user/assistant turns are few-shot examples: the same answer as the library's `answer` with
    examples; a text-only follow-up asks about the latest image."""
    base, _, model, processor = servers["flamingo"]
    c = client(base)
    red, blue, green = png("red"), png("blue"), png("green")
    messages = [
        {"role": "system", "content": "answer in one word"},
        *user(red, "what color?"),
        {"role": "assistant", "content": "red"},
        *user("what color?", blue),
        {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
        *user(green, "what color?"),
    ]
    r = c.chat.completions.create(model="flamingo", messages=messages, temperature=0, max_tokens=4)
    shots = [(red, "what color?", "red"), (blue, "what color?", "blue")]
    expected = answer(model, processor, [green], ["what color?"], examples=shots, num_beams=1, max_new_tokens=4)
    assert r.choices[0].message.content == expected[0]
    vqa = model.config.vqa_prompt.format("what color?")
    three = processor.prompt_inputs([green], [vqa], examples=[(im, vqa, a) for im, _, a in shots])
    assert r.usage.prompt_tokens == int(three["attention_mask"].sum())  # the whole context was read

    follow_up = [*user(red, "what color?"), {"role": "assistant", "content": "red"}, *user("which shape?")]
    r = c.chat.completions.create(model="flamingo", messages=follow_up, temperature=0, max_tokens=4)
    prompt = f"<image>{vqa} red<|endofchunk|>{model.config.vqa_prompt.format('which shape?')}"
    expected = generate_texts(model, processor, [[red]], [prompt], dict(num_beams=1, max_new_tokens=4), 1)
    assert r.choices[0].message.content == expected[0]


def test_flamingo_conversations_batched_equal_alone(servers):
    """Two conversations of different lengths with as many images share one generate call (left-padded)
    and answer as each alone."""
    from vlbridge.serving.schemas import ChatRequest

    engine = servers["flamingo"][1].state.engine
    red, blue, green = png("red"), png("blue"), png("green")
    conversations = [
        [*user(red, "what color?"), {"role": "assistant", "content": "red"}, *user(blue, "and this one?")],
        [*user("a picture.", green, "a green one."), *user(red), {"role": "assistant", "content": "a"}, *user("why?")],
    ]
    jobs = [engine.job(ChatRequest(model="flamingo", messages=m, temperature=0, max_tokens=5)) for m in conversations]
    assert jobs[0].key == jobs[1].key  # the same settings and image count: one batch
    together = engine.executor.submit(engine.run, jobs).result()
    alone = [engine.executor.submit(engine.run, [j]).result()[0] for j in jobs]
    assert [r.choices[0].text for r in together] == [r.choices[0].text for r in alone]
    assert [r.prompt_tokens for r in together] == [r.prompt_tokens for r in alone]
    assert together[0].prompt_tokens != together[1].prompt_tokens


@pytest.mark.parametrize(
    "messages, message",
    [
        (user(*[png("red")] * 17, "what?"), "at most 16 (--max-images)"),
        (user(png("red"), "what is <image> here?"), "<image>"),
        (
            [
                *user(png("red")),
                {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]},
                *user("hi"),
            ],
            "only user messages",
        ),
        ([*user(png("red")), *user("")], "empty"),
    ],
    ids=["too many images", "image token in text", "assistant image", "empty turn"],
)
def test_flamingo_bad_conversations(servers, messages, message):
    base = servers["flamingo"][0]
    r = _post(base, {"model": "flamingo", "messages": messages, "max_tokens": 2})
    assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
    assert httpx.get(f"{base}/health").json()["status"] == "ok"


def test_one_image_models_read_it_from_an_earlier_turn(servers):
    base, _, model, processor = servers["eve"]
    image = png("yellow")
    messages = [*user(image, "a first question"), {"role": "assistant", "content": "red"}, *user("what color?")]
    r = client(base).chat.completions.create(model="eve", messages=messages, temperature=0, max_tokens=3)
    prompt = "Question: a first question Answer: red Question: what color? Answer:"  # the conversation's text
    assert model.config.vqa_prompt == "Question: {} Answer:"
    expected = generate_texts(model, processor, [image], [prompt], dict(num_beams=1, max_new_tokens=3), 1)
    assert r.choices[0].message.content == expected[0]


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty`")
def test_sampling_beams_and_stop(servers):
    base, _, _, _ = servers["blip2"]
    c = client(base)
    msgs = user(png("green"), "what is it?")
    sample = dict(
        model="blip2",
        messages=msgs,
        max_tokens=5,
        temperature=0.9,
        top_p=0.9,
        seed=3,
        n=2,
        extra_body={"top_k": 20, "repetition_penalty": 1.1, "min_tokens": 2},
    )
    a, b = c.chat.completions.create(**sample), c.chat.completions.create(**sample)
    assert len(a.choices) == 2 and [ch.message.content for ch in a.choices] == [ch.message.content for ch in b.choices]
    assert all(ch.finish_reason in ("stop", "length") for ch in a.choices)
    beams = c.chat.completions.create(
        model="blip2", messages=msgs, max_tokens=4, n=2, extra_body={"use_beam_search": True, "length_penalty": 0.5}
    )
    assert len(beams.choices) == 2
    greedy = c.chat.completions.create(model="blip2", messages=msgs, temperature=0, n=2, max_tokens=12)
    full = greedy.choices[0].message.content
    assert greedy.choices[1].message.content == full
    stop = full.strip()[2:4]
    assert stop.strip(), f"greedy text too short to pick a stop string from: {full!r}"
    expected = full[: full.find(stop)].rstrip()
    r = c.chat.completions.create(model="blip2", messages=msgs, temperature=0, max_tokens=12, stop=[stop])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    streamed = c.chat.completions.create(
        model="blip2", messages=msgs, temperature=0, max_tokens=12, stop=stop, stream=True
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == expected


def _post(base: str, body, raw: bool = False) -> httpx.Response:
    if raw:
        return httpx.post(f"{base}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _one_part(url: str) -> dict:
    """A request whose user message is one image_url part."""
    return {"model": "blip2", "messages": [{"role": "user", "content": [_image_part(url)]}]}


BAD = {
    "malformed JSON": (b'{"model": "blip2", "messages": [', 400),
    "no messages": ({"model": "blip2"}, 400),
    "temperature out of range": ({"model": "blip2", "messages": user(png("red")), "temperature": 7}, 400),
    "unknown part type": ({"model": "blip2", "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400),
    "bad base64": (_one_part("data:image/png;base64,@@@"), 400),
    "not an image": (_one_part("data:image/png;base64," + base64.b64encode(b"hello").decode()), 400),
    "not a data URL": (_one_part("data:image/png,rawbytes"), 400),
    "image too large": ({"model": "blip2", "messages": user(png("red", 100))}, 400),
    "remote url": (_one_part("https://example.com/a.png"), 400),
    "no image": ({"model": "blip2", "messages": [{"role": "user", "content": "what color?"}]}, 400),
    "two images": ({"model": "blip2", "messages": user(png("red"), png("blue"), "which?")}, 400),
    "two images in two turns": ({"model": "blip2", "messages": [*user(png("red"), "a"), *user(png("blue"), "b")]}, 400),
    "ends with the assistant": (
        {"model": "blip2", "messages": [*user(png("red")), {"role": "assistant", "content": "red"}]},
        400,
    ),
    "prompt too long": ({"model": "blip2", "messages": user(png("red"), "why " * 200), "max_tokens": 4}, 400),
    "too long, streamed": ({"model": "blip2", "messages": user(png("red"), "why " * 200), "stream": True}, 400),
    "body too large": (b"x" * (1_100_000), 413),
    "unknown model": ({"model": "gpt-4o", "messages": user(png("red"))}, 404),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests(servers, case):
    base = servers["blip2"][0]
    body, status = BAD[case]
    r = _post(base, body, raw=isinstance(body, bytes))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if case == "prompt too long":
        assert "positions" in error["message"]  # the LM's limit is named
    health = httpx.get(f"{base}/health").json()
    assert health["status"] == "ok" and health["pending"] == 0  # a refused request holds no place


def test_bad_request_through_the_client(servers):
    base = servers["blip2"][0]
    with pytest.raises(openai.BadRequestError, match="one image"):
        client(base).chat.completions.create(model="blip2", messages=user(png("red"), png("blue")))
    with pytest.raises(openai.NotFoundError):
        client(base).chat.completions.create(model="nope", messages=user(png("red")))
    assert httpx.get(f"{base}/nowhere").status_code == 404


def test_cli_parses_serve():
    from vlbridge.cli import build_parser

    args = build_parser().parse_args(["serve", "m", "--port", "0", "--max-batch-size", "2", "--max-body-mb", "5"])
    assert (args.func.__name__, args.port, args.max_batch_size, args.max_body_mb) == ("cmd_serve", 0, 2, 5.0)


def test_a_bad_request_in_a_batch_fails_alone(servers):
    base, app, model, processor = servers["blip2"]
    c = client(base)
    questions = ["what color?", "why " * 200, "how many?", "what shape"]  # the second is too long for the LM
    image = png("red")
    batcher = app.state.batcher
    batcher.max_wait_s = 30

    def ask(q):
        try:
            r = c.chat.completions.create(model="blip2", messages=user(q, image), temperature=0, max_tokens=4)
            return r.choices[0].message.content
        except openai.BadRequestError as e:
            return e

    try:
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(ask, questions))
    finally:
        batcher.max_wait_s = 0.02
    assert isinstance(got[1], openai.BadRequestError) and "positions" in str(got[1])
    for q, text in zip(questions, got):
        if q != questions[1]:
            assert text == answer(model, processor, [image], [q], num_beams=1, max_new_tokens=4)[0]


@pytest.mark.parametrize("lm", ["opt", "llama", "t5"])
def test_engine_on_other_lms(build, lm):
    """The engine without HTTP, on BLIP-2 with each kind of LM (T5: encoder-decoder): the library's greedy
    answers, streamed text equal to the full text, prompt tokens = queries + prompt ids."""
    from vlbridge.serving.engine import Engine, RowStreamer
    from vlbridge.serving.schemas import ChatRequest

    model, processor = build(lm, randomize=True)
    engine = Engine(model, processor)
    image = png("red")
    req = ChatRequest(model="m", messages=user("what color?", image), temperature=0, max_tokens=5)
    job = engine.job(req)
    (result,) = engine.run([job])
    reference, ref_processor = build(lm, randomize=True)
    assert (
        result.choices[0].text
        == answer(reference, ref_processor, [image], ["what color?"], num_beams=1, max_new_tokens=5)[0]
    )
    batch = processor.prompt_inputs([image], [model.config.vqa_prompt.format("what color?")])
    assert result.prompt_tokens == int(batch["attention_mask"].sum()) + model.config.qformer.num_query_tokens
    pieces = []
    job.sink = RowStreamer(engine.tokenizer, pieces.append)  # streamed: the same text, piece by piece
    (streamed,) = engine.run([job])
    assert pieces[-1] is None and None not in pieces[:-1]
    assert "".join(pieces[:-1]).strip() == result.choices[0].text == streamed.choices[0].text
    assert streamed.prompt_tokens == result.prompt_tokens
