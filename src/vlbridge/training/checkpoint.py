"""Training checkpoints, written atomically (files.py) and verified by their hashes before a resume; final/
written the same way. Where they live and when a run resumes from one: rundir.py. Two formats
(TrainConfig.checkpoint_format), either of which any run resumes from, on any number of processes:

- "whole": every trainable parameter, the optimizer state and the RNG (safetensors and JSON, nothing
  pickled) beside the model's save_pretrained files, written by rank 0 (under FSDP gathered to it first);
- "sharded": torch.distributed.checkpoint (DCP), every rank writing its own shards of the trainable
  parameters, the bridge and the optimizer state (torch's own format: .distcp files of tensors, read back
  with torch.load(weights_only=True), and a .metadata file that DCP pickles), rank 0 the RNG
  (rng.safetensors); DCP re-cuts the shards for the world size that loads them."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import time
import warnings
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


class Writer:
    """Under FSDP, what rank 0 writes checkpoints and the final model from: a copy of the model made before
    sharding (None on the other ranks). Its bridge is whole (small); the backbone parameters built on the
    meta device (`deferred`: their names, backbones.deferred_weights) get values only when a whole model is
    needed (final/, the callback), gathered once from the shards. Without deferred loading it is a whole
    second copy of the model, as it was before deferred loading existed."""

    def __init__(self, model, deferred: set[str]):
        self.copy = copy.deepcopy(model) if dist.world()[0] == 0 else None
        self.pending = set(deferred)  # the copy's parameters without values yet

    def full(self, model, whole: bool):
        """The copy with every trainable parameter gathered from the shards of `model` (and with `whole`
        every parameter it has no values for yet: frozen ones never change, so one gather is enough).
        Every rank must call it: the gathers are collectives."""
        wanted = {n for n, p in model.named_parameters() if p.requires_grad} | (self.pending if whole else set())
        values = {}
        for n, p in model.named_parameters():
            if n in wanted:
                value = dist.full_tensor(p)  # every rank gathers; only rank 0 keeps it
                if self.copy is not None:
                    values[n] = value
        if whole:
            self.pending = set()
        if self.copy is not None:
            assign(self.copy, values)
        return self.copy


def assign(model, values: dict[str, torch.Tensor]) -> None:
    """Write `values` ({parameter name: whole tensor}) into `model`; a meta parameter is replaced by a new
    one in every module that holds it (tied weights stay tied)."""
    new = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in values:
                continue
            if p.is_meta:
                new[id(p)] = torch.nn.Parameter(values[name].to(p.dtype), requires_grad=p.requires_grad)
            else:
                p.copy_(values[name])
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None and id(p) in new:
                module._parameters[key] = new[id(p)]


def full_model(model, writer: Writer | None, whole: bool = False):
    """The whole model, to save or evaluate: the model itself, or under FSDP rank 0's Writer copy with the
    trained values gathered from the shards (None on the other ranks). whole=False is enough for a
    checkpoint (the bridge and the trainable parameters); final/ and the callback need whole=True."""
    if not dist.is_sharded(model):
        return model
    return writer.full(model, whole)


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to write `what` when any floating tensor holds a NaN or an infinity."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise FloatingPointError(f"refusing to write {what}: non-finite values in {bad[:5]}{' ...' if bad[5:] else ''}")


def write_state(tmp: Path, identity: dict, **fields) -> None:
    """Write a checkpoint folder's STATE last: `fields`, the recipe and its hash, and the sha256 of every
    file already in the folder (what a resume verifies)."""
    meta = {
        **fields,
        "recipe_hash": identity_hash(identity),
        "recipe": identity,
        "files": {str(p.relative_to(tmp)): sha256(p) for p in files_under(tmp)},
    }
    (tmp / STATE).write_text(json.dumps(meta, allow_nan=False))


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
    sharded: bool = False,
) -> Path | None:
    """Write out_dir/checkpoints/step-N atomically and point `last` at it; keep the newest `keep_last`.
    Bridge weights + every trainable parameter (EVE trains its LM; LoRA adapters, which save_pretrained
    also writes to lm_adapter/ here) + optimizer state + RNG, all as
    safetensors/JSON (nothing pickled), written by rank 0. Whole tensors even under FSDP (gathered here:
    every rank calls this), so any world size and parallel mode can resume from it. counters: the
    non-finite step counts to resume with. Returns the checkpoint's path (rank 0). sharded: the "sharded"
    format instead (save_sharded), which every rank takes part in."""
    if sharded:
        return save_sharded(
            out, step, model, opt, identity=identity, steps=steps, counters=counters, keep_last=keep_last
        )
    if dist.world()[0] > 0 and not dist.is_sharded(model):
        return None  # DDP: rank 0's replica is the whole model
    from safetensors.torch import save_file

    full = full_model(model, writer)
    params = [p for g in opt.param_groups for p in g["params"]]
    master = dist.world()[0] == 0
    states = []
    for p in params:  # every rank gathers each state (a collective); only rank 0 keeps them
        st = {
            k: dist.full_tensor(v) if torch.is_tensor(v) else torch.tensor(v) for k, v in opt.state.get(p, {}).items()
        }
        states.append(st if master else {})
    if not master:
        return None
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_initialized():  # dropout on a GPU draws from its own generator (the same on every rank)
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    # what trains is the model's to say: rank 0's Writer copy was made before freeze_for_stage set it
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    tensors.update({f"param.{n}": p.detach().clone() for n, p in full.named_parameters() if n in trainable})
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
        write_state(tmp, identity, step=step, steps=steps, param_state=[sorted(st) for st in states], **counters)
    except BaseException:
        remove(tmp)
        raise
    return _commit(out, tmp, name, keep_last)


def _commit(out: Path, tmp: Path, name: str, keep_last: int) -> Path:
    """Rank 0: the complete checkpoint in `tmp` (trainer_state.json written last) renamed to
    checkpoints/<name>, `last` pointed at it, all but the newest keep_last removed."""
    root = out / "checkpoints"
    try:
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


def load_weights(path: Path, model, sources: dict[str, tuple[str, str]] | None = None):
    """A checkpoint's bridge weights and trainable parameters into the whole (not yet sharded) model. A
    trainable parameter still on the meta device (deferred loading: EVE's LM) is not read here: `sources`
    is pointed at the checkpoint's file instead, for dist.materialize to read each rank's rows of."""
    from safetensors import safe_open

    from vlbridge.core.weights import read_weights

    model.load_bridge_state(read_weights(path / "model.safetensors"), path)
    params = dict(model.named_parameters())
    file = str(path / "trainer_state.safetensors")
    with safe_open(file, framework="pt") as f, torch.no_grad():
        for key in f.keys():
            if not key.startswith("param."):
                continue
            name = key[len("param.") :]
            if params[name].is_meta:
                sources[name] = (file, key)
            else:
                params[name].copy_(f.get_tensor(key))


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


# ---------------------------------------------------------------- the "sharded" format (DCP)


def _sharded_state(model) -> dict[str, torch.Tensor]:
    """What a sharded checkpoint holds of the model, under its own names: every trainable parameter and
    every tensor of the bridge (FSDP shards as DTensors, which DCP writes each rank's part of)."""
    state = {f"model.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    for k, v in model.state_dict(keep_vars=True).items():
        if not k.startswith(model.backbone_prefixes):
            state.setdefault(f"model.{k}", v)
    return state


def _optimizer_state(model, opt) -> dict[str, torch.Tensor]:
    """The optimizer's state per parameter name ("optim.<name>.<exp_avg|exp_avg_sq|step>"): names, not
    positions, so that any world size and parallel mode can load it."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        f"optim.{names[id(p)]}.{k}": v if torch.is_tensor(v) else torch.tensor(v)
        for g in opt.param_groups
        for p in g["params"]
        for k, v in opt.state.get(p, {}).items()
    }


@contextlib.contextmanager
def _dcp_quiet():
    """DCP warns at every save and load in one process that it assumes one process: here that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save_sharded(out: Path, step: int, model, opt, *, identity: dict, steps: int, counters: dict, keep_last: int):
    """out_dir/checkpoints/step-N in the sharded format: every rank writes its shards into one temporary
    folder (on a file system all ranks share), rank 0 the RNG, then, once all are done, trainer_state.json
    with the hashes of every file, and renames the folder into place. Every rank calls it; rank 0 gets the
    path."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    rank = dist.world()[0]
    state = {**_sharded_state(model), **_optimizer_state(model, opt)}
    local = {k: dist.local_part(v) for k, v in state.items()}
    bad = [k for k, v in local.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if dist.any_rank(bool(bad)):
        raise FloatingPointError(
            f"refusing to write the checkpoint of step {step}: non-finite values"
            f"{f' in {bad[:5]}' if bad else ' on another rank'}"
        )
    root = out / "checkpoints"
    name = f"step-{step:06d}"
    tmp = root / f".{name}.tmp-{dist.broadcast_object(os.getpid())}"  # rank 0's pid names the folder
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    dist.barrier()
    try:
        with _dcp_quiet():  # fsyncs each file it writes
            dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp), no_dist=dist.world()[1] == 1)
        if rank == 0:
            rng = {"rng.torch": torch.get_rng_state()}
            if torch.cuda.is_initialized():
                rng["rng.cuda"] = torch.cuda.get_rng_state()
            save_file(rng, str(tmp / "rng.safetensors"))
            _test_pause()
    except BaseException:
        if rank == 0:
            remove(tmp)
        raise
    dist.barrier()  # every rank's shards are on disk
    final = None
    if rank == 0:
        try:
            params = {}
            for key in state:
                if key.startswith("optim."):
                    param, _, k = key[len("optim.") :].rpartition(".")
                    params.setdefault(param, []).append(k)
            write_state(
                tmp,
                identity,
                step=step,
                steps=steps,
                format="sharded",
                world_size=dist.world()[1],
                param_state={n: sorted(ks) for n, ks in params.items()},
                **counters,
            )
        except BaseException:
            remove(tmp)
            raise
        final = _commit(out, tmp, name, keep_last)
    dist.barrier()
    return final


def load_sharded(path: Path, model, opt) -> dict:
    """A sharded checkpoint into the model as it is now (sharded by FSDP or whole, on any number of
    ranks: DCP reads each rank's part) and its optimizer; the RNG; returns trainer_state.json. A tensor the
    checkpoint holds and the model lacks, or the other way round, is refused."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    meta = json.loads((path / STATE).read_text())
    reader = dcp.FileSystemReader(path)
    saved = reader.read_metadata().state_dict_metadata
    state = _sharded_state(model)
    missing = sorted(set(state) - set(saved))
    unexpected = sorted(k for k in saved if k.startswith("model.") and k not in state)
    if missing or unexpected:
        raise ResumeRefused(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    params = dict(model.named_parameters())
    moments = {}  # the optimizer state, allocated as the parameter it belongs to is cut; DCP fills it
    for name, keys in meta["param_state"].items():
        if name not in params:
            raise ResumeRefused(f"checkpoint {path} holds optimizer state for {name}, which the model lacks")
        p = params[name]
        moments[name] = {}
        for k in keys:
            info = saved[f"optim.{name}.{k}"]
            shape, dtype = tuple(info.size), info.properties.dtype
            value = torch.zeros_like(p, dtype=dtype) if shape == tuple(p.shape) else torch.zeros(shape, dtype=dtype)
            moments[name][k] = value
            state[f"optim.{name}.{k}"] = value
    with _dcp_quiet():
        dcp.load(state, storage_reader=reader, no_dist=dist.world()[1] == 1)
    for g in opt.param_groups:
        for p in g["params"]:
            name = next(n for n, q in params.items() if q is p)
            if name in moments:
                opt.state[p] = moments[name]
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["rng.torch"])
    if "rng.cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["rng.cuda"])
    return meta
