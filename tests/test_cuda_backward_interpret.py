"""The Triton backward kernels (flash_quant/cuda/backward.py) run on the CPU under
TRITON_INTERPRET=1 and are compared with the float64 gradient of reference_attention.

Shapes are tiny (the interpreter is slow) and the tile is forced to 16×16 so that every
case has several blocks and ragged tails. Quantized operands are produced here with plain
torch code (independent of the library's quantizer) and the reference is the float64
gradient of attention over the dequantized operands (the straight-through contract).

Run: pytest tests/test_cuda_backward_interpret.py -q   (about a minute on 2 cores)
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

# Triton 3.6's interpreter vs numpy >= 2.4 (loop bounds): the shared fix in common.py.
from flash_quant.cuda.common import enable_interpreter_numpy_compat  # noqa: E402

enable_interpreter_numpy_compat()

from flash_quant.cuda import backward as bwd  # noqa: E402
from flash_quant.testing import error_stats, reference_attention, reference_attention_backward  # noqa: E402

TILE = ((16, 16, 4, 1), (16, 16, 4, 1))


# ------------------------------------------------------------------ test-side quantizers
def q_int8_rows(x, smooth=False, asym=False):
    """INT8 per-row; returns data, scale, zero_point (or None), mean (or None), dequantized
    value (smoothed) and the full dequantized tensor (mean added back)."""
    mean = x.mean(dim=-2, keepdim=True) if smooth else None
    xs = x - mean if smooth else x
    if asym:
        lo = xs.amin(-1, keepdim=True).clamp_max(0)
        hi = xs.amax(-1, keepdim=True).clamp_min(0)
        s = ((hi - lo) / 255.0).clamp_min(1e-12)
        z = torch.clamp(torch.round(-128 - lo / s), -128, 127)
        data = torch.clamp(torch.round(xs / s) + z, -128, 127)
        deq = (data - z) * s
        return data.to(torch.int8), s, z.to(torch.int32), mean, deq
    s = (xs.abs().amax(-1, keepdim=True) / 127.0).clamp_min(1e-12)
    data = torch.clamp(torch.round(xs / s), -127, 127)
    return data.to(torch.int8), s, None, mean, data * s


def q_int4_rows(x):
    s = (x.abs().amax(-1, keepdim=True) / 7.0).clamp_min(1e-12)
    v = torch.clamp(torch.round(x / s), -8, 7).to(torch.int32)
    packed = ((v[..., 0::2] & 0xF) | ((v[..., 1::2] & 0xF) << 4)).to(torch.uint8)
    return packed, s, v.to(torch.float32) * s


def q_fp8_channels(x):
    s = (x.abs().amax(-2, keepdim=True) / 448.0).clamp_min(1e-12)
    data = (x / s).to(torch.float8_e4m3fn)
    return data, s, data.to(torch.float32) * s


# ------------------------------------------------------------------ helpers
def _qkv(b, hq, hkv, sq, skv, d, dtype=torch.float32, bias=0.0):
    q = torch.randn(b, hq, sq, d)
    k = torch.randn(b, hkv, skv, d) + bias * torch.randn(b, hkv, 1, d)
    v = torch.randn(b, hkv, skv, d)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _fwd(q, k, v, mask=None, causal=False, scale=None, dtype=None):
    out, lse = reference_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, return_lse=True)
    return out.to(dtype or q.dtype), lse.to(torch.float32)


def _check(got, ref, tol):
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        assert torch.isfinite(g).all(), f"{name} has non-finite values"
        st = error_stats(g, r)
        assert st["rel_l2"] <= tol, f"{name}: rel-L2 {st['rel_l2']:.3g} > {tol} ({st})"


def _run(do, q, k, v, out, lse, **kw):
    return bwd.attention_backward_triton(do, q, k, v, out, lse, blocks=TILE, **kw)


# The unquantized cases (tails, GQA, causal with Sq != Skv, 16-bit, masks, empty rows):
# tests/test_contract.py, which runs them through these kernels with the same 16x16 tile.
def test_custom_scale_and_key_bias_centering():
    """K with a large channel bias: dQ uses mean-centred K and must still be exact in fp32."""
    q, k, v = _qkv(1, 2, 2, 30, 30, 32, bias=6.0)
    out, lse = _fwd(q, k, v, scale=0.3)
    do = torch.randn_like(q)
    got = _run(do, q, k, v, out, lse, scale=0.3)
    _check(got, reference_attention_backward(do, q, k, v, scale=0.3), 1e-5)


@pytest.mark.parametrize("d", [128, 256])
def test_large_head_dims(d):
    q, k, v = _qkv(1, 1, 1, 18, 21, d)
    out, lse = _fwd(q, k, v)
    do = torch.randn_like(q)
    _check(_run(do, q, k, v, out, lse), reference_attention_backward(do, q, k, v), 1e-5)


def test_deterministic():
    q, k, v = _qkv(1, 4, 2, 35, 35, 32)
    out, lse = _fwd(q, k, v)
    do = torch.randn_like(q)
    a = _run(do, q, k, v, out, lse)
    b = _run(do, q, k, v, out, lse)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_strided_inputs():
    """(B, S, H, D) storage viewed as (B, H, S, D): non-contiguous operands."""
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv(1, 2, 2, 21, 21, 32))
    assert not q.is_contiguous()
    out, lse = _fwd(q, k, v)
    do = torch.randn(1, 21, 2, 32).transpose(1, 2)
    _check(_run(do, q, k, v, out, lse), reference_attention_backward(do, q, k, v), 1e-5)


# ------------------------------------------------------------------ quantized operands
def _placeholder(x):
    # The kernel must not read x when x_data is given: hand it garbage-free shape only.
    return torch.empty((), dtype=x.dtype).expand(x.shape)


@pytest.mark.parametrize("causal", [False, True])
def test_int8_qk_smoothed_straight_through(causal):
    """Accurate preset's layout: Q, K INT8 per token (K smoothed), V unquantized. INT8
    dot path. Reference: fp64 gradient over the dequantized operands (K with its mean)."""
    q, k, v = _qkv(1, 4, 2, 33, 40, 64, bias=3.0)
    qd, qs, _, _, qdeq = q_int8_rows(q)
    kd, ks, _, km, kdeq = q_int8_rows(k, smooth=True)
    kfull = kdeq + km
    out, lse = _fwd(qdeq, kfull, v, causal=causal)
    do = torch.randn_like(q)
    got = _run(do, _placeholder(q), _placeholder(k), v, out, lse, q_data=qd, q_scale=qs,
               k_data=kd, k_scale=ks, k_mean=km, is_causal=causal)
    ref = reference_attention_backward(do, qdeq, kfull, v, is_causal=causal)
    _check(got, ref, 2e-5)


def test_int8_asymmetric_and_fp8_v():
    """Zero points (16-bit dequant path) and FP8 V with a per-channel scale."""
    q, k, v = _qkv(2, 2, 2, 27, 27, 32)
    qd, qs, qz, _, qdeq = q_int8_rows(q, asym=True)
    kd, ks, kz, _, kdeq = q_int8_rows(k, asym=True)
    vd, vs, vdeq = q_fp8_channels(v)
    out, lse = _fwd(qdeq, kdeq, vdeq)
    do = torch.randn_like(q)
    got = _run(do, _placeholder(q), _placeholder(k), _placeholder(v), out, lse,
               q_data=qd, q_scale=qs, q_zero_point=qz, k_data=kd, k_scale=ks, k_zero_point=kz,
               v_data=vd, v_scale=vs)
    _check(got, reference_attention_backward(do, qdeq, kdeq, vdeq), 2e-5)


def test_int4_qkv_per_tensor_scale():
    q, k, v = _qkv(1, 2, 2, 25, 25, 32)
    qd, qs, qdeq = q_int4_rows(q)
    kd, _, kdeq = q_int4_rows(k)
    vd, vs_rows, vdeq = q_int4_rows(v)
    # K with one per-tensor scale (broadcast shape (1, 1, 1, 1)).
    ks = (k.abs().amax() / 7.0).reshape(1, 1, 1, 1)
    kv = torch.clamp(torch.round(k / ks), -8, 7).to(torch.int32)
    kd = ((kv[..., 0::2] & 0xF) | ((kv[..., 1::2] & 0xF) << 4)).to(torch.uint8)
    kdeq = kv.to(torch.float32) * ks
    out, lse = _fwd(qdeq, kdeq, vdeq)
    do = torch.randn_like(q)
    got = _run(do, _placeholder(q), _placeholder(k), _placeholder(v), out, lse,
               q_data=qd, q_scale=qs, k_data=kd, k_scale=ks, v_data=vd, v_scale=vs_rows)
    _check(got, reference_attention_backward(do, qdeq, kdeq, vdeq), 2e-5)


def test_bad_arguments_are_named():
    q, k, v = _qkv(1, 3, 2, 8, 8, 32)
    out, lse = torch.zeros_like(q), torch.zeros(1, 3, 8)
    with pytest.raises(ValueError, match="Hq"):
        _run(torch.zeros_like(q), q, k, v, out, lse)
    q, k, v = _qkv(1, 2, 2, 8, 8, 32)
    with pytest.raises(ValueError, match="pv_precision"):
        _run(torch.zeros_like(q), q, k, v, torch.zeros_like(q), torch.zeros(1, 2, 8), pv_precision="int4")
    with pytest.raises(ValueError, match="q_scale"):
        _run(torch.zeros_like(q), q, k, v, torch.zeros_like(q), torch.zeros(1, 2, 8),
             q_data=torch.zeros(1, 2, 8, 32, dtype=torch.int8))
