"""transformers' InstructBLIP layout <-> vlbridge's `Blip2` whose Q-Former reads the instruction.

Dai et al., "InstructBLIP: Towards General-purpose Vision-Language Models with Instruction Tuning", 2023.

transformers writes InstructBLIP as `InstructBlipForConditionalGeneration` (config.json `model_type:
"instructblip"`): BLIP-2's vision tower, Q-Former, projection and LM (OPT, Vicuna/LLaMA, Flan-T5), with a
Q-Former that also reads the instruction. In vlbridge that is a stage-2 `Blip2` with `qformer_question`
(the Q-Former keeps its text side, the stage-1 heads are gone) and a processor that gives each prompt to
both tokenizers (`qformer_reads_prompt`). Reading and writing reuse convert_transformers' machinery; only
the Q-Former's embedding names differ from BLIP-2's, so this layout has its own table, `KEY_MAP`.

Facts the mapping rests on (read from transformers' modeling_instructblip.py and processing_instructblip.py):
- The Q-Former's embeddings sit under `qformer.embeddings.`: word and position tables and the LayerNorm
  over [queries; instruction] (BLIP-2's generation model has only that LayerNorm, as `qformer.layernorm`).
- Every Q-Former layer keeps its text feed-forward (`intermediate`, `output`) for the instruction positions.
- Queries and instruction share one bidirectional self-attention: keys are masked by [ones(Q); the
  instruction's attention mask], instruction positions count from 0, cross-attention runs on the queries
  only. That is our Q-Former with mask_kind "bidirectional" (Blip2.query_output).
- The processor tokenizes one text twice: with `qformer_tokenizer` (BERT + [DEC], saved in a
  `qformer_tokenizer/` folder) into qformer_input_ids / qformer_attention_mask, and with the LM's tokenizer
  after num_query_tokens `<image>` tokens, where the model writes the projected queries (image_token_index).
- The vision tower is `InstructBlipVisionModel`, BLIP-2's tower under another name: its post_layernorm is
  our ln_vision, as for BLIP-2.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from vlbridge.core.base import CheckpointFormat
from vlbridge.core.keymap import KeyMap
from vlbridge.models.blip2.configuration import Blip2Config
from vlbridge.models.blip2.convert_transformers import (
    BACKBONE_KEYS,
    GENERATION,
    QFORMER_LAYER_KEYS,
    check_image_token,
    load_checkpoint,
    qformer_config_fields,
    transformers_state,
    vlbridge_config,
    write_checkpoint,
)
from vlbridge.models.blip2.modeling import Blip2
from vlbridge.models.blip2.processing import Blip2Processor, check_qformer_tokenizer

log = logging.getLogger(__name__)

ARCHITECTURE = "InstructBlipForConditionalGeneration"
QFORMER_TOKENIZER = "qformer_tokenizer"  # the folder InstructBlipProcessor.save_pretrained writes it to
# LAVIS' InstructBLIP models (blip2_vicuna_instruct, blip2_t5_instruct) cut the Q-Former's instruction at
# max_txt_len = 128 tokens; transformers' processor does not cut. Ours refuses longer ones unless asked
# to truncate (Blip2Processor.max_text_length).
INSTRUCTION_LENGTH = 128

# (transformers name, vlbridge name), as convert_transformers.KEY_MAP, which documents the placeholders.
KEY_MAP = KeyMap(
    [
        ("query_tokens", "qformer.query_tokens"),  # (1, Q, d)
        ("qformer.embeddings.layernorm.{p}", "qformer.layernorm.{p}"),  # LN over [queries; instruction]
        ("qformer.embeddings.word_embeddings.weight", "qformer.word_embeddings.weight"),  # (V, d)
        ("qformer.embeddings.position_embeddings.weight", "qformer.position_embeddings.weight"),  # (512, d)
        *QFORMER_LAYER_KEYS,
        *BACKBONE_KEYS,  # vision tower (post_layernorm = ln_vision), language_projection, language_model
    ]
)


# ---------------------------------------------------------------------------------- reading
def is_instructblip_checkpoint(root: Path) -> bool:
    cfg = Path(root) / "config.json"
    return cfg.exists() and json.loads(cfg.read_text()).get("model_type") == "instructblip"


def _instructblip_config(root: Path):
    from transformers import InstructBlipConfig

    hf = InstructBlipConfig.from_pretrained(root)
    archs = hf.architectures or []
    if archs and ARCHITECTURE not in archs:
        raise ValueError(f"{root}: architectures {archs} - vlbridge reads InstructBLIP as {ARCHITECTURE}")
    if hf.qformer_config.hidden_act != "gelu":
        raise ValueError(f"{root}: Q-Former activation {hf.qformer_config.hidden_act!r}; vlbridge's is exact gelu")
    return hf


def instructblip_config(hf, root: Path, source: str) -> Blip2Config:
    """Our Blip2Config for a transformers InstructBlipConfig: BLIP-2's generation model whose Q-Former
    reads the instruction; the backbones are named by `source`, the Q-Former tokenizer is root's folder."""
    config = vlbridge_config(hf, GENERATION, source)
    config.qformer.text_branch = True  # the instruction's embeddings and feed-forwards
    config.qformer.pretrain_heads = False  # no ITC / ITM / ITG in InstructBLIP
    config.qformer_question = True
    config.qformer_reads_prompt = True  # the processor gives the Q-Former each prompt
    config.qformer_tokenizer = str(Path(root) / QFORMER_TOKENIZER)
    config.max_text_length = min(INSTRUCTION_LENGTH, config.qformer.max_position_embeddings)
    return config


