"""Triton append kernels of QuantizedKVCache on CUDA (issue 18 item 3): new tokens are
quantized straight into the preallocated buffers at the device token count, in one to
three launches (the torch reference, QuantizedKVCache._append_torch, takes 10-25 small
ops). No host sync; a captured graph replays them at any length. The rules are the
reference's (flash_quant/kv_cache.py): the same formulas, ties rounded to even, IEEE
division, fp16 scales rounded before the codes are computed against them.

int8       one kernel, a program per (b*h, token): K centred, smoothed, per-token codes; V
           per-token codes.
int4 V     a program per (b*h, token): per-group scale / zero stored, then the codes.
int4 K     the window logic of _append_keys_int4 in two launches: (A) a program per (b*h,
           stage group) quantizes each group completed by the new tokens (window rows then
           new keys) per channel into its slot; (B) the new keys past the last complete
           group become the window. A runs before B (stream order): A reads the window B
           rewrites.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import Precision
from .common import round_half_even
from .host import PlanCache, cdiv, launch, tensor_signature

__all__ = ["append_cuda", "supported"]

# the cache's code ranges (kv_cache.INT8_MAX / INT4_MAX; that module imports this one), as
# constexprs: a Triton kernel may read no other kind of global
INT8_MAX = tl.constexpr(float(Precision.INT8.qmax))
INT4_MAX = tl.constexpr(float(Precision.INT4.qmax - Precision.INT4.qmin))
_PLANS = PlanCache()


@triton.jit
def _int8_row(x):
    """Symmetric per-row int8 of a fp32 row: (codes, scale), as kv_cache._symmetric_int8."""
    scale = tl.math.div_rn(tl.max(tl.abs(x), 0), INT8_MAX)
    safe = tl.where(scale > 0, scale, 1.0)
    codes = round_half_even(tl.math.div_rn(x, safe))
    return tl.minimum(tl.maximum(codes, -INT8_MAX), INT8_MAX).to(tl.int8), scale


@triton.jit
def _append_int8_kernel(k_ptr, v_ptr, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                        center_ptr, smooth_ptr, kc_ptr, ks_ptr, vc_ptr, vs_ptr, len_ptr,
                        HKV: tl.constexpr, D: tl.constexpr, L: tl.constexpr):
    bh = tl.program_id(0)
    t = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    pos = tl.load(len_ptr) + t
    c = tl.arange(0, D)
    k = tl.load(k_ptr + b * sk_b + h * sk_h + t * sk_t + c).to(tl.float32)
    k = tl.math.div_rn(k - tl.load(center_ptr + bh * D + c), tl.load(smooth_ptr + bh * D + c))
    codes, scale = _int8_row(k)
    tl.store(kc_ptr + (bh * L + pos) * D + c, codes)
    tl.store(ks_ptr + bh * L + pos, scale)
    v = tl.load(v_ptr + b * sv_b + h * sv_h + t * sv_t + c).to(tl.float32)
    codes, scale = _int8_row(v)
    tl.store(vc_ptr + (bh * L + pos) * D + c, codes)
    tl.store(vs_ptr + bh * L + pos, scale)


@triton.jit
def _int4_codes(x, scale16, zero16):
    """Asymmetric 4-bit codes of fp32 x against the stored fp16 scale and zero."""
    s = scale16.to(tl.float32)
    safe = tl.where(s > 0, s, 1.0)
    codes = round_half_even(tl.math.div_rn(x - zero16.to(tl.float32), safe))
    return tl.minimum(tl.maximum(codes, 0.0), INT4_MAX).to(tl.uint8)


@triton.jit
def _append_v_int4_kernel(v_ptr, sv_b, sv_h, sv_t, vc_ptr, vs_ptr, vz_ptr, len_ptr,
                          HKV: tl.constexpr, D: tl.constexpr, L: tl.constexpr, VG: tl.constexpr):
    HALF: tl.constexpr = D // 2
    NG: tl.constexpr = D // VG
    bh = tl.program_id(0)
    t = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    pos = tl.load(len_ptr) + t
    row = v_ptr + b * sv_b + h * sv_h + t * sv_t
    x = tl.reshape(tl.load(row + tl.arange(0, D)).to(tl.float32), (NG, VG))
    lo = tl.min(x, 1)
    scale16 = tl.math.div_rn(tl.max(x, 1) - lo, INT4_MAX).to(tl.float16)
    g = tl.arange(0, NG)
    tl.store(vs_ptr + (bh * L + pos) * NG + g, scale16)
    tl.store(vz_ptr + (bh * L + pos) * NG + g, lo.to(tl.float16))
    tl.debug_barrier()  # the codes read the stored (rounded) scale / zero back per channel
    c = tl.arange(0, HALF)
    x_lo = tl.load(row + c).to(tl.float32)
    x_hi = tl.load(row + HALF + c).to(tl.float32)
    meta = (bh * L + pos) * NG
    q_lo = _int4_codes(x_lo, tl.load(vs_ptr + meta + c // VG), tl.load(vz_ptr + meta + c // VG))
    q_hi = _int4_codes(x_hi, tl.load(vs_ptr + meta + (HALF + c) // VG), tl.load(vz_ptr + meta + (HALF + c) // VG))
    tl.store(vc_ptr + (bh * L + pos) * HALF + c, q_lo | (q_hi << 4))


@triton.jit
def _append_k_groups_kernel(k_ptr, sk_b, sk_h, sk_t, kw_ptr, kc_ptr, ks_ptr, kz_ptr, len_ptr, T,
                            HKV: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                            GROUP_SLOTS: tl.constexpr):
    HALF: tl.constexpr = D // 2
    bh = tl.program_id(0)
    j = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    length = tl.load(len_ptr)
    fill = length % G
    complete = (fill + T) // G
    if j < complete:
        r = j * G + tl.arange(0, G)                 # stage rows: window rows, then new keys
        in_window = r < fill
        c = tl.arange(0, HALF)
        w_rows = kw_ptr + (bh * G + r)[:, None] * D
        k_rows = k_ptr + b * sk_b + h * sk_h + (r - fill)[:, None] * sk_t
        x_lo = tl.where(in_window[:, None],
                        tl.load(w_rows + c[None, :], mask=in_window[:, None], other=0.0).to(tl.float32),
                        tl.load(k_rows + c[None, :], mask=~in_window[:, None], other=0.0).to(tl.float32))
        x_hi = tl.where(in_window[:, None],
                        tl.load(w_rows + HALF + c[None, :], mask=in_window[:, None], other=0.0).to(tl.float32),
                        tl.load(k_rows + HALF + c[None, :], mask=~in_window[:, None], other=0.0).to(tl.float32))
        slot = length // G + j
        meta = (bh * GROUP_SLOTS + slot) * D
        lo_lo = tl.min(x_lo, 0)
        lo_hi = tl.min(x_hi, 0)
        s_lo = tl.math.div_rn(tl.max(x_lo, 0) - lo_lo, INT4_MAX).to(tl.float16)
        s_hi = tl.math.div_rn(tl.max(x_hi, 0) - lo_hi, INT4_MAX).to(tl.float16)
        z_lo = lo_lo.to(tl.float16)
        z_hi = lo_hi.to(tl.float16)
        tl.store(ks_ptr + meta + c, s_lo)
        tl.store(ks_ptr + meta + HALF + c, s_hi)
        tl.store(kz_ptr + meta + c, z_lo)
        tl.store(kz_ptr + meta + HALF + c, z_hi)
        q_lo = _int4_codes(x_lo, s_lo[None, :], z_lo[None, :])
        q_hi = _int4_codes(x_hi, s_hi[None, :], z_hi[None, :])
        tl.store(kc_ptr + ((bh * GROUP_SLOTS + slot) * G + tl.arange(0, G))[:, None] * HALF + c[None, :],
                 q_lo | (q_hi << 4))


@triton.jit
def _append_k_window_kernel(k_ptr, sk_b, sk_h, sk_t, kw_ptr, len_ptr, T, T0,
                            HKV: tl.constexpr, D: tl.constexpr, G: tl.constexpr):
    bh = tl.program_id(0)
    t = T0 + tl.program_id(1)                       # only the last G new keys can stay
    b = bh // HKV
    h = bh % HKV
    fill = tl.load(len_ptr) % G
    rest = fill + t - ((fill + T) // G) * G         # its window row; < 0: in a complete group
    c = tl.arange(0, D)
    x = tl.load(k_ptr + b * sk_b + h * sk_h + t * sk_t + c)
    # (all D channels where the key stays in the window, none where its group is complete; a
    # tensor mask: the interpreter of Triton >= 3.9 rejects a scalar condition and-ed in)
    tl.store(kw_ptr + (bh * G + rest) * D + c, x.to(kw_ptr.dtype.element_ty), mask=c < tl.where(rest >= 0, D, 0))


def supported(cache) -> bool:
    """The kernels index rows with tl.arange: head_dim and int4's groups powers of two."""
    pow2 = lambda n: n >= 1 and n & (n - 1) == 0  # noqa: E731
    return pow2(cache.head_dim) and (cache.precision == "int8" or (pow2(cache.k_group) and pow2(cache.v_group)))


