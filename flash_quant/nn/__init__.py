"""flash_quant.nn: modules whose attention runs through flash_quant.attention."""
from .multihead_attention import MultiheadAttention, mha_fallback_counts, reset_mha_fallback_counts
from .swap import SwapReport, quantize_attention

__all__ = [
    "MultiheadAttention",
    "SwapReport",
    "quantize_attention",
    "mha_fallback_counts",
    "reset_mha_fallback_counts",
]