def load_instructblip(
    root: Path, source: str, lm=None, drop_text_branch: bool = False, load_vision: bool = True, load_lm: bool = True
):
    """A vlbridge Blip2 holding a transformers InstructBLIP checkpoint (see Blip2.from_pretrained).
    drop_text_branch has nothing to drop: the instruction side stays and there are no stage-1 heads."""
    from transformers import InstructBlipVisionModel

    hf = _instructblip_config(root)
    config = instructblip_config(hf, root, source)
    model = load_checkpoint(
        root, hf, config, InstructBlipVisionModel, KEY_MAP, "InstructBLIP", lm, load_vision, load_lm
    )
    if drop_text_branch:
        model.drop_text_branch()
    return model


def load_instructblip_processor(root: Path, source: str) -> Blip2Processor:
    """A vlbridge Blip2Processor from the files of transformers' InstructBlipProcessor: the image
    processor and LM tokenizer in `root`, the Q-Former's tokenizer in `root/qformer_tokenizer`."""
    from transformers import AutoImageProcessor, AutoTokenizer

    hf = _instructblip_config(root)
    config = instructblip_config(hf, root, source)
    if not (Path(root) / QFORMER_TOKENIZER).is_dir():
        raise ValueError(
            f"{root}: no {QFORMER_TOKENIZER}/ folder: InstructBLIP's processor keeps the Q-Former's BERT "
            f"tokenizer there (InstructBlipProcessor.save_pretrained)"
        )
    qtok = AutoTokenizer.from_pretrained(Path(root) / QFORMER_TOKENIZER)
    if qtok.bos_token is None:  # a plain BERT tokenizer: [DEC] (never used by InstructBLIP) is the table's last row
        qtok.add_special_tokens({"bos_token": "[DEC]"})
    check_qformer_tokenizer(qtok, config)
    tok = AutoTokenizer.from_pretrained(root)
    image_token = None if hf.image_token_index is None else tok.convert_ids_to_tokens(hf.image_token_index)
    return Blip2Processor(
        AutoImageProcessor.from_pretrained(root, backend="pil"),
        qtok,
        tok,
        num_query_tokens=config.qformer.num_query_tokens,
        is_encoder_decoder=config.lm.is_encoder_decoder,
        image_token=image_token,
        max_text_length=config.max_text_length,
        qformer_question=True,
        qformer_reads_prompt=True,
    )


