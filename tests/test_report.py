"""The demo's HTML report on tiny models: sections, inlined PNGs, PNG files, and query attention
captured by a hook that matches what the cross-attention layer really computes."""

import base64
import io
import re

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from experiments import report as rp
from vlbridge.data import shapesworld as sw
from vlbridge.evaluation import evaluate as ev

WORLD = sw.ShapesWorldConfig(width=32, height=32)


@pytest.fixture(scope="module")
def models(build):
    m1, p1 = build(None, seed=1, randomize=True)  # stage 1: text branch, no LM
    m2, p2 = build("gpt2", seed=2, randomize=True)
    return m1, p1, m2, p2


def _curves():
    stage1 = [
        {"step": s, "loss": 3 - s / 10, "loss_itc": 1.5 - s / 20, "loss_itm": 0.7, "loss_itg": 1 - s / 30, "lr": 1e-3}
        for s in (10, 20, 30)
    ]
    stage1 += [{"step": s, "elapsed_s": 1.0, "probe_itc_i2t_r1": s / 40, "probe_n": 8} for s in (15, 30)]
    stage2 = [{"step": s, "loss": 2 - s / 20} for s in (10, 20, 30)]
    stage2 += [{"step": 30, "probe_caption_color": 0.5, "probe_caption_shape": 0.25, "probe_n": 8}]  # one point
    return {"stage1": stage1, "stage2": stage2}


def _report(m1, p1, m2, p2) -> dict:
    """A demo report with real (tiny) evaluation results and fake curves."""
    report = {
        "machine": {"platform": "test", "torch": torch.__version__},
        "curves": _curves(),
        "timings_s": {"stage1_train": 1.0, "stage2_train": 2.0, "evaluation": 0.5, "total": 3.5},
    }
    for split in ("test", "compositional"):
        scenes = sw.make_split(split, 4, WORLD)
        report[f"{split}_retrieval"] = ev.shapesworld_retrieval(
            m1, p1, ev.retrieval_scenes(split, 4, WORLD), WORLD, k=2
        )
        report[f"{split}_captions"] = ev.shapesworld_captions(m2, p2, scenes, WORLD, decode={"max_new_tokens": 4})
        report[f"{split}_vqa"] = ev.shapesworld_vqa(m2, p2, scenes[:1], WORLD)
    caps, ret = report["test_captions"]["metrics"], report["test_retrieval"]
    report["targets"] = {
        "caption_color": {"target": 0.9, "reached": caps["color"], "met": caps["color"] >= 0.9},
        "vqa_accuracy": {"target": 0.85, "reached": 0.9, "met": True},
        "itm_improves_r1": {"itc": ret["itc"]["i2t_r1"], "itc_itm": ret["itc_itm"]["i2t_r1"], "met": False},
    }
    return report


