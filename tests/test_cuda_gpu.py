"""GPU tests of the CUDA backend: the compiled Triton kernels at realistic sizes.

Marked ``gpu`` (skipped without CUDA, see conftest.py). Run on a GPU machine with
``pytest -m gpu tests/test_cuda_gpu.py`` (benchmarks/gpu_run.sh does).
"""

import pytest
import torch

pytestmark = pytest.mark.gpu

if torch.cuda.is_available():
    import flash_quant  # noqa: F401  (registers the CUDA kernels)
    from flash_quant.cuda.forward import attention_forward_launch
    from flash_quant.cuda.quantize import quantize_launch
from flash_quant.testing import error_stats, make_qkv, reference_attention

DEV = "cuda"
QRANGE = {"int8": 127.0, "int4": 7.0, "fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}


def _codes(data, precision):
    if precision == "int4":
        b = data.int()
        lo, hi = ((b & 0xF) ^ 8) - 8, (((b >> 4) & 0xF) ^ 8) - 8
        return torch.stack([lo, hi], -1).flatten(-2).float()
    return data.float()


def _ops(q, k, v, preset):
    ops = torch.ops.flash_quant
    kw, pv = {}, "none"
    if preset in ("accurate", "fast", "fp8pv", "int4", "fp8"):
        prec = {"int4": "int4", "fp8": "fp8_e4m3"}.get(preset, "int8")
        a, s, _, _ = ops.quantize(q, prec, "per_token", 1, "symmetric", False)
        b, t, _, m = ops.quantize(k, prec, "per_token", 1, "symmetric", preset != "fp8")
        kw.update(q_data=a, q_scale=s, k_data=b, k_scale=t, k_mean=m if preset != "fp8" else None)
    if preset == "fast":  # the fast preset's P·V: INT8 V per channel, INT8 P per key tile
        c, u, _, _ = ops.quantize(v, "int8", "per_channel", 1, "symmetric", False)
        kw.update(v_data=c, v_scale=u)
        pv = "int8"
    if preset == "fp8pv":  # FP8 V per channel and P rounded to e4m3
        c, u, _, _ = ops.quantize(v, "fp8_e4m3", "per_channel", 1, "symmetric", False)
        kw.update(v_data=c, v_scale=u)
        pv = "fp8_e4m3"
    return kw, pv


def _fwd(q, k, v, kw, pv, mask=None, causal=False):
    return torch.ops.flash_quant.attention_forward(
        q, k, v, kw.get("q_data"), kw.get("q_scale"), None, kw.get("k_data"), kw.get("k_scale"), None,
        kw.get("k_mean"), kw.get("v_data"), kw.get("v_scale"), None, mask, causal, None, pv)


@pytest.mark.parametrize("precision", ["int8", "int4", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("granularity", ["per_token", "per_block", "per_channel", "per_head", "per_tensor"])
def test_quantize_gpu_matches_torch(precision, granularity):
    x = (torch.randn(2, 8, 1000, 128, device=DEV) * 2 + torch.randn(2, 8, 1, 128, device=DEV)).half()
    data, s, z, mean = torch.ops.flash_quant.quantize(x, precision, granularity, 64, "symmetric", True)
    xf = x.float() - mean
    if granularity == "per_block":
        se = s.repeat_interleave(64, dim=-2)[..., :1000, :]
    else:
        se = s
    if precision.startswith("fp8"):
        dt = torch.float8_e4m3fn if precision == "fp8_e4m3" else torch.float8_e5m2
        want = (xf / se).to(dt).float()
    else:
        want = torch.round(xf / se).clamp(-QRANGE[precision], QRANGE[precision])
    got = _codes(data, precision)
    assert (got != want).float().mean().item() < 1e-5  # ties in the fp32 mean may flip a code
    dq = torch.ops.flash_quant.dequantize(data, s, z, mean, precision, 64 if granularity == "per_block" else 1,
                                          torch.float32)
    err = (dq - x.float()).abs().max() / x.float().abs().max()
    assert err < {"int8": 0.01, "int4": 0.2, "fp8_e4m3": 0.07, "fp8_e5m2": 0.15}[precision]


# rel-L2 bounds on N(0, 1) inputs, hd128, S=2048. "fast" is the preset's INT8 P·V (bar
# 2.5 %). "fp8pv" is FP8 V + P rounded to e4m3 (pv "fp8_e4m3"): measured 3.4-3.8 % on H100
# (2026-11-23), the rounding of P itself accounts for it (fp64 simulation: 3.7 %), so it is
# no preset. Q/K here are not rotated (the kernels are tested, not the Python presets).
LSE_TOL = {"fp16": 0.02, "accurate": 0.05, "fast": 0.05, "fp8pv": 0.05, "int4": 0.6, "fp8": 0.15}


@pytest.mark.parametrize("preset,bound", [("fp16", 5e-3), ("accurate", 1.2e-2), ("fast", 2.5e-2),
                                          ("fp8pv", 5e-2), ("int4", 0.25), ("fp8", 0.05)])
@pytest.mark.parametrize("causal", [False, True])
def test_presets_accuracy_large(preset, bound, causal):
    q, k, v = make_qkv(1, 8, 2048, 128, family="normal", dtype=torch.float16, device=DEV)
    kw, pv = _ops(q, k, v, preset)
    out, lse = _fwd(q, k, v, kw, pv, causal=causal)
    sl = slice(0, 2)
    ref, lse_ref = reference_attention(q[:, sl].cpu(), k[:, sl].cpu(), v[:, sl].cpu(), is_causal=causal, return_lse=True)
    e = error_stats(out[:, sl].cpu(), ref)
    print(preset, causal, e)
    assert e["rel_l2"] < bound, e
    assert (lse[:, sl].cpu() - lse_ref).abs().max() < LSE_TOL[preset]


@pytest.mark.parametrize("preset,bound", [("fp16", 5e-3), ("accurate", 1.2e-2), ("fast", 2.5e-2)])
def test_decode_split_kv(preset, bound):
    """Decode (one query row, long cache, GQA): the launch splits the keys (split-KV) and
    the merged result meets the preset's bar; the unsplit kernel agrees."""
    from flash_quant.cuda.forward import attention_forward_launch, split_count

    q, k, v = make_qkv(2, 32, 1, 128, hkv=8, skv=8191, family="normal", dtype=torch.float16, device=DEV)
    assert split_count(2 * 32, 1, 8191, 64, q.device) > 1
    kw, pv = _ops(q, k, v, preset)
    out, lse = _fwd(q, k, v, kw, pv, causal=False)
    ref, lse_ref = reference_attention(q[:1, :4].cpu(), k[:1, :1].cpu(), v[:1, :1].cpu(), return_lse=True)
    e = error_stats(out[:1, :4].cpu(), ref)
    assert e["rel_l2"] < bound, (preset, e)
    assert (lse[:1, :4].cpu() - lse_ref).abs().max() < LSE_TOL[preset], preset
    one, _ = attention_forward_launch(q, k, v, pv_precision=pv, num_splits=1, **kw)
    assert error_stats(out, one)["rel_l2"] < 2e-3


@pytest.mark.parametrize("D", [32, 64, 96, 128, 256])
def test_head_dims_gqa_tails(D):
    q, k, v = make_qkv(2, 8, 1000, D, hkv=2, skv=777, family="realistic", dtype=torch.bfloat16, device=DEV)
    for preset in ("fp16", "accurate", "fast"):
        kw, pv = _ops(q, k, v, preset)
        for causal in (False, True):
            out, _ = _fwd(q, k, v, kw, pv, causal=causal)
            ref = reference_attention(q[:1, :2].cpu(), k[:1, :1].cpu(), v[:1, :1].cpu(), is_causal=causal)
            e = error_stats(out[:1, :2].cpu(), ref)
            assert e["rel_l2"] < {"fp16": 1e-2, "accurate": 3e-2, "fast": 8e-2}[preset], (preset, causal, e)


def test_masks_and_empty_rows():
    q, k, v = make_qkv(2, 4, 300, 64, dtype=torch.float16, device=DEV)
    bmask = torch.rand(2, 1, 300, 300, device=DEV) > 0.5
    bmask[:, :, 3] = False
    amask = torch.randn(1, 4, 300, 300, device=DEV, dtype=torch.float16)
    for mask in (bmask, amask):
        kw, pv = _ops(q, k, v, "accurate")
        out, lse = _fwd(q, k, v, kw, pv, mask=mask, causal=True)
        ref, lse_ref = reference_attention(q.cpu(), k.cpu(), v.cpu(), attn_mask=mask.cpu(), is_causal=True, return_lse=True)
        assert error_stats(out.cpu(), ref)["rel_l2"] < 2e-2
        assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(lse_ref))
    assert (out[:, :, 3] == 0).all() or mask is amask


def test_cuda_graph_and_second_device_index():
    q, k, v = make_qkv(1, 8, 512, 128, dtype=torch.float16, device=DEV)
    kw, pv = _ops(q, k, v, "fast")
    out0, _ = _fwd(q, k, v, kw, pv)  # warm-up: autotune outside the capture
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _fwd(q, k, v, kw, pv)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        out_g, _ = _fwd(q, k, v, kw, pv)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out_g, out0)
    if torch.cuda.device_count() > 1:
        q1, k1, v1 = (t.to("cuda:1") for t in (q, k, v))
        kw1, pv1 = _ops(q1, k1, v1, "fast")
        out1, _ = _fwd(q1, k1, v1, kw1, pv1)
        assert out1.device.index == 1 and torch.equal(out1.cpu(), out0.cpu())


def test_long_sequence_fp8_promotion():
    # 16k keys: without fp32 promotion every <=128 keys, FP8 P·V accumulation drifts
    q, k, v = make_qkv(1, 2, 256, 128, skv=16384, dtype=torch.float16, device=DEV)
    v = v + 3.0  # large common mean: the sum over keys is big, where 22-bit accumulation fails
    kw, pv = _ops(q, k, v, "fast")
    out, _ = _fwd(q, k, v, kw, pv)
    ref = reference_attention(q.cpu(), k.cpu(), v.cpu())
    assert error_stats(out.cpu(), ref)["rel_l2"] < 2.5e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_prologue_gpu(dtype):
    """The Triton prologue at Flux's joint-block size (512 text + 4096 image tokens, 24 heads
    of 128): half an ulp of the float64 contract (the GPU rounds to nearest), the CPU
    kernel's result, and the gradients of the registered autograd formula."""
    from test_attention_prologue import TOL, inputs, reference

    x, prefix, w, pw, eps, cos, sin = inputs(1, 4096, 512, 24, 128, dtype)
    args = [t.to(DEV) if isinstance(t, torch.Tensor) else t for t in (x, prefix, w, pw, eps, cos, sin)]
    out = torch.ops.flash_quant.attention_prologue(*args)
    ref = reference(*args)
    err = (out.double() - ref).abs()
    assert (err <= TOL[dtype] * ref.abs() + 1e-5).all(), f"max error {err.max().item():.3g}"
    cpu = torch.ops.flash_quant.attention_prologue(x, prefix, w, pw, eps, cos, sin)
    torch.testing.assert_close(out.cpu().float(), cpu.float(), rtol=2 * TOL[dtype], atol=1e-5)
    xs = args[0][:, :64].clone().requires_grad_(True)
    small = [xs, args[1][:, :16], args[2], args[3], eps, args[5][:80], args[6][:80]]
    torch.ops.flash_quant.attention_prologue(*small).float().square().sum().backward()
    xd = xs.detach().double().requires_grad_(True)
    reference(xd, *small[1:]).square().sum().backward()
    # bf16 gradients: the output, its gradient and dx are each rounded to bf16
    rel = ((xs.grad.double() - xd.grad).norm() / xd.grad.norm()).item()
    assert rel < 8 * TOL[dtype], rel


def test_direct_launch_reuses_kernel_and_respects_alignment():
    """flash_quant.cuda.host.launch: the second call of a signature goes straight to the
    compiled kernels and gives the first call's result bit for bit; a view whose data is
    2-byte but not 16-byte aligned (same shape and strides, so the same launch plan) gets
    its own compiled kernel — Triton specialises on alignment; reusing the aligned one
    would fault on a misaligned vector load — and the same values."""
    from flash_quant.cuda import host

    q, k, v = make_qkv(2, 4, 1000, 128, dtype=torch.bfloat16, device=DEV)
    for preset in ("accurate", "fast"):
        o1 = flash_quant.attention(q, k, v, is_causal=True, config=preset)
        n = host.direct_launches()
        o2 = flash_quant.attention(q, k, v, is_causal=True, config=preset)
        assert host.direct_launches() > n
        assert torch.equal(o1, o2)

    def misaligned(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=DEV)
        m = buf[1:].view(t.shape)
        m.copy_(t)
        assert m.data_ptr() % 16 != 0 and m.stride() == t.stride()
        return m

    kw, pv = _ops(q, k, v, "accurate")
    ref, ref_lse = _fwd(q, k, v, kw, pv)  # V is read by the attention kernel itself
    out, lse = _fwd(q, k, misaligned(v), kw, pv)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)
    x = q.float()
    xm = misaligned(x)
    for a, b in zip(quantize_launch(x, "int8", "per_token", 1, "symmetric", False),
                    quantize_launch(xm, "int8", "per_token", 1, "symmetric", False)):
        assert torch.equal(a, b)  # a row's absmax does not depend on the load width
    # smoothing: the column means are sums, whose order follows the load vectorisation
    data, scale, _, mean = quantize_launch(x, "int8", "per_token", 1, "symmetric", True)
    data_m, scale_m, _, mean_m = quantize_launch(xm, "int8", "per_token", 1, "symmetric", True)
    torch.testing.assert_close(mean_m, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scale_m, scale, rtol=1e-5, atol=0)
    assert (data_m.int() - data.int()).abs().max() <= 1


