"""Write docs/results.md and the README's headline table from the JSON that the demo and the benchmarks write.

    python -m experiments.write_results --demo demo-output/report.json --bench bench-output

Every figure on the results page, and in the README between `<!-- results:start -->` and
`<!-- results:end -->`, is read from these files: `report.json` (experiments.demo: BLIP-2, and the
Flamingo, EVE and side-by-side studies when the demo ran them) and, when present, `bench.json`,
`bench_transformers.json` and `bench_memory.json` (benchmarks/). Nothing is typed by hand; a part the
files lack (a demo run with `--parts blip2`, no benchmarks) is left out and the page says so.
Standard library only: it runs without torch.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"
BENCH_FILES = ("bench.json", "bench_transformers.json", "bench_memory.json")
HEADLINE_SHOTS = 4  # the Flamingo row of the README table: this many shots, or the most the report has
MAX_CURVE_ROWS = 8


# ---------------------------------------------------------------- formatting


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def slash(d: dict | None, keys, digits: int = 3) -> str:
    """'0.976 / 0.945 / 0.996' for d's values at keys."""
    return " / ".join(fmt((d or {}).get(k), digits) for k in keys)


def by_shots(d: dict) -> list[tuple[int, object]]:
    """A dict keyed by shot count (ints in Python, strings once written to JSON), sorted by it."""
    return sorted(((int(k), v) for k, v in d.items()), key=lambda kv: kv[0])


def at_shots(d: dict, k: int):
    return d.get(k, d.get(str(k)))


def thin(rows: list, n: int = MAX_CURVE_ROWS) -> list:
    """At most n rows, evenly spaced, the last one always kept."""
    if len(rows) <= n:
        return rows
    step = len(rows) / n
    return [rows[min(int(round((i + 1) * step)) - 1, len(rows) - 1)] for i in range(n)]


def decode_line(record: dict | None) -> str:
    if not record:
        return "–"
    return ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in record.items())


# ---------------------------------------------------------------- README headline table


def headline_shots(flamingo: dict) -> int | None:
    shipped = flamingo.get("flamingo") or next(iter(flamingo.values()), None)
    if not shipped:
        return None
    shots = [k for k, _ in by_shots(shipped["summary"]["vqa"])]
    return HEADLINE_SHOTS if HEADLINE_SHOTS in shots else max(shots)


def headline(report: dict, source: str = "demo-output/report.json") -> str:
    """The README's results block: one row per design, ShapesWorld with the shipped tiny backbones."""
    rows = []
    caps, vqa, ret = report.get("test_captions"), report.get("test_vqa"), report.get("test_retrieval")
    if caps:
        r1 = f"{fmt(ret['itc']['i2t_r1'])} / {fmt(ret['itc_itm']['i2t_r1'])}" if ret else "–"
        rows.append(
            [
                "BLIP-2",
                f"test, {fmt(caps['n'])} scenes",
                slash(caps["metrics"], ("color", "shape", "count")),
                fmt(vqa["accuracy"]) if vqa else "–",
                r1,
            ]
        )
    fl = report.get("flamingo") or {}
    k = headline_shots(fl)
    if k is not None:
        name = "flamingo" if "flamingo" in fl else next(iter(fl))
        sm = fl[name]["summary"]
        rows.append(
            [
                f"Flamingo (`{name}`)",
                f"val, {k}-shot, random demonstrations",
                slash(at_shots(sm["caption_random"], k), ("color", "shape", "count")),
                fmt(at_shots(sm["vqa"], k)),
                "–",
            ]
        )
    eve = report.get("eve") or {}
    if "eve" in eve:
        e = eve["eve"]
        rows.append(
            [
                "EVE (`eve`, 3 stages)",
                f"test, {fmt(e['captions']['n'])} scenes",
                slash(e["captions"]["metrics"], ("color", "shape", "count")),
                fmt(e["vqa"]["accuracy"]),
                "–",
            ]
        )
    llava = (report.get("compare") or {}).get("llava")
    if llava:
        ret = llava["test"].get("retrieval")
        rows.append(
            [
                "LLaVA (MLP projector)",
                f"test, {fmt(llava['test']['captions']['n'])} scenes",
                slash(llava["test"]["captions"]["metrics"], ("color", "shape", "count")),
                fmt(llava["test"]["vqa"]["accuracy"]),
                f"{fmt(ret['itc']['i2t_r1'])} / {fmt(ret['itc_itm']['i2t_r1'])}" if ret else "–",
            ]
        )
    if not rows:
        return "No results yet: run `make demo`, then `python -m experiments.write_results`.\n"
    machine = report.get("machine", {})
    quick = _is_quick(report)
    note = (
        f"Generated by `python -m experiments.write_results` from `{source}` (torch {machine.get('torch', '?')}, "
        f"{machine.get('threads', '?')} threads)"
        + (", a `--quick` smoke run: not meaningful" if quick else "")
        + "; every figure with its decode settings, the ablations and the benchmarks: "
        "[docs/results.md](docs/results.md)."
    )
    return (
        table(
            ["design", "ShapesWorld split", "caption colour / shape / count", "VQA", "image→text R@1 (ITC / +ITM)"],
            rows,
        )
        + "\n"
        + note
        + "\n"
    )


