"""Evaluation metrics: VQA accuracy, caption metrics (pycocoevalcap), retrieval Recall@k.

VQA accuracy follows the official VQAv2 script (GT-Vision-Lab/VQA,
PythonEvaluationTools/vqaEvaluation/vqaEval.py), which LAVIS / BLIP-2 numbers also come from:
    acc(pred, answers) = mean over i of min(#{j != i : answers[j] == pred} / 3, 1)
i.e. the mean over the 10 leave-one-out subsets of 9 answers. With 10 answers and m matches this is
1 for m >= 4, 0.9 for m = 3, 0.6 for m = 2, 0.3 for m = 1. With n < 10 answers the same formula runs
over n subsets of n - 1 (so n answers that all match score min((n-1)/3, 1)); with a single answer
there is no subset and we fall back to exact match (1 or 0).

Normalisation (`normalize_vqa_answer`), as in the official script:
  1. newlines/tabs -> spaces, strip;
  2. punctuation ; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? ! removed when it touches a space or when
     the text contains a digit,digit comma ("1,000" -> "1000"), otherwise replaced by a space
     ("black-white" -> "black white"); a period is removed unless a digit follows ("yes." -> "yes",
     "3.5" stays);
  3. lowercase, split on whitespace; number words zero..ten and "none" -> digits ("none" -> "0");
     articles a/an/the dropped; contractions missing an apostrophe restored ("dont" -> "don't").
`vqa_accuracy(official=True)` also copies the script's asymmetries: answers are normalised only when
the 10 ground-truth answers are not all identical (so "Yes" vs ten "yes" scores 0), and the
ground-truth answers then get step 2 only. `official=False` applies all steps to both sides always.
Known small differences between implementations, and ours:
  - the official period regex is called with re.UNICODE as its *count*, so it strips at most 32
    periods; we strip all (no real answer has 32 periods).
  - the official contraction table has keys that can never match after lowercasing ("Im", "Ive",
    "Id've") and one reversed entry ("somebody'd" -> "somebodyd"); our table (built from the same
    contractions, key = the word with one apostrophe dropped) has no I-contractions and maps
    "somebodyd" -> "somebody'd".
  - other harnesses (e.g. lmms-eval's EvalAI answer processor) normalise the prediction always,
    as official=False does, so their numbers can differ slightly from the official script's.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence

import torch

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
# English contractions; the lookup keys are each form with one of its apostrophes dropped
# ("couldn't've" <- "couldnt've", "couldn'tve"), which for one apostrophe is the bare word ("dont").
# Contractions whose bare form is a common word (it's, we'll, she'll, he'll, we're, i'll) are left out.
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've
mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've
somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd
something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're
they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've
who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll
y'all'd've you'd you'd've you'll you're you've""".split()
CONTRACTIONS = {w[:i] + w[i + 1 :]: w for w in _CONTRACTED for i, c in enumerate(w) if c == "'"}


def _punctuation(s: str) -> str:
    glue = _DIGIT_COMMA_DIGIT.search(s) is not None
    out = s
    for p in _PUNCT:  # the test looks at the input text, not at the partly cleaned one (as the original)
        out = out.replace(p, "" if glue or p + " " in s or " " + p in s else " ")
    return _PERIOD.sub("", out)


