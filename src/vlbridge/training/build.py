"""What a recipe builds: the model and processor of its design (fresh, or from init_from keeping every
trained part that fits) and the data streams it trains on."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch

from vlbridge.core import adapters, dist
from vlbridge.core.backbones import local_dir, resolve_path
from vlbridge.core.config import ConfigError, LMConfig
from vlbridge.data.batches import BatchStream, FeatureCache, ProcessorStream, ShardStream, make_pool
from vlbridge.data.interleaved import DocumentStream, make_source
from vlbridge.models.blip2 import Blip2, Blip2Processor, create_blip2, init_qformer_from_bert
from vlbridge.models.eve import EVE, EVEProcessor, create_eve
from vlbridge.models.flamingo import Flamingo, FlamingoProcessor, create_flamingo
from vlbridge.models.llava import Llava, LlavaProcessor, create_llava
from vlbridge.training.recipe import TrainConfig

log = logging.getLogger("vlbridge.training.train")


def build_model(cfg: TrainConfig):
    builders = {"blip2": build_blip2, "flamingo": build_flamingo, "eve": build_eve, "llava": build_llava}
    model, processor = builders[cfg.model_kind](cfg)
    attach_lora(model, cfg)
    return model, processor


def attach_lora(model, cfg: TrainConfig) -> None:
    """The recipe's LoRA adapters (core/adapters.py). A model from init_from that has adapters goes on
    training them when the recipe asks for the same ones, has them merged into its weights when the
    recipe asks for none, and is refused when it asks for others."""
    have = model.lora_config
    if have is None:
        if cfg.lora is not None:
            targets = model.add_lora(cfg.lora)
            log.info("LoRA r=%d alpha=%g on %d layers: %s", cfg.lora.r, cfg.lora.alpha, len(targets), " ".join(targets))
        return
    if cfg.lora is None:
        log.info("init_from %s: its LoRA adapters are merged into the weights (the recipe has no lora)", cfg.init_from)
        model.merge_lora()
        return
    if replace(have, merge_on_save=False) != replace(cfg.lora, merge_on_save=False):
        raise ConfigError(
            f"TrainConfig.lora: init_from {cfg.init_from} has other LoRA adapters ({have}): give the same lora "
            "to go on training them, or none to merge them"
        )
    model.config.lm.lora = replace(cfg.lora)  # the recipe's merge_on_save
    log.info("init_from %s: its LoRA adapters go on training", cfg.init_from)


def build_blip2(cfg: TrainConfig) -> tuple[Blip2, Blip2Processor]:
    if cfg.stage == 1:
        if cfg.init_from:  # going on from a checkpoint: the recipe decides how stage 1 trains
            model = Blip2.from_pretrained(cfg.init_from)
            for name in ("itc_temperature_clamp", "hard_negatives"):
                setattr(model.config, name, getattr(cfg.model, name))
            return model, Blip2Processor.from_pretrained(cfg.init_from)
        model, processor = create_blip2(cfg.model)
        if cfg.qformer_init:
            init_qformer_from_bert(model.qformer, cfg.qformer_init)
        return model, processor
    if cfg.model.lm is None:
        raise ValueError("a stage-2 recipe needs model.lm")
    if cfg.init_from:  # the trained Q-Former, the projection into this LM (fresh for a new LM), no stage-1 heads
        model = Blip2.from_pretrained(cfg.init_from, lm=cfg.model.lm)
        same_lm = keep_lm_proj(model, cfg.init_from, cfg.model.lm)
        carry_adapters(model, cfg.init_from, same_lm)
        for name in ("caption_prompt", "vqa_prompt", "qformer_question", "qformer_reads_prompt", "max_text_length"):
            setattr(model.config, name, getattr(cfg.model, name))
    else:
        model, _ = create_blip2(cfg.model)
    model.drop_text_branch()  # keeps the Q-Former's text side with qformer_question
    return model, Blip2Processor.from_config(model.config)


def keep_lm_proj(model: Blip2, init_from: str, lm: LMConfig) -> bool | None:
    """A stage-2 checkpoint going on in stage 2 with the same LM keeps its trained lm_proj (from_pretrained
    with lm= gives a fresh one, as a new LM needs). The same LM: its config.json says the same, names and
    versions aside. Returns whether it is the same LM (None: a stage-1 or foreign checkpoint)."""
    root = local_dir(init_from)
    if Blip2.foreign_format(root) is not None:
        return None  # its converter decides what it loads
    saved = Blip2.read_config(root).lm
    if saved is None:
        return None  # a stage-1 checkpoint: there is no projection to keep
    if _lm_signature(resolve_path(saved.name_or_path, root)) != _lm_signature(lm.name_or_path):
        log.warning("init_from %s was trained with another LM than model.lm: lm_proj starts afresh", init_from)
        return False
    from safetensors.torch import load_file

    state = {k: v for k, v in load_file(str(root / "model.safetensors")).items() if k.startswith("lm_proj.")}
    own = model.state_dict()
    if state and all(k in own and own[k].shape == v.shape for k, v in state.items()):
        model.load_state_dict(state, strict=False)
        log.info("init_from %s: the same LM, so its trained lm_proj is kept", init_from)
    return True


def carry_adapters(model: Blip2, init_from: str, same_lm: bool | None) -> None:
    """The LoRA adapters of a stage-2 checkpoint going on in stage 2 (from_pretrained with lm= loads none):
    with the same LM all of them come back (attach_lora then goes on training or merges them); with
    another LM its adapters are left behind and the bridge's are merged into the bridge."""
    if same_lm is None:
        return
    root = local_dir(init_from)
    lora = Blip2.read_config(root).lm.lora
    if lora is None:
        return
    model.config.lm.lora = lora
    adapters.load_adapters(model, root, lm=same_lm)
    if not same_lm:
        log.warning("init_from %s: its LM adapters belong to another LM and are left out", init_from)
        if adapters.lora_layers(model):
            model.merge_lora()
        model.config.lm.lora = None


