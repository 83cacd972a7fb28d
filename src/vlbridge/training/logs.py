"""The training logs: log.jsonl always (strict JSON), tensorboard / wandb only when a recipe asks (imported
lazily)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from vlbridge.core.config import to_dict

if TYPE_CHECKING:
    from vlbridge.training.recipe import TrainConfig


def json_safe(value):
    """Non-finite floats (a skipped step's loss or grad norm) as null, in nested rows too: log.jsonl
    stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


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
        row = json_safe(row)
        self.file.write(json.dumps(row, allow_nan=False) + "\n")
        self.file.flush()
        for k, v in row.items():
            if self.tb is not None and isinstance(v, (int, float)) and k != "step":
                self.tb.add_scalar(k, v, row["step"])
        if self.wb is not None:
            self.wb.log(row, step=row["step"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()
