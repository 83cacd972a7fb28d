"""The demo's HTML report: one self-contained file, and its plots as PNG files beside it.

    write_html(report, out, m1, p1, m2, p2, world) -> out/report.html
        + out/curve_*.png (training curves) and out/attention.png (query attention maps)

Sections: targets, metrics (test and compositional splits), training curves, samples (captions and
answers regenerated with the stage-2 model next to the truth), retrieval examples (stage-1 model:
a caption and its top-3 images by ITC + ITM), and where the Q-Former's queries look on the image.

Only torch, numpy and PIL: images are inlined as base64 PNG, plots drawn by hand (`_Axes`) as inline
SVG for the page and with PIL for the PNG files.

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
from PIL import Image, ImageDraw

from . import evaluate as ev
from .data import shapesworld as sw
from .inference import generate_texts
from .metrics import vqa_score

N_SAMPLES = 4  # scenes per split in the samples section
N_POOL = 16  # candidate images in the retrieval examples
N_RETRIEVAL = 3  # captions shown there
N_ATTENTION = 3  # images in the attention section
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#17becf", "#8c564b", "#e377c2")


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


# A perceptual ramp (inferno's anchors): dark = little attention, bright = much.
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=float)


def _heat(a: np.ndarray) -> np.ndarray:
    """(h, w) values in [0, 1] -> (h, w, 3) uint8 colours."""
    t = np.clip(a, 0, 1) * (len(_RAMP) - 1)
    i = np.minimum(t.astype(int), len(_RAMP) - 2)
    f = (t - i)[..., None]
    return ((1 - f) * _RAMP[i] + f * _RAMP[i + 1]).astype(np.uint8)


def overlay(image: Image.Image, amap: np.ndarray, size: int = 96) -> Image.Image:
    """The image with a (g, g) attention map on top, scaled to its maximum; patches stay square."""
    heat = Image.fromarray(_heat(amap / max(float(amap.max()), 1e-12))).resize((size, size), Image.NEAREST)
    return Image.blend(image.convert("RGB").resize((size, size), Image.BILINEAR), heat, 0.6)


def attention_sheet(images: list[Image.Image], maps: np.ndarray, size: int = 96) -> Image.Image:
    """One PNG: a row per image, the image then one overlay per query. maps (B, Q, g, g)."""
    B, Q = maps.shape[:2]
    label = 14
    sheet = Image.new("RGB", ((Q + 1) * size, B * (size + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for b, image in enumerate(images):
        y = b * (size + label)
        sheet.paste(image.convert("RGB").resize((size, size), Image.BILINEAR), (0, y + label))
        _text(draw, (2, y + 1), f"image {b}")
        for q in range(Q):
            sheet.paste(overlay(image, maps[b, q], size), ((q + 1) * size, y + label))
            _text(draw, ((q + 1) * size + 2, y + 1), f"query {q}")
    return sheet


# ---------------------------------------------------------------- plots (SVG and PNG)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> np.ndarray:
    """About n round ticks (steps of 1, 2 or 5 x 10^k) covering [lo, hi]."""
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return np.arange(math.floor(lo / step), math.ceil(hi / step) + 0.5) * step


class _Axes:
    """Maps data to pixels for line plots of `series` [(name, xs, ys)] in a w x h box; the legend
    sits in the right margin."""

    def __init__(self, series, w: int, h: int, left=48, right=120, top=26, bottom=30):
        xs = [x for _, sx, _ in series for x in sx] or [0.0, 1.0]
        ys = [y for _, _, sy in series for y in sy] or [0.0, 1.0]
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0, y1 = (min(ys), max(ys)) if max(ys) > min(ys) else (min(ys) - 0.5, min(ys) + 0.5)
        self.xt, self.yt = _nice_ticks(x0, x1), _nice_ticks(y0, y1)
        self.x0, self.x1, self.y0, self.y1 = self.xt[0], self.xt[-1], self.yt[0], self.yt[-1]
        self.w, self.h, self.box = w, h, (left, top, w - right, h - bottom)  # plot area (x0, y0, x1, y1)

    def __call__(self, x, y) -> tuple[float, float]:
        l, t, r, b = self.box
        return (l + (x - self.x0) / (self.x1 - self.x0) * (r - l), b - (y - self.y0) / (self.y1 - self.y0) * (b - t))

    def ticks(self):
        """[(value, pixel)] along x, then along y."""
        return [(v, self(v, self.y0)[0]) for v in self.xt], [(v, self(self.x0, v)[1]) for v in self.yt]


def _series(rows: list[dict], keys: list[str], strip: str = "") -> list[tuple[str, list, list]]:
    out = []
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and "step" in r]
        if pts:
            out.append((key.removeprefix(strip), [p[0] for p in pts], [float(p[1]) for p in pts]))
    return out


def plot_svg(title: str, series, w: int = 440, h: int = 260) -> str:
    ax = _Axes(series, w, h)
    l, t, r, b = ax.box
    e = html.escape
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
             f'font-family="sans-serif" font-size="10">',
             f'<text x="{(l + r) / 2}" y="14" text-anchor="middle" font-size="12">{e(title)}</text>',
             f'<rect x="{l}" y="{t}" width="{r - l}" height="{b - t}" fill="none" stroke="#999"/>']
    xt, yt = ax.ticks()
    for v, px in xt:
        parts.append(f'<text x="{px:.1f}" y="{b + 13}" text-anchor="middle">{v:.6g}</text>')
    for v, py in yt:
        parts.append(f'<line x1="{l}" x2="{r}" y1="{py:.1f}" y2="{py:.1f}" stroke="#eee"/>'
                     f'<text x="{l - 4}" y="{py + 3:.1f}" text-anchor="end">{v:.6g}</text>')
    parts.append(f'<text x="{(l + r) / 2}" y="{h - 3}" text-anchor="middle">step</text>')
    for i, (name, xs, ys) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        pts = " ".join(f"{px:.1f},{py:.1f}" for px, py in (ax(x, y) for x, y in zip(xs, ys)))
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        if len(xs) == 1:  # a single point draws no line
            px, py = ax(xs[0], ys[0])
            parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{color}"/>')
        ly = t + 8 + 13 * i
        parts.append(f'<line x1="{r + 8}" x2="{r + 22}" y1="{ly - 3}" y2="{ly - 3}" stroke="{color}" stroke-width="2"/>'
                     f'<text x="{r + 26}" y="{ly}">{e(name)}</text>')
    if not series:
        parts.append(f'<text x="{(l + r) / 2}" y="{(t + b) / 2}" text-anchor="middle">no data</text>')
    return "\n".join(parts) + "</svg>"


def _text(d: ImageDraw.ImageDraw, xy, text: str, anchor: str = "lt", fill="black"):
    """Text placed by its box (anchor: l/m/r then t/m/b); works with bitmap fonts too, unlike PIL's anchor."""
    l, t, r, b = d.textbbox((0, 0), text)
    dx = {"l": 0, "m": (r - l) / 2, "r": r - l}[anchor[0]]
    dy = {"t": 0, "m": (b - t) / 2, "b": b - t}[anchor[1]]
    d.text((xy[0] - dx - l, xy[1] - dy - t), text, fill=fill)


