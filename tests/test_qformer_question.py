"""A stage-2 BLIP-2 whose Q-Former reads the question (Blip2Config.qformer_question, the paper's VQA
fine-tuning): the question reaches the queries, a row without one runs the queries alone, the text side
trains while the stage-1 heads are gone, and checkpoints, batches and the answer helpers carry it."""

import numpy as np
import pytest
import torch

from vlbridge import Blip2, Blip2Processor
from vlbridge.data.batches import text_inputs
from vlbridge.evaluation.generation import answer

PROMPTS = ["Question: what color is the circle? Answer:", "a photo of"]
TARGETS = ["red", "a red circle"]
QUESTIONS = ["what color is the circle?", "is there a square?"]


def _question_model(build, lm="gpt2"):
    model, proc = build(lm, randomize=True)
    model.config.qformer_question = True
    model.drop_text_branch()
    return model, Blip2Processor.from_config(model.config)


def test_stage2_drop_keeps_the_text_side_and_removes_the_heads(build, tmp_path):
    model, proc = _question_model(build)
    assert model.qformer.word_embeddings is not None and model.qformer.layers[0].ffn is not None
    assert model.qformer.lm_head is None and not hasattr(model, "itm_head") and not hasattr(model, "vision_proj")
    assert model.config.qformer.text_branch and not model.config.qformer.pretrain_heads
    assert proc.qformer_tokenizer is not None  # the question still needs tokenising
    with pytest.raises(ValueError, match="ITC/ITM/ITG"):
        model.itc(**proc(qformer_text=["a red circle"]), pixel_values=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="reads the question"):  # transformers' BLIP-2 has no such input
        model.save_pretrained(tmp_path, format="transformers")


def test_a_row_without_a_question_runs_the_queries_alone(build, images):
    model, proc = _question_model(build)
    img = model.image_embeds(images(2))
    q = proc.qformer_text(QUESTIONS)
    mask = q["attention_mask"].clone()
    mask[1] = 0  # row 1: a caption in a mixed batch
    with torch.no_grad():
        mixed = model.query_output(img, q["input_ids"], mask)  # row 1 skips the text positions
        joint = model.qformer(q["input_ids"], mask, image_embeds=img, mask_kind="bidirectional")[
            :, : model.config.qformer.num_query_tokens
        ]
        alone = model.query_output(img)
        asked = model.query_output(img, q["input_ids"], q["attention_mask"])
    # Skipping is the same function: in one joint pass no query sees a masked-out token either.
    torch.testing.assert_close(joint, mixed, rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], alone[1], rtol=0, atol=1e-6)
    assert (mixed[0] - alone[0]).abs().max() > 1e-3  # the question reaches the queries
    assert (asked[1] - alone[1]).abs().max() > 1e-3


@pytest.mark.parametrize("lm", ["gpt2", "t5"])
def test_the_lm_loss_trains_the_text_side_through_the_question(build, images, lm):
    model, proc = _question_model(build, lm)
    batch = dict(pixel_values=images(2), **proc(text=PROMPTS, targets=TARGETS, qformer_text=QUESTIONS))
    model.train()
    model(**batch).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name in (
        "qformer.word_embeddings.weight",
        "qformer.layers.0.ffn.output.weight",
        "qformer.query_tokens",
        "lm_proj.weight",
    ):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert not any(n.startswith(("vision.", "lm.")) for n in grads)


def test_a_model_that_does_not_read_questions_refuses_them(build, images):
    model, proc = build("gpt2", randomize=True)
    model.drop_text_branch()
    with pytest.raises(ValueError, match="qformer_question"):
        model.query_output(model.image_embeds(images(1)), torch.ones(1, 3, dtype=torch.long))
    model.config.qformer_question = True  # too late: the text side is gone
    with pytest.raises(ValueError, match="stage-1 checkpoint"):
        model.drop_text_branch()


def test_checkpoint_round_trip_keeps_the_question_path(build, images, tmp_path):
    model, proc = _question_model(build)
    model.eval().save_pretrained(tmp_path, processor=proc)
    loaded, lproc = Blip2.from_pretrained(tmp_path).eval(), Blip2Processor.from_pretrained(tmp_path)
    assert loaded.config.qformer_question and loaded.qformer.lm_head is None
    batch = dict(pixel_values=images(2), **lproc(text=PROMPTS, qformer_text=QUESTIONS))
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_answer_gives_the_question_to_the_qformer(build):
    model, proc = _question_model(build)
    rng = np.random.default_rng(0)
    pictures = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in QUESTIONS]
    got = answer(model, proc, pictures, QUESTIONS, num_beams=1, max_new_tokens=3)
    prompts = [model.config.vqa_prompt.format(q) for q in QUESTIONS]
    px = proc.images(pictures)
    with torch.no_grad():
        ids = model.generate(px, **proc(text=prompts, qformer_text=QUESTIONS), num_beams=1, max_new_tokens=3)
        with_q = model(px, **proc(text=prompts, qformer_text=QUESTIONS)).logits[:, -1]
        without_q = model(px, **proc(text=prompts)).logits[:, -1]
    assert got == proc.batch_decode(ids)
    assert (with_q - without_q).abs().max() > 1e-3


def test_stage2_batches_carry_the_questions(build):
    _, proc = _question_model(build)
    samples = [
        {"prompt": PROMPTS[0], "target": TARGETS[0], "question": QUESTIONS[0]},
        {"prompt": PROMPTS[1], "target": TARGETS[1], "question": None},
    ]
    out = text_inputs(proc, samples, stage=2, gathered=False, qformer_question=True)
    expected = proc.qformer_text([QUESTIONS[0]])
    n = expected["input_ids"].shape[1]
    assert torch.equal(out["qformer_input_ids"][0, :n], expected["input_ids"][0])
    assert out["qformer_attention_mask"][0].sum() == n and out["qformer_attention_mask"][1].sum() == 0
    captions_only = text_inputs(proc, samples[1:], stage=2, gathered=False, qformer_question=True)
    assert captions_only["qformer_attention_mask"].sum() == 0  # the text side runs on padding (DDP needs it)
    assert "qformer_input_ids" not in text_inputs(proc, samples, stage=2, gathered=False)


def test_a_question_cut_for_the_qformer_is_reported(build, caplog):
    model, proc = _question_model(build)
    long = " ".join(["is the red circle left of the blue square"] * 4) + "?"  # > max_text_length tokens
    rng = np.random.default_rng(0)
    with caplog.at_level("WARNING", logger="vlbridge.evaluation.generation"):
        answer(model, proc, [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)], [long], num_beams=1, max_new_tokens=2)
    assert "1 of 1 questions were cut" in caplog.text
