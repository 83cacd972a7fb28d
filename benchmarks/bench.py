"""make bench: benchmarks, outside the test suite. Prints a table of side-by-side ratios, writes JSON.

    python -m benchmarks.bench --out bench-output [--size tiny|base] [--steps N]

stage1_step: one Q-Former stage-1 training step (ITC + ITM + ITG, forward + backward + AdamW) on
cached image features, in fp32 and in bf16 autocast, with the attention computed by torch's fused
`scaled_dot_product_attention` kernel or by explicit matmul + softmax (`qformer.attention` picks
the explicit path for bf16 on CPU because of what this measures). Sizes: "tiny" is near the shipped
ShapesWorld recipe's Q-Former (192 wide, 4 layers, 8 queries where the recipe has 9, 65 image
tokens of width 128); "base" is BLIP-2's (BERT-base: 768 wide, 12 layers, 32 queries, 257 image
tokens of width 1024).
caching: the shipped ShapesWorld stage-1 recipe's training step on images (the frozen vision encoder
runs every step) against the same step on cached features, side by side, with the one-off cost of
caching; from them the time of one epoch over the recipe's pool both ways.
Runs on a CUDA GPU when one is present; every figure is stored with the device and versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from vlbridge.models.blip2 import qformer as qf
from vlbridge.models.blip2.configuration import Blip2Config, QFormerConfig
from vlbridge.models.blip2.modeling import Blip2

SIZES = {
    "tiny": dict(
        qformer=QFormerConfig(
            hidden_size=192,
            num_layers=4,
            num_heads=4,
            intermediate_size=512,
            num_query_tokens=8,
            cross_attention_frequency=1,
            encoder_hidden_size=128,
            vocab_size=64,
            bos_token_id=63,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
        ),
        image_tokens=65,
        text_len=24,
        batch=64,
    ),
    # dropout off in both sizes, so that the fused and the explicit attention compute the same thing
    "base": dict(
        qformer=QFormerConfig(encoder_hidden_size=1024, dropout=0.0, attention_dropout=0.0),
        image_tokens=257,
        text_len=32,
        batch=32,
    ),
}


def environment(device: torch.device) -> dict:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "device": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def sync(device: torch.device):
    """Wait for the GPU's queued work, so that a timer read after it measures the work."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def write_results(path: Path, env: dict, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": env, "results": rows}, indent=2) + "\n")
    print(f"wrote {path}")


