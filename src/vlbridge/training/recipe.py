"""Training recipes: typed settings read from a JSON file (or a shipped recipe's name) plus `key.sub=value`
overrides, every value checked when read (types by core.config.from_dict, ranges and choices here)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from vlbridge.core.adapters import LoraConfig
from vlbridge.core.config import ConfigError, from_dict, to_dict
from vlbridge.data.batches import DataConfig
from vlbridge.data.interleaved import DocumentData
from vlbridge.models.blip2 import Blip2, Blip2Config
from vlbridge.models.eve import EVE, EVEConfig
from vlbridge.models.flamingo import Flamingo, FlamingoConfig
from vlbridge.models.llava import Llava, LlavaConfig

ASSETS = Path(__file__).parents[1] / "assets"
KINDS = {"blip2": Blip2, "flamingo": Flamingo, "eve": EVE, "llava": Llava}  # TrainConfig.model_kind
RECIPES = Path(__file__).parents[1] / "recipes"


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 100
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    clip_grad: float = 1.0  # 0 disables clipping
    # Gated designs (Flamingo): the tanh gates' learning rate is lr x this. 1 = the paper; the gates start
    # at 0 and open only a little in a short run, which this speeds up.
    gate_lr_scale: float = 1.0


@dataclass
class LossWeights:
    """BLIP-2 stage 1: loss = itc * ITC + itm * ITM + itg * ITG (the paper weighs all three 1)."""

    itc: float = 1.0
    itm: float = 1.0
    itg: float = 1.0


@dataclass
class TrainConfig:
    # "blip2" (model, data, stage), "flamingo" (flamingo, datasets), "eve" (eve, data, stage), "llava" (llava,
    # data, stage)
    model_kind: str = "blip2"
    # BLIP-2: 1 (ITC+ITM+ITG) or 2 (LM loss through the frozen LLM). EVE: 1 (pre-align: patch embedding,
    # projector and PAL train, LM frozen), 2 (generative pre-training: all but the teacher), 3 (SFT).
    # LLaVA: 1 (feature alignment: the projector), 2 (instruction tuning: projector + LM, or + `lora`).
    stage: int = 1
    model: Blip2Config = field(default_factory=Blip2Config)
    flamingo: FlamingoConfig | None = None
    # EVE. With init_from the checkpoint's architecture is kept and only pal_weight and the prompts are
    # taken from here (they change between stages).
    eve: EVEConfig | None = None
    # LLaVA. With init_from (stage 2 from stage 1's final model) the checkpoint's architecture is kept and
    # only the prompts are taken from here.
    llava: LlavaConfig | None = None
    init_from: str = ""  # a checkpoint to start from (a later stage starts from the previous one's)
    # BLIP-2 stage 1 without init_from: a BERT checkpoint (hub id or directory) the fresh Q-Former's text
    # path starts from, as the paper's starts from bert-base-uncased (hf_blip2.init_qformer_from_bert)
    qformer_init: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    datasets: list[DocumentData] = field(default_factory=list)  # Flamingo: the mixture, lambda_m = weight
    optim: OptimConfig = field(default_factory=OptimConfig)
    # LoRA adapters on the LM (and with lora.bridge on the bridge) instead of training those weights: any
    # design, BLIP-2 from stage 2 (stage 1 has no LM). None: the stage trains what it trains.
    lora: LoraConfig | None = None
    loss_weights: LossWeights = field(default_factory=LossWeights)  # BLIP-2 stage 1 only
    steps: int = 1000
    batch_size: int = 32  # BLIP-2, per rank (a Flamingo dataset has its own batch_size)
    grad_accum: int = 1
    # bf16 autocast (CPU and GPU) or fp32. fp16 is refused: it needs loss scaling (a GradScaler, its state
    # in every checkpoint), which this loop does not do; bf16 has fp32's range and fp16's memory.
    precision: str = "bf16"
    seed: int = 0
    out_dir: str = "runs/blip2"
    save_every: int = 0  # checkpoint every N steps for resume (0: none; the last step's model is final/)
    keep_last: int = 2  # checkpoints kept in out_dir/checkpoints; an older one goes once a newer is complete
    log_every: int = 10
    # a non-finite loss or gradient norm skips the optimizer step (counted, logged); this many in a row stop
    # the run with an error (the last checkpoint holds finite weights)
    max_nonfinite_steps: int = 10
    # An out_dir holding another recipe's run is refused. resume: continue the run in out_dir, refused when
    # there is none or its recipe differs (without it, the same recipe resumes too). overwrite: start afresh,
    # the run that was there moved aside to <out_dir>.replaced-<time>.
    resume: bool = False
    overwrite: bool = False
    cache_features: bool = False  # run the frozen encoder once over the pool and train on stored features
    grad_checkpointing: bool = False
    # Under torchrun: "ddp" (replicas, gradients all-reduced) or "fsdp" (FSDP2 fully_shard: each transformer
    # block sharded over the ranks and gathered only while it runs). One process ignores it.
    parallel: str = "ddp"
    # "whole": checkpoints of whole tensors (safetensors) written by rank 0, under FSDP gathered to it first;
    # "sharded": torch.distributed.checkpoint, every rank writing its own shards (no rank gathers the
    # model; the checkpoint folder must be on a file system all ranks share). A run resumes from either
    # format on any number of processes (docs/training.md).
    checkpoint_format: str = "whole"
    tensorboard: bool = False
    wandb: bool = False
    device: str = "auto"

    # Fields that say how long, how often, where and on what a run goes, not what it computes: they may
    # change when a run is resumed (checkpoint.recipe_identity hashes all the others).
    run_control: ClassVar[tuple[str, ...]] = (
        "steps",
        "save_every",
        "keep_last",
        "log_every",
        "max_nonfinite_steps",
        "resume",
        "overwrite",
        "out_dir",
        "device",
        "parallel",
        "checkpoint_format",
        "cache_features",
        "grad_checkpointing",
        "tensorboard",
        "wandb",
    )

    def __post_init__(self):
        self._check_ranges()
        if self.model_kind not in KINDS:
            raise ValueError(f"model_kind {self.model_kind!r}: expected one of {list(KINDS)}")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel {self.parallel!r}: expected 'ddp' or 'fsdp'")
        if self.qformer_init and (self.model_kind != "blip2" or self.stage != 1 or self.init_from):
            raise ValueError(
                "qformer_init starts a fresh BLIP-2 stage-1 Q-Former from BERT: it needs model_kind "
                "'blip2', stage 1 and no init_from (a later stage starts from the previous one)"
            )
        if self.model_kind == "eve" and (self.stage not in (1, 2, 3) or (self.eve is None and not self.init_from)):
            raise ValueError("an eve recipe needs stage 1, 2 or 3 and `eve` (an EVEConfig) or init_from")
        if self.model_kind == "llava" and self.llava is None and not self.init_from:
            raise ValueError("a llava recipe needs `llava` (a LlavaConfig) or init_from")
        if not all(math.isfinite(x) and x >= 0 for x in astuple(self.loss_weights)):
            raise ValueError(f"loss_weights must be finite and >= 0, got {self.loss_weights}")
        if self.loss_weights != LossWeights() and (self.model_kind != "blip2" or self.stage != 1):
            raise ValueError(
                "loss_weights weigh BLIP-2's stage-1 losses (ITC, ITM, ITG): they need model_kind 'blip2' and stage 1"
            )
        # from_dict builds the DocumentData; a config built in code may still give them as dicts
        self.datasets = [d if isinstance(d, DocumentData) else from_dict(DocumentData, d) for d in self.datasets]
        if self.model_kind == "flamingo" and (self.flamingo is None or not self.datasets):
            raise ValueError("a flamingo recipe needs `flamingo` (a FlamingoConfig) and `datasets`")
        if len({d.name for d in self.datasets}) != len(self.datasets):
            raise ValueError(f"dataset names must be unique: {[d.name for d in self.datasets]}")
        kind = KINDS[self.model_kind]
        if self.stage not in kind.stages:
            raise ConfigError(
                f"TrainConfig.stage: a {self.model_kind} model trains in stages {list(kind.stages)}, got {self.stage}"
            )
        self._check_lm_adaptation()
        for i, d in enumerate(self.datasets):
            _require(d.batch_size >= 1, f"datasets[{i}].batch_size", ">= 1", d.batch_size)
            _require(
                math.isfinite(d.weight) and d.weight >= 0, f"datasets[{i}].weight", "a finite number >= 0", d.weight
            )

    def _check_lm_adaptation(self):
        """LoRA needs an LM; it is set at the top level only (the LM's config records it once applied); a
        quantised LM cannot itself train (EVE stages 2 and 3 train the LM unless LoRA stands in)."""
        section = "model" if self.model_kind == "blip2" else self.model_kind
        design = getattr(self, section)
        lm = design.lm if design is not None else None
        if lm is not None and lm.lora is not None:
            raise ConfigError(f"TrainConfig.{section}.lm.lora: set LoRA in the recipe's top-level `lora`")
        if self.lora is not None and self.model_kind == "blip2" and (self.stage == 1 or lm is None):
            raise ConfigError("TrainConfig.lora: LoRA adapts the LM, which a BLIP-2 recipe has in stage 2 (model.lm)")
        if self.lora is not None and self.model_kind == "llava" and self.stage == 1:
            raise ConfigError(
                "TrainConfig.lora: LLaVA stage 1 trains the projector alone (feature alignment); "
                "LoRA belongs to stage 2"
            )
        trains_lm = (self.model_kind == "eve" and self.stage >= 2) or (self.model_kind == "llava" and self.stage == 2)
        if lm is not None and lm.quantization and trains_lm and self.lora is None:
            design = {"eve": "EVE", "llava": "LLaVA"}[self.model_kind]
            raise ConfigError(
                f"TrainConfig.{section}.lm.quantization: {design} stage {self.stage} trains the LM, which a "
                "quantised LM cannot do: add `lora` (adapters train in its place) or load it unquantised"
            )

    def _check_ranges(self):
        """The values from_dict's type check cannot judge: one message naming the key."""
        o = self.optim
        for key, ok, want in (
            ("steps", self.steps >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("grad_accum", self.grad_accum >= 1, ">= 1"),
            ("log_every", self.log_every >= 1, ">= 1"),
            ("save_every", self.save_every >= 0, ">= 0 (0: none, the last step's model is final/)"),
            ("keep_last", self.keep_last >= 1, ">= 1"),
            ("max_nonfinite_steps", self.max_nonfinite_steps >= 1, ">= 1"),
            ("seed", self.seed >= 0, ">= 0"),
            ("optim.lr", math.isfinite(o.lr) and o.lr > 0, "a finite number > 0"),
            ("optim.min_lr", math.isfinite(o.min_lr) and 0 <= o.min_lr <= o.lr, "a number in [0, optim.lr]"),
            ("optim.warmup_steps", o.warmup_steps >= 0, ">= 0"),
            ("optim.weight_decay", math.isfinite(o.weight_decay) and o.weight_decay >= 0, "a finite number >= 0"),
            (
                "optim.clip_grad",
                math.isfinite(o.clip_grad) and o.clip_grad >= 0,
                "a finite number >= 0 (0: no clipping)",
            ),
            ("optim.gate_lr_scale", math.isfinite(o.gate_lr_scale) and o.gate_lr_scale > 0, "a finite number > 0"),
            ("optim.betas", len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "two numbers in [0, 1)"),
        ):
            _require(ok, key, want, _value_at(self, key))
        if self.precision == "fp16":
            raise ConfigError(
                "TrainConfig.precision: 'fp16' is not supported (it needs loss scaling, which this loop does "
                "not do): use 'bf16' (autocast; fp32's range at fp16's memory) or 'fp32'"
            )
        _require(self.precision in ("bf16", "fp32"), "precision", "'bf16' or 'fp32'", self.precision)
        _require(
            self.checkpoint_format in ("whole", "sharded"),
            "checkpoint_format",
            "'whole' or 'sharded'",
            self.checkpoint_format,
        )
        if self.resume and self.overwrite:
            raise ConfigError(
                "TrainConfig.resume and TrainConfig.overwrite: expected at most one true (continue a run or replace it)"
            )
        _require(bool(self.out_dir), "out_dir", "a directory", self.out_dir)
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                _require(False, "device", "'auto', 'cpu', 'cuda' or 'cuda:N'", self.device)


def _require(ok: bool, key: str, want: str, value) -> None:
    if not ok:
        raise ConfigError(f"TrainConfig.{key}: expected {want}, got {value!r}")


def _value_at(cfg, key: str):
    """The value at a dotted key ('optim.lr')."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def load_recipe(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """A recipe file (or the name of a shipped one) plus `key.sub=value` overrides (values parsed as JSON)."""
    path = Path(path)
    if not path.exists() and (RECIPES / f"{path}.json").exists():
        path = RECIPES / f"{path}.json"
    data = json.loads(Path(path).read_text())
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        node, *_ = data, None
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        try:
            node[leaf] = json.loads(value)
        except json.JSONDecodeError:
            node[leaf] = value
    cfg = from_dict(TrainConfig, data)
    flamingo = (cfg.flamingo.vision, cfg.flamingo.lm) if cfg.flamingo is not None else ()
    eve = (cfg.eve.lm, cfg.eve.teacher) if cfg.eve is not None else ()
    llava = (cfg.llava.vision, cfg.llava.lm) if cfg.llava is not None else ()
    for c in (cfg.model.vision, cfg.model.lm, *flamingo, *eve, *llava):
        if c is not None:
            c.name_or_path = expand(c.name_or_path)
    cfg.model.qformer_tokenizer = expand(cfg.model.qformer_tokenizer)
    cfg.init_from, cfg.qformer_init = expand(cfg.init_from), expand(cfg.qformer_init)
    cfg.data.path, cfg.data.image_root = expand(cfg.data.path), expand(cfg.data.image_root)
    for d in cfg.datasets:
        d.path, d.image_root = expand(d.path), expand(d.image_root)
    return cfg


def expand(path: str) -> str:
    """`{assets}` in recipe paths means the backbones shipped inside the package."""
    return path.replace("{assets}", str(ASSETS))


def recipe_identity(cfg: TrainConfig, world_size: int) -> dict:
    """The recipe fields that decide what a run computes: all but TrainConfig.run_control (how long, how
    often to save or log, where, on which devices). Batch sizes are global (per-rank x ranks): a run
    resumes on any number of processes with the same global batch, except on webdataset shards, which
    each rank streams on its own (there the world size counts). Normalised through from_dict, so a
    JSON 1 and 1.0 are one recipe."""
    d = to_dict(from_dict(type(cfg), to_dict(cfg)))
    for key in cfg.run_control:
        d.pop(key)
    if cfg.data.source == "webdataset":
        d["world_size"] = world_size
    else:
        d["global_batch_size"] = d.pop("batch_size") * world_size
        for ds in d["datasets"]:
            ds["global_batch_size"] = ds.pop("batch_size") * world_size
    return json.loads(json.dumps(d))  # as stored: tuples are lists


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, allow_nan=False).encode()).hexdigest()


def _dataclass_of(hint):
    """The dataclass a type hint holds (X, X | None, list[X]), or None."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if (found := _dataclass_of(arg)) is not None:
            return found
    return None


def added_fields(old: dict, new: dict, cls: type = TrainConfig, prefix: str = "") -> list[str] | None:
    """Where a recipe identity stored by an earlier vlbridge (`old`) differs from this one (`new`) only by
    fields added since, each at its default (which keeps the earlier behaviour: what a new field must do),
    their paths; None when anything else differs (another value, a field removed, one added off its
    default)."""
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    hints = typing.get_type_hints(cls) if fields else {}
    added: list[str] = []
    for key in sorted(set(old) | set(new)):
        if key not in new:
            return None
        b, f = new[key], fields.get(key)
        if key not in old:
            if f is None:
                return None
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if json.loads(json.dumps(to_dict(default) if dataclasses.is_dataclass(default) else default)) != b:
                return None
            added.append(prefix + key)
            continue
        a, inner = old[key], _dataclass_of(hints.get(key)) if f is not None else None
        pairs = []
        if isinstance(a, dict) and isinstance(b, dict):
            pairs = [(a, b, f"{prefix}{key}.")]
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(type(x) is dict for x in a + b):
            pairs = [(x, y, f"{prefix}{key}.{i}.") for i, (x, y) in enumerate(zip(a, b))]
        elif a != b:
            return None
        for x, y, where in pairs:
            if inner is None and x != y:
                return None
            sub = added_fields(x, y, inner, where) if inner is not None else []
            if sub is None:
                return None
            added += sub
    return added


def recipe_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'optim.lr (0.001 -> 0.005)' for every leaf that differs."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += recipe_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({json.dumps(a)[:40]} -> {json.dumps(b)[:40]})")
    return out
