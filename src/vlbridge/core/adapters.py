"""LoRA adapters (the `peft` library) on a model's LM and, optionally, its bridge: one code path for
every design, called by the base class (`VLModel.add_lora`, `merge_lora`, save / load) and the trainer.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", 2021: a frozen weight W gets a
trainable low-rank update, W x + (alpha / r) B A x, with B = 0 at the start (the model is unchanged
until it trains).

peft's `inject_adapter_in_model` replaces each targeted Linear by a LoRA layer in place, so the LM
stays the transformers model it was (`generate`, `set_attn_implementation`) and the bridge keeps its
modules. Targets are resolved here to exact module names: LM targets never reach the bridge's modules
that a design places inside the LM (Flamingo's gated blocks), and a loaded model gets exactly the
layers it was saved with.

Saved layout (peft's, so that `PeftModel.from_pretrained(lm, "DIR/lm_adapter")` also works on a plain
LM): `lm_adapter/` and, with bridge LoRA, `bridge_adapter/`, each `adapter_config.json` +
`adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight`. The base weights are
written without adapters (`plain_view`): `lm/` is the LM as loaded, model.safetensors the bridge under
its usual names. With `merge_on_save` the adapters are folded into those weights instead.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlbridge.core.weights import read_weights

ADAPTER = "default"  # peft's adapter name; saved files drop it, as peft does
FOLDERS = {"lm": "lm_adapter", "bridge": "bridge_adapter"}  # beside config.json
PEFT_PREFIX = "base_model.model."  # peft's saved keys start with it


@dataclass
class LoraConfig:
    """LoRA on the LM (and, with `bridge`, on the bridge), set in a recipe's `lora`."""

    r: int = 8  # rank of the update B A
    alpha: float = 16.0  # the update is scaled by alpha / r
    dropout: float = 0.0  # dropout on the adapters' input, in training only
    # The LM's layers to adapt, by name or name suffix ("q_proj", "self_attn.v_proj"); None: peft's
    # default for the LM's model_type (q_proj + v_proj for Llama and OPT, c_attn for GPT-2, q + v for T5)
    target_modules: list[str] | None = None
    # The bridge (Q-Former, resampler + gated blocks, EVE's patch layers): False: trained in full as the
    # stage says; True: every Linear layer of it gets an adapter and its own weights freeze; a list:
    # those Linear layers only, by name suffix ("query", "value")
    bridge: bool | list[str] = False
    # save_pretrained: True folds the adapters into the weights (a plain model directory, loaded without
    # peft); False keeps them in lm_adapter/ (+ bridge_adapter/). Checkpoints always keep them apart.
    merge_on_save: bool = False

    def __post_init__(self):  # runs in from_dict too: a bad recipe fails when it is read
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora.r must be an int >= 1, got {self.r!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"lora.alpha must be a finite number > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        for key, names in (("target_modules", self.target_modules), ("bridge", self.bridge)):
            if isinstance(names, list) and (not names or not all(isinstance(n, str) and n for n in names)):
                raise ValueError(f"lora.{key} must be a non-empty list of module names, got {names!r}")


# ---------------------------------------------------------------------------------- finding adapters
def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: peft LoRA layer} (a module reachable twice is named once, by its first path)."""
    if "peft" not in sys.modules:  # nothing can have been injected without it
        return {}
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{parameter name: parameter} of the adapters (lora_A / lora_B), by the names named_parameters gives."""
    ids = {id(p) for layer in lora_layers(model).values() for p in _adapter_modules(layer).parameters()}
    return {n: p for n, p in model.named_parameters() if id(p) in ids}


def _adapter_modules(layer: nn.Module) -> nn.ModuleList:
    return nn.ModuleList([layer.lora_A, layer.lora_B, layer.lora_dropout])


def is_adapter_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def plain_key(key: str) -> str:
    """A base weight's name as it is without adapters: `q.base_layer.weight` -> `q.weight`."""
    return key.replace(".base_layer.", ".")


def plain_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict under the names it has without adapters (adapter tensors left out)."""
    return {plain_key(k): v for k, v in state.items() if not is_adapter_key(k)}


def to_model_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Saved (plain) names -> the model's names, which hold `.base_layer.` where a layer has adapters."""
    if not lora_layers(model):
        return state
    names = {plain_key(k): k for k in model.state_dict() if not is_adapter_key(k)}
    return {names.get(k, k): v for k, v in state.items()}


# ---------------------------------------------------------------------------------- what to adapt
def _matches(name: str, wanted: list[str]) -> bool:
    return any(name == w or name.endswith("." + w) for w in wanted)


def _bridge_parts(model) -> list[tuple[str, nn.Module]]:
    """The model's top-level modules that are not backbones (Q-Former, projections, resampler, ...)."""
    return [(n, m) for n, m in model.named_children() if not f"{n}.".startswith(model.backbone_prefixes)]