def _is_quick(report: dict) -> bool:
    steps = ((report.get("recipes") or {}).get("stage1") or {}).get("steps")
    return steps is not None and steps < 50


def replace_between(text: str, block: str, start: str = START, end: str = END) -> str:
    """text with what lies between the markers replaced by block (the markers stay)."""
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"markers {start} ... {end} not found (in this order)")
    return text[: i + len(start)] + "\n" + block.rstrip("\n") + "\n" + text[j:]


# ---------------------------------------------------------------- docs/results.md


def blip2_section(report: dict) -> str:
    if "test_captions" not in report:
        return ""
    out = [
        "## BLIP-2\n",
        "Stage 1 (`blip2_shapesworld_stage1`) and stage 2 (`blip2_shapesworld_stage2`, from stage 1), as the "
        "demo runs them" + _recipe_line(report) + ". Held-out test split, and the compositional split "
        "(colour-shape pairs never seen in training).\n",
    ]
    if targets := report.get("targets"):
        rows = []
        for name, t in targets.items():
            if "target" in t:
                rows.append([f"`{name}`", fmt(t["target"], 2), fmt(t["reached"]), fmt(t["met"])])
            else:  # ITC + ITM re-ranking against ITC alone
                rows.append([f"`{name}`", f"> ITC ({fmt(t.get('itc'))})", fmt(t.get("itc_itm")), fmt(t["met"])])
        out += [
            "### Targets (BLIP-2 on the test split; `flamingo_*`: the Flamingo recipe few-shot on the val split)\n",
            table(["metric", "target", "reached", "met"], rows),
        ]
    rows = []
    for split in ("test", "compositional"):
        ret, caps, vqa = (report.get(f"{split}_{k}") for k in ("retrieval", "captions", "vqa"))
        if not caps:
            continue
        itc, both = (ret or {}).get("itc", {}), (ret or {}).get("itc_itm", {})
        rows.append(
            [
                split,
                fmt((ret or {}).get("n")),
                slash(itc, ("i2t_r1", "i2t_r5", "i2t_r10")),
                fmt(itc.get("t2i_r1")),
                f"{fmt(both.get('i2t_r1'))} / {fmt(both.get('t2i_r1'))}",
                slash(caps["metrics"], ("color", "shape", "size", "count", "relation", "exact")),
                fmt(vqa["accuracy"]) if vqa else "–",
                fmt(vqa["n"]) if vqa else "–",
            ]
        )
    out += [
        "### Retrieval, captions, VQA\n",
        "Retrieval: each image against the captions of all candidate scenes (pairwise distinct captions, "
        "`evaluation.evaluate.retrieval_scenes`); ITC + ITM re-ranks each row's ITC top k "
        f"(k = {fmt((report.get('test_retrieval') or {}).get('k'))}, rule "
        f"`{(report.get('test_retrieval') or {}).get('rerank', '?')}`). Captions are scored per attribute "
        "against the scene (`data.shapesworld.attribute_accuracy`).\n",
        table(
            [
                "split",
                "candidates",
                "ITC i2t R@1 / R@5 / R@10",
                "ITC t2i R@1",
                "ITC + ITM i2t / t2i R@1",
                "caption colour / shape / size / count / relation / exact",
                "VQA",
                "questions",
            ],
            rows,
        ),
    ]
    kinds = sorted({k for s in ("test", "compositional") for k in (report.get(f"{s}_vqa") or {}).get("by_kind", {})})
    if kinds:
        rows = [
            [s, *(fmt((report.get(f"{s}_vqa") or {}).get("by_kind", {}).get(k)) for k in kinds)]
            for s in ("test", "compositional")
            if report.get(f"{s}_vqa")
        ]
        out += ["VQA accuracy by question kind:\n\n", table(["split", *kinds], rows)]
    out.append(
        "Decoding: captions "
        + decode_line(report["test_captions"].get("decode"))
        + "; VQA "
        + decode_line((report.get("test_vqa") or {}).get("decode"))
        + ".\n"
    )
    samples = report["test_captions"].get("samples") or []
    if samples:
        out += [
            "\nSample captions (test split):\n\n",
            table(["truth", "generated"], [[s["caption"], s["predicted"]] for s in samples[:5]]),
        ]
    out.append(curves_section(report))
    out.append(ceilings_section(report))
    return "\n".join(out)


