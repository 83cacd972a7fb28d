"""EVE (Diao et al. 2024): an encoder-free VLM, patches embedded straight into the LM."""

from vlbridge.models.eve import convert_official  # noqa: F401  registers the official EVE layout
from vlbridge.models.eve.configuration import EVEConfig
from vlbridge.models.eve.modeling import EVE, EVEOutput, create_eve
from vlbridge.models.eve.processing import EVEProcessor

__all__ = ["EVE", "EVEConfig", "EVEOutput", "EVEProcessor", "create_eve"]
