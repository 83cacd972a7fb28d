"""Flamingo through the training entry point: recipes, a tiny end-to-end run, exact resume, the
weighted multi-dataset gradient, interleaved data (MMC4 reader, in-context task) and few-shot
evaluation (RICES ordering, prompts)."""

import json
from contextlib import nullcontext

import pytest
import torch
from PIL import Image

from vlbridge.core.config import LMConfig, VisionConfig, to_dict
from vlbridge.data import shapesworld as sw
from vlbridge.data.interleaved import (
    ANSWERS,
    BINDING_WORDS,
    BindingDocs,
    DocumentData,
    DocumentStream,
    InContextDocs,
    make_source,
    read_mmc4,
)
from vlbridge.data.readers import SkipCounter
from vlbridge.evaluation.fewshot import (
    binding_ideal,
    fewshot_eval,
    fewshot_summary,
    incontext_eval,
    rices,
    shapesworld_fewshot,
)
from vlbridge.models.flamingo.modeling import Flamingo, FlamingoConfig, create_flamingo
from vlbridge.testing import make_lm, make_vision
from vlbridge.training.train import accumulate, load_recipe, train


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> FlamingoConfig:
    root = tmp_path_factory.mktemp("flamingo_train")
    return FlamingoConfig(
        vision=VisionConfig(make_vision(root / "vision"), feature_layer=-1),
        lm=LMConfig(make_lm(root / "lm", "gpt2")),
        perceiver_depth=1,
        num_latents=4,
        perceiver_heads=2,
        perceiver_dim_head=8,
        max_media=4,
        xattn_heads=2,
        xattn_dim_head=8,
    )


DATASETS = [
    {
        "name": "docs",
        "kind": "shapesworld_docs",
        "weight": 1.0,
        "batch_size": 4,
        "max_images": 3,
        "num_samples": 64,
        "width": 32,
        "height": 32,
    },
    {
        "name": "pairs",
        "kind": "shapesworld_pairs",
        "weight": 0.5,
        "batch_size": 4,
        "num_samples": 64,
        "width": 32,
        "height": 32,
    },
]


def _recipe(tmp_path, tiny, name, **kw):
    r = {
        "model_kind": "flamingo",
        "flamingo": to_dict(tiny),
        "datasets": DATASETS,
        "steps": 8,
        "log_every": 1,
        "optim": {"warmup_steps": 2, "lr": 2e-2, "weight_decay": 0.1},
        "precision": "fp32",
        "out_dir": str(tmp_path / name),
    }
    r.update(kw)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(r))
    return path


def _log(out_dir):
    return [json.loads(x) for x in (out_dir / "log.jsonl").read_text().splitlines()]


def test_recipes_parse_and_refuse_unknown_keys(tmp_path, tiny):
    path = _recipe(tmp_path, tiny, "r")
    cfg = load_recipe(path, ["steps=3", "flamingo.num_latents=2"])
    assert (cfg.model_kind, cfg.steps, cfg.flamingo.num_latents) == ("flamingo", 3, 2)
    assert [d.name for d in cfg.datasets] == ["docs", "pairs"] and cfg.datasets[1].weight == 0.5
    with pytest.raises(ValueError, match="wieght"):
        load_recipe(path, ['datasets=[{"name": "x", "wieght": 1}]'])
    with pytest.raises(ValueError, match="model_kind"):
        load_recipe(path, ["model_kind=flamingo2"])
    with pytest.raises(ValueError, match="unique"):
        load_recipe(path, ['datasets=[{"name": "x"}, {"name": "x"}]'])
    shipped = load_recipe("flamingo_shapesworld")
    assert shipped.model_kind == "flamingo" and "{assets}" not in shipped.flamingo.lm.name_or_path
    assert len(shipped.datasets) >= 2
    for name in ("blip2_shapesworld_stage1", "blip2_shapesworld_stage2"):  # old recipes: BLIP-2 by default
        assert load_recipe(name).model_kind == "blip2"


