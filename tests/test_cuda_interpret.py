"""CI tests of the CUDA backend's Triton kernels, interpreted on the CPU.

TRITON_INTERPRET=1 runs every kernel of flash_quant/cuda/{quantize,forward}.py in numpy,
on CPU tensors, through their raw launchers (quantize_launch, dequantize_launch,
attention_forward_launch). Judged against the contract's formulas (a torch reference
written here, in float32 / float64) and the fp64 attention reference of
flash_quant.testing, and against the CPU backend's op when it is registered. Shapes are
small (the interpreter is slow); the GPU tests (test_cuda_gpu.py) run realistic sizes.

The interpreter's own fp32 -> fp8 cast mis-rounds when rounding carries into the
exponent; the kernels round explicitly under interpretation (INTERPRET) or always
(quantize), so results here match torch's float8 conversion.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import itertools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402

from flash_quant.cuda.common import enable_interpreter_numpy_compat, int_to_float, round_to_int  # noqa: E402

enable_interpreter_numpy_compat()

from flash_quant.cuda import autotune  # noqa: E402
from flash_quant.cuda.forward import attention_forward_launch  # noqa: E402
from flash_quant.cuda.quantize import data_layout, dequantize_launch, quantize_launch  # noqa: E402
from flash_quant.testing import error_stats, make_far_key_tile_qkv, make_qkv, reference_attention  # noqa: E402

QRANGE = {"int8": (-128.0, 127.0), "int4": (-8.0, 7.0), "fp8_e4m3": (-448.0, 448.0),
          "fp8_e5m2": (-57344.0, 57344.0)}


# ------------------------------------------------------------------ bit-trick conversions
@triton.jit
def _convert_kernel(src_i, dst_f, src_f, dst_i, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(dst_f + offs, int_to_float(tl.load(src_i + offs, mask=m, other=0)), mask=m)
    tl.store(dst_i + offs, round_to_int(tl.load(src_f + offs, mask=m, other=0.0)), mask=m)


def test_int_float_bit_tricks_are_exact():
    """int_to_float / round_to_int (the forward's INT8 P·V conversions) are exact on their
    documented range |x| < 2**22: every INT8 dot over D <= 256 / BLOCK_N <= 128, and
    round_to_int rounds half to even like torch.round."""
    lim = 2 ** 22 - 1
    ints = torch.cat([torch.arange(-300, 301), torch.tensor([lim, -lim, 127 * 127 * 256, -127 * 127 * 256]),
                      torch.randint(-lim, lim, (2000,))]).to(torch.int32)
    floats = torch.cat([torch.arange(-600, 601) * 0.5, torch.tensor([126.5, 127.0, -126.5, 0.49999997, 2.5e6 + 0.5]),
                        (torch.rand(2000) - 0.5) * 2 ** 22]).to(torch.float32)
    n = max(len(ints), len(floats))
    ints = torch.nn.functional.pad(ints, (0, n - len(ints)))
    floats = torch.nn.functional.pad(floats, (0, n - len(floats)))
    out_f, out_i = torch.empty(n), torch.empty(n, dtype=torch.int32)
    _convert_kernel[(triton.cdiv(n, 256),)](ints, out_f, floats, out_i, n, BLOCK=256)
    assert torch.equal(out_f, ints.to(torch.float32))
    assert torch.equal(out_i, torch.round(floats).to(torch.int32))


# ------------------------------------------------------------------ contract reference
def ref_quantize(x, precision, granularity, bs, strategy, smooth, mean=None):
    """The contract's quantize, in float32 torch: (codes as float, scale, zp, mean).
    `mean`: the smoothing mean to subtract (default: computed here)."""
    xf = x.float()
    if smooth:
        mean = xf.mean(dim=-2, keepdim=True) if mean is None else mean
        xf = xf - mean
    else:
        mean = torch.empty(0)
    qmin, qmax = QRANGE[precision]
    shape = xf.shape

    def red(f):
        if granularity == "per_tensor":
            return f(xf.reshape(-1)).reshape((1,) * xf.dim())
        if granularity == "per_token":
            return f(xf, dim=-1, keepdim=True)
        if granularity == "per_head":
            return f(f(xf, dim=-1, keepdim=True), dim=-2, keepdim=True)
        if granularity == "per_channel":
            return f(xf, dim=-2, keepdim=True)
        s, g = shape[-2], -(-shape[-2] // bs)
        fill = float("-inf") if f is torch.amax else float("inf")
        xp = torch.nn.functional.pad(xf, (0, 0, 0, g * bs - s), value=fill)
        return f(f(xp.unflatten(-2, (g, bs)), dim=-1), dim=-1, keepdim=True)

    lo, hi = red(torch.amin).clamp_max(0), red(torch.amax).clamp_min(0)
    if strategy == "asymmetric":
        s = (hi - lo) / (qmax - qmin)
        s = torch.where(s == 0, torch.ones_like(s), s)
        z = torch.round(qmin - lo / s).clamp(qmin, qmax)
    else:
        s = torch.maximum(-lo, hi) / qmax
        s = torch.where(s == 0, torch.ones_like(s), s)
        z = torch.zeros_like(s)
    ex = (lambda t: t.repeat_interleave(bs, dim=-2)[..., : shape[-2], :]) if granularity == "per_block" else (lambda t: t)
    se, ze = ex(s), ex(z)
    if precision.startswith("fp8"):
        dt = torch.float8_e4m3fn if precision == "fp8_e4m3" else torch.float8_e5m2
        q = (xf / se).to(dt).float()
    elif strategy == "asymmetric":
        q = (torch.round(xf / se) + ze).clamp(qmin, qmax)
    else:
        q = torch.round(xf / se).clamp(-qmax, qmax)
    return q, s, z.int(), mean


def codes_of(data, precision):
    if precision == "int4":
        b = data.int()
        lo, hi = ((b & 0xF) ^ 8) - 8, (((b >> 4) & 0xF) ^ 8) - 8
        return torch.stack([lo, hi], -1).flatten(-2).float()
    return data.float()


def cpu_op_available():
    try:
        import flash_quant  # noqa: F401

        x = torch.randn(1, 1, 2, 16)
        torch.ops.flash_quant.attention_forward(x, x, x, *([None] * 11), False, None, "none")
        return True
    except (RuntimeError, NotImplementedError):
        return False


# ------------------------------------------------------------------------ quantization
@pytest.mark.parametrize("precision", ["int8", "int4", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("granularity", ["per_token", "per_block", "per_channel", "per_head", "per_tensor"])
def test_quantize_matches_contract(precision, granularity):
    strategies = ["symmetric", "legacy"] if granularity == "per_tensor" else ["symmetric"]
    if not precision.startswith("fp8"):
        strategies.append("asymmetric")
    for strategy, smooth in itertools.product(strategies, [False, True]):
        x = (torch.randn(2, 3, 37, 24) * 3 + torch.randn(2, 3, 1, 24)).to(torch.float16)
        x[0, 0, 5] = 0  # an all-zero row: scale 1 for per_token
        x[1, 2, 7, 3] = 0.5 * (x[1, 2, 7].abs().max() + 0)  # something near a rounding tie
        data, s, z, mean = quantize_launch(x, precision, granularity, 16, strategy, smooth)
        ref_strategy = "symmetric" if strategy == "legacy" else strategy
        rq, rs, rz, rm = ref_quantize(x, precision, granularity, 16, ref_strategy, smooth)
        tag = f"{precision} {granularity} {strategy} smooth={smooth}"
        if smooth:
            # The mean is a sum in another order than torch's: close, not bitwise. A code
            # whose value sits on a rounding tie may then flip, so the codes and scales
            # are compared against the reference quantization of x minus the kernel's mean.
            torch.testing.assert_close(mean, rm, rtol=1e-5, atol=1e-6, msg=tag)
            rq, rs, rz, rm = ref_quantize(x, precision, granularity, 16, ref_strategy, smooth, mean=mean)
        assert s.shape == rs.shape and s.dtype == torch.float32, tag
        assert z.shape == rs.shape and z.dtype == torch.int32, tag
        torch.testing.assert_close(s, rs, rtol=2e-6, atol=0, msg=tag)
        assert torch.equal(z, rz), tag
        if smooth:
            torch.testing.assert_close(mean, rm, rtol=1e-5, atol=1e-6, msg=tag)
        else:
            assert mean.numel() == 0
        c = codes_of(data, precision)
        mismatch = (c != rq).float().mean().item()
        assert mismatch == 0.0, f"{tag}: {mismatch:.2%} of codes differ"
        # dequantize inverts it: (q - z) * s + mean
        zp = z if strategy == "asymmetric" else torch.empty(0, dtype=torch.int32)
        bs = 16 if granularity == "per_block" else 1
        dq = dequantize_launch(data, s, zp, mean, precision, bs, torch.float32)
        ex = (lambda t: t.repeat_interleave(16, dim=-2)[..., :37, :]) if granularity == "per_block" else (lambda t: t)
        want = (rq - ex(rz).float()) * ex(rs) + (rm if smooth else 0)
        torch.testing.assert_close(dq, want, rtol=1e-6, atol=1e-6, msg=tag)


def test_dequantize_block_size_only_counts_for_row_groups():
    """block_size counts only where scale has row groups of several rows (the schema): per
    token and per tensor ignore it, 0 included, as the CPU kernel does (the general path's
    lse term passed 0 for per-token Q and failed on CUDA only); row groups refuse it."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 37, 64, generator=g)
    empty_z, empty_m = torch.empty(0, dtype=torch.int32), torch.empty(0)
    for granularity in ("per_token", "per_tensor"):
        data, s, _, _ = quantize_launch(x, "int8", granularity, 1, "symmetric", False)
        want = dequantize_launch(data, s, empty_z, empty_m, "int8", 1, torch.float32)
        for bs in (0, 5):
            got = dequantize_launch(data, s, empty_z, empty_m, "int8", bs, torch.float32)
            assert torch.equal(got, want), (granularity, bs)
            if hasattr(torch.ops, "flash_quant") and hasattr(torch.ops.flash_quant, "dequantize"):
                cpu = torch.ops.flash_quant.dequantize(data, s, empty_z, empty_m, "int8", bs, torch.float32)
                assert torch.equal(got, cpu), (granularity, bs, "CPU kernel differs")
    data, s, _, _ = quantize_launch(x, "int8", "per_block", 16, "symmetric", False)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        dequantize_launch(data, s, empty_z, empty_m, "int8", 0, torch.float32)


def _rotate_f64(x):
    from flash_quant.rotation import rotate

    return rotate(x.double()).float()


@pytest.mark.parametrize("precision", ["int8", "int4", "fp8_e4m3"])
@pytest.mark.parametrize("granularity", ["per_token", "per_block", "per_channel", "per_head"])
def test_quantize_fused_rotation(precision, granularity):
    """rotate=True rotates each tile in the kernels (a ±1 matrix on the tensor cores, fp32
    sums, then 1/sqrt(block)): the result is the quantization of the float64-rotated x up
    to fp32 rounding — scales and means within 1e-5, a code off by one where a value sits
    within rounding of a tie. Last dims 8 (padded to the dots' 16), 24 (Hadamard blocks of
    8) and 64; float32 input takes the fp32 product."""
    torch.manual_seed(1)
    for D, dtype, strategy, smooth in [(8, torch.float16, "symmetric", True), (24, torch.bfloat16, "symmetric", False),
                                       (64, torch.float32, "asymmetric", True), (64, torch.bfloat16, "symmetric", True)]:
        if precision == "int4" and granularity == "per_channel" or precision.startswith("fp8") and strategy == "asymmetric":
            continue
        x = (torch.randn(2, 3, 37, D) * 2 + torch.randn(2, 3, 1, D)).to(dtype)
        tag = f"{precision} {granularity} D={D} {dtype} {strategy} smooth={smooth}"
        got = quantize_launch(x, precision, granularity, 16, strategy, smooth, True)
        want = quantize_launch(_rotate_f64(x), precision, granularity, 16, strategy, smooth, False)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=0, msg=tag)
        assert torch.equal(got[2], want[2]) or strategy == "asymmetric", tag
        if smooth:
            torch.testing.assert_close(got[3], want[3], rtol=1e-5, atol=1e-5, msg=tag)
        a, b = codes_of(got[0], precision), codes_of(want[0], precision)
        if precision.startswith("fp8"):
            a, b = a / 448.0, b / 448.0  # one e4m3 step is at most 1/8 of the value
            assert ((a - b).abs() <= 0.125 * b.abs() + 1e-6).all(), tag
        else:
            assert (a - b).abs().max() <= 1, tag
        assert (a != b).float().mean() < 0.01, tag
        # and it is a rotation: without it the codes differ
        plain = quantize_launch(x, precision, granularity, 16, strategy, smooth, False)
        assert (codes_of(plain[0], precision) != b).float().mean() > 0.3, tag