def _recipe_line(report: dict) -> str:
    rec = report.get("recipes") or {}
    parts = [
        f"{name.replace('stage', 'stage ')}: {fmt(r.get('steps'))} steps of batch {fmt(r.get('batch_size'))}"
        for name, r in rec.items()
        if isinstance(r, dict)
    ]
    return f" ({'; '.join(parts)})" if parts else ""


def curves_section(report: dict) -> str:
    curves = report.get("curves") or {}
    out = []
    s1 = [r for r in curves.get("stage1", []) if "probe_itc_i2t_r1" in r]
    if s1:
        out.append(
            table(
                ["stage-1 step", f"ITC i2t R@1 among {fmt(s1[0].get('probe_n'))} test images"],
                [[fmt(r["step"]), fmt(r["probe_itc_i2t_r1"])] for r in thin(s1)],
            )
        )
    s2 = [r for r in curves.get("stage2", []) if "probe_caption_color" in r]
    if s2:
        out.append(
            table(
                ["stage-2 step", f"caption colour / shape / count ({fmt(s2[0].get('probe_n'))} test images)"],
                [
                    [
                        fmt(r["step"]),
                        slash({k[len("probe_caption_") :]: v for k, v in r.items()}, ("color", "shape", "count")),
                    ]
                    for r in thin(s2)
                ],
            )
        )
    return ("### During training (the demo's probes)\n\n" + "\n".join(out)) if out else ""


def ceilings_section(report: dict) -> str:
    """What the frozen LM can do given the true scene (scripts/pretrain_backbones.py measured it)."""
    lm = (report.get("backbone_ceilings") or {}).get("lm_ceiling") or {}
    rows = []
    for key, what in (
        ("test/vqa/pooled_bos", "true scene as pooled vectors (the soft prompt's form)"),
        ("test/vqa/bos_caption", "true caption as tokens"),
        ("test/vqa/no_context", "no image at all"),
    ):
        if key in lm:
            rows.append([what, fmt(lm[key].get("all")), fmt(lm[key].get("relation_yes_no"))])
    if not rows:
        return ""
    return (
        "### What the frozen LM allows\n\nThe shipped LM answering the test questions from the scene itself "
        "(`assets/shapesworld/lm_ceiling.json`): an upper bound for any bridge into it.\n\n"
        + table(["LM given", "VQA", "yes/no relation questions"], rows)
    )


