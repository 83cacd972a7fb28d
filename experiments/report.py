"""The demo's HTML report: one self-contained file, and its plots as PNG files beside it.

    write_html(report, out, m1, p1, m2, p2, world) -> out/report.html
        + out/curve_*.png (training curves) and out/attention.png (query attention maps)

Sections: targets, metrics (test and compositional splits), training curves, samples (captions and
answers regenerated with the stage-2 model next to the truth), retrieval examples (stage-1 model:
a caption and its top-3 images by ITC + ITM), and where the Q-Former's queries look on the image.

Images and plots are inlined as base64 PNG. Plots (`plot_curves`, `attention_sheet`) are drawn with
matplotlib's Agg backend, imported only when a plot is drawn (matplotlib is a demo extra); attention
overlays are composited with PIL.

The studies build their sections from the same pieces: `fmt`, `html_table`, `log_series`,
`plot_curves` and `figure_html` (and `choose` for their command lines).

Query attention is read with a forward hook on the last Q-Former cross-attention layer, which
recomputes softmax(q k^T / sqrt(d_head)) from the hooked inputs and the layer's own query/key
weights (`cross_attention_probs`); the Q-Former code itself is not touched.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlbridge.data import shapesworld as sw
from vlbridge.evaluation import evaluate as ev
from vlbridge.evaluation.generation import DECODING, generate_texts
from vlbridge.evaluation.metrics import vqa_score

N_SAMPLES = 4  # scenes per split in the samples section
N_POOL = 16  # candidate images in the retrieval examples
N_RETRIEVAL = 3  # captions shown there
N_ATTENTION = 3  # images in the attention section


# ---------------------------------------------------------------- query attention


def attention_probs(attn, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_head)) of a qformer.Attention block, from its inputs and its own weights.

    x (B, L, d) the queries, kv (B, S, D) what they attend to, mask bool (B, 1, L|1, S) or None.
    Returns (B, H, L, S); each row sums to 1 over S.
    """
    B, L, S, H = x.shape[0], x.shape[1], kv.shape[1], attn.num_heads
    q = attn.query(x).view(B, L, H, -1).transpose(1, 2)  # (B, H, L, d/H)
    k = attn.key(kv).view(B, S, H, -1).transpose(1, 2)  # (B, H, S, d/H)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:  # as the block does: masked keys get the dtype's minimum, not -inf
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores.float().softmax(dim=-1)


def cross_attention_modules(model) -> list:
    return [layer.crossattention for layer in model.qformer.layers if layer.crossattention is not None]


