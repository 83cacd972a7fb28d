"""scripts/pretrain_backbones.py: the yes/no relation questions of the LM curriculum are true to the scene."""

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from vlbridge.assets import SHAPESWORLD
from vlbridge.data import shapesworld as sw

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pretrain_backbones.py"
spec = importlib.util.spec_from_file_location("pretrain_backbones", SCRIPT)
pb = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = pb  # dataclasses look their module up there
spec.loader.exec_module(pb)

QUESTION = re.compile(r"is the (\w+ \w+) (left of|right of|above|below) the (\w+ \w+)\?")


@pytest.mark.parametrize("order", ["forward", "caption", "any"])
def test_yes_no_questions_are_true_to_the_scene_and_balanced(order):
    scenes = sw.make_split("train", 400, sw.ShapesWorldConfig())
    rng = np.random.default_rng(0)
    answers = []
    for scene in scenes:
        qa = pb.yes_no_question(scene, rng, order)
        if qa is None:
            continue
        x, rel, y = QUESTION.fullmatch(qa.question).groups()
        by_name = {o.name: o for o in scene.objects}
        names = [o.name for o in scene.objects]
        assert names.count(x) == 1 and names.count(y) == 1 and x != y  # "the red circle" names one object
        assert qa.answer == ("yes" if sw.holds(rel, by_name[x], by_name[y]) else "no")
        if order == "forward":  # named in caption order, about neighbours
            assert names.index(y) == names.index(x) + 1
        answers.append(qa.answer == "yes")
    assert len(answers) > 150 and 0.4 < np.mean(answers) < 0.6


def test_curriculum_sequences_score_only_the_answer():
    tok = PreTrainedTokenizerFast.from_pretrained(SHAPESWORLD / "lm")
    phase = pb.Phase("t", 1, yes_no=1.0, order="caption", pooled=True, any_pair=0.5)
    rng = np.random.default_rng(1)
    for scene in sw.make_split("train", 40, sw.ShapesWorldConfig()):
        if not any(q.kind == "relation" and q.answer in ("yes", "no") for q in scene.qa):
            continue
        seq, start = pb.curriculum_example(scene, rng, tok, phase, pb.LM_MIX)
        scored = [tok.decode(p) for p in seq[start:]]
        assert scored[0] in ("yes", "no") and seq[start:][1:] == [[tok.eos_token_id]]
