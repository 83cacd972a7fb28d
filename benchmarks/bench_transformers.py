"""make bench: vlbridge against transformers' BLIP-2 on identical weights and inputs, side by side.

    python -m benchmarks.bench_transformers --out bench-output [--steps N] [--batch B] [--parts train,generate]
        [--gen-dtypes fp32,bf16] [--gen-batches 1,8] [--gen-tokens 20,60] [--gen-beams 1,5]

train: the Q-Former stage-1 training step at BLIP-2's size (BERT-base: 768 wide, 12 layers, 32
queries; 257 cached image tokens of width 1024), forward + backward + AdamW, in fp32 and in bf16
autocast. transformers has no ITG path, so the like-for-like comparison is ITC + ITM: vlbridge's
`Blip2.pretrain_losses(itg=False)` against the same losses built from the modules of transformers'
`Blip2ForImageTextRetrieval` (`Blip2QFormerModel`, its embeddings, projections and ITM head),
with the same hard negatives (one generator seeded per step) and the weights converted from
transformers' checkpoint through `Blip2.from_pretrained`. Before timing, both give the same losses
(printed as the parity row). transformers runs with its "sdpa" and its "eager" attention; the
ratio is taken against its faster one. vlbridge's full step (ITC + ITM + ITG) is timed too.
Achieved FLOP/s = FLOPs of one step (torch's FlopCounterMode: matmuls and attention, forward and
backward) / measured time, as a fraction of this machine's matmul peak, measured here on square
matmuls in the same precision.

generate: caption generation in images/s, vlbridge against transformers'
`Blip2ForConditionalGeneration` on the same converted weights (a random model of BLIP-2's shape with
a small ViT and an OPT-125m-shaped LM), over greedy / beam 5 x batch 1 / 8 x 20 / 60 new tokens
(forced) x fp32 / bf16 (--gen-dtypes, --gen-batches, --gen-tokens, --gen-beams pick cells); the generated ids
must agree (`same_ids`).

Modes alternate step by step, so that machine noise hits all alike. Runs on a CUDA GPU when one
is present; every figure is stored with the device and library versions.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.bench import environment, sync, write_results
from vlbridge.models.blip2.modeling import Blip2
from vlbridge.models.blip2.pretraining import sample_hard_negatives, soft_cross_entropy

IMAGE_TOKENS, IMAGE_WIDTH, TEXT_LEN = 257, 1024, 32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peak(device: torch.device, dtype: torch.dtype, reps: int = 5, trials: int = 3) -> dict:
    """Best FLOP/s of square matmuls (2 n^3 FLOPs each) over a few sizes and trials: the machine's
    usable peak. The best, not the mean: other load on the machine only ever slows a trial down."""
    best = {"flops_per_s": 0.0, "n": 0}
    for n in (1024, 2048, 4096) if device.type == "cpu" else (4096, 8192):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up
        for _ in range(trials):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            sync(device)
            rate = 2 * n**3 * reps / (time.perf_counter() - t0)
            if rate > best["flops_per_s"]:
                best = {"flops_per_s": rate, "n": n}
    return best


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def profile_step(fn, device: torch.device) -> dict:
    """Self time by op of one call of `fn` (device time on a GPU), the matmul ops' share and the top ops."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    times = {e.key: getattr(e, attr) / 1e6 for e in prof.key_averages()}  # seconds
    total = sum(times.values())
    top = dict(sorted(times.items(), key=lambda kv: -kv[1])[:10])
    return {
        "matmul_share": sum(t for k, t in times.items() if k in MATMUL_OPS) / total,
        "op_time_s": total,
        "top_ops_s": top,
    }


# ------------------------------------------------------------------------------------ training step
def retrieval_checkpoint(path: Path, image_width: int = IMAGE_WIDTH, **qformer) -> None:
    """A random transformers Blip2ForImageTextRetrieval, by default at BLIP-2's Q-Former size (`qformer`
    overrides Blip2QFormerConfig fields), saved at `path`. The vision tower is one layer of the right
    width: the bench feeds cached features, and the tower only contributes its final LayerNorm
    (vlbridge's ln_vision)."""
    import transformers as tf

    vision = tf.Blip2VisionConfig(
        hidden_size=image_width,
        intermediate_size=image_width,
        num_hidden_layers=1,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
    )
    # dropout off: both sides then compute the same function in train mode, so the parity check holds
    qformer = tf.Blip2QFormerConfig(
        **{
            "encoder_hidden_size": image_width,
            "use_qformer_text_input": True,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            **qformer,
        }
    )
    cfg = tf.Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        num_query_tokens=32,
        image_text_hidden_size=256,
    )
    torch.manual_seed(0)
    tf.Blip2ForImageTextRetrieval(cfg).save_pretrained(path)


