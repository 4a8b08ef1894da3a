"""flash_quant::attention_prologue on CPU: the contract of csrc/schema.cpp against a float64
reference, diffusers' own RMSNorm + apply_rotary_emb, autograd (gradcheck on float64),
opcheck, and the input checks. The CUDA (Triton) kernel is compared with this one in
tests/test_cuda_interpret.py."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import flash_quant  # noqa: F401  (registers the ops)
from flash_quant import ops

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None


def reference(x, prefix=None, weight=None, prefix_weight=None, eps=None, cos=None, sin=None):
    """The contract in float64, step by step as diffusers writes it."""

    def norm(t, w):
        t = t.double()
        if eps is None:
            return t
        t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)
        return t if w is None else t * w.double()

    y = norm(x, weight)
    if prefix is not None:
        y = torch.cat([norm(prefix, prefix_weight), y], dim=1)
    if cos is not None:
        re, im = y.unflatten(-1, (-1, 2)).unbind(-1)
        partner = torch.stack([-im, re], dim=-1).flatten(-2)
        y = y * cos.double()[None, :, None, :] + partner * sin.double()[None, :, None, :]
    return y.transpose(1, 2)


def rope_tables(n, d, dtype=torch.float32):
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = (pos * freq).repeat_interleave(2, dim=1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def inputs(b, s, p, h, d, dtype, norm=True, rope=True, weights=True):
    x = torch.randn(b, s, h, d).to(dtype)
    prefix = torch.randn(b, p, h, d).to(dtype) if p else None
    w = (1 + 0.3 * torch.randn(d)).to(dtype) if (norm and weights) else None
    pw = (1 + 0.3 * torch.randn(d)).to(dtype) if (norm and weights and p) else None
    eps = 1e-6 if norm else None
    cos, sin = rope_tables(s + p, d) if rope else (None, None)
    return x, prefix, w, pw, eps, cos, sin


TOL = {torch.float32: 2e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("s,p,h,d", [(1, 0, 1, 32), (17, 5, 3, 64), (40, 16, 2, 128), (9, 3, 2, 96), (5, 0, 2, 256)])
@pytest.mark.parametrize("steps", ["all", "norm_only", "rope_only", "layout_only", "no_weights"])
def test_matches_float64_reference(dtype, s, p, h, d, steps):
    norm = steps in ("all", "norm_only", "no_weights")
    rope = steps in ("all", "rope_only", "no_weights")
    args = inputs(2, s, p, h, d, dtype, norm=norm, rope=rope, weights=steps != "no_weights")
    out = ops.attention_prologue(*args)
    ref = reference(*args)
    assert out.shape == (2, h, s + p, d) and out.dtype == dtype and out.is_contiguous()
    # computed in float32 and rounded once: within half an ulp of the output dtype (+ fp32 noise)
    tol = TOL[dtype]
    err = (out.double() - ref).abs()
    assert (err <= tol * ref.abs() + 1e-5).all(), f"max error {err.max().item():.3g}"


def test_strided_input_and_segment_weights():
    """x as a projection's (B, S, H*D) output unflattened (strided), distinct prefix weights."""
    b, s, p, h, d = 1, 23, 7, 4, 64
    proj = torch.randn(b, s, 3 * h * d)
    x = proj[..., h * d: 2 * h * d].unflatten(-1, (h, d))  # a strided view, as after chunk(3)
    assert not x.is_contiguous()
    _, prefix, w, pw, eps, cos, sin = inputs(b, s, p, h, d, torch.float32)
    out = ops.attention_prologue(x, prefix, w, pw, eps, cos, sin)
    torch.testing.assert_close(out.double(), reference(x, prefix, w, pw, eps, cos, sin), rtol=2e-6, atol=1e-5)


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="needs diffusers")
def test_matches_diffusers_norm_and_rope():
    """Same result as diffusers' Flux steps (RMSNorm per head, cat, apply_rotary_emb) up to
    their extra bf16 roundings (diffusers rounds after the norm and after the weight)."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.normalization import RMSNorm

    b, s, p, h, d = 1, 33, 8, 3, 128
    x, prefix, _, _, _, cos, sin = inputs(b, s, p, h, d, torch.bfloat16)
    norm_x, norm_p = RMSNorm(d, eps=1e-6), RMSNorm(d, eps=1e-6)
    with torch.no_grad():
        norm_x.weight.copy_(1 + 0.3 * torch.randn(d))
        norm_p.weight.copy_(1 + 0.3 * torch.randn(d))
    norm_x, norm_p = norm_x.to(torch.bfloat16), norm_p.to(torch.bfloat16)
    with torch.no_grad():
        want = torch.cat([norm_p(prefix), norm_x(x)], dim=1)
        want = apply_rotary_emb(want, (cos, sin), sequence_dim=1).transpose(1, 2)
        got = ops.attention_prologue(x, prefix, norm_x.weight, norm_p.weight, 1e-6, cos, sin)
        ref = reference(x, prefix, norm_x.weight, norm_p.weight, 1e-6, cos, sin)
    rel = lambda a: ((a.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    assert rel(got) < 2e-3  # one rounding to bf16
    assert rel(want) < 6e-3  # diffusers: three roundings
    assert ((got.double() - want.double()).norm() / want.double().norm()).item() < 6e-3


def test_gradients_float64():
    b, s, p, h, d = 1, 5, 3, 2, 8
    x, prefix, w, pw, eps, cos, sin = inputs(b, s, p, h, d, torch.float64)
    for t in (x, prefix, w, pw):
        t.requires_grad_(True)
    f = lambda x_, p_, w_, pw_: ops.attention_prologue(x_, p_, w_, pw_, eps, cos.double(), sin.double())  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, prefix, w, pw))
    g = lambda x_: ops.attention_prologue(x_, None, None, None, None, cos.double()[p:], sin.double()[p:])  # noqa: E731
    assert torch.autograd.gradcheck(g, (x,))
    n = lambda x_: ops.attention_prologue(x_, None, None, None, 0.0, None, None)  # noqa: E731
    assert torch.autograd.gradcheck(n, (x,))


def test_opcheck():
    args = inputs(2, 9, 4, 2, 32, torch.float32)
    torch.library.opcheck(torch.ops.flash_quant.attention_prologue.default, args)
    x = args[0].clone().requires_grad_(True)
    torch.library.opcheck(torch.ops.flash_quant.attention_prologue.default, (x,) + tuple(args[1:]))


def test_compiles_without_graph_break():
    x, prefix, w, pw, eps, cos, sin = inputs(1, 12, 4, 2, 32, torch.float32)
    x.requires_grad_(True)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(x):
        return ops.attention_prologue(x, prefix, w, pw, eps, cos, sin).square().sum()

    f(x).backward()
    g_compiled = x.grad.clone()
    x.grad = None
    ops.attention_prologue(x, prefix, w, pw, eps, cos, sin).square().sum().backward()
    torch.testing.assert_close(g_compiled, x.grad)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(x=torch.randn(2, 3, 4)), "x must be \\(B, S, H, D\\)"),
        (dict(prefix=torch.randn(1, 2, 3, 32)), "prefix must be \\(B, P, H, D\\)"),
        (dict(weight=torch.randn(16)), "norm weights must be \\(D,\\)"),
        (dict(eps=None), "needs eps"),
        (dict(eps=-1.0), "eps must be finite"),
        (dict(sin=None), "both cos and sin"),
        (dict(cos=torch.randn(5, 32), sin=torch.randn(5, 32)), "cos / sin must be \\(P \\+ S, D\\)"),
        (dict(prefix=None), "prefix_weight given without a prefix"),
    ],
)
def test_bad_inputs_are_named(change, match):
    x, prefix, w, pw, eps, cos, sin = inputs(2, 9, 4, 2, 32, torch.float32)
    args = dict(x=x, prefix=prefix, weight=w, prefix_weight=pw, eps=eps, cos=cos, sin=sin)
    args.update(change)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        ops.attention_prologue(**args)


def test_odd_head_dim_with_rope_is_refused():
    x = torch.randn(1, 4, 1, 33)
    cos, sin = torch.ones(4, 33), torch.zeros(4, 33)
    with pytest.raises(RuntimeError, match="head dim must be even"):
        ops.attention_prologue(x, None, None, None, None, cos, sin)