def _digits_articles(s: str) -> str:
    words = [_NUMBERS.get(w, w) for w in s.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _clean(s: str) -> str:
    return s.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(s: str) -> str:
    """The full official normalisation (module docstring): "Two dogs." -> "2 dogs", "a dog" -> "dog"."""
    return _digits_articles(_punctuation(_clean(s)))


def vqa_score(prediction: str, answers: Sequence[str], official: bool = True) -> float:
    """Accuracy of one prediction against its (up to 10) human answers; see the module docstring."""
    if not answers:
        raise ValueError("vqa_score needs at least one ground-truth answer")
    pred, gts = _clean(prediction), list(answers)
    if not official:
        pred, gts = normalize_vqa_answer(pred), [normalize_vqa_answer(a) for a in gts]
    elif len(set(gts)) > 1:
        pred, gts = normalize_vqa_answer(pred), [_punctuation(a) for a in gts]
    if len(gts) == 1:
        return float(pred == gts[0])
    matches = sum(a == pred for a in gts)
    # leaving out answer i removes one match iff answers[i] matches
    return sum(min((matches - (a == pred)) / 3, 1.0) for a in gts) / len(gts)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]], official: bool = True) -> float:
    """Mean VQA accuracy in [0, 1] (multiply by 100 for the usual percentage)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions but {len(answers)} answer lists")
    if not predictions:
        raise ValueError("vqa_accuracy of no predictions")
    return sum(vqa_score(p, a, official) for p, a in zip(predictions, answers)) / len(predictions)


def caption_metrics(predictions: dict, references: dict, per_id: bool = False) -> dict:
    """Corpus BLEU-1..4, METEOR, ROUGE-L and CIDEr (CIDEr-D, pycocoevalcap's Cider) for {id: caption}
    against {id: [reference captions]}, after pycocoevalcap's PTB tokenizer, as the COCO caption
    evaluation does. Scores in [0, 1] except CIDEr (about 0..10; reported x100 in papers as well).

    Needs pycocoevalcap and `java` on PATH (tokenizer and METEOR are Java; SPICE is left out, it
    downloads CoreNLP). CIDEr-D's IDF is computed from the references passed here, so scores on a
    subset of a split are not comparable with scores on the full split, and tiny sets give odd CIDEr.
    `per_id=True` adds {"per_id": {id: {metric: score}}} for error analysis (corpus BLEU is not the
    mean of the per-id BLEUs).
    """
    if set(predictions) != set(references):
        missing, extra = set(references) - set(predictions), set(predictions) - set(references)
        raise ValueError(
            f"predictions and references must have the same ids: {len(missing)} without a prediction "
            f"(e.g. {sorted(map(str, missing))[:3]}), {len(extra)} without references "
            f"(e.g. {sorted(map(str, extra))[:3]})"
        )
    if not predictions:
        raise ValueError("caption_metrics of no predictions")
    if empty := [k for k, refs in references.items() if not refs]:
        raise ValueError(f"{len(empty)} ids have no reference captions, e.g. {empty[:3]}")
    if shutil.which("java") is None:
        raise RuntimeError(
            "caption_metrics needs Java: pycocoevalcap's PTB tokenizer and METEOR run `java`, "
            "which is not on PATH (install a JRE, e.g. apt-get install default-jre-headless)"
        )
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as e:
        raise ImportError(f"caption_metrics needs pycocoevalcap: pip install 'vlbridge[train]' ({e})") from None

    # one tokenizer run (one JVM start) for references and predictions: keys (0, id) and (1, id)
    tokens = PTBTokenizer().tokenize(
        {
            **{(0, k): [{"caption": c} for c in refs] for k, refs in references.items()},
            **{(1, k): [{"caption": predictions[k]}] for k in references},
        }
    )
    ids = list(references)
    gts, res = {k: tokens[(0, k)] for k in ids}, {k: tokens[(1, k)] for k in ids}
    out, each = {}, {}
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    for n in range(4):
        out[f"BLEU-{n + 1}"], each[f"BLEU-{n + 1}"] = float(bleu[n]), bleu_each[n]
    meteor = Meteor()  # starts a JVM that loads its paraphrase tables: ~5-15 s
    try:
        out["METEOR"], each["METEOR"] = meteor.compute_score(gts, res)
    finally:  # don't leave the JVM running until garbage collection
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
    out["ROUGE-L"], each["ROUGE-L"] = Rouge().compute_score(gts, res)
    out["CIDEr"], each["CIDEr"] = Cider().compute_score(gts, res)
    out = {name: float(v) for name, v in out.items()}
    if per_id:
        out["per_id"] = {k: {name: float(v[i]) for name, v in each.items()} for i, k in enumerate(ids)}
    return out


def retrieval_recall(
    scores: torch.Tensor,
    text_to_image: Sequence[int] | None = None,
    image_to_texts: Sequence[Sequence[int]] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """Recall@k in [0, 1] from a (num_images, num_texts) similarity matrix; give one of
    text_to_image (the image index of each text) or image_to_texts (the text indices of each image).

    image->text: an image is a hit at k if any of its texts is among its k best-scoring texts.
    text->image: a text is a hit at k if its image is among its k best-scoring images.
    Rank = number of wrong candidates scoring >= the best right one, so ties count against the model
    (a constant score matrix gets recall ~k/N, not 1). Returns {"i2t_r1", ..., "t2i_r1", ..., "mean"}.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be (num_images, num_texts), got shape {tuple(scores.shape)}")
    ni, nt = scores.shape
    if (text_to_image is None) == (image_to_texts is None):
        raise ValueError("give exactly one of text_to_image and image_to_texts")
    if image_to_texts is not None:
        if len(image_to_texts) != ni:
            raise ValueError(f"image_to_texts has {len(image_to_texts)} entries for {ni} images")
        t2i = [-1] * nt
        for i, texts in enumerate(image_to_texts):
            for t in texts:
                if t2i[t] != -1:
                    raise ValueError(f"text {t} belongs to images {t2i[t]} and {i}; each text needs one image")
                t2i[t] = i
        if -1 in t2i:
            raise ValueError(f"text {t2i.index(-1)} belongs to no image")
    else:
        t2i = list(text_to_image)
        if len(t2i) != nt:
            raise ValueError(f"text_to_image has {len(t2i)} entries for {nt} texts")
    target = torch.as_tensor(t2i, dtype=torch.long, device=scores.device)
    if target.numel() and (target.min() < 0 or target.max() >= ni):
        raise ValueError(f"text_to_image holds image indices outside [0, {ni})")
    has_text = torch.zeros(ni, dtype=torch.bool, device=scores.device)
    has_text[target] = True
    if not has_text.all():
        raise ValueError(f"image {int((~has_text).nonzero()[0])} has no text")
    scores = scores.float()
    cols = torch.arange(nt, device=scores.device)

    i2t_rank = torch.empty(ni, dtype=torch.long, device=scores.device)
    for lo in range(0, ni, chunk):  # (chunk, nt) at a time: 5k x 25k would be 125M elements at once
        s = scores[lo : lo + chunk]
        right = target[None, :] == torch.arange(lo, lo + len(s), device=scores.device)[:, None]
        best = s.masked_fill(~right, float("-inf")).amax(dim=1, keepdim=True)
        i2t_rank[lo : lo + len(s)] = ((s >= best) & ~right).sum(dim=1)

    right_score = scores[target, cols]  # (nt,)
    t2i_rank = torch.zeros(nt, dtype=torch.long, device=scores.device)
    for lo in range(0, ni, chunk):
        t2i_rank += (scores[lo : lo + chunk] >= right_score[None, :]).sum(dim=0)
    t2i_rank -= 1  # the right image itself is counted by >=

    out = {f"i2t_r{k}": (i2t_rank < k).float().mean().item() for k in ks}
    out.update({f"t2i_r{k}": (t2i_rank < k).float().mean().item() for k in ks})
    out["mean"] = sum(out.values()) / len(out)
    return out


def conversation_accuracy(predicted: list[list[str]], conversations: list[list[dict]]) -> dict[str, float]:
    """Accuracy of predicted assistant turns against the conversations' own (answers compared as VQA
    normalises them): overall, on the first turn, and on the follow-ups (turns that need the earlier ones)."""
    first, later = [], []
    for preds, messages in zip(predicted, conversations):
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        if len(preds) != len(answers):
            raise ValueError(f"{len(preds)} predictions for a conversation of {len(answers)} answers")
        for k, (p, a) in enumerate(zip(preds, answers)):
            (first if k == 0 else later).append(normalize_vqa_answer(p) == normalize_vqa_answer(a))
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
    return {
        "accuracy": mean(first + later),
        "first_turn": mean(first),
        "follow_up": mean(later),
        "n": len(first + later),
    }
