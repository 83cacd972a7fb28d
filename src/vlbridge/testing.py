"""Tiny random backbones and tokenizers written to a local directory, for tests and examples.

Everything is built from transformers configs and the `tokenizers` library, never downloaded, and
saved in transformers' own format so it loads through the same `from_pretrained` path as real
backbones.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = (
    "a photo of the question answer what color shape is there red green blue yellow circle square "
    "triangle small large left right above below how many one two three four yes no and"
).split()


def word_tokenizer(kind: str = "lm"):
    """A WordLevel tokenizer over WORDS. kind 'lm': <pad> <unk> <s> </s>; kind 'bert': BERT specials + [DEC]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        vocab = {t: i for i, t in enumerate(specials + list(WORDS) + ["?", ".", ":"])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            pad_token="[PAD]",
            unk_token="[UNK]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + list(WORDS) + ["?", ".", ":"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def tiny_lm_config(kind: str, vocab: int, **overrides):
    """A tiny transformers LM config, 48 wide with 2 layers, for reference models in parity tests: "opt",
    "llama" (Vicuna's architecture: grouped KV heads) or "t5" (untied head like Flan-T5: a random T5 with
    the tied head's d_model**-0.5 rescaling sits on near-ties when decoding). Token ids pad 0, bos 2, eos 3
    unless overridden."""
    import transformers as tf

    args = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if kind == "opt":
        args.update(hidden_size=48, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4)
        args.update(max_position_embeddings=128, word_embed_proj_dim=48)
        return tf.OPTConfig(**{**args, **overrides})
    if kind == "llama":
        args.update(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
        args.update(num_key_value_heads=2, max_position_embeddings=128)
        return tf.LlamaConfig(**{**args, **overrides})
    if kind == "t5":
        args.update(d_model=48, d_kv=12, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
        return tf.T5Config(**{**args, "tie_word_embeddings": False, **overrides})
    raise ValueError(f"unknown LM kind {kind!r}: opt, llama or t5")


def assert_same_weights(original: str | Path, written: str | Path) -> None:
    """The model.safetensors of two directories hold the same tensors under the same names, bit for bit
    (an export round trip)."""
    from safetensors.torch import load_file

    a, b = (load_file(str(Path(p) / "model.safetensors")) for p in (original, written))
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every tensor at a scale where a wrong mapping shows in the outputs: matrices
    N(0, 1/fan_in), norm weights 1 +/- 0.2, vectors N(0, 0.2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif name.endswith("weight") and ("norm" in name.lower() or "ln" in name.lower()):
                p.copy_(1 + 0.2 * (torch.rand(p.shape, generator=g) * 2 - 1))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def make_vision(path: str | Path, image_size: int = 32, hidden: int = 32, layers: int = 3, composite: bool = False):
    """A tiny CLIP vision tower (or a whole CLIPModel with composite=True) plus its image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    vcfg = CLIPVisionConfig(
        image_size=image_size,
        patch_size=8,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
    )
    if composite:
        model = CLIPModel(
            CLIPConfig(
                vision_config=vcfg.to_dict(),
                text_config=dict(
                    vocab_size=64,
                    hidden_size=hidden,
                    intermediate_size=2 * hidden,
                    num_hidden_layers=1,
                    num_attention_heads=4,
                ),
                projection_dim=hidden,
            )
        )
    else:
        model = CLIPVisionModel(vcfg)
    model.save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(path)
    return str(path)


def make_lm(path: str | Path, kind: str = "gpt2", hidden: int = 32, layers: int = 2):
    """A tiny causal LM (gpt2, opt, llama) or encoder-decoder LM (t5) with a WordLevel tokenizer."""
    import transformers as tf

    tok = word_tokenizer("lm")
    V, ids = len(tok), dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    if kind == "gpt2":
        model = tf.GPT2LMHeadModel(
            tf.GPT2Config(vocab_size=V, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128, **ids)
        )
    elif kind == "opt":
        model = tf.OPTForCausalLM(
            tf.OPTConfig(
                vocab_size=V,
                hidden_size=hidden,
                num_hidden_layers=layers,
                ffn_dim=2 * hidden,
                num_attention_heads=4,
                max_position_embeddings=128,
                word_embed_proj_dim=hidden,
                **ids,
            )
        )
    elif kind == "llama":
        model = tf.LlamaForCausalLM(
            tf.LlamaConfig(
                vocab_size=V,
                hidden_size=hidden,
                intermediate_size=2 * hidden,
                num_hidden_layers=layers,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=128,
                **ids,
            )
        )
    elif kind == "t5":
        model = tf.T5ForConditionalGeneration(
            tf.T5Config(
                vocab_size=V,
                d_model=hidden,
                d_kv=8,
                d_ff=2 * hidden,
                num_layers=layers,
                num_heads=4,
                decoder_start_token_id=tok.pad_token_id,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        )
    else:
        raise ValueError(f"unknown LM kind {kind!r}")
    randomize_(model, seed=1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def make_qformer_tokenizer(path: str | Path):
    tok = word_tokenizer("bert")
    tok.save_pretrained(path)
    return str(path)


def tiny_blip2_config(root: str | Path, lm: str | None = "gpt2", **qformer):
    """Write tiny backbones under `root` and return a Blip2Config naming them."""
    from vlbridge.core.config import LMConfig, VisionConfig
    from vlbridge.models.blip2.configuration import Blip2Config, QFormerConfig

    root = Path(root)
    vision = make_vision(root / "vision")
    qtok = make_qformer_tokenizer(root / "qformer_tokenizer")
    q = dict(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        num_query_tokens=4,
        cross_attention_frequency=1,
        dropout=0.0,
        attention_dropout=0.0,
    )
    q.update(qformer)
    return Blip2Config(
        vision=VisionConfig(vision, feature_layer=-2),
        qformer=QFormerConfig(**q),
        lm=LMConfig(make_lm(root / f"lm-{lm}", lm)) if lm else None,
        qformer_tokenizer=qtok,
        embed_dim=16,
        max_text_length=16,
    )
