"""FSDP with deferred loading (backbones.deferred_weights + dist.materialize): on 2 gloo ranks the backbones
are built on the meta device and each rank reads only its rows of their files, and the result is bit for
bit what loading every backbone whole and then sharding gives: the same shards, buffers, tied weights, loss
and gradients. A model that needs its backbones' weights to be built falls back to loading them whole."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch

from vlbridge.core.config import to_dict

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _compare(rank: int, port: int, recipes: list[str], out: str) -> None:
    """One rank: each recipe's model sharded after a whole load and after a deferred one, compared; the
    findings go to out/<recipe>.<rank>.json."""
    import torch.distributed as tdist

    from vlbridge.core import dist
    from vlbridge.training.build import build_model, build_streams
    from vlbridge.training.recipe import load_recipe
    from vlbridge.training.train import Objective, build, step_generator

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=2)
    cpu = torch.device("cpu")
    for path in recipes:
        cfg = load_recipe(path)
        torch.manual_seed(cfg.seed)
        whole, processor = build_model(cfg)
        deferred, _, sources = build(cfg, fsdp=True)
        found = {"deferred": sources is not None}
        if sources is not None:
            found["meta"] = sorted({n.split(".")[0] for n in sources})  # the parts built on the meta device
            for m in (whole, deferred):
                m.freeze_for_stage(cfg.stage)
            batch = next(iter(build_streams(cfg, whole, processor, cfg.out_dir).values()))[1].batch(0, 0)
            a = dist.fully_shard_blocks(Objective(whole, cfg), cpu, whole.fsdp_blocks())
            b = dist.fully_shard_blocks(Objective(deferred, cfg), cpu, deferred.fsdp_blocks())
            dist.materialize(b, cpu, {f"model.{n}": src for n, src in sources.items()})
            pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
            ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
            found["names"] = pa.keys() == pb.keys() and ba.keys() == bb.keys()
            found["params_differ"] = [n for n in pa if not torch.equal(_local(pa[n]), _local(pb[n]))]
            found["buffers_differ"] = [n for n in ba if not torch.equal(ba[n], bb[n])]
            lm = deferred.lm
            if lm.config.tie_word_embeddings and lm.get_output_embeddings() is not None:
                found["tied"] = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
            # this rank holds about half of the backbones' values: nothing was loaded whole
            held = sum(_local(pb[f"model.{n}"]).numel() for n in sources)
            found["held_fraction"] = held / sum(pb[f"model.{n}"].numel() for n in sources)
            losses = []
            for root in (a, b):
                loss, _ = root(batch, step_generator(cfg.seed, 0, 0, cpu))
                loss.backward()
                losses.append(loss.item())
            found["losses"] = losses
            found["grads_differ"] = [
                n for n in pa if pa[n].grad is not None and not torch.equal(_local(pa[n].grad), _local(pb[n].grad))
            ]
        with open(os.path.join(out, f"{os.path.basename(path)}.{rank}.json"), "w") as f:
            json.dump(found, f)
    tdist.destroy_process_group()


def _recipe(tmp_path, name: str, **fields) -> str:
    r = {
        "steps": 2,
        "batch_size": 4,
        "data": {"num_samples": 16, "group_size": 1, "width": 32, "height": 32, "tasks": ["vqa"]},
        "out_dir": str(tmp_path / name),
        "precision": "fp32",
        "device": "cpu",
        "parallel": "fsdp",
        **fields,
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(r))
    return str(path)


def test_deferred_loading_is_bit_identical_to_loading_whole(tmp_path, tiny_configs):
    import torch.multiprocessing as mp

    from vlbridge import LMConfig, VisionConfig
    from vlbridge.models.eve.modeling import EVEConfig
    from vlbridge.models.flamingo.modeling import FlamingoConfig
    from vlbridge.models.llava.modeling import LlavaConfig

    vision, gpt2, llama = (tiny_configs[k] for k in (None, "gpt2", "llama"))
    eve = EVEConfig(
        lm=LMConfig(llama.lm.name_or_path),
        teacher=VisionConfig(vision.vision.name_or_path, feature_layer=-2),
        patch_size=4,
        pel_width=16,
        pel_heads=2,
        max_image_size=32,
        pal_layers=[1, 2],
    )
    flamingo = FlamingoConfig(
        vision=VisionConfig(vision.vision.name_or_path, feature_layer=-1),
        lm=LMConfig(gpt2.lm.name_or_path),
        perceiver_depth=1,
        num_latents=4,
        perceiver_heads=2,
        perceiver_dim_head=8,
        max_media=4,
        xattn_heads=2,
        xattn_dim_head=8,
    )
    docs = {"kind": "shapesworld_incontext", "batch_size": 2, "num_samples": 8, "width": 32, "height": 32}
    recipes = {
        # the tiny GPT-2 ties its head to its input embedding
        "blip2": _recipe(tmp_path, "blip2", stage=2, model=to_dict(gpt2)),
        # EVE stage 2 trains the LM: trainable parameters built on the meta device too
        "eve": _recipe(tmp_path, "eve", model_kind="eve", stage=2, eve=to_dict(eve)),
        "llava": _recipe(
            tmp_path,
            "llava",
            model_kind="llava",
            stage=2,
            llava=to_dict(
                LlavaConfig(vision=VisionConfig(vision.vision.name_or_path), lm=LMConfig(llama.lm.name_or_path))
            ),
        ),
        # its added token rows start as the mean of the LM's embeddings: loaded whole instead
        "flamingo": _recipe(
            tmp_path, "flamingo", model_kind="flamingo", flamingo=to_dict(flamingo), datasets=[{**docs, "name": "a"}]
        ),
    }
    mp.spawn(_compare, args=(_free_port(), list(recipes.values()), str(tmp_path)), nprocs=2)
    for name, path in recipes.items():
        for rank in (0, 1):
            found = json.loads((tmp_path / f"{os.path.basename(path)}.{rank}.json").read_text())
            if name == "flamingo":
                assert not found["deferred"]
                continue
            assert found["deferred"] and found["names"], name
            assert found["params_differ"] == found["buffers_differ"] == found["grads_differ"] == [], (name, found)
            assert found["losses"][0] == found["losses"][1], (name, found["losses"])
            assert found.get("tied", True), name
            assert 0.3 < found["held_fraction"] < 0.7, (name, found["held_fraction"])
        expected = {"blip2": ["lm", "vision"], "eve": ["lm", "teacher"], "llava": ["lm", "vision"], "flamingo": None}
        assert found.get("meta") == expected[name], (name, found)


def test_eve_trains_its_deferred_lm_and_resumes_exactly(tmp_path, tiny_configs):
    """EVE stage 2 trains its LM, built on the meta device under FSDP: rank 0 gathers it into its Writer copy
    for a whole checkpoint, and a resume reads each rank's rows of it from trainer_state.safetensors. Two
    ranks cut at step 1 and resumed log what two ranks uninterrupted do, bit for bit."""
    import subprocess
    import sys

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
    kw = dict(model_kind="eve", stage=2, eve=to_dict(eve), steps=3, log_every=1, batch_size=4)
    kw["optim"] = {"warmup_steps": 1, "lr": 1e-3, "min_lr": 1e-3}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run += ["-m", "vlbridge.training.train"]
    subprocess.run([*run, _recipe(tmp_path, "straight", **kw)], check=True, env=env, timeout=240)
    mixed = _recipe(tmp_path, "mixed", **kw)
    subprocess.run([*run, mixed, "steps=2", "save_every=1"], check=True, env=env, timeout=240)
    assert any(k.startswith("param.lm.") for k in _keys(tmp_path / "mixed" / "last" / "trainer_state.safetensors"))
    subprocess.run([*run, mixed], check=True, env=env, timeout=240)  # final/ is at step 2: resumes from step 1
    a = [json.loads(x) for x in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "mixed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [1, 2, 3]
    assert [(r["loss"], r["grad_norm"]) for r in a] == [(r["loss"], r["grad_norm"]) for r in b]


def _keys(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def test_parameter_names_map_onto_file_keys_by_one_renaming():
    from vlbridge.core.backbones import _match_keys

    files = {"wte.weight": ("f", (8, 4)), "h.0.attn.weight": ("f", (4, 4))}
    # a base model's prefix absent from the file
    params = {"transformer.wte.weight": (8, 4), "transformer.h.0.attn.weight": (4, 4)}
    assert _match_keys(params, files)[0] == {
        "transformer.wte.weight": "wte.weight",
        "transformer.h.0.attn.weight": "h.0.attn.weight",
    }
    # a composite checkpoint's prefix present in it
    composite = {"vision_model.a.weight": ("f", (2,)), "text_model.a.weight": ("f", (3,))}
    mapping, rename = _match_keys({"a.weight": (2,)}, composite)
    assert (
        mapping == {"a.weight": "vision_model.a.weight"} and rename("a.running_mean") == "vision_model.a.running_mean"
    )
    # a key renamed on load, or another shape: no renaming fits, the backbone is loaded whole
    assert _match_keys({"transformer.wte.gamma": (8, 4), "transformer.h.0.attn.weight": (4, 4)}, files) is None
    assert _match_keys({"transformer.wte.weight": (9, 4)}, files) is None


@pytest.mark.parametrize("composite", [False, True])
def test_a_deferred_vision_tower_reads_the_values_a_whole_load_gives(tmp_path, composite):
    """One process: the meta parameters get exactly from_pretrained's values (a CLIPModel checkpoint's
    vision half too), the buffers stay, and nothing draws from the global RNG on the way."""
    from vlbridge.core import dist
    from vlbridge.core.backbones import deferred_weights, load_vision
    from vlbridge.core.config import VisionConfig
    from vlbridge.testing import make_vision

    path = make_vision(tmp_path / "vision", composite=composite)
    whole = load_vision(VisionConfig(path, feature_layer=-2))
    torch.manual_seed(0)
    with deferred_weights() as sources:
        tower = load_vision(VisionConfig(path, feature_layer=-2))
    drawn = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.rand(4))  # building drew nothing from the global RNG
    assert all(p.is_meta for p in tower.parameters())
    dist.materialize(tower, torch.device("cpu"), sources.by_name(tower))
    a, b = whole.state_dict(), tower.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
