"""Pre-train the tiny ShapesWorld backbones shipped in src/vlbridge/assets/shapesworld/.

Writes, all in Hugging Face's own format (load with from_pretrained, no vlbridge code needed):
    vision/             CLIPModel (+ CLIPImageProcessor and CLIPTokenizer) trained contrastively on
                        contrast-group batches; load the tower with CLIPVisionModel.from_pretrained
    lm/                 LlamaForCausalLM + word-level PreTrainedTokenizerFast (bos added, eos not)
    qformer_tokenizer/  BertTokenizerFast (WordPiece over whole words) with [DEC] as bos_token
    vision_probe.json   what the vision tower encodes (retrieval + linear probes)
    lm_ceiling.json     how well the LM answers / copies given the true caption as context: as tokens, or
                        pooled (one averaged vector per object phrase, what BLIP-2's soft prompt imitates)

Run (the shipped models: CLIP 2500 steps ~21 min on one core of a 2-core machine while the other was
busy; LM 6 layers x 128, 4000 steps, 21 min on both cores; bf16 autocast):
    PYTHONPATH=src .venv/bin/python scripts/pretrain_backbones.py --skip-lm    # vision
    PYTHONPATH=src .venv/bin/python scripts/pretrain_backbones.py --skip-clip   # lm
    add --eval-only to re-measure saved models. lm_ceiling.json shows the limit of the shipped LM: from
    a caption in its context (tokens or pooled) it copies colour, shape, relations and count (>= 0.98)
    but not size (~0.5: it writes its prior), and it answers ~57% of the questions about it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import (
    BertTokenizerFast, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer,
    CLIPVisionModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
)

from vlbridge.data.shapesworld import (
    COLORS, GRID, SHAPES, SIZES, ShapesWorldConfig, contrast_group, hard_negative_captions, make_split,
    object_pieces, parse_caption, render_batch, split_scene,
)

ASSETS = Path(__file__).resolve().parents[1] / "src/vlbridge/assets/shapesworld"
CAPTION_PROMPT = "a photo of"  # downstream captioning prompt: "a photo of {caption}"
VQA_PROMPT = "Question: {q} Answer:"  # downstream VQA prompt; the answer follows after a space
POOLED_SLOTS = 8  # pooled contexts are padded to this many vectors: the ShapesWorld recipes' query count


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ASSETS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clip-steps", type=int, default=2500)
    p.add_argument("--clip-groups", type=int, default=16, help="contrast groups of 4 per batch")
    p.add_argument("--clip-lr", type=float, default=2e-3)
    p.add_argument("--lm-steps", type=int, default=4000)
    p.add_argument("--lm-batch", type=int, default=64)
    p.add_argument("--lm-layers", type=int, default=6)
    p.add_argument("--lm-width", type=int, default=128)
    p.add_argument("--lm-lr", type=float, default=3e-3)
    p.add_argument("--eval-scenes", type=int, default=300)
    p.add_argument("--fp32", action="store_true", help="train in fp32 instead of bf16 autocast")
    p.add_argument("--skip-clip", action="store_true")
    p.add_argument("--skip-lm", action="store_true")
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
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=512)


def build_qformer_tokenizer(words: list[str]) -> BertTokenizerFast:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + words
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, bos_token="[DEC]", model_max_length=64)
    return tok


def build_clip_tokenizer(texts: list[str]) -> CLIPTokenizer:
    """CLIP-style BPE ("</w>" word ends) trained until every ShapesWorld word is a single token."""
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  end_of_word_suffix="</w>", show_progress=False)
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


def train_clip(args, cfg, tok, mean, std) -> CLIPModel:
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=cfg.height, patch_size=8, hidden_size=128, intermediate_size=512,
                           num_hidden_layers=4, num_attention_heads=4),
        projection_dim=128,
    )
    model = CLIPModel(config)
    model.set_attn_implementation("eager")  # see autocast() below
    n_params = sum(p.numel() for p in model.parameters())
    print(f"CLIP: {n_params / 1e6:.2f}M params (vision {sum(p.numel() for p in model.vision_model.parameters()) / 1e6:.2f}M)")
    opt = torch.optim.AdamW(model.parameters(), lr=args.clip_lr, weight_decay=0.05)
    rng = np.random.default_rng([args.seed, 1])
    model.train()
    for step in (bar := tqdm(range(args.clip_steps), desc="clip")):
        scenes = [s for _ in range(args.clip_groups) for s in contrast_group(rng, cfg, k=4, split="train")]
        captions = [s.caption for s in scenes]
        text = tok(captions, padding=True, return_tensors="pt")
        with autocast(args):
            out = model(input_ids=text.input_ids, attention_mask=text.attention_mask,
                        pixel_values=pixels(scenes, cfg, mean, std))
        loss = clip_loss(out, captions)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.clip_steps, args.clip_lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def embed(model, tok, scenes, captions, cfg, mean, std):
    img = model.get_image_features(pixel_values=pixels(scenes, cfg, mean, std))
    text = tok(captions, padding=True, return_tensors="pt")
    txt = model.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask)
    img, txt = (img.pooler_output if hasattr(img, "pooler_output") else img), (txt.pooler_output if hasattr(txt, "pooler_output") else txt)
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def _neg_kind(neg: str, truth: str) -> str:
    a, b = parse_caption(neg), parse_caption(truth)
    for attr in ("color", "shape", "size"):
        if any(getattr(x, attr) != getattr(y, attr) for x, y in zip(a, b)):
            return attr
    return "relation"


@torch.no_grad()
def penultimate(model, scenes, cfg, mean, std) -> torch.Tensor:
    """(N, tokens * hidden): every token (CLS + patches) of the layer BLIP-2 reads."""
    feats = []
    for i in range(0, len(scenes), 256):
        out = model.vision_model(pixel_values=pixels(scenes[i:i + 256], cfg, mean, std), output_hidden_states=True)
        feats.append(out.hidden_states[-2].flatten(1))
    return torch.cat(feats)


def cell_labels(scenes) -> torch.Tensor:
    """(N, 9, 3): per grid cell (shape, color, size) class, 0 = empty cell."""
    y = torch.zeros(len(scenes), GRID * GRID, 3, dtype=torch.long)
    for n, s in enumerate(scenes):
        for o in s.objects:
            y[n, o.row * GRID + o.col] = torch.tensor([SHAPES.index(o.shape) + 1, COLORS.index(o.color) + 1, SIZES.index(o.size) + 1])
    return y


def linear_probe(xtr, ytr, tests: dict, ridge: float = 1.0) -> dict:
    """Ridge regression from penultimate tokens onto every cell's one-hot shape/color/size (a
    closed-form linear probe); accuracy of the argmax on occupied cells."""
    heads = [7, 7, 3]
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-5
    onehot = lambda y: torch.cat([F.one_hot(y[..., j], h).float() for j, h in enumerate(heads)], -1).flatten(1)
    X = (xtr - mu) / sd  # (N, D) with N < D: solve in the dual, (N, N)
    alpha = torch.linalg.solve(X @ X.T + ridge * len(X) * torch.eye(len(X)), onehot(ytr) - onehot(ytr).mean(0))
    W, b = X.T @ alpha, onehot(ytr).mean(0)
    result = {}
    for name, (x, y) in tests.items():
        scores = (((x - mu) / sd) @ W + b).view(len(x), GRID * GRID, -1).split(heads, dim=-1)
        preds = [sc.argmax(-1) for sc in scores]
        occupied = y[..., 0] > 0
        acc = {a: (p == y[..., j])[occupied].float().mean().item() for j, (a, p) in enumerate(zip(("shape", "color", "size"), preds))}
        acc["occupancy"] = ((preds[0] > 0) == occupied).float().mean().item()
        acc["count"] = ((preds[0] > 0).sum(1) == occupied.sum(1)).float().mean().item()
        result[name] = {k: round(v, 4) for k, v in acc.items()}
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
    # 3) linear probes on the penultimate layer's tokens (what BLIP-2 reads), trained vs random init
    train = make_split("train", 1500, cfg, start=100_000)
    test, comp = make_split("test", 500, cfg), make_split("compositional", 500, cfg)
    ytr, yte, yco = cell_labels(train), cell_labels(test), cell_labels(comp)
    for name, m in (("probe_penultimate", model), ("probe_penultimate_random_init", random_model)):
        res[name] = linear_probe(penultimate(m, train, cfg, mean, std), ytr,
                                 {"test": (penultimate(m, test, cfg, mean, std), yte),
                                  "compositional": (penultimate(m, comp, cfg, mean, std), yco)})
    return res


# ---------------------------------------------------------------------------------------------
# language model: a tiny Llama that reads a caption and answers / re-describes from it


def pooled_context(scene, tok, slots: int = POOLED_SLOTS) -> list[list[int]]:
    """The caption as `slots` context vectors: each object's piece averaged into one vector (in caption
    order), then "." vectors up to `slots`. This is what a few soft-prompt vectors can carry; see lm_example."""
    ids = lambda text: tok(text, add_special_tokens=False).input_ids
    chunks = [ids(c) for c in object_pieces(scene)]
    return chunks + [ids(".")] * max(slots - len(chunks), 0)


def lm_example(scene, rng, tok) -> list[list[int]]:
    """One training sequence: a list of positions, each a list of token ids whose embeddings are
    averaged (one id: an ordinary token; several: a pooled context vector, no loss on it).

    Mixes the caption prior, the question prior and context use (a context, then a question or the
    captioning prompt about it). Contexts come as the caption's tokens (before or after <bos>) or
    pooled: one averaged vector per object phrase, before <bos>, the way BLIP-2's few query vectors
    sit in front of the text. Why pooled: an LM trained only on token-exact contexts copies by
    position (induction), and then reads no soft prompt at all - with the first 8 caption tokens, the
    caption shuffled or pooled as context its loss was worse than with no context (1.25 / 1.18 / 1.37
    vs 0.92 nats/token; context_losses).
    Pooled contexts teach it to read content from a few dense vectors, which a Q-Former can produce."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    ids = lambda text: tok(text, add_special_tokens=False).input_ids
    one = lambda xs: [[x] for x in xs]
    q, a = scene.qa[int(rng.integers(len(scene.qa)))]
    kind = rng.choice(["caption", "photo", "qa", "ctx_qa", "ctx_photo"], p=[0.05, 0.1, 0.05, 0.5, 0.3])
    if kind == "caption":
        return one([bos] + ids(scene.caption) + [eos])
    if kind == "photo":
        return one([bos] + ids(f"{CAPTION_PROMPT} {scene.caption}") + [eos])
    if kind == "qa":
        return one([bos] + ids(f"{VQA_PROMPT.format(q=q)} {a}") + [eos])
    body = one(ids(f"{VQA_PROMPT.format(q=q)} {a}" if kind == "ctx_qa" else f"{CAPTION_PROMPT} {scene.caption}"))
    form = rng.random()
    if form < 0.5:
        return pooled_context(scene, tok) + [[bos]] + body + [[eos]]
    context = one(ids(scene.caption))
    if form < 0.75:
        return context + [[bos]] + body + [[eos]]
    return [[bos]] + context + body + [[eos]]


