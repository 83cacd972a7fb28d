"""How Flamingo decodes through transformers' own `generate` on its frozen LM.

The wrapped layers need `flamingo=FlamingoContext(media, text_time)` on every LM call, text_time
giving the image of each token *of that call*. generate makes the calls itself: the prompt (prefill,
or its chunks with prefill_chunk_size), then one token per step against the cache, or the whole
sequence again with use_cache=False; with beams or num_return_sequences each sample becomes K adjacent
rows (repeat_interleave, and beam search reorders only within a sample). It also refuses model kwargs
that the LM's forward does not name, so the context cannot travel as one. Instead a forward pre-hook
on the LM, held for one generate call, builds each call's context from that call's own input_ids and
cache length (the number of tokens before its first):

    text_time = images before the call + cumsum(call tokens == <image>)
    images before position p = prompt_time[p - 1], the prompt's last image once p is past the prompt

No layer stores anything; the hook holds one call's visual tokens and acts only in the thread that
opened it, so concurrent generate calls on one model do not see each other's images. NoImageToken
keeps <image> out of the output: it runs after the caller's logits processors, and the warpers
that follow it (temperature, top-k, top-p) cannot bring a -inf back.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import LogitsProcessor


@dataclass(frozen=True)
class FlamingoContext:
    """What the wrapped layers need for one LM call; passed as that call's `flamingo=` keyword."""

    media: torch.Tensor  # (B, N, n, Dv) visual tokens
    text_time: torch.Tensor  # (B, T) for this call's tokens: 1-based index of the image each follows, 0 = none


class NoImageToken(LogitsProcessor):
    """No image can follow the prompt: <image> gets -inf at every step."""

    def __init__(self, image_token_id: int):
        self.image_token_id = image_token_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.image_token_id] = float("-inf")
        return scores


@contextmanager
def visual_context(lm: nn.Module, media: torch.Tensor, prompt_time: torch.Tensor, image_token_id: int):
    """While open, every call of `lm` from this thread gets flamingo=FlamingoContext for its tokens.
    media (B, N, n, Dv) visual tokens; prompt_time (B, T0) the prompt's text_time (Flamingo.text_time)."""
    thread, B, T0 = threading.get_ident(), len(media), prompt_time.shape[1]

    def add_context(module, args, kwargs):
        if threading.get_ident() != thread:
            return None
        ids = kwargs["input_ids"]  # (B*K, T) this call's tokens
        K = len(ids) // B
        cache = kwargs.get("cache")
        past = cache.get_seq_length() if cache is not None else 0
        before = prompt_time[:, min(past, T0) - 1] if past else prompt_time.new_zeros(B)  # (B,)
        time = before.repeat_interleave(K)[:, None] + (ids == image_token_id).long().cumsum(-1)
        return args, {**kwargs, "flamingo": FlamingoContext(media.repeat_interleave(K, dim=0), time)}

    handle = lm.register_forward_pre_hook(add_context, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