@pytest.mark.parametrize("pv", ["none", "int8"])
def test_k_scale_constant_along_keys_gpu(pv):
    """The KS_CONST path (per-head K scale folded into the row factor, the int32 -> fp32
    offset into the exponent's FMA) against the same codes with the scale materialised per
    key row (the general path), at a ragged causal size with GQA."""
    q, k, v = make_qkv(2, 8, 1000, 128, hkv=4, family="realistic", dtype=torch.bfloat16, device=DEV)
    ops = torch.ops.flash_quant
    a, s, _, _ = ops.quantize(q, "int8", "per_token", 1, "symmetric", False)
    b, t, _, m = ops.quantize(k, "int8", "per_head", 1, "symmetric", True)
    kw = dict(q_data=a, q_scale=s, k_data=b, k_mean=m)
    if pv == "int8":
        c, u, _, _ = ops.quantize(v, "int8", "per_channel", 1, "symmetric", False)
        kw.update(v_data=c, v_scale=u)
    out, lse = attention_forward_launch(q, k, v, k_scale=t, is_causal=True, pv_precision=pv, **kw)
    rows = t.expand(2, 4, 1000, 1).contiguous()
    out_g, lse_g = attention_forward_launch(q, k, v, k_scale=rows, is_causal=True, pv_precision=pv, **kw)
    assert error_stats(out.cpu(), out_g.cpu().double())["rel_l2"] < (1e-2 if pv == "int8" else 4e-3)
    torch.testing.assert_close(lse, lse_g, rtol=0, atol=1e-3)