def _lm_signature(name_or_path: str) -> dict:
    config = json.loads((local_dir(name_or_path) / "config.json").read_text())
    return {
        k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype")
    }


def log_init_from(model, init_from: str) -> dict[str, list[str]]:
    """Log (and return) which trained tensors a fresh run takes from init_from ("kept"), which start
    afresh ("fresh": the checkpoint lacks them, or they differ from it after loading, e.g. a projection
    into a new LM) and which of the checkpoint's go unused ("unused": stage-1 heads in stage 2)."""
    from safetensors.torch import load_file

    path = local_dir(init_from) / "model.safetensors"
    if not path.exists():
        log.info("init_from %s: a foreign checkpoint layout; its converter says what it loads", init_from)
        return {}
    saved, own = load_file(str(path)), model.bridge_state_dict()

    def same(k, v):
        return k in saved and saved[k].shape == v.shape and torch.equal(saved[k].to(v.device, v.dtype), v)

    report = {
        "kept": [k for k, v in own.items() if same(k, v)],
        "fresh": [k for k, v in own.items() if not same(k, v)],
        "unused": [k for k in saved if k not in own],
    }
    log.info("init_from %s: %d of %d trained tensors from the checkpoint", init_from, len(report["kept"]), len(own))
    if report["fresh"]:
        replaced = [k for k in report["fresh"] if k in saved]
        (log.warning if replaced else log.info)(
            "init_from %s: initialised afresh: %s%s",
            init_from,
            ", ".join(report["fresh"]),
            f" (the checkpoint's {', '.join(replaced)} not used)" if replaced else "",
        )
    if report["unused"]:
        log.info("init_from %s: not used from the checkpoint: %s", init_from, ", ".join(_modules(report["unused"])))
    return report


def _modules(keys: list[str]) -> list[str]:
    """The modules the tensors belong to, in order ('itm_head' for itm_head.weight and itm_head.bias)."""
    return list(dict.fromkeys(k.rsplit(".", 1)[0] if "." in k else k for k in keys))


def build_flamingo(cfg: TrainConfig) -> tuple[Flamingo, FlamingoProcessor]:
    if cfg.init_from:
        return Flamingo.from_pretrained(cfg.init_from), FlamingoProcessor.from_pretrained(cfg.init_from)
    return create_flamingo(cfg.flamingo)


