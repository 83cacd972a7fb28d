"""Parity with LAVIS 1.0.2's BLIP-2: checkpoints LAVIS writes load into vlbridge and give the same query
outputs, ITC similarities, ITM logits, losses, retrieval scores and LM logits; export writes them back
tensor for tensor; the LAVIS training mode draws LAVIS' hard negatives and leaves the temperature alone.

The references are LAVIS' own model files (blip2_qformer.py, blip2_opt.py, blip2_t5.py, Qformer.py,
eva_vit.py, blip2.py, base_model.py), loaded by path from the installed package without its __init__
files (they import every model and dataset). What they reach for outside those files is provided here:
the transformers-4 helpers that transformers 5 moved or dropped, small stand-ins for timm's three
helpers, no-op registries, and downloads that fail. `init_tokenizer` / `init_Qformer` /
`init_vision_encoder` are overridden to build tiny models locally (BertLMHeadModel and EVA's
VisionTransformer from LAVIS' files, not downloaded); the LLMs are transformers' OPT / T5 (LAVIS' own
copies, modeling_opt.py / modeling_t5.py, are transformers-4 code that does not run under transformers 5),
which is also what vlbridge loads. Every tensor is re-drawn at a sensitive scale (`randomize_`), and each
comparison is shown to fail when one mapped tensor is off by 1%.
"""

import importlib.util
import sys
import types
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers as tf
from torch import nn

import vlbridge
from vlbridge import Blip2
from vlbridge.models.blip2.pretraining import sample_hard_negatives
from vlbridge.testing import make_lm, randomize_, word_tokenizer

TEXTS = ["a red circle", "two blue squares above a small triangle", "a green triangle", "one large yellow square"]
TOL = 1e-4
WIDTH, QW, Q, HEADS = 24, 32, 4, 4  # EVA width, Q-Former width, queries, heads (both)