def test_direct_launch_backward_bitwise():
    """The backward's launches go through host.launch too: a second backward of the same
    signature reuses the compiled kernels and gives the first one's gradients bit for bit
    (the backward is deterministic)."""
    from flash_quant.cuda import host

    q, k, v = make_qkv(1, 4, 777, 64, hkv=2, dtype=torch.bfloat16, device=DEV)
    grads = []
    for _ in range(2):
        n = host.direct_launches()
        a = [t.clone().requires_grad_(True) for t in (q, k, v)]
        flash_quant.attention(*a, is_causal=True, enable_gqa=True, config="accurate").float().square().sum().backward()
        grads.append([t.grad for t in a])
    assert host.direct_launches() > n
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("D,dtype", [(64, torch.bfloat16), (72, torch.float16), (128, torch.bfloat16),
                                     (256, torch.bfloat16), (128, torch.float32), (512, torch.bfloat16)])
@pytest.mark.parametrize("granularity", ["per_token", "per_channel"])
def test_quantize_fused_rotation_gpu(D, dtype, granularity):
    """rotate=True in the compiled kernels (D 72: Hadamard blocks of 8; 512 bf16: too wide
    to fuse, a float32 matmul rotates first) against quantizing the float64-rotated x."""
    from flash_quant.rotation import rotate

    x = (torch.randn(2, 6, 1000, D, device=DEV) * 2 + torch.randn(2, 6, 1, D, device=DEV)).to(dtype)
    xr = rotate(x.double()).float()
    got = torch.ops.flash_quant.quantize(x, "int8", granularity, 1, "symmetric", True, True)
    want = quantize_launch(xr, "int8", granularity, 1, "symmetric", True, False)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=0)
    torch.testing.assert_close(got[3], want[3], rtol=1e-5, atol=1e-5)
    diff = (got[0].int() - want[0].int()).abs()
    assert diff.max() <= 1 and diff.float().mean() < 1e-3


