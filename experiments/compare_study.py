"""The designs side by side: BLIP-2, Flamingo, EVE and LLaVA on ShapesWorld, each measured the same way.

    python -m experiments.compare_study --out compare-output [--quick]
        [--models blip2=demo-output/stage2/final flamingo=... eve=... llava=...]
        [--retrieval blip2=demo-output/stage1/final] [--fewshot flamingo=demo-output/flamingo/flamingo_study.json]

Every model is loaded with `vlbridge.load` and asked only what the interface answers (`tasks`, `stages`,
`freeze_for_stage`, `generate`, the processor's `prompt_inputs`); the study never asks which design it holds.
Measured for each, with the same scenes, prompts (each model's own `caption_prompt` / `vqa_prompt`) and
decoding:
    captions, VQA     attribute accuracy and VQA accuracy, zero-shot, on the held-out test split and the
                      compositional split (colour-shape pairs never seen in training)
    retrieval         ITC / ITC + ITM R@1 where the model has it, or a model given for it (BLIP-2's stage 1)
    few-shot          for models that take demonstrations ("in_context"): the k-shot numbers of their own
                      study, passed in (val split), not recomputed
    parameters        total, and trainable: what some stage of the model's training updated (its recipes'
                      stages through freeze_for_stage)
    tokens per image  the positions the LM holds after the prompt with the image (its KV cache, read by a
                      forward hook on the LM during generate) less the prompt's own text tokens, and visual
                      tokens it reads by cross-attention instead (a per-call context with `media` (B, N, n, D))
    latency           seconds per image, one at a time, exactly 20 greedy tokens (eve_study.latency)
    language          the LM's loss on text-only captions and questions: the shipped LM, and the LM the
                      trained model holds (equal when the design keeps it frozen: measured, not assumed)
    budget            steps, samples seen and training seconds of the run and the runs it started from
                      (recipe.json's init_from), from recipe.json and log.jsonl beside each model
Writes <out>/compare_study.json (design -> results) and <out>/compare_designs.png. `train_llava` trains the
shipped LLaVA recipe, which no other part of the demo trains.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from experiments.eve_study import TEXT_PROMPTS, language_loss, latency
from experiments.report import _figure, _save, figure_html, fmt, html_table
from vlbridge import load
from vlbridge.assets import SHAPESWORLD
from vlbridge.data import shapesworld as sw
from vlbridge.evaluation import evaluate as ev
from vlbridge.training.train import load_recipe, train

log = logging.getLogger("experiments.compare_study")

SIZES = {
    "full": dict(captions=300, vqa_scenes=150, retrieval=500, language=200, latency=32, warmup=2),
    "quick": dict(captions=8, vqa_scenes=4, retrieval=16, language=8, latency=2, warmup=1),
}
SPLITS = ("test", "compositional")
NEW_TOKENS = 20  # latency: greedy tokens per image, the same for every design
PLOT = "compare_designs.png"
BARS = (("caption colour", "color"), ("caption shape", "shape"), ("caption count", "count"), ("VQA", None))


def train_llava(out: Path, quick: bool = False) -> Path:
    """The shipped recipe `llava_shapesworld` (the projector alone, LM frozen) into `out`; its final model."""
    q = ["steps=3", "data.num_samples=64", "batch_size=8", "save_every=0"] if quick else []
    return train(load_recipe("llava_shapesworld", [f"out_dir={out}", *q]))


# ---------------------------------------------------------------- what each measure reads


@torch.no_grad()
def tokens_per_image(model, processor, image, prompt: str) -> dict:
    """What the LM reads for one image: `in_sequence`, the positions of its sequence (its KV cache after the
    prompt, in a one-token greedy generate) beyond the prompt tokenized as text alone; and
    `cross_attended`, the visual tokens per image handed to its layers with the call (a keyword whose value
    carries `media` (B, N, n, D)) rather than placed in the sequence; 0 when there are none."""
    seen = {"length": 0, "cross": 0}

    def hook(module, args, kwargs, output):  # a forward hook sees the keywords that pre-hooks added
        # positions the LM attends over after this call: its KV cache (the prompt may have been prefilled
        # into it by another module, e.g. the LM's body), or without a cache the call's own tokens
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        x = kwargs.get("inputs_embeds")
        x = kwargs.get("input_ids", args[0] if args else None) if x is None else x
        length = cache.get_seq_length() if hasattr(cache, "get_seq_length") else x.shape[1]
        seen["length"] = max(seen["length"], length)
        for value in kwargs.values():
            media = getattr(value, "media", None)
            if torch.is_tensor(media) and media.dim() == 4:
                seen["cross"] = media.shape[2]

    handle = model.lm.register_forward_hook(hook, with_kwargs=True)
    try:
        model.generate(**model.prepare_inputs(processor.prompt_inputs([image], [prompt])), max_new_tokens=1)
    finally:
        handle.remove()
    text = len(processor.tokenizer(prompt).input_ids)
    return {
        "in_sequence": seen["length"] - text,
        "cross_attended": seen["cross"],
        "lm_sequence": seen["length"],
        "prompt_text_tokens": text,
        "prompt": prompt,
    }


def _run_dir(model_dir: Path) -> Path | None:
    """The training run a model directory came from: its parent (<run>/final) or grandparent
    (<run>/checkpoints/<step>) when that holds recipe.json."""
    return next((p for p in Path(model_dir).resolve().parents[:2] if (p / "recipe.json").is_file()), None)


def train_seconds(rows: list[dict]) -> float | None:
    """Seconds of training steps in a run's log.jsonl rows: the last elapsed_s, plus the last one before
    each resume (a resumed run's clock starts again at 0). None: no row has elapsed_s."""
    total, last = 0.0, None
    for r in rows:
        if "elapsed_s" in r:
            if last is not None and r["elapsed_s"] < last:
                total += last
            last = r["elapsed_s"]
    return None if last is None else total + last


def training_runs(model_dir: str | Path) -> list[dict]:
    """The runs that made `model_dir`, first to last: the run above it, and through each recipe's init_from
    the runs it started from. Per run: stage, steps, samples seen (steps x summed batch sizes x grad_accum,
    per process) and the seconds of its training steps (train_seconds: not probes, not saving)."""
    runs, path = [], Path(model_dir)
    while (run := _run_dir(path)) is not None:
        recipe = json.loads((run / "recipe.json").read_text())
        batch = sum(d["batch_size"] for d in recipe.get("datasets") or ()) or recipe["batch_size"]
        logfile = run / "log.jsonl"
        rows = [json.loads(x) for x in logfile.read_text().splitlines() if x.strip()] if logfile.exists() else []
        runs.insert(
            0,
            {
                "run": str(run),
                "stage": recipe.get("stage", 1),
                "steps": recipe["steps"],
                "batch": batch * recipe.get("grad_accum", 1),
                "samples": recipe["steps"] * batch * recipe.get("grad_accum", 1),
                "seconds": train_seconds(rows),
            },
        )
        if not recipe.get("init_from"):
            break
        path = Path(recipe["init_from"])
    return runs


def budget(runs: list[dict]) -> dict:
    seconds = [r["seconds"] for r in runs]
    return {
        "steps": sum(r["steps"] for r in runs),
        "samples": sum(r["samples"] for r in runs),
        "train_seconds": None if None in seconds else sum(seconds),
        "runs": runs,
    }


def parameters(model, runs: list[dict]) -> dict:
    """total; trainable = the model's parameters that the stage of some run of its training updated (each
    run's stage set through freeze_for_stage; a part only an earlier model had, such as BLIP-2's stage-1
    heads, is not in this model and not counted); bridge_saved = what the design saves as its bridge (an LM
    that trained is saved as a backbone instead). Leaves the model frozen as its last stage trains it."""
    updated, per_stage = {}, {}
    for stage in sorted({r["stage"] for r in runs if r["stage"] in model.stages}):
        counts = model.freeze_for_stage(stage)
        per_stage[str(stage)] = {part: c["trainable"] for part, c in counts.items() if c["trainable"]}
        updated |= {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(updated.values()),
        "bridge_saved": sum(t.numel() for t in model.bridge_state_dict().values()),  # model.safetensors' elements
        "trainable_by_stage": per_stage,
        "parts": {part: c["trainable"] + c["frozen"] for part, c in model.group_counts().items()},
    }


def lm_weights_change(before, after) -> float | None:
    """Largest absolute difference between two LMs' tensors of the same name (None: different shapes)."""
    a, b = before.state_dict(), after.state_dict()
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return None
    return max((float((a[k].float() - b[k].float()).abs().max()) for k in a), default=0.0)


def fewshot_rows(summary: dict) -> dict:
    """A few-shot summary (evaluation.fewshot.fewshot_summary, as flamingo_study stores it) -> per shot count
    the numbers this study shows (keys as strings, as read back from JSON)."""
    summary = summary.get("summary", summary)
    out = {}
    for k, vqa in summary["vqa"].items():
        cap = summary["caption_random"][k]
        ic = (summary.get("incontext") or {}).get(k, {})
        binding = (summary.get("binding") or {}).get(k, {})
        out[str(k)] = {
            "vqa": vqa,
            **{f"caption_{a}": cap[a] for a in ("color", "shape", "count")},
            "incontext": ic.get("accuracy"),
            "binding": binding.get("accuracy"),
        }
    return out


# ---------------------------------------------------------------- one design


def measure(
    name: str, path: str | Path, size: dict, world, retrieval: str | Path | None, fewshot: dict | None, shipped
) -> dict:
    t0 = time.time()
    model, processor = load(path)
    log.info("compare: %s (%s) from %s", name, model.model_type, path)
    model.require_task("caption")
    model.require_task("vqa")
    res: dict = {"dir": str(path), "model_type": model.model_type, "tasks": sorted(model.tasks)}
    ret_model, ret_processor = (model, processor) if "retrieval" in model.tasks else (None, None)
    if retrieval is not None:
        ret_model, ret_processor = load(retrieval)
        ret_model.require_task("retrieval")
    res["retrieval_dir"] = None if ret_model is None else str(retrieval or path)
    for split in SPLITS:
        scenes = ev.split_scenes(split, max(size["captions"], size["vqa_scenes"]), world)
        res[split] = {
            "captions": ev.shapesworld_captions(model, processor, scenes[: size["captions"]], world),
            "vqa": ev.shapesworld_vqa(model, processor, scenes[: size["vqa_scenes"]], world),
            "retrieval": None
            if ret_model is None
            else ev.shapesworld_retrieval(
                ret_model, ret_processor, ev.retrieval_scenes(split, size["retrieval"], world), world
            ),
        }
    if fewshot is not None:
        model.require_task("in_context")
        res["fewshot"] = {"split": "val", "shots": fewshot_rows(fewshot)}
    else:
        res["fewshot"] = None

    scenes = ev.split_scenes("test", max(size["latency"], size["language"]), world)
    images = [sw.render(s, world) for s in scenes[: size["latency"]]]  # latency warms up on the first ones
    res["tokens_per_image"] = tokens_per_image(model, processor, images[0], model.config.caption_prompt)

    def inputs(images, text):  # what eve_study.latency calls the processor with, through the interface
        return model.prepare_inputs(processor.prompt_inputs(images, text))

    res["latency"] = {
        **latency(model, inputs, images, model.config.caption_prompt, NEW_TOKENS, size["warmup"]),
        "prompt": model.config.caption_prompt,
    }
    # the LM the trained model holds, as it saved it (the design's lm/ folder), against the shipped one
    from transformers import AutoModelForCausalLM

    lm_path = model.config.lm.name_or_path
    lm = AutoModelForCausalLM.from_pretrained(lm_path)
    after = language_loss(lm, shipped["tokenizer"], scenes[: size["language"]], TEXT_PROMPTS)
    res["language_loss"] = {
        "before": shipped["loss"],
        "after": after,
        "unchanged": after == shipped["loss"],
        "lm_max_weight_change": lm_weights_change(shipped["lm"], lm),
        "lm": str(lm_path),
    }
    runs = training_runs(path)
    res["parameters"] = parameters(model, runs)
    res["budget"] = budget(runs)
    res["seconds"] = time.time() - t0
    return res


def run(
    out: Path,
    models: dict[str, str | Path],
    retrieval: dict[str, str | Path] | None = None,
    fewshot: dict | None = None,
    quick: bool = False,
) -> dict:
    """models: design name -> a trained model directory; retrieval: name -> a model that retrieves for it
    (BLIP-2's stage 1); fewshot: name -> its few-shot summary (flamingo_study's `summary`), for models
    that take demonstrations. Returns (and writes to out/compare_study.json) name -> results."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    retrieval, fewshot = retrieval or {}, fewshot or {}
    unknown = sorted((set(retrieval) | set(fewshot)) - set(models))
    if unknown:
        raise ValueError(f"retrieval / fewshot given for {unknown}, which are not among the models {list(models)}")
    size = SIZES["quick" if quick else "full"]
    world = sw.ShapesWorldConfig()
    scenes = ev.split_scenes("test", size["language"], world)
    lm, tokenizer = (
        AutoModelForCausalLM.from_pretrained(SHAPESWORLD / "lm"),
        AutoTokenizer.from_pretrained(SHAPESWORLD / "lm"),
    )
    shipped = {"lm": lm, "tokenizer": tokenizer, "loss": language_loss(lm, tokenizer, scenes, TEXT_PROMPTS)}
    report = {
        name: measure(name, path, size, world, retrieval.get(name), fewshot.get(name), shipped)
        for name, path in models.items()
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_study.json").write_text(json.dumps(report, indent=2, default=str))
    plot(report, out / PLOT)
    return report


# ---------------------------------------------------------------- the picture and the report section


def _bar_value(r: dict, key: str | None) -> float:
    return r["test"]["vqa"]["accuracy"] if key is None else r["test"]["captions"]["metrics"][key]


def plot(report: dict, path: Path) -> Path:
    """Grouped bars: per measure (caption colour, shape, count, VQA; test split, zero-shot), one bar per design."""
    fig = _figure((5.2, 2.8))
    ax = fig.subplots()
    names = list(report)
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(BARS))]
        ax.bar(xs, [_bar_value(report[name], key) for _, key in BARS], width, label=name)
    ax.set_xticks(range(len(BARS)), [label for label, _ in BARS], fontsize="small")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (test split)", fontsize="small")
    ax.set_title("The designs side by side (zero-shot)", fontsize="medium")
    ax.grid(axis="y", alpha=0.3)
    ax.tick_params(labelsize="small")
    fig.legend(loc="outside right upper", fontsize="small", frameon=False)
    return _save(fig, path)


def _slash(values) -> str:
    return " / ".join(fmt(v) for v in values)


def _recall(r: dict | None) -> str:
    return "&ndash;" if r is None else _slash((r["itc"]["i2t_r1"], r["itc_itm"]["i2t_r1"]))


def _fewshot(r: dict) -> str:
    if not r["fewshot"]:
        return "&ndash;"
    shots = r["fewshot"]["shots"]
    k = max(shots, key=int)
    return f"{k}-shot: {fmt(shots[k]['vqa'])}"


def html_section(report: dict, out: Path) -> str:
    """The demo report's comparison: one row per design, and the bars (also written to out/compare_designs.png)."""
    rows = []
    for name, r in report.items():
        tok, lang, b = r["tokens_per_image"], r["language_loss"], r["budget"]
        zero_shot = " (0-shot)" if "in_context" in r["tasks"] else ""  # its few-shot column is the fair one
        rows.append(
            [
                f"{name} ({r['model_type']})",
                _slash(r["test"]["captions"]["metrics"][a] for a in ("color", "shape", "count")),
                fmt(r["test"]["vqa"]["accuracy"]) + zero_shot,
                _slash(r["compositional"]["captions"]["metrics"][a] for a in ("color", "shape")),
                fmt(r["compositional"]["vqa"]["accuracy"]) + zero_shot,
                _recall(r["test"]["retrieval"]),
                _fewshot(r),
                f"{r['parameters']['trainable']:,} / {r['parameters']['total']:,}",
                f"{tok['in_sequence']}"
                + (f" + {tok['cross_attended']} by cross-attention" if tok["cross_attended"] else ""),
                f"{r['latency']['seconds_per_image'] * 1000:.1f}",
                f"{_slash(lang['before'].values())} &rarr; {_slash(lang['after'].values())}",
                f"{b['samples']:,} in {fmt(b['train_seconds'])} s ({len(b['runs'])} run{'s' * (len(b['runs']) > 1)})",
            ]
        )
    table = html_table(
        [
            "design",
            "caption colour / shape / count",
            "VQA",
            "compositional colour / shape",
            "compositional VQA",
            "i2t R@1 ITC / +ITM",
            "few-shot VQA (val)",
            "trainable / total parameters",
            "LM tokens per image",
            "ms per image",
            "text-only LM loss caption / QA: shipped → trained",
            "training samples",
        ],
        rows,
    )
    title = "The designs side by side (zero-shot)"
    figure = figure_html(plot(report, out / PLOT), title)
    first = next(iter(report.values()), None)
    n = "" if first is None else f"{first['test']['captions']['n']} test scenes, "
    threads = "" if first is None else f", {first['latency']['threads']} threads"
    return (
        "<h2 id='compare'>The designs side by side (same scenes, same measures)</h2>"
        f"<p>Every model through the one interface ({n}each model's own prompts, greedy decoding), "
        "zero-shot. A design that takes demonstrations is marked 0-shot: Flamingo's recipe trains on captioned "
        "images and in-context documents, never on a lone question, so its fair VQA number is few-shot (its "
        "own study, val split). Retrieval only where a model has it, or a model given for it (BLIP-2: its "
        "stage-1 model). Trainable = what some stage of the model's training updated. LM tokens "
        "per image: positions in the LM's sequence, plus visual tokens read through cross-attention. "
        f"Latency: one image at a time, {NEW_TOKENS} greedy tokens{threads}. Text-only loss in nats/token: "
        "equal before and after when the LM stayed frozen (Flamingo's gated blocks still act on text tokens "
        "inside the model). Training: samples seen over all runs (stages) and seconds of training steps.</p>"
        + table
        + figure
    )


# ---------------------------------------------------------------- command line


def _pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{what}: {item!r} is not NAME=PATH")
        out[name] = value
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="compare-output")
    p.add_argument(
        "--models",
        nargs="*",
        default=[
            "blip2=demo-output/stage2/final",
            "flamingo=demo-output/flamingo/flamingo/final",
            "eve=demo-output/eve/eve/stage3/final",
        ],
        metavar="NAME=DIR",
        help="trained models; without llava=DIR the shipped LLaVA recipe is trained into <out>/llava",
    )
    p.add_argument("--retrieval", nargs="*", default=["blip2=demo-output/stage1/final"], metavar="NAME=DIR")
    p.add_argument(
        "--fewshot",
        nargs="*",
        default=["flamingo=demo-output/flamingo/flamingo_study.json"],
        metavar="NAME=JSON",
        help="a few-shot study's JSON (flamingo_study.json: its `flamingo` variant's summary)",
    )
    p.add_argument("--quick", action="store_true", help="tiny evaluation sizes (and a few LLaVA steps)")
    args = p.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("vlbridge").setLevel(logging.INFO)
    logging.getLogger("experiments").setLevel(logging.INFO)
    out = Path(args.out)
    models = _pairs(args.models, "--models")
    if "llava" not in models:
        models["llava"] = str(train_llava(out / "llava", args.quick))
    fewshot = {}
    for name, file in _pairs(args.fewshot, "--fewshot").items():
        doc = json.loads(Path(file).read_text())
        fewshot[name] = doc.get("flamingo", doc)  # flamingo_study.json: variant -> results
    report = run(out, models, _pairs(args.retrieval, "--retrieval"), fewshot, args.quick)
    print(
        json.dumps(
            {
                n: {"test": r["test"]["captions"]["metrics"], "vqa": r["test"]["vqa"]["accuracy"]}
                for n, r in report.items()
            },
            indent=1,
        )
    )
    print(f"wrote {out / 'compare_study.json'}")


if __name__ == "__main__":
    main()
