"""Training loses nothing silently (docs/reliability.md, "Training"): faults injected into tiny runs.

- kill -9 of a training process at random points, in steps and inside checkpoint saves (the test hook
  VLBRIDGE_TEST_SAVE_PAUSE slows each save down so that a kill lands in it), then the same command again:
  every restart says where it resumes, and the finished run's weights and log equal an uninterrupted
  run's, bit for bit;
- SIGTERM / SIGINT: the step ends, a checkpoint is saved, exit 143 / 130 with one line; the resume is exact;
- disk full (OSError ENOSPC) midway through a save: the previous checkpoint intact, the resume exact;
- NaN losses and gradients, and a diverging learning rate: steps skipped and counted, nothing non-finite
  saved, the log strict JSON;
- a second run into a locked out_dir, another recipe into a used one, bad recipe values: each refused
  with one message, before any model is built.

`pytest -s` prints the tally of trials and faults (the numbers quoted in docs/reliability.md).
"""

import collections
import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlbridge.core.config import ConfigError, to_dict
from vlbridge.testing import tiny_blip2_config
from vlbridge.training import checkpoint as ck
from vlbridge.training import rundir
from vlbridge.training import train as tr
from vlbridge.training.train import load_recipe, train

TALLY = collections.Counter()
STEPS = 6


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    print("\nfault injection (training): " + ", ".join(f"{k} {v}" for k, v in sorted(TALLY.items())))


@pytest.fixture(scope="module")
def model_dict(tmp_path_factory):
    return to_dict(tiny_blip2_config(tmp_path_factory.mktemp("backbones"), lm=None))


def _recipe(tmp_path, name, model, **kw) -> Path:
    """tests/test_train.py's tiny BLIP-2 stage-1 run, a checkpoint every 2 steps."""
    r = {
        "stage": 1,
        "model": model,
        "data": {"num_samples": 96, "group_size": 4},
        "steps": STEPS,
        "batch_size": 8,
        "log_every": 1,
        "save_every": 2,
        "out_dir": str(tmp_path / name),
        "optim": {"warmup_steps": 2, "lr": 1e-3},
        "precision": "fp32",
        "device": "cpu",
    }
    r.update(kw)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(r))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dict):
    """An uninterrupted in-process run of the recipe the in-process faults are injected into."""
    tmp = tmp_path_factory.mktemp("reference")
    final = train(load_recipe(_recipe(tmp, "ref", model_dict)))
    return final.parent


def _rows(out: Path) -> list[dict]:
    """log.jsonl parsed strictly: NaN / Infinity are not JSON."""

    def refuse(constant):
        raise ValueError(f"log.jsonl holds {constant}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in (out / "log.jsonl").read_text().splitlines()]


def _losses(out: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in _rows(out) if "loss" in r]


def _assert_same_weights(a: Path, b: Path):
    """Bit for bit: the same tensors, the same values."""
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _assert_all_finite(root: Path) -> int:
    """Every floating tensor of every safetensors file under root is finite; returns how many files."""
    files = list(root.rglob("*.safetensors"))
    for f in files:
        for k, v in load_file(str(f)).items():
            assert not v.is_floating_point() or bool(torch.isfinite(v).all()), (f, k)
    return len(files)


def _verify_all(out: Path) -> list[int]:
    """Every complete checkpoint's files hash as written; their steps."""
    steps = []
    for path in ck.complete_checkpoints(out):
        meta = ck.read_meta(path)
        ck.verify_checkpoint(path, meta)
        steps.append(meta["step"])
    return steps


def _leftovers(out: Path) -> list[Path]:
    return [*out.glob(".*.tmp-*"), *(out / "checkpoints").glob(".*.tmp-*")]


# ---------------------------------------------------------------- kill -9


def _env(pause: float) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLBRIDGE_TEST_SAVE_PAUSE": str(pause)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _launch(recipe: Path, log: Path, pause: float = 0.0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vlbridge.training.train", str(recipe)]
    return subprocess.Popen(cmd, env=_env(pause), stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 90.0) -> bool:
    """Poll until ready() (True) or the process ended (False)."""
    t = time.time()
    while time.time() - t < timeout:
        if ready():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    raise TimeoutError("the training process neither got there nor ended")


