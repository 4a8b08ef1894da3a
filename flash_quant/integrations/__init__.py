"""flash_quant integrations: SDPA routing, diffusers (Flux), HF transformers.

Nothing is patched or registered on import:
  route_sdpa(config) / enable_sdpa_routing / disable_sdpa_routing   (sdpa_routing)
  diffusers_flux.apply_flux_attention(pipe_or_transformer, config)  (needs [diffusers])
  transformers_hf.register(name, config)                            (needs [transformers])
The diffusers / transformers submodules import those packages only when used.
"""
from . import diffusers_flux, transformers_hf  # noqa: F401  (light: no optional import at load)
from ._extras import MissingExtraError
from .sdpa_routing import (
    disable_sdpa_routing,
    enable_sdpa_routing,
    reset_sdpa_routing_stats,
    route_sdpa,
    sdpa_routing_enabled,
    sdpa_routing_stats,
)

__all__ = [
    "route_sdpa",
    "enable_sdpa_routing",
    "disable_sdpa_routing",
    "sdpa_routing_enabled",
    "sdpa_routing_stats",
    "reset_sdpa_routing_stats",
    "MissingExtraError",
    "diffusers_flux",
    "transformers_hf",
]
