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
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from vlbridge.core.images import ImageError, load_image
from vlbridge.serving.schemas import APIError, ChatRequest, ImagePart

DEFAULT_MAX_TOKENS = 64  # when the request names no max_tokens / max_completion_tokens


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


def decode_image(url: str, max_pixels: int | None):
    """A data: URL -> RGB PIL image; remote URLs are refused (this server fetches nothing)."""
    if url.startswith(("http://", "https://")):
        raise APIError(
            400, "remote image URLs are not fetched: send the image as data:image/...;base64,...", "messages"
        )
    m = re.fullmatch(r"data:([^;,]*)((?:;[^;,]*)*),(.*)", url, flags=re.S)
    if m is None or ";base64" not in m.group(2):
        raise APIError(400, "image_url.url must be a data URL: data:image/png;base64,...", "messages")
    try:
        raw = base64.b64decode(m.group(3), validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"image_url: not valid base64 ({e})", "messages") from None
    try:
        return load_image(raw, name="image_url", max_pixels=max_pixels)
    except ImageError as e:
        raise APIError(400, str(e), "messages") from None


class Engine:
    """A loaded model and its processor behind the server: `job` turns a request into a Job (decoding its
    images), `run` generates for jobs that share settings in one call, `stream` generates one job token by
    token. The model's check_context is wrapped (on this instance) to learn the prompt length it saw."""

    def __init__(self, model, processor, max_image_pixels: int | None = None):
        self.model, self.processor, self.max_image_pixels = model.eval(), processor, max_image_pixels
        self.tokenizer = processor.tokenizer
        self.special_ids = set(self.tokenizer.all_special_ids)
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
        user = next((m for m in reversed(req.messages) if m.role == "user"), None)
        if user is None:
            raise APIError(400, "messages holds no user message", "messages")
        parts = user.content if isinstance(user.content, list) else [user.content or ""]
        images, pieces = [], []  # pieces: str (text) or None (an image)
        for part in parts:
            if isinstance(part, ImagePart):
                images.append(decode_image(part.image_url.url, self.max_image_pixels))
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
        ids = self.model.generate(**self.model.prepare_inputs(batch), **kwargs)
        extra_tokens = self._seen_length - batch["input_ids"].shape[1]  # e.g. BLIP-2's query tokens
        lengths = [int(m.sum()) + extra_tokens for m in batch["attention_mask"]]
        self.batch_sizes.append(len(jobs))
        return ids, lengths

    def choice(self, ids: list[int], job: Job) -> Choice:
        """Text, finish reason and token count of one row of new ids (ended by a special token or padding)."""
        end = next((k for k, t in enumerate(ids) if t in self.special_ids), None)
        kept = ids if end is None else ids[:end]
        count = len(ids) if end is None else end + 1
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
