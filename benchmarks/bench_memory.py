"""Peak memory of one BLIP-2 stage-2 training step with a ~1B-parameter LM, two ways, side by side:

    python -m benchmarks.bench_memory --out bench-output [--lm-layers 16 --lm-width 2048 --batch 4]

  frozen_bf16  the LM held in bf16 and frozen (no gradients, no optimizer state), the Q-Former
               trainable in fp32 with gradient checkpointing, bf16 autocast: what vlbridge does
  naive_fp32   everything in fp32, every parameter (the LM's too) trainable and in AdamW
Each case runs in a fresh process (its peak is its own): build the model (random weights, Llama
shape, built directly in its dtype), one forward + backward + AdamW step on cached image features
(BLIP-2 sizes: Q-Former BERT-base with 32 queries, 257 image tokens of width 1408), 32 text tokens.
Memory is the process's peak RSS on CPU, torch.cuda.max_memory_allocated on a GPU.
Writes <out>/bench_memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

CASES = ("frozen_bf16", "naive_fp32")


def build(case: str, layers: int, width: int, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlbridge.core.config import LMConfig
    from vlbridge.models.blip2.configuration import Blip2Config, QFormerConfig
    from vlbridge.models.blip2.modeling import Blip2

    lm_cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=width,
        intermediate_size=width * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=width // 128,
        num_key_value_heads=width // 128,
        max_position_embeddings=512,
    )
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-output")
    p.add_argument("--lm-layers", type=int, default=16)
    p.add_argument("--lm-width", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--case", choices=CASES, help="run one case in this process and print its JSON (internal)")
    args = p.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, args.lm_layers, args.lm_width, args.batch)))
        return
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
    from benchmarks.bench import environment

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {
        "environment": environment(device),
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
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_memory.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'bench_memory.json'}")


if __name__ == "__main__":
    main()