def _newest(out: Path) -> int:
    found = ck.complete_checkpoints(out)
    return int(found[-1].name.split("-")[1]) if found else 0


def _lock_pid(out: Path) -> int | None:
    try:
        return json.loads((out / ".lock").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def test_kill_9_anywhere_then_the_same_command_resumes_exactly(tmp_path, model_dict, reference):
    """Five kills, each aimed (at a random moment) at a phase of the run: start-up, a training step,
    inside a checkpoint save (twice), inside the write of final/. After each kill the checkpoints on disk
    verify; each restart resumes from the newest one and says so (taking over the dead run's lock); a
    second run started while one trains is refused by the lock. The run that finally completes has the
    weights and the log (every step once, strict JSON) of a run never interrupted, bit for bit."""
    steps, rng = STEPS, random.Random(0)
    recipe = _recipe(tmp_path, "run", model_dict, save_every=1)  # the reference's recipe, saving every step
    out = tmp_path / "run"

    aims = ["startup", "step", "save", "save", "final"]
    landed = collections.Counter()
    for trial, aim in enumerate([*aims, "finish"]):
        newest, started, locked = _newest(out), (out / "recipe.json").exists(), (out / ".lock").exists()
        complete = (out / "final" / "run.json").exists()  # a kill after final/ was renamed into place
        err = tmp_path / f"run-{trial}.err"
        proc = _launch(recipe, err, pause=0.0 if aim == "finish" else 0.05)
        if aim == "startup":
            time.sleep(rng.uniform(0.5, 2.0))
        elif aim == "step":
            # a second run, started while this one holds the lock (setting up), is refused naming it
            assert _wait_for(proc, lambda pid=proc.pid: _lock_pid(out) == pid)
            with pytest.raises(rundir.OutDirLocked, match=f"pid {proc.pid} on"):
                train(load_recipe(recipe))
            TALLY["concurrent runs refused by the lock"] += 1
            # just after a checkpoint is complete: the next step is running
            assert _wait_for(proc, lambda n=newest: _newest(out) > n)
            time.sleep(rng.uniform(0, 0.02))
        elif aim == "save":
            assert _wait_for(proc, lambda pid=proc.pid: bool(list((out / "checkpoints").glob(f".step-*.tmp-{pid}"))))
            time.sleep(rng.uniform(0, 0.1))
        elif aim == "final":
            assert _wait_for(proc, lambda pid=proc.pid: bool(list(out.glob(f".final.tmp-{pid}"))))
            time.sleep(rng.uniform(0, 0.05))
        if aim != "finish":
            in_save = out.exists() and any(p.name.endswith(f".tmp-{proc.pid}") for p in _leftovers(out))
            proc.kill()  # SIGKILL
            assert proc.wait(timeout=30) == -signal.SIGKILL
            landed[
                "kills inside a write (checkpoint or final/)" if in_save else "kills elsewhere (start-up, a step)"
            ] += 1
            if out.exists():
                TALLY["checkpoints verified after a kill"] += len(_verify_all(out))  # complete ones stay complete
        else:
            assert proc.wait(timeout=180) == 0, err.read_text()[-2000:]
        said = err.read_text()
        if aim == "startup":  # killed before it got to say anything
            continue
        if complete:
            assert f"this run is complete (step {steps} of {steps})" in said, said[-2000:]
        elif newest:  # every restart says where it resumes
            assert f"resuming from step {newest} of {steps}" in said, said[-2000:]
            TALLY["restarts resumed from the newest checkpoint"] += 1
        elif started:
            assert "starting it again at step 0" in said, said[-2000:]
            TALLY["restarts from step 0 (killed before the first checkpoint)"] += 1
        if locked:  # the killed run's lock: its pid is dead, so the restart takes it over, saying so
            assert "taking over the lock of a run that is gone" in said, said[-2000:]
            TALLY["dead runs' locks taken over"] += 1

    TALLY["kill -9 trials"] += len(aims)
    TALLY.update(landed)
    _assert_same_weights(reference / "final", out / "final")
    assert _losses(out) == _losses(reference) and [r[0] for r in _losses(out)] == list(range(1, steps + 1))
    assert not _leftovers(out) and not (out / ".lock").exists()
    TALLY["interrupted runs finished bit-exact"] += 1


# ---------------------------------------------------------------- SIGTERM / SIGINT


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_ends_the_step_saves_and_exits(tmp_path, model_dict, reference, sig, capsys):
    """The signal arrives during step 2 (from the callback): step 3 runs to its end, a checkpoint of step
    3 is written, the run exits 128 + signal with one line; the same command resumes exactly."""
    recipe = _recipe(tmp_path, "run", model_dict, save_every=0)

    def send(step, model, processor, elapsed):
        os.kill(os.getpid(), sig)
        return {}

    with pytest.raises(SystemExit) as e:
        train(load_recipe(recipe), callback=send, callback_every=2)
    assert e.value.code == 128 + sig
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vlbridge train:")]
    assert said == [
        f"vlbridge train: stopped by {sig.name} after step 3 of {STEPS}; checkpoint "
        f"{tmp_path / 'run' / 'checkpoints' / 'step-000003'}; run the same command to resume"
    ]
    assert signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler)  # handlers restored
    final = train(load_recipe(recipe))
    _assert_same_weights(reference / "final", final)
    assert _losses(tmp_path / "run") == _losses(reference)
    TALLY[f"{sig.name} stops saved and resumed bit-exact"] += 1


