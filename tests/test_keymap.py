"""The key-mapping engine every checkpoint converter uses (vlbridge.core.keymap); no models, no I/O."""

import pytest

from vlbridge.core.keymap import KeyMap

LAYERS = KeyMap(
    [
        ("enc.layer.{i}.attn.q.{p}", "layers.{i}.attention.query.{p}"),
        ("enc.layer.{i}.{m}_gate", "layers.{i}.{m}_gate"),
        ("tower.final_norm.{p}", "ln_vision.{p}"),  # before the catch-all below: it wins
        ("tower.{rest}", "vision.{rest}"),
        ("lm.{layers}.{i}.xattn.weight", "xattn.{i}.weight"),  # {layers}: a fixed path, bound per model
        ("lm.{embed}.weight", "new_rows"),
    ]
)


def test_both_directions_and_placeholder_kinds():
    keys = LAYERS.bind(layers="model.decoder.layers", embed="model.embed_tokens")
    for theirs, ours in [
        ("enc.layer.11.attn.q.bias", "layers.11.attention.query.bias"),  # {i}, {p}
        ("enc.layer.0.attn_gate", "layers.0.attn_gate"),  # {m}
        ("tower.blocks.3.mlp.fc1.weight", "vision.blocks.3.mlp.fc1.weight"),  # {rest}
        ("lm.model.decoder.layers.5.xattn.weight", "xattn.5.weight"),  # bound path, one side only
        ("lm.model.embed_tokens.weight", "new_rows"),
    ]:
        assert keys.to_ours(theirs) == ours
        assert keys.to_theirs(ours) == theirs


def test_placeholders_match_only_their_pattern_and_the_whole_name():
    keys = LAYERS.bind(layers="model.layers", embed="embed")
    assert keys.to_ours("enc.layer.x.attn.q.weight") is None  # {i}: digits
    assert keys.to_ours("enc.layer.0.attn.q.scale") is None  # {p}: weight|bias
    assert keys.to_ours("enc.layer.0.attn.q.weight.extra") is None  # whole names only
    assert keys.to_ours("xenc.layer.0.attn.q.weight") is None
    assert keys.to_ours("lm.model.layers.0.xattn.weight") == "xattn.0.weight"
    assert keys.to_ours("lm.modelXlayers.0.xattn.weight") is None  # a bound path is literal, dots included


def test_first_match_wins():
    keys = LAYERS.bind(layers="l", embed="e")
    assert keys.to_ours("tower.final_norm.weight") == "ln_vision.weight"  # not vision.final_norm.weight
    assert keys.to_theirs("ln_vision.bias") == "tower.final_norm.bias"
    assert keys.to_theirs("vision.final_norm.bias") == "tower.final_norm.bias"  # the catch-all also maps back
    later_first = KeyMap(list(reversed(LAYERS.pairs))).bind(layers="l", embed="e")
    assert later_first.to_ours("tower.final_norm.weight") == "vision.final_norm.weight"


def test_unbound_fixed_path_is_an_error_only_when_reached():
    assert LAYERS.to_ours("enc.layer.1.attn.q.weight") == "layers.1.attention.query.weight"  # matched before it
    with pytest.raises(ValueError, match=r"\['layers'\] bound"):
        LAYERS.to_ours("nothing.matches")


def test_both_sides_must_hold_the_same_placeholders():
    with pytest.raises(ValueError, match="same placeholders"):
        KeyMap([("a.{i}.{p}", "b.{p}")])
    KeyMap([("a.{layers}.{p}", "b.{p}")])  # fixed placeholders may sit on one side


def test_map_state_reports_unplaced_names_in_order():
    keys = LAYERS.bind(layers="model.layers", embed="embed")
    state = {"enc.layer.0.attn.q.weight": 1, "bogus.a": 2, "tower.x": 3, "lm.embed.weight": 4, "bogus.b": 5}
    ours, unplaced = keys.map_state(state, to_ours=True)
    assert ours == {"layers.0.attention.query.weight": 1, "vision.x": 3, "new_rows": 4}
    assert unplaced == ["bogus.a", "bogus.b"]
    # with targets (the model's own names), a translation outside them is unplaced too, under its source name
    ours, unplaced = keys.map_state(state, to_ours=True, targets={"vision.x", "new_rows"})
    assert ours == {"vision.x": 3, "new_rows": 4}
    assert unplaced == ["enc.layer.0.attn.q.weight", "bogus.a", "bogus.b"]
    back, unplaced = keys.map_state({**ours, "fresh_head.weight": 6}, to_ours=False)
    assert back == {"tower.x": 3, "lm.embed.weight": 4} and unplaced == ["fresh_head.weight"]


def test_custom_placeholder_table():
    keys = KeyMap([("blocks.{n}.w", "layers.{n}.weight")], placeholders={"n": "[a-z]+"})
    assert keys.to_ours("blocks.abc.w") == "layers.abc.weight"
    assert keys.to_ours("blocks.1.w") is None
