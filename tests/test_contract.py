"""The op contract (docs/op_contract.md), one suite over every backend present.

Semantics against the fp64 SDPA reference of flash_quant.testing: unquantized forward at
odd sizes (S = 1, 17, tails of every backend's tile), GQA, causal with Sq != Skv (top-left
aligned), bool / float masks at broadcast shapes, fp32 / fp16 / bf16 inputs; fully masked
rows (output 0, lse -inf); quantized forward with INT8 / INT4 / FP8 operands made by the
backend's own quantize, exact against fp64 of the dequantized operands, lse of the
unsmoothed K; backward against the fp64 gradient. The backends and their bars are in
tests/contract_backends.py. The fast backends (cpu, cuda, mps) run every case; each case
names the slow ones (the Triton interpreter, the Metal emulator) that run it too.
"""
import math

import pytest
import torch

from contract_backends import BACKENDS, FAST_ONLY, ON_ALL, ON_EMU, ON_INTERP, Bar, bar
from flash_quant.testing import error_stats, make_qkv, reference_attention, reference_attention_backward

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _marks(be):
    # the cuda cases run where the GPU tests do (pytest -m gpu, benchmarks/gpu_run.sh)
    return [pytest.mark.gpu] if be.name == "cuda" else []


def _params(cases, ident):
    """(backend, case) pairs: each case on the fast backends and the slow ones it names."""
    return [pytest.param(be, case[1:], id=f"{be.name}-{ident(case[1:])}", marks=_marks(be))
            for be in BACKENDS for case in cases if be.runs(case[0])]


def _shape_id(c):
    dtype, b, hq, hkv, sq, skv, d, causal, mask = c[:9]
    return (f"{str(dtype)[6:]}-b{b}h{hq}/{hkv}-s{sq}x{skv}-d{d}{'-causal' if causal else ''}"
            f"{'-' + mask if mask else ''}")


def _mask(kind, b, hq, sq, skv, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "bool":  # broadcast over heads
        m = torch.rand(b, 1, sq, skv, generator=g) > 0.3
        m[..., 0] = True
        return m
    if kind == "float":  # broadcast over batch
        return (torch.randn(1, hq, sq, skv, generator=g) * 2).to(dtype)
    if kind == "float2d":  # broadcast over batch and heads
        return torch.randn(sq, skv, generator=g).to(dtype)
    return None


def check_forward(out, lse, ref, ref_lse, b: Bar, like):
    assert out.shape == like.shape and out.dtype == like.dtype and out.is_contiguous()
    assert lse.shape == like.shape[:3] and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin), "lse -inf exactly on the fully masked rows"
    assert (out[~fin] == 0).all(), "a fully masked row's output is 0"
    if b.close is not None:
        torch.testing.assert_close(out.double(), ref, rtol=b.close, atol=b.close)
    else:
        err = error_stats(out, ref)["rel_l2"]
        assert err <= b.rel_l2, f"rel-L2 {err:.3g} > {b.rel_l2}"
    check_lse(lse[fin], ref_lse[fin], b, b.close)


def check_lse(lse, ref_lse, b: Bar, close):
    """lse against the reference: element-wise `close` (rtol = atol) for a backend with an
    element-wise bar, else the bar's absolute bound."""
    if close is not None:
        torch.testing.assert_close(lse.double(), ref_lse, rtol=close, atol=close)
    elif b.lse_abs is not None and lse.numel():
        err = (lse.double() - ref_lse).abs().max().item()
        rel_to = max(1.0, ref_lse.abs().max().item() / b.lse_scale) if b.lse_scale else 1.0
        assert err <= b.lse_abs * rel_to, f"lse off by {err:.3g}"


