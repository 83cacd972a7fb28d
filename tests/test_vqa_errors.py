"""scripts/vqa_errors.py: the caption's own answer to an attribute question, and the four-cell count."""

import importlib.util
from pathlib import Path

import torch

from vlbridge import create_blip2
from vlbridge.data import shapesworld as sw
from vlbridge.testing import tiny_blip2_config

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "vqa_errors.py"
spec = importlib.util.spec_from_file_location("vqa_errors", SCRIPT)
vqa_errors = importlib.util.module_from_spec(spec)
spec.loader.exec_module(vqa_errors)

CAPTION = "a small red star left of a large blue star above a large red circle."


def test_caption_answer():
    ans = vqa_errors.caption_answer
    assert ans("what color is the circle?", "color", CAPTION) == "red"
    assert ans("what color is the star?", "color", CAPTION) is None  # two stars: no unique answer
    assert ans("what color is the square?", "color", CAPTION) is None  # not named
    assert ans("what shape is the blue object?", "shape", CAPTION) == "star"
    assert ans("what size is the red circle?", "size", CAPTION) == "large"
    assert ans("what size is the red star?", "size", CAPTION) == "small"


def test_counts_cover_every_attribute_question(tmp_path):
    torch.manual_seed(0)
    model, processor = create_blip2(tiny_blip2_config(tmp_path))
    world = sw.ShapesWorldConfig(width=32, height=32)
    scenes = sw.make_split("test", 6, world)
    out = vqa_errors.vqa_errors(model, processor, scenes, world, batch_size=8)
    asked = sum(qa.kind in vqa_errors.KINDS for s in scenes for qa in s.qa)
    assert sum(out["all"].values()) == asked > 0
    for kind, cells in out["cells"].items():
        assert sum(cells.values()) == sum(qa.kind == kind for s in scenes for qa in s.qa)
    yn = out["relation_yes_no"]
    assert yn["n"] == sum(qa.kind == "relation" and qa.answer in ("yes", "no") for s in scenes for qa in s.qa) > 0
    assert 0 <= yn["accuracy"] <= 1 and 0 <= yn["said_yes"] <= 1 and 0 < yn["truth_yes"] < 1
