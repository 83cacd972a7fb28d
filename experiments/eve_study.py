"""EVE against BLIP-2 on ShapesWorld: the three-stage recipe and its ablations, on the same LM and data.

    python -m experiments.eve_study --out eve-output [--blip2 demo-output/stage2/final] [--quick]
        [--pal official|vlbridge]

Variants (each trained from the shipped recipes, then evaluated on the held-out test split):
    eve             stage 1 (pre-align, PAL) -> stage 2 (generative, PAL) -> stage 3 (SFT)
    eve_no_pal      the same with pal_weight 0 in stages 1 and 2 (no teacher at all)
    eve_skip_stage1 stage 2 from a fresh patch embedding -> stage 3
    eve_nonsquare   the full recipe on 96x64 scenes (a 6x4 grid of cells), evaluated on 96x64 scenes
Measured for each: caption attribute accuracy and VQA accuracy, and the LM's loss on text-only
captions and questions before training and after stages 2 and 3 (the paper notes that stage 2 costs
language ability). With --blip2, inference latency per image of BLIP-2 and EVE, side by side.
Writes <out>/eve_study.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.report import choose, fmt, html_table
from vlbridge.data import shapesworld as sw
from vlbridge.evaluation import evaluate as ev
from vlbridge.models.eve.configuration import PALS
from vlbridge.models.eve.modeling import EVE, EVEConfig, EVEProcessor
from vlbridge.training.recipe import RECIPES, load_recipe
from vlbridge.training.train import train

log = logging.getLogger("experiments.eve_study")

VARIANTS = {
    "eve": {},
    "eve_no_pal": {"pal_weight": 0.0},
    "eve_skip_stage1": {"skip_stage1": True},
    "eve_nonsquare": {"width": 96, "height": 64},
}
# text-only sequences for the language-ability measure: the prompts the recipes train with (EVEConfig's)
TEXT_PROMPTS = (EVEConfig.caption_prompt, EVEConfig.vqa_prompt)
SIZES = {
    "full": dict(captions=300, vqa_scenes=150, language=200, latency=32),
    "quick": dict(captions=8, vqa_scenes=4, language=8, latency=2),
}


@torch.no_grad()
def language_loss(lm, tokenizer, scenes: list[sw.Scene], prompts: tuple[str, str]) -> dict[str, float]:
    """Mean next-token loss (nats/token) of the LM alone on text-only ShapesWorld: "{caption prompt}
    {caption}" and "{vqa prompt with the question} {answer}", one sequence each, no image."""
    caption_prompt, vqa_prompt = prompts
    texts = {
        "caption": [f"{caption_prompt} {s.caption}" for s in scenes],
        "qa": [f"{vqa_prompt.format(q)} {a}" for s in scenes for q, a in s.qa[:2]],
    }
    lm = lm.eval()
    out = {}
    for name, batch in texts.items():
        total = count = 0.0
        for i in range(0, len(batch), 64):
            enc = tokenizer(batch[i : i + 64], return_tensors="pt", padding=True)
            ids, mask = enc["input_ids"], enc["attention_mask"]
            pos = (mask.cumsum(1) - 1).clamp(min=0)  # left or right padding: real tokens from position 0
            logits = lm(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, :-1].float()
            target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total += F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum").item()
            count += (target != -100).sum().item()
        out[name] = total / count
    return out