@pytest.mark.parametrize("preset", ["accurate", "fast"])
def test_attention_fused_rotation_matches_rotate_then_quantize(preset):
    """flash_quant.attention now quantizes Q and K with the rotation inside the quantize
    kernels and hands the op a stand-in for the rotated floats. Against the former route
    (rotate by a matmul, quantize the rotated bf16 copy), at a ragged causal GQA size:
    the same error against fp64 (the fused rotation keeps fp32 values, so no worse), and
    the same gradients through the stand-in's unrotation."""
    from flash_quant.rotation import rotate

    q, k, v = make_qkv(1, 8, 1000, 128, hkv=4, family="realistic", dtype=torch.bfloat16, device=DEV)
    ops = torch.ops.flash_quant
    qr, kr = rotate(q), rotate(k)
    a, s, _, _ = ops.quantize(qr, "int8", "per_token", 1, "symmetric", False)
    b, t, _, m = ops.quantize(kr, "int8", "per_token", 1, "symmetric", True)
    kw, pv = dict(q_data=a, q_scale=s, k_data=b, k_scale=t, k_mean=m), "none"
    if preset == "fast":
        c, u, _, _ = ops.quantize(v, "int8", "per_channel", 1, "symmetric", False)
        kw.update(v_data=c, v_scale=u)
        pv = "int8"
    old, _ = attention_forward_launch(qr, kr, v, is_causal=True, pv_precision=pv, **kw)
    new = flash_quant.attention(q, k, v, is_causal=True, enable_gqa=True, config=preset)
    ref = reference_attention(q.cpu(), k.cpu(), v.cpu(), is_causal=True)
    e_old, e_new = error_stats(old.cpu(), ref)["rel_l2"], error_stats(new.cpu(), ref)["rel_l2"]
    assert e_new < e_old * 1.1 + 1e-4, (e_new, e_old)
    # gradients: the stand-in's backward unrotates like rotate()'s matmul did (the two
    # routes' codes differ where bf16 rounding of the rotated copy moved a value across a
    # rounding step, so close, not equal; a missing unrotation would be off by ~140 %)
    import dataclasses

    g = torch.randn_like(q)
    grads = []
    cfg = flash_quant.config.resolve_config(preset)
    norot = dataclasses.replace(cfg, q=dataclasses.replace(cfg.q, rotate=False),
                                k=dataclasses.replace(cfg.k, rotate=False))
    for fused in (True, False):
        a3 = [x.clone().requires_grad_(True) for x in (q, k, v)]
        if fused:
            o = flash_quant.attention(*a3, is_causal=True, enable_gqa=True, config=preset)
        else:  # the former route: the rotation's matmul in the autograd graph
            o = flash_quant.attention(rotate(a3[0]), rotate(a3[1]), a3[2], is_causal=True, enable_gqa=True,
                                      config=norot)
        (o.float() * g).sum().backward()
        grads.append([x.grad.float() for x in a3])
    for gn, go in zip(*grads):
        assert error_stats(gn.cpu(), go.cpu().double())["rel_l2"] < 5e-2