def flamingo_section(report: dict) -> str:
    fl = report.get("flamingo")
    if not fl:
        return ""
    rows = []
    for name, r in fl.items():
        sm = r["summary"]
        for i, (k, vqa) in enumerate(by_shots(sm["vqa"])):
            cap, ic = at_shots(sm["caption_random"], k), at_shots(sm["incontext"], k) or {}
            rices = at_shots(sm.get("caption_rices") or {}, k) or {}
            bind = at_shots(sm.get("binding") or {}, k) or {}
            rows.append(
                [
                    f"`{name}`" if i == 0 else "",
                    str(k),
                    slash(cap, ("color", "shape", "count", "exact")),
                    fmt(rices.get("color")),
                    fmt(vqa),
                    f"{fmt(ic.get('accuracy'))} ({fmt(ic.get('format_accuracy'))})",
                    f"{fmt(bind.get('accuracy'))} ± {fmt(bind.get('stderr'))}" if bind else "–",
                    fmt(at_shots(sm.get("binding_ideal") or {}, k)),
                ]
            )
    losses = [
        [
            f"`{n}`",
            ", ".join(r.get("overrides") or []) or "the recipe",
            fmt(r.get("final_loss")),
            fmt((r.get("curve") or [{}])[-1].get("step")),
        ]
        for n, r in fl.items()
    ]
    text = next((r["lm_text_binding"] for r in fl.values() if r.get("lm_text_binding")), None)
    lm_line = (
        ""
        if not text
        else "\nThe frozen LM alone, the binding task told in words (each image replaced by its object, forced "
        "choice between the episode's two words, chance 0.5): "
        + ", ".join(f"{k}-shot {fmt(v)}" for k, v in text.items())
        + ".\n"
    )
    return (
        "## Flamingo\n\nThe recipe `flamingo_shapesworld` and the paper's two ablations "
        "(`experiments.flamingo_study`), "
        "evaluated few-shot on the val split with demonstrations from the train split "
        "(`evaluation.fewshot.shapesworld_fewshot`). In-context: the attribute to answer is shown only by the "
        "demonstrations; format = an answer of the right attribute. Binding: two words of the LM's vocabulary "
        "bound per episode to two values of colour or shape (which one is never said), so one demonstration "
        "is ambiguous; ideal = the Bayes-optimal learner's accuracy on the same episodes.\n\n"
        + table(["variant", "overrides", "final training loss", "steps"], losses)
        + "\n"
        + table(
            [
                "variant",
                "shots",
                "caption colour / shape / count / exact",
                "colour (RICES)",
                "VQA",
                "in-context accuracy (format)",
                "binding accuracy ± s.e.",
                "binding, ideal learner",
            ],
            rows,
        )
        + lm_line
    )


def eve_section(report: dict) -> str:
    eve = report.get("eve")
    if not eve:
        return ""
    variants = {k: v for k, v in eve.items() if k != "latency"}
    rows = []
    if "test_captions" in report:
        rows.append(
            [
                "BLIP-2 (the demo's stage 2)",
                slash(report["test_captions"]["metrics"], ("color", "shape", "size", "count")),
                fmt((report.get("test_vqa") or {}).get("accuracy")),
                fmt(report["test_captions"]["n"]),
            ]
        )
    for name, r in variants.items():
        rows.append(
            [
                f"`{name}`",
                slash(r["captions"]["metrics"], ("color", "shape", "size", "count")),
                fmt(r["vqa"]["accuracy"]),
                fmt(r["captions"]["n"]),
            ]
        )
    lang = [
        [
            f"`{name}`",
            *(
                slash(r.get(k), ("caption", "qa")) if k in r else "–"
                for k in ("language_loss_before", "language_loss_after_stage2", "language_loss_after_stage3")
            ),
        ]
        for name, r in variants.items()
    ]
    out = [
        "## EVE\n\nThe three-stage recipe and its ablations (`experiments.eve_study`) on the same LM and data as "
        "BLIP-2, test split. `eve_no_pal`: no teacher; `eve_skip_stage1`: stage 2 from a fresh patch embedding; "
        "`eve_nonsquare`: 96x64 scenes (evaluated on 96x64 scenes).\n",
        table(["model", "caption colour / shape / size / count", "VQA", "scenes"], rows),
        "\nLanguage ability: the LM's loss on text-only captions / questions (nats per token):\n\n",
        table(["variant", "before training", "after stage 2", "after stage 3"], lang),
    ]
    if lat := eve.get("latency"):
        out.append(
            f"\nLatency per image, one image at a time, {fmt(lat['eve'].get('new_tokens'))} greedy tokens, "
            f"{fmt(lat['eve'].get('threads'))} threads: BLIP-2 {lat['blip2']['seconds_per_image'] * 1000:.1f} ms, "
            f"EVE {lat['eve']['seconds_per_image'] * 1000:.1f} ms (EVE / BLIP-2 = {fmt(lat['eve_over_blip2'], 2)}).\n"
        )
    return "\n".join(out)