def test_quantize_rotation_too_wide_to_fuse():
    """Rows wider than the fused matrix (256 for 16-bit input, 128 for float32) are rotated
    by a float32 matmul before the kernels: same result."""
    from flash_quant.cuda.quantize import _fused_rotation

    assert _fused_rotation(256, torch.bfloat16) and not _fused_rotation(512, torch.bfloat16)
    assert _fused_rotation(128, torch.float32) and not _fused_rotation(256, torch.float32)
    x = torch.randn(1, 2, 5, 256)
    got = quantize_launch(x, "int8", "per_token", 1, "symmetric", True, True)
    want = quantize_launch(_rotate_f64(x), "int8", "per_token", 1, "symmetric", True, False)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=0)
    assert (codes_of(got[0], "int8") - codes_of(want[0], "int8")).abs().max() <= 1


def test_quantize_layouts_and_ranks():
    # 8-bit per_channel data is stored K-major (transposed, S padded to 16)
    x = torch.randn(2, 3, 21, 32)
    data, s, _, _ = quantize_launch(x, "fp8_e4m3", "per_channel", 1, "symmetric", False)
    assert data_layout(x.shape, "fp8_e4m3", "per_channel") == "transposed"
    assert data.shape == x.shape and data.stride()[-2:] == (1, 32)
    assert s.shape == (2, 3, 1, 32)
    # int4 nibble order: element 2i low, 2i+1 high
    x = torch.tensor([[1.0, -2.0, 7.0, -8.0 * 7 / 8]])
    data, s, _, _ = quantize_launch(x, "int4", "per_token", 1, "symmetric", False)
    q = torch.round(x / s).clamp(-7, 7).int()
    assert data.tolist() == [[int((q[0, 0] & 0xF) | ((q[0, 1] & 0xF) << 4)),
                              int((q[0, 2] & 0xF) | ((q[0, 3] & 0xF) << 4))]]
    # rank 1 and rank 3, non-contiguous input
    for shape in [(40,), (5, 40), (3, 9, 40)]:
        x = torch.randn(*shape).transpose(-1, -2).contiguous().transpose(-1, -2) if len(shape) > 1 else torch.randn(*shape)
        data, s, z, _ = quantize_launch(x, "int8", "per_token", 1, "symmetric", False)
        rq, rs, _, _ = ref_quantize(x, "int8", "per_token", 1, "symmetric", False)
        assert torch.equal(data.float(), rq) and torch.allclose(s, rs)


def test_quantize_errors():
    x = torch.randn(2, 4, 8, 16)
    with pytest.raises(ValueError, match="asymmetric"):
        quantize_launch(x, "fp8_e4m3", "per_token", 1, "asymmetric", False)
    with pytest.raises(ValueError, match="legacy"):
        quantize_launch(x, "int8", "per_token", 1, "legacy", False)
    with pytest.raises(ValueError, match="precision"):
        quantize_launch(x, "int2", "per_token", 1, "symmetric", False)
    with pytest.raises(ValueError, match="even"):
        quantize_launch(torch.randn(4, 7), "int4", "per_token", 1, "symmetric", False)
    with pytest.raises(TypeError, match="x must be"):
        quantize_launch(x.to(torch.int32), "int8", "per_token", 1, "symmetric", False)


# -------------------------------------------------------------------------- attention
def quantize_operands(q, k, v, preset):
    """Operand tensors of attention_forward for a preset, made with our quantize kernels,
    and the dequantized (q, k, v) that the kernel's arithmetic is the attention of."""
    kw = {}
    qd, kd, vd = q.float(), k.float(), v.float()
    pv = "none"
    if preset in ("accurate", "fast", "int4", "fp8", "int8pv", "asym"):
        prec = {"int4": "int4", "fp8": "fp8_e4m3"}.get(preset, "int8")
        strat = "asymmetric" if preset == "asym" else "symmetric"
        smooth = preset != "fp8"
        a, s, z, _ = quantize_launch(q, prec, "per_token", 1, strat, False)
        kw.update(q_data=a, q_scale=s, q_zero_point=z if strat == "asymmetric" else None)
        qd = (codes_of(a, prec) - z.float()) * s
        b, t, zk, mean = quantize_launch(k, prec, "per_token", 1, strat, smooth)
        kw.update(k_data=b, k_scale=t, k_zero_point=zk if strat == "asymmetric" else None,
                  k_mean=mean if smooth else None)
        kd = (codes_of(b, prec) - zk.float()) * t + (mean if smooth else 0)
    if preset in ("fast", "int8pv"):
        vprec = "fp8_e4m3" if preset == "fast" else "int8"
        c, u, _, _ = quantize_launch(v, vprec, "per_channel", 1, "symmetric", False)
        kw.update(v_data=c, v_scale=u)
        vd = c.float() * u
        pv = "fp8_e4m3" if preset == "fast" else "int8"
    if preset == "asym":
        c, u, zv, _ = quantize_launch(v, "int8", "per_token", 1, "asymmetric", False)
        kw.update(v_data=c, v_scale=u, v_zero_point=zv)
        vd = (c.float() - zv.float()) * u
    return kw, pv, (qd, kd, vd)


