"""Pre-train the tiny ShapesWorld backbones shipped in src/vlbridge/assets/shapesworld/.

Writes, all in Hugging Face's own format (load with from_pretrained, no vlbridge code needed):
    vision/             CLIPModel (+ CLIPImageProcessor and CLIPTokenizer) trained contrastively on
                        contrast-group batches; load the tower with CLIPVisionModel.from_pretrained
    lm/                 LlamaForCausalLM + word-level PreTrainedTokenizerFast (bos added, eos not)
    bert/               BertForMaskedLM shaped like the recipes' Q-Former (+ its tokenizer): what the
                        stage-1 recipe starts the Q-Former from, as BLIP-2 starts from bert-base-uncased
    qformer_tokenizer/  BertTokenizerFast (WordPiece over whole words) with [DEC] as bos_token
    vision_probe.json   what the vision tower encodes (retrieval, per-cell and patch-position linear
                        probes of every layer)
    lm_ceiling.json     how well the LM answers / copies given the true caption as context: as tokens, or
                        pooled (one averaged vector per grid cell, what BLIP-2's soft prompt imitates)
    bert_probe.json     BERT's masked-answer accuracy (the caption in context) and masked-word accuracy

Run (the shipped models on this project's 2-core machine, both threads, bf16 autocast): CLIP 2500 steps
with --clip-dense 3 --clip-pos 1, 4 min; LM 6 layers x 128, untied embeddings, 6000 steps at lr 1e-3,
12 min; BERT 4 layers x 192, 3000 steps, 6 min:
    PYTHONPATH=src .venv/bin/python scripts/pretrain_backbones.py --only clip   # or lm, bert; default all
    add --eval-only to re-measure saved models (with --out DIR, models trained elsewhere);
    --only lm --lm-init src/vlbridge/assets/shapesworld/lm --lm-phases forward yes_no mixed --out DIR adds the
    yes/no relation curriculum (LM_CURRICULUM, 12.5 min; not in the shipped LM) to the shipped LM.
What they reach (test split; the JSON files): a linear probe reads shape / colour / size of a grid cell
from the layer BLIP-2 reads at 0.99 / 1.00 / 1.00 (random-init encoder 0.32 / 0.85 / 0.74) and the row
and column of a patch from its token at 0.999; given the true caption as context the LM copies it
exactly (1.00; from the 9 pooled grid vectors 0.98) and answers 0.90 of the questions about it (every
kind >= 0.97 except relation, 0.64: the open "what shape is left of the red circle?" 1.00, the yes/no
"is the red circle above the blue star?" 0.47-0.48, chance); BERT fills a masked answer from the caption
at 0.85 (colour / shape 1.00, count / size 0.79, relation 0.67)."""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import (
    BertTokenizerFast,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from vlbridge.data.shapesworld import (
    COLORS,
    CONVERSE,
    GRID,
    QA,
    RELATIONS,
    SHAPES,
    SIZES,
    ShapesWorldConfig,
    contrast_group,
    hard_negative_captions,
    holds,
    make_split,
    object_pieces,
    parse_caption,
    relation,
    render_batch,
    split_scene,
)

ASSETS = Path(__file__).resolve().parents[1] / "src/vlbridge/assets/shapesworld"
CAPTION_PROMPT = "a photo of"  # downstream captioning prompt: "a photo of {caption}"
VQA_PROMPT = "Question: {q} Answer:"  # downstream VQA prompt; the answer follows after a space
# what one LM training sequence is (lm_example): a caption or question alone (the priors), or with the
# caption in its context
LM_MIX = {"caption": 0.02, "photo": 0.04, "qa": 0.02, "ctx_qa": 0.8, "ctx_photo": 0.12}
# pooled contexts (what the BLIP-2 soft prompt imitates; see pooled_context): "grid" = 9 vectors, one per grid
# cell, the ShapesWorld recipes' query count; "caption" = one per object in caption order, padded to 8
POOLED_SLOTS = {"grid": GRID * GRID, "caption": 8}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ASSETS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clip-steps", type=int, default=2500)
    p.add_argument("--clip-groups", type=int, default=16, help="contrast groups of 4 per batch")
    p.add_argument("--clip-lr", type=float, default=2e-3)
    p.add_argument("--clip-patch", type=int, default=8, help="ViT patch size (pixels) of the 64x64 images")
    p.add_argument(
        "--clip-dense",
        type=float,
        default=3.0,
        help="weight of the per-cell attribute loss on the layer BLIP-2 reads (0: contrastive only)",
    )
    p.add_argument(
        "--clip-pos",
        type=float,
        default=1.0,
        help="weight of the per-patch position loss (row and column) on the layer BLIP-2 reads",
    )
    p.add_argument("--lm-steps", type=int, default=6000)
    p.add_argument("--lm-batch", type=int, default=64)
    p.add_argument("--lm-layers", type=int, default=6)
    p.add_argument("--lm-width", type=int, default=128)
    p.add_argument("--lm-lr", type=float, default=1e-3)
    p.add_argument(
        "--lm-layout",
        choices=tuple(POOLED_SLOTS),
        default="grid",
        help="the pooled contexts the LM learns to read (pooled_context)",
    )
    p.add_argument(
        "--lm-mix", type=json.loads, default=LM_MIX, help="JSON: share of each kind of sequence (lm_example)"
    )
    p.add_argument(
        "--lm-init",
        type=Path,
        default=None,
        help="start from this saved LM instead of the main phase (e.g. the curriculum alone)",
    )
    p.add_argument(
        "--lm-phases",
        nargs="*",
        default=[],
        choices=[ph.name for ph in LM_CURRICULUM],
        help="phases of the yes/no relation curriculum (LM_CURRICULUM) to run after the main phase, e.g. "
        "forward yes_no mixed; none by default (the shipped LM has none)",
    )
    p.add_argument(
        "--lm-tied",
        action="store_true",
        help="tie input and output embeddings (the old default; see train_lm for why not)",
    )
    p.add_argument("--bert-steps", type=int, default=3000)
    p.add_argument("--bert-batch", type=int, default=128)
    p.add_argument("--bert-lr", type=float, default=1e-3)
    p.add_argument("--eval-scenes", type=int, default=300)
    p.add_argument("--fp32", action="store_true", help="train in fp32 instead of bf16 autocast")
    p.add_argument(
        "--only",
        nargs="+",
        choices=("clip", "lm", "bert"),
        default=["clip", "lm", "bert"],
        help="which backbones to train (or, with --eval-only, measure)",
    )
    p.add_argument("--eval-only", action="store_true", help="load the saved models from --out and only measure")
    return p.parse_args()


def autocast(args):
    """bf16 autocast: on this project's CPUs (AMX) a training step is ~1.5x faster than fp32, but only
    with the eager attention path: torch's fused CPU attention in bf16 was slower than fp32 here."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32)


def lr_at(step: int, total: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


# ---------------------------------------------------------------------------------------------
# tokenizers: all three cover the closed ShapesWorld vocabulary with one token per word


def corpus_texts(cfg: ShapesWorldConfig) -> list[str]:
    scenes = make_split("train", 3000, cfg) + make_split("compositional", 500, cfg)
    texts = [s.caption for s in scenes] + [f"{q} {a}" for s in scenes for q, a in s.qa]
    # every word a sentence template can produce, even if this sample missed it
    texts += [f"{CAPTION_PROMPT} " + VQA_PROMPT.format(q="") + " yes no 0 1 2 3 4 right of left above below"]
    texts += [" ".join(SHAPES + COLORS + SIZES), " ".join(s + "s" for s in SHAPES) + " crosses object objects"]
    return texts


def words_of(texts: list[str]) -> list[str]:
    # same split as tokenizers' Whitespace pre-tokenizer: \w+ | punctuation runs
    return sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t.lower())})


def build_lm_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(cleanup=True)  # joins words with spaces, "circle ." -> "circle."
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=512,
    )


def build_qformer_tokenizer(words: list[str]) -> BertTokenizerFast:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + words
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, bos_token="[DEC]", model_max_length=64)
    return tok


def build_clip_tokenizer(texts: list[str]) -> CLIPTokenizer:
    """CLIP-style BPE ("</w>" word ends) trained until every ShapesWorld word is a single token."""
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return CLIPTokenizer(vocab=state["vocab"], merges=merges, model_max_length=32)


# ---------------------------------------------------------------------------------------------
# vision: a tiny CLIP trained on contrast-group batches


def pixels(scenes, cfg, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    x = render_batch(scenes, cfg).astype(np.float32) / 255.0  # (B, H, W, 3)
    return torch.from_numpy((x - mean) / std).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)


def clip_loss(out, captions: list[str]) -> torch.Tensor:
    # identical captions in one batch (e.g. two lone "a small red circle.") are both positives
    same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
    target = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(out.logits_per_image, target) + F.cross_entropy(out.logits_per_text, target)) / 2


def cell_pooling(image_size: int, patch: int) -> torch.Tensor:
    """(9, P): averages the patches whose centre lies in each grid cell (row-major, as the ViT orders
    patches), so a per-cell head reads what a cross-attention over that cell's patches can read."""
    side = image_size // patch
    centre = (
        (torch.arange(side) * patch + patch / 2) * GRID // image_size
    ).long()  # cell row/col of each patch row/col
    cell = (centre[:, None] * GRID + centre[None, :]).flatten()  # (P,)
    member = F.one_hot(cell, GRID * GRID).T.float()  # (9, P)
    return member / member.sum(1, keepdim=True)


DENSE_HEADS = (len(SHAPES) + 1, len(COLORS) + 1, len(SIZES) + 1)


def train_clip(args, cfg, tok, mean, std) -> CLIPModel:
    """Contrastive CLIP training on contrast-group batches, plus (weight --clip-dense) a per-cell
    attribute loss on the penultimate layer, the one BLIP-2 reads: the layer's patch tokens averaged
    over each grid cell (cell_pooling), then one linear head for (shape, color, size) of the cell.

    Why the dense loss: every bridge trained on top of a frozen encoder can only carry what it encodes,
    and the contrastive loss alone left shape unreadable there (linear per-cell probe 0.20, below a
    random-init encoder's 0.32: cell_probe in vision_probe.json, `--eval-only` on the encoder shipped
    before this loss). A web-scale CLIP encodes shape; this tiny one needs the direct signal to do so
    in minutes. Measured (2500 steps, probe at the read layer, test split): weight 1 -> shape 0.46,
    weight 3 -> 0.92 (0.99 with the position loss below).

    Why the position loss (weight --clip-pos; a linear head on each patch token of the same layer
    predicts the patch's row and column): a query can only attend to a place if the keys say where
    they are. A fresh Q-Former regressed for 600 steps onto the object in each grid cell
    (scripts/query_readout.py) reads colour / shape 0.45 / 0.43 without it and 1.00 / 0.997 with it;
    BLIP-2's demo captions at 600 stage-1 steps go from 0.53 / 0.46 to 0.65 / 0.64, but its ITC
    retrieval learns later (README). Weight 0.25 gave the same demo within noise; 1 is shipped.
    The heads are thrown away; only CLIPModel is saved."""
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=96,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=32,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            image_size=cfg.height,
            patch_size=args.clip_patch,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
        ),
        projection_dim=128,
    )
    model = CLIPModel(config)
    model.set_attn_implementation("eager")  # see autocast() below
    head = torch.nn.Sequential(torch.nn.LayerNorm(128), torch.nn.Linear(128, sum(DENSE_HEADS)))
    side = cfg.height // args.clip_patch
    pos_head = torch.nn.Sequential(torch.nn.LayerNorm(128), torch.nn.Linear(128, 2 * side))
    heads = [*head.parameters(), *pos_head.parameters()]
    patch_row, patch_col = patch_rows_cols(side)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"CLIP: {n_params / 1e6:.2f}M params "
        f"(vision {sum(p.numel() for p in model.vision_model.parameters()) / 1e6:.2f}M)"
    )
    opt = torch.optim.AdamW([*model.parameters(), *heads], lr=args.clip_lr, weight_decay=0.05)
    rng = np.random.default_rng([args.seed, 1])
    pool = cell_pooling(cfg.height, config.vision_config.patch_size)
    model.train()
    for step in (bar := tqdm(range(args.clip_steps), desc="clip")):
        scenes = [s for _ in range(args.clip_groups) for s in contrast_group(rng, cfg, k=4, split="train")]
        captions = [s.caption for s in scenes]
        text = tok(captions, padding=True, return_tensors="pt")
        with autocast(args):
            out = model(
                input_ids=text.input_ids,
                attention_mask=text.attention_mask,
                pixel_values=pixels(scenes, cfg, mean, std),
                output_hidden_states=True,
            )
            patches = out.vision_model_output.hidden_states[-2][:, 1:]  # (B, P, 128), CLS dropped
            logits = head(pool @ patches)  # (B, 9, 7 + 7 + 3)
            pos_logits = pos_head(patches).float()  # (B, P, 2 * side): row and column of each patch
        contrastive = clip_loss(out, captions)
        y = cell_labels(scenes)  # (B, 9, 3)
        dense = sum(
            F.cross_entropy(lg.flatten(0, 1).float(), y[..., j].flatten())
            for j, lg in enumerate(logits.split(DENSE_HEADS, -1))
        ) / len(DENSE_HEADS)
        position = (
            F.cross_entropy(pos_logits[..., :side].flatten(0, 1), patch_row.repeat(len(scenes)))
            + F.cross_entropy(pos_logits[..., side:].flatten(0, 1), patch_col.repeat(len(scenes)))
        ) / 2
        loss = contrastive + args.clip_dense * dense + args.clip_pos * position
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.clip_steps, args.clip_lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*model.parameters(), *heads], 1.0)
        opt.step()
        bar.set_postfix(clip=f"{contrastive.item():.3f}", dense=f"{dense.item():.3f}", pos=f"{position.item():.3f}")
    return model.eval()