# ---------------------------------------------------------------------------------- LAVIS by path
def _module(mp, name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    mp.setitem(sys.modules, name, module)
    return module


def _file(mp, root, name, relative):
    spec = importlib.util.spec_from_file_location(name, root / relative)
    module = importlib.util.module_from_spec(spec)
    mp.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


class _Registry:
    @staticmethod
    def register_model(name):
        return lambda cls: cls


class _Tokenizers:
    """transformers' AutoTokenizer / T5TokenizerFast as LAVIS calls them, for the tiny fast tokenizers."""

    @staticmethod
    def from_pretrained(path, **_):
        return tf.PreTrainedTokenizerFast.from_pretrained(path)


def _no_download(*args, **kwargs):
    raise RuntimeError("no downloads in tests")


@pytest.fixture(scope="module")
def lavis(tmp_path_factory):
    """LAVIS' BLIP-2 modules, and a one-process gloo group for Blip2Qformer.forward's dist.get_rank()."""
    spec = importlib.util.find_spec("lavis")
    if spec is None:
        pytest.skip("salesforce-lavis is not installed (make installs it with --no-deps)")
    root = Path(spec.submodule_search_locations[0])
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    with pytest.MonkeyPatch.context() as mp:
        for name in ("apply_chunking_to_forward", "prune_linear_layer"):  # moved to pytorch_utils
            mp.setattr(mu, name, getattr(pu, name), raising=False)
        mp.setattr(mu, "find_pruneable_heads_and_indices", _no_download, raising=False)  # never called
        for pkg in ("lavis", "lavis.common", "lavis.models", "lavis.models.blip2_models", "lavis.models.blip_models"):
            _module(mp, pkg, __path__=[])  # packages without their __init__
        _module(mp, "lavis.common.registry", registry=_Registry())
        _module(
            mp,
            "lavis.common.dist_utils",
            download_cached_file=_no_download,
            is_dist_avail_and_initialized=lambda: dist.is_available() and dist.is_initialized(),
            get_rank=lambda: dist.get_rank(),
            get_world_size=lambda: dist.get_world_size(),
        )
        _module(mp, "lavis.common.utils", is_url=lambda s: False, get_abs_path=lambda p: p)
        _module(mp, "lavis.common.logger", MetricLogger=lambda **_: types.SimpleNamespace(log_every=lambda x, *a: x))
        _module(mp, "omegaconf", OmegaConf=None)  # base_model.py imports it for its config helpers only
        _module(mp, "lavis.models.clip_vit", create_clip_vit_L=_no_download)
        _module(mp, "timm", __path__=[])
        _module(mp, "timm.models", __path__=[])
        _module(
            mp,
            "timm.models.layers",
            drop_path=lambda x, p, training: x,  # drop_path_rate is 0
            to_2tuple=lambda x: (x, x),
            trunc_normal_=lambda t, std=1.0: nn.init.trunc_normal_(t, std=std),
        )
        _module(mp, "timm.models.registry", register_model=lambda f: f)
        _module(mp, "lavis.models.blip2_models.modeling_opt", OPTForCausalLM=tf.OPTForCausalLM, OPTConfig=tf.OPTConfig)
        _module(
            mp,
            "lavis.models.blip2_models.modeling_t5",
            T5ForConditionalGeneration=tf.T5ForConditionalGeneration,
            T5Config=tf.T5Config,
        )
        m = types.SimpleNamespace()
        _file(mp, root, "lavis.models.base_model", "models/base_model.py")
        m.eva = _file(mp, root, "lavis.models.eva_vit", "models/eva_vit.py")
        _file(mp, root, "lavis.models.blip_models.blip_outputs", "models/blip_models/blip_outputs.py")
        m.bert = _file(mp, root, "lavis.models.blip2_models.Qformer", "models/blip2_models/Qformer.py")
        m.blip2 = _file(mp, root, "lavis.models.blip2_models.blip2", "models/blip2_models/blip2.py")
        m.qformer = _file(mp, root, "lavis.models.blip2_models.blip2_qformer", "models/blip2_models/blip2_qformer.py")
        m.opt = _file(mp, root, "lavis.models.blip2_models.blip2_opt", "models/blip2_models/blip2_opt.py")
        m.t5 = _file(mp, root, "lavis.models.blip2_models.blip2_t5", "models/blip2_models/blip2_t5.py")
        mp.setattr(m.opt, "AutoTokenizer", _Tokenizers)
        mp.setattr(m.t5, "T5TokenizerFast", _Tokenizers)
        # transformers-4 ModuleUtilsMixin helpers that LAVIS' BertModel calls
        mp.setattr(m.bert.BertModel, "get_head_mask", lambda self, mask, n: [None] * n, raising=False)
        mp.setattr(m.bert.BertModel, "invert_attention_mask", _invert_attention_mask, raising=False)
        mp.setattr(m.bert.BertPreTrainedModel, "init_weights", lambda self: self.apply(self._init_weights))
        own_group = not dist.is_initialized()
        if own_group:
            store = tmp_path_factory.mktemp("gloo") / "store"  # a file, not a port another test may hold
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        try:
            yield m
        finally:
            if own_group:
                dist.destroy_process_group()


def _invert_attention_mask(self, mask):
    mask = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
    return (1.0 - mask.to(self.dtype)) * torch.finfo(self.dtype).min


def _tiny(lavis, cls, tok, **kwargs):
    """A LAVIS BLIP-2 model of class `cls` built from LAVIS' modules at a tiny size (no downloads)."""

    class Tiny(cls):
        @classmethod
        def init_tokenizer(cls):
            return tok

        @classmethod
        def init_vision_encoder(cls, *args):
            vit = lavis.eva.VisionTransformer(
                img_size=16,
                patch_size=8,
                embed_dim=WIDTH,
                depth=2,
                num_heads=HEADS,
                mlp_ratio=2.0,
                qkv_bias=True,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),  # create_eva_vit_g's
            )
            return vit, lavis.blip2.LayerNorm(WIDTH)

        @classmethod
        def init_Qformer(cls, num_query_token, vision_width, cross_attention_freq=2):
            config = lavis.bert.BertConfig(
                vocab_size=len(tok),
                hidden_size=QW,
                num_hidden_layers=3,
                num_attention_heads=HEADS,
                intermediate_size=48,
                max_position_embeddings=40,
            )
            config.encoder_width, config.add_cross_attention = vision_width, True
            config.cross_attention_freq, config.query_length = cross_attention_freq, num_query_token
            qformer = lavis.bert.BertLMHeadModel(config)
            qformer.cls.predictions.decoder.weight = qformer.bert.embeddings.word_embeddings.weight  # tied
            qformer.resize_token_embeddings = lambda n: None  # the table already holds [DEC]
            return qformer, nn.Parameter(torch.zeros(1, num_query_token, QW))

    model = Tiny(num_query_token=Q, img_size=16, **kwargs)
    lms = ("opt_model", "t5_model")  # the LLM keeps the weights saved in its directory
    randomize_(nn.ModuleDict({n: c for n, c in model.named_children() if n not in lms}), seed=1)
    with torch.no_grad():
        model.query_tokens.copy_(torch.randn(model.query_tokens.shape, generator=torch.Generator().manual_seed(2)))
    return model.float().eval()


