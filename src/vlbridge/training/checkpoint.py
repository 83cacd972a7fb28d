"""Training checkpoints: every trainable parameter, the optimizer state and the RNG (safetensors and JSON,
nothing pickled) beside the model's save_pretrained files, written atomically (files.py) and verified by
their hashes before a resume; final/ written the same way. Where they live and when a run resumes from
one: rundir.py."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path

import torch

from vlbridge.core import dist
from vlbridge.training.files import exists, files_under, fsync_dir, fsync_tree, remove, sha256
from vlbridge.training.recipe import identity_hash

log = logging.getLogger(__name__)


STEP_DIR = re.compile(r"^step-(\d+)$")


STATE = "trainer_state.json"  # written last into a checkpoint: it holds the hashes of the other files


FINAL_STATE = "run.json"  # in final/: the step and recipe (hash) it was trained to


class ResumeRefused(ValueError):
    """out_dir holds something this run must not continue or replace silently."""


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


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write `what` when any floating tensor holds a NaN or an infinity."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise FloatingPointError(f"refusing to write {what}: non-finite values in {bad[:5]}{' ...' if bad[5:] else ''}")


def save_checkpoint(
    out: Path,
    step: int,
    model,
    opt,
    processor,
    writer=None,
    *,
    identity: dict,
    steps: int,
    counters: dict,
    keep_last: int,
) -> Path | None:
    """Write out_dir/checkpoints/step-N atomically and point `last` at it; keep the newest `keep_last`.
    Bridge weights + every trainable parameter (EVE trains its LM; LoRA adapters, which save_pretrained
    also writes to lm_adapter/ here) + optimizer state + RNG, all as
    safetensors/JSON (nothing pickled), written by rank 0. Whole tensors even under FSDP (gathered here:
    every rank calls this), so any world size and parallel mode can resume from it. counters: the
    non-finite step counts to resume with. Returns the checkpoint's path (rank 0)."""
    if dist.world()[0] > 0 and not dist.is_sharded(model):
        return None  # DDP: rank 0's replica is the whole model
    from safetensors.torch import save_file

    full = full_model(model, writer)
    params = [p for g in opt.param_groups for p in g["params"]]
    states = [
        {k: dist.full_tensor(v) if torch.is_tensor(v) else torch.tensor(v) for k, v in opt.state.get(p, {}).items()}
        for p in params
    ]
    if dist.world()[0] > 0:
        return None
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_initialized():  # dropout on a GPU draws from its own generator (the same on every rank)
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    tensors.update({f"param.{n}": p.detach().clone() for n, p in full.named_parameters() if p.requires_grad})
    tensors.update({f"opt.{i}.{k}": v.clone() for i, st in enumerate(states) for k, v in st.items()})
    check_finite({**full.bridge_state_dict(), **tensors}, f"the checkpoint of step {step}")
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = root / f".{name}.tmp-{os.getpid()}"
    try:
        full.save_pretrained(tmp, processor=processor, include_backbones=False)
        _test_pause()
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "trainer_state.safetensors"))
        _test_pause()
        meta = {
            "step": step,
            "steps": steps,
            "param_state": [sorted(st) for st in states],
            **counters,
            "recipe_hash": identity_hash(identity),
            "recipe": identity,
            "files": {str(p.relative_to(tmp)): sha256(p) for p in files_under(tmp)},
        }
        (tmp / STATE).write_text(json.dumps(meta, allow_nan=False))
        fsync_tree(tmp)
        final = root / name
        if exists(final):  # the same step written again (a finished run re-saved): replace it
            _remove_checkpoint(final)
        os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        remove(tmp)
        raise
    link = out / f".last.tmp-{os.getpid()}"
    link.unlink(missing_ok=True)
    try:
        os.symlink(Path("checkpoints") / name, link)
        os.replace(link, out / "last")
    except OSError:  # no symlinks here: `last` is a convenience, the newest step-N folder is what resumes
        (out / "last").unlink(missing_ok=True)
    fsync_dir(out)
    for old in complete_checkpoints(out)[:-keep_last]:
        _remove_checkpoint(old)
    return final


def _test_pause() -> None:
    """Fault-injection tests widen the window a kill can land in a save: VLBRIDGE_TEST_SAVE_PAUSE seconds."""
    pause = float(os.environ.get("VLBRIDGE_TEST_SAVE_PAUSE", "0"))
    if pause > 0:
        time.sleep(pause)


def _remove_checkpoint(path: Path) -> None:
    """Rename first, then delete: a kill midway leaves a temporary folder, never a step-N missing files."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    os.rename(path, tmp)
    remove(tmp)


def write_final(full, processor, out: Path, step: int, identity: dict) -> Path:
    """out_dir/final, written beside it and renamed into place (an existing final/ is replaced only once
    the new one is complete), with run.json: the step and the recipe it was trained to."""
    check_finite(full.bridge_state_dict(), "the final model")
    final, tmp, old = out / "final", out / f".final.tmp-{os.getpid()}", out / f".final.old.tmp-{os.getpid()}"
    try:
        full.save_pretrained(tmp, processor=processor)
        _test_pause()
        meta = {"step": step, "recipe_hash": identity_hash(identity), "recipe": identity}
        (tmp / FINAL_STATE).write_text(json.dumps(meta, allow_nan=False))
        fsync_tree(tmp)
        if exists(final):
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(out)
    except BaseException:
        remove(tmp)
        raise
    remove(old)
    return final


def complete_checkpoints(out: Path) -> list[Path]:
    """out_dir/checkpoints/step-N folders, oldest first (only complete ones ever get that name)."""
    root = out / "checkpoints"
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))] if root.is_dir() else []
    return [p for _, p in sorted(found) if (p / STATE).exists()]


def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / STATE).read_text())
    except (OSError, ValueError) as e:
        raise ResumeRefused(f"checkpoint {path} cannot be read ({e}): delete it to resume from the one before") from e


def verify_checkpoint(path: Path, meta: dict) -> None:
    """Every file of the checkpoint hashes as when it was written (none missing)."""
    files = meta.get("files")
    if not files:
        raise ResumeRefused(f"checkpoint {path} carries no file hashes: it cannot be verified")
    for rel, digest in files.items():
        p = path / rel
        if not p.is_file() or sha256(p) != digest:
            how = "is missing" if not p.is_file() else "changed since it was written"
            raise ResumeRefused(
                f"checkpoint {path} is damaged ({rel} {how}): delete that folder to resume from the one before it"
            )


def load_weights(path: Path, model):
    """A checkpoint's bridge weights and trainable parameters into the whole (not yet sharded) model."""
    from safetensors.torch import load_file

    model.load_bridge_state(load_file(str(path / "model.safetensors")), path)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in load_file(str(path / "trainer_state.safetensors")).items():
            if key.startswith("param."):
                params[key[len("param.") :]].copy_(value)


def load_trainer_state(path: Path, opt) -> dict:
    """A checkpoint's optimizer state (cut into this rank's shards under FSDP) and RNG; returns its
    trainer_state.json (step, non-finite step counts)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / "trainer_state.safetensors"))
    meta = json.loads((path / STATE).read_text())
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, (p, keys) in enumerate(zip(params, meta["param_state"])):
        if keys:
            opt.state[p] = {k: dist.shard_like(tensors[f"opt.{i}.{k}"], p) for k in keys}
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta
