"""Shared fixtures: tiny random backbones written once per session, and a seeded BLIP-2 factory.

Everything is built locally with `vlbridge.testing` (no downloads): one CLIP vision tower, one
BERT-style Q-Former tokenizer and one LM per kind, all 32 wide with 2 layers; Q-Formers have 4
queries. Tests that need non-trivial outputs randomise the bridge (`randomize=True`), because a
freshly initialised Q-Former (std 0.02) makes every image look almost the same to the LM.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from vlbridge import LMConfig, create_blip2
from vlbridge.testing import make_lm, randomize_, tiny_blip2_config

LM_KINDS = ("gpt2", "opt", "llama", "t5")

# The models are tiny: intra-op threads only add synchronisation, which on a shared 2-core machine
# turns millisecond steps into seconds-long stalls.
torch.set_num_threads(1)


def _flan_style_t5(path: str) -> str:
    """Drop the d_model**-0.5 rescaling of the decoder output, as Flan-T5 has it (its head is untied).
    With the rescaling a random 32-wide T5 has logits of std ~0.2: it can hardly be steered, and
    greedy decoding sits on near-ties, which would make exact-equality tests fragile."""
    cfg_path = Path(path) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["scale_decoder_outputs"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return path


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_configs(tiny_root) -> dict:
    """Blip2Config per LM kind (key None: stage 1, no LM), sharing one vision tower and Q-Former tokenizer."""
    base = tiny_blip2_config(tiny_root, lm=None)
    configs = {None: base}
    for kind in LM_KINDS:
        path = make_lm(tiny_root / f"lm-{kind}", kind)
        if kind == "t5":
            _flan_style_t5(path)
        cfg = copy.deepcopy(base)
        cfg.lm = LMConfig(path)
        configs[kind] = cfg
    return configs


def randomize_bridge(model, seed: int = 0):
    """Re-draw every trainable module (not the backbones) at a scale where its effect shows."""
    for i, name in enumerate(("ln_vision", "qformer", "vision_proj", "text_proj", "itm_head", "lm_proj")):
        module = getattr(model, name, None)
        if module is not None:  # wrapped so that parameter names keep their prefix ("ln_vision.weight")
            randomize_(torch.nn.ModuleDict({name: module}), seed=1000 * seed + i)
    return model


@pytest.fixture(scope="session")
def build(tiny_configs):
    """build(lm=None|'gpt2'|'opt'|'llama'|'t5', seed=0, randomize=False, **qformer_overrides) -> (model, processor).

    The model comes back in eval mode; the same arguments always give the same weights.
    """

    def _build(lm=None, seed: int = 0, randomize: bool = False, **qformer):
        cfg = copy.deepcopy(tiny_configs[lm])
        for key, value in qformer.items():
            setattr(cfg.qformer, key, value)
        torch.manual_seed(seed)
        model, processor = create_blip2(cfg)
        if randomize:
            randomize_bridge(model, seed)
        return model.eval(), processor

    return _build


@pytest.fixture(scope="session")
def images():
    """images(n, seed=0) -> random pixel_values (n, 3, 32, 32) for the tiny CLIP tower."""

    def _images(n: int, seed: int = 0) -> torch.Tensor:
        return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))

    return _images