def plot_png(title: str, series, w: int = 440, h: int = 260) -> Image.Image:
    """The same plot as plot_svg, drawn with PIL."""
    ax = _Axes(series, w, h)
    l, t, r, b = ax.box
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    _text(d, ((l + r) / 2, 4), title, "mt")
    xt, yt = ax.ticks()
    for v, py in yt:
        d.line([(l, py), (r, py)], fill="#eeeeee")
        _text(d, (l - 4, py), f"{v:.6g}", "rm")
    for v, px in xt:
        _text(d, (px, b + 4), f"{v:.6g}", "mt")
    d.rectangle([l, t, r, b], outline="#999999")
    _text(d, ((l + r) / 2, h - 2), "step", "mb")
    for i, (name, xs, ys) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        pts = [ax(x, y) for x, y in zip(xs, ys)]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        else:
            d.ellipse([pts[0][0] - 3, pts[0][1] - 3, pts[0][0] + 3, pts[0][1] + 3], fill=color)
        ly = t + 5 + 13 * i
        d.line([(r + 8, ly), (r + 22, ly)], fill=color, width=2)
        _text(d, (r + 26, ly), name, "lm")
    if not series:
        _text(d, ((l + r) / 2, (t + b) / 2), "no data", "mm")
    return img


def curve_panels(curves: dict) -> list[tuple[str, str, list]]:
    """(file stem, title, series) for each training-curve panel of the demo's logs."""
    s1, s2 = curves.get("stage1", []), curves.get("stage2", [])
    probe2 = sorted({k for r in s2 for k in r if k.startswith("probe_caption_")})
    return [("curve_stage1_losses", "Stage 1 losses", _series(s1, ["loss_itc", "loss_itm", "loss_itg"], "loss_")),
            ("curve_stage1_probe", "Stage 1 probe: ITC image->text R@1", _series(s1, ["probe_itc_i2t_r1"], "probe_")),
            ("curve_stage2_loss", "Stage 2 LM loss", _series(s2, ["loss"])),
            ("curve_stage2_probe", "Stage 2 probe: caption accuracy", _series(s2, probe2, "probe_caption_"))]


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
    return (f'<img src="data:image/png;base64,{png_b64(image)}" width="{width}" height="{width}" '
            f'title="{html.escape(title)}" alt="{html.escape(title)}">')


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}"
    return "&ndash;" if v is None else html.escape(str(v))


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
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
            rows.append([html.escape(name), _fmt(r["target"]), _fmt(r["reached"]), met])
        else:  # itm_improves_r1: ITC+ITM must beat ITC alone
            rows.append([html.escape(name), f"ITC+ITM R@1 &gt; ITC R@1 ({_fmt(r.get('itc'))})",
                         _fmt(r.get("itc_itm")), met])
    return "<h2 id='targets'>Targets (held-out test split)</h2>" + _table(["target", "wanted", "reached", ""], rows)