# (preset, bound on rel-L2 vs fp64 of the dequantized operands, bound vs fp64 of the inputs)
PRESET_TOL = {"fp16": (3e-3, 3e-3), "accurate": (3e-3, 2.5e-2), "fast": (6e-2, 8e-2),
              "int4": (3e-3, 0.4), "fp8": (3e-3, 0.25), "int8pv": (2e-2, 4e-2),
              "asym": (3e-3, 3e-2)}

CASES = [
    # preset, B, Hq, Hkv, Sq, Skv, D, causal, mask, dtype (unquantized 16-bit forwards:
    # tests/test_contract.py)
    ("accurate", 1, 2, 2, 130, 130, 128, False, None, torch.float16),
    ("accurate", 2, 4, 2, 17, 40, 96, True, None, torch.bfloat16),
    ("accurate", 1, 2, 2, 1, 17, 64, False, "bool", torch.float16),
    ("accurate", 1, 2, 2, 17, 17, 32, True, "additive", torch.float16),
    ("fast", 1, 2, 2, 130, 130, 128, True, None, torch.float16),
    ("fast", 1, 4, 2, 17, 33, 64, False, "bool", torch.bfloat16),
    ("int4", 1, 2, 2, 130, 130, 64, False, None, torch.float16),
    ("int4", 1, 2, 1, 17, 17, 96, True, None, torch.bfloat16),
    ("fp8", 1, 2, 2, 40, 130, 128, False, None, torch.float16),
    ("int8pv", 1, 2, 2, 33, 33, 64, True, None, torch.float16),
    ("int8pv", 1, 2, 2, 130, 130, 128, False, None, torch.float16),
    ("int8pv", 1, 2, 1, 17, 40, 64, False, "bool", torch.bfloat16),
    ("asym", 1, 2, 1, 17, 30, 32, False, "additive", torch.float16),
]


