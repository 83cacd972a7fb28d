"""BLIP-2 (Li et al. 2023): a Q-Former between a frozen image encoder and a frozen LLM."""

from vlbridge.models.blip2 import (
    convert_instructblip,  # noqa: F401  registers transformers' InstructBLIP layout
    convert_lavis,  # noqa: F401  registers LAVIS' .pth layout
    convert_transformers,  # noqa: F401  registers transformers' BLIP-2 layout
)
from vlbridge.models.blip2.configuration import Blip2Config, QFormerConfig
from vlbridge.models.blip2.convert_bert import init_qformer_from_bert
from vlbridge.models.blip2.modeling import (
    Blip2,
    Blip2Features,
    Blip2Output,
    Blip2PretrainOutput,
    RetrievalScores,
    create_blip2,
)
from vlbridge.models.blip2.processing import Blip2Processor

__all__ = [
    "Blip2",
    "Blip2Config",
    "Blip2Features",
    "Blip2Output",
    "Blip2PretrainOutput",
    "Blip2Processor",
    "QFormerConfig",
    "RetrievalScores",
    "create_blip2",
    "init_qformer_from_bert",
]