@torch.no_grad()
def embed(model, tok, scenes, captions, cfg, mean, std):
    img = model.get_image_features(pixel_values=pixels(scenes, cfg, mean, std))
    text = tok(captions, padding=True, return_tensors="pt")
    txt = model.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask)
    img, txt = (
        (img.pooler_output if hasattr(img, "pooler_output") else img),
        (txt.pooler_output if hasattr(txt, "pooler_output") else txt),
    )
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def _neg_kind(neg: str, truth: str) -> str:
    a, b = parse_caption(neg), parse_caption(truth)
    for attr in ("color", "shape", "size"):
        if any(getattr(x, attr) != getattr(y, attr) for x, y in zip(a, b)):
            return attr
    return "relation"


@torch.no_grad()
def cell_features(model, scenes, cfg, mean, std) -> torch.Tensor:
    """(L + 1, N, 9, H): every layer's patch tokens (embeddings first) averaged per grid cell."""
    pool = cell_pooling(cfg.height, model.config.vision_config.patch_size)
    feats = []
    for i in range(0, len(scenes), 256):
        out = model.vision_model(pixel_values=pixels(scenes[i : i + 256], cfg, mean, std), output_hidden_states=True)
        feats.append(torch.stack([pool @ h[:, 1:] for h in out.hidden_states]))
    return torch.cat(feats, 1)


