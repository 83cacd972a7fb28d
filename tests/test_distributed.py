"""torchrun data parallelism: 2 CPU processes (gloo) on a global batch of 2B train exactly as 1 process on it."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from vlbridge.config import to_dict
from vlbridge.testing import tiny_blip2_config
from vlbridge.train import load_recipe, train

B = 8  # per-rank micro-batch; the global batch is 2B


def _recipe(tmp_path, name, batch_size):
    # max_text_length 6 cuts every caption to the same length: ITG is each rank's token mean, averaged over
    # the ranks, which equals the global token mean only when the ranks hold as many tokens each.
    cfg = tiny_blip2_config(tmp_path / "backbones", lm=None)
    cfg.max_text_length = 6
    r = {"stage": 1, "model": to_dict(cfg), "data": {"num_samples": 96, "group_size": 4},
         "steps": 2, "batch_size": batch_size, "log_every": 1, "save_every": 1, "out_dir": str(tmp_path / name),
         "optim": {"warmup_steps": 1, "lr": 1e-3}, "precision": "fp32", "device": "cpu"}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(r))
    return path


def _log(out_dir):
    return [json.loads(x) for x in (out_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_processes_match_one_on_the_same_global_batch(tmp_path):
    one = train(load_recipe(_recipe(tmp_path, "one", 2 * B)))
    two = _recipe(tmp_path, "two", B)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "vlbridge.train", str(two)], check=True, env=env, cwd=tmp_path, timeout=120)

    a, b = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert len(a) == len(b) == 2  # rank 0 alone wrote the log
    for ra, rb in zip(a, b):
        for k in ("loss", "loss_itc", "loss_itm", "loss_itg", "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-5), k
    pa, pb = load_file(str(one / "model.safetensors")), load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert pa.keys() == pb.keys()
    # grad_norm above pins the averaged gradient. AdamW's first steps move each weight by about +-lr
    # whatever the gradient's size, so weights whose gradient is ~1e-7 (ITC nearly cancels at init) can
    # move differently by float noise: allow that on under 1% of the weights, never more than one step.
    lr, off, total = 1e-3, 0, 0
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=0, atol=lr, msg=k)
        off, total = off + int(((pb[k] - pa[k]).abs() > 1e-5).sum()), total + pa[k].numel()
    assert off < 0.01 * total, (off, total)
    # Only rank 0 wrote: one log, one checkpoint and final model, no stray files from rank 1.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_resume_on_another_world_size(tmp_path):
    """Steps 1-2 on 1 process (batch 2B), steps 3-4 resumed from its checkpoint on 2 processes (B each):
    the same global batches, so the same losses as 4 steps on 1 process."""
    train(load_recipe(_recipe(tmp_path, "straight", 2 * B), ["steps=4"]))
    straight = _log(tmp_path / "straight")
    mixed = _recipe(tmp_path, "mixed", 2 * B)
    train(load_recipe(mixed, ["steps=3", "save_every=2"]))  # checkpoint at step 2 (same learning rates so far)
    log = tmp_path / "mixed" / "log.jsonl"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:2]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "vlbridge.train", str(mixed), "steps=4", "save_every=2", f"batch_size={B}"],
                   check=True, env=env, cwd=tmp_path, timeout=120)
    resumed = _log(tmp_path / "mixed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for ra, rb in zip(straight, resumed):
        for k in ("loss", "loss_itc", "loss_itm", "loss_itg"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-5), (ra["step"], k)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_eve_two_processes_match_one(tmp_path, tiny_configs):
    """EVE stage 1 (patch embedding + PAL train, CE + PAL) under torchrun. One-word answers give every
    rank the same number of target tokens, so the mean of the ranks' losses is the global mean."""
    from vlbridge import LMConfig, VisionConfig
    from vlbridge.eve import EVEConfig

    eve = EVEConfig(lm=LMConfig(tiny_configs["gpt2"].lm.name_or_path),
                    teacher=VisionConfig(tiny_configs[None].vision.name_or_path, feature_layer=-2),
                    patch_size=4, pel_width=16, pel_heads=2, max_image_size=32, pal_layers=[1, 2])

    def recipe(name, batch_size):
        r = {"model_kind": "eve", "stage": 1, "eve": to_dict(eve), "steps": 2, "batch_size": batch_size,
             "data": {"num_samples": 64, "group_size": 1, "width": 32, "height": 32, "tasks": ["vqa"]},
             "log_every": 1, "out_dir": str(tmp_path / name), "optim": {"warmup_steps": 1, "lr": 1e-3},
             "precision": "fp32", "device": "cpu"}
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
        return tmp_path / f"{name}.json"

    train(load_recipe(recipe("one", 2 * B)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "vlbridge.train", str(recipe("two", B))], check=True, env=env, cwd=tmp_path, timeout=120)
    a, b = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        for k in ("loss", "loss_ce", "loss_pal", "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-5), (ra["step"], k)
