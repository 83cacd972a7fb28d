"""Frozen backbones: the feature layer is the full model's hidden state, composite checkpoints
load their vision tower, dtypes are honoured, nothing is trainable."""

import copy

import pytest
import torch
from transformers import CLIPModel, CLIPVisionModel
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from vlbridge import VisionConfig, create_blip2
from vlbridge.core.backbones import VisionBackbone, load_lm, load_vision, resolve_dtype, resolve_path
from vlbridge.core.config import LMConfig
from vlbridge.testing import make_vision


@pytest.fixture(scope="module")
def vision_path(tiny_configs):
    return tiny_configs[None].vision.name_or_path


@pytest.fixture(scope="module")
def full_hidden_states(vision_path, images):
    full = CLIPVisionModel.from_pretrained(vision_path).eval()
    assert full.config.num_hidden_layers == 3
    with torch.no_grad():
        return full(pixel_values=images(2), output_hidden_states=True).hidden_states  # 4: embeddings + 3 layers


@pytest.mark.parametrize("feature_layer,index", [(-2, -2), (-1, -1), (1, 1), (2, 2), (-3, 1)])
def test_feature_layer_is_the_full_models_hidden_state(vision_path, full_hidden_states, images, feature_layer, index):
    backbone = load_vision(VisionConfig(vision_path, feature_layer=feature_layer))
    kept = 3 + 1 + feature_layer if feature_layer < 0 else feature_layer
    assert backbone.model.config.num_hidden_layers == kept
    assert sum(isinstance(m, CLIPEncoderLayer) for m in backbone.modules()) == kept  # later layers are really gone
    with torch.no_grad():
        out = backbone(images(2))
    assert out.shape == (2, 17, 32)  # 16 patches + CLS
    assert torch.allclose(out, full_hidden_states[index], atol=1e-6, rtol=0)
    other = -1 if index != -1 else -2
    assert not torch.allclose(out, full_hidden_states[other], atol=1e-3)


@pytest.mark.parametrize("feature_layer", [-4, -10, 0, 4])
def test_feature_layer_out_of_range(vision_path, feature_layer):
    with pytest.raises(ValueError, match=f"feature_layer={feature_layer} is out of range for a 3-layer"):
        load_vision(VisionConfig(vision_path, feature_layer=feature_layer))
    model = CLIPVisionModel.from_pretrained(vision_path)
    with pytest.raises(ValueError, match="out of range"):
        VisionBackbone(model, feature_layer)


def test_composite_checkpoint_loads_its_vision_tower(tmp_path, images):
    path = make_vision(tmp_path / "clip", composite=True)
    backbone = load_vision(VisionConfig(path, feature_layer=-2))
    assert backbone.hidden_size == 32
    assert not any("text" in name for name, _ in backbone.named_parameters())
    full = CLIPModel.from_pretrained(path).eval()
    with torch.no_grad():
        ref = full.vision_model(pixel_values=images(2), output_hidden_states=True).hidden_states[-2]
        out = backbone(images(2))
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)


def test_backbones_are_frozen_and_described(build, tiny_configs):
    model, _ = build("t5")
    for backbone in (model.vision, model.lm):
        assert all(not p.requires_grad for p in backbone.parameters())
        assert not backbone.training
    cfg = copy.deepcopy(tiny_configs["gpt2"].lm)
    lm = load_lm(cfg)
    assert (cfg.hidden_size, cfg.is_encoder_decoder) == (32, False)
    assert all(not p.requires_grad for p in lm.parameters()) and not lm.training
    assert model.config.lm.is_encoder_decoder is True and model.config.lm.hidden_size == 32
    assert model.config.vision.hidden_size == 32 and model.config.qformer.encoder_hidden_size == 32


def test_bfloat16_backbone_gives_float32_image_embeds(build, tiny_configs, images):
    model32, _ = build(None)
    cfg = copy.deepcopy(tiny_configs[None])
    cfg.vision.dtype = "bfloat16"
    torch.manual_seed(0)
    model16, _ = create_blip2(cfg)
    assert {p.dtype for p in model16.vision.parameters()} == {torch.bfloat16}
    assert model16.vision.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in model16.named_parameters() if not n.startswith("vision."))
    px = images(2)
    with torch.no_grad():
        assert model16.vision(px).dtype == torch.bfloat16
        emb16, emb32 = model16.image_embeds(px), model32.image_embeds(px)
    assert emb16.dtype == torch.float32 and emb16.shape == emb32.shape == (2, 17, 32)
    assert torch.allclose(emb16, emb32, atol=0.15) and not torch.equal(emb16, emb32)  # bf16-rounded, same model
    q = model16.qformer(image_embeds=emb16)
    assert q.dtype == torch.float32 and torch.isfinite(q).all()


def test_dtype_and_path_helpers(tmp_path):
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8")
    (tmp_path / "lm").mkdir()
    assert resolve_path("lm", tmp_path) == str(tmp_path / "lm")  # a local folder wins over a hub id
    assert resolve_path("org/model", tmp_path) == "org/model"
    assert resolve_path("lm", None) == "lm"
    with pytest.raises(ValueError, match="name_or_path is empty"):
        load_vision(VisionConfig(""))
    with pytest.raises(ValueError, match="name_or_path is empty"):
        load_lm(LMConfig(""))