def embed_positions(model, seqs: list[list[list[int]]], pad_id: int):
    """inputs_embeds (B, T, H), attention_mask (B, T) and labels (B, T) for lm_example sequences
    (right-padded); pooled positions are the mean of their tokens' embeddings and carry no label."""
    B, T = len(seqs), max(map(len, seqs))
    K = max(len(p) for s in seqs for p in s)
    idx = torch.full((B, T, K), pad_id)
    count = torch.zeros(B, T, 1)
    labels = torch.full((B, T), -100)
    for i, s in enumerate(seqs):
        for t, p in enumerate(s):
            idx[i, t, : len(p)] = torch.tensor(p)
            count[i, t] = len(p)
            if len(p) == 1:
                labels[i, t] = p[0]
    emb = model.get_input_embeddings()(idx)  # (B, T, K, H)
    valid = (torch.arange(K)[None, None, :] < count).unsqueeze(-1)  # (B, T, K, 1)
    x = (emb * valid).sum(2) / count.clamp(min=1)
    return x, (count[..., 0] > 0).long(), labels


def train_lm(args, cfg, tok) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=len(tok), hidden_size=args.lm_width, intermediate_size=3 * args.lm_width,
                         num_hidden_layers=args.lm_layers, num_attention_heads=args.lm_width // 32,
                         num_key_value_heads=args.lm_width // 32, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    model.set_attn_implementation("eager")  # see autocast() below
    print(f"LM: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, vocab {len(tok)}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lm_lr, weight_decay=0.01)
    rng = np.random.default_rng([args.seed, 3])
    model.train()
    for step in (bar := tqdm(range(args.lm_steps), desc="lm")):
        scenes = [split_scene("train", int(i), cfg) for i in rng.integers(0, 1_000_000, size=args.lm_batch)]
        x, mask, labels = embed_positions(model, [lm_example(s, rng, tok) for s in scenes], tok.pad_token_id)
        with autocast(args):
            loss = model(inputs_embeds=x, attention_mask=mask, labels=labels).loss
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lm_steps, args.lm_lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


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
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                    past_key_values=out.past_key_values, use_cache=True)
    texts = []
    for row in torch.stack(new, 1).tolist():
        row = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
        texts.append(tok.decode(row, skip_special_tokens=True).strip())
    return texts


