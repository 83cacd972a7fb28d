"""From a chat request's messages to what a model reads: its images, the LM prompt and the question.

A model that reads one image (BLIP-2, EVE, LLaVA) answers the last user message about the request's one
image (which may stand in an earlier message). Earlier turns with text stay in its prompt as a
conversation does in training (data.conversations.plain_text: each question in the model's VQA prompt,
each answer after it), so a model trained on conversations can resolve a follow-up:

    user [img, "what color is the circle?"], assistant "red", user ["what size is the object?"]
    -> "Question: what color is the circle? Answer: red Question: what size is the object? Answer:"

A last user message without text asks for a caption (the caption prompt alone).
A model that reads interleaved images ("in_context" in `model.tasks`: Flamingo) reads the whole
conversation: every user message is a chunk with its images at their places and its text in the
model's VQA prompt (its caption prompt when it has no text), followed by the assistant's reply and
<|endofchunk|> (the processor's `interleave`, the format of its few-shot examples):

    user [img, "what color?"], assistant "red", user [img, "and this one?"]
    -> "<image>Question: what color? Answer: red<|endofchunk|><image>Question: and this one? Answer:"

So few-shot examples are earlier user/assistant pairs. System messages have no place in either format
and are left out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from vlbridge.data.conversations import plain_text
from vlbridge.serving.schemas import APIError, ImagePart, Message

DEFAULT_MAX_IMAGES = 16  # images a request may hold (--max-images): each is one vision encoder pass


@dataclass
class Prompt:
    images: object  # what the processor's prompt_inputs takes for one sample: an image, or a list in <image> order
    text: str  # the LM prompt
    question: str | None  # the last user turn's question; None: a caption
    count: int  # images in the request


def _pieces(message: Message, decode: Callable) -> list:
    """A message's content in order: str for text, a decoded image for an image part."""
    if message.content is None:
        return []
    if isinstance(message.content, str):
        return [message.content]
    return [decode(p.image_url.url) if isinstance(p, ImagePart) else p.text for p in message.content]


def _text(pieces: list) -> str | None:
    return " ".join(p.strip() for p in pieces if isinstance(p, str) and p.strip()) or None


def _turn(pieces: list, config, image_token: str) -> tuple[list, str, str | None]:
    """One user message: its images, its prompt and its question. With one image (or none) all its text is
    the question, wherever it stands (clients often put it first) and the processor puts the image in
    front. With several, the text after the last image is the question, and the text before it stays as
    written with each image at its place."""
    at = [i for i, p in enumerate(pieces) if not isinstance(p, str)]
    last = at[-1] if len(at) > 1 else -1
    question = _text(pieces[last + 1 :])
    head = "".join(image_token if not isinstance(p, str) else p for p in pieces[: last + 1])
    tail = config.vqa_prompt.format(question) if question else config.caption_prompt
    return [pieces[i] for i in at], head + tail, question


def count_images(messages: list[Message]) -> int:
    """Image parts in all messages, counted before any is decoded."""
    return sum(isinstance(p, ImagePart) for m in messages if isinstance(m.content, list) for p in m.content)


def build_prompt(messages: list[Message], model, processor, decode: Callable, max_images: int) -> Prompt:
    """The prompt for `messages` (see the module docstring); decode(url) -> image. Bad requests: APIError 400."""
    if messages[-1].role != "user":
        raise APIError(400, "the last message must be the user's (the turn to answer)", "messages")
    for m in messages:
        if m.role != "user" and isinstance(m.content, list) and any(isinstance(p, ImagePart) for p in m.content):
            raise APIError(400, f"only user messages may hold images, not a {m.role} message", "messages")
    interleaved = "in_context" in model.tasks
    count = count_images(messages)
    if count == 0:
        raise APIError(400, "the request holds no image (an image_url part in a user message)", "messages")
    if not interleaved and count > 1:
        raise APIError(
            400,
            f"this {model.model_type} model takes one image a request, not {count} "
            "(only models that read interleaved images, e.g. Flamingo, take several)",
            "messages",
        )
    if count > max_images:
        raise APIError(
            400, f"the request holds {count} images: this server takes at most {max_images} (--max-images)", "messages"
        )
    token = getattr(processor, "image_token", None)
    if interleaved and token and any(token in p for m in messages for p in _texts(m)):
        raise APIError(400, f"text may not hold {token}: send each image as an image_url part", "messages")
    config = model.config
    if not interleaved:
        turns = [(m.role, _pieces(m, decode)) for m in messages if m.role in ("user", "assistant")]
        image = next(p for _, t in turns for p in t if not isinstance(p, str))
        question = _text(turns[-1][1])
        _require(model, question)
        if not question:
            return Prompt(image, config.caption_prompt, None, 1)
        said = [{"role": r, "content": text} for r, t in turns if (text := _text(t))]
        return Prompt(image, plain_text(said, config.vqa_prompt), question, 1)
    examples, pending = [], None  # pending: (images, prompt, question) of the last user turn, until answered
    for m in messages:
        if m.role == "user":
            if pending is not None:  # two user turns in a row: the first one's chunk ends unanswered
                examples.append((*pending[:2], ""))
            pending = _turn(_pieces(m, decode), config, token)
            if not pending[0] and not pending[2]:
                raise APIError(400, "a user message is empty", "messages")
        elif m.role == "assistant":
            images, prompt, _ = pending or ([], "", None)
            examples.append((images, prompt, _text(_pieces(m, decode)) or ""))
            pending = None
    images, prompt, question = pending  # the last message is the user's
    _require(model, question)
    text, all_images = processor.interleave(images, prompt, examples)
    return Prompt(all_images, text, question, count)


def _texts(message: Message) -> list[str]:
    if isinstance(message.content, str):
        return [message.content]
    return [p.text for p in message.content or () if not isinstance(p, ImagePart)]


def _require(model, question: str | None) -> None:
    try:
        model.require_task("vqa" if question else "caption")
    except ValueError as e:
        raise APIError(400, str(e), "messages") from None
