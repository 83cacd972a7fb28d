"""checkpoint_format "sharded": torch.distributed.checkpoint written by every rank, atomic and verified as
the whole format is, resumed exactly on the same or another number of processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from vlbridge.core.config import ConfigError, to_dict
from vlbridge.training.recipe import load_recipe
from vlbridge.training.rundir import ResumeRefused
from vlbridge.training.train import train

B = 8  # per-rank micro-batch of the 2-process runs


def _recipe(tmp_path, tiny_configs, name, batch_size, **kw) -> str:
    """BLIP-2 stage 2 through the tiny GPT-2, FSDP under torchrun. One-word VQA answers: every rank holds
    as many target tokens, so the mean of the ranks' losses is the global mean. min_lr = lr: the same
    learning rates whatever `steps` a run sets."""
    r = {
        "stage": 2,
        "model": to_dict(tiny_configs["gpt2"]),
        "parallel": "fsdp",
        "checkpoint_format": "sharded",
        "steps": 4,
        "batch_size": batch_size,
        "data": {"num_samples": 64, "group_size": 1, "width": 32, "height": 32, "tasks": ["vqa"]},
        "log_every": 1,
        "out_dir": str(tmp_path / name),
        "optim": {"warmup_steps": 1, "lr": 1e-3, "min_lr": 1e-3},
        "precision": "fp32",
        "device": "cpu",
        **kw,
    }
    (tmp_path / f"{name}.json").write_text(json.dumps(r))
    return str(tmp_path / f"{name}.json")


def _torchrun(cwd, recipe, *overrides):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run(
        [*run, "-m", "vlbridge.training.train", recipe, *overrides], check=True, env=env, cwd=cwd, timeout=240
    )


def _log(out_dir) -> list[dict]:
    return [json.loads(x) for x in (out_dir / "log.jsonl").read_text().splitlines()]


def _truncate_log(out_dir, rows):
    log = out_dir / "log.jsonl"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:rows]))


def test_checkpoint_format_is_checked(tmp_path, tiny_configs):
    assert load_recipe(_recipe(tmp_path, tiny_configs, "r", B)).checkpoint_format == "sharded"
    with pytest.raises(ConfigError, match="TrainConfig.checkpoint_format: expected 'whole' or 'sharded'"):
        load_recipe(tmp_path / "r.json", ["checkpoint_format=dcp"])


def test_one_process_resumes_exactly_and_refuses_a_damaged_checkpoint(tmp_path, tiny_configs):
    """1 process: a run cut at step 2 and resumed from its sharded checkpoint logs what an uninterrupted
    run does, bit for bit; a checkpoint whose shard changed is refused, naming the file."""
    train(load_recipe(_recipe(tmp_path, tiny_configs, "straight", 2 * B)))
    cut = _recipe(tmp_path, tiny_configs, "cut", 2 * B)
    train(load_recipe(cut, ["steps=3", "save_every=2"]))
    step2 = tmp_path / "cut" / "checkpoints" / "step-000002"
    names = {p.name for p in step2.iterdir()}
    assert {"trainer_state.json", "rng.safetensors", ".metadata"} <= names and any(n.endswith(".distcp") for n in names)
    assert json.loads((step2 / "trainer_state.json").read_text())["format"] == "sharded"
    train(load_recipe(cut, ["steps=4"]))  # final/ is at step 3: it resumes from step 2
    straight, resumed = _log(tmp_path / "straight"), _log(tmp_path / "cut")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for ra, rb in zip(straight, resumed):
        assert (ra["loss"], ra["grad_norm"]) == (rb["loss"], rb["grad_norm"]), ra["step"]

    shard = next(p for p in step2.iterdir() if p.name.endswith(".distcp"))
    damaged = _recipe(tmp_path, tiny_configs, "damaged", 2 * B)
    shutil.copytree(tmp_path / "cut", tmp_path / "damaged", symlinks=True)
    shutil.rmtree(tmp_path / "damaged" / "final")
    for p in (tmp_path / "damaged" / "checkpoints").iterdir():
        if p.name != "step-000002":
            shutil.rmtree(p)
    target = tmp_path / "damaged" / "checkpoints" / "step-000002" / shard.name
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ResumeRefused, match=f"{shard.name} changed since it was written"):
        train(load_recipe(damaged, ["steps=4"]))


def test_nonfinite_values_are_never_written(tmp_path, tiny_configs):
    from vlbridge import create_blip2
    from vlbridge.training.checkpoint import save_sharded

    model, _ = create_blip2(tiny_configs["gpt2"])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    with torch.no_grad():
        model.lm_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="refusing to write the checkpoint of step 1: non-finite values"):
        save_sharded(tmp_path, 1, model, opt, identity={}, steps=2, counters={}, keep_last=2)
    assert not list((tmp_path / "checkpoints").iterdir()) if (tmp_path / "checkpoints").exists() else True


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_saved_on_two_ranks_resumes_on_two_and_on_one(tmp_path, tiny_configs):
    """A checkpoint written by 2 FSDP ranks (each its own shards) at step 2: resumed on 2 ranks, the losses
    of an uninterrupted 2-rank run, bit for bit; resumed on 1 process (DCP joins the shards), the same
    losses up to the float noise of 1 process against 2."""
    _torchrun(tmp_path, _recipe(tmp_path, tiny_configs, "straight", B))
    cut = _recipe(tmp_path, tiny_configs, "cut", B)
    _torchrun(tmp_path, cut, "steps=3", "save_every=2")
    meta = json.loads((tmp_path / "cut" / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert meta["world_size"] == 2
    shutil.copytree(tmp_path / "cut", tmp_path / "one", symlinks=True)
    one = _recipe(tmp_path, tiny_configs, "one", 2 * B)

    _torchrun(tmp_path, cut, "steps=4")
    train(load_recipe(one, ["steps=4"]))
    straight = _log(tmp_path / "straight")
    on_two, on_one = _log(tmp_path / "cut"), _log(tmp_path / "one")
    assert [r["step"] for r in on_two] == [r["step"] for r in on_one] == [1, 2, 3, 4]
    for ra, rb, rc in zip(straight, on_two, on_one):
        assert (ra["loss"], ra["grad_norm"]) == (rb["loss"], rb["grad_norm"]), ra["step"]
        for k in ("loss", "grad_norm"):
            assert rc[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-5), (ra["step"], k)
