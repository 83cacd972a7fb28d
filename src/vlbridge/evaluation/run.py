"""`vlbridge eval`: load a saved model of any design, run every task its inputs and the model allow, write
the metrics JSON (decode settings, sizes, skipped images, timings) and the predictions beside it."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlbridge.data import shapesworld as sw
from vlbridge.data.conversations import shapesworld_conversations
from vlbridge.evaluation.evaluate import (
    caption_eval,
    retrieval_eval,
    retrieval_scenes,
    shapesworld_captions,
    shapesworld_conversation,
    shapesworld_retrieval,
    shapesworld_vqa,
    split_scenes,
    vqa_answer_types,
    vqa_eval,
)

log = logging.getLogger(__name__)

TASKS = ("caption", "vqa", "retrieval", "conversation")
DEFAULT_TASKS = ("caption", "vqa", "retrieval")  # "conversation" (ShapesWorld, multi-turn) only when asked


@dataclass
class EvalConfig:
    """What `vlbridge eval` runs; see `vlbridge eval --help` for each field."""

    model: str
    out: str = "metrics.json"
    captions: str | None = None  # COCO captions_*.json
    karpathy: str | None = None  # Karpathy dataset_*.json, read at `split`
    split: str = "test"
    image_root: str | None = None
    vqa_questions: str | None = None
    vqa_annotations: str | None = None  # None: predictions only (test-dev)
    vqa_image_root: str | None = None
    vqa_image_pattern: str = "COCO_{split}_{image_id:012d}.jpg"
    shapesworld: str | None = None  # a ShapesWorld split
    n: int | None = None  # ShapesWorld: scenes (default 200); files: only the first n images / questions
    tasks: list[str] | None = None  # of TASKS; None: every task the inputs and the model allow
    decode: dict = field(default_factory=dict)  # generate() keywords over each task's defaults
    prompt: str | None = None  # caption prompt (default: the model's)
    vqa_prompt: str | None = None  # VQA template with {} (default: the model's)
    k: int = 128  # ITC candidates re-ranked by ITM
    rerank: str = "log_odds"  # how ITM and ITC scores combine (Blip2.retrieval_scores)
    batch_size: int = 16
    seed: int = 0
    shots: list[int] = field(default_factory=lambda: [0, 1, 4, 8])  # models that learn in context: few-shot evaluation
    device: str = "auto"  # "auto": CUDA when present
    dtype: str | None = None  # cast the loaded model: float32 | bfloat16 | float16


def _tasks(cfg: EvalConfig, model) -> list[str]:
    has_captions = bool(cfg.captions or cfg.karpathy or cfg.shapesworld)
    inputs = {
        "caption": has_captions,
        "vqa": bool(cfg.vqa_questions or cfg.shapesworld),
        "retrieval": has_captions,
        "conversation": bool(cfg.shapesworld),
    }
    if cfg.tasks is None:
        tasks = [t for t in DEFAULT_TASKS if inputs[t] and t in model.tasks]
        if not tasks:
            raise ValueError(
                "nothing to evaluate: give --captions/--karpathy, --vqa-questions or --shapesworld "
                f"for a task this model can do ({', '.join(sorted(model.tasks))})"
            )
        return tasks
    for t in cfg.tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; expected some of {TASKS}")
        if not inputs[t]:
            needs = {"vqa": "--vqa-questions or --shapesworld", "conversation": "--shapesworld"}
            raise ValueError(f"task {t} needs {needs.get(t, '--captions, --karpathy or --shapesworld')}")
        model.require_task("vqa" if t == "conversation" else t)
    return list(cfg.tasks)


def _write_json(path: Path, obj) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
    return str(path)


def run(cfg: EvalConfig) -> dict:
    """Load cfg.model (any design), evaluate, write cfg.out (metrics JSON) and predictions beside it
    (<out stem>_captions.json, <out stem>_vqa.json). Returns the metrics dict. A model that learns in
    context (Flamingo) is evaluated few-shot on ShapesWorld (captions, VQA, the in-context task at cfg.shots)."""
    from vlbridge.auto import load
    from vlbridge.data.readers import read_coco_captions, read_karpathy, read_vqa

    t_start = time.time()
    torch.manual_seed(cfg.seed)  # sampling, when asked for
    out = Path(cfg.out)
    if cfg.captions and cfg.karpathy:
        raise ValueError("give one caption file: --captions (COCO) or --karpathy")
    if cfg.n is not None and cfg.n < 1:
        raise ValueError(f"n must be at least 1, got {cfg.n}")
    _check_writable(out)  # before the work, not after it
    model, processor = load(cfg.model, device=cfg.device, dtype=cfg.dtype)
    if "in_context" in model.tasks:
        return _fewshot_run(cfg, model, processor, t_start)
    tasks = _tasks(cfg, model)
    report: dict = {
        "model": str(cfg.model),
        "kind": model.model_type,
        "config": dataclasses.asdict(cfg),
        "tasks": tasks,
        "timings_s": {"load": time.time() - t_start},
    }
    decode, n = dict(cfg.decode), cfg.n

    if cfg.captions or cfg.karpathy:
        samples = (
            read_coco_captions(cfg.captions, cfg.image_root, per_image=True)
            if cfg.captions
            else read_karpathy(cfg.karpathy, cfg.image_root, cfg.split, per_image=True)
        )[:n]
        if "caption" in tasks:
            report["captions"], preds = caption_eval(model, processor, samples, decode, cfg.prompt, cfg.batch_size)
            report["captions"]["predictions_file"] = _write_json(out.with_name(out.stem + "_captions.json"), preds)
            report["timings_s"]["captions"] = report["captions"]["seconds"]
        if "retrieval" in tasks:
            report["retrieval"] = retrieval_eval(model, processor, samples, cfg.k, cfg.batch_size, cfg.rerank)
            report["timings_s"]["retrieval"] = report["retrieval"]["seconds"]

    if cfg.vqa_questions and "vqa" in tasks:
        samples = read_vqa(cfg.vqa_questions, cfg.vqa_annotations, cfg.vqa_image_root, cfg.vqa_image_pattern)[:n]
        types = vqa_answer_types(cfg.vqa_annotations) if cfg.vqa_annotations else None
        report["vqa"], preds = vqa_eval(model, processor, samples, types, decode, cfg.vqa_prompt, cfg.batch_size)
        report["vqa"]["predictions_file"] = _write_json(out.with_name(out.stem + "_vqa.json"), preds)
        report["timings_s"]["vqa"] = report["vqa"]["seconds"]

    if cfg.shapesworld:
        world = sw.ShapesWorldConfig()
        scenes = split_scenes(cfg.shapesworld, n or 200, world)
        r: dict = {"split": cfg.shapesworld, "n": len(scenes)}
        if "caption" in tasks:
            r["captions"] = shapesworld_captions(
                model, processor, scenes, world, decode, cfg.batch_size, cfg.prompt, True
            )
        if "vqa" in tasks:
            r["vqa"] = shapesworld_vqa(model, processor, scenes, world, decode, cfg.batch_size, cfg.vqa_prompt, True)
        if "retrieval" in tasks:
            r["retrieval"] = shapesworld_retrieval(
                model,
                processor,
                retrieval_scenes(cfg.shapesworld, n or 200, world),
                world,
                cfg.k,
                cfg.batch_size,
                cfg.rerank,
            )
        if "conversation" in tasks:  # multi-turn: each turn with the earlier ones, and alone
            conversations = shapesworld_conversations(cfg.shapesworld, n or 200, world)
            r["conversation"] = shapesworld_conversation(
                model, processor, conversations, world, decode, cfg.batch_size, cfg.vqa_prompt
            )
        report["shapesworld"] = r
        parts = ("captions", "vqa", "retrieval", "conversation")
        report["timings_s"]["shapesworld"] = sum(r[t]["seconds"] for t in parts if t in r)

    report["timings_s"]["total"] = time.time() - t_start
    _write_json(out, report)
    _require_scores(report)
    return report


def _check_writable(out: Path) -> None:
    """Fail now if the metrics (and the predictions beside them) could not be written."""
    import tempfile

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=".vlbridge-eval-"):
            pass
    except OSError as e:
        raise ValueError(f"cannot write {out}: {e.strerror or e}") from None
    if out.is_dir() or (out.exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"cannot write {out}: " + ("a directory" if out.is_dir() else "not writable"))


def _require_scores(report: dict) -> None:
    """A task that scored nothing (a wrong split, every image missing, a wrong image root) is an error, not
    a report of nulls; the report is written first, with its skip counts."""
    empty = []
    if "captions" in report and not report["captions"]["n"]:
        empty.append("captions (no image with references could be read)")
    if "vqa" in report and not report["vqa"]["n"]:
        empty.append("vqa (no question's image could be read)")
    elif "vqa" in report and report["vqa"]["accuracy"] is None and report["config"]["vqa_annotations"]:
        empty.append("vqa (no question has annotated answers)")
    if empty:
        raise ValueError(f"nothing was scored for {', '.join(empty)}; see the skip counts in {report['config']['out']}")


def _fewshot_run(cfg: EvalConfig, model, processor, t_start: float) -> dict:
    from vlbridge.evaluation.fewshot import fewshot_summary, shapesworld_fewshot

    if not cfg.shapesworld or cfg.captions or cfg.karpathy or cfg.vqa_questions:
        raise ValueError(
            "a Flamingo model is evaluated few-shot on --shapesworld here; for your own files build "
            "support and query samples and call vlbridge.evaluation.fewshot.fewshot_eval"
        )
    beams = cfg.decode.get("num_beams", 3)
    r = shapesworld_fewshot(
        model, processor, tuple(cfg.shots), cfg.n or 64, beams, world=sw.ShapesWorldConfig(), split=cfg.shapesworld
    )
    report = {
        "model": str(cfg.model),
        "kind": model.model_type,
        "config": dataclasses.asdict(cfg),
        "fewshot": r,
        "summary": fewshot_summary(r),
        "timings_s": {"total": time.time() - t_start},
    }
    _write_json(Path(cfg.out), report)
    return report


def headline(report: dict) -> dict:
    """The main numbers of a run() report, for printing."""
    if "fewshot" in report:
        return report["summary"]
    out = {}
    if "captions" in report:
        metrics = report["captions"]["metrics"]
        out["captions"] = (
            metrics if "error" in metrics else {m: metrics.get(m) for m in ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")}
        )
    if "vqa" in report:
        out["vqa"] = {"accuracy": report["vqa"]["accuracy"], **report["vqa"]["by_answer_type"]}
    if "retrieval" in report:
        out["retrieval"] = {"itc": report["retrieval"]["itc"], "itc_itm": report["retrieval"]["itc_itm"]}
    if s := report.get("shapesworld"):
        conversation = s.get("conversation")
        out["shapesworld"] = {
            k: v
            for k, v in (
                ("captions", s.get("captions", {}).get("metrics")),
                ("vqa", s.get("vqa", {}).get("accuracy")),
                ("retrieval", s.get("retrieval", {}).get("itc")),
                ("conversation", conversation and {k: conversation[k] for k in ("multi_turn", "single_turn")}),
            )
            if v is not None
        }
    return out
