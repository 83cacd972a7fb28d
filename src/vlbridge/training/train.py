"""One training entry point:  vlbridge train RECIPE.json [key.sub=value ...]

Reads top to bottom: recipe -> model (frozen backbones, logged trainable counts) -> data -> AdamW
with warm-up + cosine -> loop (grad accumulation, clipping, bf16 autocast) -> checkpoints with exact
resume (checkpoint.py, rundir.py) -> final model. Logs to <out_dir>/log.jsonl; tensorboard / wandb when asked
(lazy imports).

1 or N processes: under `torchrun --nproc_per_node N -m vlbridge.training.train RECIPE` (any recipe)
each rank takes its slice of the same global batch (batch_size, and a Flamingo dataset's batch_size, is
the per-rank micro-batch: global batch = batch_size * N * grad_accum) and only rank 0 logs. parallel
"ddp": every rank holds the model and DistributedDataParallel averages the gradients. parallel "fsdp":
FSDP2 shards every parameter, gradient and optimizer state over the ranks (for LMs too large to
replicate), and no rank loads a backbone whole (build, dist.materialize). Checkpoints are whole
(safetensors, gathered to rank 0) or, with checkpoint_format "sharded", written by every rank (DCP); a
run resumes from either on any number of processes and either parallel mode.

`model_kind` says what a recipe builds: "blip2" (stage 1 or 2, `model` + `data`), "flamingo"
(`flamingo` + `datasets`) or "eve" (stage 1, 2 or 3, `eve` + `data`). Each kind has a small build
function and its data streams below; the loss is the model's own (VLModel.training_loss) and the loop
is shared. A Flamingo recipe mixes datasets as the paper does: every optimizer step accumulates the
gradient of sum_m lambda_m * loss_m over ALL datasets m (not one dataset per step, round-robin), and
logs each loss_m.

Nothing is lost silently (docs/reliability.md): a recipe is type- and range-checked when read; a run
locks its out_dir, resumes only a checkpoint of the same recipe (checkpoint.open_run), writes
checkpoints atomically; a step with a non-finite loss or gradient norm is skipped and counted, never
applied or saved; SIGINT / SIGTERM end the current step, save a checkpoint and exit 130 / 143.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from vlbridge.core import dist
from vlbridge.core.backbones import deferred_weights
from vlbridge.core.config import ConfigError, from_dict, to_dict
from vlbridge.training.build import build_model, build_streams, log_init_from
from vlbridge.training.checkpoint import (
    ResumeRefused,
    Writer,
    full_model,
    load_sharded,
    load_trainer_state,
    load_weights,
    save_checkpoint,
    write_final,
)
from vlbridge.training.logs import Loggers
from vlbridge.training.recipe import LossWeights, TrainConfig, load_recipe, recipe_identity
from vlbridge.training.rundir import OutDirLocked, open_run

log = logging.getLogger("vlbridge.training.train")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr at the last step."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    t = (step - o.warmup_steps) / max(cfg.steps - o.warmup_steps, 1)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


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
                # a non-finite loss still goes backward (DDP's all-reduce needs every rank's): its step is
                # skipped after the gradient norm is taken
                (weight * loss / cfg.grad_accum).backward()
            loss_sum += weight * loss.item() / cfg.grad_accum
            if ds:
                parts[f"loss_{ds}"] = loss.item()
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v / cfg.grad_accum
            seen += len(next(iter(batch.values())))
    return loss_sum, parts_sum, seen


class StopRequest:
    """SIGINT / SIGTERM during the loop ask it to finish the current step, save a checkpoint and exit
    130 / 143. A second signal gets the handler that was there before (stop at once)."""

    def __init__(self):
        self.signum, self.previous = 0, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only the main thread gets signals
            for s in (signal.SIGINT, signal.SIGTERM):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self.previous[signum] or signal.SIG_DFL)
        log.warning("%s: finishing this step, then saving a checkpoint (again to stop at once)", _signame(signum))

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler or signal.SIG_DFL)


def _signame(signum: int) -> str:
    return signal.Signals(signum).name


def agree(flags: list[float]) -> list[float]:
    """Each flag's maximum over the ranks (every rank takes part): all ranks skip or stop together."""
    if dist.world()[1] == 1:
        return flags
    on = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"  # nccl reduces CUDA tensors only
    t = torch.tensor(flags, dtype=torch.float64, device=on)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def build(cfg: TrainConfig, fsdp: bool):
    """The recipe's model and processor, from cfg.seed (the same initial weights on every rank; DDP also
    broadcasts rank 0's). Under FSDP the backbones are built with meta parameters (backbones.deferred_weights)
    and the third value maps each of them to the file and key that dist.materialize reads this rank's rows
    of once the model is sharded; None when the whole model was loaded: not FSDP, cache_features (the
    feature cache runs the vision tower before sharding), or a model that needs its backbones' weights to
    be built (Flamingo's added token rows start as the mean of the LM's, LoRA adapters on a meta layer
    are created empty), which is built again the usual way, with a warning."""
    torch.manual_seed(cfg.seed)
    with deferred_weights(enabled=fsdp and not cfg.cache_features) as deferred:
        model, processor = build_model(cfg)
    if deferred is None:
        return model, processor, None
    sources = deferred.by_name(model)
    if sources is None:
        log.warning("this model needs its backbones' weights to be built: every rank loads them whole before sharding")
        torch.manual_seed(cfg.seed)
        model, processor = build_model(cfg)
    return model, processor, sources


