"""vlbridge: connect frozen vision encoders and frozen language models with small trainable bridges.

model, processor = vlbridge.load("runs/blip2/final", device="auto")   # any saved design
"""

from vlbridge.auto import load
from vlbridge.core.base import VLModel
from vlbridge.core.config import LMConfig, VisionConfig
from vlbridge.core.images import ImageError, load_image
from vlbridge.models.blip2 import (
    Blip2,
    Blip2Config,
    Blip2Features,
    Blip2Output,
    Blip2PretrainOutput,
    Blip2Processor,
    QFormerConfig,
    RetrievalScores,
    create_blip2,
)
from vlbridge.models.eve import EVE, EVEConfig, EVEOutput, EVEProcessor, create_eve
from vlbridge.models.flamingo import Flamingo, FlamingoConfig, FlamingoOutput, FlamingoProcessor, create_flamingo
from vlbridge.models.llava import Llava, LlavaConfig, LlavaOutput, LlavaProcessor, create_llava

__all__ = [
    "Blip2",
    "Blip2Config",
    "Blip2Features",
    "Blip2Output",
    "Blip2PretrainOutput",
    "Blip2Processor",
    "EVE",
    "EVEConfig",
    "EVEOutput",
    "EVEProcessor",
    "Flamingo",
    "FlamingoConfig",
    "FlamingoOutput",
    "FlamingoProcessor",
    "ImageError",
    "LMConfig",
    "Llava",
    "LlavaConfig",
    "LlavaOutput",
    "LlavaProcessor",
    "QFormerConfig",
    "RetrievalScores",
    "VLModel",
    "VisionConfig",
    "create_blip2",
    "create_eve",
    "create_flamingo",
    "create_llava",
    "load",
    "load_image",
]
__version__ = "0.1.0"
