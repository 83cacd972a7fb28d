"""A run directory that loses nothing: atomic checkpoints, resume exact or refused, one run at a time.

    out_dir/
      .lock                    pid, host and start time of the run writing here (O_EXCL; see RunLock)
      recipe.json              the recipe as run, overrides applied
      log.jsonl                one JSON row per logged step (strict JSON: non-finite numbers are null)
      checkpoints/step-000120/ the model's save_pretrained files without the frozen backbones,
                               trainer_state.safetensors (every trainable parameter, the optimizer state,
                               the RNG) and trainer_state.json (the step, the recipe and its hash, a sha256
                               of every other file); the newest `keep_last` are kept
      last -> checkpoints/step-000120   the newest complete checkpoint (a symlink, replaced atomically)
      final/                   the trained model (save_pretrained with its processor) and run.json (the step
                               and the recipe it was trained to: a finished run is not run again)

A checkpoint (and final/) is written into a temporary folder (.NAME.tmp-PID), its files fsynced, and the
folder renamed into place: a folder named step-N is complete, whatever killed the writer and when; the
next run removes the temporary leftovers. Older checkpoints are deleted only once a newer one is
complete. Nothing pickled; nothing non-finite is ever written.

A run resumes from its newest checkpoint when the recipe's training-relevant fields (recipe_identity)
hash as the checkpoint's and its files hash as written; anything else is refused with a message naming
what differs (recipe.resume / recipe.overwrite say what to do instead). The log is cut back to the
checkpoint's step, so a resumed run's log holds every step once.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vlbridge.core import dist
from vlbridge.core.config import from_dict, to_dict

if TYPE_CHECKING:
    from vlbridge.training.recipe import TrainConfig

log = logging.getLogger("vlbridge.training.train")

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE = "trainer_state.json"  # written last into a checkpoint: it holds the hashes of the other files
FINAL_STATE = "run.json"  # in final/: the step and recipe (hash) it was trained to


class ResumeRefused(ValueError):
    """out_dir holds something this run must not continue or replace silently."""


class OutDirLocked(FileExistsError):
    """Another live run holds out_dir's lock."""


# ---------------------------------------------------------------- the recipe a run is, and its out_dir


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


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'optim.lr (0.001 -> 0.005)' for every leaf that differs."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({json.dumps(a)[:40]} -> {json.dumps(b)[:40]})")
    return out


@dataclass
class Start:
    """Where a run starts: a verified checkpoint and its trainer_state.json, or step 0."""

    checkpoint: Path | None = None
    step: int = 0
    meta: dict = field(default_factory=dict)
    complete: bool = False  # final/ holds this recipe's model at its last step: nothing to run


@contextlib.contextmanager
def open_run(cfg: TrainConfig, identity: dict):
    """Every rank enters; rank 0 locks out_dir, cleans leftovers of interrupted saves, decides where the
    run starts (prepare_out_dir) and writes recipe.json; the others get its decision, or its refusal.
    Yields the Start; the lock is released on leaving, however the run ends (kill -9 leaves it behind:
    the next run takes it over)."""
    rank, world_size = dist.world()
    out, lock, start, error = Path(cfg.out_dir), None, None, None
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = RunLock(out).acquire()
            start = prepare_out_dir(cfg, out, identity)
            write_atomic(out / "recipe.json", json.dumps(to_dict(cfg), indent=2) + "\n")
        except Exception as e:
            if lock is not None:
                lock.release()
            if world_size == 1:
                raise
            error = e
    if world_size > 1:
        box = [(start, None if error is None else f"{type(error).__name__}: {error}")]
        torch.distributed.broadcast_object_list(box, src=0)
        start, message = box[0]
        if error is not None:
            raise error
        if message is not None:
            raise ResumeRefused(f"rank 0 did not start the run: {message}")
    try:
        yield start
    finally:
        if lock is not None:
            lock.release()