# ------------------------------------------------------------------ unquantized forward
FORWARD_CASES = [
    # (slow backends that run it, dtype, B, Hq, Hkv, Sq, Skv, D, causal, mask)
    (ON_ALL, F32, 1, 2, 2, 1, 1, 32, False, None),  # S = 1
    (ON_ALL, F32, 1, 2, 2, 17, 17, 64, True, None),  # S = 17
    (FAST_ONLY, F32, 2, 2, 1, 130, 130, 96, True, None),  # tails of a 64-key tile, GQA
    (FAST_ONLY, F32, 1, 4, 2, 17, 130, 128, True, None),  # Sq < Skv causal: keys past Sq-1 never seen
    (FAST_ONLY, F32, 1, 2, 2, 130, 17, 160, True, None),  # Sq > Skv causal: rows past Skv see all keys
    (FAST_ONLY, F32, 1, 1, 1, 65, 200, 256, False, None),
    (FAST_ONLY, F32, 1, 1, 1, 1000, 1000, 64, True, None),
    (ON_EMU, F32, 1, 2, 2, 37, 29, 64, False, None),
    (ON_EMU, F32, 1, 4, 2, 40, 40, 32, True, None),  # GQA, causal
    (ON_EMU, F32, 1, 2, 1, 20, 45, 64, True, "bool"),  # Sq < Skv, causal AND mask
    (ON_EMU, F32, 1, 2, 2, 33, 17, 72, False, "float"),  # head dim not a multiple of 64
    (ON_ALL, F16, 1, 2, 2, 25, 31, 64, False, "float"),
    (ON_ALL, BF16, 1, 2, 1, 19, 23, 32, True, None),
    (ON_EMU, F32, 1, 1, 1, 9, 11, 256, False, None),  # largest head dim
    (ON_EMU, F32, 1, 2, 2, 41, 3, 128, True, None),  # rows past Skv stay causal-visible
    (FAST_ONLY, F16, 1, 2, 2, 33, 33, 64, True, None),
    (FAST_ONLY, BF16, 1, 2, 2, 33, 33, 64, True, None),
]


@pytest.mark.parametrize("backend, case", _params(FORWARD_CASES, _shape_id))
def test_forward_matches_reference(backend, case):
    dtype, b, hq, hkv, sq, skv, d, causal, mk = case
    q, k, v = make_qkv(b, hq, sq, d, hkv=hkv, skv=skv, dtype=dtype)
    mask = _mask(mk, b, hq, sq, skv, dtype, seed=sq * d + hq)
    out, lse = backend.forward(q, k, v, attn_mask=mask, is_causal=causal)
    ref, ref_lse = reference_attention(q, k, v, attn_mask=mask, is_causal=causal, return_lse=True)
    check_forward(out, lse, ref, ref_lse, bar(backend, "fwd32" if dtype == F32 else "fwd16", dtype), q)


def _quant(backend, x, precision, strategy="symmetric", granularity="per_token", smooth=False):
    """(operand keywords' values: data, scale, zero point or None), the dequantized value in
    fp32 (without the mean), the mean or None — the codes read back by test code here."""
    data, s, z, m = backend.quantize(x, precision, granularity, 1, strategy, smooth)
    if precision == "int4":
        c = data.to(torch.int32)
        codes = torch.stack([((c & 0xF) ^ 8) - 8, (((c >> 4) & 0xF) ^ 8) - 8], -1).flatten(-2).float()
    else:
        codes = data.float()
    asym = strategy == "asymmetric"
    deq = (codes - (z.float() if asym else 0.0)) * s
    return (data, s, z if asym else None), deq, (m if smooth else None)


def _operands(prefix, quantized):
    return dict(zip((f"{prefix}_data", f"{prefix}_scale", f"{prefix}_zero_point"), quantized))


@pytest.mark.parametrize("backend", [pytest.param(be, id=be.name, marks=_marks(be)) for be in BACKENDS])
def test_fully_masked_rows_and_broadcast_masks(backend):
    """Bool mask broadcast over heads with a fully masked row (output 0, lse -inf, never
    NaN); a 2-D additive zero-stride mask with causal; an fp16 additive mask with -inf
    entries on INT8 operands."""
    q, k, v = make_qkv(2, 2, 20, 32, hkv=1, skv=70)
    g = torch.Generator().manual_seed(2)
    bmask = torch.rand(2, 1, 20, 70, generator=g) > 0.3
    bmask[1, 0, 7] = False
    out, lse = backend.forward(q, k, v, attn_mask=bmask)
    ref, ref_lse = reference_attention(q, k, v, attn_mask=bmask, return_lse=True)
    check_forward(out, lse, ref, ref_lse, bar(backend, "fwd32", F32), q)
    assert torch.all(out[1, :, 7] == 0) and torch.all(lse[1, :, 7] == float("-inf"))

    add = torch.randn(20, 1, generator=g).expand(20, 70) * 2
    out, lse = backend.forward(q, k, v, attn_mask=add, is_causal=True)
    ref, ref_lse = reference_attention(q, k, v, attn_mask=add, is_causal=True, return_lse=True)
    check_forward(out, lse, ref, ref_lse, bar(backend, "fwd32", F32), q)

    addh = torch.zeros(1, 2, 20, 70, dtype=F16)
    addh[0, 1, 3] = float("-inf")
    qq, qdq, _ = _quant(backend, q, "int8")
    kq, kdq, _ = _quant(backend, k, "int8")
    out, lse = backend.forward(q, k, v, **_operands("q", qq), **_operands("k", kq), attn_mask=addh)
    ref, ref_lse = reference_attention(qdq, kdq, v, attn_mask=addh.float(), return_lse=True)
    check_forward(out, lse, ref, ref_lse, bar(backend, "fwd_quant_int", F32), q)
    assert torch.all(lse[:, 1, 3] == float("-inf")) and torch.all(out[:, 1, 3] == 0)