# ---------------------------------------------------------------- disk full


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, model_dict, reference, monkeypatch, caplog):
    """ENOSPC after a partial write, in turn: the second checkpoint's model file, its trainer state, and
    final/'s weights. The run stops with the OSError; the checkpoints before stay whole and verified, no
    partial file is left, and the same command resumes from the last good one to the uninterrupted result."""
    import safetensors.torch as st

    real = st.save_file
    # save_file calls: 1-2 the step-2 checkpoint, 3-4 step 4's, 5 final/'s bridge
    for fail_at, kept in ((3, [2]), (4, [2]), (5, [2, 4])):
        calls = [0]

        def full(tensors, filename, metadata=None, fail_at=fail_at, calls=calls):
            calls[0] += 1
            if calls[0] == fail_at:
                Path(filename).write_bytes(b"\0" * 64)  # what fitted
                raise OSError(errno.ENOSPC, "No space left on device", filename)
            return real(tensors, filename, metadata=metadata)

        recipe = _recipe(tmp_path, f"full{fail_at}", model_dict)
        out = tmp_path / f"full{fail_at}"
        monkeypatch.setattr(st, "save_file", full)
        with pytest.raises(OSError) as e:
            train(load_recipe(recipe))
        monkeypatch.setattr(st, "save_file", real)
        assert e.value.errno == errno.ENOSPC
        assert _verify_all(out) == kept and not _leftovers(out) and not (out / "final").exists()
        assert os.readlink(out / "last") == f"checkpoints/step-{kept[-1]:06d}"
        caplog.clear()
        with caplog.at_level("WARNING", logger="vlbridge.training.train"):
            final = train(load_recipe(recipe))
        assert f"resuming from step {kept[-1]} of {STEPS}" in caplog.text
        _assert_same_weights(reference / "final", final)
        assert _losses(out) == _losses(reference)
        TALLY["disk-full faults (previous checkpoint intact, resumed bit-exact)"] += 1


