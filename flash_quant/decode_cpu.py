"""The CPU kernel of torch.ops.flash_quant.decode_attention: the reference path (the
cache's buffers dequantized, then attention in float32), and that attention written
once for every dtype (tests run it in float64)."""
from __future__ import annotations

import math

import torch

from . import _C  # noqa: F401  (defines the op schemas)
from ._checks import check_decode_op
from .kv_cache import dequantize_buffers

__all__ = ["reference_attention", "causal_decode_mask", "decode_attention_cpu"]


def causal_decode_mask(sq: int, length: int, device=None) -> torch.Tensor:
    """(Sq, length) bool: query i sees keys [0, length - Sq + i]."""
    keys = torch.arange(length, device=device)
    last = length - sq + torch.arange(sq, device=device)
    return keys[None, :] <= last[:, None]


def _additive(attn_mask: torch.Tensor, dtype) -> torch.Tensor:
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill_(~attn_mask, -math.inf)
    return attn_mask.to(dtype)


def reference_attention(q, k, v, attn_mask=None, scale=None, compute_dtype=torch.float32):
    """Decode attention of q (B, Hq, Sq, D) over k, v (B, Hkv, N, D) with
    flash_quant.decode's semantics, in compute_dtype; returns compute_dtype."""
    b, hq, sq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg = q.to(compute_dtype).reshape(b, hkv, hq // hkv * sq, d)
    s = (qg @ k.to(compute_dtype).transpose(-1, -2) * scale).reshape(b, hq, sq, n)
    if attn_mask is None:
        s = s.masked_fill(~causal_decode_mask(sq, n, q.device), -math.inf)
    else:
        s = s + _additive(attn_mask, compute_dtype)
    m = s.amax(-1, keepdim=True)
    m = torch.where(m == -math.inf, torch.zeros_like(m), m)  # a row with no visible key: P = 0
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = p.reshape(b, hkv, hq // hkv * sq, n) @ v.to(compute_dtype)
    return out.reshape(b, hq, sq, d)


def decode_attention_cpu(q, k_codes, k_scale, k_zero, k_smooth, k_window, v_codes, v_scale,
                         v_zero, length, attn_mask, scale, precision, k_group, v_group):
    check_decode_op(q, k_codes, k_scale, k_zero, k_smooth, k_window, v_codes, v_scale, v_zero,
                    length, attn_mask, precision, k_group, v_group)
    n = int(length.item())  # (a CPU tensor: no device sync)
    k, v = dequantize_buffers(precision, n, k_codes, k_scale, k_zero, k_smooth, k_window,
                              v_codes, v_scale, v_zero, k_group, v_group)
    return reference_attention(q, k, v, attn_mask, scale).to(q.dtype)


torch.library.register_kernel("flash_quant::decode_attention", "cpu", decode_attention_cpu)
