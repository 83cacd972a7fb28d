"""LLaVA (Liu et al. 2023, LLaVA-1.5 2024): an MLP projector from a frozen vision encoder into the LM."""

from vlbridge.models.llava import convert_transformers  # noqa: F401  registers transformers' LLaVA layout
from vlbridge.models.llava.configuration import LlavaConfig
from vlbridge.models.llava.modeling import Llava, LlavaOutput, create_llava
from vlbridge.models.llava.processing import LlavaProcessor

__all__ = ["Llava", "LlavaConfig", "LlavaOutput", "LlavaProcessor", "create_llava"]
