"""What every processor shares: the base class, tokenizer set-up, padding token lists into batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from vlbridge.core.backbones import local_dir
from vlbridge.core.base import Formats


def bos_ids(tok) -> list[int]:
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


def prompt_target(prompt: str, target: str) -> str:
    """A training text: the target follows its prompt after one space (directly when there is no prompt)."""
    return f"{prompt} {target}" if prompt else target


def setup_tokenizer(tokenizer, padding_side: str):
    """Pad on `padding_side` (left for batched decoder-only generation); an LM without a pad token pads
    with eos (those positions are masked out)."""
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def add_image_token(tokenizer, token: str, expected_id: int | None = None) -> int:
    """The id of the image placeholder `token`, added to the tokenizer as a special token (never split,
    dropped in decoding) if it is not there yet. Its id may lie past the LM's vocabulary: a model that
    writes its image tokens at that id never embeds it, so the LM's tables stay as they are. expected_id
    (a saved config's): an error if the tokenizer gives another."""
    if token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [token]})
    token_id = tokenizer.convert_tokens_to_ids(token)
    if expected_id not in (None, token_id):
        raise ValueError(f"the tokenizer gives {token!r} id {token_id}, the config {expected_id}")
    return token_id


class VLProcessor(Formats):
    """The base of every design's processor: images + text -> the model's inputs, ids -> text."""

    model_type: ClassVar[str]
    tokenizer: Any  # the LM's

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path):
        """The processor saved beside a model (or of a registered foreign format)."""
        root = local_dir(name_or_path)
        fmt = cls.foreign_format(root)
        if fmt is not None and fmt.load_processor is not None:
            return fmt.load_processor(root, str(name_or_path))
        return cls.load_vlbridge(root)

    @classmethod
    def load_vlbridge(cls, root: Path):
        raise NotImplementedError

    def save_pretrained(self, path: str | Path):
        raise NotImplementedError

    def prompt_inputs(
        self, images: list, prompts: list[str], questions: list[str] | None = None, examples: list[tuple] | None = None
    ) -> dict[str, torch.Tensor]:
        """Generation inputs: one image and one prompt per sample (the prompt as the LM reads it, e.g. the
        config's vqa_prompt filled with the question). questions: the raw questions, for models that
        read them apart from the prompt. examples: in-context demonstrations (image, prompt, target) put
        before every sample, for models that take interleaved images (`"in_context" in model.tasks`)."""
        raise NotImplementedError

    @staticmethod
    def no_examples(examples, model: str):
        if examples:
            raise ValueError(
                f"{model} takes one image per prompt: in-context examples need a model with "
                "interleaved inputs (Flamingo)"
            )

    def batch_decode(self, ids: torch.Tensor) -> list[str]:
        return [s.strip() for s in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
