"""Training: only the bridge learns, the frozen backbones stay bit-identical and in eval mode, the
stage-2 loss reads only target tokens, and a tiny batch can be overfitted in every stage."""

import pytest
import torch

CAPTIONS = ["a red circle", "two blue squares above a small triangle", "a green triangle", "yellow square left"]
PROMPTS = ["a photo of", "question what color is the circle ? answer", "how many", "what shape is there ?"]
TARGETS = ["red circle", "blue", "two", "a large yellow square"]
Q = 4

# Parts of a stage-2 model that the LM loss cannot reach (they serve ITC/ITM/ITG only).
TEXT_SIDE = (
    "qformer.word_embeddings.",
    "qformer.position_embeddings.",
    "qformer.lm_head.",
    "vision_proj.",
    "text_proj.",
    "itm_head.",
    "temp",
)


def _text_side(name: str) -> bool:
    return name.startswith(TEXT_SIDE) or ".ffn." in name


def _snapshot(model) -> dict:
    return {
        name: {k: v.clone() for k, v in getattr(model, name).state_dict().items()}
        for name in ("vision", "lm")
        if getattr(model, name) is not None
    }


def _assert_backbones_untouched(model, before):
    for name, state in before.items():
        backbone = getattr(model, name)
        now = backbone.state_dict()
        assert now.keys() == state.keys()
        for k, v in state.items():
            assert torch.equal(now[k], v), f"{name}.{k} changed"
        for p in backbone.parameters():
            assert not p.requires_grad and p.grad is None


def _assert_eval_backbones(model):
    for name in ("vision", "lm"):
        backbone = getattr(model, name)
        if backbone is not None:
            assert not any(m.training for m in backbone.modules()), name


def _stage2_batch(proc, images, n=4):
    return dict(pixel_values=images(n), **proc(text=PROMPTS[:n], targets=TARGETS[:n]))


def _stage1_loss(model, proc, images):
    q = proc.qformer_text(CAPTIONS)
    return model.pretrain_losses(q["input_ids"], q["attention_mask"], pixel_values=images(4)).loss


@pytest.mark.parametrize("lm", [None, "gpt2", "t5"])
def test_steps_train_only_the_bridge(build, images, lm):
    model, proc = build(lm, randomize=lm is not None)
    before = _snapshot(model)
    bridge_before = {k: v.clone() for k, v in model.bridge_state_dict().items()}
    model.train()
    assert model.qformer.training and model.ln_vision.training
    _assert_eval_backbones(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        loss = _stage1_loss(model, proc, images) if lm is None else model(**_stage2_batch(proc, images)).loss
        loss.backward()
        if step == 0:
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                if lm is None or not _text_side(name):  # stage 1 trains everything; stage 2 all but the text side
                    assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
                else:
                    assert p.grad is None, f"{name} should be unreachable from the LM loss"
        opt.step()
    _assert_backbones_untouched(model, before)
    _assert_eval_backbones(model)
    after = model.bridge_state_dict()
    moved = ["qformer.query_tokens", "ln_vision.weight", "qformer.layers.0.crossattention.key.weight"]
    moved += ["vision_proj.weight", "temp"] if lm is None else ["lm_proj.weight"]
    for k in moved:
        assert not torch.equal(after[k], bridge_before[k]), f"{k} did not move"


@pytest.mark.parametrize("lm", ["gpt2", "t5"])
def test_stage2_without_text_branch_every_trainable_param_learns(build, images, lm):
    model, proc = build(lm, randomize=True)
    model.drop_text_branch()
    model.train()
    model(**_stage2_batch(proc, images)).loss.backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and not any(_text_side(n) for n in names)
    assert any(n.startswith("lm_proj.") for n in names) and "qformer.query_tokens" in names
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("lm", [None, "gpt2", "t5"])
def test_parameter_counts_add_up(build, lm):
    model, _ = build(lm)
    counts = model.parameter_counts()
    vision = sum(p.numel() for p in model.vision.parameters())
    lm_params = sum(p.numel() for p in model.lm.parameters()) if model.lm is not None else 0
    bridge = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("vision.", "lm.")))
    assert counts["frozen"] == vision + lm_params > 0
    assert counts["trainable"] == bridge > 0
    assert counts["trainable"] + counts["frozen"] == sum(p.numel() for p in model.parameters())
    before = counts["trainable"]
    model.drop_text_branch()
    assert model.parameter_counts()["trainable"] < before
    assert model.parameter_counts()["frozen"] == counts["frozen"]


def test_train_mode_keeps_backbone_dropout_off(build, images):
    """The tiny LMs have dropout 0.1: if train() reached them, two forward passes would differ."""
    model, proc = build("gpt2", randomize=True)
    assert model.lm.config.resid_pdrop > 0
    batch = _stage2_batch(proc, images, n=2)
    model.train()
    torch.manual_seed(0)
    a = model(**batch).logits
    torch.manual_seed(1)
    b = model(**batch).logits
    assert torch.equal(a, b)
    model.lm.train()  # the opposite case: an LM in train mode is noisy
    torch.manual_seed(1)
    assert not torch.equal(model(**batch).logits, a)
    model.train()
    _assert_eval_backbones(model)
    model.eval()
    assert not model.qformer.training


