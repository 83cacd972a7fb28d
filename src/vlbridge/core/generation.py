"""Generation from prompt embeddings (a soft visual prompt + text) on a frozen decoder-only LM: transformers'
`generate(inputs_embeds=..., attention_mask=...)` continued from a KV cache of the prompt that we fill,
once per prompt.

Two costs of plain generate are avoided this way:
- transformers copies every prompt num_beams times (and num_return_sequences times) *before* its first
  forward pass, so beam search with 5 beams runs the prompt (32 query tokens + the text, or 576 image
  tokens for LLaVA) through the LM 5 times over. Here it runs once per prompt and the cache is copied.
- its first forward pass computes the logits of the prompt's last position from a slice of the hidden
  states (B, 1, D) that is not contiguous; torch multiplies such a slice with a weight that does not
  require grad (a frozen LM head) as a batched matmul over B materialised copies of the (V, D) weight,
  which in bf16 on a CPU costs more than the rest of the prompt. Here the prompt is run without the head.

The prompt but its last token goes into the cache; transformers' generate then runs that last token of
each row (each beam) against the cache, and every step after is the one it takes anyway. Search, logits
processors, stopping criteria, streamers and the ids returned are transformers' own. Only rounding
differs: the prompt is computed in a batch of B rather than B * num_beams, and its last token alone.

Anything this does not cover (an encoder-decoder LM, a user's cache, a static or quantized cache,
assisted decoding, a custom generate, no cache) goes to plain `lm.generate` unchanged.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

# generate keywords under which the prompt is not simply encoded into a dynamic cache
_PLAIN_ONLY = (
    "past_key_values",
    "cache",
    "assistant_model",
    "prompt_lookup_num_tokens",
    "custom_generate",
    "prefill_chunk_size",
    "cache_implementation",
)


def generate_from_embeds(
    lm: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, **generate_kwargs
):
    """`lm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs)`, with the
    same output, from a cache of the prompt (B, T, D) filled once per row. attention_mask (B, T): 1 on
    tokens, 0 on (left) padding; None: no padding."""
    if attention_mask is None:
        attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
    copies = _copies(lm, inputs_embeds, generate_kwargs)
    cache = None if copies is None else prefill(lm, inputs_embeds[:, :-1], attention_mask[:, :-1])
    if cache is None:
        return lm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs)
    if copies > 1:  # (B, ...) -> (B * copies, ...), each row's copies together, as generate lays out its rows
        cache.batch_repeat_interleave(copies)
    return lm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, cache=cache, **generate_kwargs)


def _copies(lm: nn.Module, inputs_embeds: torch.Tensor, kwargs: dict) -> int | None:
    """How many copies of each prompt generate runs; None for a case left to plain generate."""
    config = kwargs.get("generation_config") or lm.generation_config
    setting = lambda name, default=None: kwargs.get(name, getattr(config, name, default))  # noqa: E731
    if (
        lm.config.is_encoder_decoder  # generate encodes each prompt once already
        or inputs_embeds.shape[1] < 2
        or setting("use_cache", True) is False
        or any(kwargs.get(k) is not None for k in _PLAIN_ONLY)
        or setting("cache_implementation") not in (None, "dynamic")
        or setting("prefill_chunk_size") is not None
        or not getattr(lm, "_supports_default_dynamic_cache", lambda: False)()
    ):
        return None
    return max(setting("num_beams", 1) or 1, setting("num_return_sequences", 1) or 1)


@torch.no_grad()
def prefill(lm: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor):
    """The LM's DynamicCache for the prompt (B, T, D), laid out as generate lays out its own: positions
    numbered past left padding, the mask dropped when nothing is padded (generate drops it then too). None
    for an LM whose cache holds a running state (linear attention) instead of one entry per token."""
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.config.get_text_config(decoder=True))
    if any(getattr(cache, "is_linear", ())):
        return None
    body = getattr(lm, "base_model", lm)  # the layers without the LM head: no logits are needed
    kwargs = {}
    if _takes(type(lm), "position_ids") and _takes(type(body), "position_ids"):  # generate passes them then
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    if body is lm and _takes(type(lm), "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    mask = None if bool((attention_mask == 1).all()) else attention_mask
    body(inputs_embeds=inputs_embeds, attention_mask=mask, cache=cache, use_cache=True, **kwargs)
    return cache


def _takes(module_class: type, name: str) -> bool:
    return name in inspect.signature(module_class.forward).parameters
