"""From a chat request to generated text on any vlbridge model: the prompt, the generate keywords, batched
and streamed generation. Nothing here asks which design it holds; it asks `model.tasks` ("in_context":
the model reads interleaved images, so every image part becomes an image at its place in the text).

All generation runs on one worker thread (`executor`, one at a time): the event loop stays free, and a
model's per-call state (Flamingo's visual context) is never shared by two calls.
"""

from __future__ import annotations

import base64
import binascii
import re
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from vlbridge.core.images import ImageError, load_image
from vlbridge.serving.schemas import APIError, ChatRequest, ImagePart

DEFAULT_MAX_TOKENS = 64  # when the request names no max_tokens / max_completion_tokens
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return [
            *out,
            f'{name}_bucket{{le="+Inf"}} {self.count}',
            f"{name}_sum {self.sum:g}",
            f"{name}_count {self.count}",
        ]


class Metrics:
    """What GET /metrics exposes (Prometheus text format). Written by the event loop (requests) and the
    worker thread (generation), so every update holds the lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}  # (route, status) -> count
        self.errors: dict[str, int] = {}  # route -> responses with status >= 400
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.queue_wait = Histogram(WAIT_BUCKETS)  # seconds from admission to the start of its generate call
        self.generated_tokens = 0
        self.generate_seconds = 0.0
        self.last_tokens_per_second = 0.0
        self.pending = 0  # admitted requests not yet answered (waiting or generating)
        self.rejected = 0  # refused with 429 (queue full)

    def request(self, route: str, status: int) -> None:
        with self.lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
            if status >= 400:
                self.errors[route] = self.errors.get(route, 0) + 1

    def generated(self, batch: int, waits: list[float], tokens: int, seconds: float) -> None:
        with self.lock:
            self.batch_size.observe(batch)
            for w in waits:
                self.queue_wait.observe(w)
            self.generated_tokens += tokens
            self.generate_seconds += seconds
            self.last_tokens_per_second = tokens / seconds if seconds > 0 else 0.0

    def text(self) -> str:
        def family(name, kind, help, lines):
            return [f"# HELP {name} {help}", f"# TYPE {name} {kind}", *lines]

        with self.lock:
            out = [
                *family(
                    "vlbridge_requests_total",
                    "counter",
                    "HTTP requests answered, by route and status.",
                    [
                        f'vlbridge_requests_total{{route="{r}",status="{s}"}} {n}'
                        for (r, s), n in sorted(self.requests.items())
                    ],
                ),
                *family(
                    "vlbridge_errors_total",
                    "counter",
                    "HTTP responses with a 4xx or 5xx status, by route.",
                    [f'vlbridge_errors_total{{route="{r}"}} {n}' for r, n in sorted(self.errors.items())],
                ),
                *family(
                    "vlbridge_rejected_total",
                    "counter",
                    "Requests refused with 429 (--max-queue).",
                    [f"vlbridge_rejected_total {self.rejected}"],
                ),
                *family(
                    "vlbridge_pending_requests",
                    "gauge",
                    "Requests waiting or generating.",
                    [f"vlbridge_pending_requests {self.pending}"],
                ),
                *family(
                    "vlbridge_batch_size",
                    "histogram",
                    "Requests per generate call.",
                    self.batch_size.lines("vlbridge_batch_size"),
                ),
                *family(
                    "vlbridge_queue_wait_seconds",
                    "histogram",
                    "Time from admission to the start of the request's generate call.",
                    self.queue_wait.lines("vlbridge_queue_wait_seconds"),
                ),
                *family(
                    "vlbridge_generated_tokens_total",
                    "counter",
                    "New tokens generated.",
                    [f"vlbridge_generated_tokens_total {self.generated_tokens}"],
                ),
                *family(
                    "vlbridge_generate_seconds_total",
                    "counter",
                    "Time spent in generate calls (tokens/s over a window: rate of tokens / rate of this).",
                    [f"vlbridge_generate_seconds_total {self.generate_seconds:g}"],
                ),
                *family(
                    "vlbridge_tokens_per_second",
                    "gauge",
                    "New tokens per second of the last generate call (all its rows).",
                    [f"vlbridge_tokens_per_second {self.last_tokens_per_second:g}"],
                ),
            ]
        return "\n".join(out) + "\n"


@dataclass
class ImagePolicy:
    """Where images may come from besides data: URLs. allow_remote: fetch http(s) URLs (timeout_s, at
    most max_bytes); allow_paths: directories whose files may be named by file:// URLs or plain paths."""

    allow_remote: bool = False
    allow_paths: tuple[Path, ...] = ()
    timeout_s: float = 10.0
    max_bytes: int = 20 * 2**20