def cell_labels(scenes) -> torch.Tensor:
    """(N, 9, 3): per grid cell (shape, color, size) class, 0 = empty cell."""
    y = torch.zeros(len(scenes), GRID * GRID, 3, dtype=torch.long)
    for n, s in enumerate(scenes):
        for o in s.objects:
            y[n, o.row * GRID + o.col] = torch.tensor(
                [SHAPES.index(o.shape) + 1, COLORS.index(o.color) + 1, SIZES.index(o.size) + 1]
            )
    return y


def ridge_probe(xtr: torch.Tensor, ytr: torch.Tensor, ridge: float = 1e-2):
    """A closed-form linear probe: ridge regression (with a bias) from standardised features xtr (N, H)
    onto targets ytr (N, K), in double precision. Returns x (M, H) -> scores (M, K)."""
    xtr, ytr = xtr.double(), ytr.double()
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-5
    design = lambda x: torch.cat([(x.double() - mu) / sd, torch.ones(len(x), 1, dtype=torch.double)], -1)
    X = design(xtr)
    W = torch.linalg.solve(X.T @ X + ridge * len(X) * torch.eye(X.shape[1], dtype=X.dtype), X.T @ ytr)
    return lambda x: design(x) @ W


def cell_probe(xtr, ytr, tests: dict, ridge: float = 1e-2) -> dict:
    """Linear probe, one map shared by all cells: ridge regression from a cell's pooled features (N, 9, H)
    onto its one-hot (shape, color, size); accuracy of the argmax on occupied cells, occupancy over all
    cells, count = all 9 occupancy calls of a scene right. What a cross-attention over the cell can read."""
    onehot = lambda y: torch.cat([F.one_hot(y[..., j], h).float() for j, h in enumerate(DENSE_HEADS)], -1)
    predict = ridge_probe(xtr.flatten(0, 1), onehot(ytr).flatten(0, 1), ridge)  # (N * 9, H) -> (N * 9, 17)
    result = {}
    for name, (x, y) in tests.items():
        scores = predict(x.flatten(0, 1)).view(*x.shape[:2], -1)
        preds = [sc.argmax(-1) for sc in scores.split(DENSE_HEADS, dim=-1)]
        occupied = y[..., 0] > 0
        acc = {
            a: (p == y[..., j])[occupied].float().mean().item()
            for j, (a, p) in enumerate(zip(("shape", "color", "size"), preds))
        }
        acc["occupancy"] = ((preds[0] > 0) == occupied).float().mean().item()
        acc["count"] = ((preds[0] > 0) == occupied).all(1).float().mean().item()
        result[name] = {k: round(v, 4) for k, v in acc.items()}
    return result