def prepare_out_dir(cfg: TrainConfig, out: Path, identity: dict) -> Start:
    """Rank 0, holding the lock: what out_dir holds decides where the run starts.
    - nothing: step 0 (resume: true refuses: there is nothing to continue);
    - overwrite: true: whatever is there moves aside to <out_dir>.replaced-<time>, then step 0;
    - final/ of the same recipe (identity hash) at step `steps`: complete, nothing to run;
    - the newest checkpoint of the same recipe, its files intact, its step <= steps: resume there;
    - recipe.json (and a log, or a final/ of fewer steps) of the same recipe without a checkpoint: step 0;
    - anything else (another recipe, damaged files, final/ past `steps`, a layout without hashes):
      refused, saying why."""
    clean_leftovers(out)
    ours = [p for p in (out / n for n in ("recipe.json", "log.jsonl", "final", "last", "checkpoints")) if _exists(p)]
    if cfg.overwrite and ours:
        aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        aside.mkdir()
        for p in out.iterdir():
            if p.name != RunLock.NAME:
                p.rename(aside / p.name)
        log.warning("overwrite: the run that was in %s is moved to %s; starting afresh", out, aside)
        return Start()
    what = f"{out} holds a run"
    remedy = "use another out_dir, or overwrite: true to start afresh here (the old run is moved aside)"
    want = identity_hash(identity)
    final = _read_json(out / "final" / FINAL_STATE)
    if ((out / "last").is_dir() and not (out / "last").is_symlink()) or ((out / "final").exists() and not final):
        raise ResumeRefused(
            f"{what} written before checkpoints carried their recipe and hashes (a last/ folder, or final/ without "
            f"{FINAL_STATE}): it is not continued or replaced; {remedy}"
        )
    if final:
        if final.get("recipe_hash") != want:
            raise ResumeRefused(f"{what} of another recipe (final/; differs in {_diff(final, identity)}); {remedy}")
        if final["step"] > cfg.steps:
            raise ResumeRefused(f"{what} whose final/ is at step {final['step']}, past this recipe's steps={cfg.steps}")
        if final["step"] == cfg.steps:
            return Start(step=cfg.steps, complete=True)
    ckpts = complete_checkpoints(out)
    if ckpts:
        path = ckpts[-1]
        meta = read_meta(path)
        if meta.get("recipe_hash") != want:
            raise ResumeRefused(
                f"{what} of another recipe (checkpoint {path.name}; differs in {_diff(meta, identity)}): it is not "
                f"resumed; {remedy}"
            )
        verify_checkpoint(path, meta)
        step = meta["step"]
        if step > cfg.steps:
            raise ResumeRefused(f"{what} whose checkpoint is at step {step}, past this recipe's steps={cfg.steps}")
        if meta.get("steps", cfg.steps) != cfg.steps:
            log.warning(
                "steps changed from %d to %d: the learning-rate schedule after step %d follows the new length",
                meta["steps"],
                cfg.steps,
                step,
            )
        dropped = truncate_log(out / "log.jsonl", step)
        log.warning(
            "resuming from step %d of %d (%s, files verified)%s",
            step,
            cfg.steps,
            path,
            f"; {dropped} log rows written after it dropped (those steps run again)" if dropped else "",
        )
        return Start(path, step, meta)
    if ours:  # no checkpoint: stopped before its first save, or saves off (save_every 0)
        if not final:
            try:
                before = recipe_identity(from_dict(type(cfg), json.loads((out / "recipe.json").read_text())), 1)
            except (OSError, ValueError) as e:
                raise ResumeRefused(f"{what} whose recipe.json cannot be read ({e}); {remedy}") from e
            now = recipe_identity(cfg, 1)  # no checkpoint: no world size to match
            if identity_hash(before) != identity_hash(now):
                raise ResumeRefused(
                    f"{what} of another recipe (recipe.json; differs in {_diff(before, now)}); {remedy}"
                )
        if cfg.resume:
            raise ResumeRefused(f"resume: true, but {out} has no checkpoint to resume from")
        truncate_log(out / "log.jsonl", 0)
        log.warning("%s holds this recipe's run but no checkpoint: starting it again at step 0", out)
        return Start()
    if cfg.resume:
        raise ResumeRefused(f"resume: true, but {out} holds no run to resume")
    return Start()


