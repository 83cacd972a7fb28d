"""The one interface: every design saves, loads through vlbridge.load, reports what it can do, places
itself on a device, and serves caption / ask through the same calls and the same CLI (timm's habit: one
parametrized test over every model)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import vlbridge
from vlbridge import (
    EVE,
    Blip2,
    EVEConfig,
    Flamingo,
    FlamingoConfig,
    Llava,
    LlavaConfig,
    LMConfig,
    VisionConfig,
    create_eve,
    create_flamingo,
    create_llava,
)
from vlbridge.cli import main
from vlbridge.core.base import VLModel
from vlbridge.evaluation.generation import answer, caption
from vlbridge.testing import randomize_

DESIGNS = ("blip2", "blip2_stage1", "flamingo", "eve", "llava")
CLASSES = {"blip2": Blip2, "blip2_stage1": Blip2, "flamingo": Flamingo, "eve": EVE, "llava": Llava}
TASKS = {
    "blip2": {"caption", "vqa"},
    "blip2_stage1": {"retrieval"},
    "flamingo": {"caption", "vqa", "in_context"},
    "eve": {"caption", "vqa"},
    "llava": {"caption", "vqa"},
}


def _create(design, tiny_configs, build):
    torch.manual_seed(0)
    if design == "blip2":
        model, processor = build("gpt2", randomize=True)
        model.drop_text_branch()
        return model, processor
    if design == "blip2_stage1":
        return build(None, randomize=True)
    lm = LMConfig(tiny_configs["gpt2"].lm.name_or_path)
    if design == "flamingo":
        model, processor = create_flamingo(
            FlamingoConfig(
                vision=VisionConfig(tiny_configs[None].vision.name_or_path, feature_layer=-1),
                lm=lm,
                perceiver_depth=1,
                num_latents=4,
                perceiver_heads=2,
                perceiver_dim_head=8,
                xattn_heads=2,
                xattn_dim_head=8,
            )
        )
    elif design == "eve":
        model, processor = create_eve(EVEConfig(lm=lm, patch_size=4, pel_width=16, pel_heads=2, max_image_size=32))
    else:
        model, processor = create_llava(LlavaConfig(vision=VisionConfig(tiny_configs[None].vision.name_or_path), lm=lm))
    randomize_(model, seed=1)  # open the gates / move the patch embedding off its init: outputs depend on the image
    return model.eval(), processor


@pytest.fixture(scope="module")
def saved(tiny_configs, build, tmp_path_factory):
    """{design: directory written by save_pretrained}, and two image files."""
    root = tmp_path_factory.mktemp("interface")
    dirs = {}
    for design in DESIGNS:
        model, processor = _create(design, tiny_configs, build)
        model.save_pretrained(root / design, processor=processor)
        dirs[design] = root / design
    for i, color in enumerate(("red", "blue")):
        Image.new("RGB", (32, 32), color).save(root / f"{i}.png")
    return dirs, root


@pytest.mark.parametrize("design", DESIGNS)
def test_load_any_design(saved, design):
    dirs, _ = saved
    assert json.loads((dirs[design] / "config.json").read_text())["model_type"] == CLASSES[design].model_type
    model, processor = vlbridge.load(dirs[design], device="cpu")
    assert type(model) is CLASSES[design] and isinstance(model, VLModel) and not model.training
    assert type(processor) is CLASSES[design].processor_class
    assert model.tasks == TASKS[design]
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert model.fsdp_blocks(), "FSDP needs the model's transformer blocks"
    groups = model.param_groups(0.1)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="trains in stages"):
        model.freeze_for_stage(9)


@pytest.mark.parametrize("design", ["blip2", "flamingo", "eve", "llava"])
def test_caption_and_answer_through_one_interface(saved, design):
    dirs, root = saved
    model, processor = vlbridge.load(dirs[design], device="cpu")
    images = [Image.open(root / "0.png"), Image.open(root / "1.png")]
    texts = caption(model, processor, images, num_beams=1, max_new_tokens=4, min_new_tokens=0)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    one = caption(model, processor, images[1:], num_beams=1, max_new_tokens=4, min_new_tokens=0)
    assert one == texts[1:]  # a batch generates like its rows one by one (left padding, positions)
    answers = answer(model, processor, images, ["what color is it?", "how many?"], num_beams=1, max_new_tokens=3)
    assert len(answers) == 2


def test_models_without_model_type_still_load(saved, tmp_path):
    """Directories saved before config.json carried model_type are recognised by their keys."""
    import shutil

    dirs, _ = saved
    for design in ("blip2", "flamingo", "eve"):
        old = tmp_path / design
        shutil.copytree(dirs[design], old)
        config = json.loads((old / "config.json").read_text())
        del config["model_type"]
        (old / "config.json").write_text(json.dumps(config))
        model, _ = vlbridge.load(old, device="cpu")
        assert type(model) is CLASSES[design]


def test_a_model_type_mismatch_is_refused(saved, tmp_path):
    dirs, _ = saved
    with pytest.raises(ValueError, match="holds a 'eve' model, not 'blip2'"):
        Blip2.from_pretrained(dirs["eve"])
    with pytest.raises(ValueError, match="no config.json"):
        vlbridge.load(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "paligemma"}')
    with pytest.raises(ValueError, match="'paligemma' is not one vlbridge loads"):
        vlbridge.load(tmp_path)


def test_place_casts_and_inputs_follow(saved):
    dirs, root = saved
    model, processor = vlbridge.load(dirs["blip2"], device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in model.parameters())
    batch = model.prepare_inputs(processor(images=[Image.open(root / "0.png")], text=["a photo of"]))
    assert batch["pixel_values"].dtype == torch.bfloat16 and batch["input_ids"].dtype == torch.long
    assert model.generate(**batch, max_new_tokens=2).shape[0] == 1


def test_examples_need_a_model_that_learns_in_context(saved):
    dirs, root = saved
    model, processor = vlbridge.load(dirs["flamingo"], device="cpu")
    image = Image.open(root / "0.png")
    with_shots = caption(
        model,
        processor,
        [image],
        examples=[(Image.open(root / "1.png"), "a blue square .")],
        num_beams=1,
        max_new_tokens=3,
        min_new_tokens=0,
    )
    assert len(with_shots) == 1
    inputs = processor.prompt_inputs([image], ["Output:"], examples=[(image, "Output:", "red")])
    assert (inputs["input_ids"] == processor.image_token_id).sum() == 2 and inputs["pixel_values"].shape[1] == 2
    blip2, blip2_processor = vlbridge.load(dirs["blip2"], device="cpu")
    with pytest.raises(ValueError, match="cannot do in_context"):
        caption(blip2, blip2_processor, [image], examples=[(image, "red")])


def _cli(capsys, *argv) -> list[dict]:
    main([*map(str, argv), "--json", "--num-beams", "1", "--max-new-tokens", "3", "--min-new-tokens", "0"])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("design", ["blip2", "flamingo", "eve", "llava"])
def test_cli_caption_and_ask_every_design(saved, design, capsys):
    dirs, root = saved
    rows = _cli(capsys, "caption", dirs[design], root / "0.png", root / "1.png", "--device", "cpu")
    assert [r["file"] for r in rows] == [str(root / "0.png"), str(root / "1.png")]
    rows = _cli(capsys, "ask", dirs[design], root / "0.png", "what color is it?", "how many?", "--device", "auto")
    assert [r["question"] for r in rows] == ["what color is it?", "how many?"]


def test_cli_flamingo_takes_examples(saved, capsys):
    dirs, root = saved
    rows = _cli(
        capsys,
        "caption",
        dirs["flamingo"],
        root / "0.png",
        "--example",
        root / "1.png",
        "a blue square .",
        "--example",
        root / "0.png",
        "a red square .",
    )
    assert len(rows) == 1
    rows = _cli(
        capsys,
        "ask",
        dirs["flamingo"],
        root / "0.png",
        "what color?",
        "--example",
        root / "1.png",
        "what color?",
        "blue",
    )
    assert len(rows) == 1


def _broken_models(saved):
    """Saved models with a part missing or damaged, and a text file that is not UTF-8."""
    import shutil

    dirs, root = saved
    broken = root / "broken"
    if not broken.exists():
        for name in ("no-lm", "no-weights", "corrupt"):
            shutil.copytree(dirs["blip2"], broken / name)
        shutil.rmtree(broken / "no-lm" / "lm")
        (broken / "no-weights" / "model.safetensors").unlink()
        data = (broken / "corrupt" / "model.safetensors").read_bytes()
        (broken / "corrupt" / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
        (broken / "latin1.txt").write_bytes("un caf\xe9 rouge\n".encode("latin-1"))
    return broken


@pytest.mark.parametrize(
    "argv, message",
    [
        (["caption", "{blip2}", "{root}/0.png", "--example", "{root}/1.png", "a cap"], "cannot do in_context"),
        (["retrieve", "{eve}", "--text", "a red square", "--images", "{root}"], "cannot do retrieval"),
        (["caption", "{blip2_stage1}", "{root}/0.png"], "cannot do caption"),
        (["ask", "{blip2}", "{root}/missing.png", "what?"], "missing.png"),
        (["ask", "{blip2}", "{root}/0.png", " "], "a question is empty"),
        (["caption", "{root}", "{root}/0.png"], "no config.json"),
        (
            ["caption", "{blip2}", "{root}/0.png", "--device", "cuda:7" if not torch.cuda.is_available() else "nope"],
            "device",
        ),
        (["ask", "{blip2}", "{root}", "what?"], "Is a directory"),
        (["retrieve", "{blip2_stage1}", "--text", "a", "--images", "{root}", "--k", "0"], "argument --k"),
        (["caption", "{blip2}", "{root}/0.png", "--num-beams", "0"], "argument --num-beams"),
        (["retrieve", "{blip2_stage1}", "--image", "{root}/0.png", "--texts-file", "{root}/none.txt"], "none.txt"),
        (["retrieve", "{blip2_stage1}", "--image", "{root}/0.png", "--texts-file", "{broken}/latin1.txt"], "not UTF-8"),
        (["retrieve", "{blip2_stage1}", "--image", "{root}/0.png", "--texts", "red " * 40], "more than the limit"),
        (["caption", "{broken}/no-lm", "{root}/0.png"], "has no lm/ folder"),
        (["caption", "{broken}/no-weights", "{root}/0.png"], "no model.safetensors"),
        (["caption", "{broken}/corrupt", "{root}/0.png"], "not a readable safetensors file"),
        (["caption", "./no/such/model", "{root}/0.png"], "no such directory"),
        (["ask", "{blip2}", "{root}/0.png", "what?", "--max-new-tokens", "5000"], "more than the LM's"),
    ],
)
def test_cli_bad_input_is_one_line(saved, capsys, argv, message):
    dirs, root = saved
    names = {**{k: str(v) for k, v in dirs.items()}, "root": str(root), "broken": str(_broken_models(saved))}
    with pytest.raises(SystemExit) as e:
        main([a.format(**names) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err.strip().splitlines()[-1] and "Traceback" not in err, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("design", ["blip2", "flamingo", "eve", "llava"])
def test_cuda_generation_matches_cpu(saved, design):
    """Where CUDA exists: device="auto" takes it, inputs follow the model, greedy ids match the CPU's."""
    dirs, root = saved
    images = [Image.open(root / "0.png"), Image.open(root / "1.png")]
    outs = {}
    for device in ("cpu", "auto"):
        model, processor = vlbridge.load(dirs[design], device=device)
        outs[device] = caption(model, processor, images, num_beams=1, max_new_tokens=4, min_new_tokens=0)
    assert model.device.type == "cuda"
    assert outs["cpu"] == outs["auto"]


def test_retrieve_truncates_when_asked(saved, capsys):
    dirs, root = saved
    main(
        [
            "retrieve",
            str(dirs["blip2_stage1"]),
            "--image",
            str(root / "0.png"),
            "--texts",
            "red " * 40,
            "blue",
            "--truncate",
            "--json",
        ]
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["text"] for r in rows) == sorted(["red " * 40, "blue"])


def test_python_api_refuses_mismatched_inputs(saved):
    dirs, root = saved
    image = Image.open(root / "0.png")
    model, processor = vlbridge.load(dirs["blip2"], device="cpu")
    with pytest.raises(ValueError, match="2 images for 3 prompts"):
        processor(images=[image, image], text=["a", "b", "c"])
    with pytest.raises(ValueError, match="must hold one"):
        answer(model, processor, [image], ["what color?"], template="Answer:")
    flamingo, flamingo_processor = vlbridge.load(dirs["flamingo"], device="cpu")
    with pytest.raises(ValueError, match="1 images for 2 prompts"):
        flamingo_processor.prompt_inputs([image], ["a", "b"])
