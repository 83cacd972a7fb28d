"""Flamingo: a Perceiver Resampler and tanh-gated cross-attention inside a frozen decoder-only LM.

Alayrac et al., "Flamingo: a Visual Language Model for Few-Shot Learning", NeurIPS 2022. The
block placement rule and parameter layout follow OpenFlamingo (Awadalla et al. 2023, open_flamingo 2.0.1).

Interleaved text "<image>a cat.<|endofchunk|><image>a dog" with, per sequence, its images in the
order of its <image> tokens. Frozen vision encoder -> Perceiver Resampler (num_latents tokens per
image) -> a gated cross-attention block before every n-th frozen LM layer; each text token sees only
the latest <image> at or before it, text before the first image sees nothing (output exactly 0).

How the visual tokens reach the LM's layers: each decoder layer is replaced, in the LM's own
ModuleList, by FlamingoLayer(gated_xattn, original). Every LM call made here passes a
FlamingoContext (visual tokens + the image index of each token of *that call*) as the keyword
`flamingo=`, which transformers' decoders hand unchanged to every decoder layer (`**kwargs`; OPT,
GPT-2, Llama, Qwen2, GPT-NeoX). No layer stores anything, so a call cannot see another call's
images, and an LM call without the context is an error, not a silent text-only run. The added
tokens' rows live in a small trainable table; the LM's own embedding tables are wrapped
(set_input_embeddings / set_output_embeddings), never resized or changed.

Shapes: B batch, N image slots per sequence, F frames, v vision tokens, Dv vision width,
n latents, T text tokens, D LM width, V vocabulary, K = 2 added tokens.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlbridge.core.backbones import freeze, next_token_loss, position_kwargs
from vlbridge.core.base import VLModel
from vlbridge.models.flamingo.configuration import FlamingoConfig
from vlbridge.models.flamingo.generation import FlamingoContext, NoImageToken, visual_context
from vlbridge.models.flamingo.processing import FlamingoProcessor

log = logging.getLogger(__name__)


@dataclass
class FlamingoOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # (B, T, V') V' covers the added tokens
    media: torch.Tensor  # (B, N, n, Dv) visual tokens, reusable through forward(media=...)


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LN, Linear d->mult*d, GELU, Linear back; no biases (Flamingo / OpenFlamingo)."""
    return nn.Sequential(
        OrderedDict(
            norm=nn.LayerNorm(dim),
            up=nn.Linear(dim, mult * dim, bias=False),
            act=nn.GELU(),
            down=nn.Linear(mult * dim, dim, bias=False),
        )
    )


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., L, heads*d) -> (..., heads, L, d)"""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, inner = heads, heads * dim_head
        self.norm_media, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x (B, N, Fv, D) image tokens, latents (B, N, n, D) -> (B, N, n, D)"""
        latents = self.norm_latents(latents)
        kv = torch.cat([self.norm_media(x), latents], dim=-2)  # the latents also attend to themselves
        q = _heads(self.to_q(latents), self.heads)
        k, v = (_heads(t, self.heads) for t in self.to_kv(kv).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1))  # (B*N, h, n, d)
        return self.to_out(out.unflatten(0, q.shape[:2]).transpose(-3, -2).flatten(-2))


class PerceiverResampler(nn.Module):
    """A fixed number of learned latents cross-attend to each image's tokens: any number of patch
    tokens in, num_latents visual tokens out."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_latents: int,
        heads: int,
        dim_head: int,
        ff_mult: int,
        max_media: int | None = None,
    ):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.media_time_embs = nn.Parameter(torch.randn(max_media, 1, dim)) if max_media else None
        self.layers = nn.ModuleList(
            nn.ModuleDict(dict(attn=PerceiverAttention(dim, heads, dim_head), ff=feed_forward(dim, ff_mult)))
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, F, v, D) -> (B, N, n, D)"""
        B, N = x.shape[:2]
        x = x.flatten(2, 3)  # an image's frames and patches form one set of tokens: (B, N, F*v, D)
        if self.media_time_embs is not None:
            if N > len(self.media_time_embs):
                raise ValueError(
                    f"{N} images per sequence, but media-time embeddings exist for {len(self.media_time_embs)}"
                )
            x = x + self.media_time_embs[:N]
        latents = self.latents.expand(B, N, -1, -1)
        for layer in self.layers:
            latents = latents + layer["attn"](x, latents)
            latents = latents + layer["ff"](latents)
        return self.norm(latents)


