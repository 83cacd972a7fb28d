"""The `vlbridge` command on a saved tiny model: caption, ask, retrieve, with bad files skipped."""

import json

import numpy as np
import pytest
from PIL import Image

from vlbridge import create_blip2
from vlbridge.cli import main
from vlbridge.testing import randomize_, tiny_blip2_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model, processor = create_blip2(tiny_blip2_config(root / "backbones", lm="gpt2"))
    randomize_(model.qformer, seed=3)
    model.save_pretrained(root / "model", processor=processor)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(images / f"{i}.png")
    (images / "broken.png").write_bytes(b"not an image")
    return root


def _rows(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_caption_skips_and_reports_bad_images(saved, capsys):
    main(
        [
            "caption",
            str(saved / "model"),
            str(saved / "images"),
            "--max-new-tokens",
            "3",
            "--num-beams",
            "2",
            "--min-new-tokens",
            "3",
            "--json",
        ]
    )
    captured = capsys.readouterr()
    rows = [json.loads(x) for x in captured.out.splitlines()]
    assert [r["file"].rsplit("/", 1)[1] for r in rows] == ["0.png", "1.png", "2.png"]
    assert all(len(r["caption"].split()) == 3 for r in rows)
    assert "skipped 1 of 4 images" in captured.err and "broken.png" in captured.err


def test_ask_answers_each_question(saved, capsys):
    main(
        [
            "ask",
            str(saved / "model"),
            str(saved / "images" / "0.png"),
            "what color is the circle ?",
            "how many",
            "--max-new-tokens",
            "2",
            "--json",
        ]
    )
    rows = _rows(capsys)
    assert [r["question"] for r in rows] == ["what color is the circle ?", "how many"]
    assert all(1 <= len(r["answer"].split()) <= 2 for r in rows)


def test_retrieve_both_directions(saved, capsys):
    main(
        [
            "retrieve",
            str(saved / "model"),
            "--images",
            str(saved / "images"),
            "--text",
            "a red circle",
            "--k",
            "2",
            "--json",
        ]
    )
    rows = _rows(capsys)
    assert len(rows) == 2  # only the top k are re-ranked and listed
    assert rows[0]["score"] >= rows[1]["score"]
    main(
        [
            "retrieve",
            str(saved / "model"),
            "--image",
            str(saved / "images" / "1.png"),
            "--texts",
            "a red circle",
            "two",
            "blue square",
            "--json",
        ]
    )
    rows = _rows(capsys)
    assert sorted(r["text"] for r in rows) == ["a red circle", "blue square", "two"]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    main(
        [
            "retrieve",
            str(saved / "model"),
            "--image",
            str(saved / "images" / "1.png"),
            "--texts",
            "a red circle",
            "two",
            "blue square",
            "--rerank",
            "lavis",
            "--json",
        ]
    )
    lavis = _rows(capsys)
    assert len(lavis) == 3 and [r["score"] for r in lavis] != [r["score"] for r in rows]  # another rule, other scores


def test_retrieve_needs_a_direction(saved):
    with pytest.raises(SystemExit):
        main(["retrieve", str(saved / "model")])
