"""OpenFlamingo checkpoints in and out of vlbridge's Flamingo, through one key table.

OpenFlamingo (Awadalla et al. 2023, mlfoundations/open_flamingo 2.0.1) saves a flat state dict of
its trainable tensors: the Perceiver Resampler, the gated cross-attention blocks under the LM's
decoder-layer path, and the LM's input embedding table resized for <image> / <|endofchunk|>.
Load the vision tower and LM it was trained on as backbones (the config must match: widths,
cross_attn_every, special-token ids), then `load_openflamingo(model, torch.load("checkpoint.pt"))`.
Parity with open_flamingo's own modules: tests/test_flamingo.py.
"""

from __future__ import annotations

import re

import torch

from .flamingo import Flamingo

# ours -> OpenFlamingo's flat state dict. {i} layer index, {m} submodule, {p} weight|bias;
# {layers} the LM's decoder-layer path (OPT model.decoder.layers, Llama model.layers, GPT-NeoX
# gpt_neox.layers, MPT transformer.blocks). The added rows sit in the LM's resized input table.
OPENFLAMINGO_KEYS = {
    "perceiver.latents": "perceiver.latents",
    "perceiver.media_time_embs": "perceiver.media_time_embs",
    "perceiver.norm.{p}": "perceiver.norm.{p}",
    "perceiver.layers.{i}.attn.{m}.{p}": "perceiver.layers.{i}.0.{m}.{p}",
    "perceiver.layers.{i}.ff.norm.{p}": "perceiver.layers.{i}.1.0.{p}",
    "perceiver.layers.{i}.ff.up.weight": "perceiver.layers.{i}.1.1.weight",
    "perceiver.layers.{i}.ff.down.weight": "perceiver.layers.{i}.1.3.weight",
    "xattn.{i}.{m}_gate": "lang_encoder.{layers}.{i}.gated_cross_attn_layer.{m}_gate",
    "xattn.{i}.attn.{m}.{p}": "lang_encoder.{layers}.{i}.gated_cross_attn_layer.attn.{m}.{p}",
    "xattn.{i}.ff.norm.{p}": "lang_encoder.{layers}.{i}.gated_cross_attn_layer.ff.0.{p}",
    "xattn.{i}.ff.up.weight": "lang_encoder.{layers}.{i}.gated_cross_attn_layer.ff.1.weight",
    "xattn.{i}.ff.down.weight": "lang_encoder.{layers}.{i}.gated_cross_attn_layer.ff.3.weight",
    "new_tokens.input": "lang_encoder.{embed}.weight",
}
# Also in OpenFlamingo state dicts, never trained there: the vision tower, the frozen LM's tensors and
# two aliases of the LM's layers. They are skipped; anything else unknown is an error.
OPENFLAMINGO_SKIP = ("vision_encoder.", "lang_encoder.old_decoder_blocks.", "lang_encoder.gated_cross_attn_layers.")


def _key_regex(template: str, paths: dict[str, str]) -> re.Pattern:
    rx = re.escape(template.format(i="\0i", m="\0m", p="\0p", **paths))
    for name, sub in (("i", r"\d+"), ("m", r"[a-z_]+"), ("p", r"weight|bias")):
        rx = rx.replace(f"\0{name}", f"(?P<{name}>{sub})")
    return re.compile(rx + "$")


def openflamingo_key(key: str, paths: dict[str, str], to_ours: bool = True) -> str | None:
    """Translate one tensor name through OPENFLAMINGO_KEYS (None: no entry matches).
    paths: {"layers": decoder-layer path, "embed": input-embedding path} inside the LM."""
    for ours, theirs in OPENFLAMINGO_KEYS.items():
        src, dst = (theirs, ours) if to_ours else (ours, theirs)
        hit = _key_regex(src, paths).match(key)
        if hit:
            return dst.format(**paths, **hit.groupdict())
    return None


def _lm_paths(model: Flamingo) -> dict[str, str]:
    embed = next(n for n, m in model.lm.named_modules() if m is model.lm.get_input_embeddings())
    return {"layers": model.decoder_path, "embed": embed}


def openflamingo_state_dict(model: Flamingo) -> dict[str, torch.Tensor]:
    """The bridge in OpenFlamingo's layout; the input table is the LM's, grown to hold the added ids.
    Separate output rows (untied LMs) have no place there: OpenFlamingo keeps its head frozen."""
    paths, out = _lm_paths(model), {}
    for key, value in model.bridge_state_dict().items():
        if key == "new_tokens.input":
            table = model.lm.get_input_embeddings().original.weight.detach()
            ids = model.new_tokens.token_ids
            value = torch.cat([table, table.new_zeros(max(0, int(ids.max()) + 1 - len(table)), table.shape[1])])
            value[ids] = model.new_tokens.input.detach().to(value.dtype)
        if key != "new_tokens.output":
            out[openflamingo_key(key, paths, to_ours=False)] = value
    return out


def load_openflamingo(model: Flamingo, checkpoint: dict[str, torch.Tensor], check_embeddings: bool = True) -> Flamingo:
    """Load an OpenFlamingo state dict (torch.load(checkpoint.pt)) into `model`, whose config must
    match its architecture (cross_attn_every, widths, special-token ids). check_embeddings: its rows
    for the LM's own tokens must equal the frozen LM's (this model cannot hold trained ones)."""
    paths, ours, source, unknown = _lm_paths(model), {}, {}, []
    lm_keys = set(model.lm_state_dict())
    for key, value in checkpoint.items():
        target = openflamingo_key(key, paths)
        if target == "new_tokens.input":
            ids, table = model.new_tokens.token_ids, model.lm.get_input_embeddings().original.weight
            if len(value) <= int(ids.max()):
                raise ValueError(f"{key} has {len(value)} rows: no rows for the added token ids {ids.tolist()}")
            old = torch.ones(min(len(value), len(table)), dtype=torch.bool)
            old[ids[ids < len(old)]] = False
            diff = (value[: len(old)][old].float() - table[: len(old)][old].float()).abs().max()
            if check_embeddings and diff > 0:
                raise ValueError(f"{key}: rows of the LM's own tokens differ from the frozen LM's (max |diff| "
                                 f"{float(diff):.3g}); pass check_embeddings=False to load only the added rows")
            value = value[ids]
        if target is not None:
            ours[target], source[target] = value, key
        elif not (key.startswith(OPENFLAMINGO_SKIP) or key.removeprefix("lang_encoder.").replace(".decoder_layer.", ".") in lm_keys):
            unknown.append(key)
    expected = set(model.bridge_state_dict()) - {"new_tokens.output"}
    missing, unknown = sorted(expected - set(ours)), unknown + sorted(source[k] for k in set(ours) - expected)
    if missing or unknown:
        raise ValueError(f"OpenFlamingo checkpoint does not match the model: missing {missing}, unknown {unknown}")
    model.load_state_dict(ours, strict=False)
    return model
