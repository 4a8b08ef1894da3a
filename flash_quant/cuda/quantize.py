"""Triton kernels for flash_quant::quantize and flash_quant::dequantize (CUDA key).

Semantics: docs/op_contract.md. Kernels:

* ``_colstats_kernel``: one pass over x, per (sequence chunk, leading index, channel):
  sum, max, min; ``_colstats_reduce_kernel`` combines the chunks into the smoothing mean
  and the group ranges of per_channel / per_head / per_tensor.
* ``_quantize_kernel``: one pass over x that subtracts the mean, finds each group's
  range (per_token: per row; per_block: per run of ``block_size`` rows) or reads it
  (column-group granularities), writes the scale / zero point and the codes. INT4 codes
  are packed two per byte in the kernel.
* ``_dequantize_kernel``: ``(data - zero_point) * scale + mean`` in the output dtype.

``rotate=True`` (Hadamard rotation along the last dim first, ``flash_quant.rotation``):
both passes multiply each tile they load by the ±1 Hadamard matrix on the tensor cores
(exact products, fp32 sums) and scale by 1/sqrt(block), so the rotated floats never go
to memory (before: a cuBLAS matmul wrote them and the quantize kernels read them back,
~32 µs of ~88 µs of the accurate preset's quantization at the Flux shape on an H200).
Rows wider than the fused matrix allows (last dim above 256, or 128 for float32 input:
the matrix must fit in shared memory) are rotated by a float32 matmul first.

Layout of 8-bit ``per_channel`` data (how V is quantized for the 8-bit P·V product):
the codes are stored transposed, in a buffer of shape ``lead + (D, S_pad)`` with
``S_pad = round_up(S, 16)``, and returned as the logical ``lead + (S, D)`` view of it
(stride 1 along S). 8-bit tensor-core matmuls need their B operand K-major, and for P·V
the reduction dim is the key sequence. :func:`data_layout` says which layout a call
gets. All other data is contiguous.

``quantize_launch`` / ``dequantize_launch`` take tensors on any device (CPU tensors run
under ``TRITON_INTERPRET=1``); ``quantize_cuda`` / ``dequantize_cuda`` are the checked
op kernels registered for the CUDA key at import.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _C  # noqa: F401  (defines the op schemas)
from ..groups import scale_shape
from .._checks import checked_center
from ..config import Precision
from ..layout import cuda_kmajor_layout, cuda_kmajor_seq_len
from .. import rotation
from ..rotation import hadamard_matrix
from .common import pack_int4, round_half_even, round_to_fp8, round_to_int, unpack_int4
from . import host
from .host import PlanCache, cdiv, next_pow2

__all__ = [
    "PRECISIONS",
    "GRANULARITIES",
    "STRATEGIES",
    "data_layout",
    "quantize_launch",
    "dequantize_launch",
    "quantize_cuda",
    "dequantize_cuda",
]

# precision -> PREC code of the kernels below
_PREC_CODE = {"int8": 0, "int4": 1, "fp8_e4m3": 2, "fp8_e5m2": 3}
# precision -> (code, qmin, qmax, data dtype); the numbers are the Precision table's
PRECISIONS = {name: (code, Precision(name).qmin, Precision(name).qmax, Precision(name).storage_dtype)
              for name, code in _PREC_CODE.items()}
GRANULARITIES = ("per_tensor", "per_head", "per_token", "per_block", "per_channel")
STRATEGIES = ("symmetric", "asymmetric", "legacy")

_MODE_ROW, _MODE_BLOCK, _MODE_COLS = 0, 1, 2


@functools.lru_cache(maxsize=None)
def _hadamard_pm1(d: int, block_d: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The (block_d, block_d) matrix sqrt(block) * hadamard_matrix(d), zero-padded: entries
    ±1 / 0, exact in every float type (the kernels scale by 1/sqrt(block) in fp32)."""
    rotation.check_not_capturing(device, f"the rotation matrix of the quantize kernel (head dim {d}, {dtype})")
    h = torch.zeros(block_d, block_d, dtype=torch.float64)
    h[:d, :d] = hadamard_matrix(d, dtype=torch.float64) * math.sqrt(d & -d)
    return h.round().to(device=device, dtype=dtype)


def data_layout(shape, precision: str, granularity: str) -> str:
    """"transposed" when the CUDA quantize stores the codes K-major for P·V (8-bit,
    per_channel, rank >= 2), else "contiguous"."""
    return "transposed" if cuda_kmajor_layout(shape, precision, granularity) else "contiguous"


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _load_hadamard(h_ptr, ROTATE: tl.constexpr, BLOCK_D: tl.constexpr):
    """The ±1 matrix of _hadamard_pm1 (ROTATE), loaded once per program; else a dummy."""
    if ROTATE:
        offs = tl.arange(0, BLOCK_D)
        return tl.load(h_ptr + offs[:, None] * BLOCK_D + offs[None, :])
    else:
        return tl.zeros((16, 16), dtype=tl.float32)


@triton.jit
def _load_rows(ptrs, m, hmat, rscale, ROTATE: tl.constexpr, DOT_IEEE: tl.constexpr):
    """A (rows, BLOCK_D) tile of x as fp32 (masked entries 0); with ROTATE times the
    Hadamard matrix: x's 16-bit values times ±1 are exact, the sums fp32 (tensor cores),
    then 1/sqrt(block). DOT_IEEE: float32 input (or the interpreter, whose 16-bit dots
    are wrong): an fp32 product without tf32 rounding."""
    x = tl.load(ptrs, mask=m, other=0.0)
    if ROTATE:
        if DOT_IEEE:
            return tl.dot(x.to(tl.float32), hmat, input_precision="ieee") * rscale
        else:
            return tl.dot(x, hmat, out_dtype=tl.float32) * rscale
    else:
        return x.to(tl.float32)


