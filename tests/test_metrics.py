"""VQA accuracy, caption metrics (pycocoevalcap, Java) and retrieval recall on hand-checked cases."""

import itertools
import shutil

import pytest
import torch

from vlbridge.evaluation.metrics import caption_metrics, normalize_vqa_answer, retrieval_recall, vqa_accuracy, vqa_score


def _leave_one_out(pred, answers):
    """The VQA formula written out literally: every subset of n-1 answers, min(matches / 3, 1)."""
    subsets = list(itertools.combinations(answers, len(answers) - 1))
    return sum(min(sum(a == pred for a in s) / 3, 1) for s in subsets) / len(subsets)


# ---------------------------------------------------------------- VQA


@pytest.mark.parametrize("m, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_ten_answers(m, expected):
    answers = ["cat"] * m + [f"other{i}" for i in range(10 - m)]
    # 3 matches: leaving a match out leaves 2 -> 2/3 (3 times), else 3 -> 1 (7 times): (3*2/3 + 7)/10
    assert vqa_score("cat", answers) == pytest.approx(expected)
    assert vqa_score("cat", answers) == pytest.approx(_leave_one_out("cat", answers))


def test_vqa_hand_computed():
    assert vqa_score("2", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_score("2", ["2"] * 2 + ["3"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)


@pytest.mark.parametrize("n, m", [(3, 3), (3, 1), (5, 2), (6, 4), (2, 1)])
def test_vqa_fewer_than_ten_answers(n, m):
    answers = ["cat"] * m + ["dog"] * (n - m)
    assert vqa_score("cat", answers) == pytest.approx(_leave_one_out("cat", answers))
    if n == m == 3:
        assert vqa_score("cat", answers) == pytest.approx(2 / 3)  # capped: only 2 others per subset


def test_vqa_single_answer_is_exact_match():
    assert vqa_score("cat", ["cat"]) == 1.0 and vqa_score("Cat.", ["cat"]) == 0.0
    assert vqa_score("Cat.", ["cat"], official=False) == 1.0


@pytest.mark.parametrize(
    "pred, gt",
    [
        ("Two", "2"),
        ("two", "2"),
        ("a dog", "dog"),
        ("the dog", "dog"),
        ("yes.", "yes"),
        ("Yes", "yes"),
        ("dont", "don't"),
        ("none", "0"),
        ("  yes\n", "yes"),
        ("black-white", "black white"),
        ("1,000", "1000"),
    ],
)
def test_vqa_normalisation_matches(pred, gt):
    answers = [gt] * 3 + ["x", "y", "z", "w", "v", "u", "t"]  # not unanimous: official normalises
    assert vqa_score(pred, answers) == pytest.approx(0.9)
    assert vqa_score(pred, answers, official=False) == pytest.approx(0.9)


def test_normalize_vqa_answer():
    assert normalize_vqa_answer("Two dogs.") == "2 dogs"
    assert normalize_vqa_answer("3.5") == "3.5"  # period before a digit stays
    assert normalize_vqa_answer("e.g. this") == "eg this"
    assert normalize_vqa_answer("hi , there") == "hi there"  # punctuation touching a space is removed
    assert normalize_vqa_answer("1,000 (approx)") == "1000 approx"  # digit,digit: all punctuation removed
    assert normalize_vqa_answer("Couldnt've") == "couldn't've" == normalize_vqa_answer("couldn'tve")
    assert normalize_vqa_answer("it's an apple") == "it's apple"
    assert normalize_vqa_answer("its") == "its" and normalize_vqa_answer("well") == "well"


def test_vqa_official_asymmetry():
    # all ten answers identical: the official script compares the raw (stripped) prediction
    assert vqa_score("Yes", ["yes"] * 10) == 0.0
    assert vqa_score("yes ", ["yes"] * 10) == 1.0
    assert vqa_score("Yes", ["yes"] * 10, official=False) == 1.0
    # ground truth only gets punctuation processing in the official script
    answers = ["dont"] * 4 + ["no"] * 6
    assert vqa_score("dont", answers) == 0.0  # prediction becomes "don't", answers stay "dont"
    assert vqa_score("dont", answers, official=False) == 1.0


def test_vqa_accuracy_mean_and_errors():
    acc = vqa_accuracy(["cat", "2", "no"], [["cat"] * 10, ["two", "2", "2"] + ["3"] * 7, ["yes"] * 10])
    assert acc == pytest.approx((1.0 + 0.6 + 0.0) / 3)  # official: the answer "two" is not turned into "2"
    with pytest.raises(ValueError, match="2 predictions but 1"):
        vqa_accuracy(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy(["a"], [[]])


# ---------------------------------------------------------------- captions


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's tokenizer and METEOR need java")
def test_caption_metrics_identical_vs_unrelated():
    pytest.importorskip("pycocoevalcap")
    refs = {
        1: ["a red circle left of a blue square", "a red circle next to a blue square"],
        2: ["two dogs play with a ball on the grass", "dogs playing in a park"],
        "a": ["a man rides a bicycle down the street", "a person cycling on a road"],
        "b": ["a plate of food with rice and vegetables", "a meal on a white plate"],
    }
    preds = {1: refs[1][0], 2: refs[2][0], "a": "the sky is green today", "b": "keyboard"}
    # one call (METEOR's JVM start dominates the test time); per-id scores separate the two kinds
    out = caption_metrics(preds, refs, per_id=True)
    assert set(out) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "per_id"}
    for k in (1, 2):
        s = out["per_id"][k]
        assert s["BLEU-4"] == pytest.approx(1, abs=1e-6) and s["METEOR"] == pytest.approx(1) and s["ROUGE-L"] == 1
        assert s["CIDEr"] > 3
    for k in ("a", "b"):
        s = out["per_id"][k]
        assert s["BLEU-4"] < 1e-3 and s["ROUGE-L"] < 0.2 and s["METEOR"] < 0.1 and s["CIDEr"] < 0.1
    assert 0.3 < out["BLEU-4"] < 0.9 and out["CIDEr"] > 1


def test_caption_metrics_without_java(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="needs Java"):
        caption_metrics({1: "a dog"}, {1: ["a dog"]})


def test_caption_metrics_id_mismatch():
    with pytest.raises(ValueError, match="1 without a prediction"):
        caption_metrics({1: "a"}, {1: ["a"], 2: ["b"]})
    with pytest.raises(ValueError, match="no reference captions"):
        caption_metrics({1: "a"}, {1: []})


# ---------------------------------------------------------------- retrieval

# 3 images x 5 texts; texts 0,1 -> image 0, texts 2,3 -> image 1, text 4 -> image 2
SCORES = torch.tensor([[0.1, 0.9, 0.8, 0.2, 0.3], [0.9, 0.8, 0.1, 0.7, 0.95], [0.5, 0.1, 0.2, 0.3, 0.4]])
T2I = [0, 0, 1, 1, 2]


def test_retrieval_hand_ranks():
    # i2t ranks (wrong texts >= best right text): image 0 -> 0, image 1 -> 3 (texts 0, 1, 4), image 2 -> 1
    # t2i ranks (wrong images >= right image): text 0 -> 2, 1 -> 0, 2 -> 2, 3 -> 0, 4 -> 1
    r = retrieval_recall(SCORES, text_to_image=T2I, ks=(1, 2, 3, 4))
    assert r["i2t_r1"] == pytest.approx(1 / 3) and r["i2t_r2"] == pytest.approx(2 / 3)
    assert r["i2t_r3"] == pytest.approx(2 / 3) and r["i2t_r4"] == 1.0
    assert r["t2i_r1"] == pytest.approx(2 / 5) and r["t2i_r2"] == pytest.approx(3 / 5) and r["t2i_r3"] == 1.0
    assert r["mean"] == pytest.approx(sum(v for k, v in r.items() if k != "mean") / 8)
    same = retrieval_recall(SCORES, image_to_texts=[[0, 1], [2, 3], [4]], ks=(1, 2, 3, 4), chunk=1)
    assert same == pytest.approx(r)


def test_retrieval_matches_argsort_reference():
    g = torch.Generator().manual_seed(0)
    ni, per = 7, 3
    t2i = [i for i in range(ni) for _ in range(per)]
    scores = torch.randn(ni, ni * per, generator=g)
    r = retrieval_recall(scores, text_to_image=t2i, ks=(1, 5), chunk=2)
    order_t = scores.argsort(dim=1, descending=True)
    i2t = [min(order_t[i].tolist().index(t) for t in range(ni * per) if t2i[t] == i) for i in range(ni)]
    order_i = scores.argsort(dim=0, descending=True)
    t2i_rank = [order_i[:, t].tolist().index(t2i[t]) for t in range(ni * per)]
    for k in (1, 5):
        assert r[f"i2t_r{k}"] == pytest.approx(sum(x < k for x in i2t) / ni)
        assert r[f"t2i_r{k}"] == pytest.approx(sum(x < k for x in t2i_rank) / (ni * per))


def test_retrieval_ties_count_against_model():
    r = retrieval_recall(torch.zeros(4, 4), text_to_image=[0, 1, 2, 3], ks=(1, 4))
    assert r["i2t_r1"] == 0 and r["t2i_r1"] == 0 and r["i2t_r4"] == 1 and r["t2i_r4"] == 1


def test_retrieval_errors():
    with pytest.raises(ValueError, match="exactly one"):
        retrieval_recall(SCORES)
    with pytest.raises(ValueError, match="belongs to images 0 and 1"):
        retrieval_recall(SCORES, image_to_texts=[[0, 1], [1, 2, 3], [4]])
    with pytest.raises(ValueError, match="has no text"):
        retrieval_recall(SCORES, text_to_image=[0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="5 texts"):
        retrieval_recall(SCORES, text_to_image=[0, 1, 2])
