"""LLaVA: a frozen vision encoder, an MLP projector, the visual tokens in the LM's input sequence.

Liu et al., "Visual Instruction Tuning", NeurIPS 2023 (LLaVA), and "Improved Baselines with Visual
Instruction Tuning", CVPR 2024 (LLaVA-1.5: a two-layer MLP projector, the penultimate CLIP layer).
The baseline most users reach for first: no resampler, no cross-attention, every patch a token.

    image -> frozen tower (cut at feature_layer; CLS dropped with drop_cls) -> projector -> N tokens
    "<bos> <image>*N a photo of" -> LM input embeddings with the N visual tokens at the <image> ids

The processor expands the prompt's one "<image>" into N ids (N = config.num_image_tokens, counted from
the tower when the model is built); the model writes the projected tokens there in order, as
transformers' LlavaForConditionalGeneration does (its checkpoints load through convert_transformers).
The <image> id may lie past the LM's vocabulary: it is never looked up. The LM loss covers the target
only (labels -100 on the prompt and the image). `freeze_for_stage`: 1 = the projector alone (LLaVA's
feature alignment); 2 = projector + LM (LLaVA's instruction tuning), or projector + LoRA adapters with
a recipe's `lora` (core/adapters.py).

Shapes: B batch, v tower tokens, Dv tower width, N = v - drop_cls visual tokens, H LM width, T tokens.
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlbridge.core import adapters
from vlbridge.core.backbones import freeze, next_token_loss, position_kwargs
from vlbridge.core.base import VLModel
from vlbridge.core.generation import generate_from_embeds
from vlbridge.models.llava.configuration import LlavaConfig
from vlbridge.models.llava.processing import LlavaProcessor

log = logging.getLogger(__name__)


@dataclass
class LlavaOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # (B, T, V)


def projector(kind: str, vision_width: int, lm_width: int, bias: bool = True) -> nn.Sequential:
    """ "mlp2x_gelu" (LLaVA-1.5): Linear(Dv, H), GELU, Linear(H, H); "linear" (LLaVA-1): Linear(Dv, H).
    Named as transformers' LlavaMultiModalProjector (linear_1, act, linear_2)."""
    layers = OrderedDict(linear_1=nn.Linear(vision_width, lm_width, bias=bias))
    if kind == "mlp2x_gelu":
        layers.update(act=nn.GELU(), linear_2=nn.Linear(lm_width, lm_width, bias=bias))
    return nn.Sequential(layers)


