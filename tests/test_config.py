"""Typed configs: exact JSON round trips, unknown keys refused, defaults are the paper's."""

import json

import pytest

from vlbridge import Blip2Config, LMConfig, QFormerConfig, VisionConfig
from vlbridge.core.config import from_dict, load_json, save_json, to_dict


def _configs():
    stage1 = Blip2Config(
        vision=VisionConfig("some/vision", feature_layer=-3, dtype="bfloat16", hidden_size=48),
        qformer=QFormerConfig(
            hidden_size=64, num_layers=3, num_query_tokens=8, dropout=0.0, text_branch=False, bos_token_id=77
        ),
        qformer_tokenizer="tok",
        embed_dim=24,
        init_temperature=0.05,
        max_text_length=20,
    )
    stage2 = Blip2Config(
        vision=VisionConfig("v"),
        lm=LMConfig("some/lm", dtype="float16", hidden_size=96, is_encoder_decoder=True),
        image_token_id=5,
        vqa_prompt="Q: {} A:",
    )
    return {"stage1": stage1, "stage2": stage2}


@pytest.mark.parametrize("name", ["stage1", "stage2"])
def test_dict_and_json_round_trip(name, tmp_path):
    cfg = _configs()[name]
    d = to_dict(cfg)
    back = from_dict(Blip2Config, d)
    assert back == cfg
    assert isinstance(back.vision, VisionConfig) and isinstance(back.qformer, QFormerConfig)
    assert (back.lm is None) == (name == "stage1")
    if back.lm is not None:
        assert isinstance(back.lm, LMConfig) and back.lm.is_encoder_decoder is True
    save_json(cfg, tmp_path / "c.json")
    raw = json.loads((tmp_path / "c.json").read_text())
    assert raw == d  # plain JSON, nested objects
    assert raw["lm"] is None if name == "stage1" else raw["lm"]["name_or_path"] == "some/lm"
    assert load_json(Blip2Config, tmp_path / "c.json") == cfg
    # round trips are exact, not merely "loads": a changed field is seen
    raw["qformer"]["num_query_tokens"] += 1
    assert from_dict(Blip2Config, raw) != cfg


def test_unknown_keys_are_named():
    d = to_dict(_configs()["stage2"])
    d["bogus_key"] = 1
    with pytest.raises(ValueError, match="bogus_key"):
        from_dict(Blip2Config, d)
    d = to_dict(_configs()["stage2"])
    d["qformer"]["num_querys"] = 3  # typo inside a nested config
    with pytest.raises(ValueError, match=r"QFormerConfig.*num_querys"):
        from_dict(Blip2Config, d)
    d = to_dict(_configs()["stage2"])
    d["lm"]["nme_or_path"] = "x"  # inside an optional nested config
    with pytest.raises(ValueError, match="nme_or_path"):
        from_dict(Blip2Config, d)
    with pytest.raises(TypeError):
        from_dict(Blip2Config, ["not", "a", "dict"])


def test_partial_dict_keeps_defaults():
    cfg = from_dict(Blip2Config, {"qformer": {"num_layers": 2}, "lm": None})
    assert cfg.qformer.num_layers == 2 and cfg.qformer.hidden_size == 768 and cfg.lm is None


def test_defaults_are_blip2s():
    q, c = QFormerConfig(), Blip2Config()
    assert (q.hidden_size, q.num_layers, q.num_heads, q.intermediate_size) == (768, 12, 12, 3072)
    assert (q.num_query_tokens, q.cross_attention_frequency, q.vocab_size) == (32, 2, 30523)
    assert (c.embed_dim, c.init_temperature, c.label_smoothing, c.max_text_length) == (256, 0.07, 0.1, 32)
    assert c.vision.feature_layer == -2 and c.lm is None
