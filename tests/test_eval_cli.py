"""`vlbridge eval` on tiny fixtures in COCO / Karpathy / VQAv2 format and on ShapesWorld.

Images are rendered ShapesWorld scenes, plus one corrupt file and one missing file, so every run
must skip and count exactly two images. Only the first test runs the real caption metrics (Java's
METEOR start alone takes ~10 s); the others stub them.
"""

import json

import pytest
import torch

import vlbridge.evaluation.evaluate as ev
from vlbridge import create_blip2
from vlbridge.cli import main
from vlbridge.data import shapesworld as sw
from vlbridge.evaluation.metrics import retrieval_recall, vqa_accuracy
from vlbridge.evaluation.run import headline
from vlbridge.testing import randomize_, tiny_blip2_config

GOOD, BROKEN, MISSING = [1, 2, 3, 4], 5, 6
RECALLS = {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)} | {"mean"}


def _file(image_id: int) -> str:  # VQAv2's layout (PNG bytes under a .jpg name: PIL reads the content)
    return f"COCO_val2014_{image_id:012d}.jpg"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A saved tiny model with an LM and the text branch (so every task runs) and the fixture files."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model, processor = create_blip2(tiny_blip2_config(root / "backbones", lm="gpt2"))
    randomize_(model.qformer, seed=3)  # a fresh Q-Former shows the LM nearly the same prompt for every image
    model.eval()
    model.save_pretrained(root / "model", processor=processor)
    images = root / "images"
    images.mkdir()
    world = sw.ShapesWorldConfig(width=32, height=32)
    scenes = dict(zip(GOOD, sw.make_split("test", len(GOOD), world)))
    for i, scene in scenes.items():
        sw.render(scene, world).save(images / _file(i), format="PNG")
    (images / _file(BROKEN)).write_bytes(b"\x89PNG\r\n\x1a\n but not really")  # MISSING is never written
    all_ids = GOOD + [BROKEN, MISSING]
    caps = {i: [scenes[i].caption, f"shapes number {i}."] for i in GOOD} | {BROKEN: ["broken."], MISSING: ["gone."]}

    coco = {
        "images": [{"id": i, "file_name": _file(i)} for i in all_ids] + [{"id": 7, "file_name": _file(1)}],
        "annotations": [
            {"image_id": i, "id": 10 * i + j, "caption": c} for i in all_ids for j, c in enumerate(caps[i])
        ],
    }
    karpathy = {
        "images": [
            {
                "filepath": "",
                "filename": _file(i),
                "cocoid": i,
                "split": "test" if i != 2 else "train",
                "sentences": [{"raw": c} for c in caps[i]],
            }
            for i in [BROKEN, 2, 1, 3, 4, MISSING]
        ]
    }
    questions, annotations = [], []
    for i in all_ids:
        qas = scenes[i].qa[:2] if i in GOOD else [sw.QA("how many objects are there?", "1")]
        for j, (q, a) in enumerate(qas):
            qid = 100 * i + j
            questions.append({"image_id": i, "question": q, "question_id": qid})
            kind = "yes/no" if a in ("yes", "no") else "number" if a.isdigit() else "other"
            answers = [a] * 2 + ["no"] * 8  # a right answer scores 0.6, "no" 1.0 (when a != "no")
            annotations.append(
                {
                    "question_id": qid,
                    "image_id": i,
                    "answer_type": kind,
                    "question_type": "what",
                    "multiple_choice_answer": a,
                    "answers": [
                        {"answer": x, "answer_id": k + 1, "answer_confidence": "yes"} for k, x in enumerate(answers)
                    ],
                }
            )
    files = {
        "coco": coco,
        "karpathy": karpathy,
        "questions": {"data_subtype": "val2014", "questions": questions},
        "annotations": {"annotations": annotations},
    }
    for name, obj in files.items():
        (root / f"{name}.json").write_text(json.dumps(obj))
    return {"root": root, "model": model, "processor": processor, "caps": caps, "annotations": annotations}


def _eval(data, *args):
    main(["eval", str(data["root"] / "model"), *map(str, args)])


