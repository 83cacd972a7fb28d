"""LLaVA's processor: one image per sample, its one "<image>" expanded into num_image_tokens ids."""

from __future__ import annotations

from pathlib import Path

import torch

from vlbridge.core.backbones import resolve_path
from vlbridge.core.base import read_model_config
from vlbridge.core.images import load_image
from vlbridge.core.processing import VLProcessor, add_image_token, pad, setup_tokenizer
from vlbridge.models.llava.configuration import LlavaConfig


class LlavaProcessor(VLProcessor):
    """Images through the vision tower's image processor -> pixel_values (B, 3, H, W); prompts through
    the LM's tokenizer with "<image>" added (a special token) -> left-padded input_ids / attention_mask
    (+ labels with targets), each prompt's "<image>" expanded into config.num_image_tokens ids, where the
    model writes the projected visual tokens (as transformers' LlavaProcessor does)."""

    model_type = "llava"

    def __init__(self, image_processor, tokenizer, config: LlavaConfig):
        self.image_processor, self.tokenizer, self.config = image_processor, tokenizer, config
        setup_tokenizer(tokenizer, "left")  # a left-padded batch generates like its rows one by one
        self.image_token_id = add_image_token(tokenizer, config.image_token, config.image_token_id)

    @classmethod
    def from_config(cls, config: LlavaConfig, root: str | Path | None = None) -> LlavaProcessor:
        from transformers import AutoImageProcessor, AutoTokenizer

        image_processor = AutoImageProcessor.from_pretrained(
            resolve_path(config.vision.name_or_path, root), backend="pil"
        )
        return cls(image_processor, AutoTokenizer.from_pretrained(resolve_path(config.lm.name_or_path, root)), config)

    @classmethod
    def load_vlbridge(cls, root: Path) -> LlavaProcessor:
        return cls.from_config(read_model_config(LlavaConfig, root / "config.json", cls.model_type), root)

    def save_pretrained(self, path: str | Path):
        """Beside the backbones that Llava.save_pretrained(path) writes."""
        self.image_processor.save_pretrained(Path(path) / "vision")
        self.tokenizer.save_pretrained(Path(path) / "lm")

    # ------------------------------------------------------------------ inputs
    def images(self, images) -> torch.Tensor:
        """pixel_values (B, 3, H, W) from PIL images, numpy arrays or paths."""
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        return self.image_processor(images=[load_image(im) for im in images], return_tensors="pt")["pixel_values"]

    def prompt_ids(self, prompt: str, image: bool = True) -> list[int]:
        """A prompt's ids with its one "<image>" expanded into num_image_tokens ids (image=False: a text
        without one). A prompt without the placeholder gets the image at its start, as in LLaVA."""
        token, N = self.config.image_token, self.config.num_image_tokens
        if image and N < 1:
            raise ValueError("config.num_image_tokens is unset: build the processor with create_llava")
        if image and token not in prompt:
            prompt = f"{token} {prompt}" if prompt else token
        ids = self.tokenizer(prompt).input_ids
        if ids.count(self.image_token_id) != image:
            raise ValueError(
                f"prompt {prompt[:60]!r} holds {ids.count(self.image_token_id)} {token} for {int(image)} "
                "image(s): LLaVA takes one image a sample"
            )
        if image:
            i = ids.index(self.image_token_id)
            ids[i : i + 1] = [self.image_token_id] * N
        return ids

    def lm_text(self, prompts, targets=None, image: bool = True) -> dict[str, torch.Tensor]:
        """The text side: input_ids / attention_mask (B, T), left-padded, and with targets the labels:
        prompt + " " + target + eos in one sequence, -100 on the prompt (image tokens included) and padding."""
        tok = self.tokenizer
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seqs = [self.prompt_ids(p, image) for p in prompts]
        if targets is None:
            return pad(seqs, tok.pad_token_id, "left")
        if len(targets) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
        if tok.eos_token_id is None:
            raise ValueError("the LM tokenizer has no eos token: targets could never end")
        labels = []
        for i, (p, t) in enumerate(zip(prompts, targets)):
            tid = tok((" " + t) if p else t, add_special_tokens=False).input_ids + [tok.eos_token_id]
            labels.append([-100] * len(seqs[i]) + tid)
            seqs[i] = seqs[i] + tid
        return {**pad(seqs, tok.pad_token_id, "left"), "labels": pad(labels, -100, "left")["input_ids"]}

    def __call__(self, images=None, text=None, targets=None) -> dict[str, torch.Tensor]:
        """images -> pixel_values; text: one prompt per image (each may hold "<image>" where the image goes,
        else it opens the prompt); targets: what the LM must produce after each prompt (training) ->
        labels. Without images: text only, no image tokens."""
        out = {} if images is None else {"pixel_values": self.images(images)}
        n = len(out["pixel_values"]) if images is not None else len(targets or ())
        prompts = [text] if isinstance(text, str) else [""] * n if text is None else list(text)
        if images is not None and len(prompts) != n:
            raise ValueError(f"{n} images for {len(prompts)} prompts: give one prompt per image")
        return {**out, **self.lm_text(prompts, targets, image=images is not None)}

    def prompt_inputs(self, images, prompts, questions=None, examples=None) -> dict[str, torch.Tensor]:
        """Generation inputs (VLProcessor.prompt_inputs)."""
        self.no_examples(examples, "LLaVA")
        return self(images=images, text=prompts)