def metrics_section(report: dict) -> str:
    splits = [s for s in ("test", "compositional") if f"{s}_captions" in report or f"{s}_retrieval" in report]
    out = ["<h2 id='metrics'>Metrics</h2><p>compositional = scenes holding colour-shape pairs never seen in "
           "training.</p>"]
    caps = {s: report.get(f"{s}_captions", {}) for s in splits}
    names = list(dict.fromkeys(k for s in splits for k in caps[s].get("metrics", {})))
    if names:
        out.append("<h3>Captions: attribute accuracy</h3>" + _table(
            ["metric", *splits], [[n, *(_fmt(caps[s].get("metrics", {}).get(n)) for s in splits)] for n in names]))
    vqa = {s: report.get(f"{s}_vqa", {}) for s in splits}
    kinds = list(dict.fromkeys(k for s in splits for k in vqa[s].get("by_kind", {})))
    if any(vqa.values()):
        rows = [["accuracy", *(_fmt(vqa[s].get("accuracy")) for s in splits)]]
        rows += [[f"&nbsp;&nbsp;{k}", *(_fmt(vqa[s].get("by_kind", {}).get(k)) for s in splits)] for k in kinds]
        out.append("<h3>VQA accuracy</h3>" + _table(["", *splits], rows))
    ret = {s: report.get(f"{s}_retrieval", {}) for s in splits}
    if any(ret.values()):
        keys = [k for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean")]
        header = ["recall"] + [f"{s} {m}" for s in splits for m in ("ITC", "ITC+ITM")]
        rows = [[k, *(_fmt(ret[s].get(m, {}).get(k)) for s in splits for m in ("itc", "itc_itm"))] for k in keys]
        out.append("<h3>Retrieval (image&rarr;text i2t, text&rarr;image t2i)</h3>" + _table(header, rows))
    setting = []
    for s in splits:
        for task in ("captions", "vqa", "retrieval"):
            r = report.get(f"{s}_{task}")
            if r:
                extra = (html.escape(", ".join(f"{k}={v!r}" for k, v in r["decode"].items())) if "decode" in r
                         else f"ITM re-ranks the ITC top {r.get('k')}")
                setting.append([f"{s} {task}", _fmt(r.get("n")), _fmt(r.get("seconds")), extra])
    if setting:
        out.append("<h3>Settings</h3>" + _table(["evaluation", "n", "seconds", "settings"], setting, "small"))
    return "\n".join(out)


def curves_section(report: dict, out: Path) -> str:
    html_parts = ["<h2 id='curves'>Training curves</h2><div class='row'>"]
    for stem, title, series in curve_panels(report.get("curves", {})):
        plot_png(title, series).save(out / f"{stem}.png")
        html_parts.append(f"<figure>{plot_svg(title, series)}<figcaption>{stem}.png</figcaption></figure>")
    return "\n".join(html_parts) + "</div>"


def samples_section(report: dict, m2, p2, world) -> str:
    """Captions and answers regenerated with the stage-2 model, with the decode settings of the evaluation."""
    cap_kwargs, cap_prompt = _decode_kwargs(report.get("test_captions", {}).get("decode"), ev.CAPTION_DECODE)
    vqa_kwargs, vqa_prompt = _decode_kwargs(report.get("test_vqa", {}).get("decode"), ev.VQA_DECODE)
    cap_prompt = m2.config.caption_prompt if cap_prompt is None else cap_prompt
    vqa_prompt = m2.config.vqa_prompt if vqa_prompt is None else vqa_prompt
    out = ["<h2 id='samples'>Samples (stage-2 model)</h2>"]
    for split in ("test", "compositional"):
        scenes = sw.make_split(split, N_SAMPLES, world)
        images = [sw.render(s, world) for s in scenes]
        captions = generate_texts(m2, p2, images, [cap_prompt] * len(images), cap_kwargs, len(images))
        qas = [(i, qa) for i, s in enumerate(scenes) for qa in s.qa[:3]]
        answers = generate_texts(m2, p2, [images[i] for i, _ in qas], [vqa_prompt.format(qa.question) for _, qa in qas],
                              vqa_kwargs, len(qas), questions=[qa.question for _, qa in qas])
        rows = []
        for i, (scene, image, caption) in enumerate(zip(scenes, images, captions)):
            acc = sw.attribute_accuracy([caption], [scene])
            qa_rows = "".join(
                f"<li>{html.escape(qa.question)} <b>{html.escape(a)}</b> "
                f"({'right' if vqa_score(a, [qa.answer]) == 1 else 'truth: ' + html.escape(qa.answer)})</li>"
                for (j, qa), a in zip(qas, answers) if j == i)
            rows.append([_img(image, 128, scene.caption),
                         f"<b>generated:</b> {html.escape(caption)}<br><b>truth:</b> {html.escape(scene.caption)}"
                         f"<br>objects right {acc['object']:.0%}, exact {'yes' if acc['exact'] else 'no'}"
                         f"<ul>{qa_rows}</ul>"])
        out.append(f"<h3>{split}</h3>" + _table(["image", "caption and answers"], rows))
        more = report.get(f"{split}_captions", {}).get("samples", [])
        if more:
            out.append("<details><summary>more captions from the evaluation</summary>" + _table(
                ["truth", "generated"], [[html.escape(s["caption"]), html.escape(s["predicted"])] for s in more],
                "small") + "</details>")
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
        cells = [f"{_img(images[i], 96, scenes[i].caption)}<br>{float(scores[i]):.2f}{' (right)' if i == t else ''}"
                 for i in order[:3]]
        rank = order.index(t) + 1 if torch.isfinite(scores[t]) else "&gt; 8"
        rows.append([html.escape(scenes[t].caption), *cells, str(rank)])
    return (f"<h2 id='retrieval'>Retrieval examples (stage-1 model, {N_POOL} candidate images)</h2>"
            "<p>Score = ITM match logit + ITC similarity, for each caption's ITC top 8.</p>"
            + _table(["caption", "1st", "2nd", "3rd", "rank of the right image"], rows))


def attention_section(model, processor, world, out: Path) -> str:
    scenes = sw.make_split("test", N_ATTENTION, world)
    images = [sw.render(s, world) for s in scenes]
    model.eval()
    probs = cross_attention_probs(model, processor.images(images))  # (B, H, Q, N)
    grid = patch_grid(model, probs.shape[-1])
    maps, prefix_share = patch_maps(probs, grid)
    maps = maps.numpy()
    attention_sheet(images, maps).save(out / "attention.png")
    layer = max(i for i, l in enumerate(model.qformer.layers) if l.crossattention is not None)
    rows = []
    for b, (scene, image) in enumerate(zip(scenes, images)):
        cells = [_img(overlay(image, maps[b, q]), 72, f"query {q}") for q in range(maps.shape[1])]
        rows.append([_img(image, 72, scene.caption) + f"<br><small>{html.escape(scene.caption)}</small>", *cells,
                     f"{float(prefix_share[b].mean()):.0%}"])
    return (f"<h2 id='attention'>Where the queries look (stage-2 model)</h2><p>Cross-attention of each query over "
            f"the {grid}x{grid} image patches in Q-Former layer {layer} (the last with cross-attention), averaged "
            f"over heads, renormalised over the patches and shown scaled to its maximum (bright = more). The last "
            f"column is the mean share that went to the other {probs.shape[-1] - grid * grid} token(s) (CLS). "
            f"Also in attention.png.</p>"
            + _table(["image", *(f"query {q}" for q in range(maps.shape[1])), "to CLS"], rows, "small"))


_CSS = """body{font-family:sans-serif;max-width:1200px;margin:1em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;vertical-align:top}
th{background:#f3f3f3}.small{font-size:85%}.ok{color:#18794e}.no{color:#c0392b}
img{image-rendering:pixelated}.row{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0}ul{margin:.2em 0}"""


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
    timings = _table(["", "seconds"], [[html.escape(k), _fmt(v)] for k, v in report.get("timings_s", {}).items()], "small")
    machine = html.escape(", ".join(f"{k} {v}" for k, v in report.get("machine", {}).items()))
    body = [f"<h1>vlbridge demo: BLIP-2{', Flamingo and EVE' if sections else ''} on ShapesWorld</h1><p>{machine}</p>",
            "<p><a href='#targets'>targets</a> &middot; <a href='#metrics'>metrics</a> &middot; "
            "<a href='#curves'>curves</a> &middot; <a href='#samples'>samples</a> &middot; "
            "<a href='#retrieval'>retrieval</a> &middot; <a href='#attention'>attention</a>"
            + "".join(f" &middot; <a href='#{k}'>{k}</a>" for k in ("flamingo", "eve") if k in report) + "</p>",
            targets_section(report), metrics_section(report), curves_section(report, out),
            samples_section(report, m2, p2, world), retrieval_section(m1, p1, world),
            attention_section(m2, p2, world, out), *sections, "<h2 id='timings'>Timings</h2>" + timings]
    page = (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>vlbridge demo report</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
