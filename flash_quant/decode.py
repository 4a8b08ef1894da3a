"""Decode attention over a :class:`~flash_quant.kv_cache.QuantizedKVCache` (issue 18).

``decode_attention(q, cache)`` attends 1..16 query tokens per head (decode, speculative
verification) to the cache's ``length`` keys. Backends by q's device: CPU, the reference
below (dequantize, then attention in float32); CUDA, the Triton split-KV kernel
(flash_quant/cuda/decode.py); MPS, the Metal kernel (issue 18 item 5, not in this module).

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

from .kv_cache import QuantizedKVCache

__all__ = ["decode_attention", "MAX_QUERIES"]

MAX_QUERIES = 16  # the decode path's query block (speculative decoding verifies <= 16)


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


def causal_decode_mask(sq: int, length: int, device=None) -> torch.Tensor:
    """(Sq, length) bool: query i sees keys [0, length - Sq + i]."""
    keys = torch.arange(length, device=device)
    last = length - sq + torch.arange(sq, device=device)
    return keys[None, :] <= last[:, None]


def additive_mask(attn_mask: torch.Tensor) -> torch.Tensor:
    """A bool mask (True = attend) as 0 / -inf in float32; a float mask as float32."""
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, device=attn_mask.device).masked_fill_(~attn_mask, -math.inf)
    return attn_mask.float()


def reference_attention(q, k, v, attn_mask=None, scale=None, compute_dtype=torch.float32):
    """Decode attention of q (B, Hq, Sq, D) over k, v (B, Hkv, N, D) with the module's
    semantics, in compute_dtype (float32 for the CPU path, float64 in tests)."""
    b, hq, sq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg = q.to(compute_dtype).reshape(b, hkv, hq // hkv * sq, d)
    s = (qg @ k.to(compute_dtype).transpose(-1, -2) * scale).reshape(b, hq, sq, n)
    if attn_mask is None:
        s = s.masked_fill(~causal_decode_mask(sq, n, q.device), -math.inf)
    else:
        s = s + additive_mask(attn_mask).to(compute_dtype)
    m = s.amax(-1, keepdim=True)
    m = torch.where(m == -math.inf, torch.zeros_like(m), m)  # a row with no visible key: P = 0
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = p.reshape(b, hkv, hq // hkv * sq, n) @ v.to(compute_dtype)
    return out.reshape(b, hq, sq, d)


def decode_attention(q: torch.Tensor, cache: QuantizedKVCache,
                     attn_mask: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Attention of q (B, Hq, Sq <= 16, D) over the cache's quantized keys and values
    (semantics: the module docstring). Returns (B, Hq, Sq, D) in q.dtype."""
    _check(q, cache, attn_mask, scale)
    if q.is_cuda:
        from .cuda.decode import decode_attention_cuda
        return decode_attention_cuda(q, cache, attn_mask, scale)
    if q.device.type != "cpu":
        raise NotImplementedError(f"decode_attention: no decode kernel for {q.device.type} yet")
    k, v = cache.dequantize()
    return reference_attention(q, k, v, attn_mask, scale).to(q.dtype)