def train(cfg: TrainConfig, callback=None, callback_every: int = 0) -> Path:
    """Run a recipe; returns the directory of the final model.

    callback(step, model, processor, elapsed_s) -> dict, if given, runs every `callback_every` steps and at the
    end (e.g. a quick evaluation); what it returns is logged with the step. It gets the model in
    eval mode; training resumes in train mode. Under torchrun only rank 0 logs, saves and calls it; under
    FSDP it gets rank 0's CPU copy of the model, and every rank must be given the callback (the model is
    gathered for it). A run whose out_dir already holds its finished model returns it without training.
    """
    from tqdm import tqdm

    cfg = from_dict(TrainConfig, to_dict(cfg))  # a config built in code is checked as a recipe file is
    rank, world_size, device = dist.init_from_env(cfg.device)
    master = rank == 0
    out = Path(cfg.out_dir)
    identity = recipe_identity(cfg, world_size)
    with contextlib.ExitStack() as run:
        start = run.enter_context(open_run(cfg, identity))  # locks out_dir (rank 0): where to start, or a refusal
        if start.complete:
            log.warning(
                "%s: this run is complete (step %d of %d); its model is %s", out, start.step, cfg.steps, out / "final"
            )
            dist.shutdown()
            return out / "final"
        fsdp = world_size > 1 and cfg.parallel == "fsdp"
        model, processor, sources = build(cfg, fsdp)
        # a whole checkpoint's weights now, into the whole model; a sharded one's once the model is sharded
        sharded_start = start.checkpoint is not None and start.meta.get("format") == "sharded"
        if start.checkpoint is not None:
            if not sharded_start:
                load_weights(start.checkpoint, model, sources)
        elif cfg.init_from and master:
            log_init_from(model, cfg.init_from)
        # Under FSDP no rank holds the whole model: rank 0 keeps a copy made before sharding, whose backbones
        # (when deferred) stay without values until final/ or the callback need them (checkpoint.Writer).
        writer = Writer(model, set(sources or ())) if fsdp else None
        if sources is None:  # else fully_shard moves the bridge, and dist.materialize makes the backbones on device
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
            if sources is not None:
                dist.materialize(step_model, device, {f"model.{n}": src for n, src in sources.items()})
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
        params = [p for g in opt.param_groups for p in g["params"]]
        # non-finite steps: in all, and in a row (a checkpoint carries both, so a resume counts on)
        counters = {"skipped_nonfinite": 0, "nonfinite_run": 0}
        if start.checkpoint is not None:
            meta = (
                load_sharded(start.checkpoint, model, opt)
                if sharded_start
                else load_trainer_state(start.checkpoint, opt)
            )
            counters = {k: meta.get(k, 0) for k in counters}

        def save(step: int) -> Path | None:
            return save_checkpoint(
                out,
                step,
                model,
                opt,
                processor,
                writer,
                identity=identity,
                steps=cfg.steps,
                counters=counters,
                keep_last=cfg.keep_last,
                sharded=cfg.checkpoint_format == "sharded",
            )

        loggers = run.enter_context(Loggers(cfg, out)) if master else None
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
        model.train()
        t0, seen, warned_cut, saved = time.time(), 0, False, start.step
        with StopRequest() as stop:
            bar = tqdm(range(start.step, cfg.steps), initial=start.step, total=cfg.steps, desc=name, disable=not master)
            for step in bar:
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, cfg) * g.get("lr_scale", 1.0)
                loss_sum, parts_sum, n = accumulate(step_model, streams, step, cfg, autocast, device)
                seen += n * world_size
                # clip_grad 0: the norm is still taken (scaling by 1 changes nothing), to see a non-finite one
                grad_norm = dist.clip_grad_norm(params, cfg.optim.clip_grad or math.inf)
                nonfinite, signum = agree([float(not math.isfinite(loss_sum + grad_norm)), float(stop.signum)])
                if nonfinite:  # dropped, never applied: the weights stay those of the last finite step
                    counters["skipped_nonfinite"] += 1
                    counters["nonfinite_run"] += 1
                    if master:
                        log.warning(
                            "step %d: non-finite loss or gradient norm (here loss %s, gradient norm %s): "
                            "optimizer step skipped (%d in a row, %d in all)",
                            step + 1,
                            f"{loss_sum:.4g}",
                            f"{grad_norm:.4g}",
                            counters["nonfinite_run"],
                            counters["skipped_nonfinite"],
                        )
                else:
                    opt.step()
                    counters["nonfinite_run"] = 0
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
                        if counters["skipped_nonfinite"]:
                            row["skipped_nonfinite"] = counters["skipped_nonfinite"]
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
                if counters["nonfinite_run"] >= cfg.max_nonfinite_steps:
                    raise FloatingPointError(
                        f"{counters['nonfinite_run']} steps in a row (to step {step + 1}) had a non-finite loss "
                        f"or gradient norm (max_nonfinite_steps={cfg.max_nonfinite_steps}): training stopped. "
                        f"{f'The last checkpoint (step {saved}) holds finite weights' if saved else 'No checkpoint'}"
                        "; lower optim.lr or check the data"
                    )
                last = step + 1 == cfg.steps
                if callback is not None and ((callback_every and (step + 1) % callback_every == 0) or last):
                    tc = time.time()
                    full = full_model(model, writer, whole=True)  # under FSDP every rank takes part in the gather
                    if master:
                        full.eval()
                        loggers.write(
                            {"step": step + 1, "elapsed_s": tc - t0, **callback(step + 1, full, processor, tc - t0)}
                        )
                        full.train()
                    t0 += time.time() - tc  # elapsed_s and samples_per_s count training time only
                if not last and ((cfg.save_every and (step + 1) % cfg.save_every == 0) or signum):
                    path = save(step + 1)  # the last step's model is final/
                    saved = step + 1
                if signum and not last:
                    code = 128 + int(signum)
                    if master:
                        bar.close()  # the message on a line of its own
                        print(
                            f"vlbridge train: stopped by {_signame(int(signum))} after step {step + 1} of "
                            f"{cfg.steps}; checkpoint {path}; run the same command to resume",
                            file=sys.stderr,
                        )
                    raise SystemExit(code)
        full = full_model(model, writer, whole=True)
        if master:
            final = write_final(full, processor, out, cfg.steps, identity)
            log.info("saved %s", final)
        dist.barrier()  # the other ranks return once the final model is on disk
    dist.shutdown()
    return out / "final"


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
    try:
        train(load_recipe(args.recipe, args.overrides))
    except (ConfigError, ResumeRefused, OutDirLocked, FloatingPointError) as e:  # refused or stopped: one line
        print(f"vlbridge train: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
