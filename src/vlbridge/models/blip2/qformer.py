"""Q-Former: the querying transformer of BLIP-2.

Li et al., "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and Large
Language Models", 2023.

A BERT encoder whose input is concat(learned queries, text). Queries and text share ONE
self-attention; what each position may see is set by a mask (see `build_mask`):

    unimodal        queries see queries, text sees text                 (ITC)
    bidirectional   everyone sees everyone                              (ITM)
    causal          queries see queries, text sees queries + past text  (ITG)

Cross-attention to the image runs every `cross_attention_frequency` layers and on the query
positions only; each layer has one feed-forward for query positions and one for text positions.
Queries carry no position embeddings. Shapes: B batch, Q queries, T text tokens, N image tokens,
d = hidden_size, H heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlbridge.models.blip2.configuration import QFormerConfig

MASK_KINDS = ("unimodal", "bidirectional", "causal")


def build_mask(
    kind: str, num_query: int, text_mask: torch.Tensor | None, batch: int, device=None, cached_query: bool = False
) -> torch.Tensor:
    """Boolean (B, 1, rows, Q + T) mask, True = may attend.

    Keys are always [queries, text]. Rows are the same positions, except with `cached_query`
    (queries already computed, their keys/values passed as cache): then rows are text only.
    `text_mask` (B, T) marks real text tokens (1) vs padding (0); padding keys are never seen.
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; expected one of {MASK_KINDS}")
    Q = num_query
    T = 0 if text_mask is None else text_mask.shape[1]
    device = device if text_mask is None else text_mask.device
    is_query = torch.arange(Q + T, device=device) < Q
    if kind == "bidirectional":
        allowed = torch.ones(Q + T, Q + T, dtype=torch.bool, device=device)
    else:
        # Same modality always sees itself; queries never see text.
        allowed = is_query[:, None] == is_query[None, :]
        if kind == "causal":
            pos = torch.arange(Q + T, device=device)
            text_causal = pos[:, None] >= pos[None, :]
            allowed = torch.where(is_query[:, None], allowed, is_query[None, :] | text_causal)
    keys = torch.ones(batch, Q + T, dtype=torch.bool, device=device)
    if text_mask is not None:
        keys[:, Q:] = text_mask.bool()
    mask = allowed[None] & keys[:, None, :]  # (B, Q+T, Q+T)
    if cached_query:
        mask = mask[:, Q:]
    return mask[:, None]


