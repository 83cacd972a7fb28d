"""Peak memory with a ~1B-parameter LM: one BLIP-2 stage-2 training step two ways, and loading the LM for
FSDP, per rank, two ways:

    python -m benchmarks.bench_memory --out bench-output [--lm-layers 16 --lm-width 2048 --batch 4]

  frozen_bf16  the LM held in bf16 and frozen (no gradients, no optimizer state), the Q-Former
               trainable in fp32 with gradient checkpointing, bf16 autocast: what vlbridge does
  naive_fp32   everything in fp32, every parameter (the LM's too) trainable and in AdamW
Each case runs in a fresh process (its peak is its own): build the model (random weights, Llama
shape, built directly in its dtype), one forward + backward + AdamW step on cached image features
(BLIP-2 sizes: Q-Former BERT-base with 32 queries, 257 image tokens of width 1408), 32 text tokens.
Memory is the process's peak RSS on CPU, torch.cuda.max_memory_allocated on a GPU.

Then the host memory of loading a ~1B-parameter LM for FSDP training (--fsdp-ranks 1 2), per rank: a
random Llama-shape LM written with save_pretrained (bf16) into a temporary folder, a BLIP-2 stage-2 model
on it (tiny vision tower and Q-Former, so the LM is what counts), built and sharded as `vlbridge train`
does under parallel "fsdp", on 1 and on 2 ranks (gloo on the CPU; nccl, one GPU per rank, with CUDA):
  whole     every rank loads the LM whole, then shards it; rank 0 keeps a whole copy to write from
  deferred  the LM built on the meta device, sharded, each rank reading only its rows of the files
            (backbones.deferred_weights, dist.materialize); rank 0's copy holds no LM values
Each rank is a fresh process; its figure is its peak RSS once the model is sharded.
Writes <out>/bench_memory.json (--only step or fsdp-load: one of the two measurements).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CASES = ("frozen_bf16", "naive_fp32")


def llama_config(layers: int, width: int):
    """The benchmark LM's shape: Llama, 128-wide heads, an MLP 11/4 as wide (a ~1B model at 16 x 2048)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000,
        hidden_size=width,
        intermediate_size=width * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=width // 128,
        num_key_value_heads=width // 128,
        max_position_embeddings=512,
    )


def build(case: str, layers: int, width: int, device: torch.device):
    from transformers import LlamaForCausalLM

    from vlbridge.core.config import LMConfig
    from vlbridge.models.blip2.configuration import Blip2Config, QFormerConfig
    from vlbridge.models.blip2.modeling import Blip2

    lm_cfg = llama_config(layers, width)
    dtype = torch.bfloat16 if case == "frozen_bf16" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its own dtype: no fp32 copy of a bf16 model on the way
    try:
        lm = LlamaForCausalLM(lm_cfg).to(device)
    finally:
        torch.set_default_dtype(previous)
    lm.set_attn_implementation("eager")
    q = QFormerConfig(encoder_hidden_size=1408, text_branch=False, dropout=0.0, attention_dropout=0.0)
    model = Blip2(Blip2Config(qformer=q, lm=LMConfig(hidden_size=width)), lm=lm).to(device)
    if case == "frozen_bf16":
        model.qformer.set_grad_checkpointing(True)
    else:  # the naive way: the LM trains too
        for p in model.lm.parameters():
            p.requires_grad_(True)
    return model