def test_write_html(models, tmp_path):
    m1, p1, m2, p2 = models
    path = rp.write_html(_report(*models), tmp_path / "out", m1, p1, m2, p2, WORLD)
    assert path == tmp_path / "out" / "report.html"
    page = path.read_text()
    for section in ("targets", "metrics", "curves", "samples", "retrieval", "attention", "timings"):
        assert f"id='{section}'" in page
    for text in (
        "caption_color",
        "itm_improves_r1",
        "not met",
        "compositional",
        "i2t_r10",
        "ITC+ITM",
        "Stage 1 losses",
        "Stage 2 probe",
        "query 3",
        "to CLS",
    ):
        assert text in page, text
    assert "http" not in page  # self-contained

    stems = ("curve_stage1_losses", "curve_stage1_probe", "curve_stage2_loss", "curve_stage2_probe")
    plots = re.findall(r'<img class="plot" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [base64.b64decode(b64) for b64 in plots] == [(tmp_path / "out" / f"{s}.png").read_bytes() for s in stems]
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    # 4 curve plots, 2 x 4 sample scenes, 3 captions x 3 retrieved images, 3 attention rows x (image + 4 queries)
    assert len(pngs) == 4 + 8 + 9 + 3 * 5
    for b64 in pngs:
        image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
        assert image.format == "PNG"
        image.verify()

    for stem in stems:
        with Image.open(tmp_path / "out" / f"{stem}.png") as image:
            assert image.size == (round(rp.FIGSIZE[0] * rp.DPI), round(rp.FIGSIZE[1] * rp.DPI))
    with Image.open(tmp_path / "out" / "attention.png") as image:
        assert image.format == "PNG" and image.width > image.height  # tiny model: 3 rows of 1 + 4 panels


def test_attention_maps_sum_to_one_over_patches(models):
    m2, p2 = models[2], models[3]
    images = [sw.render(s, WORLD) for s in sw.make_split("test", 2, WORLD)]
    probs = rp.cross_attention_probs(m2, p2.images(images))
    heads, queries = m2.config.qformer.num_heads, m2.config.qformer.num_query_tokens
    assert probs.shape == (2, heads, queries, 17)  # 32x32 CLIP, patch 8: CLS + 4x4 patches
    assert torch.allclose(probs.sum(-1), torch.ones(2, heads, queries), atol=1e-5)
    grid = rp.patch_grid(m2, probs.shape[-1])
    maps, cls_share = rp.patch_maps(probs, grid)
    assert grid == 4 and maps.shape == (2, queries, 4, 4) and (maps >= 0).all()
    assert torch.allclose(maps.sum((-1, -2)), torch.ones(2, queries), atol=1e-5)
    patches = probs.mean(1)[..., 1:].sum(-1)
    assert torch.allclose(cls_share + patches, torch.ones(2, queries), atol=1e-5)


@pytest.mark.parametrize("layer", [0, -1])
def test_hooked_attention_is_what_the_layer_computes(models, layer):
    """Reference 1: SDPA on the layer's own q/k with identity values returns its attention matrix.
    Reference 2: those probabilities times the layer's values, through its output projection and
    norm, give exactly the output the layer produced in the same forward pass."""
    m1, p1 = models[0], models[1]
    pixel_values = p1.images([sw.render(s, WORLD) for s in sw.make_split("test", 3, WORLD)])
    attn = rp.cross_attention_modules(m1)[layer]
    seen = {}
    handle = attn.register_forward_hook(
        lambda mod, args, kwargs, out: seen.update(x=args[0], kv=kwargs["kv"], out=out[0]), with_kwargs=True
    )
    try:
        probs = rp.cross_attention_probs(m1, pixel_values, layer=layer)  # (B, H, Q, N)
    finally:
        handle.remove()
    x, kv = seen["x"], seen["kv"]
    B, Q, N, H = x.shape[0], x.shape[1], kv.shape[1], attn.num_heads

    def heads(t):
        return t.view(B, t.shape[1], H, -1).transpose(1, 2)

    q, k, v = heads(attn.query(x)), heads(attn.key(kv)), heads(attn.value(kv))
    eye = torch.eye(N).expand(B, H, N, N)
    assert torch.allclose(probs, F.scaled_dot_product_attention(q, k, eye), atol=1e-6)
    with torch.no_grad():
        out = attn.norm(x + attn.dense((probs @ v).transpose(1, 2).flatten(2)))
    assert torch.allclose(out, seen["out"], atol=1e-5)
    assert probs.shape == (3, H, Q, N)


def test_plots_handle_empty_and_single_point_series(tmp_path):
    for name, series in (("empty", []), ("one", [("a", [5], [0.5])])):
        path = rp.plot_curves(name, series, tmp_path / f"{name}.png")
        with Image.open(path) as image:
            assert image.format == "PNG"
        assert f'alt="{name}"' in rp.figure_html(path, name) and f"<figcaption>{name}.png<" in rp.figure_html(path)
    assert rp.log_series([{"step": 1, "loss_x": 2.0}, {"step": 2}], ["loss_x", "loss_y"], "loss_") == [
        ("x", [1], [2.0])
    ]
