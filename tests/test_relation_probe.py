"""scripts/relation_probe.py: it trains only the bridge on yes/no relation questions and scores them."""

import importlib.util
from pathlib import Path

import torch

from vlbridge import Blip2Processor
from vlbridge.data import shapesworld as sw

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "relation_probe.py"
spec = importlib.util.spec_from_file_location("relation_probe", SCRIPT)
relation_probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(relation_probe)


def test_probe_trains_the_bridge_and_scores_yes_no(build):
    model, _ = build("gpt2", randomize=True)
    model.config.qformer_question = True
    model.drop_text_branch()
    proc = Blip2Processor.from_config(model.config)
    lm_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    query_before = model.qformer.query_tokens.detach().clone()
    world = sw.ShapesWorldConfig(width=32, height=32)
    curve = relation_probe.probe(model, proc, world, steps=2, lr=1e-2, every=1, batch_size=4, n_train=8, n_test=4)
    assert [c["step"] for c in curve] == [0, 1, 2]
    assert all(0 <= c["accuracy"] <= 1 and 0 <= c["said_yes"] <= 1 for c in curve)
    assert all(torch.equal(v, model.lm.state_dict()[k]) for k, v in lm_before.items())
    assert not torch.equal(query_before, model.qformer.query_tokens)
    items = relation_probe.yes_no_items("test", 4, world)
    assert items and all(qa.answer in ("yes", "no") and qa.kind == "relation" for _, qa in items)
