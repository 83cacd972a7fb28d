"""Flamingo's processor: interleaved text with <image> and <|endofchunk|>, images in <image> order."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from vlbridge.core.backbones import resolve_path
from vlbridge.core.base import read_model_config
from vlbridge.core.images import load_image
from vlbridge.core.processing import VLProcessor, pad, prompt_target, setup_tokenizer
from vlbridge.models.flamingo.configuration import FlamingoConfig


class FlamingoProcessor(VLProcessor):
    """Images through the vision backbone's image processor; interleaved text through the LM's
    tokenizer with <image> and <|endofchunk|> added. Prompts are left-padded (generation-ready)."""

    model_type = "flamingo"

    def __init__(self, image_processor, tokenizer, image_token: str = "<image>", eoc_token: str = "<|endofchunk|>"):
        self.image_processor, self.tokenizer = image_processor, tokenizer
        tokenizer.add_tokens([image_token, eoc_token], special_tokens=True)  # no-op when already there
        setup_tokenizer(tokenizer, "left")
        self.image_token, self.eoc_token = image_token, eoc_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.eoc_token_id = tokenizer.convert_tokens_to_ids(eoc_token)

    @classmethod
    def from_config(cls, config: FlamingoConfig, root: str | Path | None = None) -> FlamingoProcessor:
        from transformers import AutoImageProcessor, AutoTokenizer

        image_processor = AutoImageProcessor.from_pretrained(
            resolve_path(config.vision.name_or_path, root), backend="pil"
        )
        tok = AutoTokenizer.from_pretrained(resolve_path(config.lm.name_or_path, root))
        proc = cls(image_processor, tok, config.image_token, config.eoc_token)
        ids = (proc.image_token_id, proc.eoc_token_id)
        if config.image_token_id is not None and ids != (config.image_token_id, config.eoc_token_id):
            raise ValueError(
                f"tokenizer gives the special tokens ids {ids}, the config "
                f"{(config.image_token_id, config.eoc_token_id)}"
            )
        return proc

    @classmethod
    def load_vlbridge(cls, root: Path) -> FlamingoProcessor:
        return cls.from_config(read_model_config(FlamingoConfig, root / "config.json", cls.model_type), root)

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

    def prompt_inputs(self, images, prompts, questions=None, examples=None) -> dict[str, torch.Tensor]:
        """Generation inputs (VLProcessor.prompt_inputs): each sample's images (one, or a list for a
        prompt with several <image>) behind the in-context examples (interleave)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts: give one prompt per image")
        texts, rows = zip(*(self.interleave(im, p, examples) for im, p in zip(images, prompts, strict=True)))
        return self(list(texts), list(rows))

    def interleave(self, images, prompt: str, examples=None) -> tuple[str, list]:
        """One sample's text behind its in-context examples, and all its images in <image> order.
        Each example (image or list of images, prompt, target) is "{prompt} {target}<|endofchunk|>"
        (just "{prompt}<|endofchunk|>" for an empty target, e.g. an unanswered chat turn); a prompt
        without <image> gets its images at its start, one with <image> keeps them where they are."""

        def place(own, text: str) -> tuple[list, str]:
            own = list(own) if isinstance(own, (list, tuple)) else [own]
            return own, text if self.image_token in text else self.image_token * len(own) + text

        text, rows = "", []
        for shot_images, shot_prompt, target in examples or ():
            own, shot_prompt = place(shot_images, shot_prompt)
            text += (prompt_target(shot_prompt, target) if target else shot_prompt) + self.eoc_token
            rows += own
        own, prompt = place(images, prompt)
        return text + prompt, rows + own

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