class MaskedCrossAttention(nn.Module):
    def __init__(self, dim: int, dim_visual: int, heads: int, dim_head: int, only_attend_immediate_media: bool = True):
        super().__init__()
        self.heads, self.scale, inner = heads, dim_head**-0.5, heads * dim_head
        self.only_attend_immediate_media = only_attend_immediate_media
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, media: torch.Tensor, text_time: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), media (B, N, n, Dv), text_time (B, T) -> (B, T, D)"""
        N, n = media.shape[1:3]
        q = _heads(self.to_q(self.norm(x)), self.heads) * self.scale  # (B, h, T, d)
        k, v = (_heads(t, self.heads) for t in self.to_kv(media.flatten(1, 2)).chunk(2, dim=-1))  # (B, h, N*n, d)
        image = torch.arange(1, N + 1, device=x.device).repeat_interleave(n)  # (N*n,) image of each key
        t = text_time[:, :, None]
        allowed = image == t if self.only_attend_immediate_media else image <= t  # (B, T, N*n)
        scores = (q @ k.transpose(-1, -2)).masked_fill(~allowed[:, None], torch.finfo(q.dtype).min)
        # A row with no image to look at would get softmax's uniform average over masked keys (the
        # IDEFICS leak): multiply it by 0 so that its output is exactly zero, in both modes.
        attn = scores.softmax(dim=-1) * (text_time > 0)[:, None, :, None].to(q.dtype)
        return self.to_out((attn @ v).transpose(1, 2).flatten(2))


class GatedCrossAttentionBlock(nn.Module):
    """x + tanh(a) * xattn(LN(x), media); then x + tanh(b) * FFN(LN(x)). a = b = 0 at init, so the
    frozen LM is unchanged until training opens the gates. tanh_gating=False (ablation): gates of 1."""

    def __init__(
        self,
        dim: int,
        dim_visual: int,
        heads: int,
        dim_head: int,
        ff_mult: int,
        only_attend_immediate_media: bool = True,
        tanh_gating: bool = True,
    ):
        super().__init__()
        self.attn = MaskedCrossAttention(dim, dim_visual, heads, dim_head, only_attend_immediate_media)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = feed_forward(dim, ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))
        self.tanh_gating = tanh_gating
        if not tanh_gating:  # the gates stay in the state dict (same layout) but take no part
            self.attn_gate.requires_grad_(False)
            self.ff_gate.requires_grad_(False)

    def forward(self, x: torch.Tensor, media: torch.Tensor, text_time: torch.Tensor) -> torch.Tensor:
        if not self.tanh_gating:
            x = x + self.attn(x, media, text_time)
            return x + self.ff(x)
        x = x + self.attn_gate.tanh() * self.attn(x, media, text_time)
        return x + self.ff_gate.tanh() * self.ff(x)


class FlamingoLayer(nn.Module):
    """Placed in the LM's layer list instead of `original`: the gated block (or None), then the layer."""

    def __init__(self, gated_xattn: GatedCrossAttentionBlock | None, original: nn.Module):
        super().__init__()
        self.gated_xattn, self.original = gated_xattn, original
        if hasattr(original, "attention_type"):  # some decoders pick each layer's mask by it
            self.attention_type = original.attention_type

    def forward(self, hidden_states, *args, flamingo: FlamingoContext | None = None, **kwargs):
        if flamingo is None:
            raise ValueError(
                "this LM has Flamingo layers: call it through Flamingo (forward / generate), "
                "or pass flamingo=FlamingoContext(media, text_time)"
            )
        if self.gated_xattn is not None:
            dtype = self.gated_xattn.attn_gate.dtype  # the bridge may be fp32 over a bf16 LM
            h = self.gated_xattn(hidden_states.to(dtype), flamingo.media.to(dtype), flamingo.text_time)
            hidden_states = h.to(hidden_states.dtype)
        return self.original(hidden_states, *args, **kwargs)