# ------------------------------------------------------------------ quantized forward
QSPECS = [  # (Q precision, strategy), (K precision, strategy) or None for a float K
    (("int8", "symmetric"), ("int8", "symmetric")),
    (("int4", "symmetric"), ("int4", "symmetric")),
    (("int4", "asymmetric"), ("int8", "asymmetric")),
    (("fp8_e4m3", "symmetric"), ("fp8_e4m3", "symmetric")),
    (("int8", "symmetric"), None),  # mixed: float K
]
# The slow backends' own files test INT8 / INT4 / FP8 presets (symmetric, K smoothed): they
# run here the two mixed cases, asymmetric INT4 Q with INT8 K and INT8 Q with a float K.
SLOW_QSPECS = (QSPECS[2], QSPECS[4])
QUANT_CASES = [(FAST_ONLY, *spec, 130, 97, d) for d in (32, 64, 96, 128, 160, 256) for spec in QSPECS] + [
    (ON_ALL, *spec, 35, 30, 64) for spec in SLOW_QSPECS]
# bound on rel-L2 against the unquantized attention, by Q's precision (realistic family)
# The quantized result against float attention of the unquantized operands (the scheme's
# own error, a sanity bound: a broken kernel is off by ~100 %). INT4 at D = 32 on the
# realistic family spreads with the draw: 0.26 seen in a CI run of 2026-12-06, hence 0.35.
# INT8 at D = 32 too: 0.0200 in a CI run of 2026-12-07; over 300 draws (CPU backend,
# 130 x 97, causal) median 0.0137, 99th percentile 0.0191, max 0.0227, hence 0.03.
QUANT_VS_FLOAT = {"int8": 0.03, "int4": 0.35, "fp8_e4m3": 0.1}


def _quant_id(c):
    (qp, qs), kspec, sq, skv, d = c
    k = f"{kspec[0]}-{kspec[1][:4]}" if kspec else "float"
    return f"q{qp}-{qs[:4]}-k{k}-s{sq}x{skv}-d{d}"


@pytest.mark.parametrize("backend, case", _params(QUANT_CASES, _quant_id))
def test_forward_quantized_matches_dequantized_reference(backend, case):
    """K smoothed per token; the kernel's result must equal fp64 attention on the
    dequantized operands (the integer / fp8 arithmetic is exact up to fp32 rounding), and
    lse must be that of the unsmoothed K."""
    qspec, kspec, sq, skv, d = case
    if backend.name == "cuda" and qspec[0] == "int4" and kspec and kspec[0] == "int4" and d < 64:
        # Found by this suite's first GPU run (H100, 2026-12-06): Triton's 8-bit dot needs
        # K >= 32 and INT4 at D = 32 packs 16 columns, so the kernel does not compile.
        pytest.xfail("known: the CUDA INT4 Q·Kᵀ kernel does not compile below head dim 64")
    q, k, v = make_qkv(1, 2, sq, d, skv=skv, family="realistic")
    qq, qdq, _ = _quant(backend, q, *qspec)
    kw = _operands("q", qq)
    if kspec is None:
        kdq, km = k, None
    else:
        kq, kdq, km = _quant(backend, k, *kspec, smooth=True)
        kw.update(_operands("k", kq), k_mean=km)
    out, lse = backend.forward(q, k, v, is_causal=True, **kw)
    ref, ref_lse = reference_attention(qdq, kdq, v, is_causal=True, return_lse=True)
    if km is not None:
        ref_lse = ref_lse + (qdq.double() @ km.double().transpose(-1, -2)).squeeze(-1) / math.sqrt(d)
    # Integer Q·K is exact (int32); the fp32 path (fp8, float K) rounds each product, and
    # the realistic family's outlier channels give logits of O(100), so its scores carry
    # ~1e-5 absolute error that exp() passes on.
    integer = kspec is not None and qspec[0].startswith("int") and kspec[0].startswith("int")
    check_forward(out, lse, ref, ref_lse, bar(backend, "fwd_quant_int" if integer else "fwd_quant_fp", F32), q)
    if km is not None:  # the same lse as the unsmoothed (dequantized) K
        _, lse_unsmoothed = reference_attention(qdq, kdq + km, v, is_causal=True, return_lse=True)
        b = bar(backend, "fwd_quant_int", F32)
        check_lse(lse, lse_unsmoothed, b, 1e-4 if b.close is not None else None)
    err = error_stats(out, reference_attention(q, k, v, is_causal=True))["rel_l2"]
    assert err < QUANT_VS_FLOAT[qspec[0]], err