@torch.no_grad()
def context_losses(model, tok, scenes) -> dict[str, float]:
    """Mean loss (nats/token) of the targets - the caption after "a photo of", the answers to two
    questions - with the caption as context in different forms. A reader of its context gains from any
    of them; a copier by position gains only from the exact caption (and loses from partial ones)."""
    ids = lambda text: [[i] for i in tok(text, add_special_tokens=False).input_ids]
    bos, eos = [[tok.bos_token_id]], [[tok.eos_token_id]]
    rng = np.random.default_rng(0)
    contexts = {
        "no_context": lambda s: [],
        "caption_tokens": lambda s: ids(s.caption),
        "pooled": lambda s: pooled_context(s, tok),
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
            x, mask, labels = embed_positions(model, seqs[i:i + 256], tok.pad_token_id)
            for j, start in enumerate(starts[i:i + 256]):
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
        "pooled_bos": lambda s: pooled_context(s, tok) + bos,
        "no_context": lambda s: bos,
    }
    res: dict = {"val/target_loss_by_context": context_losses(model, tok, make_split("val", 200, cfg))}
    for split in ("test", "compositional"):
        scenes = make_split(split, args.eval_scenes, cfg)
        qa = [(s, q, a) for s in scenes for q, a in s.qa]
        for name, ctx in contexts.items():
            preds = []
            for i in range(0, len(qa), 512):
                preds += greedy(model, tok, [ctx(s) + ids(VQA_PROMPT.format(q=q)) for s, q, _ in qa[i:i + 512]], max_new=2)
            per: dict[str, list[float]] = {}
            for (s, q, a), p in zip(qa, preds):
                kind = next(x.kind for x in s.qa if x.question == q)
                per.setdefault(kind, []).append(float(p == a))
            acc = {k: round(float(np.mean(v)), 4) for k, v in sorted(per.items())}
            acc["all"] = round(float(np.mean([v for vs in per.values() for v in vs])), 4)
            res[f"{split}/vqa/{name}"] = acc
            if name != "no_context":
                caps = greedy(model, tok, [ctx(s) + ids(CAPTION_PROMPT) for s in scenes], max_new=30)
                res[f"{split}/caption_copy/{name}"] = {k: round(v, 4) for k, v in attribute_accuracy(caps, scenes).items()}
    return res