def _diff(saved: dict, identity: dict) -> str:
    """What differs between a saved recipe (a checkpoint's, final/'s, or an identity) and this one."""
    return "; ".join(_differences(saved.get("recipe", saved), identity)[:6]) or "fields not recorded"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _exists(p: Path) -> bool:
    return p.exists() or p.is_symlink()


def clean_leftovers(out: Path) -> None:
    """Remove what interrupted saves left: temporary folders and files (.NAME.tmp-PID) in out_dir and
    out_dir/checkpoints. Only under the lock: no live writer owns them."""
    for parent in (out, out / "checkpoints"):
        for p in parent.glob(".*.tmp-*") if parent.is_dir() else ():
            log.warning("removing %s, left by an interrupted save", p)
            _remove(p)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def truncate_log(path: Path, step: int) -> int:
    """Keep the log rows of steps <= step (and none that a kill cut short); returns how many went."""
    if not path.exists():
        return 0
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            ok = json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            keep.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        write_atomic(path, "".join(keep))
    return dropped


class RunLock:
    """out_dir/.lock, created with O_EXCL, holding {"pid", "host", "started"}: a second run into the same
    out_dir is refused naming the holder. A lock whose pid is dead on this host (the run was killed) is
    taken over with a warning; one from another host is never taken over (its pid cannot be checked)."""

    NAME = ".lock"

    def __init__(self, out: Path):
        self.path = out / self.NAME
        self.mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def acquire(self) -> RunLock:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not self._stale(holder):
                    who = f"pid {holder['pid']} on {holder['host']} since {holder['started']}" if holder else "?"
                    raise OutDirLocked(
                        f"{self.path.parent} is in use by another run ({who}; lock {self.path}): wait for it to "
                        "end or use another out_dir (delete the lock only if that run is gone)"
                    ) from None
                log.warning("taking over the lock of a run that is gone (%s): %s", holder or "unreadable", self.path)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.mine))
                f.flush()
                os.fsync(f.fileno())
            return self
        raise OutDirLocked(f"could not take the lock {self.path}: other runs are starting into the same out_dir")

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _stale(self, holder: dict | None) -> bool:
        if holder is None:  # a kill between creating and writing it, or a lock being written just now
            with contextlib.suppress(OSError):
                return time.time() - self.path.stat().st_mtime > 30
            return True  # gone meanwhile: try again
        if holder.get("host") != self.mine["host"]:
            return False
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, KeyError, TypeError):
            return False
        return False

    def release(self) -> None:
        if self._holder() == self.mine:
            self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------- writing and reading checkpoints


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
    Bridge weights + every trainable parameter (EVE trains its LM) + optimizer state + RNG, all as
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
            "files": {str(p.relative_to(tmp)): _sha256(p) for p in _files(tmp)},
        }
        (tmp / STATE).write_text(json.dumps(meta, allow_nan=False))
        _fsync_tree(tmp)
        final = root / name
        if _exists(final):  # the same step written again (a finished run re-saved): replace it
            _remove_checkpoint(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        _remove(tmp)
        raise
    link = out / f".last.tmp-{os.getpid()}"
    link.unlink(missing_ok=True)
    try:
        os.symlink(Path("checkpoints") / name, link)
        os.replace(link, out / "last")
    except OSError:  # no symlinks here: `last` is a convenience, the newest step-N folder is what resumes
        (out / "last").unlink(missing_ok=True)
    _fsync_dir(out)
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
    _remove(tmp)


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
        _fsync_tree(tmp)
        if _exists(final):
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(out)
    except BaseException:
        _remove(tmp)
        raise
    _remove(old)
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
        if not p.is_file() or _sha256(p) != digest:
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


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_tree(root: Path) -> None:
    for p in _files(root):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for d in sorted({p.parent for p in _files(root)} | {root}, key=lambda d: -len(d.parts)):
        _fsync_dir(d)


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


# ---------------------------------------------------------------- logs


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
