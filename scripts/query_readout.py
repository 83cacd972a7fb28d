"""How fast can a fresh Q-Former learn to read the objects out of a frozen vision encoder?

The easiest target a BLIP-2 bridge could have: the stage-2 recipe's Q-Former (random init, 9 queries)
and its projection are regressed straight onto LM input vectors that spell out the scene, then each
query output is decoded to the nearest candidate and scored against the truth. Two layouts of the
target vectors (each vector = the mean of the LM's input embeddings of a phrase, standardised):
    grid     query k holds the object in grid cell k (column-major) as "a small red star", "." if empty
    caption  query k holds the k-th object in caption order with its relation word, as the shipped
             LM's pooled contexts do ("a small red star above"), "." after the last object
This measures the encoder (can a cross-attention find a place and read what is there) apart from
ITC / ITM / ITG and the LM. Used to choose the vision tower's position loss (--clip-pos in
pretrain_backbones.py):

    PYTHONPATH=src .venv/bin/python scripts/query_readout.py --layout grid --steps 600 [--vision DIR]

Measured on this project's 2-core machine (600 steps, test split, 500 scenes, about 1 min each;
colour / shape of the objects):
    encoder shipped before the position loss (git show 7fef9bf:src/vlbridge/assets/shapesworld/vision/..):
        grid 0.45 / 0.43, caption 0.52 / 0.49
    shipped encoder (--clip-pos 1):  grid 1.00 / 0.997, caption 0.86 / 0.86
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from vlbridge.data import shapesworld as sw
from vlbridge.training.build import build_blip2
from vlbridge.training.recipe import load_recipe

SLOTS = 9


def targets(scene: sw.Scene, layout: str) -> tuple[list[str], list[int]]:
    """The phrase each query should hold, and the query index of each object (in scene.objects order)."""
    if layout == "caption":
        pieces = sw.object_pieces(scene)
        return pieces + ["."] * (SLOTS - len(pieces)), list(range(len(scene.objects)))
    cells, where = ["."] * SLOTS, []
    for o in scene.objects:
        k = o.col * sw.GRID + o.row
        cells[k] = f"a {o.size} {o.color} {o.shape}"
        where.append(k)
    return cells, where


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", choices=("grid", "caption"), default="grid")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--vision", default="", help="a CLIP directory (default: the recipe's, i.e. the shipped one)")
    p.add_argument("--train-scenes", type=int, default=8000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    overrides = [f"model.qformer.num_query_tokens={SLOTS}"] + (
        [f"model.vision.name_or_path={args.vision}"] if args.vision else []
    )
    cfg = load_recipe("blip2_shapesworld_stage2", overrides)
    model, processor = build_blip2(cfg)
    tok = AutoTokenizer.from_pretrained(cfg.model.lm.name_or_path)  # load_recipe expanded {assets}
    emb = model.lm.get_input_embeddings().weight.detach()
    vec = lambda text: emb[tok(text, add_special_tokens=False).input_ids].mean(0)
    world = sw.ShapesWorldConfig()

    def split(name: str, n: int):  # frozen features (n, N, D), target vectors (n, SLOTS, H)
        scenes = sw.make_split(name, n, world)
        with torch.no_grad():
            px = processor.images([sw.render(s, world) for s in scenes])
            feats = torch.cat([model.vision(px[i : i + 500]) for i in range(0, n, 500)])
        return scenes, feats, torch.stack([torch.stack([vec(t) for t in targets(s, args.layout)[0]]) for s in scenes])

    _, ftr, ytr = split("train", args.train_scenes)
    test, fte, yte = split("test", 500)
    mu, sd = ytr.flatten(0, 1).mean(0), ytr.flatten(0, 1).std(0)
    norm = lambda y: (y - mu) / sd
    ytr, yte = norm(ytr), norm(yte)
    readout = lambda f: model.lm_proj(model.qformer(image_embeds=model.image_embeds(image_features=f)))
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        for g in opt.param_groups:  # warm-up 50 steps, then cosine
            g["lr"] = args.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        idx = torch.randint(0, len(ftr), (64,), generator=gen)
        with torch.autocast("cpu", torch.bfloat16):
            out = readout(ftr[idx])
        loss = F.mse_loss(out.float(), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)

    # decode every query to the nearest candidate phrase; score the queries that should hold an object
    cands = ["."] + [
        f"a {z} {c} {s}{r}"
        for z, c, s in itertools.product(sw.SIZES, sw.COLORS, sw.SHAPES)
        for r in ([""] if args.layout == "grid" else [" above", " below", " left of", " ."])
    ]
    cand = norm(torch.stack([vec(c) for c in cands]))
    with torch.no_grad():
        nearest = torch.cdist(readout(fte).float(), cand[None].expand(len(fte), -1, -1)).argmin(-1)
    hits, n = {"size": 0, "color": 0, "shape": 0}, 0
    for i, scene in enumerate(test):
        for o, k in zip(scene.objects, targets(scene, args.layout)[1]):
            words = cands[nearest[i, k]].split()
            n += 1
            if len(words) >= 4:
                for a, w in zip(("size", "color", "shape"), words[1:4]):
                    hits[a] += w == getattr(o, a)
    print(
        json.dumps(
            {
                "layout": args.layout,
                "steps": args.steps,
                "vision": cfg.model.vision.name_or_path,
                **{k: round(v / n, 3) for k, v in hits.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
