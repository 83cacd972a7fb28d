"""The HTTP server: OpenAI's chat completions (plain and streamed), embeddings, search over an image
folder (serving/index.py), /v1/models, /health and Prometheus /metrics, with a dynamic batcher in front of
the engine, a queue limit and an optional API key.

    app = create_app(model, processor, "my-model")   # then uvicorn.run(app), or serve(path, ...)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
import struct
import time
import urllib.parse
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from vlbridge.serving.batcher import Batcher
from vlbridge.serving.chat import DEFAULT_MAX_IMAGES
from vlbridge.serving.engine import Engine, Job, RowStreamer
from vlbridge.serving.images import ImagePolicy
from vlbridge.serving.index import ImageIndex
from vlbridge.serving.metrics import Metrics
from vlbridge.serving.page import add_page
from vlbridge.serving.schemas import APIError, ChatRequest, EmbeddingRequest, RetrieveRequest

# metric labels: these routes, "/v1/index/images" for every indexed image, "other" for the rest
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/embeddings", "/v1/retrieve", "/v1/index")
IMAGES = "/v1/index/images"
DEFAULT_RERANK = 16  # ITC candidates ITM re-scores when a search names no rerank (at least top_k)
RETRY_AFTER_S = 1  # what a 429 asks the client to wait (the openai client honours it when it retries)

log = logging.getLogger(__name__)


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes (by its Content-Length, or while reading it)."""
    too_large = APIError(413, f"request body over the server's limit of {limit / 2**20:g} MB (--max-body-mb)")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _parse(body: bytes, schema=ChatRequest):
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON ({e})") from None
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"]) or None
        raise APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param) from None


