"""CPU kernels of flash_quant's four ops, called directly through torch.ops.flash_quant.

Quantize is checked bit-exactly against a small torch reference of docs/op_contract.md;
attention forward / backward against the fp64 reference of flash_quant.testing, both on
the original inputs (loose, quantization error) and on the dequantized operands (tight:
proves the integer / fp8 arithmetic itself, not just a tolerance).
"""
from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from flash_quant.testing import group_reduce

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    """torch.ops.flash_quant with the CPU kernels, and flash_quant.testing — without
    requiring the rest of the package to import."""
    try:
        import flash_quant._C  # noqa: F401
    except Exception:
        libs = glob.glob(os.path.join(ROOT, "flash_quant", "_C*.so"))
        assert libs, "flash_quant._C is not built: pip install --no-build-isolation --no-deps -e ."
        torch.ops.load_library(libs[0])
    spec = importlib.util.spec_from_file_location("_fq_testing", os.path.join(ROOT, "flash_quant", "testing.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return torch.ops.flash_quant, mod


ops, T = _load()
EMPTY = torch.empty(0)
QMAX = {"int8": 127.0, "int4": 7.0, "fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
QMIN = {"int8": -128.0, "int4": -8.0}
F8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


# ---------------------------------------------------------------------------------------
# quantize / dequantize
# ---------------------------------------------------------------------------------------


def ref_quantize(x, prec, gran, bs, strat, smooth):
    """The contract's quantize in plain torch ops (fp32, round half to even)."""
    xf = x.float()
    mean = xf.mean(-2, keepdim=True) if smooth else EMPTY
    if smooth:
        xf = xf - mean
    lo, hi = group_reduce(xf, gran, bs, torch.amin), group_reduce(xf, gran, bs, torch.amax)
    qmax = QMAX[prec]
    if strat == "asymmetric":
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        rng = hi - lo
        s = torch.where(rng > 0, rng / (qmax - QMIN[prec]), torch.ones_like(rng))
        z = torch.round(QMIN[prec] - lo / s).clamp(QMIN[prec], qmax)
    else:
        amax = torch.maximum(lo.abs(), hi.abs())
        s = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        z = torch.zeros_like(s)
    se, ze = s, z
    if gran == "per_block":
        se = s.repeat_interleave(bs, -2)[..., : x.shape[-2], :]
        ze = z.repeat_interleave(bs, -2)[..., : x.shape[-2], :]
    if prec in F8:
        data = (xf / se).clamp(-qmax, qmax).to(F8[prec])
    else:
        lo_q = QMIN[prec] if strat == "asymmetric" else -qmax
        data = (torch.round(xf / se) + ze).clamp(lo_q, qmax)
        if prec == "int8":
            data = data.to(torch.int8)
        else:
            v = data.to(torch.int32) & 0xF
            data = (v[..., 0::2] | (v[..., 1::2] << 4)).to(torch.uint8)
    return data, s, z.to(torch.int32), mean


GRANS = ["per_tensor", "per_head", "per_token", "per_block", "per_channel"]
CASES = [(p, s) for p in ("int8", "int4") for s in ("symmetric", "asymmetric")] + [
    ("fp8_e4m3", "symmetric"),
    ("fp8_e5m2", "symmetric"),
]


@pytest.mark.parametrize("prec,strat", CASES)
@pytest.mark.parametrize("gran", GRANS)
@pytest.mark.parametrize("smooth", [False, True])
def test_quantize_matches_reference_and_round_trips(prec, strat, gran, smooth):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 19, 16, generator=g) * 3 + 0.5
    x[0, 1, 4] = 0.0  # a zero row: all-zero per_token group -> scale 1
    d, s, z, m = ops.quantize(x, prec, gran, 4, strat, smooth)
    rd, rs, rz, rm = ref_quantize(x, prec, gran, 4, strat, smooth)
    assert d.dtype == rd.dtype and d.shape == rd.shape
    assert s.dtype == torch.float32 and z.dtype == torch.int32 and s.shape == rs.shape == z.shape
    torch.testing.assert_close(s, rs, rtol=0, atol=0)
    assert torch.equal(z, rz)
    assert torch.equal(d.view(torch.uint8), rd.view(torch.uint8))
    if smooth:
        torch.testing.assert_close(m, rm, rtol=0, atol=0)
    else:
        assert m.numel() == 0
    if gran == "per_token" and not smooth:
        assert s[0, 1, 4, 0].item() == 1.0
    y = ops.dequantize(d, s, z, m, prec, 4, torch.float32)
    assert y.shape == x.shape and y.dtype == torch.float32
    se = s.repeat_interleave(4, -2)[..., :19, :] if gran == "per_block" else s
    err = (y - x).abs()
    if prec in F8:
        rel = 2.0**-4 if prec == "fp8_e4m3" else 2.0**-3
        sub = 2.0**-10 if prec == "fp8_e4m3" else 2.0**-17
        bound = rel * (x - (m if smooth else 0)).abs() + sub * se + 1e-6
    else:
        bound = se * 0.5 * (1 + 1e-5) + 1e-6
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


def test_int4_nibble_order():
    # per-tensor absmax 7 -> scale exactly 1, so the stored values are the inputs.
    x = torch.tensor([[1.0, -2.0, 3.0, -7.0, 0.0, 7.0]])
    d, s, z, _ = ops.quantize(x, "int4", "per_tensor", 1, "symmetric", False)
    assert s.item() == 1.0 and z.item() == 0
    # byte i = (v[2i] & 0xF) | (v[2i+1] & 0xF) << 4
    assert d.tolist() == [[0xE1, 0x93, 0x70]]
    y = ops.dequantize(d, s, z, EMPTY, "int4", 1, torch.float32)
    assert torch.equal(y, x)


def test_round_half_to_even_and_clamp():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 127.0])  # absmax 127 -> scale 1
    d, s, _, _ = ops.quantize(x, "int8", "per_tensor", 1, "symmetric", False)
    assert s.item() == 1.0
    assert d.tolist() == [0, 2, 2, 0, -2, 127]


