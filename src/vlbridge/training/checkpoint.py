"""Training checkpoints with exact resume, and the training logs.

A checkpoint is the model's own save_pretrained directory (config.json + model.safetensors, without the
frozen backbones) plus trainer_state.safetensors (every trainable parameter, the optimizer state, the
RNG) and trainer_state.json (the step): nothing pickled. The log is <out_dir>/log.jsonl, one JSON row
per logged step; tensorboard and wandb only when the recipe asks (imported lazily).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vlbridge.core import dist
from vlbridge.core.config import to_dict

if TYPE_CHECKING:
    from vlbridge.training.train import TrainConfig


def full_model(model, writer):
    """The whole model, to save or evaluate: the model itself, or under FSDP rank 0's CPU copy `writer`
    with every trainable parameter gathered from the shards (None on the other ranks). Under FSDP every
    rank must call this (the gathers are collectives). Frozen parameters never change, so the copy's are
    current and the frozen LM is never gathered."""
    if not dist.is_sharded(model):
        return model
    values = {n: dist.full_tensor(p) for n, p in model.named_parameters() if p.requires_grad}
    if writer is not None:
        with torch.no_grad():
            for n, p in writer.named_parameters():
                if n in values:
                    p.copy_(values[n])
    return writer


def save_checkpoint(path: Path, step: int, model, opt, processor, writer=None):
    """Bridge weights + every trainable parameter (EVE trains its LM) + optimizer state + RNG, all as
    safetensors/JSON (nothing pickled), written by rank 0. Whole tensors even under FSDP (gathered here:
    every rank calls this), so any world size and parallel mode can resume from it."""
    if dist.world()[0] > 0 and not dist.is_sharded(model):
        return  # DDP: rank 0's replica is the whole model
    from safetensors.torch import save_file

    full = full_model(model, writer)
    params = [p for g in opt.param_groups for p in g["params"]]
    states = [
        {k: dist.full_tensor(v) if torch.is_tensor(v) else torch.tensor(v) for k, v in opt.state.get(p, {}).items()}
        for p in params
    ]
    if dist.world()[0] > 0:
        return
    full.save_pretrained(path, processor=processor, include_backbones=False)
    tensors = {"rng.torch": torch.get_rng_state()}
    tensors.update({f"param.{n}": p.detach().clone() for n, p in full.named_parameters() if p.requires_grad})
    tensors.update({f"opt.{i}.{k}": v.clone() for i, st in enumerate(states) for k, v in st.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "trainer_state.safetensors"))
    meta = {"step": step, "param_state": [sorted(st) for st in states]}
    (path / "trainer_state.json").write_text(json.dumps(meta))


def load_weights(path: Path, model):
    """A checkpoint's bridge weights and trainable parameters into the whole (not yet sharded) model."""
    from safetensors.torch import load_file

    model.load_bridge_state(load_file(str(path / "model.safetensors")), path)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in load_file(str(path / "trainer_state.safetensors")).items():
            if key.startswith("param."):
                params[key[len("param.") :]].copy_(value)


def load_trainer_state(path: Path, opt) -> int:
    """A checkpoint's optimizer state (cut into this rank's shards under FSDP) and RNG; returns its step."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / "trainer_state.safetensors"))
    meta = json.loads((path / "trainer_state.json").read_text())
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, (p, keys) in enumerate(zip(params, meta["param_state"])):
        if keys:
            opt.state[p] = {k: dist.shard_like(tensors[f"opt.{i}.{k}"], p) for k in keys}
    torch.set_rng_state(tensors["rng.torch"])
    return meta["step"]


class Loggers:
    """jsonl always; tensorboard / wandb only when asked, imported lazily."""

    def __init__(self, cfg: TrainConfig, out: Path):
        self.file = open(out / "log.jsonl", "a")
        self.tb = self.wb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        if cfg.wandb:
            import wandb

            self.wb = wandb.init(project="vlbridge", config=to_dict(cfg), dir=str(out))

    def write(self, row: dict):
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for k, v in row.items():
            if self.tb is not None and isinstance(v, (int, float)) and k != "step":
                self.tb.add_scalar(k, v, row["step"])
        if self.wb is not None:
            self.wb.log(row, step=row["step"])

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()