@dataclass
class Job:
    """One request, ready to generate: its images (a list for interleaved models), the LM prompt, the raw
    question (None for a caption), transformers' generate keywords, and what the server does around them."""

    images: object
    prompt: str
    question: str | None
    kwargs: dict
    n: int = 1
    copies: int = 1  # greedy with n > 1: one generation, n identical choices
    seed: int | None = None
    stop: tuple[str, ...] = ()
    key: tuple = field(default=())  # jobs with equal keys may share one batched generate call
    submitted: float = field(default_factory=time.monotonic)  # for the queue wait metric


@dataclass
class Choice:
    text: str
    finish_reason: str  # "stop" | "length"
    completion_tokens: int


@dataclass
class Result:
    choices: list[Choice]
    prompt_tokens: int


class StopStrings(StoppingCriteria):
    """Ends a row once its new text holds one of `stops` (the text is cut there afterwards). The ids
    generate hands over hold the prompt for some designs (not for those that generate from embeddings):
    the first call, one token in, tells how many ids came before."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self.tokenizer, self.stops, self.start = tokenizer, stops, None

    def __call__(self, input_ids, scores, **kwargs):
        if self.start is None:
            self.start = input_ids.shape[1] - 1
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)


def _fetch(url: str, policy: ImagePolicy) -> bytes:
    """The bytes at an http(s) URL, within the policy's timeout and byte limit."""
    try:
        with urllib.request.urlopen(url, timeout=policy.timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > policy.max_bytes:
                raise APIError(400, f"image_url: {url} is over the limit of {policy.max_bytes} bytes", "messages")
            raw = response.read(policy.max_bytes + 1)
    except APIError:
        raise
    except Exception as e:  # HTTP errors, timeouts, refused connections, bad URLs
        raise APIError(400, f"image_url: could not fetch {url} ({e})", "messages") from None
    if len(raw) > policy.max_bytes:
        raise APIError(400, f"image_url: {url} is over the limit of {policy.max_bytes} bytes", "messages")
    return raw


def _local_file(url: str, policy: ImagePolicy) -> Path:
    """A file:// URL or a plain path, resolved; refused unless it lies inside an --allow-path directory."""
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file://") else url
    if not policy.allow_paths:
        raise APIError(
            400,
            "image_url.url must be a data URL (data:image/png;base64,...); local files need --allow-path",
            "messages",
        )
    resolved = Path(path).expanduser().resolve()
    if not any(resolved.is_relative_to(d) for d in policy.allow_paths):
        raise APIError(
            400, f"image_url: {path} is outside the directories this server reads (--allow-path)", "messages"
        )
    if not resolved.is_file():
        raise APIError(400, f"image_url: {path} is not a file", "messages")
    return resolved


def decode_image(url: str, max_pixels: int | None, policy: ImagePolicy | None = None):
    """A data: URL -> RGB PIL image; http(s) URLs only with policy.allow_remote, file:// URLs and plain
    paths only inside policy.allow_paths."""
    policy = policy or ImagePolicy()
    if url.startswith(("http://", "https://")):
        if not policy.allow_remote:
            raise APIError(
                400,
                "remote image URLs are not fetched (the server runs without --allow-remote-images): "
                "send the image as data:image/...;base64,...",
                "messages",
            )
        raw, name = _fetch(url, policy), url
    elif url.startswith("data:"):
        m = re.fullmatch(r"data:([^;,]*)((?:;[^;,]*)*),(.*)", url, flags=re.S)
        if m is None or ";base64" not in m.group(2):
            raise APIError(400, "image_url.url must be a data URL: data:image/png;base64,...", "messages")
        try:
            raw = base64.b64decode(m.group(3), validate=True)
        except (binascii.Error, ValueError) as e:
            raise APIError(400, f"image_url: not valid base64 ({e})", "messages") from None
        name = "image_url"
    else:
        path = _local_file(url, policy)
        raw, name = path.read_bytes(), str(path)
    try:
        return load_image(raw, name=name, max_pixels=max_pixels)
    except ImageError as e:
        raise APIError(400, str(e), "messages") from None


class Engine:
    """A loaded model and its processor behind the server: `job` turns a request into a Job (decoding its
    images), `run` generates for jobs that share settings in one call, `stream` generates one job token by
    token. The model's check_context is wrapped (on this instance) to learn the prompt length it saw."""

    def __init__(self, model, processor, max_image_pixels: int | None = None, image_policy: ImagePolicy | None = None):
        self.model, self.processor, self.max_image_pixels = model.eval(), processor, max_image_pixels
        self.image_policy = image_policy or ImagePolicy()
        self.metrics = Metrics()
        self.tokenizer = processor.tokenizer  # None for a model without an LM (BLIP-2 stage 1)
        self.special_ids = set(self.tokenizer.all_special_ids) if self.tokenizer is not None else set()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlbridge-generate")
        self.batch_sizes: list[int] = []  # the size of every generate call, for /health and tests
        # Every design's generate calls check_context with the prompt length as the LM sees it (image
        # tokens included); recording it is how usage counts what the model really read.
        self._seen_length = 0
        check = model.check_context

        def recording(prompt_length, generate_kwargs):
            self._seen_length = prompt_length
            return check(prompt_length, generate_kwargs)

        model.check_context = recording

    # ------------------------------------------------------------------ request -> job
    def job(self, req: ChatRequest) -> Job:
        if not {"caption", "vqa"} & self.model.tasks:
            raise APIError(400, f"this model generates no text (it does {sorted(self.model.tasks)})", "model")
        user = next((m for m in reversed(req.messages) if m.role == "user"), None)
        if user is None:
            raise APIError(400, "messages holds no user message", "messages")
        parts = user.content if isinstance(user.content, list) else [user.content or ""]
        images, pieces = [], []  # pieces: str (text) or None (an image)
        for part in parts:
            if isinstance(part, ImagePart):
                images.append(decode_image(part.image_url.url, self.max_image_pixels, self.image_policy))
                pieces.append(None)
            elif isinstance(part, str) or part.text.strip():
                pieces.append(part if isinstance(part, str) else part.text)
        if not images:
            raise APIError(400, "the last user message holds no image (an image_url part)", "messages")
        interleaved = "in_context" in self.model.tasks
        if len(images) > 1 and not interleaved:
            raise APIError(
                400, f"this {self.model.model_type} model takes one image a message, not {len(images)}", "messages"
            )
        # One image: all the text is the question, wherever it stands (clients often put it first).
        # Several: the text after the last image is; the text before it stays where it is.
        last_image = max(i for i, p in enumerate(pieces) if p is None) if len(images) > 1 else -1
        question = " ".join(p.strip() for p in pieces[last_image + 1 :] if p is not None and p.strip()) or None
        task = "vqa" if question else "caption"
        try:
            self.model.require_task(task)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        config = self.model.config
        tail = config.vqa_prompt.format(question) if question else config.caption_prompt
        if len(images) > 1:  # interleaved: each image where its part is, the text before the last as written
            token = self.processor.image_token
            prompt = "".join(token if p is None else p for p in pieces[: last_image + 1]) + tail
            image_arg = images
        else:  # the processor puts the image where the design wants it
            prompt, image_arg = tail, images[0]
        kwargs, copies = self.generate_kwargs(req)
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(s for s in req.stop or () if s)
        key = (repr(sorted(kwargs.items())), stop, len(images), question is not None, req.n)
        if req.seed is not None:
            key = (object(),)  # a seeded request runs alone, so that its seed reproduces it
        return Job(image_arg, prompt, question, kwargs, req.n, copies, req.seed, stop, key)

    @staticmethod
    def generate_kwargs(req: ChatRequest) -> tuple[dict, int]:
        """transformers' generate keywords for a request, and how many copies of each output to return."""
        kw = {"max_new_tokens": req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS}
        if req.min_tokens:
            kw["min_new_tokens"] = req.min_tokens
        if req.repetition_penalty is not None:
            kw["repetition_penalty"] = req.repetition_penalty
        if req.use_beam_search:  # as vLLM: the beam width is n, the n best beams are the choices
            kw.update(do_sample=False, num_beams=req.n, num_return_sequences=req.n)
            if req.length_penalty is not None:
                kw["length_penalty"] = req.length_penalty
            return kw, 1
        temperature = 1.0 if req.temperature is None else req.temperature
        if temperature == 0:
            return {**kw, "do_sample": False, "num_beams": 1}, req.n
        kw.update(do_sample=True, num_beams=1, temperature=temperature, top_p=req.top_p or 1.0, top_k=req.top_k or 0)
        kw["num_return_sequences"] = req.n
        return kw, 1

    # ------------------------------------------------------------------ generation (worker thread)
    def _generate(self, jobs: list[Job], **extra) -> tuple[torch.Tensor, list[int]]:
        """New ids (B * rows per job, L) and each job's prompt length as the model saw it."""
        questions = [j.question for j in jobs]
        batch = self.processor.prompt_inputs(
            [j.images for j in jobs], [j.prompt for j in jobs], None if None in questions else questions
        )
        if jobs[0].seed is not None:
            torch.manual_seed(jobs[0].seed)
        kwargs = {**jobs[0].kwargs, **extra}
        if jobs[0].stop:
            criteria = [*(kwargs.get("stopping_criteria") or []), StopStrings(self.tokenizer, jobs[0].stop)]
            kwargs["stopping_criteria"] = StoppingCriteriaList(criteria)
        start = time.monotonic()
        waits = [start - j.submitted for j in jobs]
        ids = self.model.generate(**self.model.prepare_inputs(batch), **kwargs)
        new_tokens = sum(self._count(row) for row in ids.tolist())
        self.metrics.generated(len(jobs), waits, new_tokens, time.monotonic() - start)
        extra_tokens = self._seen_length - batch["input_ids"].shape[1]  # e.g. BLIP-2's query tokens
        lengths = [int(m.sum()) + extra_tokens for m in batch["attention_mask"]]
        self.batch_sizes.append(len(jobs))
        return ids, lengths

    def _count(self, ids: list[int]) -> int:
        """New tokens in one row: up to and with the first special token (the one that ended it)."""
        end = next((k for k, t in enumerate(ids) if t in self.special_ids), None)
        return len(ids) if end is None else end + 1

    def choice(self, ids: list[int], job: Job) -> Choice:
        """Text, finish reason and token count of one row of new ids (ended by a special token or padding)."""
        end = next((k for k, t in enumerate(ids) if t in self.special_ids), None)
        kept = ids if end is None else ids[:end]
        count = self._count(ids)
        reason = "length" if end is None and count >= job.kwargs["max_new_tokens"] else "stop"
        text = self.processor.batch_decode(torch.tensor([kept], dtype=torch.long))[0]
        cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=None)
        if cut is not None:
            text, reason = text[:cut].rstrip(), "stop"
        return Choice(text, reason, count)

    def run(self, jobs: list[Job]) -> list[Result | Exception]:
        """Generate for jobs that share a key in one call; if that fails, each alone (so that one bad
        prompt, e.g. too long, fails only its own request)."""
        try:
            ids, lengths = self._generate(jobs)
        except Exception as e:
            if len(jobs) > 1:
                return [r for j in jobs for r in self.run([j])]
            return [APIError(400, str(e)) if isinstance(e, ValueError) else e]
        rows = ids.tolist()
        per_job = len(rows) // len(jobs)
        out = []
        for i, job in enumerate(jobs):
            choices = [self.choice(r, job) for r in rows[i * per_job : (i + 1) * per_job]] * job.copies
            out.append(Result(choices, lengths[i]))
        return out

    def stream(self, job: Job) -> tuple[Iterator[str], Future, threading.Event]:
        """Start generating `job` on the worker thread with a TextIteratorStreamer; returns the text
        pieces as they come, the future of the Result, and an event that stops generation early (a
        client that went away)."""
        from transformers import TextIteratorStreamer

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        cancel = threading.Event()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)

        def work() -> Result:
            try:
                criteria = StoppingCriteriaList([Cancelled()])
                ids, lengths = self._generate([job], streamer=streamer, stopping_criteria=criteria)
            except Exception as e:
                streamer.end()  # the reader stops waiting
                raise APIError(400, str(e)) if isinstance(e, ValueError) else e from None
            return Result([self.choice(ids[0].tolist(), job)], lengths[0])

        return iter(streamer), self.executor.submit(work), cancel

    # ------------------------------------------------------------------ embeddings (worker thread)
    def embed(self, inputs: list[str]) -> tuple[list[list[float]], int]:
        """Normalised embeddings of texts and images (a string that is a data:, http(s):// or file:// URL is
        an image) and the tokens read: a text is its Q-Former [CLS] projection (E floats, tokens: its
        Q-Former ids), an image its query projections flattened (Q * E floats, tokens: Q), so that the max
        over the image's Q chunks of their dot products with a text is the model's ITC similarity."""
        if "retrieval" not in self.model.tasks:
            raise APIError(
                400, f"this {self.model.model_type} model has no retrieval heads (a BLIP-2 stage-1 model has)", "model"
            )
        is_image = [s.startswith(("data:", "http://", "https://", "file://")) for s in inputs]
        images = [decode_image(s, self.max_image_pixels, self.image_policy) for s, im in zip(inputs, is_image) if im]
        texts = [s for s, im in zip(inputs, is_image) if not im]
        out: dict[bool, list] = {True: [], False: []}
        tokens = 0
        if images:
            feats = self.model.extract_features(
                **self.model.prepare_inputs({"pixel_values": self.processor.images(images)})
            )
            proj = feats.image_embeds_proj.float()  # (B, Q, E), each query normalised
            out[True] = proj.flatten(1).tolist()
            tokens += proj.shape[0] * proj.shape[1]
        if texts:
            try:
                q = self.processor.qformer_text(texts)
            except ValueError as e:
                raise APIError(400, str(e), "input") from None
            feats = self.model.extract_features(
                **self.model.prepare_inputs(
                    {"qformer_input_ids": q["input_ids"], "qformer_attention_mask": q["attention_mask"]}
                )
            )
            out[False] = feats.text_embeds_proj.float().tolist()
            tokens += int(q["attention_mask"].sum())
        return [out[im].pop(0) for im in is_image], tokens
