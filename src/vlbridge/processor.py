"""Processors: images + text -> model inputs, one class per model (Blip2Processor, FlamingoProcessor,
EVEProcessor).

BLIP-2: images are normalised with the vision backbone's own image processor (its size, mean and std).
Text goes through two tokenizers: the Q-Former's (BERT + [DEC], stage 1 and retrieval) and the LM's
(prompts and targets, stage 2 and generation). Decoder-only LM inputs are left-padded so that a
batch can be generated from directly.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .backbones import local_dir, resolve_path
from .config import Blip2Config, EVEConfig, FlamingoConfig, load_json
from .images import load_image

log = logging.getLogger(__name__)


class Blip2Processor:
    def __init__(self, image_processor, qformer_tokenizer=None, tokenizer=None, *, num_query_tokens: int = 32,
                 is_encoder_decoder: bool = False, image_token: str | None = None, max_text_length: int = 32):
        self.image_processor = image_processor
        self.qformer_tokenizer = qformer_tokenizer
        self.tokenizer = tokenizer
        self.num_query_tokens = num_query_tokens
        self.is_encoder_decoder = is_encoder_decoder
        self.image_token = image_token  # transformers' layout: Q copies go at the start of each prompt
        self.max_text_length = max_text_length
        self.num_truncated = 0  # texts cut to max_text_length when asked to truncate (reported, never silent)
        if tokenizer is not None:
            tokenizer.padding_side = "right" if is_encoder_decoder else "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token

    # ------------------------------------------------------------------ building and saving
    @classmethod
    def from_config(cls, config: Blip2Config, root: str | Path | None = None,
                    qformer_tokenizer=None) -> "Blip2Processor":
        from transformers import AutoImageProcessor, AutoTokenizer

        image_processor = AutoImageProcessor.from_pretrained(resolve_path(config.vision.name_or_path, root),
                                                             backend="pil")
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
        return cls(image_processor, qtok, tok, num_query_tokens=config.qformer.num_query_tokens,
                   is_encoder_decoder=bool(config.lm and config.lm.is_encoder_decoder),
                   image_token=image_token, max_text_length=config.max_text_length)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> "Blip2Processor":
        """Load the processor of a vlbridge checkpoint (files sit beside the model's), or of a
        directory in transformers' BLIP-2 layout (its image processor and tokenizer)."""
        from . import hf_blip2
        root = local_dir(name_or_path)
        if hf_blip2.is_transformers_checkpoint(root):
            return hf_blip2.load_transformers_processor(root, str(name_or_path))
        config = load_json(Blip2Config, root / "config.json")
        return cls.from_config(config, root)

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
            raise ValueError(f"text has {len(ids)} tokens, more than the limit {limit}: {text[:80]!r} "
                             f"(pass truncate=True to cut it; cut texts are counted in num_truncated)")
        self.num_truncated += 1
        return ids[:limit]

    def qformer_text(self, texts: list[str], truncate: bool = False) -> dict[str, torch.Tensor]:
        """Q-Former tokens ([CLS] text [SEP]), right-padded: input_ids / attention_mask (B, T)."""
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
        Q-Former (stage 1 / retrieval) -> qformer_input_ids / qformer_attention_mask.
        """
        out = {}
        if images is not None:
            out["pixel_values"] = self.images(images)
        if qformer_text is not None:
            q = self.qformer_text(qformer_text, truncate)
            out["qformer_input_ids"], out["qformer_attention_mask"] = q["input_ids"], q["attention_mask"]
        if text is not None or targets is not None:
            out.update(self.lm_text(text, targets))
        return out

    def lm_text(self, prompts=None, targets=None) -> dict[str, torch.Tensor]:
        if self.tokenizer is None:
            raise ValueError("this processor has no LM tokenizer (a stage-1 model)")
        tok = self.tokenizer
        n = len(targets) if prompts is None else (1 if isinstance(prompts, str) else len(prompts))
        prompts = [prompts] * n if isinstance(prompts, str) else list(prompts or [""] * n)
        if targets is not None and len(targets) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        prompt_ids = [tok(p).input_ids if p or self.is_encoder_decoder else _bos(tok) for p in prompts]
        if targets is None:
            return self._with_image_tokens(pad(prompt_ids, tok.pad_token_id, tok.padding_side))
        if tok.eos_token_id is None:
            raise ValueError("the LM tokenizer has no eos token: targets could never end")
        if self.is_encoder_decoder:  # prefix LM: prompt to the encoder, target to the decoder
            out = self._with_image_tokens(pad(prompt_ids, tok.pad_token_id, "right"))
            # T5's tokenizer appends </s> itself, others don't: a target must end in eos for generation to stop.
            target_ids = [ids if ids[-1:] == [tok.eos_token_id] else ids + [tok.eos_token_id]
                          for ids in (tok(t).input_ids for t in targets)]
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

    def batch_decode(self, ids: torch.Tensor) -> list[str]:
        return [s.strip() for s in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def _bos(tok) -> list[int]:
    return [tok.bos_token_id] if tok.bos_token_id is not None else []


def pad(seqs: list[list[int]], value: int, side: str) -> dict[str, torch.Tensor]:
    """Pad token lists to one length: input_ids and attention_mask (B, T)."""
    T = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), T), value, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask}


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


class FlamingoProcessor:
    """Images through the vision backbone's image processor; interleaved text through the LM's
    tokenizer with <image> and <|endofchunk|> added. Prompts are left-padded (generation-ready)."""

    def __init__(self, image_processor, tokenizer, image_token: str = "<image>", eoc_token: str = "<|endofchunk|>"):
        self.image_processor, self.tokenizer = image_processor, tokenizer
        tokenizer.add_tokens([image_token, eoc_token], special_tokens=True)  # no-op when already there
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.image_token, self.eoc_token = image_token, eoc_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.eoc_token_id = tokenizer.convert_tokens_to_ids(eoc_token)

    @classmethod
    def from_config(cls, config: FlamingoConfig, root: str | Path | None = None) -> "FlamingoProcessor":
        from transformers import AutoImageProcessor, AutoTokenizer

        image_processor = AutoImageProcessor.from_pretrained(resolve_path(config.vision.name_or_path, root),
                                                             backend="pil")
        tok = AutoTokenizer.from_pretrained(resolve_path(config.lm.name_or_path, root))
        proc = cls(image_processor, tok, config.image_token, config.eoc_token)
        ids = (proc.image_token_id, proc.eoc_token_id)
        if config.image_token_id is not None and ids != (config.image_token_id, config.eoc_token_id):
            raise ValueError(f"tokenizer gives the special tokens ids {ids}, the config "
                             f"{(config.image_token_id, config.eoc_token_id)}")
        return proc

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> "FlamingoProcessor":
        root = local_dir(name_or_path)
        return cls.from_config(load_json(FlamingoConfig, root / "config.json"), root)

    def save_pretrained(self, path: str | Path):
        """Beside the backbones that Flamingo.save_pretrained(path) writes."""
        self.image_processor.save_pretrained(Path(path) / "vision")
        self.tokenizer.save_pretrained(Path(path) / "lm")

    def __call__(self, text, images=None, return_labels: bool = False) -> dict[str, torch.Tensor]:
        """text: interleaved strings, e.g. "<image>Output: a cat.<|endofchunk|><image>Output:".
        images: per text, the list of its images in <image> order (or one image per text).
        -> input_ids, attention_mask (B, T); pixel_values (B, N, 3, H, W) zero-padded to the most
        images in a row; image_mask (B, N); labels (B, T) with return_labels."""
        texts = [text] if isinstance(text, str) else list(text)
        out = pad([self.tokenizer(t).input_ids for t in texts], self.tokenizer.pad_token_id, "left")
        counts = (out["input_ids"] == self.image_token_id).sum(1).tolist()
        if images is not None:  # None: text only (the caller brings pixel_values or media)
            per_row = [list(x) if isinstance(x, (list, tuple)) else [x] for x in images]
            if [len(x) for x in per_row] != counts:
                raise ValueError(f"<image> tokens per text {counts} != images per text {[len(x) for x in per_row]}")
        if images is not None and max(counts) > 0:
            rgb = [load_image(im) for row in per_row for im in row]
            px = self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]  # (M, 3, H, W)
            out["image_mask"] = torch.arange(max(counts))[None] < torch.tensor(counts)[:, None]  # (B, N)
            out["pixel_values"] = px.new_zeros(len(texts), max(counts), *px.shape[1:])
            out["pixel_values"][out["image_mask"]] = px
        if return_labels:
            out["labels"] = self.labels(out["input_ids"], out["attention_mask"])
        return out

    def labels(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """OpenFlamingo's rule: learn the text of each chunk, from after its <image> up to and including
        its <|endofchunk|>. Padding, <image> tokens, text before the first image and text between an
        <|endofchunk|> and the next <image> are -100."""
        pos = torch.arange(input_ids.shape[1])
        last_image = torch.where(input_ids == self.image_token_id, pos, -1).cummax(-1).values
        last_eoc = torch.where(input_ids == self.eoc_token_id, pos, -1).cummax(-1).values
        eoc_before = F.pad(last_eoc[:, :-1], (1, 0), value=-1)  # latest <|endofchunk|> strictly before
        inside = last_image > eoc_before
        return input_ids.masked_fill(~inside | (input_ids == self.image_token_id) | (attention_mask == 0), -100)

    def batch_decode(self, ids: torch.Tensor) -> list[str]:
        return [s.strip() for s in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def image_stats(name_or_path: str) -> tuple[list[float], list[float]]:  # the teacher's normalisation
    from transformers import AutoImageProcessor

    p = AutoImageProcessor.from_pretrained(name_or_path, backend="pil")
    return [float(x) for x in p.image_mean], [float(x) for x in p.image_std]


class EVEProcessor:
    """Images + text -> pixel_values (B, 3, Hmax, Wmax), image_sizes (B, 2) (the top-left part each
    image covers) and left-padded input_ids / attention_mask (+ labels), each "<image>" expanded.
    An image is scaled down (never up) to a longer side <= max_image_size, aspect kept, and padded
    with the mean colour at the bottom/right to a multiple of the cell (2 * patch_size)."""

    def __init__(self, tokenizer, config: EVEConfig):
        self.config, self.tokenizer = config, tokenizer
        tokenizer.padding_side = "left"  # a left-padded batch generates like its rows one by one
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # the placeholder as a special token (never split, dropped in decoding). Its id may lie past
        # the LM's vocabulary: the model never embeds it, so the LM's tables stay as they are.
        if config.image_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [config.image_token]})
        self.image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
        if config.image_token_id not in (None, self.image_token_id):
            raise ValueError(f"the tokenizer gives {config.image_token!r} id {self.image_token_id}, the config "
                             f"{config.image_token_id}")
        self.mean = np.array(config.image_mean or [0.5] * 3, dtype=np.float32)
        self.std = np.array(config.image_std or [0.5] * 3, dtype=np.float32)

    @classmethod
    def from_config(cls, config: EVEConfig, root: str | Path | None = None) -> "EVEProcessor":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(resolve_path(config.lm.name_or_path, root)), config)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path) -> "EVEProcessor":
        root = local_dir(name_or_path)
        return cls.from_config(load_json(EVEConfig, root / "config.json"), root)

    def save_pretrained(self, path: str | Path):
        self.tokenizer.save_pretrained(Path(path) / "lm")  # beside the LM that EVE.save_pretrained writes

    def resize(self, image) -> Image.Image:
        image, cell = load_image(image), self.config.cell_size
        W, H = image.size
        s = min(1.0, self.config.max_image_size / max(W, H))
        w, h = max(1, round(W * s)), max(1, round(H * s))
        if (w, h) != (W, H):
            image = image.resize((w, h), Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", (math.ceil(w / cell) * cell, math.ceil(h / cell) * cell),
                           tuple(int(round(float(m) * 255)) for m in self.mean))
        canvas.paste(image, (0, 0))
        return canvas

    def images(self, images) -> dict[str, torch.Tensor]:
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        arrays = [(np.asarray(self.resize(im), dtype=np.float32) / 255 - self.mean) / self.std for im in images]
        sizes = torch.tensor([a.shape[:2] for a in arrays], dtype=torch.long)  # (B, 2): height, width
        pixel_values = torch.zeros(len(arrays), 3, *sizes.max(0).values.tolist())
        for i, a in enumerate(arrays):
            pixel_values[i, :, :a.shape[0], :a.shape[1]] = torch.from_numpy(a).permute(2, 0, 1)
        return {"pixel_values": pixel_values, "image_sizes": sizes}

    def prompt_ids(self, prompt: str, num_image_tokens: int | None) -> list[int]:
        """A prompt's ids with its one "<image>" expanded to num_image_tokens ids (None: no image). A
        prompt without the placeholder gets the image at its start, as in LLaVA and EVE."""
        token, img = self.config.image_token, self.image_token_id
        if num_image_tokens is not None and token not in prompt:
            prompt = f"{token} {prompt}" if prompt else token
        ids = self.tokenizer(prompt).input_ids
        if ids.count(img) != (num_image_tokens is not None):
            raise ValueError(f"prompt {prompt[:60]!r} holds {ids.count(img)} {token} for "
                             f"{int(num_image_tokens is not None)} image(s): EVE takes one image a sample")
        if num_image_tokens is not None:
            i = ids.index(img)
            ids[i:i + 1] = [img] * num_image_tokens
        return ids

    def __call__(self, images=None, text=None, targets=None) -> dict[str, torch.Tensor]:
        """images -> pixel_values, image_sizes; text: prompts (each may hold "<image>"); targets: what
        the LM must produce after each prompt (training) -> labels, -100 on prompt and image."""
        out = {} if images is None else self.images(images)
        grids = [] if images is None else (out["image_sizes"] // self.config.cell_size).tolist()
        counts = None if images is None else [self.config.num_image_tokens(h, w) for h, w in grids]
        n = len(counts or targets or ())
        prompts = [text] if isinstance(text, str) else [""] * n if text is None else list(text)
        for name, given in (("targets", targets), ("images", counts)):
            if given is not None and len(given) != len(prompts):
                raise ValueError(f"{len(given)} {name} for {len(prompts)} prompts")
        tok = self.tokenizer
        seqs = [self.prompt_ids(p, None if counts is None else counts[i]) for i, p in enumerate(prompts)]
        if targets is None:
            return {**out, **pad(seqs, tok.pad_token_id, "left")}
        labels = []
        for i, (p, t) in enumerate(zip(prompts, targets)):
            tid = tok((" " + t) if p else t, add_special_tokens=False).input_ids + [tok.eos_token_id]
            labels.append([-100] * len(seqs[i]) + tid)
            seqs[i] = seqs[i] + tid
        return {**out, **pad(seqs, tok.pad_token_id, "left"), "labels": pad(labels, -100, "left")["input_ids"]}

    def batch_decode(self, ids: torch.Tensor) -> list[str]:
        return [s.strip() for s in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
