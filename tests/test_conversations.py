"""Instruction data: LLaVA-style files, labels only on the assistant's turns (with and without a chat
template), ShapesWorld conversations that need their earlier turns."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import pytest

from vlbridge.data import shapesworld as sw
from vlbridge.data.conversations import (
    check_messages,
    encode_conversation,
    generation_prompt,
    plain_text,
    read_llava,
    shapesworld_conversations,
)
from vlbridge.evaluation.metrics import conversation_accuracy
from vlbridge.testing import word_tokenizer

CHAT = [
    {"role": "system", "content": "a photo"},
    {"role": "user", "content": "what color is the circle?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "what shape is there?"},
    {"role": "assistant", "content": "square"},
]
# a template in the style of today's chat models: role headers, an end-of-turn marker
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def chat_tokenizer(template: str = TEMPLATE):
    tok = word_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]})
    tok.chat_template = template
    return tok


def labelled(tok, enc) -> str:
    return " ".join(tok.convert_ids_to_tokens([t for t in enc["labels"] if t != -100]))


# ---------------------------------------------------------------- messages and files


@pytest.mark.parametrize(
    "messages, error",
    [
        ([], "non-empty list"),
        ([{"role": "user", "content": "hi"}], "end with a assistant"),
        ([{"role": "assistant", "content": "hi"}], "expected 'user'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 is from 'user'"),
        ([{"role": "bot", "content": "a"}], "message 0 is not"),
        ([{"role": "user", "content": 3}], "message 0 is not"),
    ],
)
def test_check_messages_names_the_problem(messages, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        check_messages(messages)


def test_read_llava_keeps_good_records_and_reports_bad_ones(tmp_path, caplog):
    records = [
        {
            "id": "a",
            "image": "x.png",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat color is the circle?"},
                {"from": "gpt", "value": "red"},
                {"from": "human", "value": "and the square?"},
                {"from": "gpt", "value": "blue"},
            ],
        },
        {"id": "b", "conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "yes"}]},
        {"id": "c", "image": "y.png", "conversations": [{"from": "gpt", "value": "red"}]},  # assistant first
        {
            "id": "d",
            "image": "y.png",
            "conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}],
        },
        {"id": "e", "image": "y.png", "conversations": []},
        {"id": "f", "conversations": [{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a"}]},
        {
            "id": "g",
            "image": "z.png",
            "source": "web",
            "conversations": [
                {"from": "system", "value": "be brief"},
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "a"},
            ],
        },
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    samples = read_llava(path, image_root=tmp_path)
    assert [s["id"] for s in samples] == ["a", "b", "g"]
    a, b, g = samples
    assert a["image"] == tmp_path / "x.png" and a["image_at"] == 0
    assert a["messages"][0] == {"role": "user", "content": "what color is the circle?"}  # the mark taken out
    assert b["image"] is None and b["image_at"] is None
    assert g["image_at"] == 1  # no mark: the image opens the first user turn, after the system message
    text = caplog.text
    assert "read 7 rows, kept 3, skipped 4" in text and "keys not read: source" in text
    assert "llava.json[3]" in text and "'from' is 'robot'" in text
    with pytest.raises(ValueError, match=r"llava\.json\[2\]: .*expected 'user'"):
        read_llava(path, strict=True)
    path.write_text("{}")
    with pytest.raises(ValueError, match="expected a JSON list"):
        read_llava(path)


# ---------------------------------------------------------------- tokens and labels


def test_plain_encoding_labels_only_the_answers():
    tok = word_tokenizer()
    enc = encode_conversation(tok, CHAT, prompt_format="question: {} answer:")
    assert len(enc["input_ids"]) == len(enc["labels"])
    assert labelled(tok, enc) == "red square </s>"  # eos only after the last answer
    assert tok.decode(enc["input_ids"]) == (
        "a photo question : what color is the circle ? answer : red "
        "question : what shape is there ? answer : square </s>"
    )
    # the text a prompt + target sample about the last turn holds, token for token
    prompt = plain_text(CHAT[:4], "question: {} answer:")
    assert tok(prompt).input_ids + tok(" square", add_special_tokens=False).input_ids == enc["input_ids"][:-1]
    # the prompt for the second answer is the training text up to it, token for token
    prompt = generation_prompt(tok, CHAT[:4], prompt_format="question: {} answer:")
    full = encode_conversation(tok, CHAT, prompt_format="question: {} answer:")["input_ids"]
    assert full[: len(prompt)] == prompt and tok.convert_ids_to_tokens(full[len(prompt)]) == "square"


def test_chat_template_labels_the_assistant_turns_and_their_end():
    tok = chat_tokenizer()
    enc = encode_conversation(tok, CHAT)
    assert labelled(tok, enc) == "red <|end|> square <|end|>"
    assert enc["input_ids"] == tok(tok.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False).input_ids
    prompt = generation_prompt(tok, CHAT[:4])
    assert enc["input_ids"][: len(prompt)] == prompt
    assert tok.convert_ids_to_tokens(prompt[-1]) == "<|assistant|>"


def test_a_template_that_rewrites_earlier_turns_is_refused():
    # the number of messages up front: the rendering of a prefix is not a prefix of the rendering
    tok = chat_tokenizer("{{ messages | length }} " + TEMPLATE)
    with pytest.raises(ValueError, match="cannot be told apart"):
        encode_conversation(tok, CHAT)


def test_an_answer_lost_to_the_template_is_an_error():
    tok = chat_tokenizer(
        "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }} {% endif %}{% endfor %}"
    )
    with pytest.raises(ValueError, match="no assistant token"):
        encode_conversation(tok, CHAT[1:3])


# ---------------------------------------------------------------- ShapesWorld


def _anchor(scene: sw.Scene, question: str) -> sw.Obj:
    """The object the first question names, found from the scene independently of the generator."""
    objs = scene.objects
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        (o,) = [o for o in objs if o.shape == m[1]]
    elif m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        (o,) = [o for o in objs if o.color == m[1]]
    else:
        m = re.fullmatch(r"what size is the (\w+) (\w+)\?", question)
        (o,) = [o for o in objs if (o.color, o.shape) == (m[1], m[2])]
    return o


def test_shapesworld_conversations_are_right_and_need_their_history():
    convs = shapesworld_conversations("train", 150, turns=3)
    assert convs == shapesworld_conversations("train", 150, turns=3)  # deterministic
    answers_by_question = defaultdict(set)
    for c in convs:
        scene, msgs = c["scene"], c["messages"]
        check_messages(msgs)
        assert 2 <= len(msgs) // 2 <= 3
        o = _anchor(scene, msgs[0]["content"])
        asked = re.match(r"what (\w+) is", msgs[0]["content"])[1]
        assert msgs[1]["content"] == getattr(o, asked)
        for q, a in zip(msgs[2::2], msgs[3::2]):
            q, a = q["content"], a["content"]
            if q == "what size is the object?":
                assert a == o.size
            else:
                rel = re.fullmatch(r"how many objects are (left of|right of|above|below) the object\?", q)[1]
                rows, cols = [x.row for x in scene.objects], [x.col for x in scene.objects]
                want = {
                    "left of": sum(c < o.col for c in cols),
                    "right of": sum(c > o.col for c in cols),
                    "above": sum(r < o.row for r in rows),
                    "below": sum(r > o.row for r in rows),
                }[rel]
                assert a == str(want)
            answers_by_question[q].add(a)
    # a follow-up alone does not decide its answer: every one of them has several in the split
    assert len(answers_by_question) == 5 and all(len(a) >= 2 for a in answers_by_question.values())
    val = shapesworld_conversations("val", 20)
    assert {c["scene"].caption for c in val}.isdisjoint(c["scene"].caption for c in convs)


def test_conversation_accuracy_splits_first_turns_from_follow_ups():
    convs = [CHAT[1:], CHAT[1:]]
    acc = conversation_accuracy([["red", "square"], ["Red.", "circle"]], convs)
    assert acc == {"accuracy": 0.75, "first_turn": 1.0, "follow_up": 0.5, "n": 4}
    counts = [{"role": "user", "content": "how many?"}, {"role": "assistant", "content": "1"}]
    assert conversation_accuracy([["2"]], [counts])["accuracy"] == 0.0  # digits are answers too
    assert conversation_accuracy([["1."]], [counts])["accuracy"] == 1.0
    with pytest.raises(ValueError, match="1 predictions for a conversation of 2"):
        conversation_accuracy([["red"]], convs[:1])


# ---------------------------------------------------------------- training samples


def test_the_conversation_task_puts_earlier_turns_in_the_prompt():
    import numpy as np

    from vlbridge.data.batches import DataConfig, ShapesWorldPool

    pool = ShapesWorldPool(DataConfig(num_samples=60, group_size=1, tasks=["conversation"], turns=3))
    samples = [pool.sample(i, np.random.default_rng([5, i]), "Question: {} Answer:", "") for i in range(len(pool))]
    assert samples == [pool.sample(i, np.random.default_rng([5, i]), "Question: {} Answer:", "") for i in range(60)]
    later = 0
    for s in samples:
        turns = re.findall(r"Question: (.*?) Answer:(?: (\S+))?", s["prompt"])
        *history, (last, no_answer) = turns
        assert last == s["question"] and no_answer == "" and all(a for _, a in history)
        later += bool(history)
        if history:  # a follow-up: it refers to "the object" the first question named
            assert "the object?" in s["question"]
            o = _anchor(pool.scenes[s["key"]], history[0][0])
            if s["question"] == "what size is the object?":
                assert s["target"] == o.size
    assert 20 < later < 60  # later turns and first turns both drawn
    with pytest.raises(ValueError, match=r"data.tasks \['chat'\]"):
        DataConfig(tasks=["chat"])
    with pytest.raises(ValueError, match="'conversation' is generated from ShapesWorld"):
        DataConfig(source="jsonl", path="x.jsonl", tasks=["conversation"])


def test_conversation_eval_scores_each_turn_with_and_without_history(build, monkeypatch):
    from vlbridge.evaluation import evaluate

    convs = shapesworld_conversations("test", 6, turns=3)
    world = sw.ShapesWorldConfig(width=32, height=32)
    truth = {}
    for c in convs:
        for k in range(len(c["messages"]) // 2):
            prompt = plain_text(c["messages"][: 2 * k + 1], "Question: {} Answer:")
            truth[sw.render(c["scene"], world).tobytes(), prompt] = c["messages"][2 * k + 1]["content"]

    def oracle(model, processor, images, prompts, decode, batch_size, progress=False, desc="", questions=None):
        assert len(images) == len(prompts) == len(questions)
        # knows every answer about every image, but only in its context
        return [truth.get((im.tobytes(), p), "no idea") for im, p in zip(images, prompts)]

    model, processor = build("gpt2")
    monkeypatch.setattr(evaluate, "generate_texts", oracle)
    r = evaluate.shapesworld_conversation(model, processor, convs, world)
    assert r["multi_turn"]["accuracy"] == 1.0 and r["single_turn"]["accuracy"] < 1.0
    assert r["n"] == sum(len(c["messages"]) // 2 for c in convs) == r["multi_turn"]["n"]
    monkeypatch.undo()
    r = evaluate.shapesworld_conversation(model, processor, convs[:2], world, batch_size=4)  # a real model runs
    assert set(r) >= {"multi_turn", "single_turn", "samples", "decode"} and r["conversations"] == 2
    assert r["samples"][1]["prompt"].count("Question:") == 2


def test_flamingo_conversation_documents_interleave_images_and_their_talks():
    from vlbridge.data.interleaved import EOC, IMAGE, DocumentData, make_source

    source = make_source(DocumentData(kind="shapesworld_conversation", max_images=3, num_samples=50, turns=2))
    docs = [source.document(i) for i in range(20)]
    assert docs[3] == source.document(3)
    for d in docs:
        chunks = d["text"].split(EOC)[:-1]
        assert len(chunks) == len(d["images"]) >= 1 and all(c.startswith(IMAGE) for c in chunks)
        for c in chunks:
            assert 1 <= c.count("Question:") <= 2 and c.count("Question:") == c.count("Answer:")
    assert any(len(d["images"]) > 1 for d in docs)
    with pytest.raises(ValueError, match="prompt must hold one"):
        make_source(DocumentData(kind="shapesworld_conversation", prompt="Q A"))


def test_instruct_study_runs_both_variants_from_a_stage1_checkpoint(tmp_path):
    from experiments import instruct_study
    from vlbridge.models.blip2 import Blip2
    from vlbridge.training.train import load_recipe, train

    quick = ["steps=2", "data.num_samples=64", "batch_size=16", "save_every=0"]
    stage1 = train(load_recipe("blip2_shapesworld_stage1", [f"out_dir={tmp_path / 'stage1'}", *quick]))
    report = instruct_study.run(tmp_path / "study", str(stage1), steps=2, quick=True)
    instruct, single = report["variants"]["instruct"], report["variants"]["single_turn"]
    assert "conversation" in instruct["tasks"] and single["tasks"] == ["caption", "vqa"]
    for v in (instruct, single):
        assert {"multi_turn", "single_turn"} <= set(v["conversation"]) and v["vqa"]["n"] > 0
    config = Blip2.read_config(tmp_path / "study" / "instruct" / "final")
    assert config.qformer_reads_prompt and config.max_text_length == 64  # the recipe's, over stage 1's
    assert "follow-up" in instruct_study.table(report)


def test_vlbridge_eval_runs_conversations_only_when_asked(build, tmp_path):
    from vlbridge.evaluation.run import EvalConfig, headline, run

    model, processor = build("gpt2")
    model.save_pretrained(tmp_path / "m", processor=processor)
    kw = dict(model=str(tmp_path / "m"), shapesworld="test", n=3, decode={"max_new_tokens": 2}, k=2)
    report = run(EvalConfig(out=str(tmp_path / "a.json"), **kw))
    assert "conversation" not in report["shapesworld"] and "conversation" not in report["tasks"]
    report = run(EvalConfig(out=str(tmp_path / "b.json"), tasks=["conversation"], **kw))
    conv = report["shapesworld"]["conversation"]
    assert conv["conversations"] == 3 and conv["n"] == conv["multi_turn"]["n"] == conv["single_turn"]["n"] >= 6
    assert set(headline(report)["shapesworld"]) == {"conversation"}
    with pytest.raises(ValueError, match="task conversation needs --shapesworld"):
        run(EvalConfig(model=str(tmp_path / "m"), out=str(tmp_path / "c.json"), tasks=["conversation"]))
