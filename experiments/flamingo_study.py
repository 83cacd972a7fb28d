"""Flamingo on ShapesWorld: the shipped recipe and the paper's two ablations, with few-shot evaluation.

    python -m experiments.flamingo_study --out flamingo-output [--steps N] [--quick]

Variants (trained from the shipped recipe `flamingo_shapesworld`, then evaluated 0/1/4/8-shot on the
val split: captioning with per-attribute scores, VQA, the in-context task whose answer attribute only
the demonstrations reveal, and the binding task whose words only several demonstrations resolve):
    flamingo     tanh-gated cross-attention, each token attends to its latest image (the paper)
    no_tanh      gates removed: x + xattn(x), x + ffn(x) (the LM is perturbed from step 0)
    all_images   each token attends to every image so far, not only the latest
Writes <out>/flamingo_study.json; each variant also has its training log under <out>/<variant>/.
The shipped recipe's targets (`targets`) are checked on its own results.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from experiments.report import choose, figure_html, fmt, html_table, log_series, plot_curves
from vlbridge.evaluation.fewshot import binding_text, fewshot_summary, shapesworld_fewshot
from vlbridge.models.flamingo.modeling import Flamingo, FlamingoProcessor
from vlbridge.training.train import load_recipe, train

log = logging.getLogger("experiments.flamingo_study")

# What the shipped recipe should reach on the val split (shots -> threshold), and the binding task's
# accuracy should rise strictly with the shots.
TARGETS = {
    "binding_8shot": ("binding", 8, 0.9),
    "caption_color_4shot": ("caption_color", 4, 0.8),
    "caption_shape_4shot": ("caption_shape", 4, 0.8),
    "vqa_4shot": ("vqa", 4, 0.6),
}


def _at(summary: dict, what: str, k: int) -> float | None:
    """One headline number at k shots (summaries read back from JSON have string keys)."""
    table = {
        "binding": lambda r: r["accuracy"],
        "caption_color": lambda r: r["color"],
        "caption_shape": lambda r: r["shape"],
        "vqa": lambda r: r,
    }
    source = summary["caption_random"] if what.startswith("caption") else summary.get(what, {})
    row = source.get(k, source.get(str(k)))
    return None if row is None else float(table[what](row))


def targets(summary: dict) -> dict:
    """{name: {"target", "reached", "met"}} for the Flamingo targets, in the form of the demo's targets."""
    rows = {}
    for name, (what, k, wanted) in TARGETS.items():
        got = _at(summary, what, k)
        rows[f"flamingo_{name}"] = {"target": wanted, "reached": got, "met": got is not None and got >= wanted}
    shots = sorted(int(k) for k in summary.get("binding", {}))
    accs = [_at(summary, "binding", k) for k in shots]
    rows["flamingo_binding_rises"] = {
        "target": " < ".join(f"{k}-shot" for k in shots),
        "reached": " < ".join(f"{a:.3f}" for a in accs),
        "met": len(accs) > 1 and all(a < b for a, b in zip(accs, accs[1:])),
    }
    return rows


