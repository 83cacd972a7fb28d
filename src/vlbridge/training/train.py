"""One training entry point:  vlbridge train RECIPE.json [key.sub=value ...]

Reads top to bottom: recipe -> model (frozen backbones, logged trainable counts) -> data -> AdamW
with warm-up + cosine -> loop (grad accumulation, clipping, bf16 autocast) -> checkpoints with exact
resume (checkpoint.py) -> final model. Logs to <out_dir>/log.jsonl; tensorboard / wandb when asked
(lazy imports).

1 or N processes: under `torchrun --nproc_per_node N -m vlbridge.training.train RECIPE` (any recipe)
each rank takes its slice of the same global batch (batch_size, and a Flamingo dataset's batch_size, is
the per-rank micro-batch: global batch = batch_size * N * grad_accum) and only rank 0 writes. parallel
"ddp": every rank holds the model and DistributedDataParallel averages the gradients. parallel "fsdp":
FSDP2 shards every parameter, gradient and optimizer state over the ranks (for LMs too large to
replicate); rank 0 keeps a CPU copy of the model to write checkpoints, which stay whole (safetensors),
so a run resumes on any number of processes and either parallel mode.

`model_kind` says what a recipe builds: "blip2" (stage 1 or 2, `model` + `data`), "flamingo"
(`flamingo` + `datasets`) or "eve" (stage 1, 2 or 3, `eve` + `data`). Each kind has a small build
function and its data streams below; the loss is the model's own (VLModel.training_loss) and the loop
is shared. A Flamingo recipe mixes datasets as the paper does: every optimizer step accumulates the
gradient of sum_m lambda_m * loss_m over ALL datasets m (not one dataset per step, round-robin), and
logs each loss_m.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from dataclasses import asdict, astuple, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from vlbridge.core import dist
from vlbridge.core.backbones import local_dir
from vlbridge.core.config import from_dict, save_json
from vlbridge.data.batches import BatchStream, DataConfig, FeatureCache, ProcessorStream, ShardStream, make_pool
from vlbridge.data.interleaved import DocumentData, DocumentStream, make_source
from vlbridge.models.blip2.configuration import Blip2Config
from vlbridge.models.blip2.convert_transformers import init_qformer_from_bert
from vlbridge.models.blip2.modeling import Blip2, create_blip2
from vlbridge.models.blip2.processing import Blip2Processor
from vlbridge.models.eve.modeling import EVE, EVEConfig, EVEProcessor, create_eve
from vlbridge.models.flamingo.modeling import Flamingo, FlamingoConfig, FlamingoProcessor, create_flamingo
from vlbridge.training.checkpoint import Loggers, full_model, load_trainer_state, load_weights, save_checkpoint

log = logging.getLogger("vlbridge.training.train")
ASSETS = Path(__file__).parents[1] / "assets"
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
    model_kind: str = "blip2"  # "blip2" (model, data, stage), "flamingo" (flamingo, datasets), "eve" (eve, data, stage)
    # BLIP-2: 1 (ITC+ITM+ITG) or 2 (LM loss through the frozen LLM). EVE: 1 (pre-align: patch embedding,
    # projector and PAL train, LM frozen), 2 (generative pre-training: all but the teacher), 3 (SFT).
    stage: int = 1
    model: Blip2Config = field(default_factory=Blip2Config)
    flamingo: FlamingoConfig | None = None
    # EVE. With init_from the checkpoint's architecture is kept and only pal_weight and the prompts are
    # taken from here (they change between stages).
    eve: EVEConfig | None = None
    init_from: str = ""  # a checkpoint to start from (a later stage starts from the previous one's)
    # BLIP-2 stage 1 without init_from: a BERT checkpoint (hub id or directory) the fresh Q-Former's text
    # path starts from, as the paper's starts from bert-base-uncased (hf_blip2.init_qformer_from_bert)
    qformer_init: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    datasets: list[DocumentData] = field(default_factory=list)  # Flamingo: the mixture, lambda_m = weight
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss_weights: LossWeights = field(default_factory=LossWeights)  # BLIP-2 stage 1 only
    steps: int = 1000
    batch_size: int = 32  # BLIP-2, per rank (a Flamingo dataset has its own batch_size)
    grad_accum: int = 1
    precision: str = "bf16"  # bf16 autocast (CPU and GPU) or fp32
    seed: int = 0
    out_dir: str = "runs/blip2"
    save_every: int = 0  # checkpoint every N steps for resume (0: only at the end)
    log_every: int = 10
    cache_features: bool = False  # run the frozen encoder once over the pool and train on stored features
    grad_checkpointing: bool = False
    # Under torchrun: "ddp" (replicas, gradients all-reduced) or "fsdp" (FSDP2 fully_shard: each transformer
    # block sharded over the ranks and gathered only while it runs). One process ignores it.
    parallel: str = "ddp"
    tensorboard: bool = False
    wandb: bool = False
    device: str = "auto"

    def __post_init__(self):
        if self.model_kind not in ("blip2", "flamingo", "eve"):
            raise ValueError(f"model_kind {self.model_kind!r}: expected 'blip2', 'flamingo' or 'eve'")
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel {self.parallel!r}: expected 'ddp' or 'fsdp'")
        if self.qformer_init and (self.model_kind != "blip2" or self.stage != 1 or self.init_from):
            raise ValueError(
                "qformer_init starts a fresh BLIP-2 stage-1 Q-Former from BERT: it needs model_kind "
                "'blip2', stage 1 and no init_from (a later stage starts from the previous one)"
            )
        if self.model_kind == "eve" and (self.stage not in (1, 2, 3) or (self.eve is None and not self.init_from)):
            raise ValueError("an eve recipe needs stage 1, 2 or 3 and `eve` (an EVEConfig) or init_from")
        if not all(math.isfinite(x) and x >= 0 for x in astuple(self.loss_weights)):
            raise ValueError(f"loss_weights must be finite and >= 0, got {self.loss_weights}")
        if self.loss_weights != LossWeights() and (self.model_kind != "blip2" or self.stage != 1):
            raise ValueError(
                "loss_weights weigh BLIP-2's stage-1 losses (ITC, ITM, ITG): they need model_kind 'blip2' and stage 1"
            )
        # from_dict builds nested dataclasses, not lists of them: the datasets arrive as dicts
        self.datasets = [d if isinstance(d, DocumentData) else from_dict(DocumentData, d) for d in self.datasets]
        if self.model_kind == "flamingo" and (self.flamingo is None or not self.datasets):
            raise ValueError("a flamingo recipe needs `flamingo` (a FlamingoConfig) and `datasets`")
        if len({d.name for d in self.datasets}) != len(self.datasets):
            raise ValueError(f"dataset names must be unique: {[d.name for d in self.datasets]}")


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
    for c in (cfg.model.vision, cfg.model.lm, *flamingo, *eve):
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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr at the last step."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    t = (step - o.warmup_steps) / max(cfg.steps - o.warmup_steps, 1)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def build_model(cfg: TrainConfig):
    return {"blip2": build_blip2, "flamingo": build_flamingo, "eve": build_eve}[cfg.model_kind](cfg)


def build_blip2(cfg: TrainConfig) -> tuple[Blip2, Blip2Processor]:
    if cfg.stage == 1:
        if cfg.init_from:
            return Blip2.from_pretrained(cfg.init_from), Blip2Processor.from_pretrained(cfg.init_from)
        model, processor = create_blip2(cfg.model)
        if cfg.qformer_init:
            init_qformer_from_bert(model.qformer, cfg.qformer_init)
        return model, processor
    if cfg.model.lm is None:
        raise ValueError("a stage-2 recipe needs model.lm")
    if cfg.init_from:  # the stage-1 Q-Former, a fresh projection into this LM, no stage-1 heads
        model = Blip2.from_pretrained(cfg.init_from, lm=cfg.model.lm)
        for name in ("caption_prompt", "vqa_prompt", "qformer_question"):
            setattr(model.config, name, getattr(cfg.model, name))
    else:
        model, _ = create_blip2(cfg.model)
    model.drop_text_branch()  # keeps the Q-Former's text side with qformer_question
    return model, Blip2Processor.from_config(model.config)


def build_flamingo(cfg: TrainConfig) -> tuple[Flamingo, FlamingoProcessor]:
    if cfg.init_from:
        return Flamingo.from_pretrained(cfg.init_from), FlamingoProcessor.from_pretrained(cfg.init_from)
    return create_flamingo(cfg.flamingo)


def build_eve(cfg: TrainConfig) -> tuple[EVE, EVEProcessor]:
    """Stage 1 from the recipe (fresh patch embedding), later stages from the previous stage's
    checkpoint; the teacher is loaded only while PAL has weight. Logs what trains in this stage."""
    if not cfg.init_from:
        model, processor = create_eve(cfg.eve if cfg.eve.pal_weight > 0 else replace(cfg.eve, teacher=None))
    else:
        pal_weight = (cfg.eve or EVE.read_config(local_dir(cfg.init_from))).pal_weight
        model = EVE.from_pretrained(cfg.init_from, load_teacher=pal_weight > 0)
        processor = EVEProcessor.from_pretrained(cfg.init_from)
        if cfg.eve is not None:
            for name in ("pal_weight", "caption_prompt", "vqa_prompt"):
                setattr(model.config, name, getattr(cfg.eve, name))
    if model.config.pal_weight > 0 and model.pal is None:
        raise ValueError("pal_weight > 0 needs a teacher (eve.teacher) to align to")
    return model, processor


def build_streams(cfg: TrainConfig, model, processor, out: Path) -> dict[str, tuple[float, object]]:
    """{dataset name: (loss weight, stream with .batch(step, micro))}. BLIP-2: one unnamed stream of
    this rank's slices."""
    rank, world_size = dist.world()
    if cfg.model_kind == "flamingo":
        if cfg.cache_features:
            raise ValueError("cache_features is for BLIP-2 recipes only")
        return {
            d.name: (d.weight, DocumentStream(make_source(d), processor, d.batch_size, cfg.seed, i, rank, world_size))
            for i, d in enumerate(cfg.datasets)
        }
    if cfg.model_kind == "blip2" and cfg.stage == 1 and cfg.data.source == "vqa":
        raise ValueError("BLIP-2 stage 1 learns from image-text pairs: give captions (coco, karpathy, jsonl, csv)")
    prompts = (model.config.caption_prompt, model.config.vqa_prompt)
    question = cfg.model_kind == "blip2" and cfg.stage == 2 and model.config.qformer_question
    if cfg.data.source == "webdataset":  # streamed: no pool to cache features of or to index
        if cfg.model_kind != "blip2" or cfg.cache_features:
            raise ValueError("webdataset shards stream BLIP-2 training batches, without cache_features")
        return {
            "": (
                1.0,
                ShardStream(
                    cfg.data,
                    processor,
                    cfg.batch_size,
                    cfg.grad_accum,
                    cfg.stage,
                    prompts,
                    cfg.seed,
                    rank,
                    world_size,
                    question,
                ),
            )
        }
    pool = make_pool(cfg.data)
    cache = None
    if cfg.model_kind == "eve":
        if cfg.cache_features:
            raise ValueError("cache_features: EVE has no frozen encoder in front of the LM to cache")
        return {
            "": (
                1.0,
                ProcessorStream(pool, processor, cfg.batch_size, cfg.grad_accum, prompts, cfg.seed, rank, world_size),
            )
        }
    if cfg.cache_features:  # rank 0 computes and stores the features, then the others load them
        if rank > 0:
            dist.barrier()
        cache = FeatureCache.build(model.vision, pool, processor, out.parent / "feature-cache")
        if rank == 0:
            dist.barrier()
    return {
        "": (
            1.0,
            BatchStream(
                pool,
                processor,
                cfg.batch_size,
                cfg.grad_accum,
                cfg.stage,
                prompts,
                cfg.seed,
                cache,
                rank,
                world_size,
                question,
            ),
        )
    }