def stage1_step(size: str, device: torch.device, steps: int) -> list[dict]:
    spec = SIZES[size]
    torch.manual_seed(0)
    model = Blip2(Blip2Config(qformer=spec["qformer"])).to(device).train()  # no backbones: cached features
    B, T, N = spec["batch"], spec["text_len"], spec["image_tokens"]
    feats = torch.randn(B, N, spec["qformer"].encoder_hidden_size, device=device)
    ids = torch.randint(6, spec["qformer"].vocab_size - 1, (B, T), device=device)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[: B // 2, T * 2 // 3 :] = 0  # some padding, as in real batches
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step(precision: str):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model.pretrain_losses(ids, mask, image_features=feats).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rows = []
    original = qf.attention
    try:
        for precision in ("fp32", "bf16"):
            for path, fn in (("fused", qf.fused_attention), ("explicit", qf.explicit_attention)):
                qf.attention = fn
                step(precision)  # warm-up
                sync(device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    step(precision)
                sync(device)
                dt = (time.perf_counter() - t0) / steps
                rows.append(
                    {
                        "bench": "stage1_step",
                        "size": size,
                        "precision": precision,
                        "attention": path,
                        "s_per_step": dt,
                        "samples_per_s": B / dt,
                        "batch": B,
                    }
                )
    finally:
        qf.attention = original
    base = next(r for r in rows if r["precision"] == "fp32" and r["attention"] == "fused")["s_per_step"]
    for r in rows:
        r["speedup_vs_fp32_fused"] = base / r["s_per_step"]
    return rows


def caching(device: torch.device, steps: int) -> list[dict]:
    """Stage-1 step time on pixels vs on cached features (shipped recipe, its batch and precision)."""
    from vlbridge.data.batches import BatchStream, FeatureCache, make_pool
    from vlbridge.models.blip2.modeling import create_blip2
    from vlbridge.training.train import load_recipe

    cfg = load_recipe("blip2_shapesworld_stage1")
    torch.manual_seed(0)
    model, processor = create_blip2(cfg.model)
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    pool = make_pool(cfg.data)
    n_cache = 512  # the caching cost per image, measured on a slice of the pool
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, n_cache, 256):
            model.vision(processor.images([pool.image(i) for i in range(s, s + 256)]).to(device))
    cache_s_per_image = (time.perf_counter() - t0) / n_cache
    features = torch.zeros(len(pool), *model.vision(processor.images([pool.image(0)]).to(device)).shape[1:])
    prompts = (cfg.model.caption_prompt, cfg.model.vqa_prompt)
    streams = {
        "pixels": BatchStream(pool, processor, cfg.batch_size, 1, 1, prompts, cfg.seed),
        "cached": BatchStream(pool, processor, cfg.batch_size, 1, 1, prompts, cfg.seed, FeatureCache(features)),
    }
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    times: dict[str, list[float]] = {name: [] for name in streams}
    for step in range(steps + 1):  # the two modes alternate, so that machine noise hits both alike
        for name, stream in streams.items():
            t0 = time.perf_counter()
            batch = {k: v.to(device) for k, v in stream.batch(step).items()}  # pixels: rendering + preprocessing too
            with autocast:
                loss = model.pretrain_losses(
                    batch["input_ids"],
                    batch["attention_mask"],
                    batch.get("pixel_values"),
                    batch.get("image_features"),
                    batch["image_ids"],
                ).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            if step:  # the first is a warm-up
                times[name].append(time.perf_counter() - t0)
    rows = []
    for name, ts in times.items():
        dt = sum(ts) / len(ts)
        epoch_steps = len(pool) // cfg.batch_size
        epoch = dt * epoch_steps + (cache_s_per_image * len(pool) if name == "cached" else 0.0)
        rows.append(
            {
                "bench": "caching",
                "size": "shipped",
                "mode": name,
                "s_per_step": dt,
                "samples_per_s": cfg.batch_size / dt,
                "batch": cfg.batch_size,
                "pool": len(pool),
                "first_epoch_s": epoch,
                "later_epoch_s": dt * epoch_steps,
                "cache_s_per_image": cache_s_per_image,
            }
        )
    pixels = rows[0]["s_per_step"]
    for r in rows:
        r["speedup_vs_pixels"] = pixels / r["s_per_step"]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-output")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = stage1_step(args.size, device, args.steps)
    cache_rows = caching(device, args.steps)
    env = environment(device)
    print(f"device: {env['device']}  torch {env['torch']}  threads {env['threads']}")
    print(
        f"{'bench':12} {'size':5} {'precision':9} {'attention':9} {'s/step':>8} {'samples/s':>10} {'vs fp32 fused':>14}"
    )
    for r in rows:
        print(
            f"{r['bench']:12} {r['size']:5} {r['precision']:9} {r['attention']:9} {r['s_per_step']:8.3f} "
            f"{r['samples_per_s']:10.1f} {r['speedup_vs_fp32_fused']:13.2f}x"
        )
    print(
        f"{'bench':12} {'mode':9} {'s/step':>8} {'samples/s':>10} {'vs pixels':>10} {'1st epoch s':>12} "
        f"{'later epochs s':>15}"
    )
    for r in cache_rows:
        print(
            f"{r['bench']:12} {r['mode']:9} {r['s_per_step']:8.3f} {r['samples_per_s']:10.1f} "
            f"{r['speedup_vs_pixels']:9.2f}x {r['first_epoch_s']:12.0f} {r['later_epoch_s']:15.0f}"
        )
    write_results(Path(args.out) / "bench.json", env, rows + cache_rows)


if __name__ == "__main__":
    main()
