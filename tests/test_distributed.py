"""torchrun data parallelism: 2 CPU processes (gloo) on a global batch of 2B train exactly as 1 process on it,
with DDP or FSDP2, and checkpoints resume across world sizes and parallel modes."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from vlbridge.core.config import from_dict, to_dict
from vlbridge.testing import tiny_blip2_config
from vlbridge.training.train import TrainConfig, load_recipe, train

B = 8  # per-rank micro-batch; the global batch is 2B


def _recipe(tmp_path, name, batch_size):
    # max_text_length 6 cuts every caption to the same length: ITG is each rank's token mean, averaged over
    # the ranks, which equals the global token mean only when the ranks hold as many tokens each.
    cfg = tiny_blip2_config(tmp_path / "backbones", lm=None)
    cfg.max_text_length = 6
    r = {
        "stage": 1,
        "model": to_dict(cfg),
        "data": {"num_samples": 96, "group_size": 4},
        "steps": 2,
        "batch_size": batch_size,
        "log_every": 1,
        "save_every": 1,
        "out_dir": str(tmp_path / name),
        "optim": {"warmup_steps": 1, "lr": 1e-3},
        "precision": "fp32",
        "device": "cpu",
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(r))
    return path


def _log(out_dir):
    return [json.loads(x) for x in (out_dir / "log.jsonl").read_text().splitlines()]


def _torchrun(tmp_path, recipe, *overrides):
    """vlbridge.training.train RECIPE on 2 gloo processes (a fresh process group, whatever pytest runs under)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "vlbridge.training.train",
            str(recipe),
            *overrides,
        ],
        check=True,
        env=env,
        cwd=tmp_path,
        timeout=180,
    )


def _assert_same_logs(tmp_path, keys, one="one", two="two"):
    """The 2-process run logged what the 1-process run did, step by step (rank 0 alone wrote its log)."""
    a, b = _log(tmp_path / one), _log(tmp_path / two)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        for k in keys:
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-5), (ra["step"], k)


def _truncate_log(out_dir, rows):
    """Drop the rows logged after the checkpoint a resumed run starts from."""
    log = out_dir / "log.jsonl"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:rows]))


