"""Instruction / chat data: LLaVA-style conversation files, ShapesWorld conversations, and token labels
that train only on what the assistant says.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`: an
optional system message, then user and assistant turns alternating, user first, assistant last. LLaVA's
files say "human" / "gpt" under "from" / "value" and mark where the image goes with `<image>` in a human
turn; `read_llava` turns them into messages and records that place.

`encode_conversation` tokenizes one conversation for a decoder-only LM. With the tokenizer's own chat
template (`tokenizer.chat_template`) the text is what `apply_chat_template` renders; without one, the
turns are the model's VQA prompt filled with each question, each answer after it and an eos, in a row.
Labels are -100 everywhere except on the assistant's text (and what closes its turn), found from the
rendering itself, so a template that would not let the assistant's text be told apart is an error, never
a conversation whose every label is -100.
"""

from __future__ import annotations

import logging

import numpy as np

from vlbridge.data import shapesworld as sw
from vlbridge.data.readers import RowReport, _Bad, _id, _join, _load_json, _report, _str

log = logging.getLogger(__name__)

IMAGE_MARK = "<image>"  # where LLaVA's files put the image in a human turn
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
LLAVA_KEYS = ("id", "image", "conversations")


# ---------------------------------------------------------------- messages


def check_messages(messages, last: str = "assistant") -> list[dict[str, str]]:
    """`messages` as a list of {"role", "content"} dicts, or ValueError naming the first problem: an
    optional system message first, then user / assistant alternating, starting with user and ending
    with `last` ("assistant": a conversation to train on; "user": one to answer)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation is a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES.values():
            raise ValueError(f"message {i} is not {{'role': system|user|assistant, 'content': str}}: {str(m)[:80]}")
        out.append({"role": m["role"], "content": m["content"]})
    first = 1 if out[0]["role"] == "system" else 0
    for i, m in enumerate(out[first:], first):
        want = "user" if (i - first) % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ValueError(f"message {i} is from {m['role']!r}, expected {want!r} (turns alternate, user first)")
    if len(out) == first or out[-1]["role"] != last:
        raise ValueError(f"the conversation must end with a {last} message")
    return out


def _llava_messages(turns) -> tuple[list[dict[str, str]], int | None]:
    """LLaVA's `conversations` -> (messages, index of the message that held <image>, or None)."""
    if not isinstance(turns, list) or not turns:
        raise _Bad("'conversations' is not a non-empty list")
    messages, image_at = [], None
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise _Bad(f"conversations[{i}] is not an object")
        role = ROLES.get(t.get("from"))
        if role is None:
            raise _Bad(f"conversations[{i}]: 'from' is {t.get('from')!r} (expected human, gpt or system)")
        text = _str(t.get("value"), f"conversations[{i}]'s 'value'")
        if IMAGE_MARK in text:
            if image_at is not None or role != "user":
                raise _Bad(
                    f"conversations[{i}]: {IMAGE_MARK} {'again' if image_at is not None else 'outside a human turn'}"
                )
            image_at, text = len(messages), text.replace(IMAGE_MARK, "").strip()
        messages.append({"role": role, "content": text})
    try:
        return check_messages(messages), image_at
    except ValueError as e:
        raise _Bad(str(e)) from None


def read_llava(path, image_root=None, *, strict: bool = False, report: RowReport | None = None) -> list[dict]:
    """A LLaVA-style instruction file (a JSON list of {"id", "image", "conversations": [{"from", "value"}]})
    -> samples {"id", "image" (path, or None for a text-only conversation), "messages", "image_at"}. A
    bad record (no conversations, turns out of order, an unknown speaker, empty text) is skipped and
    reported as "<file>[i]" (strict: the first one raises)."""
    rep = _report(path, strict, report)
    data = _load_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations, got {type(data).__name__}")
    out = []
    for i, rec in enumerate(data):
        try:
            if not isinstance(rec, dict):
                raise _Bad(f"not an object ({type(rec).__name__})")
            messages, image_at = _llava_messages(rec.get("conversations"))
            image = _join(image_root, _str(rec["image"], "'image'")) if rec.get("image") is not None else None
            if image is None and image_at is not None:
                raise _Bad(f"{IMAGE_MARK} in the text but no 'image'")
            sample = {"id": _id(rec, "id", default=i), "image": image, "messages": messages}
        except _Bad as e:
            rep.skip(f"{path}[{i}]", str(e))
            continue
        rep.ok()
        rep.ignored.update(k for k in rec if k not in LLAVA_KEYS)
        if image is not None and image_at is None:  # no <image> mark: the image opens the first user turn
            image_at = 1 if messages[0]["role"] == "system" else 0
        out.append({**sample, "image_at": image_at})
    if rep.ignored:
        log.warning("%s: keys not read: %s (read: %s)", path, ", ".join(sorted(rep.ignored)), ", ".join(LLAVA_KEYS))
    rep.log_summary()
    return out


# ---------------------------------------------------------------- tokens and labels


def _spans_with_template(tokenizer, messages) -> tuple[str, list[tuple[int, int]]]:
    """The chat template's rendering and the character spans of the assistant's turns in it: turn i's
    span runs from the end of the rendering of messages[:i] with the generation prompt to the end of the
    rendering of messages[:i + 1]."""
    render = lambda ms, gen=False: tokenizer.apply_chat_template(ms, tokenize=False, add_generation_prompt=gen)
    text, spans = render(messages), []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = render(messages[:i], gen=True), render(messages[: i + 1])
        if not (upto.startswith(before) and text.startswith(upto)):
            raise ValueError(
                "the tokenizer's chat template renders a conversation differently from its own beginning, "
                "so the assistant's turns cannot be told apart for the labels"
            )
        spans.append((len(before), len(upto)))
    return text, spans