@torch.no_grad()
def cross_attention_probs(model, pixel_values: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """Attention of every query over the image tokens in one cross-attention layer (default: the
    last), (B, H, Q, N), captured by a forward hook during a normal Q-Former pass."""
    module = cross_attention_modules(model)[layer]
    captured = {}

    def hook(mod, args, kwargs, output):  # the layer is called as crossattention(q, kv=image_embeds, mask=...)
        x = args[0]
        kv = kwargs["kv"] if "kv" in kwargs else args[1]
        mask = kwargs["mask"] if "mask" in kwargs else (args[2] if len(args) > 2 else None)
        captured["probs"] = attention_probs(mod, x, kv, mask)

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        model.qformer(image_embeds=model.image_embeds(pixel_values))
    finally:
        handle.remove()
    return captured["probs"]


def patch_grid(model, num_tokens: int) -> int:
    """Side g of the square patch grid: image_size / patch_size from the vision config when it has
    them, else the largest square that fits (the other tokens being CLS / registers)."""
    cfg = getattr(getattr(model.vision, "model", None), "config", None)  # the wrapped transformers model's
    cfg = getattr(cfg, "vision_config", cfg)
    size, patch = getattr(cfg, "image_size", None), getattr(cfg, "patch_size", None)
    g = size // patch if isinstance(size, int) and isinstance(patch, int) else math.isqrt(num_tokens)
    if g * g > num_tokens:
        raise ValueError(f"{num_tokens} image tokens cannot hold a {g}x{g} patch grid")
    return g


def patch_maps(probs: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, Q, N) attention -> per-query maps over the patch grid, averaged over heads, (B, Q, g, g),
    renormalised to sum to 1 over the patches; and the share of attention that went to the N - g*g
    leading non-patch tokens (CLS, registers), (B, Q)."""
    p = probs.mean(dim=1)  # (B, Q, N)
    prefix = p.shape[-1] - grid * grid
    patches = p[..., prefix:]
    maps = patches / patches.sum(-1, keepdim=True)
    return maps.unflatten(-1, (grid, grid)), p[..., :prefix].sum(-1)


def _heat(a: np.ndarray) -> np.ndarray:
    """(h, w) values in [0, 1] -> (h, w, 3) uint8 colours of matplotlib's perceptual "inferno" map:
    dark = little attention, bright = much."""
    from matplotlib import colormaps

    return colormaps["inferno"](np.clip(a, 0, 1), bytes=True)[..., :3]


def overlay(image: Image.Image, amap: np.ndarray, size: int = 96) -> Image.Image:
    """The image with a (g, g) attention map on top, scaled to its maximum; patches stay square."""
    heat = Image.fromarray(_heat(amap / max(float(amap.max()), 1e-12))).resize((size, size), Image.NEAREST)
    return Image.blend(image.convert("RGB").resize((size, size), Image.BILINEAR), heat, 0.6)


def attention_sheet(images: list[Image.Image], maps: np.ndarray, path: Path) -> Path:
    """One PNG at `path`: a row per image, the image then its overlay for each query. maps (B, Q, g, g)."""
    B, Q = maps.shape[:2]
    fig = _figure(((Q + 1) * 1.1, B * 1.25))
    axes = fig.subplots(B, Q + 1, squeeze=False)
    for b, image in enumerate(images):
        panels = [(f"image {b}", image.convert("RGB")), *((f"query {q}", overlay(image, maps[b, q])) for q in range(Q))]
        for ax, (title, panel) in zip(axes[b], panels):
            ax.imshow(panel)
            ax.set_title(title, fontsize="small")
            ax.set_axis_off()
    return _save(fig, path)


# ---------------------------------------------------------------- plots (matplotlib)

FIGSIZE, DPI = (4.4, 2.6), 150  # inches and dots per inch of a curve plot; the page shows it 440 px wide


def _figure(figsize: tuple[float, float]):
    """A matplotlib Figure drawn by the Agg backend, imported here (matplotlib is a demo extra) and
    without pyplot, so that no global figure state is touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, metadata={"Software": None})  # no version stamp: a file changes only when its plot does
    return Path(path)


def log_series(rows: list[dict], keys: list[str], strip: str = "") -> list[tuple[str, list, list]]:
    """[(name, steps, values)] for each key that has values in the training-log rows; `strip` is cut
    from the front of the names."""
    out = []
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and "step" in r]
        if pts:
            out.append((key.removeprefix(strip), [p[0] for p in pts], [float(p[1]) for p in pts]))
    return out