def lm_text_binding(model_dir: str, shots, n: int) -> dict[int, float]:
    """The frozen LM's own binding ability (evaluation.fewshot.binding_text) on the val episodes the
    few-shot evaluation uses: whether the LM can tie a word to a colour or shape in context at all."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vlbridge.data.interleaved import BindingDocs, DocumentData

    lm_path = Path(model_dir) / Flamingo.read_config(Path(model_dir)).lm.name_or_path  # saved beside the bridge
    source = BindingDocs(
        DocumentData(kind="shapesworld_binding", split="val", max_images=max(shots) + 1, num_samples=500)
    )
    lm, tokenizer = AutoModelForCausalLM.from_pretrained(lm_path), AutoTokenizer.from_pretrained(lm_path)
    return binding_text(lm, tokenizer, source, shots, n)


VARIANTS = {
    "flamingo": [],
    "no_tanh": ["flamingo.gating=none"],
    "all_images": ["flamingo.only_attend_immediate_media=false"],
}


def run_variant(out: Path, name: str, overrides: list[str], shots, n: int, beams: int) -> dict:
    t = time.time()
    final = train(load_recipe("flamingo_shapesworld", [f"out_dir={out / name}", *overrides]))
    train_s = time.time() - t
    model, processor = Flamingo.from_pretrained(final).eval(), FlamingoProcessor.from_pretrained(final)
    t = time.time()
    fewshot = shapesworld_fewshot(model, processor, shots, n, beams)
    log_rows = [json.loads(x) for x in (out / name / "log.jsonl").read_text().splitlines()]
    return {
        "overrides": overrides,
        "fewshot": fewshot,
        "summary": fewshot_summary(fewshot),
        "final_loss": next((r["loss"] for r in reversed(log_rows) if "loss" in r), None),
        "curve": log_rows,
        "timings_s": {"train": train_s, "evaluation": time.time() - t},
        "final": str(final),
    }


def run(
    out: Path,
    variants: list[str],
    steps: int | None = None,
    shots=(0, 1, 4, 8),
    n: int = 64,
    beams: int = 1,
    quick: bool = False,
) -> dict:
    extra = [f"steps={steps}"] if steps else []
    if quick:
        extra += ["steps=3", "save_every=0"]
        shots, n = (0, 1), 4
    report = {name: run_variant(out, name, VARIANTS[name] + extra, shots, n, beams) for name in variants}
    for r in report.values():
        r["targets"] = targets(r["summary"])
        r["lm_text_binding"] = lm_text_binding(r["final"], [k for k in shots if k], n)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flamingo_study.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def html_section(report: dict, out: Path) -> str:
    """The demo report's Flamingo section: few-shot results per variant and shot count, training curves
    (also written to out/curve_flamingo_loss.png)."""
    rows = []
    for name, r in report.items():
        sm = r["summary"]
        for k in sm["vqa"]:
            cap = sm["caption_random"][k]
            rows.append(
                [
                    name,
                    str(k),
                    *(fmt(cap[a]) for a in ("color", "shape", "count", "exact")),
                    fmt(sm["caption_rices"][k]["color"]),
                    fmt(sm["vqa"][k]),
                    fmt(sm["incontext"][k]["accuracy"]),
                    fmt(sm["incontext"][k]["format_accuracy"]),
                    f"{fmt(sm['binding'][k]['accuracy'])} &plusmn; {fmt(sm['binding'][k]['stderr'])}",
                    fmt(sm["binding_ideal"][k]),
                ]
            )
    table = html_table(
        [
            "variant",
            "shots",
            "caption colour",
            "shape",
            "count",
            "exact",
            "colour (RICES)",
            "VQA",
            "in-context acc.",
            "in-context format",
            "binding acc. ± s.e.",
            "binding, ideal learner",
        ],
        rows,
    )
    text = next((r["lm_text_binding"] for r in report.values() if r.get("lm_text_binding")), None)
    lm_line = (
        ""
        if not text
        else "<p>The frozen LM alone, the binding task told in words (each image replaced by its object; "
        "forced choice between the episode's two words, chance 0.5): "
        + ", ".join(f"{k}-shot {fmt(v)}" for k, v in text.items())
        + ". What the LM cannot do from text, a Flamingo built on it has no mechanism to do from images.</p>"
    )
    series = [(name, xs, ys) for name, r in report.items() for _, xs, ys in log_series(r["curve"], ["loss"])]
    title = "Flamingo training loss"
    plot = plot_curves(title, series, out / "curve_flamingo_loss.png")
    steps = {n: r["curve"][-1].get("step") if r["curve"] else None for n, r in report.items()}
    return (
        "<h2 id='flamingo'>Flamingo: few-shot on ShapesWorld (val split)</h2>"
        f"<p>Trained steps per variant: {fmt(steps)}. Captions: demonstrations chosen at random unless marked "
        "RICES; attribute accuracy of the generated caption. In-context task: the attribute to answer "
        "(colour, shape, size or count) is shown only by the demonstrations; format = an answer of the "
        "right attribute. Binding: two words of the LM's vocabulary are bound per episode to two values of "
        "colour or shape, so one demonstration is ambiguous; the ideal learner is the Bayes-optimal accuracy on "
        "the same episodes. no_tanh = gates removed; all_images = tokens attend to every earlier image.</p>"
        + table
        + lm_line
        + figure_html(plot, title)
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="flamingo-output")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.add_argument("--n", type=int, default=64, help="queries per few-shot setting")
    p.add_argument("--quick", action="store_true", help="a few steps only (a smoke test)")
    args = p.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("vlbridge").setLevel(logging.INFO)
    variants = choose(args.variants, VARIANTS)
    report = run(Path(args.out), variants, args.steps, n=args.n, quick=args.quick)
    print(json.dumps({k: v["summary"] for k, v in report.items()}, indent=1))


if __name__ == "__main__":
    main()