def resolve_targets(model, lora: LoraConfig) -> list[str]:
    """The exact names of the modules to adapt: the LM's Linear (and GPT-2 Conv1D) layers named by
    lora.target_modules, then the bridge's Linear layers that lora.bridge asks for."""
    from transformers.pytorch_utils import Conv1D

    lm = getattr(model, "lm", None)
    if lm is None:
        raise ValueError(f"lora: this {model.model_type} model has no LM to adapt (a BLIP-2 stage-1 model)")
    bridge = _bridge_parts(model)
    bridge_ids = {id(m) for _, part in bridge for m in part.modules()}
    wanted = lora.target_modules or _default_targets(lm)
    candidates = [n for n, m in lm.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and id(m) not in bridge_ids]
    targets = [f"lm.{n}" for n in candidates if _matches(n, wanted)]
    if not targets:
        kinds = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise ValueError(
            f"lora.target_modules {wanted}: no Linear layer of the LM ({type(lm).__name__}) is named so; "
            f"its layers are named {kinds}"
        )
    if lora.bridge:
        # nn.MultiheadAttention reads its out_proj's weight directly: an adapter there would be skipped
        inside_mha = {
            id(m.out_proj) for _, part in bridge for m in part.modules() if isinstance(m, nn.MultiheadAttention)
        }
        linears = [
            f"{name}.{sub}".rstrip(".")
            for name, part in bridge
            for sub, m in part.named_modules()
            if isinstance(m, nn.Linear) and id(m) not in inside_mha
        ]
        chosen = linears if lora.bridge is True else [n for n in linears if _matches(n, lora.bridge)]
        if not chosen:
            kinds = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ValueError(
                f"lora.bridge {lora.bridge}: no Linear layer of the bridge is named so; its layers are {kinds}"
            )
        targets += chosen
    return targets


def _default_targets(lm: nn.Module) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    kind = getattr(lm.config, "model_type", "")
    if kind not in DEFAULTS:
        raise ValueError(f"lora.target_modules: peft has no default for a {kind!r} LM; name the layers to adapt")
    return list(DEFAULTS[kind])


# ---------------------------------------------------------------------------------- adding and removing
def _require_peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs the peft library: pip install 'vlbridge[lora]' (or pip install peft)") from None
    return peft


def apply_lora(model, lora: LoraConfig, targets: list[str] | None = None) -> list[str]:
    """Inject LoRA layers (B = 0: the outputs are unchanged) into `targets` (exact names; None: resolved
    from `lora`), record `lora` in model.config.lm and freeze what the adapters stand in for. Returns the
    targets."""
    peft = _require_peft()
    if lora_layers(model):
        raise ValueError("this model has LoRA adapters already: merge_lora() them before adding others")
    targets = resolve_targets(model, lora) if targets is None else targets
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    config = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(targets), bias="none"
    )
    with warnings.catch_warnings():  # peft picks fan_in_fan_out per layer (GPT-2's Conv1D) and says so
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for p in adapter_parameters(model).values():
        p.data = p.data.float()  # adapters train in fp32 on a bf16 / quantised LM, as get_peft_model does
    # peft froze every other parameter; give them back what they were (the stage decides the bridge)
    for n, p in model.named_parameters():
        if n in trainable:
            p.requires_grad_(trainable[n])
    model.config.lm.lora = copy.deepcopy(lora)
    freeze_adapted(model)
    return targets


def freeze_adapted(model) -> None:
    """What trains with adapters: the adapters; not the weights of the layers they adapt, nor (with LM
    adapters) any of the LM's own parameters, whatever the stage says (EVE's later stages train the LM
    in full; with LoRA its adapters stand in for that)."""
    layers = lora_layers(model)
    if not layers:
        return
    adapters = {id(p) for p in adapter_parameters(model).values()}
    bridge = {id(p) for _, part in _bridge_parts(model) for p in part.parameters()}
    if any(n.startswith("lm.") for n in layers):
        for p in model.lm.parameters():
            if id(p) not in adapters and id(p) not in bridge:
                p.requires_grad_(False)
    for layer in layers.values():
        layer.base_layer.requires_grad_(False)
        _adapter_modules(layer).requires_grad_(True)


def set_adapter_mode(model, mode: bool) -> None:
    """Adapter dropout follows train() / eval() even inside a frozen backbone held in eval mode."""
    for layer in lora_layers(model).values():
        layer.lora_dropout.train(mode)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