# ------------------------------------------------------------------ backward
BACKWARD_CASES = [
    # (slow backends that run it, dtype, B, Hq, Hkv, Sq, Skv, D, causal, mask, scale)
    (ON_ALL, F32, 1, 2, 2, 1, 1, 32, False, None, None),  # S = 1
    (FAST_ONLY, F32, 1, 2, 2, 130, 130, 64, True, None, None),
    (FAST_ONLY, F32, 2, 4, 2, 70, 45, 32, True, None, 0.3),
    (FAST_ONLY, F32, 1, 2, 1, 17, 100, 128, False, None, None),
    (FAST_ONLY, F32, 1, 4, 2, 40, 70, 64, False, "bool", None),
    (FAST_ONLY, F32, 1, 4, 2, 40, 70, 64, True, "float2d", None),
    (ON_EMU, F32, 1, 2, 2, 37, 29, 64, False, None, None),
    (ON_EMU, F32, 1, 4, 2, 33, 40, 32, True, "bool", None),
    (ON_EMU, F32, 1, 2, 1, 20, 9, 72, True, "float", None),
    (ON_EMU, F16, 1, 2, 2, 17, 21, 32, False, None, None),
    (ON_INTERP, F32, 1, 2, 2, 37, 37, 32, False, None, None),  # tails of a 16-row tile
    (ON_INTERP, F32, 1, 2, 2, 37, 37, 32, True, None, None),
    (ON_INTERP, F32, 2, 4, 2, 20, 45, 40, False, None, None),  # GQA, Sq < Skv, D not a power of two
    (ON_INTERP, F32, 1, 4, 1, 45, 20, 32, True, None, None),  # MQA, Sq > Skv causal
    (ON_INTERP, F32, 1, 2, 2, 20, 33, 48, True, None, None),  # Sq < Skv causal
    (ON_INTERP, F16, 1, 2, 2, 33, 33, 64, False, None, None),
    (ON_INTERP, BF16, 1, 2, 2, 33, 33, 64, False, None, None),
    (ON_INTERP, F32, 2, 2, 2, 24, 29, 32, False, "bool", None),
    (ON_INTERP, F32, 1, 2, 1, 26, 26, 32, True, "float2d", None),
]


def check_grads(got, ref, like, b: Bar):
    for name, g, r, x in zip(("dq", "dk", "dv"), got, ref, like):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        if b.close is not None:  # max error normalised by the gradient's size
            err = (g.double() - r).abs().max().item()
            assert err <= b.close * (1 + r.abs().max().item()), f"{name}: {err}"
        else:
            err = error_stats(g, r)["rel_l2"]
            assert err <= b.rel_l2, f"{name}: rel-L2 {err:.3g} > {b.rel_l2}"


@pytest.mark.parametrize("backend, case", _params(BACKWARD_CASES, lambda c: _shape_id(c) + (
    f"-scale{c[9]}" if c[9] else "")))
def test_backward_matches_reference(backend, case):
    dtype, b, hq, hkv, sq, skv, d, causal, mk, scale = case
    if dtype == BF16 and not backend.bf16_backward:
        pytest.skip(f"{backend.name}: bf16 backward is checked on GPUs only (contract_backends.py)")
    q, k, v = make_qkv(b, hq, sq, d, hkv=hkv, skv=skv, dtype=dtype)
    mask = _mask(mk, b, hq, sq, skv, dtype, seed=sq + skv + d)
    if mk == "bool":
        mask[..., 3 % sq, :] = False  # a fully masked row: gradients 0, never NaN
    # out and lse from the fp64 reference: the backward is judged on its own (the forward
    # has its cases above), and the slow backends skip a forward launch per case
    out, lse = reference_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, return_lse=True)
    out, lse = out.to(dtype), lse.to(torch.float32)
    go = torch.randn_like(out)
    got = backend.backward(go, q, k, v, out, lse, attn_mask=mask, is_causal=causal, scale=scale)
    ref = reference_attention_backward(go, q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    check_grads(got, ref, (q, k, v), bar(backend, "bwd32" if dtype == F32 else "bwd16", dtype))
    if mk == "bool":
        assert (got[0][..., 3 % sq, :] == 0).all()