def test_coco_captions_vqa_retrieval(data, tmp_path, monkeypatch, capsys, caplog):
    root = data["root"]
    real, seen = ev.caption_metrics, {}

    def spy(predictions, references, **kw):  # the real metrics, keeping what they were given
        seen.update(predictions=dict(predictions), references=dict(references))
        return real(predictions, references, **kw)

    monkeypatch.setattr(ev, "caption_metrics", spy)
    out = tmp_path / "run" / "metrics.json"
    _eval(
        data,
        "--captions",
        root / "coco.json",
        "--image-root",
        root / "images",
        "--vqa-questions",
        root / "questions.json",
        "--vqa-annotations",
        root / "annotations.json",
        "--vqa-image-root",
        root / "images",
        "--out",
        out,
        "--num-beams",
        2,
        "--max-new-tokens",
        3,
        "--min-new-tokens",
        1,
        "--length-penalty",
        0.5,
        "--prompt",
        "a photo of",
        "--batch-size",
        3,
        "--k",
        4,
    )
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == headline(report)
    assert report["tasks"] == ["caption", "vqa", "retrieval"]
    assert {"load", "captions", "vqa", "retrieval", "total"} <= set(report["timings_s"])
    assert "skipped 2 of 6 samples" in caplog.text and "file not found" in caplog.text

    # captions: image 7 has no captions; 5 (corrupt) and 6 (missing) are skipped and counted
    cap = report["captions"]
    assert (cap["n"], cap["no_references"]) == (4, 1)
    assert (cap["images"]["seen"], cap["images"]["skipped"]) == (6, 2)
    assert cap["images"]["reasons"] == {"cannot decode": 1, "file not found": 1}
    assert set(cap["metrics"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    assert all(0 <= v <= 1 for k, v in cap["metrics"].items() if k != "CIDEr")
    assert cap["decode"] == {
        "num_beams": 2,
        "max_new_tokens": 3,
        "min_new_tokens": 1,
        "length_penalty": 0.5,
        "do_sample": False,
        "prompt": "a photo of",
    }
    assert cap["predictions_file"] == str(tmp_path / "run" / "metrics_captions.json")
    preds = json.loads((tmp_path / "run" / "metrics_captions.json").read_text())
    assert sorted(p["image_id"] for p in preds) == GOOD
    assert all(set(p) == {"image_id", "caption"} and len(p["caption"].split()) <= 3 for p in preds)
    # the scores are of exactly the written predictions against the file's references
    assert seen["predictions"] == {p["image_id"]: p["caption"] for p in preds}
    assert seen["references"] == {i: data["caps"][i] for i in GOOD}

    # VQA: two questions on each good image; the one question on each bad image is skipped
    vqa = report["vqa"]
    assert (vqa["n"], vqa["scored"], vqa["questions_skipped"]) == (8, 8, 2)
    assert (vqa["images"]["seen"], vqa["images"]["skipped"]) == (6, 2)
    assert vqa["decode"]["num_beams"] == 2 and vqa["decode"]["prompt"] == "Question: {} Answer:"
    answers = json.loads((tmp_path / "run" / "metrics_vqa.json").read_text())
    assert all(set(a) == {"question_id", "answer"} for a in answers) and len(answers) == 8
    truth = {a["question_id"]: a for a in data["annotations"]}
    gts = [[x["answer"] for x in truth[a["question_id"]]["answers"]] for a in answers]
    assert vqa["accuracy"] == pytest.approx(vqa_accuracy([a["answer"] for a in answers], gts))
    assert set(vqa["by_answer_type"]) == {truth[a["question_id"]]["answer_type"] for a in answers}
    for kind, acc in vqa["by_answer_type"].items():
        idx = [j for j, a in enumerate(answers) if truth[a["question_id"]]["answer_type"] == kind]
        assert acc == pytest.approx(vqa_accuracy([answers[j]["answer"] for j in idx], [gts[j] for j in idx]))

    # retrieval: the numbers retrieval_scores + retrieval_recall give on the 4 usable images
    ret = report["retrieval"]
    assert (ret["n_images"], ret["n_texts"], ret["k"]) == (4, 8, 4)
    assert (ret["images"]["seen"], ret["images"]["skipped"]) == (6, 2)
    assert set(ret["itc"]) == set(ret["itc_itm"]) == RECALLS
    model, processor = data["model"], data["processor"]
    q = processor.qformer_text([c for i in GOOD for c in data["caps"][i]], truncate=True)
    pixels = processor.images([root / "images" / _file(i) for i in GOOD])
    scores = model.retrieval_scores(q["input_ids"], q["attention_mask"], pixel_values=pixels, k=4)
    truth = [j // 2 for j in range(8)]
    assert ret["itc"] == pytest.approx(retrieval_recall(scores.itc, text_to_image=truth))
    assert ret["itc"]["t2i_r10"] == ret["itc"]["i2t_r10"] == 1  # 4 images, 8 texts: all in the top 10
    i2t, t2i = retrieval_recall(scores.i2t, text_to_image=truth), retrieval_recall(scores.t2i.t(), text_to_image=truth)
    assert ret["itc_itm"]["i2t_r1"] == pytest.approx(i2t["i2t_r1"])
    assert ret["itc_itm"]["t2i_r1"] == pytest.approx(t2i["t2i_r1"])


def test_karpathy_shapesworld_and_vqa_without_answers(data, tmp_path, monkeypatch):
    root = data["root"]
    monkeypatch.setattr(ev, "caption_metrics", lambda preds, refs: {"CIDEr": float(len(preds))})  # no JVM here
    out = tmp_path / "m.json"
    _eval(
        data,
        "--karpathy",
        root / "karpathy.json",
        "--image-root",
        root / "images",
        "--vqa-questions",
        root / "questions.json",
        "--vqa-image-root",
        root / "images",
        "--shapesworld",
        "compositional",
        "--n",
        2,
        "--max-new-tokens",
        4,
        "--k",
        2,
        "--out",
        out,
    )
    report = json.loads(out.read_text())
    assert report["tasks"] == ["caption", "vqa", "retrieval"]

    # Karpathy "test" in file order is 5 (corrupt), 1, 3, 4, 6 (image 2 is "train"); --n 2 keeps 5 and 1
    cap = report["captions"]
    assert cap["n"] == 1 and (cap["images"]["seen"], cap["images"]["skipped"]) == (2, 1)
    assert cap["metrics"] == {"CIDEr": 1.0}
    # BLIP-2's caption defaults under our limit: 5 beams, min_new_tokens lowered from 8 to max_new_tokens
    assert {k: cap["decode"][k] for k in ("num_beams", "max_new_tokens", "min_new_tokens")} == {
        "num_beams": 5,
        "max_new_tokens": 4,
        "min_new_tokens": 4,
    }
    assert (report["retrieval"]["n_images"], report["retrieval"]["n_texts"]) == (1, 2)

    # VQA without annotations: predictions only (--n 2 keeps the first two questions)
    vqa = report["vqa"]
    assert (vqa["n"], vqa["scored"], vqa["accuracy"], vqa["by_answer_type"]) == (2, 0, None, {})
    assert len(json.loads((tmp_path / "m_vqa.json").read_text())) == 2

    s = report["shapesworld"]
    assert (s["split"], s["n"], s["retrieval"]["n"]) == ("compositional", 2, 2)
    assert set(s["captions"]["metrics"]) == {"color", "shape", "size", "object", "relation", "count", "exact"}
    assert s["captions"]["decode"]["num_beams"] == 1 and s["captions"]["decode"]["max_new_tokens"] == 4
    scenes = sw.make_split("compositional", 2, sw.ShapesWorldConfig())
    assert s["captions"]["metrics"] == sw.attribute_accuracy([x["predicted"] for x in s["captions"]["samples"]], scenes)
    assert s["vqa"]["n"] == sum(len(sc.qa) for sc in scenes) and set(s["vqa"]["by_kind"]) <= set(sw.QA_KINDS)
    if s["vqa"]["n"] == len(s["vqa"]["samples"]):
        assert s["vqa"]["accuracy"] == pytest.approx(
            vqa_accuracy([x["predicted"] for x in s["vqa"]["samples"]], [[x["answer"]] for x in s["vqa"]["samples"]])
        )
    assert set(s["retrieval"]["itc"]) == RECALLS and s["retrieval"]["itc"]["i2t_r5"] == 1
    assert "shapesworld" in report["timings_s"]


def _refused(capsys, call, match: str):
    """A bad command ends with exit status 2 and one line on stderr that names the problem (after any
    progress bars of the model loading), no traceback."""
    with pytest.raises(SystemExit) as e:
        call()
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert e.value.code == 2 and last.startswith("vlbridge eval: ") and match in last and "Traceback" not in err, err


def test_eval_refuses_what_it_cannot_do(data, tmp_path, capsys):
    _refused(capsys, lambda: _eval(data, "--out", tmp_path / "m.json"), "give --captions")
    _refused(
        capsys,
        lambda: _eval(data, "--captions", data["root"] / "coco.json", "--tasks", "vqa", "--out", tmp_path / "m.json"),
        "task vqa needs --vqa-questions",
    )
    assert not (tmp_path / "m.json").exists()
    root = data["root"]
    # nothing scored: every image missing under a wrong image root -> exit 2, the report (with its skips) written
    _refused(
        capsys,
        lambda: _eval(
            data,
            "--captions",
            root / "coco.json",
            "--image-root",
            tmp_path,
            "--tasks",
            "caption",
            "--out",
            tmp_path / "none.json",
        ),
        "nothing was scored for captions",
    )
    assert json.loads((tmp_path / "none.json").read_text())["captions"]["images"]["skipped"] == 6
    _refused(
        capsys, lambda: _eval(data, "--shapesworld", "test", "--n", "0", "--out", tmp_path / "m.json"), "argument --n"
    )
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a folder should be")
    _refused(capsys, lambda: _eval(data, "--shapesworld", "test", "--out", blocked / "m.json"), "cannot write")


def test_eval_takes_eve_and_flamingo_models(tiny_configs, tmp_path, capsys):
    from vlbridge import LMConfig, VisionConfig
    from vlbridge.models.eve.modeling import EVEConfig, create_eve
    from vlbridge.models.flamingo.modeling import FlamingoConfig, create_flamingo

    torch.manual_seed(0)
    eve, eve_proc = create_eve(
        EVEConfig(
            lm=LMConfig(tiny_configs["gpt2"].lm.name_or_path),
            patch_size=4,
            pel_width=16,
            pel_heads=2,
            max_image_size=64,
        )
    )
    eve.save_pretrained(tmp_path / "eve", processor=eve_proc)
    out = tmp_path / "eve.json"
    main(
        ["eval", str(tmp_path / "eve"), "--shapesworld", "test", "--n", "2", "--max-new-tokens", "3", "--out", str(out)]
    )
    report = json.loads(out.read_text())
    assert report["kind"] == "eve" and report["tasks"] == ["caption", "vqa"]  # no Q-Former: no retrieval
    assert report["shapesworld"]["captions"]["n"] == 2 and report["shapesworld"]["vqa"]["n"] > 0
    _refused(
        capsys,
        lambda: main(
            ["eval", str(tmp_path / "eve"), "--shapesworld", "test", "--tasks", "retrieval", "--out", str(out)]
        ),
        "cannot do retrieval",
    )

    flamingo, fl_proc = create_flamingo(
        FlamingoConfig(
            vision=VisionConfig(tiny_configs[None].vision.name_or_path, feature_layer=-1),
            lm=LMConfig(tiny_configs["gpt2"].lm.name_or_path),
            perceiver_depth=1,
            num_latents=4,
            perceiver_heads=2,
            perceiver_dim_head=8,
            xattn_heads=2,
            xattn_dim_head=8,
        )
    )
    flamingo.save_pretrained(tmp_path / "flamingo", processor=fl_proc)
    out = tmp_path / "flamingo.json"
    main(
        [
            "eval",
            str(tmp_path / "flamingo"),
            "--shapesworld",
            "val",
            "--n",
            "2",
            "--shots",
            "0",
            "1",
            "--num-beams",
            "1",
            "--out",
            str(out),
        ]
    )
    report = json.loads(out.read_text())
    assert report["kind"] == "flamingo" and set(report["summary"]["vqa"]) == {"0", "1"}
    assert report["fewshot"]["caption"]["random"]["shots"]["1"]["n"] == 2
    _refused(
        capsys,
        lambda: main(["eval", str(tmp_path / "flamingo"), "--vqa-questions", "q.json", "--out", str(out)]),
        "few-shot",
    )


def test_shapesworld_retrieval_candidates_have_distinct_captions():
    """Scenes can share a caption (a lone object's caption does not say where it is); identical texts tie,
    so retrieval draws its candidates with distinct captions and refuses a pool with duplicates."""
    plain = sw.make_split("test", 500)
    assert len({s.caption for s in plain}) < len(plain)  # the split itself repeats captions
    first = {}
    for s in plain:
        first.setdefault(s.caption, s)
    assert ev.retrieval_scenes("test", 300) == list(first.values())[:300]  # the split in order, repeats skipped
    with pytest.raises(ValueError, match="share the caption"):
        ev.shapesworld_retrieval(None, None, plain, sw.ShapesWorldConfig())