def test_asymmetric_uses_full_range():
    x = torch.tensor([[0.0, 1.0, 2.0, 255.0]])  # lo 0 -> z = -128, s = 1
    d, s, z, _ = ops.quantize(x, "int8", "per_token", 1, "asymmetric", False)
    assert s.item() == 1.0 and z.item() == -128
    assert d.tolist() == [[-128, -127, -126, 127]]


def test_input_dtypes_ranks_and_noncontiguous():
    x = torch.randn(6, 40)
    for dt in (torch.float16, torch.bfloat16):
        d, s, z, _ = ops.quantize(x.to(dt), "int8", "per_token", 1, "symmetric", False)
        rd, rs, _, _ = ref_quantize(x.to(dt), "int8", "per_token", 1, "symmetric", False)
        assert torch.equal(d, rd) and torch.equal(s, rs)
        y = ops.dequantize(d, s, z, EMPTY, "int8", 1, dt)
        assert y.dtype == dt
    v = torch.randn(10)  # rank 1
    d, s, _, _ = ops.quantize(v, "int8", "per_token", 1, "symmetric", False)
    assert d.shape == (10,) and s.shape == (1,)
    xt = torch.randn(2, 16, 8).transpose(-1, -2)  # non-contiguous (2, 8, 16)
    d, s, _, _ = ops.quantize(xt, "int8", "per_token", 1, "symmetric", False)
    rd, rs, _, _ = ref_quantize(xt.contiguous(), "int8", "per_token", 1, "symmetric", False)
    assert torch.equal(d, rd) and torch.equal(s, rs)


