"""EVE's processor: any-aspect images padded to whole cells, each <image> expanded to its token count."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlbridge.core.backbones import resolve_path
from vlbridge.core.base import read_model_config
from vlbridge.core.images import load_image
from vlbridge.core.processing import VLProcessor, add_image_token, pad, setup_tokenizer
from vlbridge.models.eve.configuration import EVEConfig


def image_stats(name_or_path: str) -> tuple[list[float], list[float]]:  # the teacher's normalisation
    from transformers import AutoImageProcessor

    p = AutoImageProcessor.from_pretrained(name_or_path, backend="pil")
    return [float(x) for x in p.image_mean], [float(x) for x in p.image_std]


class EVEProcessor(VLProcessor):
    """Images + text -> pixel_values (B, 3, Hmax, Wmax), image_sizes (B, 2) (the top-left part each
    image covers) and left-padded input_ids / attention_mask (+ labels), each "<image>" expanded.
    An image is scaled down (never up) to a longer side <= max_image_size, aspect kept, and padded
    with the mean colour at the bottom/right to a multiple of the cell (2 * patch_size)."""

    model_type = "eve"

    def __init__(self, tokenizer, config: EVEConfig):
        self.config, self.tokenizer = config, tokenizer
        setup_tokenizer(tokenizer, "left")  # a left-padded batch generates like its rows one by one
        self.image_token_id = add_image_token(tokenizer, config.image_token, config.image_token_id)
        self.mean = np.array(config.image_mean or [0.5] * 3, dtype=np.float32)
        self.std = np.array(config.image_std or [0.5] * 3, dtype=np.float32)

    @classmethod
    def from_config(cls, config: EVEConfig, root: str | Path | None = None) -> EVEProcessor:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(resolve_path(config.lm.name_or_path, root)), config)

    @classmethod
    def load_vlbridge(cls, root: Path) -> EVEProcessor:
        return cls.from_config(read_model_config(EVEConfig, root / "config.json", cls.model_type), root)

    def save_pretrained(self, path: str | Path):
        self.tokenizer.save_pretrained(Path(path) / "lm")  # beside the LM that EVE.save_pretrained writes

    def resize(self, image) -> Image.Image:
        image, cell = load_image(image), self.config.cell_size
        W, H = image.size
        s = min(1.0, self.config.max_image_size / max(W, H))
        w, h = max(1, round(W * s)), max(1, round(H * s))
        if (w, h) != (W, H):
            image = image.resize((w, h), Image.Resampling.BICUBIC)
        canvas = Image.new(
            "RGB",
            (math.ceil(w / cell) * cell, math.ceil(h / cell) * cell),
            tuple(int(round(float(m) * 255)) for m in self.mean),
        )
        canvas.paste(image, (0, 0))
        return canvas

    def images(self, images) -> dict[str, torch.Tensor]:
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        arrays = [(np.asarray(self.resize(im), dtype=np.float32) / 255 - self.mean) / self.std for im in images]
        sizes = torch.tensor([a.shape[:2] for a in arrays], dtype=torch.long)  # (B, 2): height, width
        pixel_values = torch.zeros(len(arrays), 3, *sizes.max(0).values.tolist())
        for i, a in enumerate(arrays):
            pixel_values[i, :, : a.shape[0], : a.shape[1]] = torch.from_numpy(a).permute(2, 0, 1)
        return {"pixel_values": pixel_values, "image_sizes": sizes}

    def prompt_ids(self, prompt: str, num_image_tokens: int | None) -> list[int]:
        """A prompt's ids with its one "<image>" expanded to num_image_tokens ids (None: no image). A
        prompt without the placeholder gets the image at its start, as in LLaVA and EVE."""
        token, img = self.config.image_token, self.image_token_id
        if num_image_tokens is not None and token not in prompt:
            prompt = f"{token} {prompt}" if prompt else token
        ids = self.tokenizer(prompt).input_ids
        if ids.count(img) != (num_image_tokens is not None):
            raise ValueError(
                f"prompt {prompt[:60]!r} holds {ids.count(img)} {token} for "
                f"{int(num_image_tokens is not None)} image(s): EVE takes one image a sample"
            )
        if num_image_tokens is not None:
            i = ids.index(img)
            ids[i : i + 1] = [img] * num_image_tokens
        return ids

    def prompt_inputs(self, images, prompts, questions=None, examples=None) -> dict[str, torch.Tensor]:
        """Generation inputs (VLProcessor.prompt_inputs)."""
        self.no_examples(examples, "EVE")
        return self(images=images, text=prompts)

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
