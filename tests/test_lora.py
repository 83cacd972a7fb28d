"""LoRA (peft) on the LM and the bridge of every design, and quantised LMs (core/adapters.py).

Each design gets adapters on its LM and on its bridge (BLIP-2: every Linear of the bridge on an OPT LM;
Flamingo: the perceiver's and gated blocks' q / kv on a GPT-2 LM, whose Conv1D layers peft adapts
transposed; EVE: the patch layers on a Llama LM) and is checked for what trains, what gets gradients,
an unchanged forward at B = 0, and saving merged and separate. The shipped LoRA recipe is trained for
a few steps and resumed exactly.
"""

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import vlbridge
from vlbridge import Blip2, LMConfig, create_blip2
from vlbridge.core import adapters
from vlbridge.core.adapters import LoraConfig
from vlbridge.core.backbones import load_lm
from vlbridge.core.config import ConfigError, VisionConfig, from_dict
from vlbridge.models.eve import EVEConfig, create_eve
from vlbridge.models.flamingo import FlamingoConfig, create_flamingo
from vlbridge.training.recipe import TrainConfig, load_recipe
from vlbridge.training.train import train

DESIGNS = ("blip2", "flamingo", "eve")
LORA = {  # design -> (LM kind, lora)
    "blip2": ("opt", LoraConfig(r=4, alpha=8, bridge=True)),
    "flamingo": ("gpt2", LoraConfig(r=4, alpha=8, bridge=["to_q", "to_kv"])),
    "eve": ("llama", LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], bridge=True)),
}