@pytest.mark.parametrize(
    "prec,ratio,rel_tol",
    [("int8", 0.0011, 0.10), ("int4", 0.02, 0.10)],
)
def test_seed_round_trip_table(prec, ratio, rel_tol):
    """Uniform data in [-5, 5], per-tensor: RMSE ≈ scale / sqrt(12) (rounding noise),
    RMSE / range ≈ 0.0011 for INT8 and ≈ 0.02 for INT4."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 256, 64, generator=g) * 10 - 5
    d, s, z, m = ops.quantize(x, prec, "per_tensor", 1, "legacy", False)
    y = ops.dequantize(d, s, z, m, prec, 1, torch.float32)
    rmse = (y - x).pow(2).mean().sqrt().item()
    expected = s.item() / math.sqrt(12)
    assert abs(rmse - expected) / expected < rel_tol
    err_ratio = rmse / (x.max() - x.min()).item()
    assert abs(err_ratio - ratio) / ratio < 0.1, err_ratio


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.tensor([1.0, float("nan")]), "int8", "per_tensor", 1, "symmetric", False), "non-finite"),
        ((torch.tensor([1.0, float("inf")]), "int8", "per_tensor", 1, "symmetric", False), "non-finite"),
        ((torch.randn(4, 5), "int4", "per_token", 1, "symmetric", False), "even"),
        ((torch.randn(4, 8), "fp8_e4m3", "per_token", 1, "asymmetric", False), "asymmetric"),
        ((torch.randn(4, 8), "int8", "per_token", 1, "legacy", False), "legacy"),
        ((torch.randn(4, 8), "int8", "per_head", 1, "symmetric", False), "per_head"),
        ((torch.randn(8), "int8", "per_channel", 1, "symmetric", False), "per_channel"),
        ((torch.randn(8), "int8", "per_token", 1, "symmetric", True), "smooth"),
        ((torch.randn(4, 8), "int8", "per_block", 0, "symmetric", False), "block_size"),
        ((torch.randn(4, 8), "int3", "per_token", 1, "symmetric", False), "precision"),
        ((torch.randn(4, 8), "int8", "per_row", 1, "symmetric", False), "granularity"),
        ((torch.randn(4, 8), "int8", "per_token", 1, "sym", False), "strategy"),
        ((torch.ones(4, 8, dtype=torch.int32), "int8", "per_token", 1, "symmetric", False), "x must be"),
        ((torch.randn(4, 8, dtype=torch.float64), "int8", "per_token", 1, "symmetric", False), "x must be"),
        ((torch.tensor(1.0), "int8", "per_tensor", 1, "symmetric", False), "rank >= 1"),
    ],
)
@pytest.mark.parametrize("rotate", [False, True])  # (rotated, x becomes float32: checks come first)
def test_quantize_errors(args, match, rotate):
    with pytest.raises(RuntimeError, match=match):
        ops.quantize(*args, rotate)


def test_dequantize_errors():
    d, s, z, _ = ops.quantize(torch.randn(2, 8, 16), "int8", "per_block", 3, "symmetric", False)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.dequantize(d, s, z, EMPTY, "int4", 3, torch.float32)
    with pytest.raises(RuntimeError, match="block_size"):
        ops.dequantize(d, s, z, EMPTY, "int8", 2, torch.float32)
    with pytest.raises(RuntimeError, match="scale must be float32"):
        ops.dequantize(d, s.double(), z, EMPTY, "int8", 3, torch.float32)


# ---------------------------------------------------------------------------------------
# attention forward
# ---------------------------------------------------------------------------------------
def fwd(q, k, v, qq=None, kq=None, vq=None, k_mean=None, mask=None, causal=False, scale=None, pv="none"):
    """qq / kq / vq: (data, scale, zero_point or None) of a quantized operand."""
    qq, kq, vq = qq or (None,) * 3, kq or (None,) * 3, vq or (None,) * 3
    return ops.attention_forward(q, k, v, *qq, *kq, k_mean, *vq, mask, causal, scale, pv)


def quant(x, prec, gran="per_token", strat="symmetric", smooth=False):
    """(data, scale, zero_point or None), dequantized value (fp32), mean or None."""
    d, s, z, m = ops.quantize(x, prec, gran, 1, strat, smooth)
    deq = ops.dequantize(d, s, z, EMPTY, prec, 1, torch.float32)  # without the mean
    return (d, s, z if strat == "asymmetric" else None), deq, (m if smooth else None)


def check_close(out, lse, ref_out, ref_lse, tol):
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], rtol=tol, atol=tol)


# The unquantized forward (fp32 / 16-bit, odd sizes, GQA, causal), the quantized forward
# against the dequantized operands, masks and fully masked rows: tests/test_contract.py.
@pytest.mark.parametrize(
    "vprec,vgran,vstrat",
    [("int8", "per_channel", "asymmetric"), ("int4", "per_token", "symmetric"), ("fp8_e5m2", "per_channel", "symmetric")],
)
def test_forward_quantized_v(vprec, vgran, vstrat):
    q, k, v = T.make_qkv(2, 2, 70, 64, family="realistic", seed=3)
    qq, qdq, _ = quant(q, "int8")
    kq, kdq, _ = quant(k, "int8")
    vq, vdq, _ = quant(v, vprec, vgran, vstrat)
    out, lse = fwd(q, k, v, qq=qq, kq=kq, vq=vq)
    ref_out, ref_lse = T.reference_attention(qdq, kdq, vdq, return_lse=True)
    check_close(out, lse, ref_out, ref_lse, 2e-5)


def test_forward_strided_operands_and_placeholders():
    q, k, v = T.make_qkv(1, 2, 50, 64, seed=9)
    qq, _, _ = quant(q, "int8")
    kq, _, _ = quant(k, "int4")
    vq, _, _ = quant(v, "int8", "per_channel")
    base = fwd(q, k, v, qq=qq, kq=kq, vq=vq)
    # V data stored transposed (as the CUDA backend does), scale broadcast views, and
    # zero-stride placeholders for q / k / v (the kernel must not read them).
    vt = vq[0].transpose(-1, -2).contiguous().transpose(-1, -2)
    ph = [torch.empty(()).expand(t.shape) for t in (q, k, v)]
    out = fwd(*ph, qq=qq, kq=kq, vq=(vt, vq[1], None))
    assert torch.equal(out[0], base[0]) and torch.equal(out[1], base[1])
    # float operands as non-contiguous views
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(fwd(qt, k, v)[0], fwd(q, k, v)[0])


@pytest.mark.parametrize("pv", ["int8", "fp8_e4m3"])
def test_forward_pv_precision(pv):
    """One key tile (Skv <= 64): the running max is the row max, so the simulation is
    P̂ = round(P) with P = exp(s - max), out = Σ P̂ v / Σ P."""
    q, k, v = T.make_qkv(1, 2, 20, 64, skv=50, seed=6)
    out, lse = fwd(q, k, v, pv=pv)
    s = (q.double() @ k.double().transpose(-1, -2)) / 8
    p = torch.exp(s - s.amax(-1, keepdim=True)).float()
    ph = torch.round(p * 127) / 127 if pv == "int8" else p.to(torch.float8_e4m3fn).float()
    ref = (ph.double() @ v.double()) / p.double().sum(-1, keepdim=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert T.error_stats(out, T.reference_attention(q, k, v))["rel_l2"] < 0.05


def test_forward_pv_int8_scale_per_key_tile():
    """Several key tiles: the kernel's online softmax with P rounded per row and 64-key
    tile to int8 with scale (tile max of P) / 127, simulated step by step in fp64."""
    q, k, v = T.make_qkv(1, 2, 9, 64, skv=200, seed=8)
    out, _ = fwd(q, k, v, pv="int8")
    s = (q.double() @ k.double().transpose(-1, -2)) / 8
    m = torch.full(s.shape[:-1] + (1,), float("-inf"), dtype=torch.float64)
    l = torch.zeros_like(m)
    acc = torch.zeros(q.shape, dtype=torch.float64)
    for j0 in range(0, s.shape[-1], 64):
        st = s[..., j0:j0 + 64]
        m_new = torch.maximum(m, st.amax(-1, keepdim=True))
        alpha = torch.exp(m - m_new)
        p = torch.exp(st - m_new).float().double()
        l = l * alpha + p.sum(-1, keepdim=True)
        tile_max = p.amax(-1, keepdim=True)
        sc = torch.where(tile_max > 0, tile_max / 127, torch.ones_like(tile_max))
        acc = acc * alpha + (torch.round(p / sc) * sc) @ v.double()[..., j0:j0 + 64, :]
        m = m_new
    torch.testing.assert_close(out.double(), acc / l, rtol=1e-4, atol=1e-5)
    fixed = (torch.round(torch.exp(s - s.amax(-1, keepdim=True)) * 127) / 127) @ v.double()
    fixed = fixed / torch.exp(s - s.amax(-1, keepdim=True)).sum(-1, keepdim=True)
    assert not torch.allclose(out.double(), fixed, atol=1e-5)  # not the fixed-1/127 rounding


def test_forward_pv_int8_tile_far_below_running_max():
    """A key tile ~100 nats under a row's running max: its largest P (e^-100) is a denormal
    and its int8 scale P_max / 127 underflows to 0. The tile adds nothing representable to
    the output; it must not turn the row into NaN (seen on the realistic family, where one
    row's scores span 94..372)."""
    q, k, v = T.make_far_key_tile_qkv()
    out, lse = fwd(q, k, v, pv="int8")
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert T.error_stats(out, T.reference_attention(q, k, v))["rel_l2"] < 0.03


def test_forward_errors():
    q, k, v = T.make_qkv(1, 4, 8, 64, hkv=2, seed=0)
    with pytest.raises(RuntimeError, match="head dim"):
        fwd(q[..., :12], k[..., :12], v[..., :12])
    with pytest.raises(RuntimeError, match="multiple of the kv heads"):
        fwd(q[:, :3], k, v)
    with pytest.raises(RuntimeError, match="pv_precision"):
        fwd(q, k, v, pv="int4")
    with pytest.raises(RuntimeError, match="attn_mask"):
        fwd(q, k, v, mask=torch.ones(3, 8, dtype=torch.bool))
    qq, _, _ = quant(q, "int8")
    with pytest.raises(RuntimeError, match="q_scale must be float32"):
        fwd(q, k, v, qq=(qq[0], qq[1].double(), None))
    with pytest.raises(RuntimeError, match="q_data has shape"):
        fwd(q, k, v, qq=(qq[0][:, :, :4], qq[1], None))
    with pytest.raises(RuntimeError, match="k_scale"):
        fwd(q, k, v, kq=(quant(k, "int8")[0][0], torch.ones(1, 2, 8, 64), None))
    with pytest.raises(RuntimeError, match="share one dtype"):
        fwd(q, k.double(), v)


def test_generic_isa_matches_simd():
    """The portable tile primitives (FLASH_QUANT_CPU_ISA=generic) give the same results
    as the AVX2 ones (=avx2) and the best set present (AVX-512/VNNI where the CPU has it)
    — each in a subprocess, the choice is made once per process."""
    script = r"""
import sys, json, torch
sys.path.insert(0, %r)
import test_cpu_kernels as t
q, k, v = t.T.make_qkv(1, 2, 70, 96, hkv=1, skv=81, seed=11)
qq, _, _ = t.quant(q, "int8", strat="asymmetric")
kq, _, km = t.quant(k, "int4", smooth=True)
o1, l1 = t.fwd(q, k, v, qq=qq, kq=kq, k_mean=km, causal=True)
o2, l2 = t.fwd(q, k, v, causal=True)
g = torch.randn(o2.shape, generator=torch.Generator().manual_seed(0))
dq, dk, dv = t.ops.attention_backward(g, q, k, v, o2, l2, *(None,)*10, None, True, None, "none")
print(json.dumps([x.tolist() for x in (o1, l1, o2, dq, dk, dv)]))
"""
    script = script % os.path.dirname(os.path.abspath(__file__))
    res = []
    for isa in ("generic", "avx2", "best"):
        env = dict(os.environ, FLASH_QUANT_CPU_ISA=isa, OMP_NUM_THREADS="1")
        p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        res.append([torch.tensor(x) for x in json.loads(p.stdout.strip().splitlines()[-1])])
    for other in res[1:]:
        for a, b in zip(res[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# attention backward
# ---------------------------------------------------------------------------------------
def bwd(g, q, k, v, out, lse, qq=None, kq=None, vq=None, k_mean=None, mask=None, causal=False, scale=None):
    qq, kq, vq = qq or (None,) * 3, kq or (None,) * 3, vq or (None,) * 3
    return ops.attention_backward(g, q, k, v, out, lse, *qq, *kq, k_mean, *vq, mask, causal, scale, "none")


def check_grads(got, ref, tol):
    for a, b, name in zip(got, ref, "qkv"):
        assert a.shape == b.shape, name
        err = (a.double() - b).abs().max().item()
        assert err <= tol * (1 + b.abs().max().item()), f"d{name}: {err}"


# The unquantized backward (shapes, causal, scale, masks): tests/test_contract.py.
def test_backward_quantized_with_k_mean():
    """Straight-through: the gradients of fp64 attention on the dequantized operands;
    lse carries the k_mean term, which the backward removes before recomputing P."""
    q, k, v = T.make_qkv(1, 4, 90, 64, hkv=2, family="realistic", seed=12)
    qq, qdq, _ = quant(q, "int8")
    kq, kdq, km = quant(k, "int8", smooth=True)
    vq, vdq, _ = quant(v, "int8", "per_channel", "asymmetric")
    out, lse = fwd(q, k, v, qq=qq, kq=kq, vq=vq, k_mean=km, causal=True)
    go = torch.randn_like(out)
    got = bwd(go, q, k, v, out, lse, qq=qq, kq=kq, vq=vq, k_mean=km, causal=True)
    ref = T.reference_attention_backward(go, qdq, kdq, vdq, is_causal=True)
    # fp32 recompute of P against an lse of ~100 (outlier family, k_mean term added and
    # removed): worst normalised error 1.8e-5 over 40 draws of grad_out, one CI draw 2.1e-5
    check_grads(got, ref, 5e-5)
    # the gradient is the same for the unsmoothed K (softmax is shift invariant per row)
    ref2 = T.reference_attention_backward(go, qdq, kdq + km, vdq, is_causal=True)
    check_grads(got, ref2, 1e-4)


def test_backward_half_dtype_and_errors():
    q, k, v = T.make_qkv(1, 2, 20, 32, dtype=torch.bfloat16, seed=1)
    out, lse = fwd(q, k, v)
    dq, dk, dv = bwd(torch.ones_like(out), q, k, v, out, lse)
    assert dq.dtype == dk.dtype == dv.dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="lse"):
        bwd(torch.ones_like(out), q, k, v, out, lse[:, :1])
    with pytest.raises(RuntimeError, match="grad_out"):
        bwd(torch.ones(1, 2, 3, 32), q, k, v, out, lse)