class Objective(torch.nn.Module):
    """The model with its training loss as forward(batch, generator) -> (loss, logged parts).
    DistributedDataParallel only syncs gradients of work done in forward(), and FSDP only gathers the
    root's parameters around forward(); BLIP-2 stage 1 trains through pretrain_losses, not Blip2.forward."""

    def __init__(self, model, cfg: TrainConfig):
        super().__init__()
        self.model = model
        # a recipe's loss_weights are checked by TrainConfig to be BLIP-2 stage 1's; None: the model's own
        self.loss_weights = asdict(cfg.loss_weights) if cfg.loss_weights != LossWeights() else None

    def forward(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        return self.model.training_loss(batch, generator, self.loss_weights)


def step_generator(seed: int, step: int, micro: int, device) -> torch.Generator:
    """The RNG of one micro-batch's random draws (ITM hard negatives): the same on every rank, and the
    same for 1 or N processes and after a resume."""
    seed = int(np.random.SeedSequence([seed, 17, step, micro]).generate_state(1)[0])
    return torch.Generator(device).manual_seed(seed)


def accumulate(model, streams: dict, step: int, cfg: TrainConfig, autocast, device) -> tuple[float, dict, int]:
    """Forward and backward over all of one optimizer step's micro-batches: the gradient of
    sum_m weight_m * mean_micro(loss_m), every dataset m in every step (Flamingo's mixing). Returns the
    weighted loss, the parts averaged over micro-batches (loss_<dataset> per named dataset) and the
    number of samples, all of this rank. model: the model, or (torchrun) its Objective wrapped in DDP or
    sharded by FSDP."""
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    objective = model if ddp or isinstance(model, Objective) else Objective(model, cfg)
    loss_sum, parts_sum, seen = 0.0, {}, 0
    backwards = len(streams) * cfg.grad_accum
    for d, (ds, (weight, stream)) in enumerate(streams.items()):
        for micro in range(cfg.grad_accum):
            batch = {k: v.to(device) for k, v in stream.batch(step, micro).items()}
            # DDP all-reduces gradients once a step, in the last backward: the others accumulate locally.
            last = d * cfg.grad_accum + micro == backwards - 1
            with objective.no_sync() if ddp and not last else contextlib.nullcontext():
                with autocast:
                    loss, parts = objective(batch, step_generator(cfg.seed, step, micro, device))
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite loss {loss.item()} at step {step} ({ds or 'data'}, parts {parts})"
                    )
                (weight * loss / cfg.grad_accum).backward()
            loss_sum += weight * loss.item() / cfg.grad_accum
            if ds:
                parts[f"loss_{ds}"] = loss.item()
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / cfg.grad_accum
            seen += len(next(iter(batch.values())))
    return loss_sum, parts_sum, seen


