"""The `vlbridge` command.

    vlbridge caption MODEL IMAGE [IMAGE ...] [--prompt "a photo of"] [--num-beams 5] ...
    vlbridge ask MODEL IMAGE "what color is the car?" [--example IMAGE QUESTION ANSWER ...]
    vlbridge retrieve MODEL --images DIR_OR_FILES... --text "a red car"      (rank images for a text)
    vlbridge retrieve MODEL --image FILE --texts "a car" "a dog" | --texts-file F   (rank texts)
    vlbridge train RECIPE [key.sub=value ...]
    vlbridge eval MODEL [--captions F | --karpathy F] [--image-root DIR] [--vqa-questions Q --vqa-annotations A]
                  [--vqa-image-root DIR] [--shapesworld SPLIT --n N] [--out metrics.json]
    vlbridge serve MODEL [--host 127.0.0.1] [--port 8000] [--max-batch-size 8]   (OpenAI-compatible API)

MODEL is a directory written by `save_pretrained` (model + processor) or a hub id, of any design
(BLIP-2, Flamingo, EVE). --device auto|cpu|cuda|cuda:N, --dtype float32|bfloat16|float16.
Bad input ends with one line on stderr and exit status 2; --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _load(args):
    from vlbridge.auto import load

    return load(args.model, device=args.device, dtype=args.dtype)


def _device_args(p: argparse.ArgumentParser):
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="cast the model (default: as saved)")


def _at_least(low: int):
    """An argparse type: an int >= low (a bad value is argparse's one-line usage error)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is less than {low}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} is not > 0")
    return value


def _generation_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("generation (transformers' names)")
    g.add_argument("--num-beams", type=_at_least(1))
    g.add_argument("--max-new-tokens", type=_at_least(1))
    g.add_argument("--min-new-tokens", type=_at_least(0))
    g.add_argument("--length-penalty", type=float)
    g.add_argument("--repetition-penalty", type=_positive)
    g.add_argument("--do-sample", action="store_true", default=None)
    g.add_argument("--temperature", type=_positive)
    g.add_argument("--top-p", type=_positive)
    g.add_argument("--seed", type=int, default=0)


def _retrieval_args(p: argparse.ArgumentParser):
    # the choices are Blip2.RERANK_RULES, spelled out so that --help needs no torch import
    p.add_argument("--k", type=_at_least(1), default=128, help="ITC candidates re-ranked by ITM")
    p.add_argument(
        "--rerank",
        choices=("log_odds", "lavis"),
        default="log_odds",
        help="re-ranked score: ITM log-odds + ITC logit, or LAVIS' ITM match logit + ITC cosine",
    )


def _generation_kwargs(args) -> dict:
    names = (
        "num_beams",
        "max_new_tokens",
        "min_new_tokens",
        "length_penalty",
        "repetition_penalty",
        "do_sample",
        "temperature",
        "top_p",
    )
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _image_files(paths: list[str]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p]
    return files


def _readable(files: list[Path]):
    """Decoded images of `files`; unreadable ones are skipped, counted and reported on stderr."""
    from vlbridge.core.images import ImageError, load_image

    kept, images = [], []
    for f in files:
        try:
            images.append(load_image(f))
            kept.append(f)
        except ImageError as e:
            print(f"skipped: {e}", file=sys.stderr)
    if len(kept) < len(files):
        print(f"skipped {len(files) - len(kept)} of {len(files)} images", file=sys.stderr)
    return kept, images


def _one_image(path: str):
    from vlbridge.core.images import load_image

    return load_image(path)  # ImageError (a ValueError) names the file and the problem


def _lines(path: str) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _print_rows(rows: list[dict], as_json: bool):
    for r in rows:
        print(json.dumps(r) if as_json else "\t".join(str(v) for v in r.values()))


def cmd_caption(args):
    import torch

    from vlbridge.evaluation.generation import caption

    torch.manual_seed(args.seed)
    model, processor = _load(args)
    model.require_task("caption")
    examples = [(_one_image(f), text) for f, text in args.example or ()]
    files, images = _readable(_image_files(args.images))
    if not images:
        raise ValueError("no readable images")
    texts = caption(model, processor, images, prompt=args.prompt, examples=examples, **_generation_kwargs(args))
    _print_rows([{"file": str(f), "caption": t} for f, t in zip(files, texts)], args.json)


def cmd_ask(args):
    import torch

    from vlbridge.evaluation.generation import answer

    torch.manual_seed(args.seed)
    model, processor = _load(args)
    model.require_task("vqa")
    if not all(q.strip() for q in args.question):
        raise ValueError("a question is empty")
    examples = [(_one_image(f), q, a) for f, q, a in args.example or ()]
    image = _one_image(args.image)
    out = answer(
        model, processor, [image] * len(args.question), args.question, examples=examples, **_generation_kwargs(args)
    )
    _print_rows([{"file": args.image, "question": q, "answer": a} for q, a in zip(args.question, out)], args.json)


def cmd_retrieve(args):
    from vlbridge.evaluation.generation import rank_images, rank_texts

    model, processor = _load(args)
    model.require_task("retrieval")
    if args.text is not None:
        files, images = _readable(_image_files(args.images))
        if not images:
            raise ValueError("no readable images")
        ranked = rank_images(model, processor, images, args.text, k=args.k, rerank=args.rerank, truncate=args.truncate)
        rows = [
            {"rank": r + 1, "file": str(files[i]), "score": round(s, 4)} for r, (i, s) in enumerate(ranked[: args.top])
        ]
    else:
        texts = list(args.texts or []) + (_lines(args.texts_file) if args.texts_file else [])
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise ValueError("give texts with --texts or --texts-file")
        image = _one_image(args.image)
        ranked = rank_texts(model, processor, image, texts, k=args.k, rerank=args.rerank, truncate=args.truncate)
        rows = [{"rank": r + 1, "text": texts[i], "score": round(s, 4)} for r, (i, s) in enumerate(ranked[: args.top])]
    _print_rows(rows, args.json)


def cmd_eval(args):
    import dataclasses

    from vlbridge.evaluation.run import EvalConfig, headline, run

    if not (args.captions or args.karpathy or args.vqa_questions or args.shapesworld):
        raise ValueError("give --captions, --karpathy, --vqa-questions or --shapesworld")
    fields = {f.name for f in dataclasses.fields(EvalConfig)}
    cfg = EvalConfig(**{k: v for k, v in vars(args).items() if k in fields}, decode=_generation_kwargs(args))
    report = run(cfg)
    print(json.dumps(headline(report), indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


def cmd_serve(args):
    try:
        from vlbridge.serving import serve
    except ImportError as e:
        raise ValueError(f"{e}: install the server's packages with pip install 'vlbridge[serve]'") from None
    serve(
        args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        served_model_name=args.served_model_name,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_body_mb=args.max_body_mb,
        max_queue=args.max_queue,
        api_key=args.api_key,
        allow_remote_images=args.allow_remote_images,
        allow_paths=tuple(args.allow_path or ()),
        max_images=args.max_images,
        index=args.index,
        index_cache=args.index_cache,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlbridge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("caption", help="caption image files")
    c.add_argument("model")
    c.add_argument("images", nargs="+", help="image files or folders")
    c.add_argument("--prompt", help="LM prompt (default: the model's caption prompt)")
    c.add_argument(
        "--example",
        nargs=2,
        action="append",
        metavar=("IMAGE", "CAPTION"),
        help="an in-context example shown before each image (repeatable; models that learn in context)",
    )
    _generation_args(c)
    c.set_defaults(func=cmd_caption)

    a = sub.add_parser("ask", help="answer questions about an image")
    a.add_argument("model")
    a.add_argument("image")
    a.add_argument("question", nargs="+")
    a.add_argument(
        "--example",
        nargs=3,
        action="append",
        metavar=("IMAGE", "QUESTION", "ANSWER"),
        help="an in-context example shown before the image (repeatable; models that learn in context)",
    )
    _generation_args(a)
    a.set_defaults(func=cmd_ask)

    r = sub.add_parser("retrieve", help="rank images for a text, or texts for an image (ITC top-k re-ranked by ITM)")
    r.add_argument("model")
    r.add_argument("--text", help="rank --images for this text")
    r.add_argument("--images", nargs="+", help="image files or folders")
    r.add_argument("--image", help="rank texts for this image")
    r.add_argument("--texts", nargs="+")
    r.add_argument("--texts-file", help="one text per line (UTF-8)")
    r.add_argument("--truncate", action="store_true", help="cut texts longer than the Q-Former takes (default: refuse)")
    _retrieval_args(r)
    r.add_argument("--top", type=_at_least(1), default=10)
    r.set_defaults(func=cmd_retrieve)

    for s in (c, a, r):
        s.add_argument("--json", action="store_true", help="one JSON object per line")
        _device_args(s)

    t = sub.add_parser("train", help="run a training recipe (see vlbridge.training.train)")
    t.add_argument("recipe", help="recipe JSON file, or the name of a shipped recipe")
    t.add_argument("overrides", nargs="*", help="key.sub=value (value parsed as JSON)")
    t.set_defaults(func=lambda args: _train([args.recipe, *args.overrides]))

    e = sub.add_parser(
        "eval",
        help="evaluate a saved model: COCO/Karpathy captions + retrieval, VQAv2, ShapesWorld",
        description="Metrics JSON at --out records the decoding settings, sizes, skipped images and "
        "timings; predictions go beside it (<stem>_captions.json, <stem>_vqa.json).",
    )
    e.add_argument("model")
    e.add_argument("--out", default="metrics.json", help="metrics JSON (default metrics.json)")
    d = e.add_argument_group("data")
    d.add_argument("--captions", help="COCO captions JSON (captions_val2014.json): captioning and retrieval")
    d.add_argument("--karpathy", help="Karpathy split file (dataset_coco.json), read at --split")
    d.add_argument("--split", default="test", choices=("train", "val", "test", "restval"), help="Karpathy split")
    d.add_argument("--image-root", help="folder the caption file's image paths are relative to")
    d.add_argument("--vqa-questions", help="VQAv2 questions JSON")
    d.add_argument("--vqa-annotations", help="VQAv2 annotations JSON (without: predictions only)")
    d.add_argument("--vqa-image-root", help="folder of the VQA images")
    d.add_argument(
        "--vqa-image-pattern",
        default="COCO_{split}_{image_id:012d}.jpg",
        help="image file name from {split} (the questions' data_subtype) and {image_id}",
    )
    d.add_argument("--shapesworld", choices=("train", "val", "test", "compositional"), help="a ShapesWorld split")
    d.add_argument(
        "--n",
        type=_at_least(1),
        help="ShapesWorld scenes (default 200); with files, only the first N images / questions",
    )
    e.add_argument(
        "--tasks",
        nargs="+",
        choices=("caption", "vqa", "retrieval", "conversation"),
        help="default: every task the data and the model allow, but conversation (ShapesWorld multi-turn "
        "Q&A: each turn answered after the earlier ones and alone), which runs only when asked",
    )
    e.add_argument("--prompt", help="caption prompt (default: the model's)")
    e.add_argument("--vqa-prompt", help="VQA template with {} for the question (default: the model's)")
    _retrieval_args(e)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--shots", type=int, nargs="+", default=[0, 1, 4, 8], help="Flamingo: shot counts (few-shot eval)")
    _generation_args(e)
    _device_args(e)
    e.set_defaults(func=cmd_eval)

    v = sub.add_parser("serve", help="serve a saved model over OpenAI's chat completions API (docs/serving.md)")
    v.add_argument("model")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    v.add_argument("--port", type=_at_least(0), default=8000)
    v.add_argument("--served-model-name", help="the name clients send as model (default: MODEL as given)")
    v.add_argument("--max-batch-size", type=_at_least(1), default=8, help="requests batched into one generate call")
    v.add_argument("--max-wait-ms", type=float, default=10, help="how long a request waits for others to batch with")
    v.add_argument("--max-body-mb", type=_positive, default=20, help="larger request bodies are refused (413)")
    v.add_argument(
        "--max-queue",
        type=_at_least(1),
        help="requests waiting or generating at once; more get 429 (default: no limit)",
    )
    v.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1 routes (401 otherwise)")
    v.add_argument(
        "--allow-remote-images", action="store_true", help="fetch http(s) image URLs (default: refused, 400)"
    )
    v.add_argument(
        "--allow-path",
        action="append",
        metavar="DIR",
        help="serve file:// URLs and paths of images inside DIR (repeatable; default: none)",
    )
    v.add_argument(
        "--max-images",
        type=_at_least(1),
        default=16,
        help="images a chat request may hold, for models that read several (Flamingo); more: 400 (default 16)",
    )
    v.add_argument(
        "--index",
        metavar="DIR",
        help="search the images under DIR (POST /v1/retrieve; models with retrieval heads), embedded at start-up",
    )
    v.add_argument(
        "--index-cache",
        metavar="DIR",
        help="where --index keeps its embeddings (default ~/.cache/vlbridge/index)",
    )
    _device_args(v)
    v.set_defaults(func=cmd_serve)
    return p


def _train(argv):
    from vlbridge.training.train import main

    main(argv)


def main(argv=None):
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "retrieve":
        if (args.text is None) == (args.image is None):
            parser.error("retrieve: give either --text with --images, or --image with --texts/--texts-file")
        if args.text is not None and not args.images:
            parser.error("retrieve: --text needs --images")
    try:
        args.func(args)
    except (ValueError, OSError) as e:  # bad input: one line naming the problem, not a traceback
        if args.debug:
            raise
        print(f"vlbridge {args.command}: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"vlbridge {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 500 else text[:497] + "..."


if __name__ == "__main__":
    main()
