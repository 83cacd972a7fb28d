"""make bench: a load test of `vlbridge serve`, outside the test suite. Prints a table, writes JSON.

    python -m benchmarks.bench_serving --out bench-output [--model DIR] [--clients 1,4,16,64] [--requests N]

Two real servers (`vlbridge serve` subprocesses on 127.0.0.1) of the same model: one batching dynamically
(--max-batch-size B, default 16), one with --max-batch-size 1. For each number of concurrent clients, a
fixed number of chat completions (a ShapesWorld scene and one of its questions each, greedy, max_tokens
8) goes to each server in turn, the order alternating from one level to the next, so that machine noise
hits both alike. Per server and level: requests/s, p50 / p99 latency, the mean batch size (from the
server's /metrics), errors and 429s; per level the throughput ratio batching / batch size 1.

The model is the BLIP-2 that `make demo` trains (demo-output/stage2/final) when present, else an
untrained BLIP-2 on the shipped ShapesWorld backbones (its answers are noise; its cost is the demo's).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

DEMO_MODEL = Path("demo-output/stage2/final")


def environment() -> dict:
    import torch
    import transformers

    return {
        "device": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def tiny_model(path: Path) -> Path:
    """An untrained BLIP-2 on the shipped ShapesWorld backbones, saved under `path`."""
    from vlbridge import Blip2Config, LMConfig, QFormerConfig, VisionConfig, create_blip2
    from vlbridge.assets import SHAPESWORLD

    config = Blip2Config(
        vision=VisionConfig(str(SHAPESWORLD / "vision")),
        qformer=QFormerConfig(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256, num_query_tokens=8),
        lm=LMConfig(str(SHAPESWORLD / "lm")),
        qformer_tokenizer=str(SHAPESWORLD / "qformer_tokenizer"),
    )
    model, processor = create_blip2(config)
    model.save_pretrained(path, processor=processor)
    return path


def requests_pool(n: int) -> list[list[dict]]:
    """n chat messages: a rendered ShapesWorld scene and one of its questions."""
    from vlbridge.data import shapesworld

    out = []
    for scene in shapesworld.make_split("test", n):
        buf = io.BytesIO()
        shapesworld.render(scene).save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        content = [{"type": "text", "text": scene.qa[0].question}, {"type": "image_url", "image_url": {"url": url}}]
        out.append([{"role": "user", "content": content}])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model: Path, max_batch_size: int, max_wait_ms: float, threads: int, dtype: str | None = None
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "vlbridge.cli", "serve", str(model), "--port", str(port), "--device", "cpu"]
    command += ["--served-model-name", "bench", "--max-batch-size", str(max_batch_size)]
    command += ["--max-wait-ms", str(max_wait_ms)] + (["--dtype", dtype] if dtype else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # torch's intra-op threads in the server
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            urllib.request.urlopen(f"{base}/health", timeout=5)
            return server, base
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited:\n{server.stderr.read()[-3000:]}") from None
            if time.time() > deadline:
                server.terminate()
                raise RuntimeError("the server did not start within 300 s") from None
            time.sleep(0.5)


def server_totals(base: str) -> tuple[float, float, float]:
    """The sum and count of the server's vlbridge_batch_size histogram, and its seconds in generate calls."""
    text = urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode()
    names = r"vlbridge_batch_size_sum|vlbridge_batch_size_count|vlbridge_generate_seconds_total"
    value = {m[0]: float(m[1]) for m in re.findall(rf"^({names}) (\S+)$", text, re.M)}
    return (
        value["vlbridge_batch_size_sum"],
        value["vlbridge_batch_size_count"],
        value["vlbridge_generate_seconds_total"],
    )