@torch.no_grad()
def latency(model, processor, images, prompt: str, new_tokens: int = 20, warmup: int = 2) -> dict:
    """Seconds per image for one image at a time: preprocessing, the whole visual path and greedy
    decoding of exactly `new_tokens` tokens (min = max, so both designs do the same decoding work)."""
    model.eval()
    decode = dict(num_beams=1, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    for image in images[:warmup]:
        model.generate(**processor(images=[image], text=[prompt]), **decode)
    t0 = time.perf_counter()
    for image in images:
        model.generate(**processor(images=[image], text=[prompt]), **decode)
    return {
        "seconds_per_image": (time.perf_counter() - t0) / len(images),
        "n": len(images),
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
    }


def _stage(
    out: Path, stage: int, name: str, init_from: str | None, variant: dict, quick: list[str], pal: str | None = None
) -> Path:
    data = [f"data.width={variant.get('width', 64)}", f"data.height={variant.get('height', 64)}"]
    over = [f"out_dir={out / name / f'stage{stage}'}", *data, *quick]
    if init_from is not None:
        over.append(f"init_from={init_from}")
    elif stage > 1:  # stage 1 skipped: a fresh model as stage 1 would build it, trained from this stage on
        eve = json.loads((RECIPES / "eve_shapesworld_stage1.json").read_text())["eve"]
        over += ["init_from=", f"eve={json.dumps(eve)}"]
    if init_from is None and pal is not None:  # a fresh model: its PAL design (later stages keep it)
        over.append(f"eve.pal={pal}")
    if stage < 3 and "pal_weight" in variant:
        over.append(f"eve.pal_weight={variant['pal_weight']}")
    return train(load_recipe(f"eve_shapesworld_stage{stage}", over))


def run_variant(out: Path, name: str, variant: dict, size: dict, quick: list[str], pal: str | None = None) -> dict:
    world = sw.ShapesWorldConfig(width=variant.get("width", 64), height=variant.get("height", 64))
    scenes = ev.split_scenes("test", max(size["captions"], size["language"]), world)
    res: dict = {"variant": variant, "pal": pal or EVEConfig.pal, "timings_s": {}}
    # the LM as shipped, before any EVE training (the same LM and tokenizer every variant starts from)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm_path = load_recipe("eve_shapesworld_stage1").eve.lm.name_or_path
    res["language_loss_before"] = language_loss(
        AutoModelForCausalLM.from_pretrained(lm_path),
        AutoTokenizer.from_pretrained(lm_path),
        scenes[: size["language"]],
        TEXT_PROMPTS,
    )
    stage_dir = None
    for stage in (1, 2, 3):
        if stage == 1 and variant.get("skip_stage1"):
            continue
        t = time.time()
        stage_dir = _stage(out, stage, name, None if stage_dir is None else str(stage_dir), variant, quick, pal)
        res["timings_s"][f"stage{stage}"] = time.time() - t
        model, processor = EVE.from_pretrained(stage_dir), EVEProcessor.from_pretrained(stage_dir)
        if stage >= 2:
            res[f"language_loss_after_stage{stage}"] = language_loss(
                model.lm, processor.tokenizer, scenes[: size["language"]], TEXT_PROMPTS
            )
    t = time.time()
    res["captions"] = ev.shapesworld_captions(model, processor, scenes[: size["captions"]], world)
    res["vqa"] = ev.shapesworld_vqa(model, processor, scenes[: size["vqa_scenes"]], world)
    res["timings_s"]["evaluation"] = time.time() - t
    res["final"] = str(stage_dir)
    return res


def run(out: Path, variants: list[str], blip2: str | None = None, quick: bool = False, pal: str | None = None) -> dict:
    size = SIZES["quick" if quick else "full"]
    q = ["steps=3", "data.num_samples=64", "batch_size=8", "save_every=0"] if quick else []
    report: dict = {}
    for name in variants:
        log.info("EVE study: %s", name)
        report[name] = run_variant(out, name, VARIANTS[name], size, q, pal)
    if blip2 is not None and "eve" in report:
        from vlbridge.models.blip2.modeling import Blip2
        from vlbridge.models.blip2.processing import Blip2Processor

        world = sw.ShapesWorldConfig()
        images = [sw.render(s, world) for s in ev.split_scenes("test", size["latency"], world)]
        b, bp = Blip2.from_pretrained(blip2), Blip2Processor.from_pretrained(blip2)
        e = EVE.from_pretrained(report["eve"]["final"])
        ep = EVEProcessor.from_pretrained(report["eve"]["final"])
        report["latency"] = {
            "blip2": latency(b, bp, images, b.config.caption_prompt),
            "eve": latency(e, ep, images, e.config.caption_prompt),
        }
        report["latency"]["eve_over_blip2"] = (
            report["latency"]["eve"]["seconds_per_image"] / report["latency"]["blip2"]["seconds_per_image"]
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "eve_study.json").write_text(json.dumps(report, indent=2))
    return report


def summary(report: dict) -> dict:
    """One row per variant: the numbers to compare."""
    rows = {}
    for name, r in report.items():
        if name == "latency":
            continue
        rows[name] = {
            **{
                f"caption_{k}": round(v, 3)
                for k, v in r["captions"]["metrics"].items()
                if k in ("color", "shape", "size", "count")
            },
            "vqa": round(r["vqa"]["accuracy"], 3),
            **{k: {t: round(v, 3) for t, v in r[k].items()} for k in r if k.startswith("language_loss")},
        }
    return rows


def html_section(report: dict, blip2: dict | None = None) -> str:
    """The demo report's EVE section: the variants next to BLIP-2 (blip2: {"captions", "vqa"} results of
    the demo's stage-2 model on the same test split), language ability and latency."""
    rows = []
    results = {
        **({"blip2 (demo stage 2)": blip2} if blip2 else {}),
        **{k: v for k, v in report.items() if k != "latency"},
    }
    for name, r in results.items():
        m = r["captions"]["metrics"]
        rows.append(
            [
                name,
                *(fmt(m[a]) for a in ("color", "shape", "size", "count", "relation")),
                fmt(r["vqa"]["accuracy"]),
                str(r["captions"]["n"]),
            ]
        )
    table = html_table(["model", "caption colour", "shape", "size", "count", "relation", "VQA", "n"], rows)
    lang = []
    for name, r in report.items():
        if name == "latency":
            continue
        lang.append(
            [
                name,
                *(
                    fmt(r[k]["caption"]) + " / " + fmt(r[k]["qa"]) if k in r else fmt(None)
                    for k in ("language_loss_before", "language_loss_after_stage2", "language_loss_after_stage3")
                ),
            ]
        )
    lang_table = html_table(["variant", "text-only loss before (caption / QA)", "after stage 2", "after stage 3"], lang)
    lat = report.get("latency")
    lat_html = (
        ""
        if not lat
        else (
            "<p>Inference latency per image (one image at a time, 20 greedy tokens, "
            f"{lat['eve']['threads']} threads): BLIP-2 {lat['blip2']['seconds_per_image'] * 1000:.1f} ms, "
            f"EVE {lat['eve']['seconds_per_image'] * 1000:.1f} ms (EVE / BLIP-2 = {lat['eve_over_blip2']:.2f}).</p>"
        )
    )
    return (
        "<h2 id='eve'>EVE against BLIP-2 (same LM, same data, test split)</h2>"
        "<p>eve: the three stages (pre-align with PAL, generative pre-training with PAL, SFT); eve_no_pal: no "
        "teacher; eve_skip_stage1: stage 2 from a fresh patch embedding; eve_nonsquare: 96x64 scenes.</p>"
        + table
        + lat_html
        + "<h3>Language ability (LM loss on text-only captions and questions, nats/token)</h3>"
        + lang_table
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="eve-output")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    p.add_argument("--blip2", default=None, help="a trained BLIP-2 stage-2 model, for the latency comparison")
    p.add_argument("--quick", action="store_true", help="a few steps only (a smoke test)")
    p.add_argument("--pal", choices=PALS, default=None, help="the PAL design (default: the recipe's, official)")
    args = p.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("vlbridge").setLevel(logging.INFO)
    variants = choose(args.variants, VARIANTS)
    report = run(Path(args.out), variants, args.blip2, args.quick, args.pal)
    print(json.dumps({"summary": summary(report), "latency": report.get("latency")}, indent=2))


if __name__ == "__main__":
    main()
