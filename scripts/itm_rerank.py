"""Is ITM a better judge than ITC? Image->text R@1 of a stage-1 BLIP-2 among ShapesWorld candidates.

For each image, its ITC top k captions are scored by ITM, and the top caption is picked by:
    itc                 the ITC similarity alone (max over queries of cosine)
    itm                 the ITM match logit alone
    itm+itc             match logit + similarity: BLIP-2's re-ranking (LAVIS), `vlbridge eval --rerank lavis`
    logodds             ITM log-odds (match - no-match logit)
    logodds+itc         log-odds + similarity
    prob+itc            ITM match probability + similarity
    logodds+itc/temp    log-odds + similarity / the learned ITC temperature (ITC's own logit scale): what
                        `vlbridge eval` reports (--rerank log_odds, the default)
Re-ranking can only help when ITM, on the candidates ITC proposes, is right where ITC is wrong.

    PYTHONPATH=src .venv/bin/python scripts/itm_rerank.py STAGE1_DIR [--n 1000] [--k 16]
"""

from __future__ import annotations

import argparse
import json

import torch

from vlbridge import Blip2, Blip2Processor
from vlbridge.data import shapesworld as sw
from vlbridge.evaluation import evaluate as ev
from vlbridge.models.blip2.modeling import rerank_score


@torch.no_grad()
def rerank_r1(model, processor, scenes, world, k: int = 16, batch_size: int = 128) -> dict[str, float]:
    """Image->text R@1 of each scoring rule above over `scenes` (pairwise distinct captions), and under
    "spread" the median range of each score across an image's k candidates."""
    model.eval()
    pixels = processor.images([sw.render(s, world) for s in scenes])
    q = processor.qformer_text([s.caption for s in scenes], truncate=True)
    ids, mask = q["input_ids"], q["attention_mask"]
    feats = torch.cat([model.vision(x) for x in pixels.split(batch_size)])  # (N, P, Dv) frozen features
    # ITC as model.itc computes it, with each image and each text embedded once
    image_emb = torch.cat([model.extract_features(image_features=f).image_embeds_proj for f in feats.split(batch_size)])
    text_emb = torch.cat(
        [model.extract_features(i, m).text_embeds_proj for i, m in zip(ids.split(batch_size), mask.split(batch_size))]
    )
    itc = torch.einsum("iqe,te->itq", image_emb, text_emb).amax(-1)  # (N, N)
    sim, top = itc.topk(min(k, len(scenes)), dim=1)  # (N, k)
    logits = torch.stack(
        [
            model.itm(ids[top[i]], mask[top[i]], image_features=feats[i].expand(top.shape[1], -1, -1))
            for i in range(len(scenes))
        ]
    ).float()  # (N, k, 2)
    match, logodds = logits[..., 1], logits[..., 1] - logits[..., 0]
    temp = model.itc_temperature.item()
    rules = {
        "itc": sim,
        "itm": match,
        "itm+itc": rerank_score(logits, sim, temp, "lavis"),
        "logodds": logodds,
        "logodds+itc": logodds + sim,
        "prob+itc": logodds.sigmoid() + sim,
        "logodds+itc/temp": rerank_score(logits, sim, temp, "log_odds"),
    }
    truth = torch.arange(len(scenes))
    out = {
        name: round((top.gather(1, s.argmax(1, keepdim=True))[:, 0] == truth).float().mean().item(), 4)
        for name, s in rules.items()
    }
    # how far each term moves across an image's k candidates (median over images): a term that barely
    # moves cannot change the order of a sum it is part of
    spread = lambda x: round((x.amax(1) - x.amin(1)).median().item(), 4)
    return out | {
        "spread": {"itc": spread(sim), "itc/temp": spread(sim / temp), "itm": spread(match), "logodds": spread(logodds)}
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a stage-1 BLIP-2 directory (e.g. demo-output/stage1/final)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--splits", nargs="+", default=["test", "compositional"])
    args = p.parse_args()
    model, processor = Blip2.from_pretrained(args.model), Blip2Processor.from_pretrained(args.model)
    world = sw.ShapesWorldConfig()
    out = {
        split: rerank_r1(model, processor, ev.retrieval_scenes(split, args.n, world), world, args.k)
        for split in args.splits
    }
    print(json.dumps({"model": args.model, "n": args.n, "k": args.k, **out}, indent=1))


if __name__ == "__main__":
    main()