def _pictures(n: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def make(tiny_configs):
    """make(design) -> (model in eval mode, processor, a batch with labels), the same weights every time."""

    def _make(design: str):
        lm = LMConfig(tiny_configs[LORA[design][0]].lm.name_or_path)
        torch.manual_seed(0)
        if design == "blip2":
            cfg = copy.deepcopy(tiny_configs[None])
            cfg.lm = lm
            model, proc = create_blip2(cfg)
            batch = proc(images=_pictures(2), text=["a photo of", "what color is"], targets=["red circle", "blue"])
        elif design == "flamingo":
            cfg = FlamingoConfig(
                vision=VisionConfig(tiny_configs[None].vision.name_or_path),
                lm=lm,
                perceiver_depth=1,
                num_latents=4,
                perceiver_heads=2,
                perceiver_dim_head=8,
                xattn_heads=2,
                xattn_dim_head=8,
            )
            model, proc = create_flamingo(cfg)
            batch = proc(["<image> a red circle", "a photo of <image> blue square"], _pictures(2), return_labels=True)
        else:
            cfg = EVEConfig(lm=lm, patch_size=4, pel_width=16, pel_heads=2, max_image_size=32, pal_weight=0.0)
            model, proc = create_eve(cfg)
            batch = proc(images=_pictures(2), text=["a photo of", "what color is"], targets=["red circle", "blue"])
        return model.eval(), proc, batch

    return _make


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _randomize_adapters(model, seed: int = 1) -> None:
    """B = 0 at the start leaves the outputs unchanged; a trained adapter is not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.adapter_parameters(model).values():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _backbone_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(model.backbone_prefixes)}


@pytest.mark.parametrize("design", DESIGNS)
def test_adapters_train_and_nothing_else_of_the_lm(make, design):
    model, _, batch = make(design)
    before = _logits(model, batch)
    lm_size = sum(model.group_counts()["lm"].values())  # the LM's own (Flamingo's gated blocks count as xattn)
    stage = model.stages[-1]  # EVE's last stage trains its LM in full: with LoRA only the adapters do
    targets = model.add_lora(LORA[design][1])
    assert any(t.startswith("lm.") for t in targets) and any(not t.startswith("lm.") for t in targets)
    counts = model.freeze_for_stage(stage)
    layers = adapters.lora_layers(model)
    r = LORA[design][1].r
    lm_adapters = sum(r * sum(m.base_layer.weight.shape) for n, m in layers.items() if n.startswith("lm."))
    assert counts["lm"] == {"trainable": 0, "frozen": lm_size}
    assert counts["lm.lora"] == {"trainable": lm_adapters, "frozen": 0}
    # the adapted bridge layers freeze, their adapters train
    assert all(not p.requires_grad for m in layers.values() for p in m.base_layer.parameters())
    # B = 0: the same outputs as before (exactly: the update adds a zero)
    assert torch.equal(_logits(model, batch), before)
    # the optimizer gets every adapter
    grouped = {id(p) for g in model.param_groups(0.01) for p in g["params"]}
    lora = adapters.adapter_parameters(model)
    assert {id(p) for p in lora.values()} <= grouped
    model.train()
    if design == "flamingo":  # open the gates, or nothing reaches the gated blocks' adapters
        with torch.no_grad():
            for block in model.xattn.values():
                block.attn_gate.fill_(1.0)
                block.ff_gate.fill_(1.0)
    _randomize_adapters(model)  # with B = 0 the A matrices get no gradient
    model(**batch).loss.backward()
    bridge = {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(model.backbone_prefixes)}
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got <= set(lora) | bridge
    # every LM adapter learns, and the bridge's on the layers this forward uses (not BLIP-2's stage-1 heads)
    assert {n for n in lora if n.startswith("lm.")} <= got
    assert any(n in got for n in lora if not n.startswith("lm."))
    assert not any(p.grad is not None for n, p in model.named_parameters() if n.startswith("lm.") and n not in lora)


@pytest.mark.parametrize("design", DESIGNS)
def test_save_separate_and_merged_reload_the_same_logits(make, design, tmp_path):
    model, proc, batch = make(design)
    model.add_lora(copy.deepcopy(LORA[design][1]))
    _randomize_adapters(model)
    expected = _logits(model, batch)
    frozen = _backbone_state(model)

    model.save_pretrained(tmp_path / "separate", processor=proc)
    assert (tmp_path / "separate" / "lm_adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "separate" / "bridge_adapter" / "adapter_model.safetensors").is_file()
    loaded, _ = vlbridge.load(tmp_path / "separate")
    assert torch.equal(_logits(loaded.eval(), batch), expected)
    assert loaded.config.lm.lora == model.config.lm.lora
    # the LM is still a transformers model under its adapters: generate runs through them
    prompts = proc.prompt_inputs(_pictures(2, seed=3), ["a photo of", "what color"])
    tokens = model.generate(**prompts, max_new_tokens=4)
    assert torch.equal(loaded.generate(**prompts, max_new_tokens=4), tokens)
    loaded.merge_lora()  # merging after load: a plain model with the same outputs
    assert not adapters.lora_layers(loaded) and loaded.config.lm.lora is None
    torch.testing.assert_close(_logits(loaded, batch), expected, rtol=1e-5, atol=1e-5)

    model.config.lm.lora.merge_on_save = True
    model.save_pretrained(tmp_path / "merged", processor=proc)
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert saved["lm"]["lora"] is None and not (tmp_path / "merged" / "lm_adapter").exists()
    merged, _ = vlbridge.load(tmp_path / "merged")
    assert not adapters.lora_layers(merged)
    torch.testing.assert_close(_logits(merged.eval(), batch), expected, rtol=1e-5, atol=1e-5)
    # saving put every weight back as it was, bit for bit
    assert torch.equal(_logits(model, batch), expected)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())


def test_lm_adapter_is_peft_layout(make, tmp_path):
    """lm_adapter/ loads with peft itself onto the saved plain LM, giving the adapted LM's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, proc, _ = make("blip2")
    model.add_lora(LoraConfig(r=4, alpha=8))
    _randomize_adapters(model)
    model.save_pretrained(tmp_path, processor=proc)
    lm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "lm"), tmp_path / "lm_adapter")
    ids = torch.tensor([[2, 5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(lm.eval()(ids).logits, model.lm(ids).logits, rtol=0, atol=0)


def test_shipped_lora_recipe_trains_only_adapters_and_bridge(tmp_path):
    overrides = [
        "steps=6",
        "batch_size=8",
        "data.num_samples=8",  # the same 8 samples every step: the loss has to fall
        "cache_features=false",
        "precision=fp32",
        "optim.warmup_steps=0",
        "optim.lr=1e-4",  # no warm-up: the recipe's 1e-3 would first throw the fresh Q-Former off
        "log_every=1",
        f"out_dir={tmp_path / 'run'}",
    ]
    cfg = load_recipe("blip2_stage2_lora", overrides)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    final = train(cfg)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    # the base LM is the shipped one, bit for bit; the adapters moved (B started at zero)
    shipped = load_file(str(cfg.model.lm.name_or_path + "/model.safetensors"))
    saved = load_file(str(final / "lm" / "model.safetensors"))
    assert saved.keys() == shipped.keys() and all(torch.equal(saved[k], shipped[k]) for k in shipped)
    lora = load_file(str(final / "lm_adapter" / "adapter_model.safetensors"))
    assert len(lora) == 2 * 4 * 6 and all(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    model, _ = vlbridge.load(final)
    assert model.group_counts()["lm"]["trainable"] == 0 and model.group_counts()["lm.lora"]["trainable"] > 0


def test_resume_restores_adapters_exactly(tmp_path):
    common = [
        "batch_size=4",
        "data.num_samples=16",
        "cache_features=false",
        "precision=fp32",
        "optim.warmup_steps=1",
        "save_every=2",
        'lora.bridge=["query", "value"]',  # Q-Former adapters too: their base weights load under plain names
    ]  # the recipe's lora dropout 0.05 draws random numbers: the RNG must be restored too
    straight = train(load_recipe("blip2_stage2_lora", ["steps=4", f"out_dir={tmp_path / 'a'}", *common]))
    train(load_recipe("blip2_stage2_lora", ["steps=3", f"out_dir={tmp_path / 'b'}", *common]))  # checkpoint at 2
    ckpt = tmp_path / "b" / "checkpoints" / "step-000002"
    assert (ckpt / "lm_adapter" / "adapter_model.safetensors").is_file()
    state = load_file(str(ckpt / "trainer_state.safetensors"))
    assert any(".lora_A." in k for k in state)  # adapters are part of the trainable state
    resumed = train(load_recipe("blip2_stage2_lora", ["steps=4", "resume=true", f"out_dir={tmp_path / 'b'}", *common]))
    for name in (
        "lm_adapter/adapter_model.safetensors",
        "bridge_adapter/adapter_model.safetensors",
        "model.safetensors",
    ):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_fsdp_two_processes_train_adapters_as_one(tmp_path, tiny_configs):
    """LoRA under FSDP2 (adapters sharded with their blocks, gathered into rank 0's copy to save): the
    same adapters as 1 process on the combined batch."""
    import os
    import subprocess
    import sys

    from vlbridge.core.config import to_dict

    cfg = copy.deepcopy(tiny_configs[None])
    cfg.lm = LMConfig(tiny_configs["opt"].lm.name_or_path)
    for name, batch_size in (("one", 8), ("two", 4)):
        recipe = {
            "stage": 2,
            "model": to_dict(cfg),
            "parallel": "fsdp",
            "steps": 2,
            "batch_size": batch_size,
            "data": {"num_samples": 16, "group_size": 1, "width": 32, "height": 32, "tasks": ["vqa"]},
            "out_dir": str(tmp_path / name),
            "optim": {"warmup_steps": 1, "lr": 1e-3, "min_lr": 1e-3},
            "precision": "fp32",
            "device": "cpu",
            "lora": {"r": 4, "alpha": 8, "bridge": ["query", "value"]},
        }
        (tmp_path / f"{name}.json").write_text(json.dumps(recipe))
    one = train(load_recipe(tmp_path / "one.json"))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run(
        [*run, "-m", "vlbridge.training.train", str(tmp_path / "two.json")], check=True, env=env, timeout=180
    )
    for name in ("lm_adapter/adapter_model.safetensors", "bridge_adapter/adapter_model.safetensors"):
        a, b = load_file(str(one / name)), load_file(str(tmp_path / "two" / "final" / name))
        assert a.keys() == b.keys()
        for k in a:
            # float noise only: a step of AdamW moves a weight by about lr = 1e-3
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)
        assert any(v.abs().sum() > 0 for k, v in b.items() if "lora_B" in k)  # they trained


def test_init_from_with_adapters_goes_on_or_merges(make, tmp_path):
    from vlbridge.training.build import attach_lora

    model, proc, batch = make("blip2")
    lora = LoraConfig(r=4, alpha=8)
    model.add_lora(lora)
    _randomize_adapters(model)
    expected = _logits(model, batch)
    model.save_pretrained(tmp_path, processor=proc)
    base = from_dict(TrainConfig, {"stage": 2, "init_from": str(tmp_path), "model": {"lm": {"name_or_path": "x"}}})
    loaded, _ = vlbridge.load(tmp_path)
    attach_lora(loaded, dataclasses.replace(base, lora=LoraConfig(r=4, alpha=8, merge_on_save=True)))
    assert adapters.lora_layers(loaded) and loaded.config.lm.lora.merge_on_save  # the same adapters go on
    loaded, _ = vlbridge.load(tmp_path)
    attach_lora(loaded, base)  # the recipe asks for none: merged
    assert not adapters.lora_layers(loaded)
    torch.testing.assert_close(_logits(loaded.eval(), batch), expected, rtol=1e-5, atol=1e-5)
    loaded, _ = vlbridge.load(tmp_path)
    with pytest.raises(ConfigError, match="other LoRA adapters"):
        attach_lora(loaded, dataclasses.replace(base, lora=LoraConfig(r=8)))


def test_stage2_from_a_lora_stage2_carries_its_adapters(tmp_path, tiny_configs):
    """init_from a LoRA run (BLIP-2 stage 2 names model.lm again): with the same LM its adapters come back
    and go on training; with another LM the bridge's are merged into the bridge and the LM's left out."""
    from vlbridge.core.config import to_dict
    from vlbridge.training.build import build_model

    tiny = ["batch_size=4", "data.num_samples=8", "cache_features=false", "precision=fp32", 'lora.bridge=["query"]']
    first = train(load_recipe("blip2_stage2_lora", ["steps=1", "optim.warmup_steps=0", f"out_dir={tmp_path}", *tiny]))
    saved = {**load_file(str(first / "lm_adapter/adapter_model.safetensors"))}
    saved_bridge = load_file(str(first / "bridge_adapter/adapter_model.safetensors"))
    assert all(float(v.abs().sum()) > 0 for k, v in saved_bridge.items() if "lora_B" in k)  # trained: not 0
    model, _ = build_model(load_recipe("blip2_stage2_lora", [f"init_from={first}", *tiny]))
    lora = {k.replace(".default.", "."): v for k, v in adapters.adapter_parameters(model).items()}
    for k, v in saved.items():
        assert torch.equal(lora["lm." + k.removeprefix(adapters.PEFT_PREFIX)], v)
    for k, v in saved_bridge.items():
        assert torch.equal(lora[k.removeprefix(adapters.PEFT_PREFIX)], v)

    other = json.dumps(to_dict(LMConfig(tiny_configs["opt"].lm.name_or_path)))
    model, _ = build_model(load_recipe("blip2_stage2_lora", [f"init_from={first}", f"model.lm={other}", *tiny]))
    trained = Blip2.from_pretrained(first)  # its query layers hold W + (alpha / r) B A once merged
    trained.merge_lora()
    name = "qformer.layers.0.attention.query"
    assert torch.equal(model.get_submodule(name).base_layer.weight, trained.get_submodule(name).weight)
    assert all(float(v.abs().sum()) == 0 for k, v in adapters.adapter_parameters(model).items() if "lora_B" in k)


@pytest.mark.parametrize(
    "lora, message",
    [
        ({"r": 0}, r"lora.r must be an int >= 1, got 0"),
        ({"alpha": -1}, r"lora.alpha must be a finite number > 0"),
        ({"dropout": 1.0}, r"lora.dropout must be in \[0, 1\)"),
        ({"target_modules": []}, r"lora.target_modules must be a non-empty list"),
        ({"bridge": []}, r"lora.bridge must be a non-empty list"),
        ({"bridge": "yes"}, r"TrainConfig.lora.bridge: expected bool | list\[str\], got 'yes'"),
        ({"rank": 4}, r"unknown keys \['rank'\]"),
    ],
)
def test_bad_lora_configs_are_refused_when_read(lora, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("blip2_stage2_lora", [f"lora={json.dumps(lora)}"])


def test_lora_where_it_cannot_go_is_refused(make):
    with pytest.raises(ConfigError, match=r"LoRA adapts the LM, which a BLIP-2 recipe has in stage 2 \(model.lm\)"):
        load_recipe("blip2_shapesworld_stage1", ['lora={"r": 4}'])
    with pytest.raises(ConfigError, match="set LoRA in the recipe's top-level `lora`"):
        load_recipe("blip2_shapesworld_stage2", ['model.lm.lora={"r": 4}'])
    model, _, _ = make("blip2")
    with pytest.raises(ValueError, match=r"target_modules \['c_attn'\]: no Linear layer of the LM \(OPTForCausalLM\)"):
        model.add_lora(LoraConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match=r"lora.bridge \['nothing'\]: no Linear layer of the bridge"):
        model.add_lora(LoraConfig(bridge=["nothing"]))
    model.add_lora(LoraConfig())
    with pytest.raises(ValueError, match="has LoRA adapters already"):
        model.add_lora(LoraConfig())


def test_quantization_is_checked_when_read():
    with pytest.raises(ConfigError, match=r"LMConfig.quantization must be None, '8bit' or '4bit', got '3bit'"):
        from_dict(LMConfig, {"name_or_path": "x", "quantization": "3bit"})
    with pytest.raises(ConfigError, match="EVE stage 2 trains the LM, which a quantised LM cannot do"):
        from_dict(TrainConfig, {"model_kind": "eve", "stage": 2, "eve": {"lm": {"quantization": "4bit"}}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU message")
def test_quantized_lm_on_cpu_says_what_it_needs(tiny_configs):
    cfg = LMConfig(tiny_configs["opt"].lm.name_or_path, quantization="8bit")
    with pytest.raises(ValueError, match=r"^LMConfig.quantization '8bit' needs a CUDA GPU and bitsandbytes"):
        load_lm(cfg)


@pytest.mark.skipif(
    not torch.cuda.is_available() or not __import__("importlib").util.find_spec("bitsandbytes"),
    reason="needs CUDA and bitsandbytes",
)
def test_quantized_lm_trains_adapters_on_cuda(tiny_configs):
    cfg = copy.deepcopy(tiny_configs[None])
    cfg.lm = LMConfig(tiny_configs["opt"].lm.name_or_path, quantization="4bit")
    model, proc = create_blip2(cfg)
    model.add_lora(LoraConfig(r=4))
    model.to("cuda").train()
    batch = model.prepare_inputs(proc(images=_pictures(2), text=["a photo of", "what"], targets=["red", "blue"]))
    model(**batch).loss.backward()
    lora = adapters.adapter_parameters(model)
    assert all(p.grad is not None for p in lora.values())
    assert not any(p.grad is not None for n, p in model.named_parameters() if n.startswith("lm.") and n not in lora)
