"""Flamingo (Alayrac et al. 2022): a Perceiver Resampler and tanh-gated cross-attention in a frozen LM."""

from vlbridge.models.flamingo.configuration import FlamingoConfig
from vlbridge.models.flamingo.modeling import Flamingo, FlamingoOutput, create_flamingo
from vlbridge.models.flamingo.processing import FlamingoProcessor

__all__ = ["Flamingo", "FlamingoConfig", "FlamingoOutput", "FlamingoProcessor", "create_flamingo"]