def _change(v) -> str:
    """A largest weight change: exactly 0, or its order of magnitude."""
    return "–" if v is None else "0" if v == 0 else f"{v:.1e}"


def compare_section(report: dict) -> str:
    """The designs side by side (experiments.compare_study): every trained model measured the same way."""
    cmp = report.get("compare")
    if not cmp:
        return ""
    quality, cost, shots, prompts = [], [], [], []
    for name, r in cmp.items():
        label = f"`{name}` ({r['model_type']})"
        test, comp = r["test"], r["compositional"]
        ret = test.get("retrieval")
        few = r.get("fewshot") or {}
        # a design that takes demonstrations, asked zero-shot: its few-shot column is the fair number
        zero_shot = " (0-shot)" if "in_context" in r.get("tasks", ()) else ""
        prompts.append(
            f"`{name}` {r['test']['captions']['decode'].get('prompt')!r} / {r['test']['vqa']['decode'].get('prompt')!r}"
        )
        quality.append(
            [
                label,
                slash(test["captions"]["metrics"], ("color", "shape", "count")),
                fmt(test["vqa"]["accuracy"]) + zero_shot,
                slash(comp["captions"]["metrics"], ("color", "shape", "count")),
                fmt(comp["vqa"]["accuracy"]) + zero_shot,
                f"{fmt(ret['itc']['i2t_r1'])} / {fmt(ret['itc_itm']['i2t_r1'])}" if ret else "–",
                ", ".join(f"{k}-shot {fmt(v['vqa'])}" for k, v in by_shots(few.get("shots") or {})) or "–",
            ]
        )
        tok, lang, params, b = r["tokens_per_image"], r["language_loss"], r["parameters"], r["budget"]
        cost.append(
            [
                label,
                fmt(params["trainable"]),
                fmt(params["total"]),
                fmt(tok["in_sequence"]) + (f" + {fmt(tok['cross_attended'])}" if tok["cross_attended"] else ""),
                fmt(r["latency"]["seconds_per_image"] * 1000, 1),
                f"{slash(lang['before'], ('caption', 'qa'))} → {slash(lang['after'], ('caption', 'qa'))}",
                _change(lang.get("lm_max_weight_change")),
                " + ".join(fmt(x["steps"]) for x in b["runs"]) + f" ({fmt(b['samples'])} samples)",
                fmt(b["train_seconds"], 0),
            ]
        )
        for k, v in by_shots(few.get("shots") or {}):
            shots.append(
                [
                    label,
                    str(k),
                    slash(v, ("caption_color", "caption_shape", "caption_count")),
                    fmt(v["vqa"]),
                    fmt(v.get("incontext")),
                    fmt(v.get("binding")),
                ]
            )
    first = next(iter(cmp.values()))
    lat = first["latency"]
    out = [
        "## Designs side by side\n",
        "Every trained model loaded with `vlbridge.load` and measured the same way through the one interface "
        f"(`experiments.compare_study`): captions of {fmt(first['test']['captions']['n'])} scenes and "
        f"{fmt(first['test']['vqa']['n'])} questions per split, each model's own prompts, greedy decoding, "
        "zero-shot. A design that takes demonstrations (`in_context` among its tasks) is marked 0-shot: Flamingo's "
        "recipe trains on captioned images and in-context documents, never on a lone question, so its fair VQA "
        "numbers are few-shot (its own study, val split). Retrieval only where a model has it, or a model given "
        "for it (BLIP-2: its stage-1 model).\n",
        table(
            [
                "design",
                "test caption colour / shape / count",
                "test VQA",
                "compositional caption colour / shape / count",
                "compositional VQA",
                "i2t R@1 ITC / +ITM",
                "few-shot VQA (val)",
            ],
            quality,
        ),
        "\nWhat each costs. Trainable: the parameters some stage of the model's training updated. LM tokens per "
        "image: positions the image takes in the LM's sequence (+ visual tokens read by cross-attention). "
        f"Latency: one image at a time, {fmt(lat.get('new_tokens'))} greedy tokens, {fmt(lat.get('threads'))} "
        "threads. Text-only loss of the LM (caption / QA, nats per token): the shipped LM → the LM the trained "
        "model holds, equal when the design keeps it frozen (Flamingo's gated blocks still act on text inside the "
        "model). Training: steps of each run (stage) and the samples seen, seconds of training steps.\n\n",
        table(
            [
                "design",
                "trainable parameters",
                "total parameters",
                "LM tokens per image",
                "ms per image",
                "text-only loss: shipped → trained",
                "LM weights, largest change",
                "training steps (samples)",
                "training seconds",
            ],
            cost,
        ),
    ]
    if shots:
        out += [
            "\nFew-shot, as the design's own study measured it (val split, random demonstrations):\n\n",
            table(
                ["design", "shots", "caption colour / shape / count", "VQA", "in-context accuracy", "binding accuracy"],
                shots,
            ),
        ]
    out.append(
        "\nDecoding: captions "
        + decode_line({k: v for k, v in first["test"]["captions"]["decode"].items() if k != "prompt"})
        + "; VQA "
        + decode_line({k: v for k, v in first["test"]["vqa"]["decode"].items() if k != "prompt"})
        + ". Prompts (caption / VQA): "
        + "; ".join(prompts)
        + ".\n"
    )
    return "\n".join(out)