def make_mask(kind, b, h, sq, skv):
    if kind is None:
        return None
    if kind == "bool":
        m = torch.rand(b, 1, sq, skv) > 0.3
        m[..., 0, :] = False  # a fully masked row: out 0, lse -inf
        return m
    m = torch.randn(1, h, sq, skv)
    m[..., -1, 1:] = float("-inf")
    return m


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x) for x in c[:9]))
def test_attention_forward(case):
    preset, B, Hq, Hkv, Sq, Skv, D, causal, mask_kind, dtype = case
    q, k, v = make_qkv(B, Hq, Sq, D, hkv=Hkv, skv=Skv, family="realistic" if preset != "fp16" else "normal",
                       dtype=dtype)
    mask = make_mask(mask_kind, B, Hq, Sq, Skv)
    kw, pv, (qd, kd, vd) = quantize_operands(q, k, v, preset)
    # a quantized operand's float tensor is never read: pass zero-stride placeholders
    qa = torch.empty((), dtype=dtype).expand(q.shape) if "q_data" in kw else q
    ka = torch.empty((), dtype=dtype).expand(k.shape) if "k_data" in kw else k
    va = torch.empty((), dtype=dtype).expand(v.shape) if "v_data" in kw else v
    out, lse = attention_forward_launch(qa, ka, va, attn_mask=mask, is_causal=causal, pv_precision=pv, **kw)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == (B, Hq, Sq) and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    ref_d, lse_d = reference_attention(qd, kd, vd, attn_mask=mask, is_causal=causal, return_lse=True)
    ref = reference_attention(q, k, v, attn_mask=mask, is_causal=causal)
    tol_d, tol = PRESET_TOL[preset]
    if dtype == torch.bfloat16:  # P and out in bf16: ~4e-3 rel-L2 from rounding alone
        tol_d, tol = max(tol_d, 1e-2), max(tol, 1e-2)
    e_d, e = error_stats(out, ref_d), error_stats(out, ref)
    assert e_d["rel_l2"] < tol_d, f"vs dequantized operands: {e_d}"
    assert e["rel_l2"] < tol, f"vs fp64 inputs: {e}"
    fin = torch.isfinite(lse_d)
    assert torch.equal(torch.isfinite(lse), fin), "lse -inf exactly on fully masked rows"
    torch.testing.assert_close(lse[fin], lse_d[fin].float(), rtol=0, atol=2e-2 if pv == "none" else 5e-2)
    assert (out.float()[~fin] == 0).all()


@pytest.mark.parametrize("granularity", ["per_head", "per_tensor"])
@pytest.mark.parametrize("pv", ["none", "int8"])
@pytest.mark.parametrize("shape", [(1, 4, 2, 130, 130, 64, True), (1, 2, 2, 17, 40, 128, False)],
                         ids=["gqa-causal-130", "17x40"])
def test_attention_k_scale_constant_along_keys(granularity, pv, shape):
    """A K scale constant along the keys (per head / per tensor) is folded into the row
    factor (KS_CONST; on full INT8 tiles with the int32 -> fp32 offset in the same FMA).
    Same codes with the scale materialised per key row take the general path: the two
    agree to rounding, and both match fp64 of the dequantized operands."""
    B, Hq, Hkv, Sq, Skv, D, causal = shape
    q, k, v = make_qkv(B, Hq, Sq, D, hkv=Hkv, skv=Skv, family="realistic", dtype=torch.float16)
    a, s, _, _ = quantize_launch(q, "int8", "per_token", 1, "symmetric", False)
    b, t, _, m = quantize_launch(k, "int8", granularity, 1, "symmetric", True)
    kw = dict(q_data=a, q_scale=s, k_data=b, k_mean=m)
    if pv == "int8":
        c, u, _, _ = quantize_launch(v, "int8", "per_channel", 1, "symmetric", False)
        kw.update(v_data=c, v_scale=u)
    rows = t.expand(B, Hkv, Skv, 1)
    assert rows.stride(2) == 0
    out, lse = attention_forward_launch(q, k, v, k_scale=t, is_causal=causal, pv_precision=pv, **kw)
    out_g, lse_g = attention_forward_launch(q, k, v, k_scale=rows.contiguous(), is_causal=causal,
                                            pv_precision=pv, **kw)
    # fp16 outputs: the paths differ by output rounding (and INT8 P codes at .5 ties)
    assert error_stats(out, out_g.double())["rel_l2"] < (1e-2 if pv == "int8" else 1e-3)
    torch.testing.assert_close(lse, lse_g, rtol=0, atol=1e-4)
    vd = (c.float() * u) if pv == "int8" else v
    ref, lse_d = reference_attention(a.float() * s, b.float() * t + m, vd, is_causal=causal, return_lse=True)
    assert error_stats(out, ref)["rel_l2"] < (2e-2 if pv == "int8" else 3e-3)
    torch.testing.assert_close(lse, lse_d.float(), rtol=0, atol=2e-2)