def test_training_run_loss_falls_and_resumes_exactly(tmp_path, tiny):
    final = train(load_recipe(_recipe(tmp_path, tiny, "straight")))
    rows = _log(tmp_path / "straight")
    assert len(rows) == 8 and {"loss_docs", "loss_pairs"} <= set(rows[0])
    for r in rows:  # the logged loss is the weighted sum of the datasets' losses
        assert r["loss"] == pytest.approx(r["loss_docs"] + 0.5 * r["loss_pairs"], rel=1e-5)
    losses = [r["loss"] for r in rows]
    assert sum(losses[-2:]) / 2 < 0.9 * losses[0]
    model = Flamingo.from_pretrained(final)
    assert any(b.attn_gate.abs().item() > 0 for b in model.xattn.values())  # the gates opened

    interrupted = _recipe(tmp_path, tiny, "interrupted", save_every=3)
    train(load_recipe(interrupted, ["steps=4"]))  # checkpoint at step 3, then one more step
    log = tmp_path / "interrupted" / "log.jsonl"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:3]))
    train(load_recipe(interrupted))
    resumed = [r["loss"] for r in _log(tmp_path / "interrupted")]
    assert resumed == pytest.approx(losses, rel=1e-6, abs=1e-6)


def test_accumulation_is_the_weighted_sum_of_dataset_gradients(tmp_path, tiny):
    cfg = load_recipe(_recipe(tmp_path, tiny, "acc"), ["grad_accum=2"])
    torch.manual_seed(0)
    model, processor = create_flamingo(cfg.flamingo)
    with torch.no_grad():  # open the gates so that every bridge parameter gets a gradient
        for block in model.xattn.values():
            block.attn_gate.fill_(0.5)
            block.ff_gate.fill_(0.5)
    streams = {
        d.name: (d.weight, DocumentStream(make_source(d), processor, d.batch_size, cfg.seed, i))
        for i, d in enumerate(cfg.datasets)
    }
    params = [p for p in model.parameters() if p.requires_grad]
    accumulate(model, streams, 5, cfg, nullcontext(), torch.device("cpu"))
    got = [p.grad.clone() for p in params]

    expected = [torch.zeros_like(p) for p in params]  # by hand: sum_m w_m * mean over micro-batches
    for weight, stream in streams.values():
        for micro in range(2):
            loss = model(**stream.batch(5, micro)).loss
            for e, g in zip(expected, torch.autograd.grad(loss, params, allow_unused=True)):
                e += weight / 2 * (g if g is not None else 0)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in got)

    decay, no_decay = model.param_groups(0.1)  # weight decay only on the gated cross-attention blocks
    xattn = {id(p) for p in model.xattn.parameters()}
    assert {id(p) for p in decay["params"]} == xattn and decay["weight_decay"] == 0.1
    assert not xattn & {id(p) for p in no_decay["params"]} and no_decay["params"]
    decay, no_decay, gates = model.param_groups(0.1, gate_lr_scale=10.0)  # the gates in a group of their own
    assert {id(p) for p in gates["params"]} == {id(b.attn_gate) for b in model.xattn.values()} | {
        id(b.ff_gate) for b in model.xattn.values()
    } and gates["lr_scale"] == 10.0
    assert not {id(p) for p in gates["params"]} & {id(p) for p in decay["params"] + no_decay["params"]}


