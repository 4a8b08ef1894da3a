"""The gradient of a float attn_mask that requires grad (learned relative-position biases,
T5's position_bias, ALiBi-style slopes): flash_quant.attention, the SDPA router and
nn.MultiheadAttention against SDPA's own mask gradient in float64.

The bars follow tests/test_training.py: unquantized (fp32) rel-L2 < 1e-5 against fp64,
and never worse than 10x fp32 SDPA's own error; quantized operands against the fp64
gradient of the same quantized forward (straight-through: SDPA on the dequantized
operands), where only fp32 arithmetic separates the two.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flash_quant
from flash_quant import mask_gradient as mask_gradient_module
from flash_quant import ops
from flash_quant.integrations import route_sdpa, sdpa_routing_stats, reset_sdpa_routing_stats
from flash_quant.nn import MultiheadAttention
from flash_quant.testing import error_stats, make_qkv

#: fp32 kernels against the fp64 gradient (as test_fp32_gradients_match_fp64).
FP32_BAR = 1e-5
#: ... or at most this multiple of fp32 SDPA's own error, where that is larger.
BASELINE_FACTOR = 10.0
#: Pre-quantized operands of the "realistic" family (outlier channels): our kernel forms
#: the scores from codes x scales, SDPA from the dequantized floats, so the two fp32
#: roundings differ by ~eps * |q| |k| per score, and SDPA's own fp32 error (one sample) is
#: a noisy yardstick: over 60 seeds x 4 recipes ours reached 3.1e-5 rel-L2 while fp32 SDPA
#: ranged 8e-7..1.8e-5 (one CI run failed at 1.4e-5 against a 1.1e-5 bar). A wrong
#: quantized gradient (a misapplied scale, zero point or rotation) is >= 1e-3.
QUANT_FP32_BAR = 1e-4

B, HQ, HKV, SQ, SKV, D = 2, 4, 2, 19, 23, 32


def _sdpa_mask_grad(q, k, v, mask, do, dtype, **kw):
    """SDPA's (out, mask gradient) with q, k, v and the mask in `dtype`. SDPA takes no
    mask with is_causal: causality is added to the mask as -inf (same mask gradient)."""
    leaf = mask.detach().to(dtype).requires_grad_(True)
    bias = leaf
    if kw.pop("is_causal", False):
        sq, skv = q.shape[-2], k.shape[-2]
        hidden = torch.ones(sq, skv, dtype=torch.bool).triu(1)  # top-left aligned
        bias = leaf + torch.zeros(sq, skv, dtype=dtype).masked_fill(hidden, float("-inf"))
    out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=bias, **kw)
    return out, torch.autograd.grad(out, leaf, do.to(dtype))[0]


def _ours_mask_grad(q, k, v, mask, do, **kw):
    leaf = mask.detach().clone().requires_grad_(True)
    out = flash_quant.attention(q, k, v, attn_mask=leaf, **kw)
    (g,) = torch.autograd.grad(out, leaf, do)
    return out, g


def _assert_matches_fp64(got, q, k, v, mask, do, what, floor=FP32_BAR, **sdpa_kw):
    _, ref = _sdpa_mask_grad(q, k, v, mask, do, torch.float64, **sdpa_kw)
    _, base = _sdpa_mask_grad(q, k, v, mask, do, torch.float32, **sdpa_kw)
    assert got.shape == mask.shape and got.dtype == mask.dtype, f"{what}: {got.shape} {got.dtype}"
    bar = max(floor, BASELINE_FACTOR * error_stats(base, ref)["rel_l2"])
    st = error_stats(got, ref)
    assert st["rel_l2"] < bar, f"{what}: {st} (bar {bar:.2e})"


MASK_SHAPES = [(1, 1, SQ, SKV), (B, 1, 1, SKV), (1, HQ, SQ, SKV), (SQ, SKV), (B, HQ, SQ, SKV), (SKV,)]


@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_functional_matches_sdpa_fp64(shape, causal):
    """fp32 preset, GQA, every broadcast shape, with and without causal: the mask's
    gradient has the mask's own shape and is SDPA's."""
    q, k, v = make_qkv(B, HQ, SQ, D, hkv=HKV, skv=SKV)
    mask = torch.randn(shape)
    do = torch.randn(B, HQ, SQ, D)
    _, got = _ours_mask_grad(q, k, v, mask, do, is_causal=causal, enable_gqa=True, config="fp32")
    _assert_matches_fp64(got, q, k, v, mask, do, f"mask {shape} causal={causal}", is_causal=causal,
                         enable_gqa=True)


def test_gradients_of_q_k_v_unchanged_with_a_learned_mask():
    """dQ/dK/dV with a mask that requires grad are those without (one backward call)."""
    q, k, v = make_qkv(1, 2, 16, 32)
    mask, do = torch.randn(1, 2, 16, 16), torch.randn(1, 2, 16, 32)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, mask)]
    out = flash_quant.attention(*leaves[:3], attn_mask=leaves[3], config="fp32")
    with_mask = torch.autograd.grad(out, leaves, do)
    leaves2 = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out2 = flash_quant.attention(*leaves2, attn_mask=mask, config="fp32")
    without = torch.autograd.grad(out2, leaves2, do)
    for a, b in zip(with_mask[:3], without):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# (precision, rotate, smooth K, asymmetric K, quantized V)
QUANT_CASES = [
    ("int8", True, True, False, False),  # the accurate preset's Q/K recipe
    ("int8", False, False, True, True),
    ("int4", False, True, False, False),
    ("fp8_e4m3", True, False, False, True),
]


@pytest.mark.parametrize("precision,rotate,smooth,asym,quant_v", QUANT_CASES)
def test_quantized_operands_straight_through(precision, rotate, smooth, asym, quant_v):
    """Pre-quantized Q/K (rotated, smoothed, asymmetric) and V: the mask gradient is the
    fp64 gradient of the quantized forward, i.e. SDPA on the dequantized operands."""
    q, k, v = make_qkv(1, HQ, SQ, D, hkv=HKV, skv=SKV, family="realistic")
    strategy = "asymmetric" if asym else "symmetric"
    qq = flash_quant.quantize(q, precision, rotate=rotate)
    kq = flash_quant.quantize(k, precision, strategy=strategy, smooth=smooth, rotate=rotate)
    vq = flash_quant.quantize(v, "int8", flash_quant.PerChannel()) if quant_v else v
    mask = torch.randn(1, HQ, SQ, SKV)
    do = torch.randn(1, HQ, SQ, D)
    _, got = _ours_mask_grad(qq, kq, vq, mask, do, enable_gqa=True, is_causal=True)
    deq = [t.dequantize(torch.float32) if isinstance(t, flash_quant.QuantizedTensor) else t for t in (qq, kq, vq)]
    _assert_matches_fp64(got, *deq, mask, do, precision, floor=QUANT_FP32_BAR, enable_gqa=True,
                         is_causal=True)


@pytest.mark.parametrize("config", ["accurate", "fast", "int4"])
def test_quantized_presets_near_exact_gradient(config):
    """Float inputs, quantized presets: the mask gradient tracks the exact (fp64,
    unquantized) one as dQ/dK do (tests/test_training.py's bar: cosine >= 0.999 for the
    8-bit presets; int4's scores are coarser)."""
    q, k, v = make_qkv(1, HQ, 64, D, hkv=HKV)
    mask = torch.randn(1, 1, 64, 64)
    do = torch.randn(1, HQ, 64, D)
    _, got = _ours_mask_grad(q, k, v, mask, do, enable_gqa=True, config=config)
    _, ref = _sdpa_mask_grad(q, k, v, mask, do, torch.float64, enable_gqa=True)
    st = error_stats(got, ref)
    cos_min = 0.99 if config == "int4" else 0.999
    assert st["cosine"] >= cos_min, f"{config}: {st}"


def test_chunks_cover_every_head_and_row(monkeypatch):
    """Chunks of one head and a few query rows (CHUNK_SCORES below one head's scores)
    give the unchunked gradient."""
    q, k, v = make_qkv(2, HQ, SQ, D, hkv=HKV, skv=SKV)
    mask, do = torch.randn(2, 1, SQ, SKV), torch.randn(2, HQ, SQ, D)
    _, whole = _ours_mask_grad(q, k, v, mask, do, is_causal=True, enable_gqa=True, config="fp32")
    monkeypatch.setattr(mask_gradient_module, "CHUNK_SCORES", 3 * SKV)
    _, chunked = _ours_mask_grad(q, k, v, mask, do, is_causal=True, enable_gqa=True, config="fp32")
    assert error_stats(chunked, whole)["rel_l2"] < 1e-6  # fp32 summation order only


def test_no_cost_without_a_gradient(monkeypatch):
    """A mask that does not require grad (float or bool) never reaches mask_gradient."""
    def boom(*args, **kwargs):
        raise AssertionError("mask_gradient called for a mask without gradient")

    monkeypatch.setattr(ops, "mask_gradient", boom)
    q, k, v = (t.requires_grad_(True) for t in make_qkv(1, 2, 16, 32))
    for mask in (torch.randn(16, 16), torch.rand(16, 16) > 0.3):
        flash_quant.attention(q, k, v, attn_mask=mask, config="fp32").sum().backward()


def test_torch_compile_matches_eager():
    """torch.compile (fake kernels, AOTAutograd's joint graph) gives the eager mask gradient."""
    q, k, v = make_qkv(1, 2, 24, 32)
    mask, do = torch.randn(1, 2, 24, 24), torch.randn(1, 2, 24, 32)

    def f(q, k, v, m):
        return flash_quant.attention(q, k, v, attn_mask=m, is_causal=True, config="accurate")

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaf = mask.clone().requires_grad_(True)
    (got,) = torch.autograd.grad(cf(q, k, v, leaf), leaf, do)
    _, want = _ours_mask_grad(q, k, v, mask, do, is_causal=True, config="accurate")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_sdpa_router_routes_and_differentiates_the_mask():
    """Under route_sdpa a learned mask is routed (not sent back to torch) and gets SDPA's
    gradient."""
    q, k, v = make_qkv(B, HQ, SQ, D, skv=SKV)
    mask, do = torch.randn(1, HQ, SQ, SKV), torch.randn(B, HQ, SQ, D)
    leaf = mask.clone().requires_grad_(True)
    reset_sdpa_routing_stats()
    with route_sdpa("fp32"):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=leaf)
    assert sdpa_routing_stats() == {"routed": 1, "fallback": {}}
    (got,) = torch.autograd.grad(out, leaf, do)
    _assert_matches_fp64(got, q, k, v, mask, do, "route_sdpa")


@pytest.mark.parametrize("mask_dims", [2, 3])
def test_multihead_attention_float_mask_gradient(mask_dims):
    """nn.MultiheadAttention with a float attn_mask (L, S) or (N * H, L, S) that requires
    grad: its gradient is torch's (float64 module as the reference)."""
    e, h, n, length, src = 64, 2, 2, 7, 9
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(e, h, batch_first=True).double().eval()
    ours = MultiheadAttention(e, h, batch_first=True, config="fp32").eval()
    ours.load_state_dict({name: p.float() for name, p in ref.state_dict().items()})
    x, mem = torch.randn(n, length, e), torch.randn(n, src, e)
    mask = torch.randn((length, src) if mask_dims == 2 else (n * h, length, src))

    leaf = mask.clone().requires_grad_(True)
    ours(x, mem, mem, attn_mask=leaf, need_weights=False)[0].square().sum().backward()
    leaf64 = mask.double().requires_grad_(True)
    ref(x.double(), mem.double(), mem.double(), attn_mask=leaf64, need_weights=False)[0].square().sum().backward()
    st = error_stats(leaf.grad, leaf64.grad)
    assert st["rel_l2"] < FP32_BAR, st