@triton.jit
def _colstats_kernel(x_ptr, h_ptr, rscale, work_ptr, part_off, L, L2, S, D, S_CHUNK,
                     sx1, sx2, sxs, sxd,
                     RANGE: tl.constexpr, ROTATE: tl.constexpr, DOT_IEEE: tl.constexpr,
                     BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per (sequence chunk c, leading index l, channel d): sum (and with RANGE max and
    min) of x[l, c*S_CHUNK:(c+1)*S_CHUNK, d] in fp32, stored at [plane, c, l, d] of the
    partials at work_ptr + part_off (planes: sum, max, min). Splitting the sequence keeps
    enough programs in flight when B·H is small (Flux: 24 heads);
    _colstats_reduce_kernel combines the chunks in a fixed order (deterministic)."""
    pid_d = tl.program_id(0)
    pid_l = tl.program_id(1)
    pid_c = tl.program_id(2)
    l1 = pid_l // L2
    l2 = pid_l % L2
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    base = x_ptr + l1.to(tl.int64) * sx1 + l2.to(tl.int64) * sx2
    acc_sum = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    acc_max = tl.full((BLOCK_S, BLOCK_D), float("-inf"), dtype=tl.float32)
    acc_min = tl.full((BLOCK_S, BLOCK_D), float("inf"), dtype=tl.float32)
    hmat = _load_hadamard(h_ptr, ROTATE, BLOCK_D)  # (ROTATE: one column block, BLOCK_D >= D)
    s_end = tl.minimum(S, (pid_c + 1) * S_CHUNK)
    for s0 in range(pid_c * S_CHUNK, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        m = (offs_s[:, None] < s_end) & dmask[None, :]
        x = _load_rows(base + offs_s[:, None].to(tl.int64) * sxs + offs_d[None, :] * sxd, m,
                       hmat, rscale, ROTATE, DOT_IEEE)
        acc_sum += x
        if RANGE:
            acc_max = tl.maximum(acc_max, tl.where(m, x, float("-inf")))
            acc_min = tl.minimum(acc_min, tl.where(m, x, float("inf")))
    part = work_ptr + part_off
    plane = tl.num_programs(2).to(tl.int64) * L * D
    out = (pid_c * L + pid_l).to(tl.int64) * D + offs_d
    tl.store(part + out, tl.sum(acc_sum, axis=0), mask=dmask)
    if RANGE:
        tl.store(part + plane + out, tl.max(acc_max, axis=0), mask=dmask)
        tl.store(part + 2 * plane + out, tl.min(acc_min, axis=0), mask=dmask)


@triton.jit
def _colstats_reduce_kernel(stats_ptr, part_off, chunks, L, D, inv_s, h_ptr, rscale, center_ptr,
                            SMOOTH: tl.constexpr, CENTER: tl.constexpr, RANGE: tl.constexpr, ROTATE: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr):
    """Combine the sequence chunks of _colstats_kernel (in chunk order: deterministic) into
    stats[0] = mean (sum / S; 0 without smoothing), stats[1] = min(min - mean, 0) and
    stats[2] = max(max - mean, 0), per (leading index l, channel). One launch instead of
    a handful of small torch reductions: the quantize call is host-bound at Flux sizes.
    Without RANGE only the mean is written. ROTATE (no RANGE, BLOCK_D >= D): the partials
    are of x, and the mean of x @ H is written as mean(x) @ H — one small product per
    leading index instead of a rotation of every tile in the statistics pass; a second
    grid axis splits its output channels (each program sums the partials itself).
    CENTER: the caller's smoothing centre (center_ptr, (L, D) fp32) stands for the mean."""
    pid_l = tl.program_id(0)
    part_ptr = stats_ptr + part_off  # the partials follow the stats planes in one buffer
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        csum = tl.zeros((BLOCK_D,), dtype=tl.float32)
        cmax = tl.full((BLOCK_D,), float("-inf"), dtype=tl.float32)
        cmin = tl.full((BLOCK_D,), float("inf"), dtype=tl.float32)
        for c in range(0, chunks):
            row = (c * L + pid_l).to(tl.int64) * D + offs_d
            csum += tl.load(part_ptr + row, mask=dmask, other=0.0)
            if RANGE:
                cmax = tl.maximum(cmax, tl.load(part_ptr + (chunks * L) * D + row, mask=dmask, other=0.0))
                cmin = tl.minimum(cmin, tl.load(part_ptr + (2 * chunks * L) * D + row, mask=dmask, other=0.0))
        if CENTER:
            mean = tl.load(center_ptr + pid_l.to(tl.int64) * D + offs_d, mask=dmask, other=0.0)
        elif SMOOTH:
            mean = csum * inv_s
        else:
            mean = tl.zeros((BLOCK_D,), dtype=tl.float32)
        out = pid_l.to(tl.int64) * D + offs_d
        if ROTATE:  # this program's BLOCK_C output channels: mean (BLOCK_D) x H[:, cols]
            offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
            hm = tl.load(h_ptr + offs_d[:, None] * BLOCK_D + offs_c[None, :]).to(tl.float32)
            tl.store(stats_ptr + pid_l.to(tl.int64) * D + offs_c, tl.sum(mean[:, None] * hm, 0) * rscale,
                     mask=offs_c < D)
        else:
            tl.store(stats_ptr + out, mean, mask=dmask)
        if RANGE:
            tl.store(stats_ptr + L * D + out, tl.minimum(cmin - mean, 0.0), mask=dmask)
            tl.store(stats_ptr + 2 * L * D + out, tl.maximum(cmax - mean, 0.0), mask=dmask)


@triton.jit
def _scale_from_range(lo, hi, QMIN: tl.constexpr, QMAX: tl.constexpr, ASYM: tl.constexpr):
    """(scale, zero point as fp32) of a group whose values span [lo, hi] (lo <= 0 <= hi)."""
    if ASYM:
        s = tl.math.div_rn(hi - lo, tl.zeros_like(hi) + (QMAX - QMIN))
        s = tl.where(s == 0.0, 1.0, s)
        z = round_half_even(tl.minimum(tl.maximum(QMIN - tl.math.div_rn(lo, s), QMIN - 1.0),
                                       QMAX + 1.0))
        z = tl.minimum(tl.maximum(z, QMIN), QMAX)
    else:
        amax = tl.maximum(-lo, hi)
        s = tl.math.div_rn(amax, tl.zeros_like(amax) + QMAX)
        s = tl.where(s == 0.0, 1.0, s)
        z = tl.zeros_like(s)
    return s, z


@triton.jit
def _divide(y, s, INTERPRET: tl.constexpr):
    """y / s correctly rounded (as the CPU backend's division) for a scale s > 0 of shape
    (rows, 1) or (1, cols): one reciprocal per group, then per value q = y * (1/s) and
    one exact-residual correction, q + fma(-q, s, y) / s — the correctly rounded quotient
    when 1/s is (Markstein), 4 instructions instead of div.rn's ~10 with its slow-path
    check and call (the quantize kernels were bound by them). Groups with s < 2**-100
    are scaled by 2**100 first (exact) so 1/s cannot overflow. The interpreter's FMA is
    not fused: it divides."""
    if INTERPRET:
        return tl.math.div_rn(y, s)
    else:
        f = tl.where(s < 7.888609052210118e-31, 1.2676506002282294e30, 1.0)
        sf = s * f
        r = tl.math.div_rn(tl.full(sf.shape, 1.0, tl.float32), sf)
        yf = y * f
        q = yf * r
        return tl.fma(tl.fma(-q, sf, yf), r, q)


@triton.jit
def _encode(y, s, z, PREC: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
            ASYM: tl.constexpr, INTERPRET: tl.constexpr):
    """Codes of fp32 values `y` for broadcastable scale `s` / zero point `z`."""
    r = _divide(y, s, INTERPRET)
    if PREC >= 2:  # fp8: (x / s) rounded to the float8 type
        r = tl.minimum(tl.maximum(r, QMIN), QMAX)
        if PREC == 2:
            return round_to_fp8(r, 3, -6).to(tl.float8e4nv)
        else:
            return round_to_fp8(r, 2, -14).to(tl.float8e5)
    else:
        if ASYM:
            r = round_half_even(tl.minimum(tl.maximum(r, -1024.0), 1024.0)) + z
            r = tl.minimum(tl.maximum(r, QMIN), QMAX)
            return r.to(tl.int32)
        else:
            return round_to_int(tl.minimum(tl.maximum(r, -QMAX), QMAX))


@triton.jit
def _store_codes(data_ptr, codes, offs_r, rmask, so_s, so_d, D,
                 PREC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    if PREC == 1:
        packed = pack_int4(codes, BLOCK_R, BLOCK_D)
        half = tl.arange(0, BLOCK_D // 2)
        m = rmask[:, None] & (half[None, :] < D // 2)
        tl.store(data_ptr + offs_r[:, None].to(tl.int64) * so_s + half[None, :] * so_d, packed,
                 mask=m)
    else:
        offs_d = tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (offs_d[None, :] < D)
        if PREC == 0:
            codes = codes.to(tl.int8)
        tl.store(data_ptr + offs_r[:, None].to(tl.int64) * so_s + offs_d[None, :].to(tl.int64) * so_d,
                 codes, mask=m)


@triton.jit
def _quantize_kernel(x_ptr, h_ptr, rscale, mean_ptr, range_ptr, data_ptr, scale_ptr, zp_ptr, lo_off, hi_off,
                     L2, S, D, group_rows, n_groups,
                     sx1, sx2, sxs, sxd,
                     so_l, so_s, so_d,
                     sg_l, sg_d,
                     MODE: tl.constexpr, PREC: tl.constexpr, QMIN: tl.constexpr,
                     QMAX: tl.constexpr, ASYM: tl.constexpr, HAS_MEAN: tl.constexpr,
                     WRITE_COL_SCALE: tl.constexpr, ROTATE: tl.constexpr, DOT_IEEE: tl.constexpr,
                     INTERPRET: tl.constexpr, TILES: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """Quantize one (row group or row chunk) x (all channels) slab of x[l].

    MODE 0: BLOCK_R rows, one group per row. MODE 1: one group of `group_rows` rows, read
    in chunks of BLOCK_R twice (range, then codes). MODE 2: BLOCK_R rows whose groups are
    columns; the group ranges come from range_ptr (min at lo_off, max at hi_off, index
    l * sg_l + d * sg_d, already with the mean removed); WRITE_COL_SCALE stores the
    per-channel scale once (program 0). MODE 0 / 2 programs take TILES consecutive tiles.
    ROTATE: every tile is rotated as it is loaded (_load_rows); the mean and ranges are
    those of the rotated x."""
    pid_g = tl.program_id(0)
    pid_l = tl.program_id(1)
    l1 = pid_l // L2
    l2 = pid_l % L2
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    x_base = x_ptr + l1.to(tl.int64) * sx1 + l2.to(tl.int64) * sx2
    o_base = data_ptr + pid_l.to(tl.int64) * so_l
    if HAS_MEAN:
        mean = tl.load(mean_ptr + pid_l * D + offs_d, mask=dmask, other=0.0)
    else:
        mean = tl.zeros((BLOCK_D,), dtype=tl.float32)
    hmat = _load_hadamard(h_ptr, ROTATE, BLOCK_D)

    if MODE == 1:
        r0 = pid_g * group_rows
        r1 = tl.minimum(r0 + group_rows, S)
        lo = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        hi = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for c in range(r0, r1, BLOCK_R):
            offs_r = c + tl.arange(0, BLOCK_R)
            m = (offs_r[:, None] < r1) & dmask[None, :]
            x = _load_rows(x_base + offs_r[:, None].to(tl.int64) * sxs + offs_d[None, :] * sxd, m,
                           hmat, rscale, ROTATE, DOT_IEEE)
            y = tl.where(m, x - mean[None, :], 0.0)
            lo = tl.minimum(lo, y)
            hi = tl.maximum(hi, y)
        glo = tl.min(tl.min(lo, axis=1), axis=0)
        ghi = tl.max(tl.max(hi, axis=1), axis=0)
        s, z = _scale_from_range(glo, ghi, QMIN, QMAX, ASYM)
        tl.store(scale_ptr + pid_l * n_groups + pid_g, s)
        tl.store(zp_ptr + pid_l * n_groups + pid_g, z.to(tl.int32))
        for c in range(r0, r1, BLOCK_R):
            offs_r = c + tl.arange(0, BLOCK_R)
            rmask = offs_r < r1
            m = rmask[:, None] & dmask[None, :]
            x = _load_rows(x_base + offs_r[:, None].to(tl.int64) * sxs + offs_d[None, :] * sxd, m,
                           hmat, rscale, ROTATE, DOT_IEEE)
            codes = _encode(x - mean[None, :], s, z, PREC, QMIN, QMAX, ASYM, INTERPRET)
            _store_codes(o_base, codes, offs_r, rmask, so_s, so_d, D, PREC, BLOCK_R, BLOCK_D)
    else:
        for t in range(TILES):  # (TILES > 1: the Hadamard matrix loaded once for several)
            tile = pid_g * TILES + t
            offs_r = tile * BLOCK_R + tl.arange(0, BLOCK_R)
            rmask = offs_r < S
            m = rmask[:, None] & dmask[None, :]
            x = _load_rows(x_base + offs_r[:, None].to(tl.int64) * sxs + offs_d[None, :] * sxd, m,
                           hmat, rscale, ROTATE, DOT_IEEE)
            y = tl.where(m, x - mean[None, :], 0.0)
            if MODE == 0:
                if ASYM:
                    rlo = tl.minimum(tl.min(y, axis=1), 0.0)
                    rhi = tl.maximum(tl.max(y, axis=1), 0.0)
                else:  # symmetric: one reduction, of |y| (the range's larger end)
                    rhi = tl.max(tl.abs(y), axis=1)
                    rlo = -rhi
                s, z = _scale_from_range(rlo, rhi, QMIN, QMAX, ASYM)
                tl.store(scale_ptr + pid_l * S + offs_r, s, mask=rmask)
                tl.store(zp_ptr + pid_l * S + offs_r, z.to(tl.int32), mask=rmask)
                codes = _encode(y, s[:, None], z[:, None], PREC, QMIN, QMAX, ASYM, INTERPRET)
            else:
                clo = tl.load(range_ptr + lo_off + pid_l * sg_l + offs_d * sg_d, mask=dmask, other=0.0)
                chi = tl.load(range_ptr + hi_off + pid_l * sg_l + offs_d * sg_d, mask=dmask, other=0.0)
                s, z = _scale_from_range(tl.minimum(clo, 0.0), tl.maximum(chi, 0.0), QMIN, QMAX, ASYM)
                if WRITE_COL_SCALE:
                    first = (offs_d * 0 + tile) == 0
                    tl.store(scale_ptr + pid_l * D + offs_d, s, mask=dmask & first)
                    tl.store(zp_ptr + pid_l * D + offs_d, z.to(tl.int32), mask=dmask & first)
                codes = _encode(y, s[None, :], z[None, :], PREC, QMIN, QMAX, ASYM, INTERPRET)
            _store_codes(o_base, codes, offs_r, rmask, so_s, so_d, D, PREC, BLOCK_R, BLOCK_D)


@triton.jit
def _dequantize_kernel(data_ptr, scale_ptr, zp_ptr, mean_ptr, out_ptr,
                       L2, S, D, block_size,
                       sd1, sd2, sds, sdd,
                       ss1, ss2, ssg, ssd,
                       sz1, sz2, szg, szd,
                       sm1, sm2, smd,
                       so1, so2, sos, sod,
                       PREC: tl.constexpr, HAS_ZP: tl.constexpr, HAS_MEAN: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_l = tl.program_id(1)
    l1 = (pid_l // L2).to(tl.int64)
    l2 = (pid_l % L2).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    rmask = offs_r < S
    m = rmask[:, None] & (offs_d[None, :] < D)
    dbase = data_ptr + l1 * sd1 + l2 * sd2
    if PREC == 1:
        half = tl.arange(0, BLOCK_D // 2)
        hm = rmask[:, None] & (half[None, :] < D // 2)
        packed = tl.load(dbase + offs_r[:, None].to(tl.int64) * sds + half[None, :] * sdd, mask=hm,
                         other=0.0)
        lo, hi = unpack_int4(packed)
        x = tl.reshape(tl.join(lo, hi), (BLOCK_R, BLOCK_D)).to(tl.float32)
    else:
        x = tl.load(dbase + offs_r[:, None].to(tl.int64) * sds + offs_d[None, :].to(tl.int64) * sdd,
                    mask=m, other=0.0).to(tl.float32)
    grp = (offs_r // block_size).to(tl.int64)
    if HAS_ZP:
        z = tl.load(zp_ptr + l1 * sz1 + l2 * sz2 + grp[:, None] * szg + offs_d[None, :] * szd,
                    mask=m, other=0)
        x = x - z.to(tl.float32)
    s = tl.load(scale_ptr + l1 * ss1 + l2 * ss2 + grp[:, None] * ssg + offs_d[None, :] * ssd,
                mask=m, other=0.0)
    x = x * s
    if HAS_MEAN:
        mu = tl.load(mean_ptr + l1 * sm1 + l2 * sm2 + offs_d * smd, mask=offs_d < D, other=0.0)
        x = x + mu[None, :]
    tl.store(out_ptr + l1 * so1 + l2 * so2 + offs_r[:, None].to(tl.int64) * sos + offs_d[None, :] * sod,
             x.to(out_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------------------- launchers
def _as4d(t: torch.Tensor) -> torch.Tensor:
    """View t (rank >= 1) as (L1, L2, S, D); only rank > 4 may copy."""
    if t.dim() == 1:
        return t.view(1, 1, 1, t.shape[0]) if t.is_contiguous() else t.reshape(1, 1, 1, -1)
    if t.dim() == 2:
        return t.unsqueeze(0).unsqueeze(0)
    if t.dim() == 3:
        return t.unsqueeze(0)
    if t.dim() == 4:
        return t
    return t.reshape(-1, *t.shape[-3:])


class LaunchTuning(NamedTuple):
    """Launch parameters of the quantize kernels (module default :data:`TUNING`; other
    settings were timed no faster, docs/studies.md). ``colstats_programs``: programs of
    the column-statistics pass (the sequence is cut into chunks to reach it);
    ``*_tile``: elements per program tile; ``*_warps``: warps per program."""
    colstats_programs: int = 528  # ~4 per SM on a 132-SM GPU
    colstats_tile: int = 4096
    colstats_warps: int = 4
    quant_tile: int = 4096
    quant_warps: int = 4
    rotate_tile: int = 8192  # quantize tile when rotating
    rotate_tiles: int = 4    # tiles per quantize program when rotating (one matrix load for them)


TUNING = LaunchTuning()


def _row_block(block_d: int, tile: int = 4096, most: int = 64) -> int:
    # keep a tile near `tile` elements: enough independent loads per program, few registers
    return max(1, min(most, tile // block_d))


_ROTATE_MAX_BLOCK = {2: 256, 4: 128}  # element size -> widest fused Hadamard matrix (shared memory)


def _rotation_block_d(D: int) -> int:
    return max(16, next_pow2(D))  # tensor-core dots need K >= 16


def _fused_rotation(D: int, dtype: torch.dtype) -> bool:
    """Whether the kernels rotate x themselves (else a float32 matmul rotates it first)."""
    return _rotation_block_d(D) <= _ROTATE_MAX_BLOCK[dtype.itemsize]


def _check_quantize_args(x, precision, granularity, block_size, strategy, smooth):
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"flash_quant.quantize: x must be a float32/float16/bfloat16 tensor, got "
                        f"{getattr(x, 'dtype', type(x))}")
    if x.dim() < 1:
        raise ValueError("flash_quant.quantize: x must have rank >= 1")
    if precision not in PRECISIONS:
        raise ValueError(f"flash_quant.quantize: precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"flash_quant.quantize: granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"flash_quant.quantize: strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "asymmetric" and precision.startswith("fp8"):
        raise ValueError("flash_quant.quantize: strategy 'asymmetric' is only defined for int8 / int4")
    if strategy == "legacy" and granularity != "per_tensor":
        raise ValueError("flash_quant.quantize: strategy 'legacy' needs granularity 'per_tensor'")
    if granularity == "per_head" and x.dim() < 3:
        raise ValueError("flash_quant.quantize: granularity 'per_head' needs x of rank >= 3")
    if granularity == "per_channel" and x.dim() < 2:
        raise ValueError("flash_quant.quantize: granularity 'per_channel' needs x of rank >= 2")
    if granularity == "per_block" and x.dim() < 2:
        raise ValueError("flash_quant.quantize: granularity 'per_block' needs x of rank >= 2")
    if granularity == "per_block" and block_size < 1:
        raise ValueError(f"flash_quant.quantize: block_size must be >= 1 for per_block, got {block_size}")
    if smooth and x.dim() < 2:
        raise ValueError("flash_quant.quantize: smooth=True needs x of rank >= 2")
    if precision == "int4" and x.shape[-1] % 2:
        raise ValueError(f"flash_quant.quantize: int4 needs an even last dim, got {x.shape[-1]}")
    if x.shape[-1] > 16384:
        raise ValueError(f"flash_quant.quantize: last dim {x.shape[-1]} exceeds the kernel limit 16384")


class _QuantizePlan(NamedTuple):
    """Everything quantize_launch derives from a call's signature (see host.PlanCache)."""
    as4d: bool                 # rank > 4: x is reshaped to 4-d per call (may copy)
    data_shape: Tuple[int, ...]  # contiguous data, or the K-major buffer lead + (D, S_pad)
    transposed: bool
    pad_tail: bool             # K-major buffer with S_pad > S: zero the padding
    S: int
    data_dtype: torch.dtype
    L: int                     # leading index count of the 4-d view (a stats plane is L x D)
    D: int
    stats_shape: Optional[Tuple[int, ...]]  # one fp32 work buffer: stats planes, then chunk partials
    colstats_grid: Optional[Tuple[int, int, int]]
    colstats_args: Tuple
    colstats_meta: Dict
    reduce_args: Tuple
    reduce_grid: Optional[Tuple[int, int]]
    reduce_meta: Dict
    mean_shape: Optional[Tuple[int, ...]]
    scale_shape: Tuple[int, ...]
    scale_alloc: Optional[Tuple[int, ...]]  # None: the scale comes from a torch reduction (per_head/tensor)
    quant_grid: Tuple[int, int]
    quant_args: Tuple
    quant_meta: Dict
    hmat: Optional[torch.Tensor]  # the ±1 Hadamard matrix of a fused rotation
    rscale: float                 # 1 / sqrt(Hadamard block)
    kernels: Dict  # compiled kernels of host.launch, filled by launches


_PLANS = PlanCache()


def _plan_quantize(x, precision, granularity, block_size, strategy, smooth, rotate,
                   has_center=False) -> _QuantizePlan:
    _check_quantize_args(x, precision, granularity, block_size, strategy, smooth)
    prec_code, qmin, qmax, ddtype = PRECISIONS[precision]
    asym = strategy == "asymmetric"
    shape = tuple(x.shape)
    rank = len(shape)
    x4 = _as4d(x)
    L1, L2, S, D = x4.shape
    L = L1 * L2
    block_d = next_pow2(max(D, 16 if prec_code == 1 else 1))
    lead = shape[:-2] if rank >= 2 else ()
    hmat, rscale = None, 1.0
    # float32 input and the interpreter (no 16-bit dots) rotate with fp32 products
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    dot_ieee = x.dtype == torch.float32 or interpreting
    if rotate:  # (quantize_launch rotates first when the matrix is too wide to fuse)
        block_d = _rotation_block_d(D)
        hmat = _hadamard_pm1(D, block_d, x.device, torch.float32 if dot_ieee else x.dtype)
        rscale = 1.0 / math.sqrt(D & -D)
    rot = dict(ROTATE=rotate, DOT_IEEE=dot_ieee)
    tiles = TUNING.rotate_tiles if rotate else 1

    # --- data buffer (contiguous, or transposed K-major for 8-bit per_channel)
    d_cols = D // 2 if prec_code == 1 else D
    transposed = data_layout(shape, precision, granularity) == "transposed"
    if transposed:
        s_pad = cuda_kmajor_seq_len(S)
        data_shape = lead + (D, s_pad)
        out_strides = (D * s_pad, 1, s_pad)
    else:
        s_pad = S
        data_shape = shape[:-1] + (d_cols,)
        out_strides = (S * d_cols, d_cols, 1)

    need_cols = granularity in ("per_channel", "per_head", "per_tensor")
    planes = 3 if need_cols else 1
    stats_shape = colstats_grid = None
    colstats_args = reduce_args = ()
    colstats_meta = reduce_meta = {}
    reduce_grid = None
    # a given centre replaces the column-mean pass; the column ranges still need it
    if need_cols or (smooth and not has_center):
        # (64-wide column blocks, ~4 programs per SM: whole 128-wide rows with ~8 per SM
        # measured no faster for K and 13 µs slower for V at the Flux shape, H100)
        # rotating with column ranges: the whole row per tile (the matrix mixes every
        # channel); for the mean alone the reduce kernel rotates mean(x) instead
        bd = block_d if rotate and need_cols else min(block_d, 64)
        bs = max(16, min(256, TUNING.colstats_tile // bd))
        # enough sequence chunks for ~4 programs per SM on a large GPU (528 = 4 x 132)
        chunks = max(1, min(cdiv(S, bs), cdiv(TUNING.colstats_programs, cdiv(D, bd) * L)))
        s_chunk = cdiv(cdiv(S, chunks), bs) * bs
        chunks = cdiv(S, s_chunk)
        # stats planes first (so the mean is a view at offset 0), then the partials
        stats_shape = (planes * L * D + planes * chunks * L * D,)
        colstats_grid = (cdiv(D, bd), L, chunks)
        colstats_args = (planes * L * D, L, L2, S, D, s_chunk, *x4.stride())
        colstats_meta = dict(RANGE=need_cols, BLOCK_S=bs, BLOCK_D=bd, num_warps=TUNING.colstats_warps,
                             ROTATE=rotate and need_cols, DOT_IEEE=dot_ieee)
        reduce_args = (planes * L * D, chunks, L, D, 1.0 / S)
        reduce_meta = dict(SMOOTH=smooth, CENTER=has_center, RANGE=need_cols,
                           ROTATE=rotate and not need_cols and smooth and not has_center,
                           BLOCK_D=min(block_d, 1024), BLOCK_C=min(block_d, 32))
        reduce_grid = (L, block_d // reduce_meta["BLOCK_C"] if reduce_meta["ROTATE"] else 1)

    sshape = scale_shape(shape, granularity, block_size)
    br = _row_block(block_d, TUNING.rotate_tile, 128) if rotate else _row_block(block_d, TUNING.quant_tile)
    common = dict(PREC=prec_code, QMIN=qmin, QMAX=qmax, ASYM=asym, HAS_MEAN=smooth,
                  INTERPRET=interpreting, num_warps=TUNING.quant_warps, **rot)
    if granularity in ("per_token", "per_block"):
        scale_alloc = sshape
        if granularity == "per_token" or block_size == 1:
            grid = (cdiv(cdiv(S, br), tiles), L)
            mode, n_groups, grows = _MODE_ROW, S, 1
        else:
            n_groups = cdiv(S, block_size)
            grows = block_size
            br = min(br, next_pow2(grows))
            if rotate:
                br = max(br, 16)  # (dot rows; the rows past the group are masked)
            grid = (n_groups, L)
            mode, tiles = _MODE_BLOCK, 1
        quant_args = (0, 0, L2, S, D, grows, n_groups, *x4.stride(), *out_strides, 0, 0)
        quant_meta = dict(common, MODE=mode, WRITE_COL_SCALE=False, TILES=tiles, BLOCK_R=br, BLOCK_D=block_d)
    else:
        # column groups: the ranges are stats planes 1 (min) and 2 (max), per (l, d)
        if granularity == "per_channel":
            scale_alloc = (L, D)
            lo_off, hi_off, sg_l, sg_d, write = L * D, 2 * L * D, D, 1, True
        else:  # per_head / per_tensor: group ranges reduced by torch, in their own buffer
            scale_alloc = None
            lo_off, hi_off = 0, (L if granularity == "per_head" else 1)
            sg_l, sg_d, write = (1 if granularity == "per_head" else 0), 0, False
        grid = (cdiv(cdiv(S, br), tiles), L)
        quant_args = (lo_off, hi_off, L2, S, D, 1, 1, *x4.stride(), *out_strides, sg_l, sg_d)
        quant_meta = dict(common, MODE=_MODE_COLS, WRITE_COL_SCALE=write, TILES=tiles, BLOCK_R=br,
                          BLOCK_D=block_d)
    return _QuantizePlan(
        as4d=rank > 4, data_shape=data_shape, transposed=transposed,
        pad_tail=transposed and s_pad != S, S=S, data_dtype=ddtype, L=L, D=D,
        stats_shape=stats_shape, colstats_grid=colstats_grid, colstats_args=colstats_args,
        colstats_meta=colstats_meta, reduce_args=reduce_args, reduce_grid=reduce_grid, reduce_meta=reduce_meta,
        mean_shape=lead + (1, D) if smooth and not has_center else None, scale_shape=sshape, scale_alloc=scale_alloc,
        quant_grid=grid, quant_args=quant_args, quant_meta=quant_meta, hmat=hmat, rscale=rscale,
        kernels={})


def quantize_launch(x: torch.Tensor, precision: str, granularity: str, block_size: int,
                    strategy: str, smooth: bool, rotate: bool = False,
                    center: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the quantize kernels on x (CUDA, or CPU under TRITON_INTERPRET=1). center: the
    smoothing centre to subtract instead of the mean (docs/op_contract.md)."""
    if not isinstance(x, torch.Tensor):
        _check_quantize_args(x, precision, granularity, block_size, strategy, smooth)  # raises
    if center is not None:  # checked before any kernel; a fresh (L, D) copy, returned as `mean`
        _check_quantize_args(x, precision, granularity, block_size, strategy, smooth)
        center = checked_center(x, center, smooth)
    if rotate and x.dim() >= 1 and not _fused_rotation(x.shape[-1], x.dtype):
        # too wide for the fused matrix: rotate in float32 first (same values, one more pass)
        x = rotation.rotate(x.float())
        rotate = False
    key = (x.shape, x.stride(), x.dtype, x.device, precision, granularity, block_size, strategy, smooth,
           rotate, center is not None, TUNING)  # (TUNING is module state: a plan made under other settings is another plan)
    p = _PLANS.get_or_put(key, lambda: _plan_quantize(x, precision, granularity, block_size, strategy, smooth,
                                                      rotate, center is not None))
    dev = x.device
    x4 = _as4d(x) if p.as4d else x  # rank <= 4: the kernels read x itself with the 4-d strides
    buf = torch.empty(p.data_shape, dtype=p.data_dtype, device=dev)
    if p.transposed:
        if p.pad_tail:
            buf[..., p.S:].zero_()
        data = buf[..., :p.S].transpose(-1, -2)
    else:
        data = buf

    hmat = p.hmat if p.hmat is not None else x4  # dummy pointer without rotation
    work = None
    if p.stats_shape is not None:
        work = torch.empty(p.stats_shape, dtype=torch.float32, device=dev)
        host.launch(_colstats_kernel, p.colstats_grid, (x4, hmat, p.rscale, work, *p.colstats_args),
                    p.colstats_meta, p.kernels, "colstats")
        host.launch(_colstats_reduce_kernel, p.reduce_grid,
                    (work, *p.reduce_args, hmat, p.rscale, center if center is not None else work),
                    p.reduce_meta, p.kernels, "reduce")
    if p.mean_shape is not None:
        mean = work[:p.L * p.D].view(p.mean_shape)
    elif center is not None:
        mean = center
    else:
        mean = torch.empty((0,), dtype=torch.float32, device=dev)
    mean_arg = work if p.mean_shape is not None else center if center is not None else x4  # (dummy: x4)

    if p.scale_alloc is not None:
        scale = torch.empty(p.scale_alloc, dtype=torch.float32, device=dev)
        zp = torch.empty(p.scale_alloc, dtype=torch.int32, device=dev)
        ranges = work if work is not None else x4  # dummy pointer for row groups
    else:  # per_head / per_tensor: the group range over the columns' ranges, in torch
        prec_code, qmin, qmax, _ = PRECISIONS[precision]
        n = p.L * p.D  # stats planes: mean, min, max
        lo, hi = work[n:2 * n].view(p.L, p.D), work[2 * n:3 * n].view(p.L, p.D)
        if granularity == "per_head":
            lo, hi = lo.amin(dim=1, keepdim=True), hi.amax(dim=1, keepdim=True)
        else:
            lo, hi = lo.amin().view(1, 1), hi.amax().view(1, 1)
        scale, zp = _scale_from_range_torch(lo, hi, qmin, qmax, strategy == "asymmetric")
        ranges = torch.cat([lo.reshape(-1), hi.reshape(-1)])
    host.launch(_quantize_kernel, p.quant_grid,
                (x4, hmat, p.rscale, mean_arg, ranges, data, scale, zp, *p.quant_args),
                p.quant_meta, p.kernels, "quantize")
    if p.scale_alloc != p.scale_shape:
        scale, zp = scale.view(p.scale_shape), zp.view(p.scale_shape)
    return data, scale, zp, mean


def _scale_from_range_torch(lo, hi, qmin, qmax, asym):
    """Same arithmetic as _scale_from_range, on small group tensors."""
    if asym:
        s = (hi - lo) / (qmax - qmin)
        s = torch.where(s == 0, torch.ones_like(s), s)
        z = torch.round(qmin - lo / s).clamp(qmin, qmax)
    else:
        s = torch.maximum(-lo, hi) / qmax
        s = torch.where(s == 0, torch.ones_like(s), s)
        z = torch.zeros_like(s)
    return s.contiguous(), z.to(torch.int32).contiguous()


def dequantize_launch(data: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                      mean: torch.Tensor, precision: str, block_size: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """(data - zero_point) * scale + mean in `dtype` (CUDA, or CPU under interpretation)."""
    if precision not in PRECISIONS:
        raise ValueError(f"flash_quant.dequantize: precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    prec_code, _, _, ddtype = PRECISIONS[precision]
    if data.dtype != ddtype:
        raise TypeError(f"flash_quant.dequantize: data dtype {data.dtype} does not match precision "
                        f"{precision!r} (expected {ddtype})")
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"flash_quant.dequantize: dtype must be float32/float16/bfloat16, got {dtype}")
    if scale.dtype != torch.float32:
        raise TypeError(f"flash_quant.dequantize: scale must be float32, got {scale.dtype}")
    if data.dim() < 1 or scale.dim() > data.dim():
        raise ValueError(f"flash_quant.dequantize: scale of rank {scale.dim()} does not fit data of rank {data.dim()}")
    shape = tuple(data.shape)
    if prec_code == 1:
        shape = shape[:-1] + (shape[-1] * 2,)
    D = shape[-1]
    S = shape[-2] if len(shape) >= 2 else 1
    lead = shape[:-2] if len(shape) >= 2 else ()
    groups = scale.shape[-2] if scale.dim() >= 2 else 1
    # block_size only counts for row groups of several rows (the schema; as the CPU kernel):
    # one group, or one group a row (per_token), ignores it
    if groups > 1 and groups == S:
        block_size = 1
    if groups > 1 and block_size < 1:
        raise ValueError(f"flash_quant.dequantize: block_size must be >= 1, got {block_size}")
    if groups > 1 and groups != -(-S // block_size):
        raise ValueError(f"flash_quant.dequantize: scale has {groups} row groups but data has {S} rows "
                         f"in blocks of {block_size}")
    gshape = lead + (groups, D) if len(shape) >= 2 else (D,)
    try:
        s_full = scale.expand(gshape)
        z_full = zero_point.expand(gshape) if zero_point.numel() else None
        m_full = mean.expand(lead + (1, D)) if mean.numel() else None
    except RuntimeError as exc:
        raise ValueError(f"flash_quant.dequantize: scale {tuple(scale.shape)} / zero_point "
                         f"{tuple(zero_point.shape)} / mean {tuple(mean.shape)} do not broadcast to "
                         f"{shape}: {exc}") from None
    if z_full is not None and zero_point.dtype != torch.int32:
        raise TypeError(f"flash_quant.dequantize: zero_point must be int32, got {zero_point.dtype}")
    out = torch.empty(shape, dtype=dtype, device=data.device)
    d4, s4, o4 = _as4d(data), _as4d(s_full), _as4d(out)
    z4 = _as4d(z_full) if z_full is not None else s4
    m4 = _as4d(m_full) if m_full is not None else s4
    L1, L2 = o4.shape[0], o4.shape[1]
    bd = next_pow2(max(D, 16 if prec_code == 1 else 1))
    br = _row_block(bd)
    bsz = block_size if groups > 1 else (1 << 30)
    ssg = s4.stride(2) if groups > 1 else 0
    szg = z4.stride(2) if groups > 1 else 0
    _dequantize_kernel[(cdiv(S, br), L1 * L2)](
        d4, s4, z4, m4, o4, L2, S, D, bsz,
        *d4.stride(),
        s4.stride(0), s4.stride(1), ssg, s4.stride(3),
        z4.stride(0), z4.stride(1), szg, z4.stride(3),
        m4.stride(0), m4.stride(1), m4.stride(3),
        *o4.stride(),
        PREC=prec_code, HAS_ZP=z_full is not None, HAS_MEAN=m_full is not None,
        BLOCK_R=br, BLOCK_D=bd)
    return out


# ----------------------------------------------------------------- op kernels (CUDA key)
def quantize_cuda(x, precision, granularity, block_size, strategy, smooth, rotate=False, center=None):
    if x.device.type != "cuda":
        raise RuntimeError(f"flash_quant.quantize (CUDA kernel): x is on {x.device}")
    with torch.cuda.device(x.device):
        return quantize_launch(x, precision, granularity, block_size, strategy, smooth, rotate, center)


def dequantize_cuda(data, scale, zero_point, mean, precision, block_size, dtype):
    for name, t in (("data", data), ("scale", scale), ("zero_point", zero_point), ("mean", mean)):
        if t.numel() and t.device != data.device:
            raise RuntimeError(f"flash_quant.dequantize (CUDA kernel): {name} is on {t.device}, data on {data.device}")
    with torch.cuda.device(data.device):
        return dequantize_launch(data, scale, zero_point, mean, precision, block_size, dtype)


torch.library.register_kernel("flash_quant::quantize", "cuda", quantize_cuda)
torch.library.register_kernel("flash_quant::dequantize", "cuda", dequantize_cuda)