def build_eve(cfg: TrainConfig) -> tuple[EVE, EVEProcessor]:
    """Stage 1 from the recipe (fresh patch embedding), later stages from the previous stage's
    checkpoint; the teacher is loaded only while PAL has weight. Logs what trains in this stage."""
    if not cfg.init_from:
        model, processor = create_eve(cfg.eve if cfg.eve.pal_weight > 0 else replace(cfg.eve, teacher=None))
    else:
        pal_weight = (cfg.eve or EVE.read_config(local_dir(cfg.init_from))).pal_weight
        model = EVE.from_pretrained(cfg.init_from, load_teacher=pal_weight > 0)
        processor = EVEProcessor.from_pretrained(cfg.init_from)
        if cfg.eve is not None:
            for name in ("pal_weight", "caption_prompt", "vqa_prompt"):
                setattr(model.config, name, getattr(cfg.eve, name))
    if model.config.pal_weight > 0 and model.pal is None:
        raise ValueError("pal_weight > 0 needs a teacher (eve.teacher) to align to")
    return model, processor


def build_llava(cfg: TrainConfig) -> tuple[Llava, LlavaProcessor]:
    """Stage 1 from the recipe (a fresh projector); stage 2 from stage 1's model (init_from), its projector
    trained, the prompts from the recipe's `llava` when it has one (fresh from the recipe without init_from)."""
    if not cfg.init_from:
        return create_llava(cfg.llava)
    model, processor = Llava.from_pretrained(cfg.init_from), LlavaProcessor.from_pretrained(cfg.init_from)
    if cfg.llava is not None:
        for name in ("caption_prompt", "vqa_prompt"):
            setattr(model.config, name, getattr(cfg.llava, name))
    return model, processor


def build_streams(cfg: TrainConfig, model, processor, out: Path) -> dict[str, tuple[float, object]]:
    """{dataset name: (loss weight, stream with .batch(step, micro))}. BLIP-2: one unnamed stream of
    this rank's slices."""
    rank, world_size = dist.world()
    if cfg.model_kind == "flamingo":
        if cfg.cache_features:
            raise ValueError("cache_features is for BLIP-2 recipes only")
        return {
            d.name: (d.weight, DocumentStream(make_source(d), processor, d.batch_size, cfg.seed, i, rank, world_size))
            for i, d in enumerate(cfg.datasets)
        }
    if cfg.model_kind == "blip2" and cfg.stage == 1 and cfg.data.source == "vqa":
        raise ValueError("BLIP-2 stage 1 learns from image-text pairs: give captions (coco, karpathy, jsonl, csv)")
    prompts = (model.config.caption_prompt, model.config.vqa_prompt)
    question = cfg.model_kind == "blip2" and cfg.stage == 2 and model.config.qformer_question
    if cfg.data.source == "webdataset":  # streamed: no pool to cache features of or to index
        if cfg.model_kind != "blip2" or cfg.cache_features:
            raise ValueError("webdataset shards stream BLIP-2 training batches, without cache_features")
        return {
            "": (
                1.0,
                ShardStream(
                    cfg.data,
                    processor,
                    cfg.batch_size,
                    cfg.grad_accum,
                    cfg.stage,
                    prompts,
                    cfg.seed,
                    rank,
                    world_size,
                    question,
                ),
            )
        }
    pool = make_pool(cfg.data)
    cache = None
    if cfg.model_kind in ("eve", "llava"):  # image + prompt -> target through the processor
        if cfg.cache_features:
            raise ValueError(f"cache_features is for BLIP-2 recipes only, not {cfg.model_kind}")
        return {
            "": (
                1.0,
                ProcessorStream(pool, processor, cfg.batch_size, cfg.grad_accum, prompts, cfg.seed, rank, world_size),
            )
        }
    if cfg.cache_features:  # rank 0 computes and stores the features, then the others load them
        if rank > 0:
            dist.barrier()
        cache = FeatureCache.build(model.vision, pool, processor, out.parent / "feature-cache")
        if rank == 0:
            dist.barrier()
    return {
        "": (
            1.0,
            BatchStream(
                pool,
                processor,
                cfg.batch_size,
                cfg.grad_accum,
                cfg.stage,
                prompts,
                cfg.seed,
                cache,
                rank,
                world_size,
                question,
            ),
        )
    }
