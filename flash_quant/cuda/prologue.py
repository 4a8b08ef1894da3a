"""Triton kernel for flash_quant::attention_prologue (CUDA key).

One pass: each program reads a tile of tokens of one (batch, head) from x (B, S, H, D) or
the prefix (B, P, H, D), RMS-normalises every token over D in float32, applies the norm
weight of its segment and the rotary embedding on interleaved channel pairs, rounds once
and writes the tile of the (B, H, P + S, D) output. In a diffusers Flux block the same
steps take about ten elementwise kernels per tensor (float32 copies, stack, neg, mul,
add, cast) plus a concatenation; on the H100 they took ~0.9 ms per block at 1024².

``attention_prologue_launch`` takes tensors on any device (CPU tensors run under
``TRITON_INTERPRET=1``); ``attention_prologue_cuda`` is the checked op kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import _C  # noqa: F401  (defines the op schemas)
from .._checks import check_attention_prologue
from . import host
from .host import PlanCache, cdiv, next_pow2, tensor_signature

__all__ = ["attention_prologue_launch", "attention_prologue_cuda"]


@triton.jit
def _prologue_kernel(x_ptr, p_ptr, w_ptr, pw_ptr, cos_ptr, sin_ptr, out_ptr,
                     H, S, P, D, eps,
                     sxb, sxs, sxh, sxd, spb, sps, sph, spd,
                     scs, scd, sss, ssd,
                     HAS_PREFIX: tl.constexpr, NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_PW: tl.constexpr, ROPE: tl.constexpr,
                     BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    t = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)  # token index in the output (prefix first)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    in_prefix = t < P
    in_x = (t >= P) & (t < P + S)
    # token rows of the two sources; a lane reads only from the source its token is in
    tx = tl.where(in_x, t - P, 0).to(tl.int64)
    tp = tl.where(in_prefix, t, 0).to(tl.int64)
    x_rows = x_ptr + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + tx[:, None] * sxs
    y = tl.load(x_rows + d[None, :] * sxd, mask=in_x[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    if HAS_PREFIX:
        p_rows = p_ptr + b.to(tl.int64) * spb + h.to(tl.int64) * sph + tp[:, None] * sps
        yp = tl.load(p_rows + d[None, :] * spd, mask=in_prefix[:, None] & dmask[None, :], other=0.0)
        y = tl.where(in_prefix[:, None], yp.to(tl.float32), y)
    if NORM:
        inv_rms = 1.0 / tl.sqrt(tl.sum(y * y, axis=1) / D + eps)
        y = y * inv_rms[:, None]
        if HAS_W:
            w = tl.load(w_ptr + d, mask=dmask, other=0.0).to(tl.float32)
            if HAS_PW:
                pw = tl.load(pw_ptr + d, mask=dmask, other=0.0).to(tl.float32)
                y = y * tl.where(in_prefix[:, None], pw[None, :], w[None, :])
            else:
                y = y * tl.where(in_prefix[:, None], 1.0, w[None, :])
        elif HAS_PW:
            pw = tl.load(pw_ptr + d, mask=dmask, other=0.0).to(tl.float32)
            y = y * tl.where(in_prefix[:, None], pw[None, :], 1.0)
    valid = (t < P + S)[:, None] & dmask[None, :]
    if ROPE:
        tr = tl.where(t < P + S, t, 0).to(tl.int64)
        c = tl.load(cos_ptr + tr[:, None] * scs + d[None, :] * scd, mask=valid, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + tr[:, None] * sss + d[None, :] * ssd, mask=valid, other=0.0).to(tl.float32)
        even, odd = tl.split(tl.reshape(y, (BLOCK_S, BLOCK_D // 2, 2)))
        partner = tl.reshape(tl.join(-odd, even), (BLOCK_S, BLOCK_D))
        y = y * c + partner * s
    out_rows = out_ptr + (pid_bh.to(tl.int64) * (P + S) + t.to(tl.int64))[:, None] * D
    tl.store(out_rows + d[None, :], y.to(out_ptr.dtype.element_ty), mask=valid)


def _block_s(block_d: int) -> int:
    # ~4K elements per program: enough rows to hide latency, few registers per thread
    return max(1, min(64, 4096 // block_d))


def attention_prologue_launch(
    x: torch.Tensor,
    prefix: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    prefix_weight: Optional[torch.Tensor],
    eps: Optional[float],
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
) -> torch.Tensor:
    B, S, H, D = x.shape
    P = 0 if prefix is None else prefix.shape[1]
    out = torch.empty((B, H, P + S, D), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_d = max(2, next_pow2(D))
    block_s = _block_s(block_d)
    p = prefix if prefix is not None else x
    rope = cos is not None
    c, s = (cos, sin) if rope else (x, x)
    grid = (cdiv(P + S, block_s), B * H)
    # every integer argument, the grid and the constexprs follow from the tensors' signatures
    key = tuple(tensor_signature(t) for t in (x, prefix, weight, prefix_weight, cos, sin)) + (eps is None,)
    kernels = _KERNELS.get_or_put(key, dict)
    host.launch(_prologue_kernel, grid, (
        x, p, weight if weight is not None else x, prefix_weight if prefix_weight is not None else x,
        c, s, out,
        H, S, P, D, 0.0 if eps is None else float(eps),
        *x.stride(), *p.stride(),
        c.stride(0), c.stride(-1), s.stride(0), s.stride(-1),
    ), dict(HAS_PREFIX=P > 0, NORM=eps is not None, HAS_W=weight is not None, HAS_PW=prefix_weight is not None,
            ROPE=rope, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4), kernels, None)
    return out


_KERNELS = PlanCache()  # call signature -> its compiled kernels (host.launch)


def attention_prologue_cuda(x, prefix, weight, prefix_weight, eps, cos, sin):
    check_attention_prologue(x, prefix, weight, prefix_weight, eps, cos, sin)
    with torch.cuda.device(x.device):
        return attention_prologue_launch(x, prefix, weight, prefix_weight, eps, cos, sin)


torch.library.register_kernel("flash_quant::attention_prologue", "cuda", attention_prologue_cuda)
