"""OpenFlamingo checkpoints in and out of vlbridge's Flamingo, through one key table.

OpenFlamingo (Awadalla et al. 2023, mlfoundations/open_flamingo 2.0.1) saves a flat state dict of
its trainable tensors: the Perceiver Resampler, the gated cross-attention blocks under the LM's
decoder-layer path, and the LM's input embedding table resized for <image> / <|endofchunk|>.
Load the vision tower and LM it was trained on as backbones (the config must match: widths,
cross_attn_every, special-token ids), then `load_openflamingo(model, torch.load("checkpoint.pt"))`.
Parity with open_flamingo's own modules: tests/test_flamingo.py.
"""

from __future__ import annotations

import torch

from vlbridge.core.keymap import KeyMap
from vlbridge.models.flamingo.modeling import Flamingo

# (OpenFlamingo's flat state dict, ours). {i} layer index, {m} submodule, {p} weight|bias; the first
# entry that matches wins, in both directions (vlbridge.core.keymap). Bound per LM: {layers} its
# decoder-layer path (OPT model.decoder.layers, Llama model.layers, GPT-NeoX gpt_neox.layers, MPT
# transformer.blocks), {embed} its input table, resized in OpenFlamingo to hold the added rows.
_X = "lang_encoder.{layers}.{i}.gated_cross_attn_layer."
OPENFLAMINGO_KEYS = KeyMap(
    [
        ("perceiver.latents", "perceiver.latents"),
        ("perceiver.media_time_embs", "perceiver.media_time_embs"),
        ("perceiver.norm.{p}", "perceiver.norm.{p}"),
        ("perceiver.layers.{i}.0.{m}.{p}", "perceiver.layers.{i}.attn.{m}.{p}"),
        ("perceiver.layers.{i}.1.0.{p}", "perceiver.layers.{i}.ff.norm.{p}"),
        ("perceiver.layers.{i}.1.1.weight", "perceiver.layers.{i}.ff.up.weight"),
        ("perceiver.layers.{i}.1.3.weight", "perceiver.layers.{i}.ff.down.weight"),
        (_X + "{m}_gate", "xattn.{i}.{m}_gate"),
        (_X + "attn.{m}.{p}", "xattn.{i}.attn.{m}.{p}"),
        (_X + "ff.0.{p}", "xattn.{i}.ff.norm.{p}"),
        (_X + "ff.1.weight", "xattn.{i}.ff.up.weight"),
        (_X + "ff.3.weight", "xattn.{i}.ff.down.weight"),
        ("lang_encoder.{embed}.weight", "new_tokens.input"),
    ]
)
# Also in OpenFlamingo state dicts, never trained there: the vision tower, the frozen LM's tensors and
# two aliases of the LM's layers. They are skipped; anything else unknown is an error.
OPENFLAMINGO_SKIP = ("vision_encoder.", "lang_encoder.old_decoder_blocks.", "lang_encoder.gated_cross_attn_layers.")


def openflamingo_key(key: str, paths: dict[str, str], to_ours: bool = True) -> str | None:
    """Translate one tensor name through OPENFLAMINGO_KEYS (None: no entry matches).
    paths: {"layers": decoder-layer path, "embed": input-embedding path} inside the LM."""
    keys = OPENFLAMINGO_KEYS.bind(**paths)
    return keys.to_ours(key) if to_ours else keys.to_theirs(key)


def _keys(model: Flamingo) -> KeyMap:
    """OPENFLAMINGO_KEYS with this model's LM paths bound."""
    embed = next(n for n, m in model.lm.named_modules() if m is model.lm.get_input_embeddings())
    return OPENFLAMINGO_KEYS.bind(layers=model.decoder_path, embed=embed)


def openflamingo_state_dict(model: Flamingo) -> dict[str, torch.Tensor]:
    """The bridge in OpenFlamingo's layout; the input table is the LM's, grown to hold the added ids.
    Separate output rows (untied LMs) have no place there: OpenFlamingo keeps its head frozen."""
    state = model.bridge_state_dict()
    state.pop("new_tokens.output", None)
    table = model.lm.get_input_embeddings().original.weight.detach()
    ids = model.new_tokens.token_ids
    rows = torch.cat([table, table.new_zeros(max(0, int(ids.max()) + 1 - len(table)), table.shape[1])])
    rows[ids] = model.new_tokens.input.detach().to(rows.dtype)
    state["new_tokens.input"] = rows
    out, unplaced = _keys(model).map_state(state, to_ours=False)
    if unplaced:
        raise ValueError(f"no place in OpenFlamingo's layout for {unplaced}")
    return out


def load_openflamingo(model: Flamingo, checkpoint: dict[str, torch.Tensor], check_embeddings: bool = True) -> Flamingo:
    """Load an OpenFlamingo state dict (torch.load(checkpoint.pt)) into `model`, whose config must
    match its architecture (cross_attn_every, widths, special-token ids). check_embeddings: its rows
    for the LM's own tokens must equal the frozen LM's (this model cannot hold trained ones)."""
    keys, lm_keys = _keys(model), set(model.lm_state_dict())
    expected = set(model.bridge_state_dict()) - {"new_tokens.output"}
    ours, unplaced = keys.map_state(checkpoint, to_ours=True, targets=expected)
    if "new_tokens.input" in ours:
        key, value = keys.to_theirs("new_tokens.input"), ours["new_tokens.input"]
        ids, table = model.new_tokens.token_ids, model.lm.get_input_embeddings().original.weight
        if len(value) <= int(ids.max()):
            raise ValueError(f"{key} has {len(value)} rows: no rows for the added token ids {ids.tolist()}")
        old = torch.ones(min(len(value), len(table)), dtype=torch.bool)
        old[ids[ids < len(old)]] = False
        diff = (value[: len(old)][old].float() - table[: len(old)][old].float()).abs().max()
        if check_embeddings and diff > 0:
            raise ValueError(
                f"{key}: rows of the LM's own tokens differ from the frozen LM's (max |diff| "
                f"{float(diff):.3g}); pass check_embeddings=False to load only the added rows"
            )
        ours["new_tokens.input"] = value[ids]
    unknown = [
        k
        for k in unplaced
        if not k.startswith(OPENFLAMINGO_SKIP)
        and k.removeprefix("lang_encoder.").replace(".decoder_layer.", ".") not in lm_keys
    ]
    missing = sorted(expected - set(ours))
    if missing or unknown:
        raise ValueError(f"OpenFlamingo checkpoint does not match the model: missing {missing}, unknown {unknown}")
    model.load_state_dict(ours, strict=False)
    return model
