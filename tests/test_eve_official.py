"""EVE against the official code (baaivision/EVE, EVEv1), loaded by path, unchanged, from
../shared/reference-code/EVEv1: our patch embedding against `VisionTokenizer` + `mm_projector`, our
official PAL against `VisionCompressor`, and a whole `EVELlamaForCausalLM` checkpoint imported,
compared (logits, greedy ids) and exported back. Every tensor is re-drawn at a scale where a wrong
mapping shows (matrices ~N(0, 1/fan_in), norm weights 1 +/- 0.2, biases N(0, 0.2)), and each
comparison is shown to fail when one mapped tensor is off by 1%.

Tiny sizes (no downloads): LLaMA 32 wide with 8 layers (the official PAL reads layers 8, 4, 0), patch
embedding 16 wide with EVE's 8 heads, 4-px patches (8-px cells), 32-px images; the teacher is the
conftest CLIP tower (32 px, 8-px patches: a 4x4 grid).
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vlbridge
from vlbridge import LMConfig, VisionConfig
from vlbridge.models.eve.configuration import EVEConfig
from vlbridge.models.eve.convert_official import KEY_MAP
from vlbridge.models.eve.modeling import EVE, create_eve
from vlbridge.testing import make_lm, randomize_, word_tokenizer

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference-code" / "EVEv1"
IMAGE_TOKEN_INDEX = -200  # EVE's placeholder id in input_ids
SIZES = [(32, 32), (32, 16), (16, 32), (8, 24)]  # (width, height): square, wide, tall, one column
PROMPTS = ["<image> a photo of", "what color is the circle ?", "<image> how many", "red"]


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def official():
    """EVE's modules by path: `eve`, `eve.model`, ... as namespace packages over the reference folder
    (their __init__ files import encoders that are not there), the CLIP teacher builder stubbed."""
    if not REFERENCE.is_dir():
        pytest.skip(f"{REFERENCE} is missing")
    before = set(sys.modules)
    for name in ("eve", "eve.model", "eve.model.multimodal_encoder", "eve.model.multimodal_projector"):
        module = types.ModuleType(name)
        module.__path__ = [str(REFERENCE / name.replace(".", "/"))]
        sys.modules[name] = module
    sys.modules["eve.model.language_model"] = types.ModuleType("eve.model.language_model")
    sys.modules["eve.model.language_model"].__path__ = [str(REFERENCE / "eve/model/language_model")]
    builder = types.ModuleType("eve.model.multimodal_encoder.builder")
    builder.build_vision_tower = lambda *a, **k: pytest.fail("the official CLIP teacher is not used here")
    sys.modules[builder.__name__] = builder
    yield SimpleNamespace(
        tokenizer=importlib.import_module("eve.model.multimodal_encoder.vision_tokenizer"),
        projector=importlib.import_module("eve.model.multimodal_projector.builder"),
        llama=importlib.import_module("eve.model.language_model.eve_llama"),
    )
    for name in set(sys.modules) - before:
        if name == "eve" or name.startswith("eve."):
            del sys.modules[name]


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory) -> Path:
    """What EVE's `mm_vision_tower` names: a preprocessor config with its patch and conv strides."""
    path = tmp_path_factory.mktemp("eve-processor")
    pre = {"image_processor_type": "CLIPImageProcessor", "patch_stride": 4, "conv_stride": 2, "image_size": 32}
    (path / "preprocessor_config.json").write_text(json.dumps({**pre, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    return path


@pytest.fixture(scope="module")
def deep_lm(tmp_path_factory) -> str:
    return make_lm(tmp_path_factory.mktemp("llama8") / "lm", "llama", hidden=32, layers=8)


def pictures(sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def with_mask(pixel_values, image_sizes):
    """EVE's image input: the pixels plus a fourth channel, 1 where the image is."""
    mask = torch.zeros_like(pixel_values[:, :1])
    for b, (h, w) in enumerate(image_sizes.tolist()):
        mask[b, :, :h, :w] = 1
    return torch.cat([pixel_values, mask], 1)


def official_ids(input_ids, attention_mask, image_id):
    """Our expanded ids of one row -> EVE's: the run of image ids becomes one IMAGE_TOKEN_INDEX."""
    ids = input_ids[attention_mask.bool()].tolist()
    if image_id in ids:
        start, n = ids.index(image_id), ids.count(image_id)
        ids[start : start + n] = [IMAGE_TOKEN_INDEX]
    return torch.tensor([ids])


def perturbed(module, name, factor=1.01):
    """A context in which parameter `name` of `module` is scaled by `factor`."""

    class _Ctx:
        def __enter__(self):
            self.p = module.get_parameter(name)
            self.saved = self.p.detach().clone()
            with torch.no_grad():
                self.p.mul_(factor)

        def __exit__(self, *exc):
            with torch.no_grad():
                self.p.copy_(self.saved)

    return _Ctx()


# ---------------------------------------------------------------------------------- patch embedding
@pytest.fixture(scope="module")
def pel_pair(official, processor_dir, tiny_configs):
    """Our EVE (patch embedding re-drawn) and EVE's VisionTokenizer + mm_projector holding its tensors."""
    config = EVEConfig(
        lm=LMConfig(tiny_configs["llama"].lm.name_or_path), patch_size=4, pel_width=16, pel_heads=8, max_image_size=32
    )
    model, processor = create_eve(config)
    randomize_(model.pel, seed=5)
    H = model.lm.config.hidden_size
    tower = official.tokenizer.VisionTokenizer(16, H, str(processor_dir))
    projector = official.projector.build_vision_projector(
        SimpleNamespace(mm_projector_type="mlp2x_gelu", mm_hidden_size=16, hidden_size=H)
    )
    theirs = {KEY_MAP.to_theirs(f"pel.{k}"): v for k, v in model.pel.state_dict().items()}
    theirs["model.vision_tower.class_embedding"] = theirs["model.vision_tower.class_embedding"].flatten()
    for module, prefix in ((tower, "model.vision_tower."), (projector, "model.mm_projector.")):
        part = {k.removeprefix(prefix): v for k, v in theirs.items() if k.startswith(prefix)}
        assert part.keys() == module.state_dict().keys()
        module.load_state_dict(part)
    return model.eval(), processor, tower.eval(), projector.eval()


def _pel_diff(model, processor, tower, projector) -> float:
    batch = processor.images(pictures())
    with torch.no_grad():
        ours = model.image_tokens(batch["pixel_values"], batch["image_sizes"])
        theirs, hw = tower(with_mask(batch["pixel_values"], batch["image_sizes"]), projector)
    assert [t.tolist() for t in hw] == (batch["image_sizes"] // 8).tolist()
    return max((ours.embeds[b][ours.valid[b]] - t).abs().max().item() for b, t in enumerate(theirs))


def test_patch_embedding_equals_vision_tokenizer(pel_pair):
    diff = _pel_diff(*pel_pair)
    print(f"patch embedding vs VisionTokenizer + mm_projector: max diff {diff:.2e}")
    assert diff < 1e-5
    model = pel_pair[0]
    for name in ("local_attn.q.weight", "global_attn.kv.weight", "cls", "projector.2.bias"):
        with perturbed(model.pel, name):
            off = _pel_diff(*pel_pair)
        print(f"  {name} x 1.01: max diff {off:.2e}")
        assert off > 1e-4, name


# ---------------------------------------------------------------------------------- PAL
def _pal_setup(official, deep_lm, tiny_configs, patch_size: int):
    """Our EVE with the official PAL (re-drawn) and EVE's VisionCompressor holding its tensors, on one
    batch; patch_size 4: a cell per teacher patch; 2: EVE-HD, the student grid pooled 2x2."""
    config = EVEConfig(
        lm=LMConfig(deep_lm),
        teacher=VisionConfig(tiny_configs[None].vision.name_or_path, feature_layer=-2),
        patch_size=patch_size,
        pel_width=16,
        pel_heads=8,
        max_image_size=32,
    )
    torch.manual_seed(0)
    model, processor = create_eve(config)
    assert model.config.pal_layers == [0, 4, 8] and model.pal_ratio == (4 // patch_size, 1)
    randomize_(model.pal, seed=7)
    teacher, g = model.teacher, 4

    class Clip(torch.nn.Module):  # EVE's vision_clip: patch features (CLS dropped) at the feature layer
        hidden_size = teacher.hidden_size

        def forward(self, x):
            return teacher(x)[:, -g * g :]

    stub = SimpleNamespace(
        image_size=32, patch_stride=patch_size, conv_stride=2, image_size_clip=32, patch_stride_clip=8
    )
    compressor = official.tokenizer.VisionCompressor(Clip(), stub, llm_size=32, num_layer=8)
    n = len(model.config.pal_layers)
    for j in range(n):  # theirs j reads layer 8 - 4j; ours i = n - 1 - j (ascending, the query last)
        i = n - 1 - j
        compressor.norm_layer[j][0].load_state_dict(model.pal.norms[i].state_dict())
        compressor.norm_layer[j][1].load_state_dict(model.pal.projs[i].state_dict())
    compressor.input_layer.load_state_dict(model.pal.input_proj.state_dict())
    compressor.output_layer.load_state_dict(model.pal.output_proj.state_dict())
    batch = processor(images=pictures(), text=PROMPTS, targets=["red", "blue", "two", "a red circle"])
    return model, compressor, batch


def _teacher_images(model, batch, r: int):
    """EVE's images_clip by hand: each image (its cells that survive pooling by r) resized, aspect kept,
    to one teacher patch per (pooled) cell, centred on whole patches of the 32-px canvas, in the
    teacher's normalisation, and the mask channel over the patches it covers."""
    px, grid = batch["pixel_values"], batch["image_sizes"] // model.config.cell_size
    out = torch.zeros(len(px), 4, 32, 32)
    for b, (h, w) in enumerate(grid.tolist()):
        th, tw = h // r, w // r
        region = px[b : b + 1, :, : th * r * model.config.cell_size, : tw * r * model.config.cell_size]
        region = F.interpolate(region, size=(8 * th, 8 * tw), mode="bilinear", antialias=True)
        top, left = (4 - th) // 2 * 8, (4 - tw) // 2 * 8
        out[b, :3] = model.teacher_shift[0]  # the mean colour (0 in our normalisation)
        box = (slice(top, top + 8 * th), slice(left, left + 8 * tw))
        out[b, :3, box[0], box[1]] = region[0] * model.teacher_scale[0] + model.teacher_shift[0]
        out[b, 3, box[0], box[1]] = 1
    return out


def _pal_both(model, compressor, batch, r):
    """(our loss, theirs, the gradients of both w.r.t. the LM hidden states and the PAL tensors)."""
    embeds, mask, _, slots, image = model.lm_inputs(
        batch["pixel_values"], batch["image_sizes"], batch["input_ids"], batch["attention_mask"]
    )
    with torch.no_grad():
        out = model.lm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
    ids = torch.where(slots, 0, batch["input_ids"]).clone()
    for b in range(len(ids)):  # EVE marks where the image starts with one IMAGE_TOKEN_INDEX
        ids[b, slots[b].nonzero()[0, 0]] = IMAGE_TOKEN_INDEX
    results = []
    for side in ("ours", "theirs"):
        hs = torch.stack(out.hidden_states, 2).detach().requires_grad_()  # (B, T, 9, H), a leaf
        module = model.pal if side == "ours" else compressor
        module.zero_grad()
        if side == "ours":
            loss = model.alignment_loss(hs.unbind(2), slots, image, batch["pixel_values"])
        else:
            hw = [torch.tensor(g) for g in (image.grid).tolist()]
            loss = compressor(ids, _teacher_images(model, batch, r), hs, hw)
        loss.backward()
        results.append((loss.detach(), hs.grad, {n: p.grad.clone() for n, p in module.named_parameters()}))
    return results


@pytest.mark.parametrize("patch_size", [4, 2], ids=["cell-per-patch", "hd-pooled"])
def test_official_pal_equals_vision_compressor(official, deep_lm, tiny_configs, patch_size):
    model, compressor, batch = _pal_setup(official, deep_lm, tiny_configs, patch_size)
    r = 4 // patch_size
    (ours, g_ours, p_ours), (theirs, g_theirs, p_theirs) = _pal_both(model.train(), compressor, batch, r)
    grad_diff = (g_ours - g_theirs).abs().max().item()
    n = len(model.pal.norms)
    pairs = [(f"norms.{n - 1 - j}.{p}", f"norm_layer.{j}.0.{p}") for j in range(n) for p in ("weight", "bias")]
    pairs += [(f"projs.{n - 1 - j}.weight", f"norm_layer.{j}.1.weight") for j in range(n)]
    pairs += [
        (f"{a}.{p}", f"{b}.{p}")
        for a, b in (("input_proj", "input_layer"), ("output_proj", "output_layer"))
        for p in ("weight", "bias")
    ]
    param_diff = max((p_ours[a] - p_theirs[b]).abs().max().item() for a, b in pairs)
    print(
        f"PAL vs VisionCompressor (r={r}): loss {ours.item():.6f} vs {theirs.item():.6f}, "
        f"grad diff hidden {grad_diff:.2e}, params {param_diff:.2e}"
    )
    assert abs(ours - theirs) < 1e-5 and grad_diff < 1e-5 and param_diff < 1e-5
    assert len(pairs) == len(p_ours) == len(p_theirs)  # every tensor compared
    # the model's own forward gives the same PAL loss
    torch.testing.assert_close(model(**batch).loss_pal, theirs, atol=1e-5, rtol=0)
    for name in ("norms.0.weight", "projs.2.weight", "input_proj.bias", "output_proj.weight"):
        with perturbed(model.pal, name):
            (o, g_o, _), (t, g_t, _) = _pal_both(model, compressor, batch, r)
        off = max(abs(o - t).item(), (g_o - g_t).abs().max().item())
        print(f"  {name} x 1.01: max diff {off:.2e}")
        assert off > 1e-5, name


def test_official_pal_refuses_a_grid_it_cannot_match(deep_lm, tiny_configs):
    config = EVEConfig(
        lm=LMConfig(deep_lm),
        teacher=VisionConfig(tiny_configs[None].vision.name_or_path, feature_layer=-2),
        patch_size=2,
        pel_width=16,
        max_image_size=24,  # 6 cells a side against the teacher's 4 patches
    )
    with pytest.raises(ValueError, match="not a multiple of the teacher"):
        create_eve(config)
    with pytest.raises(ValueError, match="pal must be one of"):
        EVEConfig(pal="eve")
    with pytest.raises(ValueError, match="pel_attention must be one of"):
        EVEConfig(pel_attention="sdpa")


# ---------------------------------------------------------------------------------- whole checkpoint
@pytest.fixture(scope="module")
def checkpoint(official, processor_dir, tmp_path_factory):
    """An official EVE checkpoint: EVELlamaForCausalLM, every tensor re-drawn, saved by transformers
    with its tokenizer and preprocessor config (mm_vision_tower names the directory itself)."""
    path = tmp_path_factory.mktemp("eve-official")
    (path / "preprocessor_config.json").write_text((processor_dir / "preprocessor_config.json").read_text())
    tok = word_tokenizer("lm")
    config = official.llama.EVEConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        mm_vision_tower=str(path),
        mm_hidden_size=16,
        mm_projector_type="mlp2x_gelu",
        requires_cliploss=False,
    )
    torch.manual_seed(0)
    reference = randomize_(official.llama.EVELlamaForCausalLM(config), seed=11).eval()
    reference.save_pretrained(path)
    tok.save_pretrained(path)
    return path, reference


def _logit_diff(model, processor, reference) -> float:
    batch = processor(images=pictures(), text=PROMPTS)
    with torch.no_grad():
        ours = model(**batch).logits
        diffs = []
        for b in range(len(PROMPTS)):
            ids = official_ids(batch["input_ids"][b], batch["attention_mask"][b], processor.image_token_id)
            h, w = batch["image_sizes"][b].tolist()
            images = with_mask(batch["pixel_values"][b : b + 1, :, :h, :w], batch["image_sizes"][b : b + 1])
            theirs = reference(input_ids=ids, images=images).logits[0]
            diffs.append((ours[b][batch["attention_mask"][b].bool()] - theirs).abs().max().item())
    return max(diffs)


PERTURBED = ("pel.local_attn.kv.weight", "pel.split", "pel.projector.0.weight", "lm.model.layers.1.mlp.up_proj.weight")


def test_imported_checkpoint_matches_official_forward(checkpoint):
    path, reference = checkpoint
    model, processor = vlbridge.load(path, device="cpu")
    assert isinstance(model, EVE) and model.config.pel_attention == "official" and model.pal is None
    assert model.config.patch_size == 4 and model.config.max_image_size == 32 and model.config.pal_layers == [0, 4]
    assert type(model.lm).__name__ == "LlamaForCausalLM"
    diff = _logit_diff(model, processor, reference)
    print(f"imported EVELlamaForCausalLM: max logit diff {diff:.2e}")
    assert diff <= 1e-4
    for name in PERTURBED:
        with perturbed(model, name):
            off = _logit_diff(model, processor, reference)
        print(f"  {name} x 1.01: max logit diff {off:.2e}")
        assert off > 1e-4, name


def test_greedy_ids_equal_official(checkpoint):
    path, reference = checkpoint
    model, processor = vlbridge.load(path, device="cpu")
    for b, (image, prompt) in enumerate(zip(pictures(), PROMPTS)):
        inputs = processor(images=[image], text=[prompt])
        ours = model.generate(**inputs, max_new_tokens=6, do_sample=False, num_beams=1)[0].tolist()
        ids = official_ids(inputs["input_ids"][0], inputs["attention_mask"][0], processor.image_token_id)
        images = with_mask(inputs["pixel_values"], inputs["image_sizes"])
        theirs = []
        with torch.no_grad():  # greedy by hand on EVE's forward (its generate predates transformers 5)
            for _ in range(len(ours)):
                nxt = reference(input_ids=ids, images=images).logits[0, -1].argmax().item()
                theirs.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        assert ours == theirs, (b, ours, theirs)


def test_export_round_trip_is_exact(checkpoint, official, tmp_path):
    path, reference = checkpoint
    model, processor = vlbridge.load(path, device="cpu")
    model.save_pretrained(tmp_path / "official", processor=processor, format="official")
    again = official.llama.EVELlamaForCausalLM.from_pretrained(tmp_path / "official").eval()
    a, b = reference.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and in vlbridge's own format, then back to EVE's, the same tensors
    model.save_pretrained(tmp_path / "ours", processor=processor)
    ours, ours_processor = vlbridge.load(tmp_path / "ours", device="cpu")
    assert ours.config.pel_attention == "official" and ours.config.pal == "official"
    ours.save_pretrained(tmp_path / "official2", processor=ours_processor, format="official")
    c = official.llama.EVELlamaForCausalLM.from_pretrained(tmp_path / "official2").state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert _logit_diff(ours, ours_processor, reference) <= 1e-4


def test_bad_checkpoints_fail_naming_the_key(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = checkpoint
    state = load_file(str(path / "model.safetensors"))
    for name, edit in (
        ("unexpected key model.vision_tower.extra", lambda s: {**s, "model.vision_tower.extra": torch.zeros(1)}),
        (
            "missing key model.vision_tower.split_embedding",
            lambda s: {k: v for k, v in s.items() if k != "model.vision_tower.split_embedding"},
        ),
    ):
        bad = tmp_path / name.split()[0]
        bad.mkdir()
        for f in path.iterdir():
            if f.name != "model.safetensors":
                (bad / f.name).write_bytes(f.read_bytes())
        save_file(edit(state), str(bad / "model.safetensors"))
        with pytest.raises(ValueError, match=f"{name}.*expected an official EVE checkpoint"):
            EVE.from_pretrained(bad)
    # a PyTorch .bin checkpoint is read with weights_only=True
    binary = tmp_path / "bin"
    binary.mkdir()
    for f in path.iterdir():
        if f.name != "model.safetensors":
            (binary / f.name).write_bytes(f.read_bytes())
    torch.save(state, binary / "pytorch_model.bin")
    loaded = EVE.from_pretrained(binary)
    assert torch.equal(loaded.pel.split, state["model.vision_tower.split_embedding"])


def test_export_refuses_what_eve_cannot_hold(tiny_configs, tmp_path):
    mha = EVEConfig(
        lm=LMConfig(tiny_configs["llama"].lm.name_or_path),
        patch_size=4,
        pel_width=16,
        max_image_size=32,
        pel_attention="mha",
    )
    model, _ = create_eve(mha)
    with pytest.raises(ValueError, match="pel_attention='official'"):
        model.save_pretrained(tmp_path / "a", format="official")
    gpt2 = EVEConfig(lm=LMConfig(tiny_configs["gpt2"].lm.name_or_path), patch_size=4, pel_width=16, max_image_size=32)
    model, _ = create_eve(gpt2)
    with pytest.raises(ValueError, match="is a LLaMA, not GPT2LMHeadModel"):
        model.save_pretrained(tmp_path / "b", format="official")