@contextlib.contextmanager
def plain_view(model, merge: bool = False):
    """The model with its LoRA layers swapped for their base layers while the block runs (to write the
    weights under their usual names); with merge, those base weights hold W + (alpha / r) B A. Everything
    is put back as it was, bit for bit (the merged weight is a new tensor, the original kept aside)."""
    layers = lora_layers(model)
    if merge and layers and getattr(model.config.lm, "quantization", None):
        raise ValueError(
            "lora.merge_on_save: the LM is quantised and cannot take merged weights; save with merge_on_save false"
        )
    swapped = []
    try:
        for name, layer in layers.items():
            base = layer.base_layer
            original = base.weight.data
            if merge:
                delta = layer.get_delta_weight(ADAPTER)
                base.weight.data = original + delta.to(original.dtype)
            parent, attr = _parent(model, name)
            setattr(parent, attr, base)
            swapped.append((parent, attr, layer, base, original))
        yield model
    finally:
        for parent, attr, layer, base, original in swapped:
            base.weight.data = original
            setattr(parent, attr, layer)


def merge_lora(model) -> None:
    """Fold the adapters into the weights for good and remove them: the model is as if trained in full
    (outputs equal up to float rounding). Bridge layers train again as the stage says."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("this model has no LoRA adapters to merge")
    if getattr(model.config.lm, "quantization", None):
        raise ValueError("merge_lora: the LM is quantised and cannot take merged weights")
    with torch.no_grad():
        for name, layer in layers.items():
            base = layer.base_layer
            base.weight.data = base.weight.data + layer.get_delta_weight(ADAPTER).to(base.weight.dtype)
            parent, attr = _parent(model, name)
            setattr(parent, attr, base)
            if not name.startswith(model.backbone_prefixes):
                base.requires_grad_(True)
    if "peft_config" in vars(model):  # set by peft's injection
        del model.peft_config
    model.config.lm.lora = None


# ---------------------------------------------------------------------------------- saving and loading
def save_adapters(model, path: Path) -> None:
    """lm_adapter/ (+ bridge_adapter/) in peft's layout: adapter_config.json (the exact targets) and
    adapter_model.safetensors."""
    peft = _require_peft()
    from safetensors.torch import save_file
    from transformers.pytorch_utils import Conv1D

    lora = model.config.lm.lora
    layers = lora_layers(model)
    weights = {n.replace(f".{ADAPTER}.", "."): p.detach().contiguous() for n, p in adapter_parameters(model).items()}
    for part, folder in FOLDERS.items():
        names = [n for n in layers if n.startswith("lm.") == (part == "lm")]
        if not names:
            continue
        strip = "lm." if part == "lm" else ""
        config = peft.LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=sorted(n[len(strip) :] for n in names),
            fan_in_fan_out=any(isinstance(layers[n].base_layer, Conv1D) for n in names),
            bias="none",
            base_model_name_or_path="lm" if part == "lm" else None,
        )
        out = Path(path) / folder
        out.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(str(out))
        state = {
            PEFT_PREFIX + k[len(strip) :]: v for k, v in weights.items() if any(k.startswith(n + ".") for n in names)
        }
        save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def load_adapters(model, root: Path, lm: bool = True) -> None:
    """Put back the adapters a saved model has (model.config.lm.lora says it has them): the exact layers
    of its adapter_config.json files, then their weights, every one required. A part the model was loaded
    without (e.g. EVE's PAL without its teacher, BLIP-2 without its LM) skips its adapters; lm=False
    skips the LM's (the model holds another LM)."""
    lora = model.config.lm.lora
    targets, state = [], {}
    for part, folder in FOLDERS.items():
        if part == "lm" and not lm:
            continue
        where = Path(root) / folder
        if not (where / "adapter_config.json").is_file():
            if part == "lm":
                raise ValueError(
                    f"{root}: config.json says the LM has LoRA adapters but there is no {folder}/ "
                    "(the saved model is incomplete)"
                )
            continue
        names = json.loads((where / "adapter_config.json").read_text())["target_modules"]
        prefix = "lm." if part == "lm" else ""
        weights = read_weights(where / "adapter_model.safetensors")
        for name in names:
            full = prefix + name
            top = full.split(".")[0]
            if getattr(model, top, None) is None:  # loaded without this part: its adapters stay out
                continue
            targets.append(full)
            for k in ("lora_A", "lora_B"):
                key = f"{PEFT_PREFIX}{name}.{k}.weight"
                if key not in weights:
                    raise ValueError(f"{where}: adapter_model.safetensors lacks {key}")
                state[f"{full}.{k}.{ADAPTER}.weight"] = weights[key]
    if not targets:
        return
    apply_lora(model, lora, targets)
    own = adapter_parameters(model)
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"{root}: the saved adapters do not cover {missing[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            if own[name].shape != value.shape:
                raise ValueError(
                    f"{root}: adapter {name} has shape {tuple(value.shape)}, the model {tuple(own[name].shape)}"
                )
            own[name].copy_(value)