def _assert_same_params(one, two, lr):
    """Final weights of two runs agree. Logged grad_norms pin the averaged gradient; AdamW's first steps
    move each weight by about +-lr whatever the gradient's size, so weights whose gradient is ~1e-7 (ITC
    nearly cancels at init) can move differently by float noise: allow that on under 1% of the weights,
    never more than one step."""
    pa, pb = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert pa.keys() == pb.keys()
    off, total = 0, 0
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=0, atol=lr, msg=k)
        off, total = off + int(((pb[k] - pa[k]).abs() > 1e-5).sum()), total + pa[k].numel()
    assert off < 0.01 * total, (off, total)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_on_the_same_global_batch(tmp_path, parallel):
    """BLIP-2 stage 1: ITC negatives gathered with gradient; under FSDP each Q-Former layer runs three
    times a step (ITC, ITM, ITG from the cached query keys/values) between gathers of its shards."""
    one = train(load_recipe(_recipe(tmp_path, "one", 2 * B)))
    _torchrun(tmp_path, _recipe(tmp_path, "two", B), f"parallel={parallel}")

    _assert_same_logs(tmp_path, ("loss", "loss_itc", "loss_itm", "loss_itg", "grad_norm"))
    _assert_same_params(one, tmp_path / "two" / "final", lr=1e-3)
    # Only rank 0 wrote: one log, one checkpoint and final model, no stray files from rank 1.
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_ddp_gradient_accumulation_syncs_once_and_matches_one_process(tmp_path):
    """grad_accum 2: DDP skips the all-reduce of the first micro-batch (no_sync) and averages the
    accumulated gradients in the second; 2 processes of B/2 then train as 1 process of B, micro by micro."""
    one = train(load_recipe(_recipe(tmp_path, "one", B), ["grad_accum=2"]))
    _torchrun(tmp_path, _recipe(tmp_path, "two", B // 2), "grad_accum=2", "parallel=ddp")
    _assert_same_logs(tmp_path, ("loss", "loss_itc", "loss_itm", "loss_itg", "grad_norm"))
    _assert_same_params(one, tmp_path / "two" / "final", lr=1e-3)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_resume_on_another_world_size(tmp_path):
    """Steps 1-2 on 1 process (batch 2B), steps 3-4 resumed from its checkpoint on 2 processes (B each):
    the same global batches, so the same losses as 4 steps on 1 process."""
    train(load_recipe(_recipe(tmp_path, "straight", 2 * B), ["steps=4"]))
    straight = _log(tmp_path / "straight")
    mixed = _recipe(tmp_path, "mixed", 2 * B)
    train(load_recipe(mixed, ["steps=3", "save_every=2"]))  # checkpoint at step 2 (same learning rates so far)
    _truncate_log(tmp_path / "mixed", 2)
    _torchrun(tmp_path, mixed, "steps=4", "save_every=2", f"batch_size={B}")
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
    from vlbridge.models.eve.modeling import EVEConfig

    eve = EVEConfig(
        lm=LMConfig(tiny_configs["gpt2"].lm.name_or_path),
        teacher=VisionConfig(tiny_configs[None].vision.name_or_path, feature_layer=-2),
        patch_size=4,
        pel_width=16,
        pel_heads=2,
        max_image_size=32,
        pal_layers=[1, 2],
    )

    def recipe(name, batch_size):
        r = {
            "model_kind": "eve",
            "stage": 1,
            "eve": to_dict(eve),
            "steps": 2,
            "batch_size": batch_size,
            "data": {"num_samples": 64, "group_size": 1, "width": 32, "height": 32, "tasks": ["vqa"]},
            "log_every": 1,
            "out_dir": str(tmp_path / name),
            "optim": {"warmup_steps": 1, "lr": 1e-3},
            "precision": "fp32",
            "device": "cpu",
        }
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
        return tmp_path / f"{name}.json"

    train(load_recipe(recipe("one", 2 * B)))
    _torchrun(tmp_path, recipe("two", B))
    _assert_same_logs(tmp_path, ("loss", "loss_ce", "loss_pal", "grad_norm"))


def _stage2_recipe(tmp_path, tiny_configs, name, batch_size, **kw):
    """BLIP-2 stage 2 through the frozen tiny GPT-2, sharded with FSDP under torchrun. One-word VQA
    answers give every rank as many target tokens, so the mean of the ranks' LM losses is the global
    mean. min_lr = lr: a constant rate after the 1-step warm-up, the same whatever `steps` a run sets."""
    r = {
        "stage": 2,
        "model": to_dict(tiny_configs["gpt2"]),
        "parallel": "fsdp",
        "steps": 2,
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
    return tmp_path / f"{name}.json"


def test_parallel_mode_round_trips_and_is_checked(tmp_path, tiny_configs):
    cfg = load_recipe(_stage2_recipe(tmp_path, tiny_configs, "r", B))
    assert cfg.parallel == "fsdp" and from_dict(TrainConfig, to_dict(cfg)).parallel == "fsdp"
    assert load_recipe(_recipe(tmp_path, "d", B)).parallel == "ddp"  # the default
    with pytest.raises(ValueError, match="parallel"):
        load_recipe(tmp_path / "r.json", ["parallel=zero3"])


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_fsdp_two_processes_match_one(tmp_path, tiny_configs):
    """FSDP2 shards the frozen LM's blocks, the vision tower's and the Q-Former's layers over 2 ranks: the
    same losses, clipped grad norms (computed on the sharded DTensor grads) and final weights as 1
    process on the combined batch, and rank 0 writes whole checkpoints and a final model with backbones."""
    one = train(load_recipe(_stage2_recipe(tmp_path, tiny_configs, "one", 2 * B, save_every=1)))
    _torchrun(tmp_path, _stage2_recipe(tmp_path, tiny_configs, "two", B, save_every=1))
    _assert_same_logs(tmp_path, ("loss", "grad_norm"))
    _assert_same_params(one, tmp_path / "two" / "final", lr=1e-3)
    for sub in ("final", "last"):  # the same files: the sharded run's model is whole on disk
        assert sorted(p.name for p in (tmp_path / "two" / sub).iterdir()) == sorted(
            p.name for p in (tmp_path / "one" / sub).iterdir()
        )
    sa = load_file(str(tmp_path / "one" / "last" / "trainer_state.safetensors"))
    sb = load_file(str(tmp_path / "two" / "last" / "trainer_state.safetensors"))
    assert sa.keys() == sb.keys() and any(k.endswith(".exp_avg_sq") for k in sa)
    for k in sa:
        if k != "rng.torch":
            assert sb[k].shape == sa[k].shape, k  # Adam moments gathered whole, not one rank's shard


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_question_reading_stage2_two_processes_match_one(tmp_path, tiny_configs, parallel):
    """A Q-Former that reads the question (qformer_question): on VQA (one-word answers, so the ranks' LM
    token means average to the global one) 2 processes match 1. On captions only, the text side runs on
    padding that no query sees, so every trainable parameter still gets a gradient (zero) each step, as
    DDP expects: without that its reducer stops the second step."""
    model = {**to_dict(tiny_configs["gpt2"]), "qformer_question": True}
    one = train(load_recipe(_stage2_recipe(tmp_path, tiny_configs, "one", 2 * B, parallel=parallel, model=model)))
    _torchrun(tmp_path, _stage2_recipe(tmp_path, tiny_configs, "two", B, parallel=parallel, model=model))
    _assert_same_logs(tmp_path, ("loss", "grad_norm"))
    _assert_same_params(one, tmp_path / "two" / "final", lr=1e-3)
    assert "qformer.word_embeddings.weight" in load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    data = {"num_samples": 64, "group_size": 1, "width": 32, "height": 32, "tasks": ["caption"]}
    _torchrun(
        tmp_path,
        _stage2_recipe(tmp_path, tiny_configs, "captions", B, parallel=parallel, model=model, data=data, steps=3),
    )
    assert [r["step"] for r in _log(tmp_path / "captions")] == [1, 2, 3]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_fsdp_checkpoints_resume_on_one_process_and_back(tmp_path, tiny_configs):
    """Steps 1-2 on 1 process, 3 on 2 FSDP processes (from the 1-process checkpoint; it writes its own at
    step 3), 4-5 on 1 process again from the FSDP checkpoint: the losses of 5 uninterrupted steps."""
    train(load_recipe(_stage2_recipe(tmp_path, tiny_configs, "straight", 2 * B, steps=5)))
    mixed = _stage2_recipe(tmp_path, tiny_configs, "mixed", 2 * B)
    train(load_recipe(mixed, ["steps=3", "save_every=2"]))
    _truncate_log(tmp_path / "mixed", 2)
    _torchrun(tmp_path, mixed, "steps=4", "save_every=3", f"batch_size={B}")
    _truncate_log(tmp_path / "mixed", 3)
    train(load_recipe(mixed, ["steps=5"]))
    straight, resumed = _log(tmp_path / "straight"), _log(tmp_path / "mixed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    for ra, rb in zip(straight, resumed):
        for k in ("loss", "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-5), (ra["step"], k)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_flamingo_two_processes_match_one(tmp_path, tiny_configs, parallel):
    """Flamingo (perceiver + gated blocks in the frozen tiny GPT-2) on a two-dataset mixture: each rank
    takes its slice of every dataset's global batch of documents. In-context documents hold a fixed
    number of images, each followed by a one-word answer, so every rank holds as many target tokens."""
    from vlbridge import LMConfig, VisionConfig
    from vlbridge.models.flamingo.modeling import FlamingoConfig

    flamingo = FlamingoConfig(
        vision=VisionConfig(tiny_configs[None].vision.name_or_path, feature_layer=-1),
        lm=LMConfig(tiny_configs["gpt2"].lm.name_or_path),
        perceiver_depth=1,
        num_latents=4,
        perceiver_heads=2,
        perceiver_dim_head=8,
        max_media=4,
        xattn_heads=2,
        xattn_dim_head=8,
    )

    def recipe(name, batch_size):
        data = {"kind": "shapesworld_incontext", "batch_size": batch_size, "num_samples": 64, "width": 32, "height": 32}
        r = {
            "model_kind": "flamingo",
            "flamingo": to_dict(flamingo),
            "parallel": parallel,
            "steps": 2,
            "log_every": 1,
            "datasets": [{**data, "name": "a", "max_images": 2}, {**data, "name": "b", "weight": 0.5, "max_images": 3}],
            "optim": {"warmup_steps": 1, "lr": 1e-3},
            "precision": "fp32",
            "device": "cpu",
            "out_dir": str(tmp_path / name),
        }
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
        return tmp_path / f"{name}.json"

    one = train(load_recipe(recipe("one", 2 * B // 2)))  # 8 documents per dataset and step
    _torchrun(tmp_path, recipe("two", B // 2))
    _assert_same_logs(tmp_path, ("loss", "loss_a", "loss_b", "grad_norm"))
    _assert_same_params(one, tmp_path / "two" / "final", lr=1e-3)


# ---------------------------------------------------------------- webdataset shards, streamed


def _shards(root, n_shards=4, per_shard=6):
    """ShapesWorld scenes as webdataset shards root/data-0000k.tar (PNG + caption .txt), with three bad
    samples: an undecodable image (shard 0), a caption without an image (shard 1, the reader drops it)
    and an image without a caption (shard 2)."""
    import io
    import tarfile

    from vlbridge.data import shapesworld as sw

    world = sw.ShapesWorldConfig(width=32, height=32)
    scenes = iter(sw.make_split("train", n_shards * per_shard, world))
    for k in range(n_shards):
        with tarfile.open(root / f"data-{k:05d}.tar", "w") as tf:
            for i in range(per_shard):
                scene, png = next(scenes), io.BytesIO()
                sw.render(scene, world).save(png, format="PNG")
                files = {"png": png.getvalue(), "txt": scene.caption.encode()}
                if (k, i) == (0, 2):
                    files["png"] = b"not an image"
                if (k, i) == (1, 3):
                    del files["png"]
                if (k, i) == (2, 1):
                    del files["txt"]
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{k:05d}{i:04d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return str(root / "data-{00000..00003}.tar")


def test_webdataset_stream_batches_skips_and_rank_shards(tmp_path, tiny_configs):
    from vlbridge import create_blip2
    from vlbridge.data.batches import DataConfig, ShardStream

    shards = _shards(tmp_path)
    _, proc = create_blip2(tiny_configs[None])
    data = DataConfig(source="webdataset", path=shards)
    assert (
        ShardStream(DataConfig(source="webdataset", path=str(tmp_path / "*.tar")), proc, 4, 1, 1, ("", "")).shards
        == ShardStream(data, proc, 4, 1, 1, ("", "")).shards
        == [str(tmp_path / f"data-{k:05d}.tar") for k in range(4)]
    )

    stream = ShardStream(data, proc, 4, 2, 1, ("", ""))  # grad_accum 2: (step, micro) -> position (2 step + micro) * 4
    in_order = [stream.batch(step, micro) for step in range(3) for micro in range(2)]  # epoch 0 (23 samples) + 1
    assert all(b["pixel_values"].shape[0] == len(b["image_ids"]) == 4 for b in in_order)
    assert dict(stream.skips.reasons) == {"cannot decode": 1, "no image file": 1, "no caption": 1}
    # a resumed run starts a fresh stream at step 2: it skips to the same samples
    resumed = ShardStream(data, proc, 4, 2, 1, ("", "")).batch(2, 1)
    for k in ("pixel_values", "qformer_input_ids", "image_ids"):
        assert torch.equal(resumed[k], in_order[5][k]), k
    # the places of the undecodable and the uncaptioned sample went to usable samples of their micro-batches:
    # two repeats in all, each sharing its stand-in's ITC id
    assert sum(4 - len(set(b["image_ids"].tolist())) for b in in_order) == 2

    # two ranks read disjoint shards (2 of the 4 each per epoch)
    r0, r1 = (ShardStream(data, proc, 4, 1, 1, ("", ""), rank=r, world_size=2) for r in (0, 1))
    ids0 = {i for s in range(2) for i in r0.batch(s)["image_ids"].tolist()}
    ids1 = {i for s in range(2) for i in r1.batch(s)["image_ids"].tolist()}
    assert ids0 and ids1 and not ids0 & ids1
    with pytest.raises(ValueError, match="matches no file"):
        ShardStream(DataConfig(source="webdataset", path=str(tmp_path / "nope-*.tar")), proc, 4, 1, 1, ("", ""))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_webdataset_training_resumes_exactly_and_runs_on_two_ranks(tmp_path):
    """`vlbridge train` on tar shards: a run interrupted at step 2 and resumed replays the losses of
    an uninterrupted one; 2 ranks each stream their own shards."""
    data = "data=" + json.dumps({"source": "webdataset", "path": _shards(tmp_path)})
    train(load_recipe(_recipe(tmp_path, "straight", 4), [data, "steps=4"]))
    train(load_recipe(_recipe(tmp_path, "cut", 4), [data, "steps=3", "save_every=2"]))
    _truncate_log(tmp_path / "cut", 2)
    train(load_recipe(tmp_path / "cut.json", [data, "steps=4", "save_every=2"]))
    straight, resumed = _log(tmp_path / "straight"), _log(tmp_path / "cut")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for ra, rb in zip(straight, resumed):
        for k in ("loss", "loss_itc", "loss_itm", "loss_itg", "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-6), (ra["step"], k)

    _torchrun(tmp_path, _recipe(tmp_path, "two", 4), data, "steps=2")
    rows = _log(tmp_path / "two")
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert (tmp_path / "two" / "final" / "model.safetensors").exists()