# ---------------------------------------------------------------------------------- overfitting
def _overfit(model, loss_fn, steps, lr):
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    torch.manual_seed(0)
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_overfit_stage1(build, images):
    model, proc = build(None)
    q = proc.qformer_text(CAPTIONS)
    with torch.no_grad():
        feats = model.vision(images(4))
    parts = []

    def loss_fn():
        out = model.pretrain_losses(q["input_ids"], q["attention_mask"], image_features=feats)
        parts.append((out.loss_itc.item(), out.loss_itg.item()))
        return out.loss

    losses = _overfit(model, loss_fn, steps=100, lr=1e-3)
    assert all(map(lambda x: x == x, losses))  # no NaN on the way
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert parts[-1][0] < 0.5 * parts[0][0] and parts[-1][1] < 0.5 * parts[0][1]  # ITC and ITG both learn


@pytest.mark.parametrize("lm", ["gpt2", "t5"])
def test_overfit_stage2(build, images, lm):
    model, proc = build(lm)
    model.drop_text_branch()
    batch = proc(text=["a photo of"] * 4, targets=["red", "blue", "green", "yellow"])  # the image decides
    with torch.no_grad():
        feats = model.vision(images(4))
    losses = _overfit(model, lambda: model(image_features=feats, **batch).loss, steps=100, lr=3e-3)
    assert losses[-1] < 0.5 * losses[0], losses[::10]


# ---------------------------------------------------------------------------------- stage-2 loss
def test_decoder_only_loss_reads_only_targets(build, images):
    model, proc = build("gpt2", randomize=True)
    batch = _stage2_batch(proc, images)
    labels, mask = batch["labels"], batch["attention_mask"]
    out = model(**batch)
    B, T = labels.shape
    assert out.logits.shape == (B, Q + T, len(proc.tokenizer))
    assert ((labels == -100) | (mask == 1)).all() and (labels[mask == 0] == -100).all()

    def by_hand(lab):
        logp = out.logits.float().log_softmax(-1)
        terms = [-logp[b, Q + t - 1, lab[b, t]] for b in range(B) for t in range(T) if lab[b, t] != -100]
        return torch.stack(terms).mean()

    assert torch.allclose(out.loss, by_hand(labels), atol=1e-5)
    # the same text with the prompt counted as a target: the -100s are what kept it out
    with_prompt = torch.where(mask == 1, batch["input_ids"], -100)
    loss_with_prompt = model(**{**batch, "labels": with_prompt}).loss
    assert torch.allclose(loss_with_prompt, by_hand(with_prompt), atol=1e-5)
    assert abs(loss_with_prompt.item() - out.loss.item()) > 1e-3
    # left padding is invisible: other token ids there give the same loss, unless the mask shows them
    assert (mask == 0).any()
    other_pads = batch["input_ids"].masked_fill(mask == 0, proc.tokenizer.convert_tokens_to_ids("red"))
    assert torch.allclose(model(**{**batch, "input_ids": other_pads}).loss, out.loss, atol=1e-6)
    shown = {**batch, "input_ids": other_pads, "attention_mask": torch.ones_like(mask)}
    assert abs(model(**shown).loss.item() - out.loss.item()) > 1e-3


def test_encoder_decoder_loss_reads_only_targets(build, images):
    model, proc = build("t5", randomize=True)
    batch = _stage2_batch(proc, images)
    labels = batch["labels"]
    out = model(**batch)
    # decoder logits line up with the labels: the queries went to the encoder, not into the targets
    assert out.logits.shape == (4, labels.shape[1], len(proc.tokenizer))
    logp = out.logits.float().log_softmax(-1)
    terms = [-logp[b, t, labels[b, t]] for b in range(4) for t in range(labels.shape[1]) if labels[b, t] != -100]
    assert torch.allclose(out.loss, torch.stack(terms).mean(), atol=1e-5)
    # the decoder reads the labels shifted right behind the start token: teacher forcing by hand
    start = model.lm.config.decoder_start_token_id
    dec = torch.cat([torch.full((4, 1), start), labels[:, :-1].clamp(min=0)], dim=1)
    inputs_embeds, enc_mask, _, _ = model.lm_inputs(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    ref = model.lm(inputs_embeds=inputs_embeds, attention_mask=enc_mask, decoder_input_ids=dec).logits
    assert torch.allclose(out.logits, ref, atol=1e-5)


@pytest.mark.parametrize("lm", ["gpt2", "t5"])
def test_all_labels_ignored_is_an_error(build, images, lm):
    model, proc = build(lm)
    batch = _stage2_batch(proc, images, n=2)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    with pytest.raises(ValueError, match="-100"):
        model(**batch)
