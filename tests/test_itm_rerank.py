"""scripts/itm_rerank.py agrees with the library's retrieval evaluation on a tiny random stage-1 model."""

import importlib.util
from pathlib import Path

import pytest
import torch

from vlbridge import create_blip2
from vlbridge.data import shapesworld as sw
from vlbridge.evaluation import evaluate as ev
from vlbridge.testing import randomize_, tiny_blip2_config

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "itm_rerank.py"
spec = importlib.util.spec_from_file_location("itm_rerank", SCRIPT)
itm_rerank = importlib.util.module_from_spec(spec)
spec.loader.exec_module(itm_rerank)


def test_rules_match_the_library_scores(tmp_path):
    torch.manual_seed(0)
    model, processor = create_blip2(tiny_blip2_config(tmp_path, lm=None))
    randomize_(model.qformer)
    world = sw.ShapesWorldConfig(width=32, height=32)
    scenes = ev.retrieval_scenes("test", 24, world)
    r1 = itm_rerank.rerank_r1(model, processor, scenes, world, k=4, batch_size=8)
    spread = r1.pop("spread")
    assert set(spread) == {"itc", "itc/temp", "itm", "logodds"} and all(v >= 0 for v in spread.values())
    assert set(r1) == {"itc", "itm", "itm+itc", "logodds", "logodds+itc", "prob+itc", "logodds+itc/temp"}
    for rule, rerank in (("logodds+itc/temp", "log_odds"), ("itm+itc", "lavis")):
        ref = ev.shapesworld_retrieval(model, processor, scenes, world, k=4, batch_size=8, rerank=rerank)
        assert r1["itc"] == pytest.approx(ref["itc"]["i2t_r1"], abs=1e-4)
        assert r1[rule] == pytest.approx(ref["itc_itm"]["i2t_r1"], abs=1e-4), rule