def _save(model, path, trainer_layout: bool):
    """torch.save as LAVIS' runner does: the trainer drops frozen parameters (keeps buffers), and adds
    the optimizer, config and epoch beside "model"."""
    state = model.state_dict()
    if trainer_layout:
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        state = {k: v for k, v in state.items() if k not in frozen}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad][:2])
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "config": {"arch": "blip2"}, "epoch": 3}, path)
    return state


def _images(n, seed=0):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    tok = word_tokenizer("bert")
    tok.add_special_tokens({"bos_token": "[DEC]"})  # BERT + [DEC], as LAVIS' init_tokenizer makes it
    path = tmp_path_factory.mktemp("qtok")
    tok.save_pretrained(path)
    return path, tok


@pytest.fixture(scope="module")
def stage1(lavis, tokenizer_dir, tmp_path_factory):
    """LAVIS' Blip2Qformer saved whole (its EVA-ViT in the file), its temperature within the clamp."""
    model = _tiny(lavis, lavis.qformer.Blip2Qformer, tokenizer_dir[1], cross_attention_freq=2, embed_dim=16)
    model.max_txt_len = 12
    with torch.no_grad():
        model.temp.fill_(0.3)
    path = tmp_path_factory.mktemp("lavis") / "blip2.pth"
    return model, path, _save(model, path, trainer_layout=False)


def _load(path, tokenizer_dir, **kwargs):
    return vlbridge.load(
        path, device="cpu", qformer_tokenizer=str(tokenizer_dir[0]), num_heads=HEADS, vision_heads=HEADS, **kwargs
    )


class _Loader(list):
    """What LAVIS' compute_sim_matrix reads from a data loader: batches and dataset.text / dataset.image."""

    def __init__(self, images):
        super().__init__([{"image": images}])
        self.dataset = types.SimpleNamespace(text=TEXTS, image=list(range(len(images))))


def _outputs(model, lavis, px, tok):
    """Everything a stage-1 model computes, from LAVIS' code or vlbridge's, as a dict of tensors."""
    short = tok(TEXTS, padding=True, return_tensors="pt")  # extract_features' tokenisation
    ids, mask = short["input_ids"], short["attention_mask"]
    padded = tok(TEXTS, padding="max_length", max_length=12, return_tensors="pt")  # forward's (max_txt_len 12)
    if isinstance(model, Blip2):
        feats = model.extract_features(ids, mask, pixel_values=px)
        retrieval = model.retrieval_scores(ids, mask, pixel_values=px, k=2, rerank="lavis")
        losses = model.pretrain_losses(padded["input_ids"], padded["attention_mask"], pixel_values=px)
        return {
            "query outputs": feats.image_embeds,
            "image features": feats.image_embeds_proj,
            "text features": feats.text_embeds_proj,
            "multimodal": feats.multimodal_embeds,
            "ITC": model.itc(ids, mask, pixel_values=px),
            "ITM match logit": model.itm(ids, mask, pixel_values=px)[:, 1],
            "retrieval i2t": retrieval.i2t.masked_fill(retrieval.i2t.isinf(), -100),  # LAVIS' fill
            "retrieval t2i": retrieval.t2i.masked_fill(retrieval.t2i.isinf(), -100),
            "ITC loss": losses.loss_itc,
            "ITG loss": losses.loss_itg,
        }
    samples = {"image": px, "text_input": TEXTS}
    with torch.no_grad():
        image = model.extract_features(samples, mode="image")
        text = model.extract_features(samples, mode="text")
        both = model.extract_features(samples, mode="multimodal")
        _, vit = model.forward_image(px)
        i2t, t2i = lavis.blip2.compute_sim_matrix(model, _Loader(px), k_test=2)
        out = model(samples)
    return {
        "query outputs": image.image_embeds,
        "image features": image.image_embeds_proj,
        "text features": text.text_embeds_proj[:, 0],
        "multimodal": both.multimodal_embeds,
        "ITC": torch.einsum("bqe,te->btq", image.image_embeds_proj, text.text_embeds_proj[:, 0]).amax(-1),
        "ITM match logit": model.compute_itm(vit, ids, mask),
        "retrieval i2t": torch.from_numpy(i2t),
        "retrieval t2i": torch.from_numpy(t2i),
        "ITC loss": out.loss_itc,
        "ITG loss": out.loss_lm,
    }