def plot_curves(title: str, series: list[tuple[str, list, list]], path: Path) -> Path:
    """Training curves `series` [(name, steps, values)] on one axes, legend on the right, saved as a PNG
    at `path`."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(FIGSIZE)
    ax = fig.subplots()
    for name, xs, ys in series:  # sparse series (the probes) show their points; a single point draws no line
        ax.plot(xs, ys, label=name, linewidth=1.5, marker="o" if len(xs) <= 20 else None, markersize=3)
    if series:
        fig.legend(loc="outside right upper", fontsize="small", frameon=False)
    else:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator("auto", integer=True, min_n_ticks=1))  # whole steps, even when few
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize="small")
    return _save(fig, path)


def figure_html(path: Path, title: str = "", width: int = 440) -> str:
    """A PNG file inlined (base64) in a <figure>, so the page stays self-contained; captioned with its
    file name, `title` (the plot's) as the image's text alternative."""
    path = Path(path)
    b64 = base64.b64encode(path.read_bytes()).decode("ascii")
    alt = html.escape(title or path.name)
    return (
        f'<figure><img class="plot" src="data:image/png;base64,{b64}" width="{width}" alt="{alt}" title="{alt}">'
        f"<figcaption>{html.escape(path.name)}</figcaption></figure>"
    )


def curve_panels(curves: dict) -> list[tuple[str, str, list]]:
    """(file stem, title, series) for each training-curve panel of the demo's logs."""
    s1, s2 = curves.get("stage1", []), curves.get("stage2", [])
    probe2 = sorted({k for r in s2 for k in r if k.startswith("probe_caption_")})
    return [
        ("curve_stage1_losses", "Stage 1 losses", log_series(s1, ["loss_itc", "loss_itm", "loss_itg"], "loss_")),
        ("curve_stage1_probe", "Stage 1 probe: ITC image->text R@1", log_series(s1, ["probe_itc_i2t_r1"], "probe_")),
        ("curve_stage2_loss", "Stage 2 LM loss", log_series(s2, ["loss"])),
        ("curve_stage2_probe", "Stage 2 probe: caption accuracy", log_series(s2, probe2, "probe_caption_")),
    ]


# ---------------------------------------------------------------- HTML pieces


def choose(text: str, known, what: str = "variants") -> list[str]:
    """A comma-separated command-line choice, checked against `known` (exits with the known names)."""
    chosen = [v for v in text.split(",") if v]
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise SystemExit(f"unknown {what} {unknown}; known: {list(known)}")
    return chosen


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(image: Image.Image, width: int = 96, title: str = "") -> str:
    return (
        f'<img src="data:image/png;base64,{png_b64(image)}" width="{width}" height="{width}" '
        f'title="{html.escape(title)}" alt="{html.escape(title)}">'
    )


def fmt(v) -> str:
    """A value as table-cell HTML: floats to 3 decimals, booleans as yes/no, None as a dash."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}"
    return "&ndash;" if v is None else html.escape(str(v))


def html_table(header: list[str], rows: list[list], cls: str = "") -> str:
    """A <table>: the header is escaped here, the cells are HTML already (see fmt)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def _decode_kwargs(record: dict | None, default: dict) -> tuple[dict, str | None]:
    """generate() keywords and the prompt from a result's `decode` record."""
    if not record:
        return dict(default), None
    kwargs = {k: v for k, v in record.items() if k != "prompt" and v is not None}
    return kwargs, record.get("prompt")


def targets_section(report: dict) -> str:
    rows = []
    for name, r in report.get("targets", {}).items():
        met = '<b class="ok">met</b>' if r.get("met") else '<b class="no">not met</b>'
        if "target" in r:
            rows.append([html.escape(name), fmt(r["target"]), fmt(r["reached"]), met])
        else:  # itm_improves_r1: ITC+ITM must beat ITC alone
            rows.append(
                [html.escape(name), f"ITC+ITM R@1 &gt; ITC R@1 ({fmt(r.get('itc'))})", fmt(r.get("itc_itm")), met]
            )
    return (
        "<h2 id='targets'>Targets</h2><p>BLIP-2 on the held-out test split; Flamingo (flamingo_*) few-shot on the "
        "val split.</p>" + html_table(["target", "wanted", "reached", ""], rows)
    )


def metrics_section(report: dict) -> str:
    splits = [s for s in ("test", "compositional") if f"{s}_captions" in report or f"{s}_retrieval" in report]
    out = [
        "<h2 id='metrics'>Metrics</h2><p>compositional = scenes holding colour-shape pairs never seen in training.</p>"
    ]
    caps = {s: report.get(f"{s}_captions", {}) for s in splits}
    names = list(dict.fromkeys(k for s in splits for k in caps[s].get("metrics", {})))
    if names:
        out.append(
            "<h3>Captions: attribute accuracy</h3>"
            + html_table(
                ["metric", *splits], [[n, *(fmt(caps[s].get("metrics", {}).get(n)) for s in splits)] for n in names]
            )
        )
    vqa = {s: report.get(f"{s}_vqa", {}) for s in splits}
    kinds = list(dict.fromkeys(k for s in splits for k in vqa[s].get("by_kind", {})))
    if any(vqa.values()):
        rows = [["accuracy", *(fmt(vqa[s].get("accuracy")) for s in splits)]]
        rows += [[f"&nbsp;&nbsp;{k}", *(fmt(vqa[s].get("by_kind", {}).get(k)) for s in splits)] for k in kinds]
        out.append("<h3>VQA accuracy</h3>" + html_table(["", *splits], rows))
    ret = {s: report.get(f"{s}_retrieval", {}) for s in splits}
    if any(ret.values()):
        keys = [k for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean")]
        header = ["recall"] + [f"{s} {m}" for s in splits for m in ("ITC", "ITC+ITM")]
        rows = [[k, *(fmt(ret[s].get(m, {}).get(k)) for s in splits for m in ("itc", "itc_itm"))] for k in keys]
        out.append("<h3>Retrieval (image&rarr;text i2t, text&rarr;image t2i)</h3>" + html_table(header, rows))
    setting = []
    for s in splits:
        for task in ("captions", "vqa", "retrieval"):
            r = report.get(f"{s}_{task}")
            if r:
                extra = (
                    html.escape(", ".join(f"{k}={v!r}" for k, v in r["decode"].items()))
                    if "decode" in r
                    else f"ITM re-ranks the ITC top {r.get('k')}"
                )
                setting.append([f"{s} {task}", fmt(r.get("n")), fmt(r.get("seconds")), extra])
    if setting:
        out.append("<h3>Settings</h3>" + html_table(["evaluation", "n", "seconds", "settings"], setting, "small"))
    return "\n".join(out)


def curves_section(report: dict, out: Path) -> str:
    html_parts = ["<h2 id='curves'>Training curves</h2><div class='row'>"]
    for stem, title, series in curve_panels(report.get("curves", {})):
        html_parts.append(figure_html(plot_curves(title, series, out / f"{stem}.png"), title))
    return "\n".join(html_parts) + "</div>"


def samples_section(report: dict, m2, p2, world) -> str:
    """Captions and answers regenerated with the stage-2 model, with the decode settings of the evaluation."""
    cap_kwargs, cap_prompt = _decode_kwargs(
        report.get("test_captions", {}).get("decode"), DECODING["shapesworld_caption"]
    )
    vqa_kwargs, vqa_prompt = _decode_kwargs(report.get("test_vqa", {}).get("decode"), DECODING["shapesworld_vqa"])
    cap_prompt = m2.config.caption_prompt if cap_prompt is None else cap_prompt
    vqa_prompt = m2.config.vqa_prompt if vqa_prompt is None else vqa_prompt
    out = ["<h2 id='samples'>Samples (stage-2 model)</h2>"]
    for split in ("test", "compositional"):
        scenes = sw.make_split(split, N_SAMPLES, world)
        images = [sw.render(s, world) for s in scenes]
        captions = generate_texts(m2, p2, images, [cap_prompt] * len(images), cap_kwargs, len(images))
        qas = [(i, qa) for i, s in enumerate(scenes) for qa in s.qa[:3]]
        answers = generate_texts(
            m2,
            p2,
            [images[i] for i, _ in qas],
            [vqa_prompt.format(qa.question) for _, qa in qas],
            vqa_kwargs,
            len(qas),
            questions=[qa.question for _, qa in qas],
        )
        rows = []
        for i, (scene, image, caption) in enumerate(zip(scenes, images, captions)):
            acc = sw.attribute_accuracy([caption], [scene])
            qa_rows = "".join(
                f"<li>{html.escape(qa.question)} <b>{html.escape(a)}</b> "
                f"({'right' if vqa_score(a, [qa.answer]) == 1 else 'truth: ' + html.escape(qa.answer)})</li>"
                for (j, qa), a in zip(qas, answers)
                if j == i
            )
            rows.append(
                [
                    _img(image, 128, scene.caption),
                    f"<b>generated:</b> {html.escape(caption)}<br><b>truth:</b> {html.escape(scene.caption)}"
                    f"<br>objects right {acc['object']:.0%}, exact {'yes' if acc['exact'] else 'no'}"
                    f"<ul>{qa_rows}</ul>",
                ]
            )
        out.append(f"<h3>{split}</h3>" + html_table(["image", "caption and answers"], rows))
        more = report.get(f"{split}_captions", {}).get("samples", [])
        if more:
            out.append(
                "<details><summary>more captions from the evaluation</summary>"
                + html_table(
                    ["truth", "generated"],
                    [[html.escape(s["caption"]), html.escape(s["predicted"])] for s in more],
                    "small",
                )
                + "</details>"
            )
    return "\n".join(out)


@torch.no_grad()
def retrieval_section(m1, p1, world) -> str:
    """Captions and their top-3 images among N_POOL by ITC + ITM (the stage-1 model)."""
    scenes = ev.retrieval_scenes("test", N_POOL, world)
    images = [sw.render(s, world) for s in scenes]
    q = p1.qformer_text([s.caption for s in scenes[:N_RETRIEVAL]], truncate=True)
    t2i = m1.retrieval_scores(q["input_ids"], q["attention_mask"], pixel_values=p1.images(images), k=8).t2i
    rows = []
    for t, scores in enumerate(t2i):  # (N_POOL,) ITM + ITC for the ITC top 8, -inf elsewhere
        order = scores.argsort(descending=True).tolist()
        cells = [
            f"{_img(images[i], 96, scenes[i].caption)}<br>{float(scores[i]):.2f}{' (right)' if i == t else ''}"
            for i in order[:3]
        ]
        rank = order.index(t) + 1 if torch.isfinite(scores[t]) else "&gt; 8"
        rows.append([html.escape(scenes[t].caption), *cells, str(rank)])
    return (
        f"<h2 id='retrieval'>Retrieval examples (stage-1 model, {N_POOL} candidate images)</h2>"
        "<p>Score = ITM match logit + ITC similarity, for each caption's ITC top 8.</p>"
        + html_table(["caption", "1st", "2nd", "3rd", "rank of the right image"], rows)
    )


def attention_section(model, processor, world, out: Path) -> str:
    scenes = sw.make_split("test", N_ATTENTION, world)
    images = [sw.render(s, world) for s in scenes]
    model.eval()
    probs = cross_attention_probs(model, processor.images(images))  # (B, H, Q, N)
    grid = patch_grid(model, probs.shape[-1])
    maps, prefix_share = patch_maps(probs, grid)
    maps = maps.numpy()
    attention_sheet(images, maps, out / "attention.png")
    layer = max(i for i, lay in enumerate(model.qformer.layers) if lay.crossattention is not None)
    rows = []
    for b, (scene, image) in enumerate(zip(scenes, images)):
        cells = [_img(overlay(image, maps[b, q]), 72, f"query {q}") for q in range(maps.shape[1])]
        rows.append(
            [
                _img(image, 72, scene.caption) + f"<br><small>{html.escape(scene.caption)}</small>",
                *cells,
                f"{float(prefix_share[b].mean()):.0%}",
            ]
        )
    return (
        f"<h2 id='attention'>Where the queries look (stage-2 model)</h2><p>Cross-attention of each query over "
        f"the {grid}x{grid} image patches in Q-Former layer {layer} (the last with cross-attention), averaged "
        f"over heads, renormalised over the patches and shown scaled to its maximum (bright = more). The last "
        f"column is the mean share that went to the other {probs.shape[-1] - grid * grid} token(s) (CLS). "
        f"Also in attention.png.</p>"
        + html_table(["image", *(f"query {q}" for q in range(maps.shape[1])), "to CLS"], rows, "small")
    )


_CSS = """body{font-family:sans-serif;max-width:1200px;margin:1em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;vertical-align:top}
th{background:#f3f3f3}.small{font-size:85%}.ok{color:#18794e}.no{color:#c0392b}
img{image-rendering:pixelated}img.plot{image-rendering:auto}
.row{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0}ul{margin:.2em 0}"""


def write_html(report: dict, out: Path, m1, p1, m2, p2, world, sections: list[str] = ()) -> Path:
    """Write out/report.html (self-contained) and the PNG plots beside it; returns the HTML's path.

    report: the demo's report dict (targets, {split}_{captions,vqa,retrieval}, curves, timings_s,
    machine). m1/p1: stage-1 model and processor (retrieval); m2/p2: stage-2 (samples, attention).
    sections: more HTML sections (the Flamingo and EVE studies), placed before the timings.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m1.eval()
    m2.eval()
    timings = html_table(
        ["", "seconds"], [[html.escape(k), fmt(v)] for k, v in report.get("timings_s", {}).items()], "small"
    )
    machine = html.escape(", ".join(f"{k} {v}" for k, v in report.get("machine", {}).items()))
    body = [
        f"<h1>vlbridge demo: BLIP-2{', Flamingo and EVE' if sections else ''} on ShapesWorld</h1><p>{machine}</p>",
        "<p><a href='#targets'>targets</a> &middot; <a href='#metrics'>metrics</a> &middot; "
        "<a href='#curves'>curves</a> &middot; <a href='#samples'>samples</a> &middot; "
        "<a href='#retrieval'>retrieval</a> &middot; <a href='#attention'>attention</a>"
        + "".join(f" &middot; <a href='#{k}'>{k}</a>" for k in ("flamingo", "eve") if k in report)
        + "</p>",
        targets_section(report),
        metrics_section(report),
        curves_section(report, out),
        samples_section(report, m2, p2, world),
        retrieval_section(m1, p1, world),
        attention_section(m2, p2, world, out),
        *sections,
        "<h2 id='timings'>Timings</h2>" + timings,
    ]
    page = (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>vlbridge demo report</title>"
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
