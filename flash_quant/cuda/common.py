"""Shared Triton helpers of flash_quant's CUDA backend.

Used by the quantize/dequantize kernels (quantize.py), the attention forward kernel
(forward.py) and the backward kernels (backward.py). Everything here is either a plain
Python constant or a ``@triton.jit`` function; nothing launches a kernel. The API below
is stable: change a signature only together with every caller.

Operand kinds (the ``KIND`` constexpr of the load helpers), chosen from the data dtype
by :func:`operand_kind`:

=============  ==========================  ===========================================
kind           data dtype                  tile returned by :func:`load_codes`
=============  ==========================  ===========================================
KIND_FLOAT     fp32 / fp16 / bf16          the values, in the tensor's dtype
KIND_INT8      int8                        the int8 codes
KIND_INT4      uint8, 2 values per byte    (lo, hi): int8 codes of the even / odd columns
KIND_FP8       float8_e4m3fn / e5m2        the fp8 codes
=============  ==========================  ===========================================

INT4 packing (docs/op_contract.md): element ``2i`` of a row is the low nibble of byte
``i``, element ``2i+1`` the high nibble, both signed 4-bit two's complement. The INT4
helpers never interleave: a dot product over D is the sum of a dot over the even columns
(low nibbles) and one over the odd columns (high nibbles), which is how the forward
kernel multiplies INT4 Q by INT4 K on the INT8 tensor cores.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = [
    "LOG2E",
    "LN2",
    "KIND_FLOAT",
    "KIND_INT8",
    "KIND_INT4",
    "KIND_FP8",
    "MASK_NONE",
    "MASK_BOOL",
    "MASK_ADDITIVE",
    "KernelConstant",
    "operand_kind",
    "round_half_even",
    "round_to_int",
    "int_to_float",
    "round_to_fp8",
    "enable_interpreter_numpy_compat",
    "unpack_int4",
    "pack_int4",
    "interleave_int4",
    "load_codes",
    "load_dequant",
    "load_row_vector",
    "score_mask",
]

# tl.constexpr so that @triton.jit code may read them (the compiler refuses plain Python
# globals; the interpreter does not check). Host code: use float(LOG2E) / LOG2E.value.
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): softmax runs in base 2, folded into scale
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): converts the base-2 lse back to a natural log


class KernelConstant(int, tl.constexpr):
    """A named mode number: a plain int to host code (plans, cache keys, launch
    arguments), and a tl.constexpr that @triton.jit code may compare against. The Triton
    compiler refuses globals that are not constexpr; the interpreter does not check, so
    a plain int global would pass the interpreter tests and fail to compile on a GPU."""

    def __init__(self, value: int):
        tl.constexpr.__init__(self, int(value))


# Operand kinds (the KIND constexprs; see the module docstring).
KIND_FLOAT = KernelConstant(0)
KIND_INT8 = KernelConstant(1)
KIND_INT4 = KernelConstant(2)
KIND_FP8 = KernelConstant(3)

# Mask kinds (the MASK_KIND constexpr of score_mask and the attention kernels).
MASK_NONE = KernelConstant(0)
MASK_BOOL = KernelConstant(1)  # bool, True = attend
MASK_ADDITIVE = KernelConstant(2)  # floating, added to the scores

_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def operand_kind(dtype: torch.dtype) -> int:
    """The KIND constexpr for a tensor of `dtype` (see the module docstring)."""
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return KIND_FLOAT
    if dtype == torch.int8:
        return KIND_INT8
    if dtype == torch.uint8:
        return KIND_INT4
    if dtype in _FP8_DTYPES:
        return KIND_FP8
    raise TypeError(f"flash_quant: no operand kind for dtype {dtype}")


@triton.jit
def round_half_even(x):
    """Round fp32 `x` to the nearest integer, ties to even (|x| < 2**22).

    Adding and subtracting 1.5 * 2**23 leaves the fp32 adder's round-to-nearest-even
    result; it matches torch.round (the CPU backend's rounding) bit for bit.
    """
    return (x + 12582912.0) - 12582912.0


@triton.jit
def round_to_int(x):
    """fp32 `x` (|x| < 2**22) -> the nearest int32, ties to even, without a conversion
    instruction: after adding 1.5 * 2**23 the integer sits in the low mantissa bits.
    Measured on the H100 (docs/studies.md, forward kernel techniques): with
    :func:`int_to_float` this took the INT8 P·V forward from 0.67 to 0.54 ms at the Flux
    shape."""
    return (x + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000


@triton.jit
def int_to_float(x):
    """int32 `x` (|x| < 2**22, e.g. an INT8 dot over D <= 256: 127 * 127 * 256 < 2**22)
    -> fp32, exactly: the inverse of :func:`round_to_int`'s bit trick (an integer add and
    a float subtract instead of the conversion instruction)."""
    return (x + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def round_to_fp8(v, MBITS: tl.constexpr, EMIN: tl.constexpr):
    """Round fp32 `v` (finite, within the fp8 range) to the nearest value of an fp8 format
    with MBITS mantissa bits and minimum normal exponent EMIN, ties to even; the result
    is an fp32 holding that value exactly (so the cast to fp8 that follows is exact).
    e4m3: MBITS=3, EMIN=-6; e5m2: MBITS=2, EMIN=-14. Used where the conversion must not
    depend on the hardware (or interpreter) rounding of fp32 -> fp8."""
    bits = v.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    e = tl.maximum(e, EMIN) - MBITS
    step = ((e + 127) << 23).to(tl.float32, bitcast=True)
    inv = ((127 - e) << 23).to(tl.float32, bitcast=True)
    return round_half_even(v * inv) * step


@triton.jit
def unpack_int4(packed):
    """Bytes (uint8 tile) -> (lo, hi) int8 tiles of the signed nibbles.

    lo holds the even columns of the logical row, hi the odd ones."""
    b = packed.to(tl.int32)
    lo = ((b & 0xF) ^ 0x8) - 0x8
    hi = (((b >> 4) & 0xF) ^ 0x8) - 0x8
    return lo.to(tl.int8), hi.to(tl.int8)


@triton.jit
def pack_int4(q, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Integer tile (ROWS, COLS) of values in [-8, 7] -> uint8 tile (ROWS, COLS // 2)."""
    pairs = tl.reshape(q.to(tl.int32), (ROWS, COLS // 2, 2))
    even, odd = tl.split(pairs)
    return ((even & 0xF) | ((odd & 0xF) << 4)).to(tl.uint8)


@triton.jit
def interleave_int4(lo, hi, ROWS: tl.constexpr, HALF: tl.constexpr):
    """(lo, hi) tiles of shape (ROWS, HALF) -> the logical (ROWS, 2 * HALF) tile."""
    return tl.reshape(tl.join(lo, hi), (ROWS, 2 * HALF))


@triton.jit
def load_codes(base, offs_r, offs_c, stride_r, stride_c, mask_r, n_cols, KIND: tl.constexpr,
               BLOCK_C: tl.constexpr):
    """Load a (len(offs_r), BLOCK_C) tile of an operand in its stored precision.

    `offs_c` are the logical columns 0..BLOCK_C-1 and `n_cols` the logical width D; masked
    rows/columns read 0. For KIND_INT4 the strides are those of the packed byte tensor
    and the result is the pair (lo, hi), each (rows, BLOCK_C // 2); otherwise one tile.
    """
    if KIND == KIND_INT4:
        half = tl.arange(0, BLOCK_C // 2)
        m = mask_r[:, None] & (half[None, :] < n_cols // 2)
        packed = tl.load(base + offs_r[:, None] * stride_r + half[None, :] * stride_c, mask=m,
                         other=0.0)
        return unpack_int4(packed)
    else:
        m = mask_r[:, None] & (offs_c[None, :] < n_cols)
        return tl.load(base + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c, mask=m,
                       other=0.0)


@triton.jit
def load_dequant(base, offs_r, offs_c, stride_r, stride_c, mask_r, n_cols,
                 scale_base, sscale_r, sscale_c, zp_base, szp_r, szp_c,
                 KIND: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_ZP: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Load a tile and dequantize it to fp32: `(codes - zero_point) * scale`.

    Scale / zero point are read through their own (row, column) strides, so per-row,
    per-column and broadcast (stride 0) layouts all work. HAS_SCALE=False returns the
    (zero-point corrected) codes unscaled, for callers that apply a factored-out scale.
    """
    if KIND == KIND_INT4:
        lo, hi = load_codes(base, offs_r, offs_c, stride_r, stride_c, mask_r, n_cols, KIND,
                            BLOCK_C)
        x = interleave_int4(lo, hi, BLOCK_R, BLOCK_C // 2).to(tl.float32)
    else:
        x = load_codes(base, offs_r, offs_c, stride_r, stride_c, mask_r, n_cols, KIND,
                       BLOCK_C).to(tl.float32)
    m = mask_r[:, None] & (offs_c[None, :] < n_cols)
    if HAS_ZP:
        z = tl.load(zp_base + offs_r[:, None] * szp_r + offs_c[None, :] * szp_c, mask=m, other=0)
        x = x - z.to(tl.float32)
    if HAS_SCALE:
        s = tl.load(scale_base + offs_r[:, None] * sscale_r + offs_c[None, :] * sscale_c, mask=m,
                    other=0.0)
        x = x * s
    return x


@triton.jit
def load_row_vector(base, offs, stride, mask, other):
    """Load one fp32 value per row (a per-row scale, lse, ...); stride 0 broadcasts."""
    return tl.load(base + offs * stride, mask=mask, other=other).to(tl.float32)


@triton.jit
def score_mask(offs_m, offs_n, n_q, n_kv, mask_base, smask_m, smask_n,
               IS_CAUSAL: tl.constexpr, CHECK_BOUNDS: tl.constexpr, MASK_KIND: tl.constexpr):
    """Visibility and additive bias of a (BLOCK_M, BLOCK_N) score tile.

    Returns (visible, bias): `visible` is a bool tile (key in range when CHECK_BOUNDS,
    causal j <= i, bool mask True); `bias` the fp32 additive mask tile (0 where none).
    Mask elements of query rows >= n_q or keys >= n_kv are never read. MASK_KIND: MASK_NONE, MASK_BOOL or MASK_ADDITIVE. The
    caller passes the mask's base already offset to its (batch, head) and the strides of
    its query and key dims (0 for broadcast dims). Bias is in natural-log units.
    """
    visible = offs_n[None, :] >= 0
    if CHECK_BOUNDS:
        visible = visible & (offs_n[None, :] < n_kv)
    if IS_CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None])
    bias = tl.zeros((offs_m.shape[0], offs_n.shape[0]), dtype=tl.float32)
    if MASK_KIND != MASK_NONE:
        in_kv = (offs_n[None, :] < n_kv) & (offs_m[:, None] < n_q)
        ptrs = mask_base + offs_m[:, None] * smask_m + offs_n[None, :] * smask_n
        if MASK_KIND == MASK_BOOL:
            allowed = tl.load(ptrs, mask=in_kv, other=0)
            visible = visible & (allowed != 0)
        else:
            bias = tl.load(ptrs, mask=in_kv, other=0.0).to(tl.float32)
    return visible, bias


def enable_interpreter_numpy_compat() -> None:
    """Let TRITON_INTERPRET=1 run loops with run-time bounds under numpy >= 2.4.

    Triton 3.6's interpreter converts loop bounds with ``int(array_of_shape_(1,))``,
    which numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python
    scalars"). This wraps that one conversion; it touches nothing when the interpreter is
    not used. Tests (ours and backward.py's) call it before launching interpreted kernels.
    """
    import triton.runtime.interpreter as interp

    if getattr(interp, "_flash_quant_numpy_compat", False):
        return
    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched
    interp._flash_quant_numpy_compat = True