def patch_rows_cols(side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each patch, in the ViT's (row-major) patch order."""
    index = torch.arange(side * side)
    return index // side, index % side


@torch.no_grad()
def position_probe(model, train, test, cfg, mean, std, ridge: float = 1e-2) -> dict:
    """Per layer: a ridge map from one patch token onto its one-hot (row, column); the fraction of test
    patches with both right. Where a patch is must be readable for a query to attend to a place."""

    def tokens(scenes):  # (L + 1, N * P, H)
        out = model.vision_model(pixel_values=pixels(scenes, cfg, mean, std), output_hidden_states=True)
        return torch.stack([h[:, 1:] for h in out.hidden_states]).flatten(1, 2)

    htr, hte = tokens(train), tokens(test)
    side = int(round((htr.shape[1] // len(train)) ** 0.5))
    row, col = patch_rows_cols(side)
    rte, cte = row.repeat(len(test)), col.repeat(len(test))
    Y = torch.cat([F.one_hot(row.repeat(len(train)), side), F.one_hot(col.repeat(len(train)), side)], -1)
    result = {}
    for i, (xtr, xte) in enumerate(zip(htr, hte)):
        pred = ridge_probe(xtr, Y, ridge)(xte)
        ok = (pred[:, :side].argmax(-1) == rte) & (pred[:, side:].argmax(-1) == cte)
        result[f"layer_{i}" + (" (read by BLIP-2)" if i == len(htr) - 2 else "")] = round(ok.float().mean().item(), 4)
    return result


def evaluate_clip(model, random_model, tok, cfg, mean, std, args) -> dict:
    res: dict = {}
    # 1) in-group retrieval: image -> the 4 captions of its own contrast group, split by edit kind
    rng = np.random.default_rng([args.seed, 2])
    groups = [contrast_group(rng, cfg, k=4, split="test") for _ in range(args.eval_scenes)]
    hits: dict[str, list[float]] = {}
    for g in groups:
        img, txt = embed(model, tok, g, [s.caption for s in g], cfg, mean, std)
        sim = img @ txt.T  # (4, 4)
        for i, s in enumerate(g[1:], start=1):  # 2-way: base vs this edit, both directions
            ok = [sim[0, 0] > sim[0, i], sim[i, i] > sim[i, 0]]
            hits.setdefault(s.edit, []).extend(float(o) for o in ok)
        hits.setdefault("top1_of_4", []).extend((sim.argmax(1) == torch.arange(4)).float().tolist())
    res["in_group_retrieval"] = {k: round(float(np.mean(v)), 4) for k, v in sorted(hits.items())}
    # 2) hard negatives: true caption vs captions wrong in exactly one attribute
    scenes = make_split("test", args.eval_scenes, cfg)
    neg_hits: dict[str, list[float]] = {}
    for s in scenes:
        negs = hard_negative_captions(s, 8)
        img, txt = embed(model, tok, [s], [s.caption] + negs, cfg, mean, std)
        sim = (img @ txt.T)[0]
        neg_hits.setdefault("top1_of_9", []).append(float(sim.argmax() == 0) if negs else 1.0)
        for j, n in enumerate(negs, start=1):
            neg_hits.setdefault(_neg_kind(n, s.caption), []).append(float(sim[0] > sim[j]))
    res["hard_negative_pairwise"] = {k: round(float(np.mean(v)), 4) for k, v in sorted(neg_hits.items())}
    # 3) linear probes per grid cell at every layer, trained vs random init: hidden_states[-2] is what
    # BLIP-2 reads (feature_layer -2); a random encoder shows what the pixels alone give a linear reader
    train = make_split("train", 3000, cfg, start=100_000)
    test, comp = make_split("test", 500, cfg), make_split("compositional", 500, cfg)
    ytr, yte, yco = cell_labels(train), cell_labels(test), cell_labels(comp)
    for name, m in (("cell_probe", model), ("cell_probe_random_init", random_model)):
        ftr, fte, fco = (cell_features(m, x, cfg, mean, std) for x in (train, test, comp))
        res[name] = {
            f"layer_{i}" + (" (read by BLIP-2)" if i == len(ftr) - 2 else ""): cell_probe(
                ftr[i], ytr, {"test": (fte[i], yte), "compositional": (fco[i], yco)}
            )
            for i in range(len(ftr))
        }
    res["patch_position_probe"] = position_probe(model, train[:500], test[:200], cfg, mean, std)
    return res


# ---------------------------------------------------------------------------------------------
# language model: a tiny Llama that reads a caption and answers / re-describes from it


def pooled_context(scene, tok, layout: str = "grid") -> list[list[int]]:
    """The scene as a few context vectors, each the average of a phrase's tokens (see lm_example).
    grid:    one vector per grid cell, column-major (cell col * 3 + row, the caption's own order):
             "a small red star" where an object is, "." where none is. The LM must infer the relation
             words from which slots are filled - and a query can own a place, which a fresh Q-Former
             learns to fill at 1.00 colour / shape vs 0.86 for the caption layout (query_readout.py).
    caption: one vector per object in caption order with its relation word ("a small red star above"),
             then "." vectors up to 8 (the layout shipped before)."""
    ids = lambda text: tok(text, add_special_tokens=False).input_ids
    if layout == "grid":
        cells = [ids(".")] * POOLED_SLOTS["grid"]
        for o in scene.objects:
            cells[o.col * GRID + o.row] = ids(f"a {o.size} {o.color} {o.shape}")
        return cells
    chunks = [ids(c) for c in object_pieces(scene)]
    return chunks + [ids(".")] * max(POOLED_SLOTS["caption"] - len(chunks), 0)


def lm_example(scene, rng, tok, mix: dict = LM_MIX, layout: str = "grid") -> tuple[list[list[int]], int]:
    """One training sequence and the index of its first scored position. A sequence is a list of
    positions, each a list of token ids whose embeddings are averaged (one id: an ordinary token;
    several: a pooled context vector, never scored).

    Mixes the caption prior, the question prior and context use (a context, then a question or the
    captioning prompt about it). Contexts come as the caption's tokens (before or after <bos>) or
    pooled: one averaged vector per object phrase, before <bos>, the way BLIP-2's few query vectors
    sit in front of the text. Why pooled: an LM trained only on token-exact contexts copies by
    position (induction), and then reads no soft prompt at all - with the first 8 caption tokens, the
    caption shuffled or pooled as context its loss was worse than with no context (1.25 / 1.18 / 1.37
    vs 0.92 nats/token; context_losses).
    With a context only the answer / caption after the prompt is scored: the question itself is noise
    (a random template), and scoring it drowned the one answer token a sequence carries."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    ids = lambda text: tok(text, add_special_tokens=False).input_ids
    one = lambda xs: [[x] for x in xs]
    q, a = scene.qa[int(rng.integers(len(scene.qa)))]
    kind = rng.choice(list(mix), p=list(mix.values()))
    if kind == "caption":
        return one([bos] + ids(scene.caption) + [eos]), 1
    if kind == "photo":
        return one([bos] + ids(f"{CAPTION_PROMPT} {scene.caption}") + [eos]), 1
    if kind == "qa":
        return one([bos] + ids(f"{VQA_PROMPT.format(q=q)} {a}") + [eos]), 1
    prompt, target = (VQA_PROMPT.format(q=q), a) if kind == "ctx_qa" else (CAPTION_PROMPT, scene.caption)
    return context_example(scene, rng, tok, prompt, target, layout)


def context_example(
    scene, rng, tok, prompt: str, target: str, layout: str = "grid", form: str | None = None
) -> tuple[list[list[int]], int]:
    """The scene as context, then prompt and target (only the target scored). form: "pooled", "caption_bos"
    (the caption's tokens, then <bos>) or "bos_caption"; None draws them 1/2, 1/4, 1/4."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    ids = lambda text: tok(text, add_special_tokens=False).input_ids
    one = lambda xs: [[x] for x in xs]
    if form is None:
        u = rng.random()
        form = "pooled" if u < 0.5 else "caption_bos" if u < 0.75 else "bos_caption"
    if form == "pooled":
        head = pooled_context(scene, tok, layout) + [[bos]]
    elif form == "caption_bos":
        head = one(ids(scene.caption)) + [[bos]]
    else:
        head = [[bos]] + one(ids(scene.caption))
    head += one(ids(prompt))
    return head + one(ids(target)) + [[eos]], len(head)


# The yes/no relation questions ("is the red circle above the blue star?", about two objects adjacent in
# the caption) are an XOR: the answer flips with the order the question names the two in and with the
# relation word (left of / right of, above / below), and either alone says nothing. Trained on
# lm_example's mix the LM answers them at chance (0.47-0.48 after 6,000 steps), and 1,500 more steps of
# nothing but those questions leave them there (phase yes_no alone: 0.49-0.51, and all questions from
# the pooled grid fall from 0.90 to 0.83). A curriculum (--lm-phases forward yes_no mixed, from the
# shipped LM) gets there; each phase starts from the one before, with its own warm-up + cosine:
#   forward  questions name the pair in caption order, so the relation word alone decides (caption
#            contexts): learnt in a few hundred steps
#   yes_no   the scene's own questions, both orders (caption contexts)
#   mixed    lm_example's mix back, every context form, half the sequences yes/no; with a pooled context
#            half of those ask about any two objects and any of the four relations (the grid decides them)
# Test split, given the true scene: yes/no 0.97 from caption tokens and 0.76 from the pooled grid, every
# question from the pooled grid 0.957 (shipped LM 0.902). It is not shipped: through the BLIP-2 bridge
# (same recipes, only the LM swapped) VQA moved +0.009 / -0.015 with stage-2 seeds 0 / 1 and caption
# colour / shape fell 0.05-0.07 (README, "What limits VQA").
#   robust   mixed + noise on the pooled vectors (an LM tolerant of an imperfect soft prompt): a worse
#            bridge still (VQA 0.787 / 0.745, caption colour 0.82 / 0.84)
@dataclass(frozen=True)
class Phase:
    name: str
    steps: int
    yes_no: float  # share of sequences that are a yes/no relation question (the others: lm_example)
    order: str  # yes_no_question's order: "forward" or "caption"
    pooled: bool  # pooled contexts half the time (else caption tokens only)
    any_pair: float  # with a pooled context: share of the questions asked about any pair ("any")
    noise: float = 0.0  # Gaussian noise on pooled vectors, relative to their RMS (embed_positions)


LM_CURRICULUM = (
    Phase("forward", 1000, 1.0, "forward", False, 0.0),
    Phase("yes_no", 1500, 1.0, "caption", False, 0.0),
    Phase("mixed", 5000, 0.5, "caption", True, 0.5),
    Phase("robust", 1500, 0.5, "caption", True, 0.5, noise=0.3),
)


def yes_no_question(scene, rng, order: str) -> QA | None:
    """A yes/no relation question about the scene ("yes" or "no" equally often), None if it has none.
    forward: a caption-adjacent pair of uniquely named objects, named in caption order, asked with the
             caption's relation (yes) or its converse (no);
    caption: one of the scene's own (Scene.qa: adjacent pairs, either order);
    any:     any two uniquely named objects, any of the four relations."""
    if order == "caption":
        own = [x for x in scene.qa if x.yes_no_relation]
        return own[int(rng.integers(len(own)))] if own else None
    objs = scene.objects
    names = [o.name for o in objs]
    named = [o for o in objs if names.count(o.name) == 1]
    if order == "forward":
        pairs = [(a, b) for a, b in zip(objs, objs[1:]) if a in named and b in named]
        if not pairs:
            return None
        a, b = pairs[int(rng.integers(len(pairs)))]
        r = relation(a, b)
        rel, answer = (r, "yes") if rng.random() < 0.5 else (CONVERSE[r], "no")
        return QA(f"is the {a.name} {rel} the {b.name}?", answer)
    if len(named) < 2:
        return None
    want = rng.random() < 0.5
    for _ in range(20):  # a scene may have no true (or no false) statement of some kinds; draw again
        i, j = rng.choice(len(named), 2, replace=False)
        rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
        if holds(rel, named[i], named[j]) == want:
            return QA(f"is the {named[i].name} {rel} the {named[j].name}?", "yes" if want else "no")
    return None


def curriculum_example(scene, rng, tok, phase: Phase, mix: dict, layout: str = "grid") -> tuple[list[list[int]], int]:
    """One sequence of a curriculum phase: a yes/no relation question with the scene as context (share
    phase.yes_no), else lm_example's."""
    qa = yes_no_question(scene, rng, phase.order) if rng.random() < phase.yes_no else None
    if qa is None:
        return lm_example(scene, rng, tok, mix, layout)
    form = "pooled" if phase.pooled and rng.random() < 0.5 else "caption_bos" if rng.random() < 0.5 else "bos_caption"
    if form == "pooled" and rng.random() < phase.any_pair:
        qa = yes_no_question(scene, rng, "any") or qa
    return context_example(scene, rng, tok, VQA_PROMPT.format(q=qa.question), qa.answer, layout, form)


def embed_positions(
    model,
    seqs: list[list[list[int]]],
    pad_id: int,
    scored_from: list[int] | None = None,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
):
    """inputs_embeds (B, T, H), attention_mask (B, T) and labels (B, T) for lm_example sequences
    (right-padded); pooled positions are the mean of their tokens' embeddings and carry no label, nor
    do positions before scored_from[i]. noise > 0 adds Gaussian noise of that size (relative to each
    vector's RMS) to the pooled positions, an LM trained to read a soft prompt that is only near them."""
    B, T = len(seqs), max(map(len, seqs))
    K = max(len(p) for s in seqs for p in s)
    idx = torch.full((B, T, K), pad_id)
    count = torch.zeros(B, T, 1)
    labels = torch.full((B, T), -100)
    for i, s in enumerate(seqs):
        start = scored_from[i] if scored_from else 0
        for t, p in enumerate(s):
            idx[i, t, : len(p)] = torch.tensor(p)
            count[i, t] = len(p)
            if len(p) == 1 and t >= start:
                labels[i, t] = p[0]
    emb = model.get_input_embeddings()(idx)  # (B, T, K, H)
    valid = (torch.arange(K)[None, None, :] < count).unsqueeze(-1)  # (B, T, K, 1)
    x = (emb * valid).sum(2) / count.clamp(min=1)
    if noise:  # pooled positions only, scaled to each vector's RMS
        rms = x.detach().pow(2).mean(-1, keepdim=True).sqrt()
        x = x + noise * rms * (count > 1) * torch.randn(x.shape, generator=generator)
    return x, (count[..., 0] > 0).long(), labels


def train_lm(args, cfg, tok) -> LlamaForCausalLM:
    """The main phase (lm_example's mix), or the LM saved in --lm-init, then the curriculum phases chosen."""
    decayed = lambda n, p: p.ndim == 2 and "embed" not in n and "lm_head" not in n  # the matrices inside the blocks

    def batcher(model, example, noise: float = 0.0, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)

        def batch(rng):
            scenes = [split_scene("train", int(i), cfg) for i in rng.integers(0, 1_000_000, size=args.lm_batch)]
            seqs, scored_from = zip(*(example(s, rng) for s in scenes))
            x, mask, labels = embed_positions(model, seqs, tok.pad_token_id, scored_from, noise, gen)
            return dict(inputs_embeds=x, attention_mask=mask, labels=labels)

        return batch

    if args.lm_init:
        model = LlamaForCausalLM.from_pretrained(args.lm_init)
    else:
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tok),
                hidden_size=args.lm_width,
                intermediate_size=3 * args.lm_width,
                num_hidden_layers=args.lm_layers,
                num_attention_heads=args.lm_width // 32,
                num_key_value_heads=args.lm_width // 32,
                max_position_embeddings=512,
                tie_word_embeddings=args.lm_tied,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
            )
        )
    model.set_attn_implementation("eager")  # see autocast() below
    if not args.lm_init:
        print(f"LM: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, vocab {len(tok)}")
        # Untied embeddings, no weight decay on embeddings and norms, only targets scored (lm_example), lr 1e-3.
        # The LM shipped before (tied, decay on everything, every token scored, lr 3e-3) never copied a size
        # from its context (0.49) and answered yes/no at chance: the embeddings of answers that are 50/50 a
        # priori had merged (cos(small, large) 0.997, cos(yes, no) 0.995). Measured on 150 test scenes after
        # 1500 steps: untied alone, size copy 0.52 / VQA 0.50; + no decay + targets only, 1.00 / 0.63; with
        # 80% question sequences after 2000 steps, lr 1e-3 0.77 vs lr 3e-3 0.51.
        example = lambda scene, rng: lm_example(scene, rng, tok, args.lm_mix, args.lm_layout)
        fit(
            model,
            args,
            "lm",
            args.lm_steps,
            args.lm_lr,
            decayed,
            batcher(model, example),
            np.random.default_rng([args.seed, 3]),
        )
    for i, phase in enumerate(LM_CURRICULUM):
        if phase.name not in args.lm_phases:
            continue
        example = lambda scene, rng, phase=phase: curriculum_example(
            scene, rng, tok, phase, args.lm_mix, args.lm_layout
        )
        fit(
            model,
            args,
            f"lm/{phase.name}",
            phase.steps,
            args.lm_lr,
            decayed,
            batcher(model, example, phase.noise, args.seed * 100 + i),
            np.random.default_rng([args.seed, 4, i]),
        )
    return model.eval()


def fit(model, args, desc: str, steps: int, lr: float, decayed, batch, rng) -> None:
    """AdamW (weight decay 0.01 on the parameters `decayed(name, param)` picks, none elsewhere), warm-up
    + cosine, clipping at 1, bf16 autocast; batch(rng) gives the model's keyword arguments, labels included."""
    groups: dict[bool, list] = {True: [], False: []}
    for n, p in model.named_parameters():
        groups[bool(decayed(n, p))].append(p)
    opt = torch.optim.AdamW(
        [{"params": groups[True], "weight_decay": 0.01}, {"params": groups[False], "weight_decay": 0.0}], lr=lr
    )
    model.train()
    for step in (bar := tqdm(range(steps), desc=desc)):
        inputs = batch(rng)
        with autocast(args):
            loss = model(**inputs).loss
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")


@torch.no_grad()
def greedy(model, tok, prompts: list[list[list[int]]], max_new: int) -> list[str]:
    """Greedy decoding with the KV cache of left-padded prompts given as lm_example positions (token
    or pooled vectors); the text up to the first eos."""
    T = max(map(len, prompts))
    pad = [[tok.pad_token_id]]
    x, _, _ = embed_positions(model, [pad * (T - len(p)) + p for p in prompts], tok.pad_token_id)
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    pos = (mask.cumsum(1) - 1).clamp(min=0)  # left padding: real positions start at 0
    out = model(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=True)
    new = []
    for _ in range(max_new):
        nxt = out.logits[:, -1].argmax(-1)  # (B,)
        new.append(nxt)
        pos = pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=pos,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    texts = []
    for row in torch.stack(new, 1).tolist():
        row = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
        texts.append(tok.decode(row, skip_special_tokens=True).strip())
    return texts


@torch.no_grad()
def context_losses(model, tok, scenes, layout: str = "grid") -> dict[str, float]:
    """Mean loss (nats/token) of the targets - the caption after "a photo of", the answers to two
    questions - with the caption as context in different forms. A reader of its context gains from any
    of them; a copier by position gains only from the exact caption (and loses from partial ones)."""
    ids = lambda text: [[i] for i in tok(text, add_special_tokens=False).input_ids]
    bos, eos = [[tok.bos_token_id]], [[tok.eos_token_id]]
    rng = np.random.default_rng(0)
    contexts = {
        "no_context": lambda s: [],
        "caption_tokens": lambda s: ids(s.caption),
        "pooled": lambda s: pooled_context(s, tok, layout),
        "first_8_caption_tokens": lambda s: ids(s.caption)[:8],
        "shuffled_caption_tokens": lambda s: [ids(s.caption)[i] for i in rng.permutation(len(ids(s.caption)))],
    }
    out = {}
    for name, ctx in contexts.items():
        seqs, starts = [], []
        for s in scenes:
            for prompt, target in [(CAPTION_PROMPT, s.caption)] + [(VQA_PROMPT.format(q=q), a) for q, a in s.qa[:2]]:
                head = ctx(s) + bos + ids(prompt)
                seqs.append(head + ids(target) + eos)
                starts.append(len(head))
        total = count = 0.0
        for i in range(0, len(seqs), 256):
            x, mask, labels = embed_positions(model, seqs[i : i + 256], tok.pad_token_id)
            for j, start in enumerate(starts[i : i + 256]):
                labels[j, :start] = -100  # only the target (and its eos) is scored
            logits = model(inputs_embeds=x, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            total += F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum").item()
            count += (target != -100).sum().item()
        out[name] = round(total / count, 4)
    return out


def evaluate_lm(model, tok, cfg, args) -> dict:
    """The LM's ceiling as a reader of its context: VQA accuracy per question kind and the attributes of
    the caption it writes after "a photo of", given the true caption as tokens, as pooled vectors
    (what the BLIP-2 soft prompt has to imitate) or nothing."""
    from vlbridge.data.shapesworld import attribute_accuracy

    ids = lambda text: [[i] for i in tok(text, add_special_tokens=False).input_ids]
    bos = [[tok.bos_token_id]]
    contexts = {
        "bos_caption": lambda s: bos + ids(s.caption),
        "caption_bos": lambda s: ids(s.caption) + bos,
        "pooled_bos": lambda s: pooled_context(s, tok, args.lm_layout) + bos,
        "no_context": lambda s: bos,
    }
    res: dict = {"val/target_loss_by_context": context_losses(model, tok, make_split("val", 200, cfg), args.lm_layout)}
    for split in ("test", "compositional"):
        scenes = make_split(split, args.eval_scenes, cfg)
        qa = [(s, q, a) for s in scenes for q, a in s.qa]
        for name, ctx in contexts.items():
            preds = []
            for i in range(0, len(qa), 512):
                preds += greedy(
                    model, tok, [ctx(s) + ids(VQA_PROMPT.format(q=q)) for s, q, _ in qa[i : i + 512]], max_new=2
                )
            # relation also splits into yes/no ("is the red circle above the blue star?") and open ("what
            # shape is left of the red circle?") questions, which the LM answers very differently
            per: dict[str, list[float]] = {}
            relation: dict[str, list[float]] = {"yes_no": [], "open": []}
            for (s, q, a), p in zip(qa, preds):
                kind = next(x.kind for x in s.qa if x.question == q)
                per.setdefault(kind, []).append(float(p == a))
                if kind == "relation":
                    relation["yes_no" if a in ("yes", "no") else "open"].append(float(p == a))
            acc = {k: round(float(np.mean(v)), 4) for k, v in sorted(per.items())}
            acc["all"] = round(float(np.mean([v for vs in per.values() for v in vs])), 4)
            acc |= {f"relation_{form}": round(float(np.mean(v)), 4) if v else None for form, v in relation.items()}
            res[f"{split}/vqa/{name}"] = acc
            if name != "no_context":
                caps = greedy(model, tok, [ctx(s) + ids(CAPTION_PROMPT) for s in scenes], max_new=30)
                res[f"{split}/caption_copy/{name}"] = {
                    k: round(v, 4) for k, v in attribute_accuracy(caps, scenes).items()
                }
    return res


# ---------------------------------------------------------------------------------------------
# BERT: the Q-Former's starting point, as BLIP-2 starts its Q-Former from bert-base-uncased


def bert_example(scene, rng, tok, mask_p: float = 0.15) -> tuple[list[int], list[int]]:
    """One masked-LM sequence (input ids, labels with -100 where unscored): the caption alone (30%) or
    "[CLS] caption [SEP] question answer [SEP]" with the answer always masked (70%). ShapesWorld's
    attributes are independent, so masking caption words alone teaches only grammar; predicting the
    answer from the caption makes the encoder tie every attribute to its object and place - what
    bert-base-uncased brings from web text, and what ITM and ITC need from the Q-Former's text side."""
    if rng.random() < 0.3:
        ids = tok(scene.caption).input_ids
        answer_at = None
    else:
        q, a = scene.qa[int(rng.integers(len(scene.qa)))]
        ids = tok(scene.caption, f"{q} {a}").input_ids
        answer_at = len(ids) - 2  # one-word answers, before the final [SEP]
    ids = list(ids)
    labels = [-100] * len(ids)
    special = set(tok.all_special_ids)
    for i, t in enumerate(ids):
        if t in special or not (i == answer_at or rng.random() < mask_p):
            continue
        labels[i] = t
        r = rng.random()  # BERT's 80 / 10 / 10: [MASK], a random word, the word itself
        ids[i] = (
            tok.mask_token_id
            if (i == answer_at or r < 0.8)
            else int(rng.integers(len(special), len(tok)))
            if r < 0.9
            else t
        )
    return ids, labels


def bert_batch(examples: list[tuple[list[int], list[int]]], pad_id: int):
    T = max(len(i) for i, _ in examples)
    ids = torch.tensor([i + [pad_id] * (T - len(i)) for i, _ in examples])
    labels = torch.tensor([lab + [-100] * (T - len(lab)) for _, lab in examples])
    return ids, (ids != pad_id).long(), labels


def train_bert(args, cfg, tok, q):
    """A BertForMaskedLM shaped like the ShapesWorld recipes' Q-Former (q, a QFormerConfig), trained with masked LM."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=q.hidden_size,
        num_hidden_layers=q.num_layers,
        num_attention_heads=q.num_heads,
        intermediate_size=q.intermediate_size,
        max_position_embeddings=q.max_position_embeddings,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tok.pad_token_id,
    )
    model = BertForMaskedLM(config)
    model.set_attn_implementation("eager")  # see autocast()
    print(f"BERT: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, vocab {len(tok)}")

    def batch(rng):
        scenes = [split_scene("train", int(i), cfg) for i in rng.integers(0, 1_000_000, size=args.bert_batch)]
        ids, mask, labels = bert_batch([bert_example(s, rng, tok) for s in scenes], tok.pad_token_id)
        return dict(input_ids=ids, attention_mask=mask, labels=labels)

    fit(
        model,
        args,
        "bert",
        args.bert_steps,
        args.bert_lr,
        lambda n, p: p.ndim == 2 and "embeddings" not in n,
        batch,
        np.random.default_rng([args.seed, 4]),
    )
    return model.eval()


@torch.no_grad()
def evaluate_bert(model, tok, cfg, args) -> dict:
    """Masked-answer accuracy per question kind (the caption in context) and masked-word accuracy on
    captions alone, split by what the word is (attribute words are chance by design)."""
    from vlbridge.data.shapesworld import question_kind

    res = {}
    for split in ("test", "compositional"):
        scenes = make_split(split, args.eval_scenes, cfg)
        per: dict[str, list[float]] = {}
        for s in scenes:
            for q, a in s.qa:
                ids = tok(s.caption, f"{q} {a}").input_ids
                ids[-2] = tok.mask_token_id
                pred = model(input_ids=torch.tensor([ids])).logits[0, -2].argmax().item()
                per.setdefault(question_kind(q), []).append(float(tok.convert_ids_to_tokens(pred) == a))
        acc = {k: round(float(np.mean(v)), 4) for k, v in sorted(per.items())}
        acc["all"] = round(float(np.mean([v for vs in per.values() for v in vs])), 4)
        res[f"{split}/masked_answer"] = acc
        words: dict[str, list[float]] = {}
        kinds = {**{c: "color" for c in COLORS}, **{x: "shape" for x in SHAPES}, **{z: "size" for z in SIZES}}
        for s in scenes:
            ids = tok(s.caption).input_ids
            for i in range(1, len(ids) - 1):
                masked = list(ids)
                masked[i] = tok.mask_token_id
                pred = model(input_ids=torch.tensor([masked])).logits[0, i].argmax().item()
                word = tok.convert_ids_to_tokens(ids[i])
                words.setdefault(kinds.get(word, "other"), []).append(float(pred == ids[i]))
        res[f"{split}/masked_caption_word"] = {k: round(float(np.mean(v)), 4) for k, v in sorted(words.items())}
    return res


# ---------------------------------------------------------------------------------------------


def save(args, subdir: str, *parts) -> None:
    """save_pretrained each part (model, tokenizer, processor) into OUT/subdir; --eval-only re-measures
    and leaves the saved files as they are."""
    if not args.eval_only:
        for part in parts:
            part.save_pretrained(args.out / subdir)


def write_measures(args, name: str, result: dict, train_s: float) -> None:
    """Write OUT/NAME.json; re-measuring (--eval-only) keeps the training run's time and arguments."""
    path = args.out / f"{name}.json"
    result["train_seconds"] = None if args.eval_only else round(train_s, 1)
    result["args"] = {k: str(v) for k, v in vars(args).items()}
    if args.eval_only and path.exists():
        before = json.loads(path.read_text())
        result.update(train_seconds=before.get("train_seconds"), args=before.get("args"), measured_with=result["args"])
    print(json.dumps(result, indent=1))
    path.write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = ShapesWorldConfig(seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    texts = corpus_texts(cfg)
    words = words_of(texts)
    print(f"vocabulary: {len(words)} words")
    qtok = build_qformer_tokenizer(words)
    save(args, "qformer_tokenizer", qtok)

    if "clip" in args.only:
        # --eval-only re-measures the saved model with its own tokenizer (BPE training is not reproducible)
        ctok = CLIPTokenizer.from_pretrained(args.out / "vision") if args.eval_only else build_clip_tokenizer(texts)
        # normalisation statistics of ShapesWorld images (mostly dark background)
        sample = render_batch(make_split("train", 1000, cfg, start=200_000), cfg).astype(np.float32) / 255.0
        mean, std = sample.mean((0, 1, 2)), sample.std((0, 1, 2))
        t0 = time.time()
        if args.eval_only:
            model = CLIPModel.from_pretrained(args.out / "vision").eval()
        else:
            model = train_clip(args, cfg, ctok, mean, std)
        train_s = time.time() - t0
        processor = CLIPProcessor(
            image_processor=CLIPImageProcessor(
                size={"shortest_edge": cfg.height},
                crop_size={"height": cfg.height, "width": cfg.width},
                image_mean=mean.round(4).tolist(),
                image_std=std.round(4).tolist(),
            ),
            tokenizer=ctok,
        )
        save(args, "vision", model, processor)
        # the shipped processor must reproduce the normalisation used in training
        scenes = make_split("val", 4, cfg)
        from vlbridge.data.shapesworld import render

        ref = processor(images=[render(s, cfg) for s in scenes], return_tensors="pt").pixel_values
        assert torch.allclose(ref, pixels(scenes, cfg, mean.round(4), std.round(4)), atol=1e-4)
        assert CLIPVisionModel.from_pretrained(args.out / "vision").config.hidden_size == 128
        torch.manual_seed(args.seed)
        random_model = CLIPModel(model.config).eval()
        probe = evaluate_clip(model, random_model, ctok, cfg, mean, std, args)
        write_measures(args, "vision_probe", probe, train_s)

    if "lm" in args.only:
        saved = args.out / "lm" if args.eval_only else args.lm_init
        ltok = PreTrainedTokenizerFast.from_pretrained(saved) if saved else build_lm_tokenizer(words)
        t0 = time.time()
        lm = LlamaForCausalLM.from_pretrained(args.out / "lm").eval() if args.eval_only else train_lm(args, cfg, ltok)
        train_s = time.time() - t0
        save(args, "lm", lm, ltok)
        ceiling = evaluate_lm(lm, ltok, cfg, args)
        write_measures(args, "lm_ceiling", ceiling, train_s)

    if "bert" in args.only:
        from transformers import BertForMaskedLM

        from vlbridge.training.train import load_recipe

        # shaped like the recipes' Q-Former, with its tokenizer ([DEC] is in the vocabulary, never trained)
        t0 = time.time()
        bert = (
            BertForMaskedLM.from_pretrained(args.out / "bert").eval()
            if args.eval_only
            else train_bert(args, cfg, qtok, load_recipe("blip2_shapesworld_stage1").model.qformer)
        )
        train_s = time.time() - t0
        save(args, "bert", bert, qtok)
        probe = evaluate_bert(bert, qtok, cfg, args)
        write_measures(args, "bert_probe", probe, train_s)


if __name__ == "__main__":
    main()