def timings_section(report: dict) -> str:
    t = report.get("timings_s")
    if not t:
        return ""
    m = report.get("machine", {})
    return (
        f"## Time\n\nOn {m.get('platform', '?')}, torch {m.get('torch', '?')}, {m.get('threads', '?')} threads "
        "(seconds; the same run varies between sessions on shared machines):\n\n"
        + table(["part", "seconds"], [[k, fmt(float(v), 0)] for k, v in t.items()])
    )


# ---------------------------------------------------------------- benchmarks


def _env(doc: dict) -> str:
    e = doc.get("environment", {})
    return (
        f"{e.get('device', '?')}, torch {e.get('torch', '?')}, transformers {e.get('transformers', '?')}, "
        f"{e.get('threads', '?')} threads"
    )


def bench_section(bench: dict[str, dict]) -> str:
    if not bench:
        return (
            "## Benchmarks\n\nNo benchmark JSON was given: run `make bench`, then this script with "
            "`--bench bench-output`. What each benchmark measures: [benchmarks.md](benchmarks.md).\n"
        )
    out = ["## Benchmarks\n\nWhat each one measures and how: [benchmarks.md](benchmarks.md).\n"]
    if doc := bench.get("bench.json"):
        rows = doc["results"]
        step = [r for r in rows if r.get("bench") == "stage1_step"]
        if step:
            out += [
                f"### Q-Former stage-1 step (`benchmarks.bench`; {_env(doc)})\n",
                table(
                    ["size", "precision", "attention", "s / step", "samples / s", "vs fp32 fused"],
                    [
                        [
                            r["size"],
                            r["precision"],
                            r["attention"],
                            fmt(r["s_per_step"]),
                            fmt(r["samples_per_s"], 1),
                            f"{fmt(r['speedup_vs_fp32_fused'], 2)}x",
                        ]
                        for r in step
                    ],
                ),
            ]
        cache = [r for r in rows if r.get("bench") == "caching"]
        if cache:
            out += [
                "\nFrozen-feature caching (shipped stage-1 recipe):\n\n",
                table(
                    ["mode", "s / step", "vs pixels", "first epoch s", "later epochs s", "caching s / image"],
                    [
                        [
                            r["mode"],
                            fmt(r["s_per_step"]),
                            f"{fmt(r['speedup_vs_pixels'], 2)}x",
                            fmt(r["first_epoch_s"], 0),
                            fmt(r["later_epoch_s"], 0),
                            fmt(r["cache_s_per_image"], 4),
                        ]
                        for r in cache
                    ],
                ),
            ]
    if doc := bench.get("bench_transformers.json"):
        rows = doc["results"]
        train = [r for r in rows if r.get("bench") == "train_step"]
        if train:
            parity = train[0].get("parity_max_abs_loss_diff")
            parity = (
                ", ".join(f"{k} {v:.1e}" for k, v in parity.items()) if isinstance(parity, dict) else fmt(parity, 8)
            )
            peaks = ", ".join(
                f"{k} {v['flops_per_s'] / 1e12:.2f}" for k, v in (train[0].get("matmul_peak") or {}).items()
            )
            shares = ", ".join(
                f"{k} {100 * v['matmul_share']:.0f}%" for k, v in (train[0].get("profile_bf16") or {}).items()
            )
            out += [
                f"\n### Against transformers' BLIP-2 (`benchmarks.bench_transformers`; {_env(doc)})\n",
                f"Stage-1 step at BERT-base size, batch {fmt(train[0].get('batch'))}. Largest loss difference "
                f"against vlbridge before timing: {parity}. Matmul peak of this machine (TFLOP/s): {peaks or '–'}. "
                f"Share of op time in matmuls, one bf16 step: {shares or '–'}.\n\n",
                table(
                    [
                        "mode",
                        "precision",
                        "s / step",
                        "vs transformers (faster one)",
                        "GFLOP / step",
                        "% of matmul peak",
                    ],
                    [
                        [
                            r["mode"],
                            r["precision"],
                            fmt(r["s_per_step"], 2),
                            f"{fmt(r['speedup_vs_transformers_best'], 2)}x",
                            fmt(r["flops_per_step"] / 1e9, 0),
                            fmt(100 * r["fraction_of_matmul_peak"], 0),
                        ]
                        for r in train
                    ],
                ),
            ]
        gen = [r for r in rows if r.get("bench") == "generate"]
        if gen:
            out += [
                "\nCaption generation, same converted weights:\n\n",
                table(
                    ["mode", "precision", "beams", "batch", "new tokens", "images / s", "vs transformers", "same ids"],
                    [
                        [
                            r["mode"],
                            r.get("precision", "–"),
                            fmt(r["num_beams"]),
                            fmt(r.get("batch")),
                            fmt(r.get("new_tokens")),
                            fmt(r["images_per_s"], 2),
                            f"{fmt(r['speedup_vs_transformers'], 2)}x",
                            fmt(r["same_ids"]),
                        ]
                        for r in gen
                        if r["mode"] == "vlbridge"
                    ],
                ),
            ]
    if (doc := bench.get("bench_memory.json")) and "results" in doc:
        ok = [r for r in doc["results"] if "error" not in r]
        lm = doc.get("lm", {})
        out += [
            f"\n### Memory of a stage-2 step (`benchmarks.bench_memory`; {_env(doc)})\n",
            f"Llama-shaped LM of {lm.get('layers', '?')} layers x {lm.get('width', '?')}, "
            f"batch {doc.get('batch', '?')}.\n\n",
            table(
                ["case", "peak GiB", "measured as", "LM parameters", "trainable parameters", "optimizer state GiB"],
                [
                    [
                        r["case"],
                        fmt(r["peak_gib"], 2),
                        r.get("memory", "?"),
                        fmt(r.get("lm_params")),
                        fmt(r.get("trainable_params")),
                        fmt((r.get("optimizer_state_bytes") or 0) / 2**30, 2),
                    ]
                    for r in ok
                ],
            ),
        ]
        if doc.get("naive_over_frozen"):
            out.append(f"\nnaive / frozen: {fmt(doc['naive_over_frozen'], 2)}x.\n")
    if doc and (load := doc.get("fsdp_load")):
        lm = load.get("lm", {})
        out += [
            f"\n### Loading for FSDP, per rank (`benchmarks.bench_memory --only fsdp-load`; {_env(doc)})\n",
            f"A random Llama-shaped LM of {fmt(lm.get('params'))} parameters ({lm.get('dtype', '?')}) made ready "
            "to train under FSDP2: `whole` loads it on every rank, then shards; `deferred` builds it on the meta "
            "device and each rank reads only its rows. Peak resident memory of each rank's process.\n\n",
            table(
                ["load", "ranks", "rank", "peak GiB", "parameters held GiB", "seconds"],
                [
                    [
                        r["load"],
                        fmt(r["world_size"]),
                        fmt(r["rank"]),
                        fmt(r["peak_rss_bytes"] / 2**30, 2),
                        fmt(r["param_bytes_held"] / 2**30, 2),
                        fmt(r["seconds"], 1),
                    ]
                    for r in load.get("results", ())
                    if "error" not in r
                ],
            ),
            "\n" + ", ".join(f"{k}: {fmt(v, 2)}" for k, v in (load.get("ratios") or {}).items()) + ".\n",
        ]
    return "\n".join(out)


