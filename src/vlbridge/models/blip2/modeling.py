"""BLIP-2: a Q-Former between a frozen image encoder and a frozen LLM.

Li et al., "BLIP-2: Bootstrapping Language-Image Pre-training with Frozen Image Encoders and Large
Language Models", 2023.

Stage 1 (no LLM): `pretrain_losses` = ITC + ITM + ITG on the Q-Former (blip2_pretrain.py).
Stage 2: query outputs -> Linear -> soft prompt of a frozen decoder-only LM (LM loss on the text
after the prompt) or encoder-decoder LM (prefix LM: queries + prefix to the encoder, rest decoded).
With config.qformer_question the queries also read the question first (the paper's VQA fine-tuning).
Inference: `generate`, `itc` / `itm` / `retrieval_scores`, `extract_features`.

Shapes: B batch, N image tokens, Dv image width, Q queries, d Q-Former width, E = embed_dim,
T text tokens, H LM width.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlbridge.core import backbones
from vlbridge.core.backbones import freeze, lm_loss, next_token_loss, position_kwargs
from vlbridge.core.base import VLModel, read_weights
from vlbridge.core.config import LMConfig
from vlbridge.core.generation import generate_from_embeds
from vlbridge.models.blip2 import pretraining as blip2_pretrain
from vlbridge.models.blip2.configuration import Blip2Config
from vlbridge.models.blip2.pretraining import Blip2PretrainOutput
from vlbridge.models.blip2.processing import Blip2Processor, qformer_config_for
from vlbridge.models.blip2.qformer import QFormer, QFormerLayer

log = logging.getLogger(__name__)


@dataclass
class Blip2Output:
    loss: torch.Tensor | None
    logits: torch.Tensor  # (B, T', V) at the LM's (decoder's) positions
    query_output: torch.Tensor  # (B, Q, d)


@dataclass
class Blip2Features:
    image_embeds: torch.Tensor | None = None  # (B, Q, d) query outputs
    image_embeds_proj: torch.Tensor | None = None  # (B, Q, E) L2-normalised
    text_embeds: torch.Tensor | None = None  # (B, T, d)
    text_embeds_proj: torch.Tensor | None = None  # (B, E) L2-normalised [CLS]
    multimodal_embeds: torch.Tensor | None = None  # (B, Q, d) queries after seeing the text


RERANK_RULES = ("log_odds", "lavis")  # Blip2.retrieval_scores(rerank=...)


def rerank_score(itm_logits: torch.Tensor, sim: torch.Tensor, temp: float, rule: str = "log_odds") -> torch.Tensor:
    """A re-ranked retrieval score from ITM logits (..., 2) (no-match, match) and ITC cosine `sim` (...):
    "log_odds" = match - no-match logit + sim / temp, "lavis" = match logit + sim (retrieval_scores)."""
    if rule == "log_odds":
        return itm_logits[..., 1] - itm_logits[..., 0] + sim / temp
    return itm_logits[..., 1] + sim


@dataclass
class RetrievalScores:
    itc: torch.Tensor  # (Ni, Nt) cosine similarity, max over queries
    i2t: torch.Tensor  # (Ni, Nt) ITM + ITC (retrieval_scores' rerank) for each image's top-k texts, -inf elsewhere
    t2i: torch.Tensor  # (Nt, Ni) the same for each text's top-k images


class Blip2(VLModel):
    model_type = "blip2"
    config_class = Blip2Config
    processor_class = Blip2Processor
    stages = (1, 2)  # 1: ITC + ITM + ITG without an LM, 2: the LM loss through a frozen LM
    block_types = (QFormerLayer,)

    def __init__(self, config: Blip2Config, vision: nn.Module | None = None, lm: nn.Module | None = None):
        super().__init__()
        self.config = config
        qcfg = config.qformer
        if vision is not None and vision.hidden_size != qcfg.encoder_hidden_size:
            raise ValueError(
                f"vision backbone width {vision.hidden_size} != qformer.encoder_hidden_size {qcfg.encoder_hidden_size}"
            )
        self.vision = freeze(vision) if vision is not None else None
        # LAVIS' ln_vision: a trainable LayerNorm on the frozen encoder's output. On BLIP-2's (or
        # InstructBLIP's) own tower it is that tower's post_layernorm (transformers' layout): its eps.
        tower_cfg = getattr(getattr(vision, "model", None), "config", None)
        own_tower = getattr(tower_cfg, "model_type", "") in ("blip_2_vision_model", "instructblip_vision_model")
        eps = tower_cfg.layer_norm_eps if own_tower else 1e-5
        eps = eps if config.ln_vision_eps is None else config.ln_vision_eps
        self.ln_vision = nn.LayerNorm(qcfg.encoder_hidden_size, eps=eps)
        self.qformer = QFormer(qcfg)
        if qcfg.text_branch and qcfg.pretrain_heads:
            self.vision_proj = nn.Linear(qcfg.hidden_size, config.embed_dim)
            self.text_proj = nn.Linear(qcfg.hidden_size, config.embed_dim)
            self.itm_head = nn.Linear(qcfg.hidden_size, 2)
            self.temp = nn.Parameter(torch.tensor(config.init_temperature))
            for m in (self.vision_proj, self.text_proj, self.itm_head):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.lm = None
        if lm is not None:
            self.lm = freeze(lm)
            self.lm_proj = nn.Linear(qcfg.hidden_size, lm.get_input_embeddings().embedding_dim)
        self.log_parameter_counts()

    # ------------------------------------------------------------------ building, saving, loading
    @classmethod
    def from_config(
        cls, config: Blip2Config, root: str | Path | None = None, load_vision: bool = True, load_lm: bool = True
    ) -> Blip2:
        """Build from a config, loading the frozen backbones it names (paths relative to `root` first)."""
        config = copy.deepcopy(config)
        # From here on the config names where its parts really are, not where they sit in `root`.
        config.vision.name_or_path = backbones.resolve_path(config.vision.name_or_path, root)
        config.qformer_tokenizer = backbones.resolve_path(config.qformer_tokenizer, root)
        if config.lm is not None:
            config.lm.name_or_path = backbones.resolve_path(config.lm.name_or_path, root)
        vision = backbones.load_vision(config.vision) if load_vision else None
        if vision is not None:
            config.qformer.encoder_hidden_size = vision.hidden_size
        lm = backbones.load_lm(config.lm) if (config.lm is not None and load_lm) else None
        return cls(config, vision, lm)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        lm: str | LMConfig | None = None,
        drop_text_branch: bool = False,
        load_vision: bool = True,
        load_lm: bool = True,
        **kwargs,
    ) -> Blip2:
        """Load a vlbridge checkpoint, or one in a registered foreign layout (transformers' BLIP-2:
        config.json with model_type "blip-2", Blip2ForConditionalGeneration / Blip2ForImageTextRetrieval;
        transformers' InstructBLIP: model_type "instructblip"; a LAVIS .pth), from a directory, file or hub id.

        lm: attach this LM instead of the saved one (e.g. a stage-1 checkpoint going into stage 2);
            its projection starts fresh. drop_text_branch: remove what stage 2 does not use.
        kwargs: for a foreign format's loader (a LAVIS file: vision=..., qformer_tokenizer=..., ...).
        """
        return super().from_pretrained(
            name_or_path, lm=lm, drop_text_branch=drop_text_branch, load_vision=load_vision, load_lm=load_lm, **kwargs
        )

    @classmethod
    def load_vlbridge(
        cls,
        root: Path,
        lm: str | LMConfig | None = None,
        drop_text_branch: bool = False,
        load_vision: bool = True,
        load_lm: bool = True,
    ) -> Blip2:
        config = cls.read_config(root)
        new_lm = lm is not None
        if new_lm:
            config.lm = copy.deepcopy(lm) if isinstance(lm, LMConfig) else LMConfig(name_or_path=str(lm))
        model = cls.from_config(config, root=root, load_vision=load_vision, load_lm=load_lm)
        state = read_weights(root / "model.safetensors")
        # a new LM gets a fresh projection, whatever the width of the saved one
        model.load_bridge_state(state, root, skip=("lm_proj.",) if new_lm or not load_lm else ())
        if drop_text_branch:
            model.drop_text_branch()
        return model

    def _write_backbones(self, path: Path, include_backbones: bool, processor) -> Blip2Config:
        config = copy.deepcopy(self.config)
        if processor is not None and processor.qformer_tokenizer is not None:
            config.qformer_tokenizer = "qformer_tokenizer"
        if include_backbones and self.vision is not None:
            self.vision.save_pretrained(path / "vision")
            config.vision.name_or_path, config.vision.feature_layer = "vision", -1  # saved already cut
        if include_backbones and self.lm is not None:
            self.lm.save_pretrained(path / "lm")
            config.lm.name_or_path = "lm"
        return config

    def drop_text_branch(self):
        """Stage 2 needs neither the Q-Former's text side nor the ITC/ITM/ITG heads; with
        config.qformer_question it keeps the text side (it reads the question) and drops the heads."""
        keep = self.config.qformer_question
        if keep and not self.config.qformer.text_branch:
            raise ValueError(
                "qformer_question needs the Q-Former's text side, and this model's was dropped: "
                "start stage 2 from a stage-1 checkpoint"
            )
        self.qformer.drop_text_branch(keep_text_input=keep)
        if not keep:
            self.config.qformer_tokenizer = ""  # nothing left that reads text
        for name in ("vision_proj", "text_proj", "itm_head", "temp"):
            if hasattr(self, name):
                delattr(self, name)
        self.log_parameter_counts()

    # ------------------------------------------------------------------ what it can do, what trains
    @property
    def tasks(self) -> frozenset[str]:
        return frozenset(
            ({"caption", "vqa"} if self.lm is not None else set())
            | ({"retrieval"} if self.has_pretrain_heads else set())
        )

    def frozen_backbones(self) -> list[nn.Module]:
        return [m for m in (self.vision, self.lm) if m is not None]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.qformer.set_grad_checkpointing(enable)

    # ------------------------------------------------------------------ shared pieces
    def image_embeds(self, pixel_values=None, image_features=None) -> torch.Tensor:
        """ln_vision(frozen encoder features), (B, N, Dv). `image_features` (the frozen encoder's raw
        output, e.g. from a cache) skips the encoder."""
        if image_features is None:
            if pixel_values is None:
                raise ValueError("give pixel_values or image_features")
            if self.vision is None:
                raise ValueError("this model was loaded without its vision backbone: pass image_features")
            with torch.no_grad():
                image_features = self.vision(pixel_values)
        return self.ln_vision(image_features.to(self.ln_vision.weight.dtype))

    @property
    def itc_temperature(self) -> torch.Tensor:
        """The ITC temperature as the loss uses it (ITC logit = cosine / temperature): the learned one
        clamped to [0.001, 0.5], or as it is with config.itc_temperature_clamp off (LAVIS' BLIP-2)."""
        return self.temp.clamp(0.001, 0.5) if self.config.itc_temperature_clamp else self.temp

    @property
    def has_pretrain_heads(self) -> bool:
        """Whether ITC / ITM / ITG can run (a stage-1 model; stage 2 drops what they need)."""
        return self.config.qformer.text_branch and self.config.qformer.pretrain_heads

    def require_text_branch(self):
        if not self.has_pretrain_heads:
            raise ValueError(
                "this model's Q-Former text branch or stage-1 heads were dropped (stage 2): ITC/ITM/ITG are unavailable"
            )

    def query_output(self, img: torch.Tensor, qformer_input_ids=None, qformer_attention_mask=None) -> torch.Tensor:
        """The queries after the Q-Former (B, Q, d): from the image alone or, with config.qformer_question
        and question tokens (B, T), after sharing bidirectional self-attention with the question. A row
        whose qformer_attention_mask is all 0 (no question, e.g. a caption in a mixed batch) gets exactly
        its queries-alone output: no query sees a masked token."""
        if qformer_input_ids is None:
            return self.qformer(image_embeds=img)
        if not self.config.qformer_question:
            raise ValueError(
                "this model's Q-Former does not read the question (config.qformer_question is off): "
                "pass no qformer_input_ids"
            )
        # One pass for the whole batch: rows without a question (all-0 mask) then compute padding text
        # positions that no query sees; one pass costs less than two passes over the split batch.
        h = self.qformer(qformer_input_ids, qformer_attention_mask, image_embeds=img, mask_kind="bidirectional")
        return h[:, : self.config.qformer.num_query_tokens]

    def query_features(self, img: torch.Tensor, use_cache: bool = False):
        """Query outputs (B, Q, d), their normalised projections (B, Q, E), and optionally the K/V cache."""
        out = self.qformer(image_embeds=img, use_cache=use_cache)
        query, cache = out if use_cache else (out, None)
        return query, F.normalize(self.vision_proj(query), dim=-1), cache

    def text_features(self, input_ids, attention_mask):
        text = self.qformer(input_ids, attention_mask)
        return text, F.normalize(self.text_proj(text[:, 0]), dim=-1)

    def itm_logits(self, img, input_ids, attention_mask, image_index=None) -> torch.Tensor:
        """(B, 2): the ITM head on each query after the bidirectional pass, averaged over queries.
        image_index (B,): pair b shows img[image_index[b]]; the pairs repeat images (hard negatives,
        re-ranking), so the Q-Former projects each distinct image to keys/values once."""
        if image_index is not None:
            used, image_index = image_index.unique(return_inverse=True)
            img = img[used]
        h = self.qformer(
            input_ids, attention_mask, image_embeds=img, mask_kind="bidirectional", image_index=image_index
        )
        return self.itm_head(h[:, : self.config.qformer.num_query_tokens]).mean(dim=1)

    # ------------------------------------------------------------------ stage 1
    def pretrain_losses(
        self,
        qformer_input_ids,
        qformer_attention_mask,
        pixel_values=None,
        image_features=None,
        image_ids=None,
        generator: torch.Generator | None = None,
        itg: bool = True,
    ) -> Blip2PretrainOutput:
        """Stage 1: ITC + ITM + ITG on the Q-Former (blip2_pretrain.pretrain_losses, which documents the
        arguments). qformer_input_ids/qformer_attention_mask: Q-Former tokens (B, T) starting with [CLS]."""
        return blip2_pretrain.pretrain_losses(
            self, qformer_input_ids, qformer_attention_mask, pixel_values, image_features, image_ids, generator, itg
        )

    def training_loss(self, batch, generator=None, loss_weights=None):
        """Stage 1 (no LM): itc * ITC + itm * ITM + itg * ITG (loss_weights, each 1 by default; ITG is not
        computed at weight 0), each part logged. Stage 2: the LM loss on the targets."""
        if self.lm is not None:
            if loss_weights:
                raise ValueError("loss_weights weigh BLIP-2's stage-1 losses (ITC, ITM, ITG); this model has an LM")
            return self(**batch).loss, {}
        w = {"itc": 1.0, "itm": 1.0, "itg": 1.0}
        if set(loss_weights or ()) - set(w):
            raise ValueError(f"loss_weights {sorted(loss_weights)}: BLIP-2's stage-1 losses are {sorted(w)}")
        w.update(loss_weights or {})
        out = self.pretrain_losses(
            batch["qformer_input_ids"],
            batch["qformer_attention_mask"],
            batch.get("pixel_values"),
            batch.get("image_features"),
            batch["image_ids"],
            generator,
            itg=w["itg"] > 0,
        )
        loss = w["itc"] * out.loss_itc + w["itm"] * out.loss_itm + w["itg"] * out.loss_itg
        return loss, {"loss_itc": out.loss_itc.item(), "loss_itm": out.loss_itm.item(), "loss_itg": out.loss_itg.item()}

    # ------------------------------------------------------------------ stage 2
    def _require_lm(self):
        if self.lm is None:
            raise ValueError("this model has no LM (stage 1); load one with Blip2.from_pretrained(path, lm=...)")

    def lm_inputs(
        self,
        pixel_values=None,
        input_ids=None,
        attention_mask=None,
        labels=None,
        image_features=None,
        qformer_input_ids=None,
        qformer_attention_mask=None,
    ):
        """The LM's inputs_embeds (B, Q+T, H), attention_mask and labels with the visual prompt in
        place, and the query outputs (B, Q, d). Encoder-decoder labels are the decoder's targets, not
        aligned with the encoder inputs: they come back unchanged. qformer_input_ids / _attention_mask:
        the questions in Q-Former tokens (config.qformer_question), see query_output."""
        self._require_lm()
        if self.config.lm.is_encoder_decoder and labels is not None:
            inputs_embeds, mask, _, query = self.lm_inputs(
                pixel_values, input_ids, attention_mask, None, image_features, qformer_input_ids, qformer_attention_mask
            )
            return inputs_embeds, mask, labels, query
        query = self.query_output(
            self.image_embeds(pixel_values, image_features), qformer_input_ids, qformer_attention_mask
        )  # (B, Q, d)
        emb = self.lm.get_input_embeddings()
        prompt = self.lm_proj(query).to(emb.weight.dtype)  # (B, Q, H)
        B, Q = prompt.shape[:2]
        if input_ids is None and self.config.image_token_id is not None:
            # transformers' default prompt in this layout: the image tokens, then the LM's bos if it has one
            bos = self.lm.config.bos_token_id
            input_ids = torch.tensor(
                [[self.config.image_token_id] * Q + ([bos] if bos is not None else [])], device=prompt.device
            ).expand(B, -1)
        if input_ids is None:
            input_ids = torch.empty(B, 0, dtype=torch.long, device=prompt.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text = emb(input_ids)
        if self.config.image_token_id is not None:  # transformers' layout: Q image tokens in the prompt
            slots = input_ids == self.config.image_token_id
            if (slots.sum(1) != Q).any():
                raise ValueError(
                    f"every prompt must hold exactly {Q} image tokens (id {self.config.image_token_id}); "
                    f"found {slots.sum(1).tolist()} - the processor inserts them"
                )
            text = text.masked_scatter(slots[..., None].expand_as(text), prompt)
            labels = None if labels is None else labels.masked_fill(slots, -100)
            return text, attention_mask, labels, query
        mask = torch.cat([attention_mask.new_ones(B, Q), attention_mask], dim=1)
        if labels is not None:
            labels = torch.cat([labels.new_full((B, Q), -100), labels], dim=1)
        return torch.cat([prompt, text], dim=1), mask, labels, query

    def forward(
        self,
        pixel_values=None,
        input_ids=None,
        attention_mask=None,
        labels=None,
        image_features=None,
        decoder_input_ids=None,
        decoder_attention_mask=None,
        qformer_input_ids=None,
        qformer_attention_mask=None,
    ) -> Blip2Output:
        """Stage-2 forward. Decoder-only: input_ids = prompt + target, labels -100 on the prompt.
        Encoder-decoder: input_ids = prompt (prefix) for the encoder, labels = target for the decoder.
        qformer_input_ids / qformer_attention_mask: the questions, for a model with config.qformer_question.

        Called with keywords, it takes transformers' Blip2ForConditionalGeneration inputs (pixel_values,
        input_ids with the image tokens, attention_mask, decoder_input_ids) and gives its logits."""
        inputs_embeds, mask, labels, query = self.lm_inputs(
            pixel_values, input_ids, attention_mask, labels, image_features, qformer_input_ids, qformer_attention_mask
        )
        if self.config.lm.is_encoder_decoder:
            if decoder_input_ids is None:
                if labels is None:
                    raise ValueError("an encoder-decoder LM needs labels or decoder_input_ids")
                decoder_input_ids = self.lm.prepare_decoder_input_ids_from_labels(labels=labels)
            out = self.lm(
                inputs_embeds=inputs_embeds,
                attention_mask=mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
            )
            loss = None if labels is None else lm_loss(out.logits, labels)
        else:
            out = self.lm(inputs_embeds=inputs_embeds, attention_mask=mask, **position_kwargs(self.lm, mask))
            loss = None if labels is None else next_token_loss(out.logits, labels)
        return Blip2Output(loss, out.logits, query)

    @torch.no_grad()
    def generate(
        self,
        pixel_values=None,
        input_ids=None,
        attention_mask=None,
        image_features=None,
        qformer_input_ids=None,
        qformer_attention_mask=None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Generate with the frozen LM; takes transformers' keywords (max_new_tokens, num_beams,
        length_penalty, min_new_tokens, do_sample, temperature, top_p, repetition_penalty, ...).
        A decoder-only LM's generate continues from a cache of the prompt filled once per image
        (core/generation.py): transformers' ids, without running the prompt once per beam.

        Returns only the new token ids (B, L). Batched decoder-only prompts must be left-padded
        (the processor does that). transformers' Blip2ForConditionalGeneration.generate returns the
        prompt ids + the same new ids (decoder-only LMs) or the decoder start token + them (T5); its
        logits processors (repetition_penalty, no_repeat_ngram_size) also see the prompt, ours only
        the new tokens. qformer_input_ids / qformer_attention_mask: the questions, for a model with
        config.qformer_question (the processor's qformer_text=).
        """
        inputs_embeds, mask, _, _ = self.lm_inputs(
            pixel_values, input_ids, attention_mask, None, image_features, qformer_input_ids, qformer_attention_mask
        )
        if "max_new_tokens" not in generate_kwargs and "max_length" not in generate_kwargs:
            generate_kwargs["max_new_tokens"] = 30
        self.check_context(inputs_embeds.shape[1], generate_kwargs)
        out = generate_from_embeds(self.lm, inputs_embeds, mask, **generate_kwargs)
        if self.config.lm.is_encoder_decoder:
            out = out[:, 1:]  # drop the decoder start token
        return out

    # ------------------------------------------------------------------ retrieval and features
    @torch.no_grad()
    def itc(self, qformer_input_ids, qformer_attention_mask, pixel_values=None, image_features=None) -> torch.Tensor:
        """(B_img, B_txt) cosine similarity: max over queries of cos(query, text [CLS])."""
        self.require_text_branch()
        _, image_feats, _ = self.query_features(self.image_embeds(pixel_values, image_features))
        _, text_feat = self.text_features(qformer_input_ids, qformer_attention_mask)
        return torch.einsum("bqe,te->btq", image_feats, text_feat).amax(-1)

    @torch.no_grad()
    def itm(self, qformer_input_ids, qformer_attention_mask, pixel_values=None, image_features=None) -> torch.Tensor:
        """(B, 2) ITM logits [no match, match] for paired images and texts."""
        self.require_text_branch()
        return self.itm_logits(
            self.image_embeds(pixel_values, image_features), qformer_input_ids, qformer_attention_mask
        )

    @torch.no_grad()
    def retrieval_scores(
        self,
        qformer_input_ids,
        qformer_attention_mask,
        pixel_values=None,
        image_features=None,
        k: int = 128,
        batch_size: int = 64,
        rerank: str = "log_odds",
    ) -> RetrievalScores:
        """Rank all images against all texts: ITC for every pair, then the top k of each row re-ranked
        with ITM. rerank picks the re-ranked score:
            "log_odds": ITM log-odds (match - no-match logit) + ITC similarity / the learned temperature.
                        The ITC logit is the log of ITC's softmax over candidates up to a constant, so the
                        sum is the log posterior odds with ITC as the prior and ITM as the likelihood ratio.
            "lavis":    ITM match logit + ITC cosine similarity, as BLIP-2's evaluation code (LAVIS)
                        adds them; the cosine spans ~0.1 across a row's top k, the logit several units,
                        so ITM alone decides (scripts/itm_rerank.py compares the two rules)."""
        self.require_text_branch()
        if rerank not in RERANK_RULES:
            raise ValueError(f"rerank {rerank!r}: expected one of {RERANK_RULES}")
        source = pixel_values if image_features is None else image_features
        img = torch.cat(
            [
                self.image_embeds(**{("pixel_values" if image_features is None else "image_features"): x})
                for x in source.split(batch_size)
            ]
        )  # (Ni, N, Dv)
        image_feats = torch.cat([self.query_features(x)[1] for x in img.split(batch_size)])  # (Ni, Q, E)
        text_feat = torch.cat(
            [
                self.text_features(i, m)[1]
                for i, m in zip(qformer_input_ids.split(batch_size), qformer_attention_mask.split(batch_size))
            ]
        )  # (Nt, E)
        itc = torch.einsum("bqe,te->btq", image_feats, text_feat).amax(-1)  # (Ni, Nt)
        temp = self.itc_temperature.item()

        def rerank_rows(sim, rows_are_images: bool):
            """-inf except at each row's top k, re-ranked; the (row, column) pairs of all rows go through
            ITM batch_size at a time (a call per row would be dominated by the calls' overhead)."""
            top_sim, top = sim.topk(min(k, sim.shape[1]), dim=1)  # (R, k)
            rows = torch.arange(sim.shape[0], device=sim.device)[:, None].expand_as(top).reshape(-1)
            cols = top.reshape(-1)
            image, text = (rows, cols) if rows_are_images else (cols, rows)
            logits = torch.cat(
                [
                    self.itm_logits(img, qformer_input_ids[t], qformer_attention_mask[t], i).float()
                    for i, t in zip(image.split(batch_size), text.split(batch_size))
                ]
            )  # (R * k, 2)
            scores = torch.full_like(sim, float("-inf"))
            return scores.scatter_(1, top, rerank_score(logits.view(*top.shape, 2), top_sim, temp, rerank))

        i2t = rerank_rows(itc, rows_are_images=True)
        t2i = rerank_rows(itc.t(), rows_are_images=False)
        return RetrievalScores(itc, i2t, t2i)

    @torch.no_grad()
    def extract_features(
        self, qformer_input_ids=None, qformer_attention_mask=None, pixel_values=None, image_features=None
    ) -> Blip2Features:
        """Image, text and multimodal embeddings from one call; each part needs its inputs."""
        feats = Blip2Features()
        img = None
        if pixel_values is not None or image_features is not None:
            img = self.image_embeds(pixel_values, image_features)
            feats.image_embeds = self.qformer(image_embeds=img)
            if self.has_pretrain_heads:
                feats.image_embeds_proj = F.normalize(self.vision_proj(feats.image_embeds), dim=-1)
        if qformer_input_ids is not None:
            self.require_text_branch()
            mask = torch.ones_like(qformer_input_ids) if qformer_attention_mask is None else qformer_attention_mask
            feats.text_embeds, feats.text_embeds_proj = self.text_features(qformer_input_ids, mask)
            if img is not None:
                h = self.qformer(qformer_input_ids, mask, image_embeds=img, mask_kind="bidirectional")
                feats.multimodal_embeds = h[:, : self.config.qformer.num_query_tokens]
        return feats


def create_blip2(config: Blip2Config, root: str | Path | None = None):
    """A new BLIP-2 (fresh Q-Former) on the backbones `config` names, and its processor.

    The Q-Former's vocabulary and special ids are taken from `config.qformer_tokenizer` ([DEC] is
    added when the tokenizer lacks a bos token).
    """
    from transformers import AutoTokenizer

    config = copy.deepcopy(config)
    if not config.qformer_tokenizer:
        raise ValueError("Blip2Config.qformer_tokenizer is empty: name a BERT tokenizer (e.g. bert-base-uncased)")
    qtok = AutoTokenizer.from_pretrained(backbones.resolve_path(config.qformer_tokenizer, root))
    config.qformer = qformer_config_for(qtok, config.qformer)
    model = Blip2.from_config(config, root)
    processor = Blip2Processor.from_config(model.config, root, qformer_tokenizer=qtok)  # qtok: with [DEC]
    return model, processor
