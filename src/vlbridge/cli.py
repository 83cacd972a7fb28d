"""The `vlbridge` command.

    vlbridge caption MODEL IMAGE [IMAGE ...] [--prompt "a photo of"] [--num-beams 5] ...
    vlbridge ask MODEL IMAGE "what color is the car?"
    vlbridge retrieve MODEL --images DIR_OR_FILES... --text "a red car"      (rank images for a text)
    vlbridge retrieve MODEL --image FILE --texts "a car" "a dog" | --texts-file F   (rank texts)
    vlbridge train RECIPE [key.sub=value ...]

MODEL is a directory written by `save_pretrained` (model + processor) or a hub id.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _load(model_path: str):
    from .blip2 import Blip2
    from .processor import Blip2Processor

    return Blip2.from_pretrained(model_path), Blip2Processor.from_pretrained(model_path)


def _generation_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("generation (transformers' names)")
    g.add_argument("--num-beams", type=int)
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--min-new-tokens", type=int)
    g.add_argument("--length-penalty", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--do-sample", action="store_true", default=None)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, default=0)


def _generation_kwargs(args) -> dict:
    names = ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty", "repetition_penalty",
             "do_sample", "temperature", "top_p")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _image_files(paths: list[str]) -> list[Path]:
    files = []
    for p in map(Path, paths):
        files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else [p]
    return files


def _readable(files: list[Path]):
    """Decoded images of `files`; unreadable ones are skipped, counted and reported on stderr."""
    from .images import ImageError, load_image

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


def _print_rows(rows: list[dict], as_json: bool):
    for r in rows:
        print(json.dumps(r) if as_json else "\t".join(str(v) for v in r.values()))


def cmd_caption(args):
    import torch

    from .inference import caption

    torch.manual_seed(args.seed)
    model, processor = _load(args.model)
    files, images = _readable(_image_files(args.images))
    if not images:
        sys.exit("no readable images")
    texts = caption(model, processor, images, prompt=args.prompt, **_generation_kwargs(args))
    _print_rows([{"file": str(f), "caption": t} for f, t in zip(files, texts)], args.json)


def cmd_ask(args):
    import torch

    from .inference import answer

    torch.manual_seed(args.seed)
    model, processor = _load(args.model)
    files, images = _readable(_image_files([args.image]))
    if not images:
        sys.exit(f"cannot read image {args.image}")
    out = answer(model, processor, images * len(args.question), args.question, **_generation_kwargs(args))
    _print_rows([{"file": str(files[0]), "question": q, "answer": a} for q, a in zip(args.question, out)], args.json)


def cmd_retrieve(args):
    from .inference import rank_images, rank_texts

    model, processor = _load(args.model)
    if args.text is not None:
        files, images = _readable(_image_files(args.images))
        if not images:
            sys.exit("no readable images")
        ranked = rank_images(model, processor, images, args.text, k=args.k)
        rows = [{"rank": r + 1, "file": str(files[i]), "score": round(s, 4)} for r, (i, s) in enumerate(ranked[: args.top])]
    else:
        texts = list(args.texts or []) + (Path(args.texts_file).read_text().splitlines() if args.texts_file else [])
        texts = [t for t in texts if t.strip()]
        if not texts:
            sys.exit("give texts with --texts or --texts-file")
        files, images = _readable(_image_files([args.image]))
        if not images:
            sys.exit(f"cannot read image {args.image}")
        ranked = rank_texts(model, processor, images[0], texts, k=args.k)
        rows = [{"rank": r + 1, "text": texts[i], "score": round(s, 4)} for r, (i, s) in enumerate(ranked[: args.top])]
    _print_rows(rows, args.json)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlbridge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("caption", help="caption image files")
    c.add_argument("model")
    c.add_argument("images", nargs="+", help="image files or folders")
    c.add_argument("--prompt", help="LM prompt (default: the model's caption prompt)")
    _generation_args(c)
    c.set_defaults(func=cmd_caption)

    a = sub.add_parser("ask", help="answer questions about an image")
    a.add_argument("model")
    a.add_argument("image")
    a.add_argument("question", nargs="+")
    _generation_args(a)
    a.set_defaults(func=cmd_ask)

    r = sub.add_parser("retrieve", help="rank images for a text, or texts for an image (ITC top-k re-ranked by ITM)")
    r.add_argument("model")
    r.add_argument("--text", help="rank --images for this text")
    r.add_argument("--images", nargs="+", help="image files or folders")
    r.add_argument("--image", help="rank texts for this image")
    r.add_argument("--texts", nargs="+")
    r.add_argument("--texts-file", help="one text per line")
    r.add_argument("--k", type=int, default=128, help="ITC candidates re-ranked by ITM")
    r.add_argument("--top", type=int, default=10)
    r.set_defaults(func=cmd_retrieve)

    for s in (c, a, r):
        s.add_argument("--json", action="store_true", help="one JSON object per line")

    t = sub.add_parser("train", help="run a training recipe (see vlbridge.train)")
    t.add_argument("recipe", help="recipe JSON file, or the name of a shipped recipe")
    t.add_argument("overrides", nargs="*", help="key.sub=value (value parsed as JSON)")
    t.set_defaults(func=lambda args: _train([args.recipe, *args.overrides]))
    return p


def _train(argv):
    from .train import main

    main(argv)


def main(argv=None):
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "retrieve":
        if (args.text is None) == (args.image is None):
            sys.exit("retrieve: give either --text with --images, or --image with --texts/--texts-file")
        if args.text is not None and not args.images:
            sys.exit("retrieve: --text needs --images")
    args.func(args)


if __name__ == "__main__":
    main()