class AddedTokens(nn.Module):
    """Rows of the added tokens (<image>, <|endofchunk|>): the only embeddings that train. They start
    as the mean row of the LM's tables; the output rows are the input rows when the LM ties them."""

    def __init__(self, token_ids: list[int], lm_input: torch.Tensor, lm_output: torch.Tensor, tied: bool):
        super().__init__()
        self.register_buffer("token_ids", torch.tensor(token_ids), persistent=False)
        self.input = nn.Parameter(lm_input.detach().float().mean(0).repeat(len(token_ids), 1))
        self.output = None if tied else nn.Parameter(lm_output.detach().float().mean(0).repeat(len(token_ids), 1))


class ExtendedEmbedding(nn.Module):
    """The LM's frozen input embedding plus the added rows (set with lm.set_input_embeddings)."""

    def __init__(self, original: nn.Module, added: AddedTokens):
        super().__init__()
        self.original, self.added = original, added

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        match = input_ids[..., None] == self.added.token_ids  # (B, T, K)
        emb = self.original(input_ids.masked_fill(match.any(-1), 0))  # added ids may lie past the frozen table
        # a one-hot sum, not rows[index]: the backward of indexing accumulates into the rows in a
        # thread-dependent order on CPU, and made two identical Flamingo runs drift apart (no matmul
        # either: autocast would round the rows to bf16). (B, T, K, 1) * (K, D) summed over K -> (B, T, D)
        rows = (match[..., None].to(emb.dtype) * self.added.input.to(emb.dtype)).sum(-2)
        return torch.where(match.any(-1, keepdim=True), rows, emb)


class ExtendedHead(nn.Module):
    """The LM's frozen output head plus logits for the added ids (set with lm.set_output_embeddings)."""

    def __init__(self, original: nn.Module, added: AddedTokens):
        super().__init__()
        self.original, self.added = original, added
        self.size = max(original.weight.shape[0], int(added.token_ids.max()) + 1)  # V' covers the added ids

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.original(h)  # (B, T, V); ids between V and the added ones (if any) are never predicted
        logits = F.pad(logits, (0, self.size - logits.shape[-1]), value=torch.finfo(logits.dtype).min)
        rows = self.added.input if self.added.output is None else self.added.output
        return logits.index_copy(-1, self.added.token_ids, (h @ rows.to(h.dtype).T).to(logits.dtype))


def decoder_layers(lm: nn.Module) -> tuple[str, nn.ModuleList]:
    """The LM's list of decoder layers and its path (OPT model.decoder.layers, GPT-2 transformer.h, ...)."""
    n = lm.config.num_hidden_layers
    for name, module in lm.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    raise ValueError(f"{type(lm).__name__}: cannot find its list of {n} decoder layers")