def test_attention_matches_cpu_backend():
    if not cpu_op_available():
        pytest.skip("CPU kernel of flash_quant::attention_forward is not registered yet (csrc/cpu)")
    q, k, v = make_qkv(1, 2, 33, 64, family="realistic")
    for preset in ("fp16", "accurate", "fast", "int4"):
        kw, pv, _ = quantize_operands(q, k, v, preset)
        cpu_out, cpu_lse = torch.ops.flash_quant.attention_forward(
            q, k, v, kw.get("q_data"), kw.get("q_scale"), kw.get("q_zero_point"), kw.get("k_data"),
            kw.get("k_scale"), kw.get("k_zero_point"), kw.get("k_mean"), kw.get("v_data"),
            kw.get("v_scale"), kw.get("v_zero_point"), None, True, None, pv)
        out, lse = attention_forward_launch(q, k, v, is_causal=True, pv_precision=pv, **kw)
        tol = 6e-2 if pv != "none" else 3e-3  # P rounding happens at different running maxima
        assert error_stats(out, cpu_out)["rel_l2"] < tol, preset
        torch.testing.assert_close(lse, cpu_lse, rtol=0, atol=5e-2)


def test_attention_scale_and_fp32():
    q, k, v = make_qkv(1, 2, 20, 48, dtype=torch.float32)
    out, lse = attention_forward_launch(q, k, v, scale=0.3)
    ref, lse_r = reference_attention(q, k, v, scale=0.3, return_lse=True)
    assert error_stats(out, ref)["rel_l2"] < 2e-3  # tf32-class dots on GPU, exact here
    torch.testing.assert_close(lse, lse_r.float(), rtol=0, atol=1e-3)


def split_tolerance(pv_precision):
    """Bound on rel-L2 between a split-KV launch and the unsplit one. Exact P modes and the
    int8 P (rounded against each key tile's own max; split ranges are whole tiles) differ
    by fp32 merge rounding only. FP8 P is rounded against the running row max, which a
    split resets: each range rounds P on another grid, so the two launches differ by the
    FP8 P error itself (40 seeds of the packed case: mean 2.4e-3, max 5.4e-3)."""
    return 1.5e-2 if pv_precision == "fp8_e4m3" else 2e-3


@pytest.mark.parametrize("preset,causal,mask_kind", [("accurate", False, None), ("fast", True, None),
                                                     ("fp16", False, "bool"), ("int8pv", False, "additive")])
def test_attention_split_kv(preset, causal, mask_kind):
    """Split-KV (decode-like: few query rows, many keys) equals the unsplit kernel, also
    with ranges that hold no visible key (causal, top-left aligned) or a partial tile."""
    B, Hq, Hkv, Sq, Skv, D = 1, 4, 2, 3, 150, 64
    q, k, v = make_qkv(B, Hq, Sq, D, hkv=Hkv, skv=Skv, family="realistic", dtype=torch.float16)
    mask = make_mask(mask_kind, B, Hq, Sq, Skv)
    kw, pv, (qd, kd, vd) = quantize_operands(q, k, v, preset)
    one, lse1 = attention_forward_launch(q, k, v, attn_mask=mask, is_causal=causal, pv_precision=pv,
                                         num_splits=1, **kw)
    many, lse4 = attention_forward_launch(q, k, v, attn_mask=mask, is_causal=causal, pv_precision=pv,
                                          num_splits=4, **kw)
    fin = torch.isfinite(lse1)
    assert torch.equal(fin, torch.isfinite(lse4))
    torch.testing.assert_close(lse4[fin], lse1[fin], rtol=0, atol=1e-4)
    assert error_stats(many, one)["rel_l2"] < split_tolerance(pv)
    ref = reference_attention(qd, kd, vd, attn_mask=mask, is_causal=causal)
    assert error_stats(many, ref)["rel_l2"] < PRESET_TOL[preset][0] + 1e-2


@pytest.mark.parametrize("preset,hq,hkv,sq", [("accurate", 8, 2, 1), ("fp16", 4, 2, 5), ("int8pv", 6, 3, 20),
                                           ("int4", 4, 1, 3), ("fast", 8, 2, 2)])
def test_attention_packed_gqa(preset, hq, hkv, sq):
    """Short GQA queries packed per kv head (PACK_GQA) equal the per-query-head launch, with
    and without split-KV, for Q stored (B, S, H, D) as transformers passes it."""
    B, Skv, D = 2, 70, 64
    q, k, v = make_qkv(B, hq, sq, D, hkv=hkv, skv=Skv, family="realistic", dtype=torch.float16)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # strided rows, as from (B, S, H, D)
    kw, pv, (qd, kd, vd) = quantize_operands(q, k, v, preset)
    flat, lse_flat = attention_forward_launch(q, k, v, pv_precision=pv, pack_gqa=False, num_splits=1, **kw)
    for splits in (1, 3):
        packed, lse_p = attention_forward_launch(q, k, v, pv_precision=pv, pack_gqa=True, num_splits=splits,
                                                 **kw)
        assert error_stats(packed, flat)["rel_l2"] < split_tolerance(pv if splits > 1 else "none"), splits
        torch.testing.assert_close(lse_p, lse_flat, rtol=0, atol=1e-4)
    ref = reference_attention(qd, kd, vd)
    assert error_stats(packed, ref)["rel_l2"] < PRESET_TOL[preset][0] + 1e-2
    with pytest.raises(ValueError, match="pack_gqa"):
        attention_forward_launch(q, k, v, is_causal=True, pack_gqa=True)