def plain_text(messages, prompt_format: str = "Question: {} Answer:") -> str:
    """A conversation as text for an LM without a chat template: a system message opens it, each user
    turn is `prompt_format` filled with its text, each answer follows after a space. For messages that
    end with a user turn, this is the prompt for the next answer (what a prompt + target sample holds)."""
    return " ".join(m["content"] if m["role"] != "user" else prompt_format.format(m["content"]) for m in messages)


def _plain_tokens(tokenizer, messages, prompt_format: str) -> tuple[list[int], list[int]]:
    """(ids, labels) of `plain_text`, with labels on every answer and an eos after the last one only: an
    earlier answer is followed by the next question, as in a prompt + target sample about a later turn,
    and what follows an answer is learnt from the last one (eos)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the LM tokenizer has no eos token: answers could never end")
    ids, labels = [], []
    for i, m in enumerate(messages):
        text = m["content"] if m["role"] != "user" else prompt_format.format(m["content"])
        # the first piece gets the tokenizer's own special tokens (bos where it adds one), as a prompt does
        piece = tokenizer(text).input_ids if i == 0 else tokenizer(" " + text, add_special_tokens=False).input_ids
        if m["role"] != "assistant":
            ids, labels = ids + piece, labels + [-100] * len(piece)
            continue
        piece += [tokenizer.eos_token_id] if i == len(messages) - 1 else []
        ids, labels = ids + piece, labels + piece
    return ids, labels


def encode_conversation(tokenizer, messages, prompt_format: str = "Question: {} Answer:") -> dict[str, list[int]]:
    """{"input_ids", "labels"} of one conversation for a decoder-only LM; labels are -100 except on the
    assistant's tokens. With a chat template, the tokens are the template's rendering (a token counts as
    the assistant's when its characters lie inside an assistant turn, end-of-turn marker included);
    without one, see `_plain_tokens`."""
    messages = check_messages(messages)
    if getattr(tokenizer, "chat_template", None):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("labels from a chat template need a fast tokenizer (character offsets)")
        text, spans = _spans_with_template(tokenizer, messages)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        inside = lambda a, b: b > a and any(s <= a and b <= e for s, e in spans)
        ids = enc["input_ids"]
        labels = [t if inside(a, b) else -100 for t, (a, b) in zip(ids, enc["offset_mapping"])]
    else:
        ids, labels = _plain_tokens(tokenizer, messages, prompt_format)
    if all(label == -100 for label in labels):
        raise ValueError("no assistant token in the encoded conversation")
    return {"input_ids": ids, "labels": labels}


def generation_prompt(tokenizer, messages, prompt_format: str = "Question: {} Answer:") -> list[int]:
    """Token ids that ask the LM for the next assistant turn after `messages` (ending with a user turn),
    rendered as `encode_conversation` renders the same turns for training."""
    messages = check_messages(messages, last="user")
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False).input_ids
    return _plain_tokens(tokenizer, messages, prompt_format)[0]


# ---------------------------------------------------------------- ShapesWorld conversations

FOLLOW_UPS = ("size", "left of", "right of", "above", "below")  # asked about "the object" just named


def _about_object(o: sw.Obj, objs: tuple[sw.Obj, ...], what: str) -> tuple[str, str]:
    """A follow-up question about `o`, which the question names only as "the object" (the words are
    ShapesWorld's own, so the shipped word-level tokenizers read them)."""
    if what == "size":
        return "what size is the object?", o.size
    return f"how many objects are {what} the object?", str(sum(sw.holds(what, x, o) for x in objs if x is not o))


def scene_conversation(scene: sw.Scene, rng: np.random.Generator, turns: int = 3) -> list[dict[str, str]] | None:
    """A multi-turn Q&A about one object of `scene`: the first question names it (by a shape, a colour or
    a colour + shape that only it has), the next ones ask about "the object" (its size if not yet said,
    how many objects lie left of / right of / above / below it), so in a scene of several objects they
    can only be answered from the earlier turns. `turns` questions at most; None when no object can be
    named (all shapes, colours and colour + shape pairs repeat)."""
    objs = scene.objects
    shapes, colors, names = [o.shape for o in objs], [o.color for o in objs], [o.name for o in objs]
    anchors = []  # (question, answer, object, whether the exchange said its size)
    for o in objs:
        if shapes.count(o.shape) == 1:
            anchors.append((f"what color is the {o.shape}?", o.color, o, False))
        if colors.count(o.color) == 1:
            anchors.append((f"what shape is the {o.color} object?", o.shape, o, False))
        if names.count(o.name) == 1:
            anchors.append((f"what size is the {o.name}?", o.size, o, True))
    if not anchors:
        return None
    question, answer, o, sized = anchors[int(rng.integers(len(anchors)))]
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    rest = [w for w in FOLLOW_UPS if not (sized and w == "size")]
    for j in rng.permutation(len(rest))[: max(0, turns - 1)]:
        q, a = _about_object(o, objs, rest[j])
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages


def shapesworld_conversations(
    split: str, n: int, cfg: sw.ShapesWorldConfig | None = None, turns: int = 3, start: int = 0
) -> list[dict]:
    """n conversations {"scene", "messages", "index"} about scenes of a ShapesWorld split from index
    `start` on (a scene where no object can be named is passed over). Deterministic in (config seed,
    split, index)."""
    cfg = cfg or sw.ShapesWorldConfig()
    out, i = [], start
    while len(out) < n:
        scene = sw.split_scene(split, i, cfg)
        rng = np.random.default_rng([cfg.seed, sw.SPLITS[split], i, 7])  # 7: apart from the scene's own draws
        if (messages := scene_conversation(scene, rng, turns)) is not None:
            out.append({"scene": scene, "messages": messages, "index": i})
        i += 1
    return out