# ---------------------------------------------------------------------------------------------


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
    qtok.save_pretrained(args.out / "qformer_tokenizer")

    if not args.skip_clip:
        ctok = build_clip_tokenizer(texts)
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
            image_processor=CLIPImageProcessor(size={"shortest_edge": cfg.height}, crop_size={"height": cfg.height, "width": cfg.width},
                                               image_mean=mean.round(4).tolist(), image_std=std.round(4).tolist()),
            tokenizer=ctok)
        model.save_pretrained(args.out / "vision")
        processor.save_pretrained(args.out / "vision")
        # the shipped processor must reproduce the normalisation used in training
        scenes = make_split("val", 4, cfg)
        from vlbridge.data.shapesworld import render
        ref = processor(images=[render(s, cfg) for s in scenes], return_tensors="pt").pixel_values
        assert torch.allclose(ref, pixels(scenes, cfg, mean.round(4), std.round(4)), atol=1e-4)
        assert CLIPVisionModel.from_pretrained(args.out / "vision").config.hidden_size == 128
        torch.manual_seed(args.seed)
        random_model = CLIPModel(model.config).eval()
        probe = evaluate_clip(model, random_model, ctok, cfg, mean, std, args)
        probe["train_seconds"] = None if args.eval_only else round(train_s, 1)
        probe["args"] = {k: str(v) for k, v in vars(args).items()}
        print(json.dumps(probe, indent=1))
        (args.out / "vision_probe.json").write_text(json.dumps(probe, indent=1) + "\n")

    if not args.skip_lm:
        ltok = build_lm_tokenizer(words)
        t0 = time.time()
        if args.eval_only:
            lm = LlamaForCausalLM.from_pretrained(args.out / "lm").eval()
        else:
            lm = train_lm(args, cfg, ltok)
        train_s = time.time() - t0
        lm.save_pretrained(args.out / "lm")
        ltok.save_pretrained(args.out / "lm")
        ceiling = evaluate_lm(lm, ltok, cfg, args)
        ceiling["train_seconds"] = None if args.eval_only else round(train_s, 1)
        ceiling["args"] = {k: str(v) for k, v in vars(args).items()}
        print(json.dumps(ceiling, indent=1))
        (args.out / "lm_ceiling.json").write_text(json.dumps(ceiling, indent=1) + "\n")


if __name__ == "__main__":
    main()