def test_mmc4_reader_skips_and_counts_bad_images(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    lines = [
        {
            "text_list": ["intro.", "a red square.", "more text.", "a second one."],
            "image_info": [
                {"image_name": "ok.png", "matched_text_index": 3},
                {"image_name": "missing.jpg", "matched_text_index": 2},
                {"image_name": "ok.png", "matched_text_index": 1},
            ],
        },
        {"text_list": ["only a broken image."], "image_info": [{"image_name": "broken.jpg", "matched_text_index": 0}]},
        {"text_list": ["bad index."], "image_info": [{"image_name": "ok.png", "matched_text_index": 7}]},
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json\n")
    images, docs_skips = SkipCounter(), SkipCounter()
    docs = read_mmc4(path, tmp_path, max_images=5, image_skips=images, doc_skips=docs_skips)
    assert len(docs) == 1 and len(docs[0]["images"]) == 2
    assert (
        docs[0]["text"] == "intro. <image> a red square. more text. <|endofchunk|><image> a second one.<|endofchunk|>"
    )
    assert (images.seen, images.skipped) == (5, 3)  # two good, one missing, one undecodable, one bad index
    assert (docs_skips.seen, docs_skips.skipped) == (4, 3)  # one kept; no usable image twice; a bad line
    assert read_mmc4(path, tmp_path, max_images=1)[0]["text"].count("<image>") == 1


def test_incontext_documents_are_consistent_within_and_differ_across():
    src = InContextDocs(DocumentData(kind="shapesworld_incontext", max_images=5, num_samples=200))
    attributes = set()
    for i in range(40):
        attribute, scenes, answers = src.episode(i)
        attributes.add(attribute)
        assert all(a in ANSWERS[attribute] for a in answers)  # one kind of answer in a document
        for s, a in zip(scenes, answers):  # and each answer true of its own scene
            assert a == (str(len(s.objects)) if attribute == "count" else getattr(s.objects[0], attribute))
        doc = src.document(i)
        assert doc["text"] == "".join(f"<image>{a}<|endofchunk|>" for a in answers) and len(doc["images"]) == 5
    assert attributes == set(ANSWERS)  # every attribute occurs across documents
    assert src.episode(3)[2] == InContextDocs(src.cfg).episode(3)[2]  # a pure function of (seed, index)


def test_binding_documents_bind_two_words_to_two_values_of_one_hidden_attribute():
    src = BindingDocs(DocumentData(kind="shapesworld_binding", max_images=9, num_samples=300))
    attributes = set()
    for i in range(40):
        attribute, scenes, answers = src.episode(i)
        attributes.add(attribute)
        assert all(len(s.objects) == 1 for s in scenes) and set(answers) <= set(BINDING_WORDS)
        assert set(answers) <= src.valid_answers(i) and len(src.valid_answers(i)) == 2
        values = [getattr(s.objects[0], attribute) for s in scenes]
        assert len(set(values)) <= 2 and {(v, a) for v, a in zip(values, answers)} == set(zip(values, answers))
        assert len({v: a for v, a in zip(values, answers)}) == len(set(answers))  # one word per value, and back
        doc = src.document(i)
        assert doc["text"] == "".join(f"<image>{a}<|endofchunk|>" for a in answers) and len(doc["images"]) == 9
    assert attributes == {"color", "shape"}
    assert src.episode(5) == BindingDocs(src.cfg).episode(5)  # a pure function of (seed, index)
    val = BindingDocs(DocumentData(kind="shapesworld_binding", split="val", max_images=9, num_samples=300))
    assert val.episode(0)[1] != src.episode(0)[1]  # the val split renders scenes of its own


class _Episodes:
    """A binding source with hand-written episodes: (color, shape) per scene and the words."""

    def __init__(self, episodes):
        self.episodes = episodes

    def episode(self, i):
        scenes = [sw.Scene((sw.Obj(shape, color, "small", 0, 0),), "") for color, shape in self.episodes[i][0]]
        return "?", scenes, list(self.episodes[i][1])


def test_binding_ideal_learner_resolves_what_demonstrations_allow():
    # red circle and red square say "left", blue circle "right": "left" is not a shape (circle has both
    # words), so the words name colours and a blue square is "right".
    resolved = (
        [("red", "circle"), ("red", "square"), ("blue", "circle"), ("blue", "square")],
        ["left", "left", "right", "right"],
    )
    assert binding_ideal(_Episodes([resolved]), shots=(3,), num_queries=1) == {3: 1.0}
    # With one demonstration nothing says the query's word: the ideal learner cannot be sure of "right".
    wrong_guess = ([("red", "circle"), ("blue", "square")], ["left", "right"])
    assert binding_ideal(_Episodes([wrong_guess]), shots=(1,), num_queries=1) == {1: 0.0}
    src = BindingDocs(DocumentData(kind="shapesworld_binding", split="val", max_images=9, num_samples=300))
    ideal = binding_ideal(src, shots=(0, 1, 4, 8), num_queries=200)
    assert ideal[0] < 0.25 < ideal[1] < ideal[4] < ideal[8] and ideal[8] > 0.95  # more shots, fewer ambiguities


def test_rices_puts_the_most_similar_last():
    support = torch.nn.functional.normalize(torch.eye(5) + 0.01, dim=-1)  # (5, 5)
    query = torch.nn.functional.normalize(torch.tensor([[0.0, 0.3, 1.0, 0.6, 0.0]]), dim=-1)
    assert rices(query, support, 3).tolist() == [[1, 3, 2]]


def test_fewshot_prompts_and_metrics_on_a_tiny_model(tiny):
    torch.manual_seed(0)
    model, processor = create_flamingo(tiny)
    world = sw.ShapesWorldConfig(width=32, height=32)
    scenes = sw.make_split("val", 10, world)
    samples = [
        {"image": sw.render(s, world), "answer": s.caption, "question": "how many objects are there?"} for s in scenes
    ]
    out = fewshot_eval(
        model.eval(),
        processor,
        "caption",
        samples[:6],
        samples[6:],
        shots=(0, 2),
        selection="rices",
        decode={"max_new_tokens": 3, "num_beams": 1},
    )
    assert out["decode"] == {"num_beams": 1, "max_new_tokens": 3} and out["selection"] == "rices"
    zero, two = out["shots"][0], out["shots"][2]
    assert zero["prompt_example"].count("<image>") == 1 and zero["prompt_example"].count("Output:") == 3
    assert two["prompt_example"].count("<image>") == 3 and two["prompt_example"].endswith("<image>Output:")
    assert 0 <= two["exact_match"] <= 1 and two["n"] == 4
    vqa = fewshot_eval(model, processor, "vqa", samples[:6], samples[6:], shots=(1,), decode={"max_new_tokens": 2})
    assert "Short answer:" in vqa["shots"][1]["prompt_example"] and 0 <= vqa["shots"][1]["vqa_accuracy"] <= 1
    src = InContextDocs(DocumentData(kind="shapesworld_incontext", max_images=3, num_samples=50, width=32, height=32))
    ic = incontext_eval(model, processor, src, shots=(0, 2), num_queries=4, decode={"max_new_tokens": 2})
    assert set(ic["shots"]) == {0, 2} and 0 <= ic["shots"][2]["format_accuracy"] <= 1


def test_shapesworld_fewshot_scores_caption_attributes(tiny):
    torch.manual_seed(0)
    model, processor = create_flamingo(tiny)
    world = sw.ShapesWorldConfig(width=32, height=32)
    report = shapesworld_fewshot(model.eval(), processor, shots=(0, 1), n=3, beams=1, support_size=6, world=world)
    summary = fewshot_summary(report)
    assert set(summary) == {"caption_random", "caption_rices", "vqa", "incontext", "binding", "binding_ideal"}
    assert set(summary["binding"]) == {0, 1} and {"accuracy", "stderr", "format_accuracy"} <= set(summary["binding"][1])
    for k in (0, 1):
        attrs = report["caption"]["random"]["shots"][k]["attributes"]
        assert set(attrs) >= {"color", "shape", "size", "count", "relation"} and all(
            0 <= v <= 1 for v in attrs.values()
        )
    assert report["vqa"]["template"].startswith("<image>Question: ") and report["vqa"]["shots"][1]["n"] == 3