def test_attention_negative_scale_and_int8_p_with_float_v():
    """A non-positive softmax scale takes the explicit (unfolded) score path; int8 P with
    a 16-bit V (P·V mode 4) rounds P as the int8 mode does."""
    q, k, v = make_qkv(1, 2, 40, 64, family="realistic")
    kw, _, (qd, kd, _) = quantize_operands(q, k, v, "accurate")
    for scale in (-0.2, 0.0):
        out, lse = attention_forward_launch(q, k, v, scale=scale, **kw)
        ref, lse_r = reference_attention(qd, kd, v, scale=scale, return_lse=True)
        assert error_stats(out, ref)["rel_l2"] < 3e-3, scale
        torch.testing.assert_close(lse, lse_r.float(), rtol=0, atol=2e-2)
    out, _ = attention_forward_launch(q, k, v, is_causal=True, pv_precision="int8", **kw)
    ref = reference_attention(qd, kd, v, is_causal=True)
    err = error_stats(out, ref)["rel_l2"]
    assert 1e-4 < err < 2e-2, err  # P's int8 rounding is visible, and small


@pytest.mark.parametrize("pv", ["int8", "fp8_e4m3"])
def test_attention_p_tile_far_below_running_max(pv):
    """Key tiles ~100 nats under a row's running max (the geometry of the CPU and Metal
    regression tests): rounded P of those tiles is 0 or tiny, never NaN."""
    q, k, v = make_far_key_tile_qkv()
    out, lse = attention_forward_launch(q, k, v, pv_precision=pv)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert error_stats(out, reference_attention(q, k, v))["rel_l2"] < 0.06


def test_attention_errors_before_launch():
    q, k, v = make_qkv(1, 4, 8, 32)
    with pytest.raises(ValueError, match="multiple of Hkv"):
        attention_forward_launch(q, k[:, :3], v[:, :3])
    with pytest.raises(ValueError, match="head dim"):
        attention_forward_launch(q[..., :12], k[..., :12], v[..., :12])
    with pytest.raises(ValueError, match="pv_precision"):
        attention_forward_launch(q, k, v, pv_precision="int4")
    with pytest.raises(ValueError, match="num_splits"):
        attention_forward_launch(q, k, v, num_splits=0)
    with pytest.raises(TypeError, match="dtypes differ"):
        attention_forward_launch(q, k.half(), v)
    with pytest.raises(ValueError, match="q_data given without q_scale"):
        attention_forward_launch(q, k, v, q_data=torch.zeros(q.shape, dtype=torch.int8))
    with pytest.raises(ValueError, match="k_scale"):
        attention_forward_launch(q, k, v, k_data=torch.zeros(k.shape, dtype=torch.int8),
                                 k_scale=torch.ones(1, 4, 7, 1))
    with pytest.raises(ValueError, match="attn_mask"):
        attention_forward_launch(q, k, v, attn_mask=torch.ones(3, 8, dtype=torch.bool))


def test_launch_plans_are_per_signature():
    """The launchers cache what they derive from a call's signature (flash_quant.cuda.host):
    a repeated call reuses its plan; a call that differs only in strides (a transposed
    view) or in a flag gets its own plan and the right result; a bad call caches nothing
    and still raises before any launch."""
    from flash_quant.cuda import forward as fwd, quantize as qz

    fwd._PLANS.clear()
    qz._PLANS.clear()
    q, k, v = make_qkv(1, 2, 24, 64, family="realistic", dtype=torch.float16)
    kw, pv, (qd, kd, vd) = quantize_operands(q, k, v, "int8pv")
    hits = qz._PLANS.hits
    kw2, _, _ = quantize_operands(q, k, v, "int8pv")
    assert qz._PLANS.hits == hits + 3  # Q, K, V: same signatures
    for name in kw:
        assert (kw[name] is None and kw2[name] is None) or torch.equal(kw[name], kw2[name]), name
    first, _ = attention_forward_launch(q, k, v, pv_precision=pv, **kw)
    again, _ = attention_forward_launch(q, k, v, pv_precision=pv, **kw)
    assert fwd._PLANS.hits == 1 and torch.equal(first, again)
    causal, _ = attention_forward_launch(q, k, v, pv_precision=pv, is_causal=True, **kw)
    assert fwd._PLANS.misses == 2
    ref_causal = reference_attention(qd, kd, vd, is_causal=True)
    assert error_stats(causal, ref_causal)["rel_l2"] < PRESET_TOL["int8pv"][0]

    # same shapes, other strides: Q stored (B, S, H, D) as transformers passes it
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    a, s, _, _ = quantize_launch(qt, "int8", "per_token", 1, "symmetric", False)
    b, t, _, _ = quantize_launch(q, "int8", "per_token", 1, "symmetric", False)
    assert torch.equal(a, b) and torch.equal(s, t)
    out_t, _ = attention_forward_launch(qt, k, v)
    out_c, _ = attention_forward_launch(q, k, v)
    torch.testing.assert_close(out_t, out_c, rtol=0, atol=0)

    n = len(fwd._PLANS)
    with pytest.raises(ValueError, match="head dim"):
        attention_forward_launch(q[..., :12], k[..., :12], v[..., :12])
    with pytest.raises(ValueError, match="granularity"):
        quantize_launch(q, "int8", "per_row", 1, "symmetric", False)
    assert len(fwd._PLANS) == n


