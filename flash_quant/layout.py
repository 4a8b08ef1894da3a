"""Storage layout rules that the fake kernels (ops.py) and the CUDA kernels
(cuda/quantize.py) must agree on. A module of its own so that both import it and
neither imports the other (ops -> cuda -> cuda.quantize -> ops was an import circle).
"""
from __future__ import annotations

__all__ = ["CUDA_KMAJOR_ALIGN", "cuda_kmajor_layout", "cuda_kmajor_seq_len"]

#: The CUDA backend stores 8-bit per_channel data (V for an 8-bit P·V) K-major: a buffer
#: lead + (D, round_up(S, 16)) seen as the logical lead + (S, D) view. 8-bit tensor-core
#: products need K-major operands in shared memory (CONTEXT: 1180 vs 184 TOPS).
CUDA_KMAJOR_ALIGN = 16


def cuda_kmajor_layout(shape, precision: str, granularity: str) -> bool:
    """Whether the CUDA quantize stores data of this shape/precision/granularity K-major."""
    return len(shape) >= 2 and granularity == "per_channel" and precision != "int4"


def cuda_kmajor_seq_len(s: int) -> int:
    """Length of the padded sequence dim of a K-major buffer holding s rows."""
    return -(-s // CUDA_KMAJOR_ALIGN) * CUDA_KMAJOR_ALIGN