def _max_diff(ours: dict, ref: dict) -> dict:
    return {k: (ours[k].float() - ref[k].float()).abs().max().item() for k in ref}


@pytest.fixture(scope="module")
def stage1_reference(lavis, stage1, tokenizer_dir):
    return _outputs(stage1[0], lavis, _images(4), tokenizer_dir[1])


def test_stage1_matches_lavis(lavis, stage1, stage1_reference, tokenizer_dir):
    reference, path = stage1[0], stage1[1]
    model, processor = _load(path, tokenizer_dir)
    assert model.config.qformer.cross_attention_frequency == 2 and model.config.qformer.num_layers == 3
    assert model.config.embed_dim == 16 and model.ln_vision.eps == 1e-5 and model.config.vision.name_or_path == ""
    assert torch.equal(model.temp, reference.temp)
    q = processor.qformer_text(TEXTS)  # BERT + [DEC]; the same ids as LAVIS' tokenizer
    assert torch.equal(q["input_ids"], tokenizer_dir[1](TEXTS, padding=True, return_tensors="pt")["input_ids"])
    assert processor.images([torch.rand(20, 30, 3).numpy()]).shape == (1, 3, 16, 16)  # LAVIS' eval size
    diffs = _max_diff(_outputs(model, lavis, _images(4), tokenizer_dir[1]), stage1_reference)
    print("stage 1 max |diff|:", {k: f"{v:.1e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= TOL, diffs
    assert stage1_reference["ITM match logit"].std() > 0.1 and stage1_reference["ITC"].std() > 0.05


@pytest.mark.parametrize(
    "key",
    [
        "Qformer.bert.encoder.layer.2.crossattention.self.key.weight",
        "visual_encoder.blocks.1.attn.q_bias",
        "Qformer.cls.predictions.transform.dense.weight",
        "itm_head.weight",
    ],
)
def test_one_percent_off_fails_the_comparison(lavis, stage1, stage1_reference, tokenizer_dir, tmp_path, key):
    state = dict(stage1[2])
    state[key] = state[key] * 1.01
    torch.save({"model": state}, tmp_path / "off.pth")
    model, _ = _load(tmp_path / "off.pth", tokenizer_dir)
    diffs = _max_diff(_outputs(model, lavis, _images(4), tokenizer_dir[1]), stage1_reference)
    print(f"{key} x 1.01: max |diff| {max(diffs.values()):.1e}")
    assert max(diffs.values()) > 2 * TOL, diffs  # the same comparison, failing


def test_lavis_training_mode_draws_lavis_negatives_and_keeps_the_temperature(lavis, stage1, tokenizer_dir, tmp_path):
    """With itc_temperature_clamp off and hard_negatives "lavis", one stage-1 step gives LAVIS' three losses
    under the same RNG state: the same hard negatives (ITM), the unclamped temperature (ITC)."""
    reference, _, state = stage1
    state = dict(state, temp=torch.tensor(0.8))  # beyond vlbridge's default clamp (0.5)
    torch.save({"model": state}, tmp_path / "hot.pth")
    model, _ = _load(tmp_path / "hot.pth", tokenizer_dir)
    px = _images(6, seed=1)
    texts = TEXTS + ["three small squares", "a circle left of a square"]
    batch = tokenizer_dir[1](texts, padding="max_length", max_length=12, return_tensors="pt")
    with torch.no_grad():
        reference.temp.fill_(0.8)
        try:
            torch.manual_seed(5)
            ref = reference({"image": px, "text_input": texts})
        finally:
            reference.temp.fill_(0.3)
    ours = {}
    for clamp, rule in ((True, "exclude_positives"), (False, "lavis")):
        model.config.itc_temperature_clamp, model.config.hard_negatives = clamp, rule
        torch.manual_seed(5)
        ours[rule] = model.pretrain_losses(batch["input_ids"], batch["attention_mask"], pixel_values=px)
    lavis_mode = ours["lavis"]
    diffs = {
        k: abs(getattr(lavis_mode, f"loss_{k}").item() - getattr(ref, f"loss_{n}").item())
        for k, n in (("itc", "itc"), ("itm", "itm"), ("itg", "lm"))
    }
    print("LAVIS mode, max |loss diff|:", {k: f"{v:.1e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= TOL, diffs
    assert abs(ours["exclude_positives"].loss_itc.item() - ref.loss_itc.item()) > 1e-2  # the default clamps at 0.5


def test_lavis_hard_negative_rule():
    sim = torch.randn(5, 5, generator=torch.Generator().manual_seed(0)) * 3
    same = torch.eye(5, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True  # samples 0 and 1 show the same image
    draws = torch.stack(
        [sample_hard_negatives(sim, same, torch.Generator().manual_seed(s), "lavis")[0] for s in range(400)]
    )
    assert not (draws == torch.arange(5)).any()  # never the row's own pair
    assert (draws[:, 0] == 1).any()  # but another positive can be drawn (LAVIS masks the diagonal only)
    weights = sim.softmax(1) + 1e-4
    weights.fill_diagonal_(0)
    g = torch.Generator().manual_seed(7)
    expected = torch.cat([torch.multinomial(w, 1, generator=g) for w in weights])  # one draw per row, in order
    index, valid = sample_hard_negatives(sim, same, torch.Generator().manual_seed(7), "lavis")
    assert torch.equal(index, expected) and valid.all()
    index, valid = sample_hard_negatives(sim[:1, :1], same[:1, :1], None, "lavis")
    assert not valid.any()  # a global batch of one has no negative
    with pytest.raises(ValueError, match="hard-negative rule"):
        sample_hard_negatives(sim, same, None, "nearest")


def test_training_mode_is_validated_when_read():
    from vlbridge.core.config import ConfigError, from_dict
    from vlbridge.models.blip2.configuration import Blip2Config

    cfg = from_dict(Blip2Config, {"hard_negatives": "lavis", "itc_temperature_clamp": False})
    assert cfg.hard_negatives == "lavis" and not cfg.itc_temperature_clamp
    with pytest.raises(ConfigError, match="Blip2Config: hard_negatives 'random'"):
        from_dict(Blip2Config, {"hard_negatives": "random"})


def test_export_round_trip_is_exact_and_lavis_reads_it(lavis, stage1, tokenizer_dir, tmp_path):
    reference, path, original = stage1
    model, _ = _load(path, tokenizer_dir)
    model.save_pretrained(tmp_path / "back.pth", format="lavis")
    written = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
    assert written.keys() == original.keys()
    assert all(torch.equal(written[k], original[k]) for k in original)
    fresh = _tiny(lavis, lavis.qformer.Blip2Qformer, tokenizer_dir[1], cross_attention_freq=2, embed_dim=16)
    fresh.load_state_dict(written, strict=True)  # LAVIS takes it back whole
    model.save_pretrained(tmp_path / "dir", format="lavis")  # a directory: checkpoint.pth inside, loadable as is
    again, _ = _load(tmp_path / "dir", tokenizer_dir)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


# ---------------------------------------------------------------------------------- stage 2
@pytest.fixture(scope="module", params=["opt", "t5"])
def stage2(request, lavis, tokenizer_dir, tmp_path_factory):
    """LAVIS' Blip2OPT / Blip2T5 on a tiny random LM, saved with its EVA-ViT, without its LM (named by lm=)."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"lavis-{kind}")
    lm_dir = make_lm(root / "lm", kind)
    lm = (tf.AutoModelForSeq2SeqLM if kind == "t5" else tf.AutoModelForCausalLM).from_pretrained(lm_dir)
    if kind == "opt":  # Blip2OPT ends every text with "\n" and stops generating there: give it a token
        tok = tf.AutoTokenizer.from_pretrained(lm_dir)
        tok.add_tokens(["\n"])
        tok.save_pretrained(lm_dir)
        lm.resize_token_embeddings(len(tok))
    randomize_(lm, seed=2)
    low = torch.bfloat16 if kind == "t5" else torch.float16  # LAVIS casts its LLM: keep that cast lossless
    with torch.no_grad():
        for p in lm.parameters():
            p.copy_(p.to(low).float())
    lm.save_pretrained(lm_dir)
    cls = lavis.t5.Blip2T5 if kind == "t5" else lavis.opt.Blip2OPT
    model = _tiny(lavis, cls, tokenizer_dir[1], **{f"{kind}_model": lm_dir})
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(f"{kind}_model.")}
    torch.save({"model": state}, root / f"blip2_{kind}.pth")
    return kind, model, root, lm_dir, state


PROMPTS = ["a photo of", "question what color", "how many", "a"]  # T5's encoder text


def _lavis_lm_outputs(model, px, kind):
    """LM logits at the text positions and the LM loss of LAVIS' forward, with the LM's own call recorded."""
    seen = {}

    def record(module, args, kwargs, output):
        seen.update(kwargs, logits=output.logits)

    hook = (model.t5_model if kind == "t5" else model.opt_model).register_forward_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            loss = model({"image": px, "text_input": PROMPTS if kind == "t5" else TEXTS, "text_output": TEXTS})["loss"]
    finally:
        hook.remove()
    mask = seen["decoder_attention_mask"] if kind == "t5" else seen["attention_mask"]
    return {"logits": seen["logits"][mask.bool()], "loss": loss}, seen


def test_stage2_matches_lavis(lavis, stage2, tokenizer_dir, tmp_path):
    kind, reference, root, lm_dir, state = stage2
    px = _images(4)
    ref, seen = _lavis_lm_outputs(reference, px, kind)
    model, processor = vlbridge.load(
        root / f"blip2_{kind}.pth", device="cpu", lm=lm_dir, num_heads=HEADS, vision_heads=HEADS
    )
    assert (
        model.lm is not None
        and not model.config.qformer.text_branch
        and model.config.lm.is_encoder_decoder == (kind == "t5")
    )
    assert processor.tokenizer is not None and processor.qformer_tokenizer is None

    def ours(m):
        if kind == "t5":
            enc = reference.t5_tokenizer(PROMPTS, padding="longest", return_tensors="pt")
            out = m(
                pixel_values=px,
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                labels=seen["labels"],
                decoder_attention_mask=seen["decoder_attention_mask"],
            )
            mask = seen["decoder_attention_mask"]
        else:
            text = reference.opt_tokenizer([t + "\n" for t in TEXTS], padding="longest", return_tensors="pt")
            out = m(
                pixel_values=px,
                input_ids=text["input_ids"],
                attention_mask=text["attention_mask"],
                labels=seen["labels"][:, Q:],
            )
            mask = seen["attention_mask"]
        return {"logits": out.logits[mask.bool()], "loss": out.loss}

    diffs = _max_diff(ours(model), ref)
    print(f"blip2_{kind} max |diff|:", {k: f"{v:.1e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= TOL, diffs
    assert ref["logits"].std() > 0.1  # not a degenerate comparison

    # 1% off in the projection into the LM: the same comparison fails
    off = dict(state)
    off[f"{kind}_proj.weight"] = off[f"{kind}_proj.weight"] * 1.01
    torch.save({"model": off}, tmp_path / "off.pth")
    wrong, _ = vlbridge.load(tmp_path / "off.pth", device="cpu", lm=lm_dir, num_heads=HEADS, vision_heads=HEADS)
    assert max(_max_diff(ours(wrong), ref).values()) > 2 * TOL

    # the export writes the file back tensor for tensor (the LM stays out, as LAVIS' trainer leaves it)
    model.save_pretrained(tmp_path / "back.pth", format="lavis")
    written = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
    assert written.keys() == state.keys() and all(torch.equal(written[k], state[k]) for k in state)


# ---------------------------------------------------------------------------------- layouts and bad files
def test_trainer_layout_with_the_tower_named(lavis, stage1, tokenizer_dir, tmp_path):
    """LAVIS' trainer drops the frozen EVA-ViT: the tower comes from vision= (here the one the full file held,
    saved in transformers' format), and the export leaves it out again."""
    reference, path, _ = stage1
    full, _ = _load(path, tokenizer_dir)
    full.vision.save_pretrained(tmp_path / "tower")
    tf.BlipImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "tower")
    trained = _save(reference, tmp_path / "trained.pth", trainer_layout=True)
    assert not any(k.startswith("visual_encoder.") for k in trained)
    with pytest.raises(ValueError, match=r"no vision tower in the file .*pass vision="):
        _load(tmp_path / "trained.pth", tokenizer_dir)
    model, processor = _load(tmp_path / "trained.pth", tokenizer_dir, vision=str(tmp_path / "tower"))
    px, q = _images(3), processor.qformer_text(TEXTS[:3])
    ids, mask = q["input_ids"], q["attention_mask"]
    assert torch.equal(model.itm(ids, mask, pixel_values=px), full.itm(ids, mask, pixel_values=px))
    assert processor.image_processor.size == {"height": 16, "width": 16}
    model.save_pretrained(tmp_path / "back.pth", format="lavis")
    written = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
    assert written.keys() == trained.keys() and all(torch.equal(written[k], trained[k]) for k in trained)
    stage2 = Blip2.from_pretrained(tmp_path / "trained.pth", lm=None, load_vision=False)  # Blip2's own entry
    assert stage2.vision is None and stage2.config.qformer.num_heads == 1  # width 32 / 64 rounds up to 1 head


class _Opaque:  # what an old checkpoint may pickle beside its tensors (an argparse namespace, a config object)
    pass


@pytest.mark.parametrize(
    "content, message",
    [
        ({"model": {"query_tokens": torch.zeros(1)}, "args": _Opaque()}, r"weights_only=True.*never unpickles"),
        ({"state_dict": {}}, r"no 'model' state dict \(found \['state_dict'\]\)"),
        ({"model": {"query_tokens": "not a tensor"}}, r"model\['query_tokens'\] is not a tensor"),
    ],
    ids=["needs-full-unpickling", "no-model", "not-tensors"],
)
def test_unreadable_files_are_one_clear_error(tmp_path, content, message):
    torch.save(content, tmp_path / "x.pth")
    with pytest.raises(ValueError, match=message):
        Blip2.from_pretrained(tmp_path / "x.pth")


def test_unknown_missing_and_needed_parts_are_named(stage1, stage2, tmp_path, tokenizer_dir):
    state = dict(stage1[2])
    state["Qformer.bert.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(2)
    del state["Qformer.bert.encoder.layer.1.output_query.dense.bias"]
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        _load(tmp_path / "bad.pth", tokenizer_dir)
    text = str(err.value)
    assert "unknown key 'Qformer.bert.encoder.layer.0.attention.self.rotary.weight'" in text
    assert "missing key 'Qformer.bert.encoder.layer.1.output_query.dense.bias'" in text
    assert "torch.save({'model': state_dict})" in text and "\n" not in text
    kind, _, root, _, _ = stage2
    with pytest.raises(ValueError, match=rf"a blip2_{kind} checkpoint: pass lm="):
        vlbridge.load(root / f"blip2_{kind}.pth", num_heads=HEADS, vision_heads=HEADS)
    (tmp_path / "two").mkdir()
    for name in ("a.pth", "b.pth"):
        torch.save({"model": {}}, tmp_path / "two" / name)
    with pytest.raises(ValueError, match=r"holds 2 \.pth files"):
        vlbridge.load(tmp_path / "two")


def test_cli_reports_a_bad_file_in_one_line(tmp_path, capsys):
    from vlbridge.cli import main

    torch.save({"weights": {}}, tmp_path / "x.pth")
    with pytest.raises(SystemExit) as exit_:
        main(["caption", str(tmp_path / "x.pth"), str(tmp_path / "image.png")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "no 'model' state dict" in err and len(err.splitlines()) == 1
