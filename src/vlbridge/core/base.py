"""What every vlbridge model is: the interface that training, evaluation, the CLI and the server use.

A design (BLIP-2, Flamingo, EVE) subclasses `VLModel` and keeps its own config dataclass, processor and
checkpoint converters in its folder under `vlbridge.models`. Callers never ask which design they hold:
they ask the model (`tasks`, `freeze_for_stage`, `fsdp_blocks`, `param_groups`, `training_loss`,
`prepare_inputs`, `generate`) and its processor (`prompt_inputs`, `batch_decode`).

Saved models are `config.json` (with `model_type`) + `model.safetensors` (the trained bridge) + the frozen
backbones in transformers' own format in sub-folders (+ LoRA adapters in peft's layout, core/adapters.py).
Foreign layouts (transformers' BLIP-2, ...) are `CheckpointFormat`s that a design's converter module
registers on the model and processor classes, so converters depend on the model and never the other way
round.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vlbridge.core import adapters
from vlbridge.core.adapters import LoraConfig
from vlbridge.core.backbones import load_lm, load_vision, local_dir, resolve_path
from vlbridge.core.config import from_dict, to_dict
from vlbridge.core.weights import read_weights

log = logging.getLogger(__name__)

TASKS = ("caption", "vqa", "retrieval", "in_context")  # what VLModel.tasks may hold


@dataclass(frozen=True)
class CheckpointFormat:
    """A foreign checkpoint layout: how to recognise a directory of it, load a model / processor from it
    and (optionally) write a model into it."""

    name: str
    detect: Callable[[Path], bool]
    load_model: Callable[..., Any]  # (root, name_or_path, **from_pretrained kwargs) -> model
    load_processor: Callable[..., Any] | None = None  # (root, name_or_path) -> processor
    save: Callable[..., Any] | None = None  # (model, path, processor) -> None


class Formats:
    """A per-class table of the foreign checkpoint formats that converters register."""

    formats: ClassVar[dict[str, CheckpointFormat]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.formats = {}

    @classmethod
    def register_format(cls, fmt: CheckpointFormat) -> None:
        cls.formats[fmt.name] = fmt

    @classmethod
    def foreign_format(cls, root: Path) -> CheckpointFormat | None:
        """The registered format `root` is written in, or None (vlbridge's own or unknown)."""
        return next((f for f in cls.formats.values() if f.detect(root)), None)


def write_model_config(config, path: Path, model_type: str) -> None:
    """config.json: the config's fields and the model_type that `vlbridge.load` dispatches on."""
    path.write_text(json.dumps({"model_type": model_type, **to_dict(config)}, indent=2) + "\n")


def read_model_config(cls: type, path: Path, model_type: str):
    """The config in config.json, checked to belong to `model_type` (directories written before
    model_type existed have none and are taken as they are)."""
    data = json.loads(Path(path).read_text())
    found = data.pop("model_type", model_type)
    if found != model_type:
        raise ValueError(f"{path} holds a {found!r} model, not {model_type!r}: load it with vlbridge.load")
    return from_dict(cls, data)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """ "auto" (or None): the first CUDA device when there is one, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available on this machine")
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


class VLModel(nn.Module, Formats):
    """The base of every design. Subclasses set the class attributes and implement `load_vlbridge`,
    `_write_backbones`, `tasks`, `frozen_backbones`, `forward` and `generate`."""

    model_type: ClassVar[str]  # written to config.json; vlbridge.load dispatches on it
    config_class: ClassVar[type]
    processor_class: ClassVar[type]
    # state-dict prefixes of the parts saved in transformers' own format (or never saved), not in
    # model.safetensors
    backbone_prefixes: ClassVar[tuple[str, ...]] = ("vision.", "lm.")
    stages: ClassVar[tuple[int, ...]] = (1,)  # the training stages freeze_for_stage accepts
    block_types: ClassVar[tuple[type, ...]] = ()  # our own transformer blocks, FSDP units besides the backbones'

    # ------------------------------------------------------------------ what the model can do
    @property
    def tasks(self) -> frozenset[str]:
        """The tasks (of TASKS) this model can do as it is loaded: a BLIP-2 without an LM cannot caption."""
        raise NotImplementedError

    def require_task(self, task: str) -> None:
        """One clear error when the model cannot do `task`."""
        if task not in self.tasks:
            can = ", ".join(sorted(self.tasks)) or "nothing"
            raise ValueError(f"this {self.model_type} model cannot do {task} (it can do: {can})")

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **kwargs):
        """A directory (or hub id) written by save_pretrained, or in a registered foreign format."""
        root = local_dir(name_or_path)
        fmt = cls.foreign_format(root)
        if fmt is not None:
            return fmt.load_model(root, str(name_or_path), **kwargs)
        model = cls.load_vlbridge(root, **kwargs)
        lm = getattr(model.config, "lm", None)
        if lm is not None and lm.lora is not None:  # the adapters saved beside it (lm_adapter/, bridge_adapter/)
            adapters.load_adapters(model, root)
            model.log_parameter_counts()
        return model

    @classmethod
    def from_config(cls, config, root: str | Path | None = None):
        """A model (fresh bridge) on the backbones config.vision and config.lm name, paths relative to
        `root` first. Designs whose backbones are otherwise named override it."""
        config = copy.deepcopy(config)
        config.vision.name_or_path = resolve_path(config.vision.name_or_path, root)
        config.lm.name_or_path = resolve_path(config.lm.name_or_path, root)
        return cls(config, load_vision(config.vision), load_lm(config.lm))

    @classmethod
    def load_vlbridge(cls, root: Path, **kwargs):
        """A directory written by save_pretrained: the backbones its config names, the bridge's weights."""
        model = cls.from_config(cls.read_config(root), root)
        model.load_bridge_state(read_weights(root / "model.safetensors"), root)
        return model

    @classmethod
    def read_config(cls, root: Path):
        return read_model_config(cls.config_class, Path(root) / "config.json", cls.model_type)

    def save_pretrained(
        self, path: str | Path, processor=None, include_backbones: bool = True, format: str = "vlbridge"
    ):
        """config.json + model.safetensors (the bridge); with include_backbones also the frozen backbones
        in transformers' own format in sub-folders, and with a processor its files beside them, so that
        the directory is self-contained. format: "vlbridge" or a registered foreign format.

        LoRA adapters (add_lora) go to lm_adapter/ (+ bridge_adapter/) in peft's layout, the weights they
        adapt are written as they were loaded; with lora.merge_on_save (and the backbones written) they are
        folded into the weights instead, which a foreign format always does."""
        lora = self.lora_config
        if format != "vlbridge":
            fmt = self.formats.get(format)
            if fmt is None or fmt.save is None:
                known = ["vlbridge", *(n for n, f in self.formats.items() if f.save is not None)]
                raise ValueError(f"unknown format {format!r} for {self.model_type}; expected one of {known}")
            with adapters.plain_view(self, merge=True):  # a foreign layout has no place for adapters
                return fmt.save(self, path, processor)
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if processor is not None:
            processor.save_pretrained(path)
        # a checkpoint (no backbones) keeps the adapters apart: the LM they would merge into is not written
        merge = lora is not None and lora.merge_on_save and include_backbones
        with adapters.plain_view(self, merge=merge):
            config = self._write_backbones(path, include_backbones, processor)
            bridge = self.bridge_state_dict()
        if getattr(config, "lm", None) is not None and (merge or lora is None):
            config.lm.lora = None  # a plain model directory (merged, or no adapters left)
        write_model_config(config, path / "config.json", self.model_type)
        save_file(bridge, str(path / "model.safetensors"), metadata={"format": "pt"})
        for folder in adapters.FOLDERS.values():  # adapters of an earlier save into this directory
            if (path / folder).is_dir():
                shutil.rmtree(path / folder)
        if lora is not None and not merge:
            adapters.save_adapters(self, path)

    def _write_backbones(self, path: Path, include_backbones: bool, processor) -> Any:
        """Write the backbones that belong in `path`; return the config to save (names rewritten to
        where the backbones now are)."""
        raise NotImplementedError

    def bridge_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained part: everything but the backbones (and the adapters), under the names it has
        without adapters."""
        own = self.state_dict().items()
        return adapters.plain_state(
            {k: v.detach().contiguous() for k, v in own if not k.startswith(self.backbone_prefixes)}
        )

    def load_bridge_state(self, state: dict[str, torch.Tensor], source, skip: tuple[str, ...] = ()) -> None:
        """Load saved bridge tensors; a tensor the model lacks or a bridge tensor the file lacks is an error
        naming them. skip: prefixes of parts left out on purpose (not loaded, not required)."""
        state = {k: v for k, v in state.items() if not k.startswith(skip)} if skip else state
        missing, unexpected = self.load_state_dict(adapters.to_model_keys(self, state), strict=False)
        missing = [
            k for k in missing if not k.startswith(self.backbone_prefixes + skip) and not adapters.is_adapter_key(k)
        ]
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {source} does not match the model: missing {missing}, unexpected {unexpected}"
            )

    # ------------------------------------------------------------------ LoRA adapters (core/adapters.py)
    @property
    def lora_config(self) -> LoraConfig | None:
        """The LoRA adapters this model holds (None: none)."""
        lm = getattr(self.config, "lm", None)
        return lm.lora if lm is not None and adapters.lora_layers(self) else None

    def add_lora(self, lora: LoraConfig) -> list[str]:
        """Adapt the LM (and, with lora.bridge, the bridge) with LoRA: the adapted weights freeze, the
        adapters train; the outputs are unchanged until they do. Logs the counts; returns the adapted
        layers' names."""
        targets = adapters.apply_lora(self, lora)
        self.train(self.training)
        self.log_parameter_counts()
        return targets

    def merge_lora(self) -> None:
        """Fold the adapters into the weights and remove them (a plain model again)."""
        adapters.merge_lora(self)
        self.log_parameter_counts()

    # ------------------------------------------------------------------ training
    def frozen_backbones(self) -> list[nn.Module]:
        """The frozen parts, kept in eval mode whatever train() is asked."""
        raise NotImplementedError

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.frozen_backbones():
            module.eval()  # no dropout in a frozen backbone
        adapters.set_adapter_mode(self, mode)  # but in its adapters, which train
        return self

    def freeze_for_stage(self, stage: int) -> dict[str, dict[str, int]]:
        """Set what trains in training stage `stage` (of `stages`); returns and logs the counts per part.
        The default: the bridge trains, the backbones stay frozen, whatever the stage."""
        self.check_stage(stage)
        self.stage = stage
        adapters.freeze_adapted(self)  # LoRA: whatever the stage, the adapted weights stay frozen
        return self.log_parameter_counts()

    def check_stage(self, stage: int) -> None:
        if stage not in self.stages:
            raise ValueError(f"{self.model_type} trains in stages {list(self.stages)}, not {stage}")

    def parameter_counts(self) -> dict[str, int]:
        counts = {"trainable": 0, "frozen": 0}
        for p in self.parameters():
            counts["trainable" if p.requires_grad else "frozen"] += p.numel()
        return counts

    def group_counts(self) -> dict[str, dict[str, int]]:
        """Trainable and frozen parameters per top-level part (a parameter shared by two parts counts once);
        LoRA adapters count as a part of their own, "<part>.lora" ("lm.lora")."""
        counts: dict[str, dict[str, int]] = {}
        lora = adapters.adapter_parameters(self)
        for name, p in self.named_parameters():
            top = name.split(".")[0] + (".lora" if name in lora else "")
            part = counts.setdefault(top, {"trainable": 0, "frozen": 0})
            part["trainable" if p.requires_grad else "frozen"] += p.numel()
        return counts

    def log_parameter_counts(self) -> dict[str, dict[str, int]]:
        """Log (and return) the counts per part; a frozen backbone with a trainable parameter of its own (not
        one of the bridge's modules placed inside it) is an error."""
        bridge = {id(p) for n, p in self.named_parameters() if not n.startswith(self.backbone_prefixes)}
        bridge |= {id(p) for p in adapters.adapter_parameters(self).values()}  # LoRA adapters in a backbone train
        for module in self.frozen_backbones():
            if any(p.requires_grad for p in module.parameters() if id(p) not in bridge):
                raise RuntimeError(
                    f"{type(module).__name__}: a frozen backbone of this {self.model_type} model has "
                    "trainable parameters"
                )
        counts = self.group_counts()
        trains = ", ".join(f"{n} {c['trainable']:,}" for n, c in counts.items() if c["trainable"]) or "nothing"
        frozen = ", ".join(f"{n} {c['frozen']:,}" for n, c in counts.items() if c["frozen"]) or "nothing"
        log.info("%s: trains %s; frozen %s", self.model_type, trains, frozen)
        return counts

    def fsdp_blocks(self) -> list[nn.Module]:
        """The modules FSDP shards as units of their own: the transformer blocks that transformers names
        in its models' `_no_split_modules` (GPT2Block, LlamaDecoderLayer, CLIPEncoderLayer, ...) and
        ours (`block_types`). Inner units come before the ones that contain them."""
        from transformers import PreTrainedModel

        names = {n for m in self.modules() if isinstance(m, PreTrainedModel) for n in m._no_split_modules or ()}
        blocks = [
            m
            for m in self.modules()
            if m is not self and (type(m).__name__ in names or isinstance(m, self.block_types))
        ]
        return blocks[::-1]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the bridge's activations in backward instead of storing them (less memory, more time)."""
        raise ValueError(f"grad_checkpointing: not implemented for {self.model_type}")

    def param_groups(self, weight_decay: float, gate_lr_scale: float = 1.0) -> list[dict]:
        """AdamW groups of the trainable parameters: no decay on biases, norms and learned tokens.
        gate_lr_scale scales the learning rate of gates, for designs that have them."""
        if gate_lr_scale != 1:
            raise ValueError(f"gate_lr_scale: a {self.model_type} model has no gates")
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.dim() < 2 or "query_tokens" in name else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def training_loss(
        self, batch: dict, generator: torch.Generator | None = None, loss_weights: dict[str, float] | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The training objective on one batch of the design's training data: (loss, logged parts).
        loss_weights: weights of the design's loss terms, for designs with several."""
        if loss_weights:
            raise ValueError(f"loss_weights: a {self.model_type} model trains on one loss")
        return self(**batch).loss, {}

    # ------------------------------------------------------------------ placement and inference
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the trained bridge (the backbones may be held in another)."""
        return next(p for n, p in self.named_parameters() if not n.startswith(self.backbone_prefixes)).dtype

    def place(self, device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = None):
        """Move to `device` ("auto": CUDA when present) and, with dtype, cast every floating tensor."""
        self.to(device=resolve_device(device), dtype=resolve_dtype(dtype))
        return self

    def prepare_inputs(self, batch: dict) -> dict:
        """A processor's output on the model's device; floating inputs (pixels, features) in its dtype."""
        device, dtype = self.device, self.dtype
        return {
            k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
            for k, v in batch.items()
        }

    def check_context(self, prompt_length: int, generate_kwargs: dict) -> None:
        """Refuse a prompt that, with the tokens to generate, needs more positions than the decoder-only LM has
        (its position table would be indexed past its end, or its attention would run out of range)."""
        config = self.lm.config
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if limit is None or config.is_encoder_decoder:
            return
        new = generate_kwargs.get("max_new_tokens") or 0
        total = generate_kwargs.get("max_length") or prompt_length + new
        if total > limit:
            raise ValueError(
                f"the prompt has {prompt_length} tokens (image tokens included) and {new} are to be "
                f"generated: more than the LM's {limit} positions"
            )

    @torch.no_grad()
    def generate(self, **kwargs) -> torch.Tensor:
        """New token ids (B, L) through transformers' generate; takes its keywords."""
        raise NotImplementedError
