"""The gradient of attention_forward with respect to a floating attn_mask.

A float mask is added to the scaled scores, so its gradient is the backward's dS itself:
dMask = P ∘ (dP − delta) with P = exp(s + mask − lse), dP = dO Vᵀ and delta =
rowsum(dO ∘ O) (docs/op_contract.md), summed over the dims the mask broadcasts along.

Computed here from registered ops (dequantize) and torch ops, not inside the backward
kernels: one formula serves the CPU, CUDA and MPS backends and torch.compile (the ops
have fake kernels), the kernels stay as they are for the common case of a mask without
gradient, and the sum over broadcast dims needs no cross-block atomics. It runs only when
the mask requires grad. The work is chunked over (batch, heads, query rows) so memory is
the mask's gradient plus one chunk of scores, never (B, Hq, Sq, Skv).

The operands are those the forward kernel used: a quantized operand's dequantized codes
(Q and K rotated alike, so their products are the rotated scores the kernel computed), K's
smoothing mean handled as the kernel does (scores with the smoothed K, lse shifted by
scale · q · k_mean). So with quantized operands this is the straight-through gradient of
the quantized forward, like dQ, dK and dV.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .operand import OperandArgs

_ops = torch.ops.flash_quant

#: Scores per chunk (each of the few fp32 temporaries of a chunk is 16 MiB at most).
CHUNK_SCORES = 1 << 22

#: Quantized data dtype -> the dequantize op's precision name (docs/op_contract.md).
_PRECISION_OF_DTYPE = {
    torch.int8: "int8",
    torch.uint8: "int4",
    torch.float8_e4m3fn: "fp8_e4m3",
    torch.float8_e5m2: "fp8_e5m2",
}


def mask_gradient(
    grad_out: torch.Tensor,
    q: OperandArgs,
    k: OperandArgs,
    v: OperandArgs,
    out: torch.Tensor,
    lse: torch.Tensor,
    attn_mask: torch.Tensor,
    is_causal: bool,
    scale: Optional[float],
) -> torch.Tensor:
    """dLoss/d attn_mask, in attn_mask's shape and dtype. q, k, v: the forward's operands
    (a quantized one's float may be a stand-in: its codes are read)."""
    B, Hq, Sq, D = q.float.shape
    Hkv, Skv = k.float.shape[1], k.float.shape[2]
    group = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    smoothed = k.quantized and k.mean is not None and k.mean.numel() > 0

    mask4 = _as4d(attn_mask)
    grad = torch.zeros(mask4.shape, dtype=torch.float32, device=mask4.device)
    heads = max(1, min(Hq, CHUNK_SCORES // (Sq * Skv)))
    rows = Sq if heads > 1 else max(1, min(Sq, CHUNK_SCORES // Skv))
    keys = torch.arange(Skv, device=q.float.device)

    for b in range(B):
        for h0 in range(0, Hq, heads):
            h1 = min(Hq, h0 + heads)
            kv0, kv1 = h0 // group, (h1 - 1) // group + 1
            kv_of_head = torch.arange(h0, h1, device=q.float.device) // group - kv0  # GQA: no K/V repeat in memory
            kc = _operand(k, b, kv0, kv1)[:, kv_of_head]
            vc = _operand(v, b, kv0, kv1)[:, kv_of_head]
            for r0 in range(0, Sq, rows):
                r1 = min(Sq, r0 + rows)
                qc = _operand(q, b, h0, h1, r0, r1)
                lse_c = lse[b:b + 1, h0:h1, r0:r1, None]
                if smoothed:  # the kernel's scores use the smoothed K; its lse adds q · k_mean back
                    km = _slice(k.mean, b, kv0, kv1).float()
                    km = km[:, kv_of_head] if km.shape[1] > 1 else km
                    lse_c = lse_c - scale * (qc * km).sum(-1, keepdim=True)
                s = scale * torch.matmul(qc, kc.transpose(-1, -2))
                s = s + _slice(mask4, b, h0, h1, r0, r1).float()
                if is_causal:
                    queries = torch.arange(r0, r1, device=q.float.device)
                    s = s.masked_fill(keys[None, :] > queries[:, None], float("-inf"))
                # a row with no visible key (lse = -inf) contributes nothing
                p = torch.where(lse_c == float("-inf"), torch.zeros_like(s), torch.exp(s - lse_c))
                do = grad_out[b:b + 1, h0:h1, r0:r1].float()
                delta = (do * out[b:b + 1, h0:h1, r0:r1].float()).sum(-1, keepdim=True)
                ds = p * (torch.matmul(do, vc.transpose(-1, -2)) - delta)
                _accumulate(grad, ds, b, h0, h1, r0, r1)
    return grad.reshape(attn_mask.shape).to(attn_mask.dtype)


def _as4d(t: torch.Tensor) -> torch.Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def _slice(t: torch.Tensor, b: int, h0: int, h1: int, r0: Optional[int] = None, r1: Optional[int] = None):
    """Batch b, heads h0:h1 (rows r0:r1) of t, a tensor broadcastable to (B, H, S, X):
    a dim of size 1 (broadcast) is kept whole."""
    t = _as4d(t)
    if t.shape[0] > 1:
        t = t[b:b + 1]
    if t.shape[1] > 1:
        t = t[:, h0:h1]
    if r0 is not None and t.shape[2] > 1:
        t = t[:, :, r0:r1]
    return t


def _operand(x: OperandArgs, b, h0, h1, r0=None, r1=None) -> torch.Tensor:
    """The fp32 values the kernels computed with: x's float itself, or its dequantized
    codes (never the float then: it may be a stand-in)."""
    if not x.quantized:
        return _slice(x.float, b, h0, h1, r0, r1).float()
    empty = x.scale.new_empty((0,))
    zp = empty if x.zero_point is None else _slice(x.zero_point, b, h0, h1, r0, r1)
    return _ops.dequantize(
        _slice(x.data, b, h0, h1, r0, r1), _slice(x.scale, b, h0, h1, r0, r1), zp, empty,
        _PRECISION_OF_DTYPE[x.data.dtype], 1, torch.float32,
    )


def _accumulate(grad: torch.Tensor, ds: torch.Tensor, b: int, h0: int, h1: int, r0: int, r1: int) -> None:
    """Add one chunk's dS (1, heads, rows, Skv) into the mask's gradient, summed over
    the dims along which the mask broadcasts."""
    mb, mh, mq, mk = grad.shape
    ds = ds.sum_to_size((1, ds.shape[1] if mh > 1 else 1, ds.shape[2] if mq > 1 else 1, mk))
    target = grad[b:b + 1] if mb > 1 else grad
    target = target[:, h0:h1] if mh > 1 else target
    target = target[:, :, r0:r1] if mq > 1 else target
    target.add_(ds)