def retrieval_pair(path: Path, device: torch.device):
    """vlbridge's Blip2 from the transformers checkpoint at `path`, and transformers' model (with its
    sdpa and its eager attention) wrapped to compute the same ITC + ITM."""
    import transformers as tf

    ours = Blip2.from_pretrained(path, load_vision=False).to(device).train()
    wrapped = {
        impl: TransformersItcItm(
            tf.Blip2ForImageTextRetrieval.from_pretrained(path, attn_implementation=impl),
            ours.temp.item(),
            ours.config.label_smoothing,
        )
        .to(device)
        .train()
        for impl in ("sdpa", "eager")
    }
    return ours, wrapped


def loss_parity(ours: Blip2, wrapped: dict, feats, ids, mask) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Max |loss difference| of each transformers variant against vlbridge (same inputs, same hard
    negatives), and vlbridge's ITC and ITM losses."""
    gen = lambda: torch.Generator(feats.device).manual_seed(0)  # noqa: E731
    with torch.no_grad():
        ref = ours.pretrain_losses(ids, mask, image_features=feats, generator=gen(), itg=False)
        diffs = {
            impl: max(abs(float(itc - ref.loss_itc)), abs(float(itm - ref.loss_itm)))
            for impl, (itc, itm) in ((impl, w(feats, ids, mask, gen())) for impl, w in wrapped.items())
        }
    return diffs, ref.loss_itc, ref.loss_itm


class TransformersItcItm(nn.Module):
    """ITC + ITM from transformers' BLIP-2 modules: what `Blip2.pretrain_losses(itg=False)` computes
    on one process (in-batch negatives, ITM on B positives + B + B hard negatives)."""

    def __init__(self, hf, temp: float, smoothing: float):
        super().__init__()
        self.hf = hf
        self.temp = nn.Parameter(torch.tensor(temp))  # transformers' retrieval model has none
        self.smoothing = smoothing
        for p in hf.vision_model.parameters():  # the frozen tower; its post_layernorm is ln_vision
            p.requires_grad_(False)
        hf.vision_model.post_layernorm.requires_grad_(True)

    def forward(self, features, input_ids, attention_mask, generator):
        hf, eps = self.hf, self.smoothing
        img = hf.vision_model.post_layernorm(features)  # (B, N, Dv)
        B, Q = img.shape[0], hf.query_tokens.shape[1]
        ones = lambda n, m: torch.ones(n, m, dtype=torch.long, device=img.device)  # noqa: E731
        queries = hf.qformer(
            query_embeds=hf.query_tokens.expand(B, -1, -1),
            encoder_hidden_states=img,
            encoder_attention_mask=ones(B, img.shape[1]),
        ).last_hidden_state  # (B, Q, d)
        image_feats = F.normalize(hf.vision_projection(queries), dim=-1)  # (B, Q, E)
        text = hf.qformer(
            query_embeds=hf.embeddings(input_ids=input_ids), query_length=0, attention_mask=attention_mask
        ).last_hidden_state  # (B, T, d)
        text_feat = F.normalize(hf.text_projection(text[:, 0]), dim=-1)  # (B, E)
        sim_i2t = torch.einsum("bqe,te->btq", image_feats, text_feat).amax(-1) / self.temp.clamp(0.001, 0.5)
        sim_t2i = sim_i2t.t()
        positives = torch.eye(B, dtype=torch.bool, device=img.device)
        loss_itc = (soft_cross_entropy(sim_i2t, positives, eps) + soft_cross_entropy(sim_t2i, positives, eps)) / 2

        neg_img, valid_t = sample_hard_negatives(sim_t2i.detach(), positives, generator=generator)
        neg_txt, valid_i = sample_hard_negatives(sim_i2t.detach(), positives, generator=generator)
        ids = torch.cat([input_ids, input_ids[valid_t], input_ids[neg_txt[valid_i]]])
        mask = torch.cat([attention_mask, attention_mask[valid_t], attention_mask[neg_txt[valid_i]]])
        pair_img = torch.cat([img, img[neg_img[valid_t]], img[valid_i]])
        n = len(ids)
        embeds = hf.embeddings(input_ids=ids, query_embeds=hf.query_tokens.expand(n, -1, -1))  # (n, Q+T, d)
        h = hf.qformer(
            query_embeds=embeds,
            query_length=Q,
            attention_mask=torch.cat([ones(n, Q), mask], dim=1),
            encoder_hidden_states=pair_img,
            encoder_attention_mask=ones(n, img.shape[1]),
        ).last_hidden_state
        labels = torch.zeros(n, dtype=torch.long, device=img.device)
        labels[:B] = 1
        loss_itm = F.cross_entropy(hf.itm_head(h[:, :Q]).mean(dim=1).float(), labels)
        return loss_itc, loss_itm