def render(
    report: dict | None,
    bench: dict[str, dict],
    demo_source: str = "demo-output/report.json",
    bench_source: str = "bench-output",
) -> str:
    report = report or {}
    head = [
        "# Results\n",
        "<!-- Generated by `python -m experiments.write_results`; edit that script, not this file. -->\n",
        f"Every figure here is read from `{demo_source}` (written by `make demo`, `python -m experiments.demo`) "
        f"and the benchmark JSON in `{bench_source}/` (`make bench`). Everything is trained from the shipped tiny "
        "backbones on ShapesWorld (procedural scenes, `vlbridge.data.shapesworld`); the numbers show that the "
        "pipelines work and how the designs compare at this scale, not what they reach on real data.\n",
    ]
    if _is_quick(report):
        head.append(
            "**This page was generated from a `--quick` smoke run (a few steps): the numbers are not meaningful.**\n"
        )
    if not report:
        head.append("No demo report was given: run `make demo`, then this script.\n")
    missing = [p for p in ("flamingo", "eve") if report and p not in report]
    if missing:
        head.append(f"This demo run did not include {' and '.join(missing)} (`--parts`).\n")
    head.append(
        "Reproduce: `make demo` (`python -m experiments.demo --out demo-output`; `--parts blip2` for BLIP-2 "
        "alone, `--quick` for a smoke run, `--stage1 KEY=VALUE ...` / `--stage2 KEY=VALUE ...` to override the "
        "BLIP-2 recipes as `vlbridge train` does), `make bench`, then `python -m experiments.write_results "
        "--demo demo-output/report.json --bench bench-output`. The demo also writes `demo-output/report.html`: "
        "training curves, sample captions and answers, retrieval examples, where the queries attend.\n"
    )
    sections = [
        blip2_section(report),
        flamingo_section(report),
        eve_section(report),
        compare_section(report),
        timings_section(report),
        bench_section(bench),
    ]
    page = "\n".join(head) + "\n" + "\n".join(s for s in sections if s).rstrip("\n") + "\n"
    return re.sub(r"\n{3,}", "\n\n", page)


def read_bench(folder: str | Path | None) -> dict[str, dict]:
    if not folder:
        return {}
    folder = Path(folder)
    return {name: json.loads((folder / name).read_text()) for name in BENCH_FILES if (folder / name).exists()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="demo-output/report.json", help="the demo's report.json")
    p.add_argument("--bench", default="bench-output", help="folder of the benchmark JSON files (optional)")
    p.add_argument("--results", default="docs/results.md", help="the page to write")
    p.add_argument("--readme", default="README.md", help="the README whose marked table to rewrite ('' to skip)")
    args = p.parse_args(argv)
    report = json.loads(Path(args.demo).read_text())
    bench = read_bench(args.bench)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(render(report, bench, args.demo, args.bench))
    print(f"wrote {args.results}")
    if args.readme:
        readme = Path(args.readme)
        readme.write_text(replace_between(readme.read_text(), headline(report, args.demo)))
        print(f"rewrote the results table in {args.readme}")


if __name__ == "__main__":
    main()