def run_case(case: str, layers: int, width: int, batch: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    model = build(case, layers, width, device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    feats = torch.randn(batch, 257, 1408, device=device)
    ids = torch.randint(4, 32000, (batch, 32), device=device)
    labels = ids.clone()
    labels[:, :8] = -100  # the prompt
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=case == "frozen_bf16"):
        loss = model(image_features=feats, input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    loss.backward()
    opt.step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:  # ru_maxrss is in KiB on Linux
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return {
        "case": case,
        "peak_bytes": peak,
        "peak_gib": peak / 2**30,
        "memory": "cuda max allocated" if device.type == "cuda" else "peak RSS",
        "device": device.type,
        "seconds": time.time() - t0,
        "lm_params": sum(p.numel() for p in model.lm.parameters()),
        "trainable_params": sum(p.numel() for p in trainable),
        "optimizer_state_bytes": state,
        "loss": float(loss),
    }


# ---------------------------------------------------------------- loading for FSDP, per rank

LOAD_PATHS = ("whole", "deferred")


def write_lm(path: Path, layers: int, width: int) -> None:
    """A random Llama-shape LM (bf16) and a tokenizer written with save_pretrained."""
    from transformers import LlamaForCausalLM

    from vlbridge.testing import word_tokenizer

    config = llama_config(layers, width)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # no fp32 copy on the way
    try:
        with torch.device("meta"):  # then only random values, without transformers' slow init
            lm = LlamaForCausalLM(config)
        lm.to_empty(device="cpu")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in lm.parameters():
                p.normal_(0, 0.02, generator=g)
    finally:
        torch.set_default_dtype(previous)
    lm.save_pretrained(path)
    word_tokenizer("lm").save_pretrained(path)


def load_rank(load: str, root: Path) -> dict:
    """One rank (torchrun's env vars): the stage-2 model built and sharded as train.py does it."""
    from vlbridge.core import dist
    from vlbridge.training.checkpoint import Writer
    from vlbridge.training.recipe import load_recipe
    from vlbridge.training.train import Objective, build

    rank, world_size, device = dist.init_from_env("auto")  # cuda:LOCAL_RANK with nccl when CUDA is present
    t0 = time.time()
    cfg = load_recipe(root / "recipe.json")
    model, _, sources = build(cfg, fsdp=load == "deferred")
    writer = Writer(model, set(sources or ()))
    if sources is None:
        model.to(device)
    model.freeze_for_stage(2)
    sharded = dist.fully_shard_blocks(Objective(model, cfg), device, model.fsdp_blocks())
    if sources is not None:
        dist.materialize(sharded, device, {f"model.{n}": src for n, src in sources.items()})
    dist.barrier()
    held = sum(dist.local_part(p).numel() * p.element_size() for p in sharded.parameters())
    row = {
        "load": load,
        "world_size": world_size,
        "rank": rank,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "param_bytes_held": held,
        "writer_param_bytes": None
        if writer.copy is None
        else sum(p.numel() * p.element_size() for p in writer.copy.parameters() if not p.is_meta),
        "seconds": time.time() - t0,
        "device": device.type,
    }
    if device.type == "cuda":
        row["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    rows = [None] * world_size
    if world_size > 1:
        torch.distributed.all_gather_object(rows, row)
    else:
        rows = [row]
    dist.shutdown()
    return {"ranks": rows}


def fsdp_load(layers: int, width: int, ranks: list[int]) -> dict:
    """Peak RSS per rank of both loading paths at each number of ranks, each run in fresh processes."""
    from vlbridge.core.config import LMConfig, to_dict
    from vlbridge.testing import tiny_blip2_config

    rows = []
    with tempfile.TemporaryDirectory(prefix="vlbridge-bench-") as tmp:
        root = Path(tmp)
        t0 = time.time()
        write_lm(root / "lm", layers, width)
        print(f"wrote a random {layers}-layer {width}-wide LM in {time.time() - t0:.0f} s", flush=True)
        cfg = tiny_blip2_config(root / "small", lm=None)
        cfg.lm = LMConfig(str(root / "lm"), dtype="bfloat16")
        recipe = {"stage": 2, "model": to_dict(cfg), "parallel": "fsdp", "precision": "bf16", "out_dir": tmp}
        (root / "recipe.json").write_text(json.dumps(recipe))
        gpus = torch.cuda.device_count()
        for n in ranks:
            if gpus and n > gpus:
                print(f"skipping {n} ranks: {gpus} GPU(s)")
                continue
            for load in LOAD_PATHS:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
                cmd += ["-m", "benchmarks.bench_memory", "--load", load, "--root", tmp]
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
                if done.returncode != 0 or not lines:
                    tail = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
                    rows.append({"load": load, "world_size": n, "error": tail})
                    continue
                rows.extend(json.loads(lines[-1])["ranks"])
                for r in json.loads(lines[-1])["ranks"]:
                    print(
                        f"{load:8} {n} rank(s), rank {r['rank']}: peak RSS {r['peak_rss_bytes'] / 2**30:5.2f} GiB, "
                        f"parameters held {r['param_bytes_held'] / 2**30:5.2f} GiB ({r['seconds']:.0f} s)",
                        flush=True,
                    )
    peak = {}  # (load, ranks) -> the largest peak RSS of any rank
    for r in rows:
        if "error" not in r:
            key = (r["load"], r["world_size"])
            peak[key] = max(peak.get(key, 0), r["peak_rss_bytes"])
    ratios = {}
    for n in ranks:
        if ("whole", n) in peak and ("deferred", n) in peak:
            ratios[f"deferred_over_whole_{n}_ranks"] = peak[("deferred", n)] / peak[("whole", n)]
    for load in LOAD_PATHS:
        if (load, ranks[0]) in peak and (load, ranks[-1]) in peak and ranks[-1] != ranks[0]:
            ratios[f"{load}_{ranks[-1]}_over_{ranks[0]}_ranks"] = peak[(load, ranks[-1])] / peak[(load, ranks[0])]
    for k, v in ratios.items():
        print(f"max peak RSS per rank, {k.replace('_', ' ')}: {v:.2f}x")
    lm_params = layers * (4 * width * width + 3 * width * (width * 11 // 4)) + 2 * 32000 * width
    return {
        "lm": {"layers": layers, "width": width, "params": lm_params, "dtype": "bfloat16"},
        "results": rows,
        "ratios": ratios,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-output")
    p.add_argument("--lm-layers", type=int, default=16)
    p.add_argument("--lm-width", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--case", choices=CASES, help="run one case in this process and print its JSON (internal)")
    p.add_argument("--only", choices=("step", "fsdp-load"), help="one of the two measurements")
    p.add_argument("--fsdp-ranks", type=int, nargs="+", default=[1, 2], help="numbers of ranks to load on")
    p.add_argument("--load", choices=LOAD_PATHS, help="one rank of the loading measurement (internal)")
    p.add_argument("--root", help="the loading measurement's folder (internal)")
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.lm_layers, args.lm_width, args.batch)))
        return
    if args.load:
        result = load_rank(args.load, Path(args.root))
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        return
    from benchmarks.bench import environment

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench_memory.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report["environment"] = environment(device)
    if args.only != "fsdp-load":
        report.update(step_memory(args))
    if args.only != "step":
        report["fsdp_load"] = fsdp_load(args.lm_layers, args.lm_width, args.fsdp_ranks)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


def step_memory(args) -> dict:
    """The step measurement: both cases, each in a fresh process."""
    rows = []
    for case in CASES:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.bench_memory",
            "--case",
            case,
            "--lm-layers",
            str(args.lm_layers),
            "--lm-width",
            str(args.lm_width),
            "--batch",
            str(args.batch),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            rows.append({"case": case, "error": done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    ok = {r["case"]: r for r in rows if "error" not in r}
    ratio = (ok["naive_fp32"]["peak_bytes"] / ok["frozen_bf16"]["peak_bytes"]) if len(ok) == 2 else None
    report = {
        "results": rows,
        "naive_over_frozen": ratio,
        "lm": {"layers": args.lm_layers, "width": args.lm_width},
        "batch": args.batch,
    }
    for r in rows:
        if "error" in r:
            print(f"{r['case']:12} failed: {r['error']}")
        else:
            print(
                f"{r['case']:12} LM {r['lm_params'] / 1e9:.2f}B  trainable {r['trainable_params'] / 1e6:8.1f}M  "
                f"optimizer state {r['optimizer_state_bytes'] / 2**30:6.2f} GiB  {r['memory']} "
                f"{r['peak_gib']:6.2f} GiB  ({r['seconds']:.0f} s)"
            )
    if ratio:
        print(f"naive fp32 / frozen bf16 peak memory: {ratio:.2f}x")
    return report


if __name__ == "__main__":
    main()