def make_inputs(
    batch: int,
    vocab: int,
    device: torch.device,
    image_tokens: int = IMAGE_TOKENS,
    image_width: int = IMAGE_WIDTH,
    text_len: int = TEXT_LEN,
):
    """Cached image features (B, N, Dv), Q-Former token ids starting with [CLS] and a mask with padding."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(batch, image_tokens, image_width, generator=g)
    ids = torch.randint(1000, vocab - 1, (batch, text_len), generator=g)
    ids[:, 0] = 101  # [CLS]
    mask = torch.ones_like(ids)
    mask[: batch // 2, text_len * 2 // 3 :] = 0  # some padding, as in real batches
    return feats.to(device), ids.to(device), mask.to(device)


def train_step(device: torch.device, steps: int, batch: int) -> list[dict]:
    from torch.utils.flop_counter import FlopCounterMode

    with tempfile.TemporaryDirectory() as tmp:
        retrieval_checkpoint(Path(tmp))
        ours, wrapped = retrieval_pair(Path(tmp), device)
    feats, ids, mask = make_inputs(batch, ours.config.qformer.vocab_size, device)

    # mode -> (whose parameters it trains, its loss). One generator seeded per step: the same hard negatives.
    def ours_loss(itg):
        return lambda gen: ours.pretrain_losses(ids, mask, image_features=feats, generator=gen, itg=itg).loss

    def transformers_loss(impl):
        return lambda gen: sum(wrapped[impl](feats, ids, mask, gen))

    modes = {
        "vlbridge itc+itm": ("vlbridge", ours_loss(False)),
        "transformers-sdpa itc+itm": ("transformers-sdpa", transformers_loss("sdpa")),
        "transformers-eager itc+itm": ("transformers-eager", transformers_loss("eager")),
        "vlbridge full": ("vlbridge", ours_loss(True)),
    }

    def losses(mode: str, step: int):
        return modes[mode][1](torch.Generator(device=device).manual_seed(step))

    # Parity: the same losses from the same weights and inputs (fp32, before any update).
    parity, itc, itm = loss_parity(ours, wrapped, feats, ids, mask)
    print(f"parity (fp32, max |loss difference| vs vlbridge): {parity}  (ITC {float(itc):.4f}, ITM {float(itm):.4f})")
    if max(parity.values()) > 1e-3:
        raise AssertionError(f"vlbridge and transformers compute different losses: {parity}")

    flops = {}
    for mode in modes:
        with FlopCounterMode(display=False) as counter:
            losses(mode, 0).backward()
        flops[mode] = counter.get_total_flops()
        print(f"  {mode}: {flops[mode] / 1e9:.0f} GFLOP a step", flush=True)
    params = {"vlbridge": [p for p in ours.parameters() if p.requires_grad]}
    params.update({f"transformers-{k}": [p for p in w.parameters() if p.requires_grad] for k, w in wrapped.items()})

    def clear_grads():  # after steps that are counted or profiled, not taken
        for p in (p for v in params.values() for p in v):
            p.grad = None

    clear_grads()
    counts = {k: sum(p.numel() for p in v) for k, v in params.items()}
    # vlbridge's ITG head and the ITM-only path share one optimizer: params without grads are skipped
    opts = {k: torch.optim.AdamW(v, lr=1e-6) for k, v in params.items()}
    peaks = {p: matmul_peak(device, dt) for p, dt in DTYPES.items()}

    rows = []
    for precision in ("fp32", "bf16"):
        times = {m: [] for m in modes}
        for step in range(steps + 1):  # step 0 warms up
            for mode in modes:
                opt = opts[modes[mode][0]]
                sync(device)
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss = losses(mode, step)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync(device)
                if step:
                    times[mode].append(time.perf_counter() - t0)
                print(f"  {precision} step {step} {mode}: {time.perf_counter() - t0:.2f} s", flush=True)
        again = matmul_peak(device, DTYPES[precision])  # the peak again, after the steps: keep the better
        if again["flops_per_s"] > peaks[precision]["flops_per_s"]:
            peaks[precision] = again
        for mode in modes:
            dt = sorted(times[mode])[len(times[mode]) // 2]  # median
            rows.append(
                {
                    "bench": "train_step",
                    "mode": mode,
                    "precision": precision,
                    "batch": batch,
                    "s_per_step": dt,
                    "samples_per_s": batch / dt,
                    "flops_per_step": flops[mode],
                    "flops_per_s": flops[mode] / dt,
                    "fraction_of_matmul_peak": flops[mode] / dt / peaks[precision]["flops_per_s"],
                    "trainable_params": counts[modes[mode][0]],
                    "times": times[mode],
                }
            )
        best_hf = min(r["s_per_step"] for r in rows if r["precision"] == precision and r["mode"].startswith("transf"))
        for r in rows:
            if r["precision"] == precision:
                r["speedup_vs_transformers_best"] = best_hf / r["s_per_step"]
    # Where the time goes (one bf16 step each, torch.profiler): the matmul share says how much a
    # faster step could still come from anything other than doing fewer matmul FLOPs.
    best_hf = min(
        (r for r in rows if r["precision"] == "bf16" and r["mode"].startswith("transformers")),
        key=lambda r: r["s_per_step"],
    )["mode"]
    profiles = {}
    for mode in ("vlbridge itc+itm", best_hf):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            profiles[mode] = profile_step(lambda: losses(mode, 0).backward(), device)  # noqa: B023 (called here)
        clear_grads()
        print(
            f"profile {mode}: matmul {100 * profiles[mode]['matmul_share']:.0f}% of op time; top: "
            + ", ".join(f"{k} {v:.2f}s" for k, v in list(profiles[mode]["top_ops_s"].items())[:5]),
            flush=True,
        )
    meta = {
        "parity_max_abs_loss_diff": parity,
        "matmul_peak": peaks,
        "profile_bf16": profiles,
        "shape": {
            "hidden": 768,
            "layers": 12,
            "queries": 32,
            "image_tokens": IMAGE_TOKENS,
            "image_width": IMAGE_WIDTH,
            "text_len": TEXT_LEN,
        },
    }
    return [dict(r, **meta) for r in rows]


# ------------------------------------------------------------------------------------ generation
def generation_checkpoint(path: Path) -> int:
    """A random Blip2ForConditionalGeneration: ViT (6 x 768, 224 px), BLIP-2's Q-Former, OPT-125m-shaped LM.
    Returns the image token id."""
    import transformers as tf

    vision = tf.Blip2VisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=6,
        num_attention_heads=12,
        image_size=224,
        patch_size=14,
    )
    qformer = tf.Blip2QFormerConfig(encoder_hidden_size=768)
    image_token = 50265  # one of OPT's unused vocabulary rows
    cfg = tf.Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=tf.OPTConfig().to_dict(),
        num_query_tokens=32,
        image_token_index=image_token,
    )
    torch.manual_seed(0)
    tf.Blip2ForConditionalGeneration(cfg).eval().save_pretrained(path)
    return image_token


def generation(
    device: torch.device,
    reps: int,
    dtypes=("fp32",),
    batches=(1, 8),
    new_tokens=(20, 60),
    beams=(1, 5),
) -> list[dict]:
    """Every cell of the grid precision x beams x batch x new tokens: both models on the same weights
    (cast to the precision), the same images and prompt, a length forced (min_new_tokens = max_new_tokens)."""
    import transformers as tf

    with tempfile.TemporaryDirectory() as tmp:
        image_token = generation_checkpoint(Path(tmp))
        ours = Blip2.from_pretrained(tmp).eval()
        hf = tf.Blip2ForConditionalGeneration.from_pretrained(tmp).eval()
    g = torch.Generator().manual_seed(0)
    pixels_all = torch.randn(max(batches), 3, 224, 224, generator=g)
    rows = []
    for precision in dtypes:
        ours.to(device, DTYPES[precision]), hf.to(device, DTYPES[precision])  # in place: the same weights for both
        for num_beams, batch, n in itertools.product(beams, batches, new_tokens):
            pixels = pixels_all[:batch].to(device, DTYPES[precision])
            ids = torch.tensor([[image_token] * 32 + [hf.config.text_config.bos_token_id]] * batch, device=device)
            kw = dict(max_new_tokens=n, min_new_tokens=n, num_beams=num_beams, do_sample=False)
            times, out = time_alternating(
                {
                    "vlbridge": partial(ours.generate, pixels, ids, torch.ones_like(ids), **kw),
                    "transformers": partial(
                        hf.generate, pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids), **kw
                    ),
                },
                reps,
                device,
            )
            same = torch.equal(out["vlbridge"], out["transformers"][:, -n:])
            cell = [
                {
                    "bench": "generate",
                    "mode": name,
                    "precision": precision,
                    "num_beams": num_beams,
                    "batch": batch,
                    "new_tokens": n,
                    "s_per_batch": median(ts),
                    "images_per_s": batch / median(ts),
                    "times": ts,
                    "same_ids": same,
                }
                for name, ts in times.items()
            ]
            for r in cell:
                r["speedup_vs_transformers"] = r["images_per_s"] / cell[-1]["images_per_s"]
            print(
                f"generate {precision} beams {num_beams} batch {batch} tokens {n}: "
                f"{cell[0]['speedup_vs_transformers']:.2f}x, same ids {same}",
                flush=True,
            )
            rows += cell
    return rows


def time_alternating(run: dict, reps: int, device: torch.device) -> tuple[dict, dict]:
    """reps timed calls of each function, taking turns (noise hits all alike), after one untimed call each;
    the times per name and the last outputs."""
    times, out = {k: [] for k in run}, {}
    with torch.no_grad():
        for rep in range(reps + 1):
            for name, fn in run.items():
                sync(device)
                t0 = time.perf_counter()
                out[name] = fn()
                sync(device)
                if rep:
                    times[name].append(time.perf_counter() - t0)
    return times, out


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-output")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per mode and precision")
    p.add_argument("--batch", type=int, default=0, help="training batch; default 32 on a GPU, 8 on a CPU")
    p.add_argument("--reps", type=int, default=3, help="timed generation calls per mode")
    p.add_argument("--parts", default="train,generate")
    p.add_argument("--gen-dtypes", default="fp32,bf16", help="generation precisions, of fp32,bf16")
    p.add_argument("--gen-batches", default="1,8", help="generation batch sizes (images per call)")
    p.add_argument("--gen-tokens", default="20,60", help="generation lengths (new tokens, forced)")
    p.add_argument("--gen-beams", default="1,5", help="generation beam counts (1: greedy)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    parts = args.parts.split(",")
    batch = args.batch or (32 if device.type == "cuda" else 8)
    rows = (train_step(device, args.steps, batch) if "train" in parts else []) + (
        generation(
            device,
            args.reps,
            dtypes=args.gen_dtypes.split(","),
            batches=[int(b) for b in args.gen_batches.split(",")],
            new_tokens=[int(n) for n in args.gen_tokens.split(",")],
            beams=[int(n) for n in args.gen_beams.split(",")],
        )
        if "generate" in parts
        else []
    )
    print(
        f"device: {env['device']}  torch {env['torch']}  transformers {env['transformers']}  threads {env['threads']}"
    )
    train = [r for r in rows if r["bench"] == "train_step"]
    if train:
        peaks = train[0]["matmul_peak"]
        print("matmul peak: " + ", ".join(f"{k} {v['flops_per_s'] / 1e12:.2f} TFLOP/s" for k, v in peaks.items()))
        print(
            f"{'train step (batch ' + str(batch) + ')':28} {'precision':9} {'s/step':>8} {'samples/s':>10} "
            f"{'vs transformers':>16} {'GFLOP/step':>11} {'% of peak':>10}"
        )
        for r in train:
            print(
                f"{r['mode']:28} {r['precision']:9} {r['s_per_step']:8.2f} {r['samples_per_s']:10.2f} "
                f"{r['speedup_vs_transformers_best']:15.2f}x {r['flops_per_step'] / 1e9:11.0f} "
                f"{100 * r['fraction_of_matmul_peak']:9.1f}%"
            )
    gen = [r for r in rows if r["bench"] == "generate"]
    if gen:
        print(
            f"{'generation':14} {'precision':9} {'beams':>5} {'batch':>5} {'tokens':>6} {'images/s':>9} "
            f"{'vs transformers':>16} {'same ids':>9}"
        )
        for r in gen:
            print(
                f"{r['mode']:14} {r['precision']:9} {r['num_beams']:5} {r['batch']:5} {r['new_tokens']:6} "
                f"{r['images_per_s']:9.2f} {r['speedup_vs_transformers']:15.2f}x {str(r['same_ids']):>9}"
            )
    write_results(Path(args.out) / "bench_transformers.json", env, rows)


if __name__ == "__main__":
    main()
