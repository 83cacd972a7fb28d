"""From a chat request to generated text on any vlbridge model: the job (serving/chat.py builds its
prompt), the generate keywords, and batched generation, streamed or not. Nothing here asks which design
it holds.

All generation runs on one worker thread (`executor`, one call at a time): the event loop stays free,
and a model's per-call state (Flamingo's visual context) is never shared by two calls. Streamed and
plain requests with the same settings share one batched generate call: a BatchStreamer hands each
streamed row's new tokens to that request's RowStreamer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer
from transformers.generation.streamers import BaseStreamer

from vlbridge.serving.chat import DEFAULT_MAX_IMAGES, build_prompt
from vlbridge.serving.images import ImagePolicy, decode_image
from vlbridge.serving.metrics import Metrics
from vlbridge.serving.schemas import APIError, ChatRequest

DEFAULT_MAX_TOKENS = 64  # when the request names no max_tokens / max_completion_tokens


class RowStreamer(TextStreamer):
    """The text of one streamed request as it is generated: transformers' TextStreamer (which holds back
    a word until it is complete) handing each piece to `emit` (called on the worker thread; None at the
    end), and `cancel`, set when the client leaves or a stop string ends the text."""

    def __init__(self, tokenizer, emit: Callable[[str | None], None]):
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.emit, self.cancel = emit, threading.Event()
        self.started = self.finished = False

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if text:
            self.started = True
            self.emit(text)
        if stream_end:
            self.finished = True
            self.emit(None)

    def abort(self) -> None:
        """The end, without the held-back text (generation failed or never ran)."""
        if not self.finished:
            self.finished = True
            self.emit(None)


class BatchStreamer(BaseStreamer):
    """transformers' streamer for a batch: the first put is the prompt (skipped), then one new token per
    row (B,) each step. Row i's tokens go to rows[i] (None: a row nobody streams) up to its first special
    token (eos, or padding after it), where that row's stream ends."""

    def __init__(self, rows: list[RowStreamer | None], special_ids: set[int]):
        self.rows, self.special_ids, self.prompt = rows, special_ids, True

    def put(self, value: torch.Tensor) -> None:
        if self.prompt:
            self.prompt = False
            return
        for row, ids in zip(self.rows, value.reshape(len(self.rows), -1).tolist()):
            for t in ids if row is not None and not row.finished else ():
                if t in self.special_ids:
                    row.end()
                    break
                row.put(torch.tensor([t]))

    def end(self) -> None:
        for row in self.rows:
            if row is not None and not row.finished:
                row.end()


class RowsCancelled(StoppingCriteria):
    """Ends each row whose stream was cancelled; the other rows of the batch go on."""

    def __init__(self, rows: list[RowStreamer | None]):
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs):
        flags = [row is not None and row.cancel.is_set() for row in self.rows]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


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
    sink: RowStreamer | None = None  # a streamed request's text goes there as it comes


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


class Engine:
    """A loaded model and its processor behind the server: `job` turns a request into a Job (decoding its
    images), `run` generates for jobs that share settings in one call (streaming the rows that have a
    sink). The model's check_context is wrapped (on this instance) to learn the prompt length it saw."""

    def __init__(
        self,
        model,
        processor,
        max_image_pixels: int | None = None,
        image_policy: ImagePolicy | None = None,
        max_images: int = DEFAULT_MAX_IMAGES,
    ):
        self.model, self.processor, self.max_image_pixels = model.eval(), processor, max_image_pixels
        self.image_policy, self.max_images = image_policy or ImagePolicy(), max_images
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

    def decode(self, url: str):
        return decode_image(url, self.max_image_pixels, self.image_policy)

    # ------------------------------------------------------------------ request -> job
    def job(self, req: ChatRequest) -> Job:
        if not {"caption", "vqa"} & self.model.tasks:
            raise APIError(400, f"this model generates no text (it does {sorted(self.model.tasks)})", "model")
        prompt = build_prompt(req.messages, self.model, self.processor, self.decode, self.max_images)
        kwargs, copies = self.generate_kwargs(req)
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(s for s in req.stop or () if s)
        key = (repr(sorted(kwargs.items())), stop, prompt.count, prompt.question is not None, req.n)
        if req.seed is not None:
            key = (object(),)  # a seeded request runs alone, so that its seed reproduces it
        return Job(prompt.images, prompt.text, prompt.question, kwargs, req.n, copies, req.seed, stop, key)

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
    def _generate(self, jobs: list[Job]) -> tuple[torch.Tensor, list[int]]:
        """New ids (B * rows per job, L) and each job's prompt length as the model saw it."""
        questions = [j.question for j in jobs]
        batch = self.processor.prompt_inputs(
            [j.images for j in jobs], [j.prompt for j in jobs], None if None in questions else questions
        )
        if jobs[0].seed is not None:
            torch.manual_seed(jobs[0].seed)
        kwargs = dict(jobs[0].kwargs)
        criteria = [StopStrings(self.tokenizer, jobs[0].stop)] if jobs[0].stop else []
        if any(j.sink is not None for j in jobs):  # streams take n=1 without beams: one row per job
            rows = [j.sink for j in jobs]
            for row in rows:
                if row is not None:  # a fresh start (a batch that failed may have been retried alone)
                    row.token_cache, row.print_len = [], 0
            kwargs["streamer"] = BatchStreamer(rows, self.special_ids)
            criteria.append(RowsCancelled(rows))
        if criteria:
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
        prompt, e.g. too long, fails only its own request), but for streams that already sent text."""
        try:
            ids, lengths = self._generate(jobs)
        except Exception as e:
            if len(jobs) > 1:
                error = APIError(400, str(e)) if isinstance(e, ValueError) else e
                return [error if j.sink is not None and j.sink.started else self.run([j])[0] for j in jobs]
            if jobs[0].sink is not None:
                jobs[0].sink.abort()  # its reader stops waiting
            return [APIError(400, str(e)) if isinstance(e, ValueError) else e]
        rows = ids.tolist()
        per_job = len(rows) // len(jobs)
        out = []
        for i, job in enumerate(jobs):
            choices = [self.choice(r, job) for r in rows[i * per_job : (i + 1) * per_job]] * job.copies
            out.append(Result(choices, lengths[i]))
        return out

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
        images = [self.decode(s) for s, im in zip(inputs, is_image) if im]
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
