"""vlbridge: connect frozen vision encoders and frozen language models with small trainable bridges."""

from .blip2 import Blip2, Blip2Features, Blip2Output, Blip2PretrainOutput, RetrievalScores, create_blip2
from .config import Blip2Config, LMConfig, QFormerConfig, VisionConfig
from .eve import EVE, EVEConfig, EVEOutput, EVEProcessor, create_eve
from .flamingo import Flamingo, FlamingoConfig, FlamingoOutput, FlamingoProcessor, create_flamingo
from .images import ImageError, load_image
from .processor import Blip2Processor

__all__ = [
    "Blip2", "Blip2Config", "Blip2Features", "Blip2Output", "Blip2PretrainOutput", "Blip2Processor", "EVE",
    "EVEConfig", "EVEOutput", "EVEProcessor", "Flamingo", "FlamingoConfig", "FlamingoOutput",
    "FlamingoProcessor", "ImageError", "LMConfig", "QFormerConfig", "RetrievalScores", "VisionConfig",
    "create_blip2", "create_eve", "create_flamingo", "load_image",
]
__version__ = "0.1.0"