class Llava(VLModel):
    """Frozen vision backbone + trainable projector + decoder-only LM (frozen in stage 1). Build with
    create_llava(config) or Llava.from_pretrained(path)."""

    model_type = "llava"
    config_class = LlavaConfig
    processor_class = LlavaProcessor
    stages = (1, 2)  # 1: the projector (feature alignment), 2: projector + LM (or LoRA adapters)

    def __init__(self, config: LlavaConfig, vision: nn.Module, lm: nn.Module):
        super().__init__()
        if lm.config.is_encoder_decoder:
            raise ValueError("LLaVA puts the image inside a decoder-only LM; encoder-decoder LMs are not supported")
        if config.image_token_id is None:
            raise ValueError("config.image_token_id is unset: build with create_llava")
        self.config = config
        self.vision, self.lm = freeze(vision), freeze(lm)
        # transformers' checkpoints only (convert_transformers): the tower's layers after the feature layer,
        # never run, kept under transformers' names to write the tower back whole
        self.tower_tail: dict[str, torch.Tensor] = {}
        self.projector = projector(
            config.projector, vision.hidden_size, lm.get_input_embeddings().embedding_dim, config.projector_bias
        )
        count = self._count_image_tokens()
        if config.num_image_tokens not in (0, count):
            raise ValueError(
                f"config.num_image_tokens is {config.num_image_tokens}, but the vision tower gives {count} tokens "
                f"an image{' after dropping CLS' if config.drop_cls else ''}"
            )
        config.num_image_tokens = count
        self.freeze_for_stage(1)

    @torch.no_grad()
    def _count_image_tokens(self) -> int:
        """Visual tokens per image: the tower's tokens for one image of its size (CLS and registers
        included), less CLS with drop_cls."""
        size = self.vision.image_size
        if not size:
            raise ValueError(f"{type(self.vision.model).__name__}: its config has no image_size to count tokens by")
        size = (size, size) if isinstance(size, int) else tuple(size)
        channels = getattr(self.vision.model.config, "num_channels", 3)
        device = next(self.vision.parameters()).device
        return self.vision(torch.zeros(1, channels, *size, device=device)).shape[1] - int(self.config.drop_cls)

    # ------------------------------------------------------------------ building, saving, loading
    def _write_backbones(self, path: Path, include_backbones: bool, processor) -> LlavaConfig:
        """vision/ and lm/ in transformers' own format; lm/ also without include_backbones (a trainer's
        checkpoint) once the LM trains (stage 2 without LoRA), since it is no longer the one named."""
        config = copy.deepcopy(self.config)
        if include_backbones:
            self.vision.save_pretrained(path / "vision")
            config.vision.name_or_path, config.vision.feature_layer = "vision", -1  # saved already cut
        if include_backbones or self.lm_trains():
            self.lm.save_pretrained(path / "lm")
            config.lm.name_or_path = "lm"
        return config

    # ------------------------------------------------------------------ what it can do, what trains
    @property
    def tasks(self) -> frozenset[str]:
        return frozenset({"caption", "vqa"})

    def lm_trains(self) -> bool:
        """Whether any of the LM's own weights train (LoRA adapters are not its own)."""
        lora = {id(p) for p in adapters.adapter_parameters(self).values()}
        return any(p.requires_grad for p in self.lm.parameters() if id(p) not in lora)

    def frozen_backbones(self) -> list[nn.Module]:
        return [self.vision] + ([] if self.lm_trains() else [self.lm])

    def freeze_for_stage(self, stage: int) -> dict[str, dict[str, int]]:
        """1 (feature alignment): the projector trains. 2 (instruction tuning): projector + LM, or with
        LoRA adapters on the LM (add_lora) projector + adapters. The tower never trains."""
        self.check_stage(stage)
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith("projector.") or (stage == 2 and name.startswith("lm.")))
        self.train(self.training)  # frozen parts back to eval mode
        return super().freeze_for_stage(stage)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the LM's layer activations in backward instead of storing them (the gradient reaches
        the projector through the LM in both stages); the projector is one small MLP, stored as it is."""
        if enable:
            self.lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.lm.activation_checkpointing_disable()

    # ------------------------------------------------------------------ images into the LM
    def encode_images(self, pixel_values=None, image_features=None) -> torch.Tensor:
        """Visual tokens (B, N, H) from pixel_values (B, 3, S, S) or the tower's output image_features
        (B, v, Dv) (e.g. stored by a feature cache)."""
        if image_features is None:
            with torch.no_grad():
                image_features = self.vision(pixel_values)  # (B, v, Dv)
        if self.config.drop_cls:
            image_features = image_features[:, 1:]
        return self.projector(image_features.to(self.projector[0].weight.dtype))

    def lm_inputs(self, input_ids, attention_mask=None, pixel_values=None, image_features=None, labels=None):
        """inputs_embeds (B, T, H) with the visual tokens at the image ids (row b takes image b's N tokens
        in order), the attention mask, and labels with the image positions -100."""
        slots = input_ids == self.config.image_token_id  # (B, T)
        embeds = self.lm.get_input_embeddings()(input_ids.masked_fill(slots, 0))  # the image id is never looked up
        if pixel_values is not None or image_features is not None:
            image = self.encode_images(pixel_values, image_features)  # (B, N, H)
            have = slots.sum(1).tolist()
            if len(image) != len(input_ids) or have != [image.shape[1]] * len(input_ids):
                raise ValueError(
                    f"{len(image)} images of {image.shape[1]} tokens for rows holding {have} image tokens "
                    f"(id {self.config.image_token_id}): one image a row, its <image> expanded by LlavaProcessor"
                )
            embeds = embeds.masked_scatter(slots[..., None], image.to(embeds.dtype))
        elif slots.any():
            raise ValueError("input_ids hold image tokens but no pixel_values were given")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return embeds, mask, None if labels is None else labels.masked_fill(slots, -100)

    # ------------------------------------------------------------------ forward and generate
    def forward(
        self, input_ids, attention_mask=None, pixel_values=None, labels=None, image_features=None
    ) -> LlavaOutput:
        """input_ids (B, T) with each image's expanded <image> ids (LlavaProcessor); pixel_values (B, 3, S, S)
        or image_features (B, v, Dv); labels (B, T), -100 where ignored -> LM loss on the rest."""
        embeds, mask, labels = self.lm_inputs(input_ids, attention_mask, pixel_values, image_features, labels)
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask, **position_kwargs(self.lm, mask)).logits
        return LlavaOutput(None if labels is None else next_token_loss(logits, labels), logits)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_features=None, **generate_kwargs):
        """transformers' generate on inputs_embeds (continued from a cache of the prompt filled once per
        image, core/generation.py), with its keywords (max_new_tokens, num_beams,
        length_penalty, do_sample, ...); batched prompts left-padded (the processor does). Returns the new
        token ids only (B, L); transformers' LlavaForConditionalGeneration returns the prompt + the same
        ids, and its logits processors (repetition_penalty) also see the prompt, ours only the new tokens."""
        embeds, mask, _ = self.lm_inputs(input_ids, attention_mask, pixel_values, image_features)
        if "max_new_tokens" not in generate_kwargs and "max_length" not in generate_kwargs:
            generate_kwargs["max_new_tokens"] = 30
        self.check_context(embeds.shape[1], generate_kwargs)
        return generate_from_embeds(self.lm, embeds, mask, **generate_kwargs)


def create_llava(config: LlavaConfig, root: str | Path | None = None) -> tuple[Llava, LlavaProcessor]:
    """A new LLaVA (fresh projector) on the backbones `config` names, and its processor. Adds "<image>" to
    the LM's tokenizer and fills image_token_id, and num_image_tokens from the vision tower."""
    config = copy.deepcopy(config)
    config.image_token_id = None
    processor = LlavaProcessor.from_config(config, root)
    config.image_token_id = processor.image_token_id
    model = Llava.from_config(config, root)
    processor.config = model.config
    return model, processor