def train(cfg: TrainConfig, callback=None, callback_every: int = 0) -> Path:
    """Run a recipe; returns the directory of the final model.

    callback(step, model, processor, elapsed_s) -> dict, if given, runs every `callback_every` steps and at the
    end (e.g. a quick evaluation); what it returns is logged with the step. It gets the model in
    eval mode; training resumes in train mode. Under torchrun only rank 0 logs, saves and calls it; under
    FSDP it gets rank 0's CPU copy of the model, and every rank must be given the callback (the model is
    gathered for it).
    """
    from tqdm import tqdm

    rank, world_size, device = dist.init_from_env(cfg.device)
    master = rank == 0
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if master:
        save_json(cfg, out / "recipe.json")

    model, processor = build_model(cfg)
    resume = out / "last" if (out / "last" / "trainer_state.json").exists() else None
    if resume is not None:  # the weights now, into the whole model; the optimizer state once it exists
        load_weights(resume, model)
    fsdp = world_size > 1 and cfg.parallel == "fsdp"
    # Under FSDP no rank holds the whole model: rank 0 keeps this CPU copy (one more model in host memory)
    # to write checkpoints and the final model with the gathered trained values (full_model).
    writer = copy.deepcopy(model) if fsdp and master else None
    model.to(device)
    if cfg.precision == "bf16" and device.type == "cpu" and model.lm is not None:
        # Gradients flow through the frozen LM (to the soft prompt / the gated blocks); its fused attention
        # kernel is slow in bf16 backward on CPU (see qformer.attention), the eager path is the same math.
        model.lm.set_attn_implementation("eager")
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    name = f"{model.model_type} stage {cfg.stage}"
    model.freeze_for_stage(cfg.stage)  # logs what trains
    counts = model.parameter_counts()
    log.info("%s: trainable %s / frozen %s parameters", name, f"{counts['trainable']:,}", f"{counts['frozen']:,}")

    streams = build_streams(cfg, model, processor, out)

    step_model = model
    if fsdp:
        step_model = dist.fully_shard_blocks(Objective(model, cfg), device, model.fsdp_blocks())
    elif world_size > 1:
        # Only trainable parameters take part (the frozen backbones have requires_grad False).
        ids = [device] if device.type == "cuda" else None
        step_model = torch.nn.parallel.DistributedDataParallel(Objective(model, cfg), device_ids=ids)
    if world_size > 1:
        log.info(
            "data-parallel (%s) over %d ranks: global batch = %d x per-rank batch x grad_accum %d",
            cfg.parallel,
            world_size,
            world_size,
            cfg.grad_accum,
        )
    # After sharding: FSDP replaces the parameters by DTensor shards, and the optimizer steps those.
    opt = torch.optim.AdamW(
        model.param_groups(cfg.optim.weight_decay, cfg.optim.gate_lr_scale), lr=cfg.optim.lr, betas=cfg.optim.betas
    )
    start = 0
    if resume is not None:
        start = load_trainer_state(resume, opt)
        log.info("resumed from %s at step %d", resume, start)
    loggers = Loggers(cfg, out) if master else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    model.train()
    t0, seen, warned_cut = time.time(), 0, False
    for step in tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=name, disable=not master):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg) * g.get("lr_scale", 1.0)
        loss_sum, parts_sum, n = accumulate(step_model, streams, step, cfg, autocast, device)
        seen += n * world_size
        grad_norm = None
        if cfg.optim.clip_grad > 0:
            grad_norm = dist.clip_grad_norm([p for g in opt.param_groups for p in g["params"]], cfg.optim.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            means = dist.mean_over_ranks({"loss": loss_sum, **parts_sum})  # every rank takes part
            if master:
                row = {
                    "step": step + 1,
                    **means,
                    "lr": opt.param_groups[0]["lr"],
                    "grad_norm": grad_norm,
                    "samples_per_s": seen / (time.time() - t0),
                    "elapsed_s": time.time() - t0,
                }
                cut = getattr(processor, "num_truncated", 0)  # Q-Former texts cut to max_text_length so far
                if cut:
                    row["texts_truncated"] = cut
                    if not warned_cut:
                        log.warning(
                            "Q-Former texts longer than max_text_length are being cut (%d so far, counted "
                            "as texts_truncated in the log)",
                            cut,
                        )
                        warned_cut = True
                loggers.write(row)
        last = step + 1 == cfg.steps
        if callback is not None and ((callback_every and (step + 1) % callback_every == 0) or last):
            tc = time.time()
            full = full_model(model, writer)  # under FSDP every rank takes part in the gather
            if master:
                full.eval()
                loggers.write({"step": step + 1, "elapsed_s": tc - t0, **callback(step + 1, full, processor, tc - t0)})
                full.train()
            t0 += time.time() - tc  # elapsed_s and samples_per_s count training time only
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(out / "last", step + 1, model, opt, processor, writer)
    final = out / "final"
    full = full_model(model, writer)
    if master:
        loggers.close()
        full.save_pretrained(final, processor=processor)
        log.info("saved %s", final)
    dist.barrier()  # the other ranks return once the final model is on disk
    dist.shutdown()
    return final


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(
        prog="vlbridge train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("recipe", help="recipe JSON file, or the name of a shipped recipe")
    p.add_argument("overrides", nargs="*", help="key.sub=value (value parsed as JSON)")
    args = p.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("vlbridge").setLevel(logging.INFO)
    train(load_recipe(args.recipe, args.overrides))


if __name__ == "__main__":
    main()
