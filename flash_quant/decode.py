"""Decode attention over a :class:`~flash_quant.kv_cache.QuantizedKVCache` (issue 18).

``decode_attention(q, cache)`` attends 1..16 query tokens per head (decode, speculative
verification) to the cache's ``length`` keys, through the op
``torch.ops.flash_quant.decode_attention`` (schema in csrc/schema.cpp, fake kernel in
ops.py, so torch.compile traces it). Its kernels: CPU, the torch reference
(flash_quant/decode_cpu.py: dequantize, then attention in float32); CUDA, the Triton
split-KV kernel (flash_quant/cuda/decode.py); MPS, the Metal kernel (issue 18 item 5).

Semantics (every backend):
- q (B, Hq, Sq, D), Hq a multiple of the cache's kv_heads (GQA: query head i reads kv head
  i // (Hq / Hkv)); the softmax scale defaults to 1 / sqrt(D).
- Without attn_mask, query i sees keys [0, length - Sq + i] (bottom-right causal: the
  queries are the cache's newest Sq tokens). With attn_mask (bool, True = attend, or
  additive float; broadcastable to (B, Hq, Sq, length)) the mask alone decides.
- A row with no visible key gives 0 (as flash_quant.attention; docs/op_contract.md).
- out (B, Hq, Sq, D) in q.dtype.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import ops
from ._checks import DECODE_MAX_QUERIES as MAX_QUERIES
from .decode_cpu import reference_attention  # noqa: F401  (re-exported: the tests' reference)
from .kv_cache import QuantizedKVCache

__all__ = ["decode_attention", "MAX_QUERIES"]


def _check(q, cache, attn_mask, scale) -> None:
    if not isinstance(cache, QuantizedKVCache):
        raise TypeError(f"decode_attention: cache must be a QuantizedKVCache, got {type(cache).__name__}")
    if not isinstance(q, torch.Tensor) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError("decode_attention: q must be a float32, float16 or bfloat16 tensor")
    if q.dim() != 4:
        raise ValueError(f"decode_attention: q must be (B, Hq, Sq, D), got shape {tuple(q.shape)}")
    b, hq, sq, d = q.shape
    if b != cache.batch or d != cache.head_dim:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} must match the cache's batch "
                         f"{cache.batch} and head_dim {cache.head_dim}")
    if hq % cache.kv_heads:
        raise ValueError(f"decode_attention: q's {hq} heads must be a multiple of the cache's "
                         f"{cache.kv_heads} kv heads")
    if not 1 <= sq <= MAX_QUERIES:
        raise ValueError(f"decode_attention: 1 <= Sq <= {MAX_QUERIES} queries, got {sq} "
                         f"(use flash_quant.attention for prefill)")
    if q.device != cache.device:
        raise ValueError(f"decode_attention: q is on {q.device}, the cache on {cache.device}")
    if cache.length < 1:
        raise ValueError("decode_attention: the cache is empty (append the keys first)")
    if attn_mask is None and cache.length < sq:
        raise ValueError(f"decode_attention: the causal default needs the {sq} queries' own keys "
                         f"in the cache, which holds {cache.length}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError("decode_attention: attn_mask must be a tensor (bool or float)")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"decode_attention: attn_mask must be bool or floating, got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ValueError("decode_attention: attn_mask must be on q's device")
        try:
            torch.broadcast_shapes(attn_mask.shape, (b, hq, sq, cache.length))
        except RuntimeError:
            raise ValueError(f"decode_attention: attn_mask {tuple(attn_mask.shape)} does not broadcast "
                             f"to (B, Hq, Sq, length) = {(b, hq, sq, cache.length)}") from None
        if attn_mask.dim() > 4:
            raise ValueError("decode_attention: attn_mask has more than 4 dims")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"decode_attention: scale must be a finite number, got {scale!r}")


def decode_attention(q: torch.Tensor, cache: QuantizedKVCache,
                     attn_mask: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Attention of q (B, Hq, Sq <= 16, D) over the cache's quantized keys and values
    (semantics: the module docstring). Returns (B, Hq, Sq, D) in q.dtype."""
    _check(q, cache, attn_mask, scale)
    return ops.decode_attention(q, *cache.kernel_buffers(), cache.length_tensor, attn_mask,
                                None if scale is None else float(scale), cache.precision,
                                cache.k_group or 0, cache.v_group or 0)