def _plan(cache, k, v):
    b, h, t, d = k.shape
    p = {"kernels": [{}, {}, {}, {}], "grid": (b * h, t)}
    if cache.precision == "int8":
        return p
    g = cache.k_group
    p["groups_grid"] = (b * h, cdiv(g + t, g))
    t0 = max(0, t - g)
    p["window"] = ((b * h, t - t0), t0)
    return p


def append_cuda(cache, k: torch.Tensor, v: torch.Tensor) -> None:
    """Quantize k, v (B, Hkv, T, D; checked by the cache) into the cache's buffers at its
    device length (the caller advances the counters afterwards). Needs :func:`supported`."""
    b, h, t, d = k.shape
    key = (cache.precision, tensor_signature(k), tensor_signature(v), cache.k_codes.shape,
           cache.k_group, cache.v_group, cache.dtype)
    plan = _PLANS.get_or_put(key, lambda: _plan(cache, k, v))
    L = cache.max_len
    if cache.precision == "int8":
        launch(_append_int8_kernel, plan["grid"],
               (k, v, *k.stride()[:3], *v.stride()[:3], cache.k_center, cache.k_smooth, cache.k_codes,
                cache.k_scale, cache.v_codes, cache.v_scale, cache.length_tensor),
               dict(HKV=h, D=d, L=L), plan["kernels"][0], key)
        return
    launch(_append_v_int4_kernel, plan["grid"],
           (v, *v.stride()[:3], cache.v_codes, cache.v_scale, cache.v_zero, cache.length_tensor),
           dict(HKV=h, D=d, L=L, VG=cache.v_group), plan["kernels"][1], key)
    launch(_append_k_groups_kernel, plan["groups_grid"],
           (k, *k.stride()[:3], cache.k_window, cache.k_codes, cache.k_scale, cache.k_zero,
            cache.length_tensor, t),
           dict(HKV=h, D=d, G=cache.k_group, GROUP_SLOTS=cache.k_scale.shape[2]), plan["kernels"][2], key)
    grid, t0 = plan["window"]
    launch(_append_k_window_kernel, grid, (k, *k.stride()[:3], cache.k_window, cache.length_tensor, t, t0),
           dict(HKV=h, D=d, G=cache.k_group), plan["kernels"][3], key)
