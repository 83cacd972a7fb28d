"""BLIP-2's processor: images are normalised with the vision backbone's own image processor (its size,
mean and std). Text goes through two tokenizers: the Q-Former's (BERT + [DEC], stage 1, retrieval and the
questions the Q-Former reads) and the LM's (prompts and targets, stage 2 and generation). Decoder-only LM
inputs are left-padded so that a batch can be generated from directly. InstructBLIP (qformer_reads_prompt)
gives each LM prompt, the instruction, to the Q-Former as well.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from vlbridge.core.backbones import resolve_path
from vlbridge.core.base import read_model_config
from vlbridge.core.images import load_image
from vlbridge.core.processing import VLProcessor, bos_ids, pad, setup_tokenizer
from vlbridge.models.blip2.configuration import Blip2Config

log = logging.getLogger(__name__)


class Blip2Processor(VLProcessor):
    model_type = "blip2"

    def __init__(
        self,
        image_processor,
        qformer_tokenizer=None,
        tokenizer=None,
        *,
        num_query_tokens: int = 32,
        is_encoder_decoder: bool = False,
        image_token: str | None = None,
        max_text_length: int = 32,
        qformer_question: bool = False,
        qformer_reads_prompt: bool = False,
    ):
        self.image_processor = image_processor
        self.qformer_tokenizer = qformer_tokenizer
        self.tokenizer = tokenizer
        self.num_query_tokens = num_query_tokens
        self.is_encoder_decoder = is_encoder_decoder
        self.image_token = image_token  # transformers' layout: Q copies go at the start of each prompt
        self.max_text_length = max_text_length
        self.num_truncated = 0  # texts cut to max_text_length when asked to truncate (reported, never silent)
        self.qformer_question = qformer_question  # the model's Q-Former reads the questions too
        # InstructBLIP: the Q-Former reads the LM prompt itself (the instruction), not a separate question
        if qformer_reads_prompt and (qformer_tokenizer is None or not qformer_question):
            raise ValueError("qformer_reads_prompt needs a Q-Former tokenizer and a model with qformer_question")
        self.qformer_reads_prompt = qformer_reads_prompt
        if tokenizer is not None:
            setup_tokenizer(tokenizer, "right" if is_encoder_decoder else "left")

    # ------------------------------------------------------------------ building and saving
    @classmethod
    def from_config(cls, config: Blip2Config, root: str | Path | None = None, qformer_tokenizer=None) -> Blip2Processor:
        from transformers import AutoImageProcessor, AutoTokenizer

        image_processor = AutoImageProcessor.from_pretrained(
            resolve_path(config.vision.name_or_path, root), backend="pil"
        )
        qtok = qformer_tokenizer
        if qtok is None and config.qformer_tokenizer:
            qtok = AutoTokenizer.from_pretrained(resolve_path(config.qformer_tokenizer, root))
        if qtok is not None:
            if qtok.bos_token is None:  # a plain BERT tokenizer: add [DEC] as create_blip2 did
                qtok.add_special_tokens({"bos_token": "[DEC]"})
            check_qformer_tokenizer(qtok, config)
        tok = None
        if config.lm is not None:
            tok = AutoTokenizer.from_pretrained(resolve_path(config.lm.name_or_path, root))
        image_token = None
        if config.image_token_id is not None and tok is not None:
            image_token = tok.convert_ids_to_tokens(config.image_token_id)
        return cls(
            image_processor,
            qtok,
            tok,
            num_query_tokens=config.qformer.num_query_tokens,
            is_encoder_decoder=bool(config.lm and config.lm.is_encoder_decoder),
            image_token=image_token,
            max_text_length=config.max_text_length,
            qformer_question=config.qformer_question,
            qformer_reads_prompt=config.qformer_reads_prompt,
        )

    @classmethod
    def load_vlbridge(cls, root: Path) -> Blip2Processor:
        """The processor of a vlbridge checkpoint (its files sit beside the model's)."""
        return cls.from_config(read_model_config(Blip2Config, root / "config.json", cls.model_type), root)

    def save_pretrained(self, path: str | Path):
        """Write the processor files where `Blip2.save_pretrained(path)` puts the backbones."""
        path = Path(path)
        self.image_processor.save_pretrained(path / "vision")
        if self.qformer_tokenizer is not None:
            self.qformer_tokenizer.save_pretrained(path / "qformer_tokenizer")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(path / "lm")

    # ------------------------------------------------------------------ inputs
    def images(self, images) -> torch.Tensor:
        """pixel_values (B, 3, H, W) from PIL images, numpy arrays or paths."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        rgb = [load_image(im) for im in images]
        return self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]

    def _check_length(self, ids: list[int], limit: int, text: str, truncate: bool) -> list[int]:
        if len(ids) <= limit:
            return ids
        if not truncate:
            raise ValueError(
                f"text has {len(ids)} tokens, more than the limit {limit}: {text[:80]!r} "
                f"(pass truncate=True to cut it; cut texts are counted in num_truncated)"
            )
        self.num_truncated += 1
        if getattr(self.qformer_tokenizer, "truncation_side", "right") == "left":
            # InstructBLIP's Q-Former tokenizer (LAVIS, transformers) keeps an instruction's end: [CLS] + last tokens
            return ids[:1] + ids[len(ids) - limit + 1 :]
        return ids[:limit]

    def qformer_text(self, texts: list[str], truncate: bool = False) -> dict[str, torch.Tensor]:
        """Q-Former tokens ([CLS] text [SEP]), right-padded: input_ids / attention_mask (B, T). A text cut to
        max_text_length (truncate) loses its end, or its start when the tokenizer's truncation_side is left."""
        if self.qformer_tokenizer is None:
            raise ValueError("this processor has no Q-Former tokenizer")
        texts = [texts] if isinstance(texts, str) else list(texts)
        tok = self.qformer_tokenizer
        ids = [self._check_length(tok(t).input_ids, self.max_text_length, t, truncate) for t in texts]
        if truncate:  # keep the closing [SEP] on cut texts
            ids = [x if x[-1] == tok.sep_token_id else x[:-1] + [tok.sep_token_id] for x in ids]
        return pad(ids, tok.pad_token_id, "right")

    def __call__(self, images=None, text=None, targets=None, *, qformer_text=None, truncate: bool = False):
        """Model inputs as a dict of tensors.

        images: pixel_values. text: LM prompts (e.g. "Question: what color? Answer:"). targets: what
        the LM must produce after each prompt (training) -> labels. qformer_text: captions for the
        Q-Former (stage 1 / retrieval) -> qformer_input_ids / qformer_attention_mask; with
        qformer_reads_prompt (InstructBLIP) the prompts themselves when not given. images and text
        pair up one to one; retrieval pairs every image with every qformer_text.
        """
        count = lambda x: 1 if isinstance(x, str) or not isinstance(x, (list, tuple)) else len(x)
        if images is not None and text is not None and count(images) != count(text):
            raise ValueError(f"{count(images)} images for {count(text)} prompts: give one prompt per image")
        if qformer_text is not None and text is not None and count(qformer_text) != count(text):
            raise ValueError(f"{count(qformer_text)} Q-Former texts for {count(text)} prompts")
        if self.qformer_reads_prompt and qformer_text is None and text is not None:
            qformer_text = text  # InstructBLIP: the instruction goes to the Q-Former and to the LM
        out = {}
        if images is not None:
            out["pixel_values"] = self.images(images)
        if qformer_text is not None:
            q = self.qformer_text(qformer_text, truncate)
            out["qformer_input_ids"], out["qformer_attention_mask"] = q["input_ids"], q["attention_mask"]
        if text is not None or targets is not None:
            out.update(self.lm_text(text, targets))
        return out

    def prompt_inputs(self, images, prompts, questions=None, examples=None) -> dict[str, torch.Tensor]:
        """Generation inputs (VLProcessor.prompt_inputs); the questions go to the Q-Former as well when the
        model reads them (config.qformer_question), cut to max_text_length and counted in num_truncated.
        InstructBLIP's Q-Former (qformer_reads_prompt) reads the whole prompt instead, as LAVIS gives it."""
        self.no_examples(examples, "BLIP-2")
        if self.qformer_reads_prompt:
            return self(images=images, text=prompts, qformer_text=prompts, truncate=True)
        if questions is not None and self.qformer_question:
            return self(images=images, text=prompts, qformer_text=questions, truncate=True)
        return self(images=images, text=prompts)

    def lm_text(self, prompts=None, targets=None) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise ValueError("this processor has no LM tokenizer (a stage-1 model)")
        tok = self.tokenizer
        n = len(targets) if prompts is None else (1 if isinstance(prompts, str) else len(prompts))
        prompts = [prompts] * n if isinstance(prompts, str) else list(prompts or [""] * n)
        if targets is not None and len(targets) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        prompt_ids = [tok(p).input_ids if p or self.is_encoder_decoder else bos_ids(tok) for p in prompts]
        if targets is None:
            return self._with_image_tokens(pad(prompt_ids, tok.pad_token_id, tok.padding_side))
        if tok.eos_token_id is None:
            raise ValueError("the LM tokenizer has no eos token: targets could never end")
        if self.is_encoder_decoder:  # prefix LM: prompt to the encoder, target to the decoder
            out = self._with_image_tokens(pad(prompt_ids, tok.pad_token_id, "right"))
            # T5's tokenizer appends </s> itself, others don't: a target must end in eos for generation to stop.
            target_ids = [
                ids if ids[-1:] == [tok.eos_token_id] else ids + [tok.eos_token_id]
                for ids in (tok(t).input_ids for t in targets)
            ]
            out["labels"] = pad(target_ids, -100, "right")["input_ids"]
            return out
        # Decoder-only: one sequence prompt + target + eos; the loss only sees the target.
        seqs, labels = [], []
        for p, pid, t in zip(prompts, prompt_ids, targets):
            tid = tok((" " + t) if p else t, add_special_tokens=False).input_ids + [tok.eos_token_id]
            seqs.append(pid + tid)
            labels.append([-100] * len(pid) + tid)
        out = pad(seqs, tok.pad_token_id, tok.padding_side)
        out["labels"] = pad(labels, -100, tok.padding_side)["input_ids"]
        return self._with_image_tokens(out)

    def _with_image_tokens(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """transformers' layout: num_query_tokens image tokens open every row, before any padding
        (as its Blip2Processor puts them); the model writes the projected queries there."""
        if self.image_token is None:
            return batch
        B, Q = batch["input_ids"].shape[0], self.num_query_tokens
        image = torch.full((B, Q), self.tokenizer.convert_tokens_to_ids(self.image_token), dtype=torch.long)
        fill = {"input_ids": image, "attention_mask": torch.ones_like(image), "labels": torch.full_like(image, -100)}
        return {k: torch.cat([fill[k], v], dim=1) for k, v in batch.items()}


def check_qformer_tokenizer(tok, config: Blip2Config):
    """The Q-Former's embedding table and special ids must agree with its tokenizer."""
    q = config.qformer
    problems = []
    n = len(tok)
    if tok.get_vocab().get("<image>", -1) >= q.vocab_size:  # transformers' processor adds it; never embedded
        n -= 1
    if n > q.vocab_size:
        problems.append(f"tokenizer has {n} tokens but qformer.vocab_size is {q.vocab_size}")
    if tok.pad_token_id != q.pad_token_id:
        problems.append(f"pad id {tok.pad_token_id} != qformer.pad_token_id {q.pad_token_id}")
    if tok.bos_token_id != q.bos_token_id:
        problems.append(f"bos ([DEC]) id {tok.bos_token_id} != qformer.bos_token_id {q.bos_token_id}")
    if problems:
        raise ValueError("Q-Former tokenizer does not match the config: " + "; ".join(problems))


def qformer_config_for(tokenizer, qformer):
    """A copy of `qformer` (QFormerConfig) whose vocabulary and special ids come from `tokenizer`,
    adding the [DEC] bos token to it if it is missing."""
    if tokenizer.bos_token is None:
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    q = copy.deepcopy(qformer)
    q.vocab_size, q.pad_token_id, q.bos_token_id = len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id
    return q