def test_plan_cache_is_bounded():
    from flash_quant.cuda.host import PlanCache, cdiv, next_pow2

    cache = PlanCache(capacity=3)
    for i in range(5):
        cache.put(i, str(i))
    assert len(cache) == 3 and cache.get(0) is None and cache.get(4) == "4"
    assert cache.get([1]) is None  # unhashable: a miss, not an error
    assert [cdiv(a, 4) for a in (1, 4, 5)] == [1, 1, 2]
    assert [next_pow2(n) for n in (0, 1, 2, 3, 64, 65)] == [1, 1, 2, 4, 64, 128]


def test_autotune_describe_in_interpreter():
    autotune.clear()
    assert "no config" in autotune.describe()
    cfg = autotune.forward_default(64, True, 2, 100)
    assert cfg == autotune.Config(16, 16, 4, 1)  # the interpreter always uses the smallest tiles


# ------------------------------------------------------------------ attention prologue
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("s,p,h,d", [(1, 0, 1, 32), (17, 5, 2, 64), (70, 9, 1, 96), (3, 2, 2, 128)])
@pytest.mark.parametrize("steps", ["all", "rope_only", "norm_only", "layout_only"])
def test_attention_prologue_kernel(dtype, s, p, h, d, steps):
    """The Triton kernel against the float64 contract (prefix tiles straddling the
    boundary, padded head dims, strided x) and against the CPU kernel."""
    from flash_quant.cuda.prologue import attention_prologue_launch
    from test_attention_prologue import TOL, inputs, reference

    norm, rope = steps in ("all", "norm_only"), steps in ("all", "rope_only")
    x, prefix, w, pw, eps, cos, sin = inputs(2, s, p, h, d, dtype, norm=norm, rope=rope)
    x = torch.cat([x, x], dim=-1)[..., :d]  # strided along the token and head dims
    out = attention_prologue_launch(x, prefix, w, pw, eps, cos, sin)
    ref = reference(x, prefix, w, pw, eps, cos, sin)
    assert out.shape == (2, h, s + p, d) and out.dtype == dtype
    # The interpreter casts float32 to bfloat16 by truncation (the GPU rounds to nearest):
    # a whole ulp (2 TOL) here, half an ulp in the GPU test.
    tol = TOL[dtype] * (2 if dtype == torch.bfloat16 else 1)
    err = (out.double() - ref).abs()
    assert (err <= tol * ref.abs() + 1e-5).all(), f"max error {err.max().item():.3g}"
    cpu = torch.ops.flash_quant.attention_prologue(x, prefix, w, pw, eps, cos, sin)
    torch.testing.assert_close(out.float(), cpu.float(), rtol=2 * tol, atol=1e-5)


def test_capture_check_traces_under_torch_compile(monkeypatch):
    """torch.compile(fullgraph=True) traces through the first-use check (Dynamo ignores the
    lru_cache around it): the check must not call the capture query there, a non-tensor
    torch.* result Dynamo cannot put in a graph (a CPU build has no capture query to trace:
    the query is replaced by one that counts its calls)."""
    from flash_quant import rotation

    calls = []

    def capturing():
        calls.append(1)
        return False

    monkeypatch.setattr(rotation, "_stream_capturing", capturing)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: (rotation.check_not_capturing(torch.device("cuda"), "a constant"), x + 1)[1],
                             fullgraph=True, backend="eager")
    assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 2.0))
    assert calls == []
    rotation.check_not_capturing(torch.device("cuda"), "a constant")  # eager: the query runs
    assert calls == [1]


def test_first_use_inside_cuda_graph_capture_names_the_fix(monkeypatch):
    """The device constants built on their first use (the Hadamard rotation; the quantize
    kernel's ±1 matrix) raise an error that names the fix (a warm-up call) when that first
    use is being captured in a CUDA graph, and cache nothing; the CPU is never checked."""
    from flash_quant import rotation
    from flash_quant.cuda import quantize as qz

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    cached = rotation._hadamard_on.cache_info().currsize, qz._hadamard_pm1.cache_info().currsize
    with pytest.raises(RuntimeError, match="being captured in a CUDA graph: run the same call once"):
        rotation.hadamard_matrix(96, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="being captured in a CUDA graph: run the same call once"):
        qz._hadamard_pm1(96, 128, torch.device("cuda"), torch.float16)
    assert (rotation._hadamard_on.cache_info().currsize, qz._hadamard_pm1.cache_info().currsize) == cached
    assert rotation.hadamard_matrix(96, device="cpu").shape == (96, 96)