async def load(base: str, clients: int, pool: list, requests: int, max_tokens: int) -> dict:
    """`clients` concurrent clients send `requests` chat completions in all, each the next from `pool`."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="EMPTY", max_retries=0, timeout=600)
    latencies, errors, rejected, next_request = [], [], 0, 0

    async def worker():
        nonlocal rejected, next_request
        while next_request < requests:
            messages = pool[next_request % len(pool)]
            next_request += 1
            start = time.perf_counter()
            try:
                await client.chat.completions.create(
                    model="bench", messages=messages, temperature=0, max_tokens=max_tokens
                )
                latencies.append(time.perf_counter() - start)
            except openai.RateLimitError:
                rejected += 1
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}"[:300])

    before = server_totals(base)
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    seconds = time.perf_counter() - start
    after = server_totals(base)
    await client.close()
    batches = after[1] - before[1]
    return {
        "clients": clients,
        "requests": requests,
        "seconds": round(seconds, 3),
        "requests_per_s": round(len(latencies) / seconds, 3),
        "p50_s": round(float(np.percentile(latencies, 50)), 4) if latencies else None,
        "p99_s": round(float(np.percentile(latencies, 99)), 4) if latencies else None,
        "mean_batch_size": round((after[0] - before[0]) / batches, 2) if batches else None,
        "generate_share": round((after[2] - before[2]) / seconds, 3),  # of the wall time, in generate calls
        "errors": len(errors),
        "rejected_429": rejected,
        "first_errors": errors[:3],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-output")
    p.add_argument("--model", type=Path, help=f"a saved model (default: {DEMO_MODEL} if present, else a tiny one)")
    p.add_argument("--clients", default="1,4,16,64", help="concurrency levels, comma-separated")
    p.add_argument("--requests", type=int, default=256, help="requests per level and server")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--max-batch-size", type=int, default=16, help="the batching server's --max-batch-size")
    p.add_argument("--max-wait-ms", type=float, default=10)
    p.add_argument("--dtype", default=None, help="both servers' --dtype (default: the model's, float32)")
    p.add_argument(
        "--server-threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="torch threads of each server (default: half the CPUs; the clients run on this machine too)",
    )
    args = p.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is not None:
            model, source = args.model, str(args.model)
        elif (DEMO_MODEL / "config.json").exists():
            model, source = DEMO_MODEL, str(DEMO_MODEL)
        else:
            model, source = tiny_model(Path(tmp) / "model"), "untrained BLIP-2 on the shipped ShapesWorld backbones"
        print(f"model: {source}", flush=True)
        pool = requests_pool(64)
        modes = {"batching": args.max_batch_size, "batch_size_1": 1}
        servers = {
            name: start_server(model, size, args.max_wait_ms, args.server_threads, args.dtype)
            for name, size in modes.items()
        }
        rows = []
        try:
            for _, base in servers.values():  # warm-up: first calls pay for lazy initialisation
                asyncio.run(load(base, 4, pool, 8, args.max_tokens))
            for i, clients in enumerate(levels):
                order = list(servers) if i % 2 == 0 else list(reversed(servers))
                for name in order:
                    row = asyncio.run(load(servers[name][1], clients, pool, args.requests, args.max_tokens))
                    rows.append({"mode": name, "max_batch_size": modes[name], **row})
                    print(
                        f"{name:>13} clients {clients:>3}: {row['requests_per_s']:7.2f} req/s  "
                        f"p50 {row['p50_s']}s  p99 {row['p99_s']}s  batch {row['mean_batch_size']}  "
                        f"in generate {row['generate_share']:.0%}  errors {row['errors']}  429 {row['rejected_429']}",
                        flush=True,
                    )
        finally:
            for server, _ in servers.values():
                server.terminate()
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:  # still finishing requests of clients that are gone
                    server.kill()
                    server.wait()
    speedup = {}
    for clients in levels:
        by_mode = {r["mode"]: r for r in rows if r["clients"] == clients}
        speedup[str(clients)] = round(
            by_mode["batching"]["requests_per_s"] / by_mode["batch_size_1"]["requests_per_s"], 2
        )
    errors = sum(r["errors"] for r in rows)
    goal = {"errors": errors, "speedup_at_16": speedup.get("16"), "met": errors == 0 and (speedup.get("16") or 0) >= 3}
    print()
    print(f"{'clients':>7} | {'batching req/s':>14} | {'bs=1 req/s':>10} | {'ratio':>5} | {'batch':>5} | p50 / p99")
    for clients in levels:
        b, one = (next(r for r in rows if r["clients"] == clients and r["mode"] == m) for m in modes)
        print(
            f"{clients:>7} | {b['requests_per_s']:>14.2f} | {one['requests_per_s']:>10.2f} | "
            f"{speedup[str(clients)]:>5.2f} | {b['mean_batch_size']!s:>5} | {b['p50_s']}s / {b['p99_s']}s"
        )
    print(f"goal (0 errors, >= 3x at 16 clients): {'met' if goal['met'] else 'not met'} {goal}")
    out = Path(args.out) / "serving.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {"model": source, **{k: v for k, v in vars(args).items() if k not in ("out", "model")}}
    out.write_text(
        json.dumps(
            {"environment": environment(), "config": config, "results": rows, "speedup": speedup, "goal": goal},
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
