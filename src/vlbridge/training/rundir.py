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
import json
import logging
import os
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

from vlbridge.training.checkpoint import FINAL_STATE, ResumeRefused, complete_checkpoints, read_meta, verify_checkpoint
from vlbridge.training.files import exists, read_json, remove, write_atomic
from vlbridge.training.recipe import added_fields, identity_hash, recipe_differences, recipe_identity

log = logging.getLogger(__name__)


class OutDirLocked(FileExistsError):
    """Another live run holds out_dir's lock."""


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
    ours = [p for p in (out / n for n in ("recipe.json", "log.jsonl", "final", "last", "checkpoints")) if exists(p)]
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
    final = read_json(out / "final" / FINAL_STATE)
    if ((out / "last").is_dir() and not (out / "last").is_symlink()) or ((out / "final").exists() and not final):
        raise ResumeRefused(
            f"{what} written before checkpoints carried their recipe and hashes (a last/ folder, or final/ without "
            f"{FINAL_STATE}): it is not continued or replaced; {remedy}"
        )
    if final:
        if not same_recipe(final, identity, want):
            raise ResumeRefused(f"{what} of another recipe (final/; differs in {_diff(final, identity)}); {remedy}")
        if final["step"] > cfg.steps:
            raise ResumeRefused(f"{what} whose final/ is at step {final['step']}, past this recipe's steps={cfg.steps}")
        if final["step"] == cfg.steps:
            return Start(step=cfg.steps, complete=True)
    ckpts = complete_checkpoints(out)
    if ckpts:
        path = ckpts[-1]
        meta = read_meta(path)
        if not same_recipe(meta, identity, want):
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
            if not same_recipe({"recipe": before}, now, identity_hash(now)):
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


def same_recipe(saved: dict, identity: dict, want: str) -> bool:
    """Whether a checkpoint's (final/'s, recipe.json's) recipe is this one: the same identity hash, or a
    recipe stored before fields were added to vlbridge's configs that differs only by them, at their
    defaults (logged)."""
    if saved.get("recipe_hash") == want or saved.get("recipe") == identity:  # recipe.json: no hash stored
        return True
    added = added_fields(saved["recipe"], identity) if isinstance(saved.get("recipe"), dict) else None
    if added:
        log.info("the run's recipe predates fields added since, at their defaults here: %s", ", ".join(added))
    return bool(added)


def _diff(saved: dict, identity: dict) -> str:
    """What differs between a saved recipe (a checkpoint's, final/'s, or an identity) and this one."""
    return "; ".join(recipe_differences(saved.get("recipe", saved), identity)[:6]) or "fields not recorded"


def clean_leftovers(out: Path) -> None:
    """Remove what interrupted saves left: temporary folders and files (.NAME.tmp-PID) in out_dir and
    out_dir/checkpoints. Only under the lock: no live writer owns them."""
    for parent in (out, out / "checkpoints"):
        for p in parent.glob(".*.tmp-*") if parent.is_dir() else ():
            log.warning("removing %s, left by an interrupted save", p)
            remove(p)


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