# ---------------------------------------------------------------- non-finite steps


class _NanGrad(torch.autograd.Function):
    """The identity forward; a NaN gradient backward (a finite loss whose gradient is not)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_nonfinite_steps_are_skipped_counted_and_never_saved(tmp_path, model_dict, monkeypatch):
    """Step 2's loss is NaN, step 4's loss finite with a NaN gradient: both steps skipped (Adam stepped once
    by step 2, twice by step 4), counted in the log (skipped_nonfinite, loss / grad_norm null), never in a
    checkpoint or the final model; the log stays strict JSON."""
    from vlbridge.models.blip2.modeling import Blip2

    poison, now = {2: "loss", 4: "grad"}, {}
    real_generator, real_loss = tr.step_generator, Blip2.training_loss

    def generator(seed, step, micro, device):
        now["step"] = step + 1
        return real_generator(seed, step, micro, device)

    def loss(self, batch, generator=None, loss_weights=None):
        value, parts = real_loss(self, batch, generator, loss_weights)
        kind = poison.get(now["step"])
        return (value * float("nan") if kind == "loss" else _NanGrad.apply(value) if kind == "grad" else value), parts

    monkeypatch.setattr(tr, "step_generator", generator)
    monkeypatch.setattr(Blip2, "training_loss", loss)
    train(load_recipe(_recipe(tmp_path, "nan", model_dict)))
    out = tmp_path / "nan"
    rows = _rows(out)
    assert [r.get("skipped_nonfinite", 0) for r in rows] == [0, 1, 1, 2, 2, 2]
    assert rows[1]["loss"] is None and rows[1]["grad_norm"] is None
    assert math.isfinite(rows[3]["loss"]) and rows[3]["grad_norm"] is None
    for step, adam_steps in ((2, 1), (4, 2)):
        path = out / "checkpoints" / f"step-{step:06d}"
        state = load_file(str(path / "trainer_state.safetensors"))
        assert float(state["opt.0.step"]) == adam_steps
        assert json.loads((path / "trainer_state.json").read_text())["skipped_nonfinite"] == step // 2
    assert _assert_all_finite(out) == 6  # two checkpoints (2 files each), final/: the bridge and the vision tower
    TALLY["NaN injections (skipped, counted, nothing non-finite saved)"] += 2


def test_a_diverging_run_stops_after_max_nonfinite_steps(tmp_path, model_dict):
    """The issue's lr=1e3: the first step blows the weights up, every later gradient norm overflows; after
    max_nonfinite_steps in a row the run stops with an error, its checkpoints all finite, its log JSON."""
    recipe = _recipe(tmp_path, "boom", model_dict, optim={"lr": 1e3, "warmup_steps": 1}, max_nonfinite_steps=3)
    with pytest.raises(FloatingPointError, match=r"3 steps in a row .*\(max_nonfinite_steps=3\)"):
        train(load_recipe(recipe, ["steps=12"]))
    out = tmp_path / "boom"
    assert [r.get("skipped_nonfinite", 0) for r in _rows(out)] == [0, 1, 2, 3]
    assert _assert_all_finite(out) == 2 and not (out / "final").exists()
    TALLY["diverging runs stopped by max_nonfinite_steps"] += 1


def test_a_nonfinite_model_is_never_written(tmp_path, model_dict):
    from vlbridge import create_blip2
    from vlbridge.core.config import from_dict
    from vlbridge.models.blip2.configuration import Blip2Config

    model, processor = create_blip2(from_dict(Blip2Config, model_dict))
    with torch.no_grad():
        model.qformer.query_tokens[0, 0, 0] = float("inf")
    opt = torch.optim.AdamW(model.param_groups(0.0))
    with pytest.raises(FloatingPointError, match="non-finite values in .*query_tokens"):
        ck.save_checkpoint(tmp_path, 1, model, opt, processor, identity={}, steps=2, counters={}, keep_last=2)
    with pytest.raises(FloatingPointError, match="final model"):
        ck.write_final(model, processor, tmp_path, 2, {})
    assert not list(tmp_path.rglob("*.safetensors"))
    TALLY["non-finite saves refused"] += 2


# ---------------------------------------------------------------- out_dir: recipes and locks


def test_another_recipe_into_a_used_out_dir_is_refused(tmp_path, model_dict, reference, caplog):
    """A finished run (checkpoints at 2 and 4, final/ at 6), copied: the same recipe returns its model
    without training; another learning rate, fewer steps, resume: true with another recipe, a damaged
    checkpoint, a layout without hashes are refused naming the reason; overwrite: true starts afresh
    with the old run moved aside."""
    import shutil

    out = tmp_path / "ref"
    shutil.copytree(reference, out, symlinks=True)
    recipe = _recipe(tmp_path, "ref", model_dict)
    log_before = (out / "log.jsonl").read_text()
    with caplog.at_level("WARNING", logger="vlbridge.training.train"):
        assert train(load_recipe(recipe)) == out / "final"
    assert "this run is complete (step 6 of 6)" in caplog.text and (out / "log.jsonl").read_text() == log_before
    refusals = [
        (["optim.lr=5e-3"], r"another recipe \(final/; differs in optim.lr \(0.001 -> 0.005\)\)"),
        (["optim.lr=5e-3", "resume=true"], "another recipe"),
        (["data.num_samples=64", "steps=8"], r"another recipe \(final/; differs in data.num_samples \(96 -> 64\)\)"),
        (["batch_size=4"], r"differs in global_batch_size \(8 -> 4\)"),
        (["steps=4"], "final/ is at step 6, past this recipe's steps=4"),
    ]
    for overrides, message in refusals:
        with pytest.raises(ck.ResumeRefused, match=message):
            train(load_recipe(recipe, overrides))
    with pytest.raises(SystemExit) as e:  # the command line: one line, exit 1
        tr.main([str(recipe), "optim.lr=5e-3"])
    assert e.value.code == 2

    damaged = out / "checkpoints" / "step-000004" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"\1")
    with pytest.raises(ck.ResumeRefused, match="step-000004 is damaged .model.safetensors changed"):
        train(load_recipe(recipe, ["steps=8"]))
    (out / "final" / "run.json").unlink()  # final/ without its record: written before hashes
    with pytest.raises(ck.ResumeRefused, match="written before checkpoints carried"):
        train(load_recipe(recipe))
    empty = _recipe(tmp_path, "empty", model_dict)
    with pytest.raises(ck.ResumeRefused, match="holds no run to resume"):
        train(load_recipe(empty, ["resume=true"]))
    (tmp_path / "begun").mkdir()  # another recipe's run stopped before its first checkpoint
    (tmp_path / "begun" / "recipe.json").write_text(json.dumps(to_dict(load_recipe(recipe, ["optim.lr=0.5"]))))
    with pytest.raises(ck.ResumeRefused, match=r"recipe.json; differs in optim.lr"):
        train(load_recipe(recipe, [f"out_dir={tmp_path / 'begun'}"]))
    TALLY["different or unverifiable runs refused"] += len(refusals) + 5

    final = train(load_recipe(recipe, ["overwrite=true", "steps=2", "save_every=0"]))
    assert [r[0] for r in _losses(out)] == [1, 2] and (final / "run.json").exists()
    (aside,) = tmp_path.glob("ref.replaced-*")
    assert (aside / "checkpoints" / "step-000004").is_dir() and len(_losses(aside)) == STEPS
    TALLY["overwrites (old run moved aside)"] += 1


def test_the_lock_names_its_holder_and_is_taken_over_when_stale(tmp_path, caplog):
    held = rundir.RunLock(tmp_path).acquire()
    with pytest.raises(rundir.OutDirLocked, match=f"in use by another run \\(pid {os.getpid()} on "):
        rundir.RunLock(tmp_path).acquire()
    held.release()
    assert not (tmp_path / ".lock").exists()

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = {"pid": int(gone.stdout), "host": held.mine["host"], "started": "earlier"}
    (tmp_path / ".lock").write_text(json.dumps(dead))
    with caplog.at_level("WARNING", logger="vlbridge.training.train"):
        rundir.RunLock(tmp_path).acquire().release()
    assert "taking over the lock of a run that is gone" in caplog.text
    (tmp_path / ".lock").write_text(json.dumps({**dead, "host": "elsewhere"}))  # its pid cannot be checked
    with pytest.raises(rundir.OutDirLocked, match="on elsewhere since earlier"):
        rundir.RunLock(tmp_path).acquire()
    TALLY["lock checks"] += 3


# ---------------------------------------------------------------- values checked when read


BAD = [
    (["steps=abc"], "TrainConfig.steps: expected int, got 'abc'"),
    (["steps=-5"], "TrainConfig.steps: expected >= 1, got -5"),
    (["grad_accum=0"], "TrainConfig.grad_accum: expected >= 1, got 0"),
    (["log_every=0"], "TrainConfig.log_every: expected >= 1, got 0"),
    (["save_every=-1"], "TrainConfig.save_every: expected >= 0 (0: none, the last step's model is final/), got -1"),
    (["batch_size=0"], "TrainConfig.batch_size: expected >= 1, got 0"),
    (["keep_last=0"], "TrainConfig.keep_last: expected >= 1, got 0"),
    (["max_nonfinite_steps=0"], "TrainConfig.max_nonfinite_steps: expected >= 1, got 0"),
    (["seed=true"], "TrainConfig.seed: expected int, got True"),
    (["precision=fp16"], "TrainConfig.precision: 'fp16' is not supported"),
    (["precision=fp8"], "TrainConfig.precision: expected 'bf16' or 'fp32', got 'fp8'"),
    (["optim.lr=0"], "TrainConfig.optim.lr: expected a finite number > 0, got 0.0"),
    (["optim.lr=x"], "TrainConfig.optim.lr: expected float, got 'x'"),
    (["optim.warmup_steps=1.5"], "TrainConfig.optim.warmup_steps: expected int, got 1.5"),
    (["optim.betas=[0.9]"], "TrainConfig.optim.betas: expected tuple[float, float] (2 values), got [0.9]"),
    (['model.qformer.num_layers="4"'], "TrainConfig.model.qformer.num_layers: expected int, got '4'"),
    (["data.tasks=caption"], "TrainConfig.data.tasks: expected list[str], got 'caption'"),
    (["cache_features=1"], "TrainConfig.cache_features: expected bool, got 1"),
    (["stage=3"], "TrainConfig.stage: a blip2 model trains in stages [1, 2], got 3"),
    (["device=gpu0"], "TrainConfig.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu0'"),
    (["resume=true", "overwrite=true"], "TrainConfig.resume and TrainConfig.overwrite: expected at most one true"),
]


def test_bad_values_are_refused_when_read(tmp_path, model_dict, monkeypatch):
    """Each bad value: one ConfigError (a ValueError), one line naming its key, before any model is built."""

    def never(cfg):
        raise AssertionError("a model was built from a bad recipe")

    monkeypatch.setattr(tr, "build_model", never)
    recipe = _recipe(tmp_path, "bad", model_dict)
    for overrides, message in BAD:
        with pytest.raises(ConfigError) as e:
            train(load_recipe(recipe, overrides))
        assert str(e.value).startswith(message) and "\n" not in str(e.value), (overrides, str(e.value))
    cfg = load_recipe(recipe)
    cfg.steps = "abc"  # set in code, past load_recipe: train() checks it as a file is checked
    with pytest.raises(ConfigError, match="^TrainConfig.steps: expected int, got 'abc'"):
        train(cfg)

    from vlbridge.core.base import read_model_config
    from vlbridge.models.blip2.configuration import Blip2Config

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "blip2", "qformer": {"num_layers": "4"}}))
    with pytest.raises(ConfigError, match=r"^Blip2Config.qformer.num_layers: expected int, got '4'"):
        read_model_config(Blip2Config, config, "blip2")
    TALLY["bad values refused when read"] += len(BAD) + 2


# ---------------------------------------------------------------- init_from


def test_init_from_a_stage2_model_keeps_what_it_trained(tmp_path, caplog):
    """Stage 2 from a stage-2 model with the same LM keeps its trained lm_proj; with another LM the
    projection starts afresh, and the log names it."""
    from vlbridge import create_blip2
    from vlbridge.training.build import build_blip2, log_init_from

    cfg = tiny_blip2_config(tmp_path / "b", lm="gpt2")
    model, processor = create_blip2(cfg)
    with torch.no_grad():
        model.lm_proj.weight.normal_()  # "trained": not what a fresh projection starts as
    model.save_pretrained(tmp_path / "s2", processor=processor)
    data = {"num_samples": 32, "group_size": 1, "tasks": ["caption"]}
    recipe = _recipe(tmp_path, "again", to_dict(cfg), stage=2, init_from=str(tmp_path / "s2"), data=data)

    same, _ = build_blip2(load_recipe(recipe))
    assert torch.equal(same.lm_proj.weight, model.lm_proj.weight)
    assert not any(k.startswith("lm_proj.") for k in log_init_from(same, str(tmp_path / "s2"))["fresh"])

    other = to_dict(tiny_blip2_config(tmp_path / "b2", lm="opt").lm)
    with caplog.at_level("INFO", logger="vlbridge.training.train"):
        fresh, _ = build_blip2(load_recipe(recipe, [f"model.lm={json.dumps(other)}"]))
        report = log_init_from(fresh, str(tmp_path / "s2"))
    assert not torch.equal(fresh.lm_proj.weight, model.lm_proj.weight)
    assert report["fresh"] == ["lm_proj.weight", "lm_proj.bias"]
    assert "another LM than model.lm: lm_proj starts afresh" in caplog.text
    assert "initialised afresh: lm_proj.weight, lm_proj.bias" in caplog.text
    TALLY["init_from checks"] += 2


def test_a_run_from_before_new_recipe_fields_resumes_only_at_their_defaults(tmp_path, model_dict, reference, caplog):
    """A run written by an earlier vlbridge stored a recipe without fields added since: it resumes when each
    such field is at its default (the earlier behaviour), and is refused when one is not."""
    import shutil

    from vlbridge.training.recipe import identity_hash

    out = tmp_path / "ref"
    shutil.copytree(reference, out, symlinks=True)
    for state in [out / "final" / "run.json", *out.glob("checkpoints/*/trainer_state.json")]:
        saved = json.loads(state.read_text())
        del saved["recipe"]["data"]["turns"], saved["recipe"]["model"]["hard_negatives"]
        saved["recipe_hash"] = identity_hash(saved["recipe"])  # what that version wrote
        state.write_text(json.dumps(saved))
    recipe = _recipe(tmp_path, "ref", model_dict)
    with caplog.at_level("INFO", logger="vlbridge.training.train"):
        assert train(load_recipe(recipe)) == out / "final"
    assert "predates fields added since, at their defaults here: data.turns, model.hard_negatives" in caplog.text
    with pytest.raises(ck.ResumeRefused, match=r"differs in data.turns \(\"<absent>\" -> 2\)"):
        train(load_recipe(recipe, ["data.turns=2", "steps=8"]))
    with pytest.raises(ck.ResumeRefused, match="another recipe"):  # an old field changed is still another recipe
        train(load_recipe(recipe, ["optim.lr=5e-3"]))