def explicit_attention(q, k, v, mask, dropout_p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v; q (B, H, L, e), k/v (B, H, S, e), mask additive (B, 1, L, S)."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + mask
    probs = F.dropout(scores.softmax(-1), dropout_p) if dropout_p else scores.softmax(-1)
    return probs @ v


def fused_attention(q, k, v, mask, dropout_p: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def attention(q, k, v, mask, dropout_p: float) -> torch.Tensor:
    """The same function by the faster path: on CPU in bf16 (autocast) torch's fused SDPA kernel is slower
    than the explicit ops for a whole stage-1 step (forward + backward; `make bench` measures both), so
    low-precision CPU training takes the explicit path. Without gradients (inference) the fused kernel is
    the faster one, and the one transformers' BLIP-2 uses, so generated ids match it; fp32 and GPU always
    use the fused kernel."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled():
        return explicit_attention(q, k, v, mask, dropout_p)
    return fused_attention(q, k, v, mask, dropout_p)


class Attention(nn.Module):
    """BERT post-LN attention block: LN(x + Dropout(Dense(MHA(x, kv))))."""

    def __init__(self, cfg: QFormerConfig, kv_dim: int | None = None):
        super().__init__()
        d, kv_dim = cfg.hidden_size, kv_dim or cfg.hidden_size
        if d % cfg.num_heads:
            raise ValueError(f"hidden_size {d} is not divisible by num_heads {cfg.num_heads}")
        self.num_heads = cfg.num_heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(kv_dim, d)
        self.value = nn.Linear(kv_dim, d)
        self.dense = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.attn_dropout = cfg.attention_dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, d) -> (B, H, L, d/H)
        B, L, _ = x.shape
        return x.view(B, L, self.num_heads, -1).transpose(1, 2)

    def forward(self, x, kv=None, mask=None, past=None, kv_index=None):
        """x (B, L, d); kv (B, S, kv_dim), default x; mask bool (B, 1, L, P+S); past (k, v) of P earlier keys.
        kv_index (B,): kv holds U distinct sources (U, S, kv_dim) and row b attends to kv[kv_index[b]]:
        keys and values are projected once per source, not once per row.

        Returns (B, L, d) and this call's full (k, v), each (B, H, P+S, d/H), for caching.
        """
        src = x if kv is None else kv
        q, k, v = self._heads(self.query(x)), self._heads(self.key(src)), self._heads(self.value(src))
        if kv_index is not None:
            k, v = k[kv_index], v[kv_index]
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        if mask is not None:
            # Additive mask: a fully masked row then averages instead of producing NaN.
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, torch.finfo(q.dtype).min)
        out = attention(q, k, v, mask, self.attn_dropout if self.training else 0.0)
        out = out.transpose(1, 2).flatten(2)
        return self.norm(x + self.dropout(self.dense(out))), (k, v)


class FeedForward(nn.Module):
    """BERT post-LN feed-forward: LN(x + Dropout(W2 GELU(W1 x)))."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.intermediate = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.output = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.norm(x + self.dropout(self.output(F.gelu(self.intermediate(x)))))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, has_cross_attention: bool):
        super().__init__()
        self.attention = Attention(cfg)
        self.crossattention = Attention(cfg, kv_dim=cfg.encoder_hidden_size) if has_cross_attention else None
        self.ffn_query = FeedForward(cfg)
        self.ffn = FeedForward(cfg) if cfg.text_branch else None  # text positions

    def forward(self, h, num_query, mask, image_embeds, image_mask, past, image_index=None):
        """h (B, Q+T, d), the first `num_query` rows are queries. Returns h and this layer's (k, v)."""
        h, present = self.attention(h, mask=mask, past=past)
        parts = []
        if num_query:
            q = h[:, :num_query]
            if self.crossattention is not None:
                if image_embeds is None:
                    raise ValueError("query positions need image_embeds for cross-attention")
                q = self.crossattention(q, kv=image_embeds, mask=image_mask, kv_index=image_index)[0]
            parts.append(self.ffn_query(q))
        if h.shape[1] > num_query:
            if self.ffn is None:
                raise ValueError("this Q-Former has no text branch (dropped for stage 2); it cannot take text")
            parts.append(self.ffn(h[:, num_query:]))
        return torch.cat(parts, dim=1), present


class LMHead(nn.Module):
    """BERT prediction head for ITG: Dense -> GELU -> LN -> vocab logits (decoder tied to word embeddings)."""

    def __init__(self, cfg: QFormerConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.word_embeddings = [word_embeddings]  # a list: tied, not registered twice
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x):
        x = self.norm(F.gelu(self.dense(x)))
        return F.linear(x, self.word_embeddings[0].weight, self.bias)


class QFormer(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, d))
        self.word_embeddings = self.position_embeddings = None
        if cfg.text_branch:
            self.word_embeddings = nn.Embedding(cfg.vocab_size, d, padding_idx=cfg.pad_token_id)
            self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, d)
        self.layernorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)  # embedding LN, queries included
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(cfg, i % cfg.cross_attention_frequency == 0) for i in range(cfg.num_layers)
        )
        self.lm_head = LMHead(cfg, self.word_embeddings) if cfg.text_branch and cfg.pretrain_heads else None
        self.grad_checkpointing = False
        self.apply(self._init_weights)
        nn.init.normal_(self.query_tokens, std=0.02)
        self.copy_text_ffn_to_query_ffn()

    @staticmethod
    def _init_weights(m):  # BERT's init
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            m.weight.data[m.padding_idx].zero_()
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.no_grad()
    def copy_text_ffn_to_query_ffn(self):
        """BLIP-2 starts the query FFNs as copies of the (BERT-initialised) text FFNs."""
        for layer in self.layers:
            if layer.ffn is not None:
                layer.ffn_query.load_state_dict(layer.ffn.state_dict())

    def drop_text_branch(self, keep_text_input: bool = False):
        """Remove what only text positions use (stage 2 feeds no text to the Q-Former), or with
        keep_text_input only the ITG head (stage 2 feeds it questions, Blip2Config.qformer_question)."""
        self.config.pretrain_heads = False
        self.lm_head = None
        if keep_text_input:
            return
        self.config.text_branch = False
        self.word_embeddings = self.position_embeddings = None
        for layer in self.layers:
            layer.ffn = None

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.word_embeddings is None:
            raise ValueError("this Q-Former has no text branch (dropped for stage 2); it cannot take text")
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(
                f"text has {T} tokens, more than max_position_embeddings={self.config.max_position_embeddings}"
            )
        # Text positions start at 0 whether or not queries precede them.
        pos = torch.arange(T, device=input_ids.device)
        return self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        image_embeds=None,
        image_mask=None,
        use_queries: bool | None = None,
        mask_kind: str = "bidirectional",
        past_key_values=None,
        use_cache: bool = False,
        image_index=None,
    ):
        """Run the Q-Former.

        input_ids (B, T) / attention_mask (B, T): text, optional.
        image_embeds (B, N, encoder_hidden_size), image_mask (B, N): what queries cross-attend to.
        image_index (B,): image_embeds (and image_mask) then hold U distinct images (U, N, ...) and
            row b sees image image_index[b], e.g. ITM pairs that repeat images: each layer projects
            an image to keys/values once instead of once per pair.
        use_queries: include the learned queries (default: when image_embeds is given).
        past_key_values: per-layer (k, v) of the queries from an earlier call (ITG reuses the ITC
            pass this way); then only text is computed, with `mask_kind` "causal" or "bidirectional".
        Returns hidden states (B, Q+T, d) and, with use_cache, per-layer (k, v).
        """
        cached = past_key_values is not None
        use_queries = (image_embeds is not None) if use_queries is None else use_queries
        if cached and use_queries:
            raise ValueError("queries are either computed (use_queries) or cached (past_key_values), not both")
        parts = []
        if use_queries:
            if image_index is not None:
                B = len(image_index)
            else:
                B = image_embeds.shape[0] if image_embeds is not None else input_ids.shape[0]
            parts.append(self.query_tokens.expand(B, -1, -1))
        if input_ids is not None:
            parts.append(self.embed_text(input_ids))
        if not parts:
            raise ValueError("nothing to encode: give image_embeds (queries) and/or input_ids (text)")
        h = self.dropout(self.layernorm(torch.cat(parts, dim=1)))
        B = h.shape[0]
        num_query = self.config.num_query_tokens if use_queries else 0
        text_mask = None
        if input_ids is not None:
            text_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        mask = None  # queries alone see each other under every kind
        if text_mask is not None:
            keys_q = self.config.num_query_tokens if cached else num_query
            mask = build_mask(mask_kind, keys_q, text_mask, B, cached_query=cached)
        img_mask = None if image_mask is None else image_mask.bool()[:, None, None, :]
        if img_mask is not None and image_index is not None:
            img_mask = img_mask[image_index]  # (B, 1, 1, N): cheap, unlike the keys and values
        presents = []
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if cached else None
            if self.grad_checkpointing and self.training:
                h, kv = checkpoint(
                    layer, h, num_query, mask, image_embeds, img_mask, past, image_index, use_reentrant=False
                )
            else:
                h, kv = layer(h, num_query, mask, image_embeds, img_mask, past, image_index)
            presents.append(kv)
        return (h, presents) if use_cache else h

    def itg_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            raise ValueError("this Q-Former has no ITG head (dropped for stage 2)")
        return self.lm_head(hidden)
