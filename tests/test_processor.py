"""Blip2Processor: image checks and conversion, normalisation with the backbone's own statistics,
LM text layout (left padding, -100 labels), T5 prefix-LM targets, Q-Former text limits."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlbridge import Blip2Processor, ImageError, load_image

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def procs(build):
    return {kind: build(kind)[1] for kind in (None, "gpt2", "t5")}


def _ids(tok, text):
    return [tok.convert_tokens_to_ids(w) for w in text.split()]


def _solid(rgb, size=(40, 40)):
    return Image.new("RGB", size, tuple(rgb))


# ---------------------------------------------------------------------------------- images: refused
def test_bad_images_name_the_problem(procs, tmp_path):
    proc = procs[None]
    corrupt = tmp_path / "x.png"
    corrupt.write_bytes(np.random.default_rng(0).bytes(300))
    sixteen = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 300, np.uint16)).save(sixteen)
    cases = [
        (corrupt, r"x\.png: cannot decode"),
        (tmp_path / "missing.png", r"missing\.png: file not found"),
        (str(tmp_path / "missing.jpg"), "file not found"),
        (np.zeros((0, 5, 3), np.uint8), "zero size"),
        (Image.new("RGB", (0, 3)), "zero size"),
        (Image.fromarray(np.zeros((4, 4), np.uint16)), "mode 'I;16'"),
        (sixteen, "mode 'I;16'"),
        (np.full((4, 4, 3), 1.5, np.float32), r"\[0, 1\]"),
        (np.full((4, 4, 3), -0.1, np.float64), r"\[0, 1\]"),
        (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
        (np.zeros((4, 4, 2), np.uint8), r"shape \(4, 4, 2\)"),
        (np.zeros((2, 4, 4, 3), np.uint8), "shape"),
        (np.zeros(16, np.uint8), "shape"),
        (np.zeros((4, 4, 3), np.int64), "dtype int64"),
        ({"not": "an image"}, "expected a PIL image"),
    ]
    for bad, message in cases:
        with pytest.raises(ImageError, match=message):
            load_image(bad)
        with pytest.raises(ImageError, match=message):  # the processor does not swallow it either
            proc.images([_solid((1, 2, 3)), bad])
    assert issubclass(ImageError, ValueError)


# ---------------------------------------------------------------------------------- images: accepted
def test_constant_colour_uses_backbone_mean_and_std(procs):
    proc = procs[None]
    assert proc.image_processor.image_mean == pytest.approx(CLIP_MEAN)
    assert proc.image_processor.image_std == pytest.approx(CLIP_STD)
    rgb = (200, 100, 50)
    px = proc.images(_solid(rgb, size=(60, 40)))  # not square: resized and centre-cropped to 32x32
    assert px.shape == (1, 3, 32, 32) and px.dtype == torch.float32
    for c in range(3):
        expected = (rgb[c] / 255 - CLIP_MEAN[c]) / CLIP_STD[c]
        assert torch.allclose(px[0, c], torch.full((32, 32), expected), atol=1e-4), c


def test_modes_and_arrays_convert_to_rgb(procs, tmp_path):
    proc = procs[None]
    ref = proc.images(_solid((100, 100, 100)))
    gray = Image.new("L", (40, 40), 100)
    rgba = Image.new("RGBA", (40, 40), (100, 100, 100, 255))
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([100, 100, 100] + [0] * 765)
    gray.save(tmp_path / "gray.png")
    accepted = [
        gray,
        rgba,
        palette,
        Image.new("LA", (40, 40), (100, 255)),
        tmp_path / "gray.png",
        np.full((40, 40), 100, np.uint8),
        np.full((40, 40, 1), 100, np.uint8),
        np.full((40, 40, 3), 100, np.uint8),
        np.full((40, 40, 4), 100, np.uint8),
        np.full((40, 40, 3), 100 / 255, np.float32),
        np.full((40, 40), 100 / 255, np.float64),
    ]
    for image in accepted:
        assert load_image(image).mode == "RGB"
        assert torch.allclose(proc.images(image), ref, atol=1e-5), type(image)
    # the conversion really reads the values (a different grey gives other pixel values)
    assert not torch.allclose(proc.images(np.full((40, 40), 0.9, np.float32)), ref, atol=1e-2)
    batch = proc.images([gray, np.zeros((20, 30, 3), np.uint8)])
    assert batch.shape == (2, 3, 32, 32) and torch.allclose(batch[:1], ref, atol=1e-5)


# ---------------------------------------------------------------------------------- LM text
def test_decoder_only_left_padding_and_labels(procs):
    proc = procs["gpt2"]
    tok = proc.tokenizer
    pad, eos, bos = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
    out = proc(text=["a photo of", "how many"], targets=["red circle", "two"])
    a, photo, of, red, circle, how, many, two = _ids(tok, "a photo of red circle how many two")
    assert out["input_ids"].tolist() == [[a, photo, of, red, circle, eos], [pad, pad, how, many, two, eos]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
    assert out["labels"].tolist() == [[-100, -100, -100, red, circle, eos], [-100, -100, -100, -100, two, eos]]
    # generation inputs: prompts only, left-padded, no labels
    gen = proc(text=["a photo of", "how many"])
    assert gen["input_ids"].tolist() == [[a, photo, of], [pad, how, many]] and "labels" not in gen
    # an empty prompt starts from bos
    empty = proc(text=[""], targets=["red"])
    assert empty["input_ids"].tolist() == [[bos, red, eos]] and empty["labels"].tolist() == [[-100, red, eos]]
    with pytest.raises(ValueError, match="2 prompts but 1 targets"):
        proc(text=["a", "b"], targets=["c"])


def test_encoder_decoder_right_padding_and_labels(procs):
    proc = procs["t5"]
    tok = proc.tokenizer
    pad, eos = tok.pad_token_id, tok.eos_token_id
    a, photo, of, red, circle, how, many, two = _ids(tok, "a photo of red circle how many two")
    out = proc(text=["a photo of", "how many"], targets=["red circle", "two"])
    assert out["input_ids"].tolist() == [[a, photo, of], [how, many, pad]]  # the encoder's prefix
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["labels"].tolist() == [[red, circle, eos], [two, eos, -100]]  # the decoder's target


def test_qformer_text_and_its_length_limit(procs):
    proc = procs[None]
    tok = proc.qformer_tokenizer
    cls, sep, pad = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
    a, red, circle, two = _ids(tok, "a red circle two")
    out = proc(qformer_text=["a red circle", "two"])
    assert out["qformer_input_ids"].tolist() == [[cls, a, red, circle, sep], [cls, two, sep, pad, pad]]
    assert out["qformer_attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert proc.max_text_length == 16
    fits = " ".join(["red"] * 14)  # 14 words + [CLS] + [SEP] = 16 tokens
    long = " ".join(["red", "blue"] * 10)  # 22 tokens
    assert proc.qformer_text([fits])["input_ids"].shape == (1, 16) and proc.num_truncated == 0
    with pytest.raises(ValueError, match="22 tokens, more than the limit 16"):
        proc.qformer_text([long, "two"])
    cut = proc.qformer_text([long, "two"], truncate=True)
    assert proc.num_truncated == 1
    assert cut["input_ids"].shape == (2, 16)
    assert cut["input_ids"][0].tolist() == [cls] + _ids(tok, " ".join(["red", "blue"] * 7)) + [sep]
    assert cut["input_ids"][1, :3].tolist() == [cls, two, sep]  # short texts untouched
    proc.qformer_text([long], truncate=True)
    assert proc.num_truncated == 2  # counted, never silent
    proc.num_truncated = 0


def test_stage1_processor_has_no_lm_text(procs):
    with pytest.raises(ValueError, match="no LM tokenizer"):
        procs[None](text=["a photo of"])


def test_image_token_layout(build, images):
    """transformers' newer layout (Q image tokens in the prompt, replaced by the queries) gives the
    same loss and generations as prepending the queries."""
    model, proc = build("gpt2", randomize=True)
    px = images(2)
    prompts, targets = ["a photo of", "how many"], ["red circle", "two"]
    plain = model(px, **proc(text=prompts, targets=targets)).loss
    gen = model.generate(px, **proc(text=prompts), max_new_tokens=5)
    model.config.image_token_id = proc.tokenizer.unk_token_id
    proc2 = Blip2Processor.from_config(model.config)
    batch = proc2(text=prompts, targets=targets)
    unk = proc2.tokenizer.unk_token_id
    assert batch["input_ids"][0, :4].tolist() == [unk] * 4 and (batch["labels"][:, :4] == -100).all()
    assert torch.allclose(model(px, **batch).loss, plain, atol=1e-5)
    assert torch.equal(model.generate(px, **proc2(text=prompts), max_new_tokens=5), gen)
    with pytest.raises(ValueError, match="exactly 4 image tokens"):
        model(px, **proc(text=prompts, targets=targets))  # a prompt without the image tokens
