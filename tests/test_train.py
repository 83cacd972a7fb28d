"""The training entry point: recipes, schedule, a tiny end-to-end run, exact resume."""

import json

import pytest

from vlbridge import create_blip2
from vlbridge.core.config import to_dict
from vlbridge.testing import tiny_blip2_config
from vlbridge.training.recipe import OptimConfig, TrainConfig, load_recipe
from vlbridge.training.train import lr_at, train


def _recipe(tmp_path, name, **kw):
    cfg = tiny_blip2_config(tmp_path / "backbones", lm=None)
    r = {
        "stage": 1,
        "model": to_dict(cfg),
        "data": {"num_samples": 96, "group_size": 4},
        "steps": 6,
        "batch_size": 8,
        "log_every": 1,
        "out_dir": str(tmp_path / name),
        "optim": {"warmup_steps": 2, "lr": 1e-3},
        "precision": "fp32",
    }
    r.update(kw)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(r))
    return path


def _losses(out_dir):
    return [json.loads(x)["loss"] for x in (out_dir / "log.jsonl").read_text().splitlines()]


def test_recipe_overrides_and_unknown_keys(tmp_path):
    path = _recipe(tmp_path, "r")
    cfg = load_recipe(path, ["steps=3", "optim.lr=0.5", "model.qformer.num_query_tokens=2", "out_dir=x"])
    assert (cfg.steps, cfg.optim.lr, cfg.model.qformer.num_query_tokens, cfg.out_dir) == (3, 0.5, 2, "x")
    with pytest.raises(ValueError, match="stepz"):
        load_recipe(path, ["stepz=3"])
    with pytest.raises(ValueError, match="key=value"):
        load_recipe(path, ["steps"])


def test_shipped_recipes_parse():
    from vlbridge.training.recipe import RECIPES

    names = sorted(p.stem for p in RECIPES.glob("*.json"))
    assert {"blip2_shapesworld_stage1", "blip2_shapesworld_instruct", "flamingo_shapesworld_instruct"} <= set(names)
    for name in names:
        cfg = load_recipe(name)
        assert "{assets}" not in json.dumps(to_dict(cfg)), name


def test_shipped_stage1_starts_from_the_shipped_bert():
    import torch
    from safetensors.torch import load_file

    from vlbridge.training.build import build_blip2

    cfg = load_recipe("blip2_shapesworld_stage1")
    model, _ = build_blip2(cfg)
    bert = load_file(f"{cfg.qformer_init}/model.safetensors")
    assert torch.equal(
        model.qformer.state_dict()["layers.3.ffn.output.weight"], bert["bert.encoder.layer.3.output.dense.weight"]
    )


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=110, optim=OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10))
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half way through the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 110))


