"""BERT -> Q-Former: a fresh Q-Former's text path initialised from a BERT checkpoint, as BLIP-2 starts
from bert-base-uncased. Every tensor name goes through one table, `BERT_MAP`; a name it does not place
(beyond what a BERT checkpoint holds and the Q-Former has no place for) or a Q-Former tensor BERT should
fill and does not is an error that lists them."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from vlbridge.core.keymap import KeyMap
from vlbridge.models.blip2.convert_transformers import checkpoint_shards

log = logging.getLogger(__name__)

# (BERT name, Q-Former name), BERT names without their "bert." prefix. What BERT lacks starts fresh:
# the queries, cross-attention; the query FFNs are then copied from the text FFNs, as in BLIP-2.
_B = "encoder.layer.{i}."
BERT_MAP = KeyMap(
    [
        (
            "embeddings.word_embeddings.weight",
            "word_embeddings.weight",
        ),  # (V_bert, d) into (V, d): [DEC] row stays fresh
        ("embeddings.position_embeddings.weight", "position_embeddings.weight"),  # + token type 0, see below
        ("embeddings.LayerNorm.{p}", "layernorm.{p}"),
        (_B + "attention.self.query.{p}", "layers.{i}.attention.query.{p}"),
        (_B + "attention.self.key.{p}", "layers.{i}.attention.key.{p}"),
        (_B + "attention.self.value.{p}", "layers.{i}.attention.value.{p}"),
        (_B + "attention.output.dense.{p}", "layers.{i}.attention.dense.{p}"),
        (_B + "attention.output.LayerNorm.{p}", "layers.{i}.attention.norm.{p}"),
        (_B + "intermediate.dense.{p}", "layers.{i}.ffn.intermediate.{p}"),
        (_B + "output.dense.{p}", "layers.{i}.ffn.output.{p}"),
        (_B + "output.LayerNorm.{p}", "layers.{i}.ffn.norm.{p}"),
        ("cls.predictions.transform.dense.{p}", "lm_head.dense.{p}"),  # MLM head -> ITG head (absent in BertModel)
        ("cls.predictions.transform.LayerNorm.{p}", "lm_head.norm.{p}"),
        ("cls.predictions.bias", "lm_head.bias"),  # (V_bert,) into (V,)
    ]
)
# In BERT checkpoints, with no place in the Q-Former: pooler, next-sentence head, aliases of tied tensors.
BERT_UNUSED = (
    "pooler.",
    "cls.seq_relationship.",
    "cls.predictions.decoder.",
    "embeddings.position_ids",
    "embeddings.token_type_embeddings.weight",
)


@torch.no_grad()
def init_qformer_from_bert(qformer, name_or_path: str | Path):
    """Initialise a fresh Q-Former's text path from a BERT checkpoint (BertModel, BertLMHeadModel or
    BertForPreTraining layout, safetensors), as BLIP-2 starts from bert-base-uncased.

    BERT adds token-type embedding 0 to every token; the Q-Former has no token types, so that row is
    folded into the position table: the text path then computes exactly BERT's function.
    """
    from safetensors.torch import load_file

    from vlbridge.core.backbones import local_dir

    root = local_dir(name_or_path)
    bert_cfg = json.loads((root / "config.json").read_text()) if (root / "config.json").exists() else {}
    qcfg = qformer.config
    if (
        bert_cfg.get("hidden_act", "gelu") != "gelu"
        or bert_cfg.get("layer_norm_eps", qcfg.layer_norm_eps) != qcfg.layer_norm_eps
    ):
        raise ValueError(
            f"{root}: BERT hidden_act/layer_norm_eps {bert_cfg.get('hidden_act')}/"
            f"{bert_cfg.get('layer_norm_eps')} differ from the Q-Former's gelu/{qcfg.layer_norm_eps}"
        )
    if not qcfg.text_branch:
        raise ValueError("this Q-Former has no text branch to initialise from BERT")
    state = {}
    for shard in checkpoint_shards(root):
        state.update(load_file(str(shard)))
    # old BERT checkpoints name LayerNorm parameters gamma/beta; "bert." prefixes the encoder in head models
    state = {
        re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k.removeprefix("bert."))): v
        for k, v in state.items()
    }
    own = qformer.state_dict()
    mapped, unplaced = BERT_MAP.map_state(state, to_ours=True, targets=own)
    unknown = [name for name in unplaced if not name.startswith(BERT_UNUSED)]
    # BERT must fill all but what it lacks: queries, cross-attention, query FFNs (copied below), MLM head (optional)
    missing = [
        k
        for k in own
        if k not in mapped
        and not k.startswith(("query_tokens", "lm_head."))
        and ".crossattention." not in k
        and ".ffn_query." not in k
    ]
    if unknown or missing:
        raise ValueError(
            f"{root}: BERT checkpoint does not match the Q-Former: unknown keys {sorted(unknown)}, "
            f"missing keys {sorted(missing)}"
        )
    if "embeddings.token_type_embeddings.weight" in state:
        mapped["position_embeddings.weight"] = (
            mapped["position_embeddings.weight"] + state["embeddings.token_type_embeddings.weight"][0]
        )
    for name in ("word_embeddings.weight", "lm_head.bias"):  # BERT's rows first; the added [DEC] row keeps its init
        if name in mapped:
            rows = mapped.pop(name)
            if rows.shape[0] > own[name].shape[0]:
                raise ValueError(f"{root}: BERT vocabulary {rows.shape[0]} > Q-Former vocab_size {own[name].shape[0]}")
            qformer.get_parameter(name)[: rows.shape[0]] = rows
    qformer.load_state_dict(mapped, strict=False)
    if not any(k.startswith("lm_head.") for k in mapped):
        log.info("%s has no MLM head (BertModel layout): the Q-Former's ITG head starts fresh", root)
    qformer.copy_text_ffn_to_query_ffn()
    return qformer