# ---------------------------------------------------------------------------------- writing
def save_instructblip(model, path: str | Path, processor=None):
    """Write `model` as transformers' InstructBlipForConditionalGeneration, plus the processor files
    (InstructBlipProcessor: both tokenizers) if given."""
    from transformers import (
        Blip2VisionModel,
        InstructBlipConfig,
        InstructBlipQFormerConfig,
        InstructBlipVisionModel,
    )

    cfg, q = model.config, model.config.qformer
    if model.lm is None:
        raise ValueError(
            "InstructBLIP generates with an LM and this model has none (stage 1): save with format='vlbridge'"
        )
    if not (cfg.qformer_question and q.text_branch):
        raise ValueError(
            "this model's Q-Former does not read the instruction (it was not built with qformer_question, or its "
            "text side was dropped), and InstructBLIP's does: save with format='transformers' or 'vlbridge'"
        )
    if q.pretrain_heads:
        raise ValueError(
            "InstructBLIP has no ITC/ITM/ITG heads: call model.drop_text_branch() first (with qformer_question "
            "it keeps the Q-Former's text side), or save with format='vlbridge'"
        )
    tower = getattr(model.vision, "model", None)
    if not isinstance(tower, (InstructBlipVisionModel, Blip2VisionModel)):
        raise ValueError(
            f"transformers' InstructBLIP holds an InstructBlipVisionModel (BLIP-2's) tower, not "
            f"{type(tower).__name__}: save with format='vlbridge'"
        )
    if model.ln_vision.eps != tower.config.layer_norm_eps:
        log.warning("ln_vision eps %g becomes post_layernorm eps %g", model.ln_vision.eps, tower.config.layer_norm_eps)
    hf = InstructBlipConfig(
        vision_config=tower.config.to_dict(),  # a BLIP-2 tower's config becomes an InstructBlipVisionConfig
        qformer_config=InstructBlipQFormerConfig(**qformer_config_fields(q)).to_dict(),
        text_config=model.lm.config.to_dict(),
        num_query_tokens=q.num_query_tokens,
        image_token_index=cfg.image_token_id,
    )
    hf.architectures = [ARCHITECTURE]
    hf_processor = _instructblip_processor(model, processor) if processor is not None else None
    state, _ = transformers_state(model, KEY_MAP, "InstructBLIP")  # nothing is left out: no stage-1 heads
    write_checkpoint(model, path, hf, state, hf_processor)


def _instructblip_processor(model, processor):
    """transformers' InstructBlipProcessor with our image processor and both tokenizers (copied: it adds
    <image> to the LM's)."""
    from transformers import InstructBlipProcessor

    if processor.qformer_tokenizer is None or processor.tokenizer is None:
        raise ValueError("InstructBLIP's processor needs both the Q-Former's and the LM's tokenizer")
    image_token_id = model.config.image_token_id
    hf = InstructBlipProcessor(
        processor.image_processor,
        copy.deepcopy(processor.tokenizer),
        copy.deepcopy(processor.qformer_tokenizer),
        num_query_tokens=model.config.qformer.num_query_tokens if image_token_id is not None else None,
    )
    check_image_token(hf, image_token_id)
    return hf


# Blip2.from_pretrained and Blip2Processor.from_pretrained read this layout;
# Blip2.save_pretrained(format="instructblip") writes it
INSTRUCTBLIP = CheckpointFormat(
    "instructblip",
    detect=is_instructblip_checkpoint,
    load_model=load_instructblip,
    load_processor=load_instructblip_processor,
    save=save_instructblip,
)
Blip2.register_format(INSTRUCTBLIP)
Blip2Processor.register_format(INSTRUCTBLIP)