def test_resume_replays_the_same_losses(tmp_path):
    straight = train(load_recipe(_recipe(tmp_path, "straight")))
    # The same recipe, stopped after a checkpoint at step 3 and resumed.
    interrupted = _recipe(tmp_path, "interrupted", save_every=3)
    train(load_recipe(interrupted, ["steps=4"]))  # writes last/ at step 3, then runs on to 4
    log = tmp_path / "interrupted" / "log.jsonl"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:3]))  # forget the 4th step
    train(load_recipe(interrupted))
    a, b = _losses(straight.parent), _losses(tmp_path / "interrupted")
    assert len(a) == len(b) == 6
    # The tiny Q-Former takes 16 tokens: longer ShapesWorld captions are cut, and the log counts them.
    rows = [json.loads(x) for x in (straight.parent / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["texts_truncated"] > 0
    assert b == pytest.approx(a, rel=1e-6, abs=1e-6)
    assert a[-1] < a[0]


@pytest.mark.parametrize("question", [False, True], ids=["queries", "qformer_question"])
def test_stage2_from_stage1_with_feature_cache(tmp_path, question):
    stage1 = train(load_recipe(_recipe(tmp_path, "s1"), ["steps=2"]))
    lm_cfg = tiny_blip2_config(tmp_path / "backbones2", lm="gpt2").lm
    path = _recipe(
        tmp_path,
        "s2",
        stage=2,
        init_from=str(stage1),
        cache_features=True,
        data={"num_samples": 32, "group_size": 1, "tasks": ["caption", "vqa"]},
    )
    cfg = load_recipe(
        path, [f"model.lm={json.dumps(to_dict(lm_cfg))}", f"model.qformer_question={json.dumps(question)}"]
    )
    final = train(cfg)
    from vlbridge import Blip2

    model = Blip2.from_pretrained(final)
    assert model.lm is not None and model.config.qformer_question == question
    # Stage 2 keeps the Q-Former's text side only to read questions; the stage-1 heads always go.
    assert model.config.qformer.text_branch == question and model.qformer.lm_head is None
    assert list((tmp_path / "feature-cache").glob("features-*.safetensors"))
    assert len(_losses(tmp_path / "s2")) == 6


def test_stage1_qformer_starts_from_bert(tmp_path):
    """qformer_init: the fresh Q-Former's text path is the BERT checkpoint's (as BLIP-2 starts from
    bert-base-uncased), what BERT lacks (queries, cross-attention) is fresh, and training runs from it."""
    import torch
    import transformers as tf

    from vlbridge.testing import randomize_, word_tokenizer
    from vlbridge.training.build import build_blip2

    q = tiny_blip2_config(tmp_path / "backbones", lm=None).qformer
    bert_cfg = tf.BertConfig(
        vocab_size=len(word_tokenizer("bert")),
        hidden_size=q.hidden_size,
        num_hidden_layers=q.num_layers,
        num_attention_heads=q.num_heads,
        intermediate_size=q.intermediate_size,
        max_position_embeddings=q.max_position_embeddings,
    )
    torch.manual_seed(0)
    randomize_(tf.BertForMaskedLM(bert_cfg)).save_pretrained(tmp_path / "bert")
    bert = tf.BertForMaskedLM.from_pretrained(tmp_path / "bert").state_dict()
    path = _recipe(tmp_path, "s1", qformer_init=str(tmp_path / "bert"), steps=2)
    torch.manual_seed(0)
    fresh, _ = build_blip2(load_recipe(path, ["qformer_init="]))
    torch.manual_seed(0)
    model, _ = build_blip2(load_recipe(path))
    state = model.qformer.state_dict()
    assert torch.equal(
        state["layers.1.attention.query.weight"], bert["bert.encoder.layer.1.attention.self.query.weight"]
    )
    assert torch.equal(state["lm_head.dense.weight"], bert["cls.predictions.transform.dense.weight"])
    assert torch.equal(
        state["layers.0.ffn_query.intermediate.weight"], bert["bert.encoder.layer.0.intermediate.dense.weight"]
    )
    assert torch.equal(state["query_tokens"], fresh.qformer.state_dict()["query_tokens"])
    assert not torch.equal(
        state["layers.0.attention.key.weight"], fresh.qformer.state_dict()["layers.0.attention.key.weight"]
    )
    assert len(_losses(train(load_recipe(path)).parent)) == 2
    with pytest.raises(ValueError, match="qformer_init"):
        load_recipe(path, ["stage=2"])


def test_stage1_loss_weights(tmp_path):
    """loss_weights: the logged loss is the weighted sum of the logged parts; itg=0 skips ITG; weights
    are for BLIP-2 stage 1 only and must be >= 0."""
    path = _recipe(tmp_path, "w", steps=2, loss_weights={"itc": 0.5, "itm": 3.0, "itg": 0.0})
    train(load_recipe(path))
    for row in map(json.loads, (tmp_path / "w" / "log.jsonl").read_text().splitlines()):
        assert row["loss_itg"] == 0.0 and row["loss_itm"] > 0
        assert row["loss"] == pytest.approx(0.5 * row["loss_itc"] + 3.0 * row["loss_itm"], rel=1e-5)
    with pytest.raises(ValueError, match="loss_weights"):
        load_recipe(path, ["loss_weights.itm=-1"])
    with pytest.raises(ValueError, match="loss_weights"):
        load_recipe(path, ["stage=2"])


def _user_files(tmp_path):
    """A JSONL of 12 captions over 6 rendered images (2 each), one image corrupt, one missing; a CSV of
    questions with answers over the same images."""
    from vlbridge.data import shapesworld as sw

    world = sw.ShapesWorldConfig(width=32, height=32)
    scenes = sw.make_split("train", 6, world)
    images = tmp_path / "images"
    images.mkdir()
    for i, s in enumerate(scenes[:4]):
        sw.render(s, world).save(images / f"{i}.png")
    (images / "4.png").write_bytes(b"not a png")  # 5.png is never written
    rows = [
        {"image": f"{i}.png", "caption": c, "image_id": i}
        for i, s in enumerate(scenes)
        for c in (s.caption, s.caption.replace(".", " here."))
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = ["image,question,answer"] + [f"{i}.png,{q},{a}" for i, s in enumerate(scenes) for q, a in s.qa[:2]]
    (tmp_path / "vqa.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_training_on_your_files_skips_bad_images(tmp_path, caplog):
    from vlbridge.data.batches import BatchStream, DataConfig, FilesPool

    root = _user_files(tmp_path)
    data = {
        "source": "jsonl",
        "path": str(root / "train.jsonl"),
        "image_root": str(root / "images"),
        "num_samples": 0,
        "group_size": 1,
    }
    train(load_recipe(_recipe(tmp_path, "files", data=data, steps=3, batch_size=4)))
    assert len(_losses(tmp_path / "files")) == 3

    pool = FilesPool(DataConfig(**data))
    assert len(pool) == 12 and pool.image_ids[:4] == [0, 0, 1, 1]  # two captions per image: one ITC id
    assert [pool.usable(i) for i in (7, 8, 9, 10, 11)] == [7, 0, 0, 0, 0]  # images 4 and 5 -> wrap to 0
    assert pool.bad == {8, 9, 10, 11} and pool.skips.skipped == 4  # counted per sample, each decoded once
    assert any(ref.endswith("4.png") for ref, _ in pool.skips.examples)
    assert any(ref.endswith("5.png") for ref, _ in pool.skips.examples)

    _, proc = create_blip2(tiny_blip2_config(tmp_path / "b2", lm="gpt2"))
    vqa = FilesPool(
        DataConfig(source="csv", path=str(root / "vqa.csv"), image_root=str(root / "images"), num_samples=0)
    )
    batch = BatchStream(vqa, proc, 4, 1, 2, ("a photo of", "Question: {} Answer:")).batch(2)
    assert batch["pixel_values"].shape[0] == 4 and (batch["labels"] != -100).any()
    with pytest.raises(ValueError, match="stage 1 learns from image-text pairs"):
        train(load_recipe(_recipe(tmp_path, "v", data={"source": "vqa", "path": "q.json"})))
    with pytest.raises(ValueError, match="data.source"):
        load_recipe(_recipe(tmp_path, "bad", data={"source": "parquet", "path": "x"}))


def test_qa_weights_shift_the_question_mix():
    """data.qa_weights: a question's chance is its kind's weight; without it the draw is uniform, as before."""
    import numpy as np

    from vlbridge.data.batches import DataConfig, ShapesWorldPool

    def share(**kw):
        pool = ShapesWorldPool(DataConfig(num_samples=400, group_size=1, tasks=["vqa"], **kw))
        kinds = [pool.sample(i, np.random.default_rng(i), "Q: {}", "")["question"] for i in range(len(pool))]
        by_text = {qa.question: qa.kind for s in pool.scenes for qa in s.qa}
        return sum(by_text[q] == "relation" for q in kinds) / len(kinds)

    uniform, tripled = share(), share(qa_weights={"relation": 3.0})
    assert 0.15 < uniform < 0.40 and tripled > uniform + 0.15
    assert share(qa_weights={"relation": 0.0}) == 0.0
    with pytest.raises(ValueError, match="kinds are"):
        DataConfig(qa_weights={"colour": 2.0})