class Flamingo(VLModel):
    """Frozen vision backbone + perceiver + gated blocks wrapped into a frozen decoder-only LM. Build
    with create_flamingo(config) or Flamingo.from_pretrained(path); trainable: perceiver, xattn,
    new_tokens."""

    model_type = "flamingo"
    config_class = FlamingoConfig
    processor_class = FlamingoProcessor

    def __init__(self, config: FlamingoConfig, vision: nn.Module, lm: nn.Module):
        super().__init__()
        c = self.config = config
        if c.image_token_id is None or c.eoc_token_id is None:
            raise ValueError("config.image_token_id / eoc_token_id are unset: build with create_flamingo")
        if lm.config.is_encoder_decoder or any(isinstance(m, FlamingoLayer) for m in lm.modules()):
            raise ValueError("Flamingo needs a decoder-only LM that is not wrapped already")
        self.vision = freeze(vision)
        freeze(lm)
        dv, d = vision.hidden_size, lm.get_input_embeddings().embedding_dim
        # The trainable parts are registered here before the LM, so that parameter names are theirs
        # ("xattn.3.attn_gate"); the LM's wrappers hold the same modules.
        self.perceiver = PerceiverResampler(
            dv,
            c.perceiver_depth,
            c.num_latents,
            c.perceiver_heads,
            c.perceiver_dim_head,
            c.perceiver_ff_mult,
            c.max_media,
        )
        self.decoder_path, layers = decoder_layers(lm)
        self.xattn = nn.ModuleDict(
            {
                str(i): GatedCrossAttentionBlock(
                    d,
                    dv,
                    c.xattn_heads,
                    c.xattn_dim_head,
                    c.xattn_ff_mult,
                    c.only_attend_immediate_media,
                    c.gating == "tanh",
                )
                for i in range(len(layers))
                if (i + 1) % c.cross_attn_every == 0
            }
        )
        for i in range(len(layers)):
            layers[i] = FlamingoLayer(self.xattn[str(i)] if str(i) in self.xattn else None, layers[i])
        emb_in, emb_out = lm.get_input_embeddings(), lm.get_output_embeddings()
        if emb_out is None:
            raise ValueError(f"{type(lm).__name__} has no output embeddings to extend")
        self.new_tokens = AddedTokens(
            [c.image_token_id, c.eoc_token_id], emb_in.weight, emb_out.weight, tied=emb_out.weight is emb_in.weight
        )
        lm.set_input_embeddings(ExtendedEmbedding(emb_in, self.new_tokens))
        lm.set_output_embeddings(ExtendedHead(emb_out, self.new_tokens))
        self.lm = lm
        self.log_parameter_counts()

    # ------------------------------------------------------------------ building, saving, loading
    def _write_backbones(self, path: Path, include_backbones: bool, processor) -> FlamingoConfig:
        """vision/ and lm/ in transformers' own format (the LM exactly as loaded, without wrappers)."""
        config = copy.deepcopy(self.config)
        if include_backbones:
            self.vision.save_pretrained(path / "vision")
            config.vision.name_or_path, config.vision.feature_layer = "vision", -1  # saved already cut
            self.lm.save_pretrained(path / "lm", state_dict=self.lm_state_dict())
            config.lm.name_or_path = "lm"
        return config

    def lm_state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen LM's own tensors under transformers' names (wrappers and bridge parts removed)."""
        return {
            k.replace(".original.", "."): v
            for k, v in self.lm.state_dict().items()
            if ".gated_xattn." not in k and ".added." not in k
        }

    # ------------------------------------------------------------------ what it can do, what trains
    @property
    def tasks(self) -> frozenset[str]:
        return frozenset({"caption", "vqa", "in_context"})

    def frozen_backbones(self) -> list[nn.Module]:
        return [self.vision, self.lm]

    def train(self, mode: bool = True):
        super().train(mode)
        self.xattn.train(mode)  # the blocks inside the frozen LM follow `mode`
        return self

    def param_groups(self, weight_decay: float, gate_lr_scale: float = 1.0) -> list[dict]:
        """Decay only on the gated cross-attention blocks (`xattn.*`, gates and norms included), none on the
        perceiver or the new token rows, as OpenFlamingo does; with gate_lr_scale != 1 the gates form a
        third group whose "lr_scale" the training loop applies."""
        decay, no_decay, gates = [], [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if gate_lr_scale != 1 and name.endswith("_gate"):
                gates.append(p)
            else:
                (decay if name.startswith("xattn.") else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if gates:
            groups.append({"params": gates, "weight_decay": weight_decay, "lr_scale": gate_lr_scale})
        return groups

    # ------------------------------------------------------------------ images and text
    def encode_images(self, pixel_values=None, image_features=None, image_mask=None) -> torch.Tensor:
        """Visual tokens (B, N, n, Dv) from pixel_values (B, N, 3, H, W) or the frozen encoder's output
        image_features (B, N, v, Dv). image_mask (B, N): real images; padding slots skip the encoder."""
        if image_features is None:
            keep = torch.ones(pixel_values.shape[:2], dtype=torch.bool) if image_mask is None else image_mask.bool()
            keep = keep.to(pixel_values.device)
            if not keep.any():  # nothing to encode, nothing will be attended
                return self._empty_media(*keep.shape)
            with torch.no_grad():
                feats = self.vision(pixel_values[keep])  # (M, v, Dv): the real images only
            image_features = feats.new_zeros(*keep.shape, *feats.shape[1:])
            image_features[keep] = feats
        return self.perceiver(image_features[:, :, None].to(self.perceiver.latents.dtype))  # one frame each

    def _empty_media(self, B: int, N: int) -> torch.Tensor:
        return self.perceiver.latents.new_zeros(B, N, *self.perceiver.latents.shape)

    def text_time(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T): how many <image> tokens lie at or before each position (the image a token sees)."""
        return (input_ids == self.config.image_token_id).long().cumsum(-1)

    def _media(self, input_ids, pixel_values, image_features, media, image_mask) -> torch.Tensor:
        counts = (input_ids == self.config.image_token_id).sum(1)  # row b uses image slots [0, counts[b])
        if image_mask is not None and not torch.equal(image_mask.sum(1).to(counts), counts):
            raise ValueError(f"<image> tokens per row {counts.tolist()} != images per row {image_mask.sum(1).tolist()}")
        if media is None and (pixel_values is not None or image_features is not None):
            slots = (pixel_values if image_features is None else image_features).shape[1]
            slots = torch.arange(slots, device=counts.device)[None] < counts[:, None]
            media = self.encode_images(pixel_values, image_features, slots)
        media = self._empty_media(len(input_ids), 0) if media is None else media  # None: text only
        if (counts > media.shape[1]).any():
            raise ValueError(
                f"rows hold {counts.tolist()} <image> tokens but only {media.shape[1]} image slots were given"
            )
        return media

    def forward(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        labels=None,
        image_mask=None,
        image_features=None,
        media=None,
    ) -> FlamingoOutput:
        """input_ids (B, T) interleaved text; pixel_values (B, N, 3, H, W), the i-th slot of a row for
        its i-th <image>; labels (B, T) -100 where ignored (see FlamingoProcessor). Instead of pixels:
        image_features (frozen encoder output) or media (visual tokens from encode_images)."""
        media = self._media(input_ids, pixel_values, image_features, media, image_mask)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        logits = self.lm(
            input_ids=input_ids,
            attention_mask=mask,
            use_cache=False,
            **position_kwargs(self.lm, mask),
            flamingo=FlamingoContext(media, self.text_time(input_ids)),
        ).logits
        loss = None if labels is None else next_token_loss(logits, labels)
        return FlamingoOutput(loss, logits, media)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_mask=None,
        image_features=None,
        media=None,
        **generate_kwargs,
    ):
        """transformers' generate on the frozen LM, with all its keywords (num_beams, length_penalty,
        do_sample, temperature, top_p, streamer, logits_processor, stopping_criteria, ...); prompts
        left-padded (the processor does it). The images are encoded once, new tokens attend to the
        prompt's last image, and <image> is never generated. Defaults: max_new_tokens 20, stop at
        <|endofchunk|> or the LM's eos, the rest from the LM's generation_config. Returns the new tokens
        only (B * num_return_sequences, L), a finished row padded with the pad id; with
        return_dict_in_generate, transformers' output with its sequences cut the same way."""
        from transformers import LogitsProcessorList

        media = self._media(input_ids, pixel_values, image_features, media, image_mask)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        kwargs, config = dict(generate_kwargs), generate_kwargs.get("generation_config") or self.lm.generation_config
        if not {"max_new_tokens", "max_length", "generation_config"} & kwargs.keys():
            kwargs["max_new_tokens"] = 20
        if kwargs.get("eos_token_id") is None:  # a chunk ends with <|endofchunk|>, the text with the LM's eos
            eos = config.eos_token_id
            kwargs["eos_token_id"] = [
                self.config.eoc_token_id,
                *([] if eos is None else eos if isinstance(eos, list) else [eos]),
            ]
        processors = [*(kwargs.get("logits_processor") or []), NoImageToken(self.config.image_token_id)]  # ours last
        kwargs["logits_processor"] = LogitsProcessorList(processors)
        self.check_context(input_ids.shape[1], kwargs)
        with visual_context(self.lm, media, self.text_time(input_ids), self.config.image_token_id):
            out = self.lm.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
        if isinstance(out, torch.Tensor):
            return out[:, input_ids.shape[1] :]
        out.sequences = out.sequences[:, input_ids.shape[1] :]
        return out


def create_flamingo(config: FlamingoConfig, root: str | Path | None = None):
    """A new Flamingo (fresh perceiver, gated blocks closed) on the backbones `config` names, and its
    processor; the special tokens are added to the LM's tokenizer and their ids written to the config."""
    processor = FlamingoProcessor.from_config(config, root)
    config = copy.deepcopy(config)
    config.image_token_id, config.eoc_token_id = processor.image_token_id, processor.eoc_token_id
    return Flamingo.from_config(config, root), processor