class Gate:
    """ASGI middleware around every route: counts responses by route and status for /metrics, and with an
    API key refuses /v1 requests without `Authorization: Bearer KEY` (401). Pure ASGI, so that streamed
    responses pass through untouched."""

    def __init__(self, app, metrics: Metrics, api_key: str | None):
        self.app, self.metrics, self.api_key = app, metrics, api_key

    def authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(header, f"Bearer {self.api_key}".encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else IMAGES if path.startswith(IMAGES + "/") else "other"
        status = 500  # unless a response starts

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.api_key and scope["path"].startswith("/v1") and not self.authorized(scope):
                error = APIError(
                    401, "missing or wrong API key: send Authorization: Bearer KEY", type="authentication_error"
                )
                response = JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        finally:
            self.metrics.request(route, status)


def create_app(
    model,
    processor,
    served_model_name: str,
    max_batch_size: int = 8,
    max_wait_ms: float = 10,
    max_body_mb: float = 20,
    max_image_pixels: int | None = None,
    max_queue: int | None = None,
    api_key: str | None = None,
    allow_remote_images: bool = False,
    allow_paths: tuple[str | Path, ...] = (),
    image_fetch_timeout_s: float = 10,
    max_images: int = DEFAULT_MAX_IMAGES,
    index: str | Path | None = None,
    index_cache: str | Path | None = None,
) -> FastAPI:
    """The FastAPI app serving `model` under `served_model_name`. max_image_pixels: None for
    vlbridge.core.images.MAX_PIXELS. max_queue: requests admitted at once (waiting or generating; None: no
    limit), more are answered 429. api_key: required on /v1 routes. allow_remote_images: fetch http(s)
    image URLs (image_fetch_timeout_s, at most max_body_mb); allow_paths: directories whose files may be
    named by file:// URLs or paths. max_images: images a chat request may hold (models that read several).
    index: a folder of images to search (/v1/retrieve), embedded now, cached under index_cache (default
    ~/.cache/vlbridge/index); needs a model with retrieval heads."""
    limit = int(max_body_mb * 2**20)
    policy = ImagePolicy(
        allow_remote_images, tuple(Path(d).expanduser().resolve() for d in allow_paths), image_fetch_timeout_s, limit
    )
    engine = Engine(model, processor, max_image_pixels, policy, max_images)
    metrics = engine.metrics
    if index is not None and "retrieval" not in model.tasks:
        raise ValueError(f"--index needs a model with retrieval heads; this {model.model_type} model has none")
    images = None if index is None else ImageIndex.build(model, processor, index, index_cache)
    batcher = Batcher(engine, max_batch_size, max_wait_ms / 1000)
    created = int(time.time())
    app = FastAPI(title="vlbridge", version="0.1.0")
    app.state.engine, app.state.batcher, app.state.index = engine, batcher, images
    add_page(app)  # the web page at /
    app.add_middleware(Gate, metrics=metrics, api_key=api_key)

    @contextlib.contextmanager
    def admitted():
        """Holds a place in the queue while a request waits or generates; none left: 429."""
        with metrics.lock:
            if max_queue is not None and metrics.pending >= max_queue:
                metrics.rejected += 1
                raise APIError(
                    429,
                    f"the server is busy: {max_queue} requests are already queued (--max-queue); retry later",
                    type="rate_limit_error",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            metrics.pending += 1
        try:
            yield
        finally:
            with metrics.lock:
                metrics.pending -= 1

    def check_model(name: str) -> None:
        if name != served_model_name:
            raise APIError(
                404,
                f"model {name!r} is not served here (this server serves {served_model_name!r})",
                "model",
                type="not_found_error",
            )

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # unknown routes (404), wrong methods (405)
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        log.exception("error serving %s", request.url.path)
        body = APIError(500, f"{type(e).__name__}: {e}", type="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": served_model_name,
            "generate_calls": len(engine.batch_sizes),
            "pending": metrics.pending,
        }

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        card = {"id": served_model_name, "object": "model", "created": created, "owned_by": "vlbridge"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = _parse(await _read_body(request, limit))
        check_model(req.model)
        if req.stream and (req.n > 1 or req.use_beam_search):
            raise APIError(400, "stream: only one choice (n=1) without beam search is streamed", "stream")
        place = admitted()
        place.__enter__()
        handed = False  # a stream releases its place when it ends
        try:
            job = await asyncio.to_thread(engine.job, req)  # decodes (or fetches) the images
            head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served_model_name}
            if req.stream:
                include_usage = req.stream_options is not None and req.stream_options.include_usage
                release = lambda: place.__exit__(None, None, None)  # noqa: E731
                response = await _stream(engine, batcher, job, head, include_usage, release)
                handed = True
                return response
            result = await batcher.submit(job)
        finally:
            if not handed:
                place.__exit__(None, None, None)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": None,
            }
            for i, c in enumerate(result.choices)
        ]
        completion = sum(c.completion_tokens for c in result.choices)
        return {
            **head,
            "object": "chat.completion",
            "choices": choices,
            "usage": _usage(result.prompt_tokens, completion),
        }

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        req = _parse(await _read_body(request, limit), EmbeddingRequest)
        check_model(req.model)
        inputs = [req.input] if isinstance(req.input, str) else req.input
        with admitted():
            loop = asyncio.get_running_loop()
            vectors, tokens = await loop.run_in_executor(engine.executor, engine.embed, inputs)

        def encode(v: list[float]):  # base64: little-endian float32, what the openai client sends by default
            return v if req.encoding_format == "float" else base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()

        data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]
        return {
            "object": "list",
            "data": data,
            "model": served_model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def the_index() -> ImageIndex:
        if images is None:
            why = "start it with --index DIR" if "retrieval" in model.tasks else "its model has no retrieval heads"
            raise APIError(404, f"this server has no image index ({why})", type="not_found_error")
        return images

    @app.get("/v1/index")
    async def index_info():
        idx = the_index()
        return {"object": "index", "images": len(idx), "skipped": len(idx.skipped), "model": served_model_name}

    @app.post("/v1/retrieve")
    async def retrieve(request: Request):
        req = _parse(await _read_body(request, limit), RetrieveRequest)
        if req.model is not None:
            check_model(req.model)
        idx = the_index()
        rerank = max(req.top_k, DEFAULT_RERANK) if req.rerank is None else req.rerank
        if 0 < rerank < req.top_k:
            raise APIError(400, f"rerank ({rerank}) must be 0 (ITC alone) or at least top_k ({req.top_k})", "rerank")
        with admitted():
            loop = asyncio.get_running_loop()
            hits, tokens = await loop.run_in_executor(
                engine.executor, idx.search, model, processor, req.query, req.top_k, rerank, req.rule
            )
        data = [
            {
                "object": "image",
                "index": i,
                "name": h.name,
                "url": f"{IMAGES}/{urllib.parse.quote(h.name)}",
                "score": h.score,
                "itc": h.itc,
            }
            for i, h in enumerate(hits)
        ]
        return {
            "object": "list",
            "data": data,
            "model": served_model_name,
            "rerank": min(rerank, len(idx)),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    @app.get(IMAGES + "/{name:path}")
    async def index_image(name: str):
        return FileResponse(the_index().file(name))

    return app


async def _stream(engine: Engine, batcher: Batcher, job: Job, head: dict, include_usage: bool, done):
    """Server-sent chat.completion.chunk events as tokens come, then `data: [DONE]`. The job goes through the
    batcher like any other (its row streams through job.sink). The first piece is awaited before the
    response starts, so that a request the model refuses (too long) is still a 400. `done()` is called once
    a response ends, however it ends (its queue place is released); a client that leaves early cancels
    the job: dropped if it had not started, its row stopped if it had."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    job.sink = RowStreamer(engine.tokenizer, lambda piece: loop.call_soon_threadsafe(queue.put_nowait, piece))
    task = asyncio.ensure_future(batcher.submit(job))
    finished = False  # the last event was sent

    def cancel():
        job.sink.cancel.set()
        if not task.done():
            task.cancel()

    async def next_piece() -> str | None:  # None at the end; the streamer's empty pieces are skipped
        piece = ""
        while piece == "":
            piece = await queue.get()
        return piece

    try:
        first = await next_piece()
        if first is None:
            await task  # raises the APIError of a refused request
    except BaseException:  # no response: the caller gives the place back
        cancel()
        raise

    def event(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
        chunk = {**head, "object": "chat.completion.chunk"}
        chunk["choices"] = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        if usage:
            chunk["usage"] = usage
        return f"data: {json.dumps(chunk)}\n\n"

    async def events():
        nonlocal finished
        hold = max((len(s) for s in job.stop), default=1) - 1  # text that may still turn into a stop string
        text, sent, piece, cut = "", 0, first, None
        yield event({"role": "assistant", "content": ""})
        while piece is not None:
            text = (text + piece).lstrip()  # as the full response, no leading space
            cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=None)
            if cut is not None:
                text = text[:cut].rstrip()
                job.sink.cancel.set()  # the row stops; its result comes once the batch ends
                break
            if len(text) - hold > sent:
                yield event({"content": text[sent : len(text) - hold]})
                sent = len(text) - hold
            piece = await next_piece()
        result = await task
        final = result.choices[0]
        if final.text.startswith(text[:sent]) and len(final.text) > sent:
            yield event({"content": final.text[sent:]})  # the held-back tail, stripped as the full text
        yield event({}, final.finish_reason)
        if include_usage:
            yield event({}, usage=_usage(result.prompt_tokens, final.completion_tokens))
        yield "data: [DONE]\n\n"
        finished = True

    class Events(StreamingResponse):
        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:  # also when the client left before the events started
                if not finished:
                    cancel()
                    with engine.metrics.lock:
                        engine.metrics.cancelled += 1
                done()

    return Events(events(), media_type="text/event-stream")


def serve(
    model_path: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    dtype: str | None = None,
    served_model_name: str | None = None,
    **app_kwargs,
) -> None:
    """Load a saved model and serve it until interrupted."""
    import uvicorn

    from vlbridge.auto import load

    logging.getLogger("vlbridge.serving").setLevel(logging.INFO)  # the index's report
    model, processor = load(model_path, device=device, dtype=dtype)
    name = served_model_name or str(model_path).rstrip("/")
    app = create_app(model, processor, name, **app_kwargs)
    print(f"serving {name!r} ({model.model_type}) at http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
