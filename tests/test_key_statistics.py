"""Statistics over the key axis (issue 15, item 1): keys no query may see must not change
a result, and a few outlier keys must not dominate K's smoothing centre.

The end-to-end cases run flash_quant.attention's own Python path on three backends: the
CPU kernels, the CUDA Triton kernels under TRITON_INTERPRET=1 and the Metal kernels under
the emulator (tools/metal_emu), the latter two by pointing the quantize / attention ops
the Python layer calls at those kernels. Each compares with an fp64 SDPA reference and
with the same call on clean inputs, against the preset's usual bars (tests/test_attention.py:
accurate 1.5 %, fast 3 % on masked inputs).
"""
import os
import shutil
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

import flash_quant  # noqa: E402
from flash_quant import ops  # noqa: E402
from flash_quant.config import AttentionConfig, OperandConfig, PerBlock, PerChannel, PerHead, PerTensor, Precision  # noqa: E402
from flash_quant.key_stats import CENTER_BLOCKS, robust_center, visible_keys  # noqa: E402
from flash_quant.rotation import hadamard_matrix, rotate  # noqa: E402
from flash_quant.testing import error_stats, make_qkv, reference_attention  # noqa: E402

#: rel-L2 bars vs fp64 on masked inputs (tests/test_attention.py::test_masks)
BAR = {"accurate": 0.015, "fast": 0.03}
GARBAGE = 1e4  # magnitude of what padded K / V rows hold


def _rel(a, b):
    return error_stats(a, b)["rel_l2"]


# ------------------------------------------------------------------------ visible_keys
def test_visible_keys_none_when_nothing_is_excluded_structurally():
    assert visible_keys(None, False, 2, 4, 2, 8, 8) is None
    assert visible_keys(None, True, 2, 4, 2, 8, 8) is None  # causal, Sq = Skv: the last row sees all
    assert visible_keys(None, True, 2, 4, 2, 9, 8) is None


def test_visible_keys_causal_with_fewer_queries():
    vis = visible_keys(None, True, 2, 4, 2, 5, 8)
    assert vis.shape == (1, 1, 1, 8) and vis.dtype == torch.bool
    assert vis.view(-1).tolist() == [True] * 5 + [False] * 3


def test_visible_keys_padding_mask_bool_and_float():
    lens = torch.tensor([8, 5, 1])
    keep = torch.arange(8) < lens[:, None]  # (B, S)
    vis = visible_keys(keep[:, None, None, :], False, 3, 4, 4, 6, 8)
    assert vis.shape == (3, 1, 1, 8)
    assert torch.equal(vis[:, 0, 0], keep)
    additive = torch.where(keep, 0.0, float("-inf"))[:, None, None, :].expand(3, 1, 6, 8)
    assert torch.equal(visible_keys(additive, False, 3, 4, 4, 6, 8)[:, 0, 0], keep)
    # a finite (even very negative) bias hides nothing
    assert visible_keys(torch.full((6, 8), -1e9), False, 3, 4, 4, 6, 8).all()


def test_visible_keys_rank2_mask_and_gqa_groups():
    # (Sq, Skv) mask: key 3 hidden from every row, key 5 visible to one row only
    m = torch.ones(6, 8, dtype=torch.bool)
    m[:, 3] = False
    m[:, 5] = False
    m[2, 5] = True
    vis = visible_keys(m, False, 2, 4, 2, 6, 8)
    assert vis.shape == (1, 1, 1, 8)
    assert vis.view(-1).tolist() == [True, True, True, False, True, True, True, True]
    # per-head mask, Hq = 4 over Hkv = 2: a key counts for a KV head if any of its query heads sees it
    m = torch.ones(1, 4, 6, 8, dtype=torch.bool)
    m[:, 0, :, 7] = False  # head 0 hides key 7, head 1 (same group) sees it
    m[:, 2:, :, 6] = False  # both heads of group 1 hide key 6
    vis = visible_keys(m, False, 1, 4, 2, 6, 8)
    assert vis.shape == (1, 2, 1, 8)
    assert vis[0, 0, 0].tolist() == [True] * 8
    assert vis[0, 1, 0].tolist() == [True] * 6 + [False, True]


def test_visible_keys_mask_combined_with_causal():
    # key 4 is allowed by the mask only for rows 0..2, which causality hides it from
    m = torch.ones(6, 8, dtype=torch.bool)
    m[3:, 4] = False
    vis = visible_keys(m, True, 1, 1, 1, 6, 8)
    assert vis.view(-1).tolist() == [True, True, True, True, False, True, False, False]


# ----------------------------------------------------------------------- robust_center
def _weighted_median_reference(k, vis):
    """Per (slice, channel), the lower weighted median of the visible-key block means."""
    s = k.shape[-2]
    bs = max(1, s // CENTER_BLOCKS)
    bounds = [(i, min(i + bs, s)) for i in range(0, (s // bs) * bs, bs)]
    if s % bs:
        bounds.append(((s // bs) * bs, s))
    out = torch.zeros(k.shape[:-2] + (1, k.shape[-1]))
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in k.shape[:-2]]).view(-1, k.dim() - 2).tolist():
        kk, vv = k[tuple(idx)].double(), vis[tuple(i if vis.shape[j] > 1 else 0 for j, i in enumerate(idx))][0]
        for d in range(k.shape[-1]):
            pts = []
            for a, b in bounds:
                n = int(vv[a:b].sum())
                if n:
                    pts.append((float(kk[a:b, d][vv[a:b]].mean()), n))
            if not pts:
                continue
            pts.sort()
            total, acc = sum(n for _, n in pts), 0
            for val, n in pts:
                acc += n
                if acc >= total / 2:
                    out[tuple(idx)][0, d] = val
                    break
    return out


@pytest.mark.parametrize("s", [7, 64, 100])
def test_robust_center_is_the_weighted_median_of_visible_block_means(s):
    g = torch.Generator().manual_seed(s)
    k = torch.randn(2, 3, s, 8, generator=g) + 3
    vis = torch.rand(2, 1, 1, s, generator=g) > 0.4
    vis[1, 0, 0] = False  # a slice with no visible key: 0
    got = robust_center(k, vis)
    assert got.shape == (2, 3, 1, 8) and got.dtype == torch.float32
    torch.testing.assert_close(got, _weighted_median_reference(k, vis), rtol=1e-5, atol=1e-5)
    assert got[1].abs().max() == 0
    # every key visible: the same centre as without a mask where the blocks are equal
    every = torch.ones(1, 1, 1, s, dtype=torch.bool)
    torch.testing.assert_close(robust_center(k, every), _weighted_median_reference(k, every), rtol=1e-5, atol=1e-5)
    if s % max(1, s // CENTER_BLOCKS) == 0:
        torch.testing.assert_close(robust_center(k), robust_center(k, every), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_robust_center_ignores_hidden_keys_and_outliers(dtype):
    k, _, _ = make_qkv(2, 2, 200, 32, family="realistic", seed=3)
    vis = (torch.arange(200) < torch.tensor([200, 130])[:, None])[:, None, None, :]
    dirty = k.clone()
    dirty[1, :, 130:] = GARBAGE * torch.randn(2, 70, 32)
    clean_c = robust_center(k.to(dtype), vis)
    torch.testing.assert_close(robust_center(dirty.to(dtype), vis), clean_c, rtol=0, atol=0)
    # one visible outlier key (an attention sink) drags the mean far, the centre barely
    sink = k.clone()
    sink[:, :, 0] += GARBAGE
    moved_mean = (sink.mean(-2, keepdim=True) - k.mean(-2, keepdim=True)).abs().max()
    moved = (robust_center(sink.to(dtype)) - robust_center(k.to(dtype))).abs().max()
    # (the median of ~32 block means moves by at most about one block's spread)
    spread = k.std(dim=-2).max()
    assert moved_mean > 40 and moved < 0.25 * spread, (moved_mean, moved, spread)


# --------------------------------------------------------------------- the op's center
GRANS = [("per_token", 1), ("per_block", 16), ("per_channel", 1), ("per_head", 1), ("per_tensor", 1)]


def _check_center_arg(quant, x, gran, bs, rotate_x):
    """codes / scale of quantize(x, smooth=True, center=c) equal those of quantizing
    (x [@ H]) - c unsmoothed; mean comes back as c."""
    c = torch.randn(x.shape[:-2] + (1, x.shape[-1])) * 2
    y = rotate(x.float()) if rotate_x else x.float()
    data, scale, zp, mean = quant(x, "int8", gran, bs, "symmetric", True, rotate_x, c)
    rdata, rscale, _, _ = quant(y - c, "int8", gran, bs, "symmetric", False, False, None)
    torch.testing.assert_close(mean, c, rtol=0, atol=0)
    if rotate_x:
        # the two compute x @ H in different summation orders: each rotated value may differ by
        # the worst-case rounding of a d-term dot product, d * eps * sum_i |x_i| |H_ij| with
        # |H_ij| = 1/sqrt(d), and the absmax scale (amax / 127) moves by at most that / 127 (the
        # centre's subtraction rounds once more, well inside: the bound was 66x the 4.1e-8 that failed in CI)
        d = x.shape[-1]
        bound = d * torch.finfo(torch.float32).eps * x.abs().max().item() * d ** 0.5 / 127
        torch.testing.assert_close(scale, rscale, rtol=0, atol=bound)
    else:
        torch.testing.assert_close(scale, rscale, rtol=1e-6, atol=0)
    diff = (data.int() - rdata.int()).abs()
    # with rotate the two round x @ H differently in the last bit: a tie may move one step
    assert diff.max() <= (1 if rotate_x else 0) and diff.float().mean() < 0.01
    # a centre broadcast over the leading dims
    c1 = c[:1, :1]
    d1, _, _, m1 = quant(x, "int8", gran, bs, "symmetric", True, rotate_x, c1)
    assert m1.shape == c.shape and torch.equal(m1, c1.expand_as(c))


def _cpu_quant(x, prec, gran, bs, strat, smooth, rot, center):
    return ops.quantize(x, prec, gran, bs, strat, smooth, rot, center)


@pytest.mark.parametrize("gran, bs", GRANS)
@pytest.mark.parametrize("rotate_x", [False, True])
def test_quantize_center_argument_cpu(gran, bs, rotate_x):
    x = torch.randn(2, 3, 40, 32) * 3 + 5
    _check_center_arg(_cpu_quant, x, gran, bs, rotate_x)


def _interpreter():
    pytest.importorskip("triton")
    from flash_quant.cuda.common import enable_interpreter_numpy_compat

    enable_interpreter_numpy_compat()


def _triton_quant(x, prec, gran, bs, strat, smooth, rot, center):
    from flash_quant.cuda.quantize import quantize_launch

    return quantize_launch(x, prec, gran, bs, strat, smooth, rot, center)


@pytest.mark.parametrize("gran, bs", GRANS)
@pytest.mark.parametrize("rotate_x", [False, True])
def test_quantize_center_argument_triton(gran, bs, rotate_x):
    _interpreter()
    x = torch.randn(2, 2, 24, 32) * 3 + 5
    _check_center_arg(_triton_quant, x, gran, bs, rotate_x)


@pytest.fixture(scope="module")
def emu():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "metal_emu"))
    import driver

    if shutil.which(driver.CXX) is None:
        pytest.skip("the Metal emulator needs a C++20 compiler")
    return driver.Emulator()


def _metal_quant(emu):
    def quant(x, prec, gran, bs, strat, smooth, rot, center):
        # as csrc/mps/ops.mm: the rotation is done on the host first (float32)
        return emu.quantize(rotate(x.float()) if rot else x, prec, gran, bs, strat, smooth, center=center)

    return quant


@pytest.mark.parametrize("gran, bs", GRANS[:3])
def test_quantize_center_argument_metal(emu, gran, bs):
    x = torch.randn(2, 2, 24, 32) * 3 + 5
    _check_center_arg(_metal_quant(emu), x, gran, bs, False)


@pytest.mark.parametrize("gran", ["per_token", "per_channel"])
def test_opcheck_quantize_with_center(gran):
    x = torch.randn(2, 3, 10, 16)
    c = torch.randn(2, 1, 1, 16)  # broadcast over heads
    torch.library.opcheck(torch.ops.flash_quant.quantize.default, (x, "int8", gran, 1, "symmetric", True, True, c),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_quantize_center_argument_errors():
    x = torch.randn(2, 3, 8, 16)
    c = torch.zeros(2, 3, 1, 16)
    with pytest.raises(ValueError, match="needs smooth=True"):
        ops.quantize(x, "int8", "per_token", 1, "symmetric", False, False, c)
    with pytest.raises(TypeError, match="float32"):
        ops.quantize(x, "int8", "per_token", 1, "symmetric", True, False, c.double())
    with pytest.raises(ValueError, match="does not broadcast"):
        ops.quantize(x, "int8", "per_token", 1, "symmetric", True, False, torch.zeros(2, 3, 2, 16))
    with pytest.raises(ValueError, match="does not broadcast"):
        ops.quantize(x, "int8", "per_token", 1, "symmetric", True, False, torch.zeros(1, 2, 3, 1, 16))


def test_quantize_center_argument_errors_cpu_kernel():
    # the C++ kernel's own checks (the op called without the Python fake in between)
    x = torch.randn(2, 3, 8, 16)
    op = torch.ops.flash_quant.quantize.default
    with pytest.raises(RuntimeError, match="needs smooth=True"):
        op(x, "int8", "per_token", 1, "symmetric", False, False, torch.zeros(2, 3, 1, 16))
    with pytest.raises(RuntimeError, match="does not broadcast"):
        op(x, "int8", "per_token", 1, "symmetric", True, False, torch.zeros(3, 3, 1, 16))


def test_quantize_center_gets_no_gradient_and_scale_gradient_uses_it():
    x = (torch.randn(1, 2, 16, 8) * 2 + 1).requires_grad_()
    c = torch.randn(1, 2, 1, 8).requires_grad_()
    _, scale, _, mean = ops.quantize(x, "int8", "per_token", 1, "symmetric", True, False, c)
    assert not mean.requires_grad or mean.grad_fn is not None
    g = torch.randn_like(scale)
    (scale * g).sum().backward()
    assert c.grad is None
    # d scale / dx = sign(x - c) / 127 at each row's absmax element of x - c
    y = (x - c).detach()
    want = torch.zeros_like(y)
    am = y.abs().argmax(-1, keepdim=True)
    want.scatter_(-1, am, torch.gather(torch.sign(y), -1, am) * g / 127)
    torch.testing.assert_close(x.grad, want)


# --------------------------------------------------------------------- end to end
def _padded(b, hq, hkv, s, d, lens, seed):
    q, k, v = make_qkv(b, hq, s, d, hkv=hkv, family="realistic", seed=seed)
    keep = torch.arange(s) < torch.tensor(lens)[:, None]
    mask = keep[:, None, None, :]
    dirty_k, dirty_v = k.clone(), v.clone()
    hidden = ~keep[:, None, :, None].expand_as(k)
    g = torch.Generator().manual_seed(seed + 1)
    dirty_k[hidden] = GARBAGE * torch.randn(int(hidden.sum()), generator=g)
    dirty_v[hidden] = GARBAGE * torch.randn(int(hidden.sum()), generator=g)
    return q, k, v, dirty_k, dirty_v, mask


def _assert_garbage_free(run, q, k, v, dk, dv, bar, **kw):
    ref = reference_attention(q, k, v, **kw)
    clean, dirty = run(q, k, v, **kw), run(q, dk, dv, **kw)
    e_clean, e_dirty, e_between = _rel(clean, ref), _rel(dirty, ref), _rel(dirty, clean.double())
    print(f"clean {e_clean:.4%} garbage {e_dirty:.4%} between {e_between:.4%} (bar {bar:.1%})")
    assert e_clean <= bar and e_dirty <= bar and e_between <= bar


def _cpu_run(preset, **extra):
    def run(q, k, v, **kw):
        return flash_quant.attention(q, k, v, config=preset, **extra, **kw)

    return run


@pytest.mark.parametrize("preset", ["accurate", "fast"])
def test_padded_batch_garbage_in_padding_cpu(preset):
    q, k, v, dk, dv, mask = _padded(3, 4, 4, 256, 64, [256, 160, 37], seed=11)
    _assert_garbage_free(_cpu_run(preset), q, k, v, dk, dv, BAR[preset], attn_mask=mask)


@pytest.mark.parametrize("preset", ["accurate", "fast"])
def test_padded_batch_gqa_float_mask_cpu(preset):
    q, k, v, dk, dv, mask = _padded(2, 8, 2, 192, 64, [192, 100], seed=12)
    additive = torch.where(mask, 0.0, float("-inf"))
    _assert_garbage_free(_cpu_run(preset, enable_gqa=True), q, k, v, dk, dv, BAR[preset], attn_mask=additive)


@pytest.mark.parametrize("preset", ["accurate", "fast"])
def test_causal_fewer_queries_garbage_in_unseen_keys_cpu(preset):
    # top-left causal with Sq < Skv: keys j >= Sq are seen by no row
    q, k, v = make_qkv(2, 4, 128, 64, skv=256, family="realistic", seed=13)
    dk, dv = k.clone(), v.clone()
    dk[:, :, 128:] = GARBAGE * torch.randn(2, 4, 128, 64)
    dv[:, :, 128:] = GARBAGE * torch.randn(2, 4, 128, 64)
    _assert_garbage_free(_cpu_run(preset), q, k, v, dk, dv, BAR[preset], is_causal=True)


# K and V granularities whose scale groups span keys: hidden rows must not enter them
SPANNING = {
    "k_per_tensor-v_per_tensor": AttentionConfig(
        q=OperandConfig(Precision.INT8, rotate=True),
        k=OperandConfig(Precision.INT8, granularity=PerTensor(), smooth=True, rotate=True),
        v=OperandConfig(Precision.INT8, granularity=PerTensor()), pv="int8"),
    "k_per_block-v_per_block": AttentionConfig(
        q=OperandConfig(Precision.INT8, rotate=True),
        k=OperandConfig(Precision.INT8, granularity=PerBlock(32), smooth=True, rotate=True),
        v=OperandConfig(Precision.INT8, granularity=PerBlock(32))),
    "k_per_head-v_per_head": AttentionConfig(
        q=OperandConfig(Precision.INT8, rotate=True),
        k=OperandConfig(Precision.INT8, granularity=PerHead(), smooth=True, rotate=True),
        v=OperandConfig(Precision.INT8, granularity=PerHead()), pv="int8"),
    "k_per_token-v_per_channel_unrotated": AttentionConfig(
        q=OperandConfig(Precision.INT8),
        k=OperandConfig(Precision.INT8, smooth=True),
        v=OperandConfig(Precision.INT8, granularity=PerChannel()), pv="int8"),
}


@pytest.mark.parametrize("name", sorted(SPANNING))
def test_padded_batch_key_spanning_groups_cpu(name):
    q, k, v, dk, dv, mask = _padded(2, 2, 2, 128, 64, [128, 70], seed=14)
    # per-tensor K on the outlier family is coarse: judge by the clean call's own error
    ref = reference_attention(q, k, v, attn_mask=mask)
    run = _cpu_run(SPANNING[name])
    bar = max(BAR["fast"], 1.5 * _rel(run(q, k, v, attn_mask=mask), ref))
    _assert_garbage_free(run, q, k, v, dk, dv, bar, attn_mask=mask)


@pytest.mark.parametrize("preset", ["accurate", "fast"])
def test_causal_one_huge_key_at_the_end_cpu(preset):
    # the last key is huge (only the last row sees it): the rows before it keep their accuracy
    q, k, v = make_qkv(2, 4, 256, 64, family="realistic", seed=15)
    k[:, :, -1] += 3000.0
    out = flash_quant.attention(q, k, v, is_causal=True, config=preset)
    ref = reference_attention(q, k, v, is_causal=True)
    err = _rel(out[:, :, :-1], ref[:, :, :-1])
    print(f"{preset}: rows before the huge key {err:.4%}")
    assert err <= BAR[preset]


@pytest.mark.parametrize("preset", ["accurate", "fast"])
def test_attention_sink_key_cpu(preset):
    # key 0 is huge along one channel of the presets' Hadamard-rotated space (massive
    # activations), a channel the queries are zero in: every row sees it, its scores stay
    # those of a normal key even with Q quantized (0 is exact), and its own per-token
    # codes are exact. What is left is its effect on the other keys through their
    # smoothing centre: the mean moves by 1e4 / S in that channel, the robust centre not.
    q, k, v = make_qkv(2, 4, 256, 64, seed=16)
    u = hadamard_matrix(64)[:, 5]  # u @ H = e_5
    q = q - (q @ u)[..., None] * u
    k[:, :, 0] = GARBAGE * u
    out = flash_quant.attention(q, k, v, config=preset)
    err = _rel(out, reference_attention(q, k, v))
    print(f"{preset}: with an attention sink {err:.4%}")
    assert err <= BAR[preset]


# ------------------------------------------------- the same Python path on other backends
def _triton_ops(monkeypatch):
    from flash_quant.cuda.forward import attention_forward_launch
    from flash_quant.cuda.quantize import quantize_launch

    monkeypatch.setattr(ops, "quantize", quantize_launch)
    monkeypatch.setattr(ops, "attention_forward", lambda *a, **kw: attention_forward_launch(*a, **kw))


def _metal_ops(monkeypatch, emu):
    quant = _metal_quant(emu)
    monkeypatch.setattr(ops, "quantize", lambda x, p, g, bs, st, sm, rot=False, c=None: quant(x, p, g, bs, st, sm,
                                                                                              rot, c))
    monkeypatch.setattr(ops, "attention_forward", lambda *a, **kw: emu.attention_forward(*a, **kw))


@pytest.mark.parametrize("preset", ["accurate", "fast"])
def test_padded_batch_garbage_in_padding_triton(monkeypatch, preset):
    _interpreter()
    _triton_ops(monkeypatch)
    q, k, v, dk, dv, mask = _padded(2, 2, 1, 64, 32, [64, 40], seed=21)
    _assert_garbage_free(_cpu_run(preset, enable_gqa=True), q, k, v, dk, dv, BAR[preset], attn_mask=mask)


def test_causal_fewer_queries_garbage_triton(monkeypatch):
    _interpreter()
    _triton_ops(monkeypatch)
    q, k, v = make_qkv(1, 2, 32, 32, skv=64, family="realistic", seed=22)
    dk, dv = k.clone(), v.clone()
    dk[:, :, 32:] = GARBAGE * torch.randn(1, 2, 32, 32)
    dv[:, :, 32:] = GARBAGE * torch.randn(1, 2, 32, 32)
    _assert_garbage_free(_cpu_run("fast"), q, k, v, dk, dv, BAR["fast"], is_causal=True)


@pytest.mark.parametrize("preset", ["accurate", "fast"])
def test_padded_batch_garbage_in_padding_metal(monkeypatch, emu, preset):
    _metal_ops(monkeypatch, emu)
    q, k, v, dk, dv, mask = _padded(2, 2, 1, 64, 32, [64, 40], seed=23)
    _assert_garbage_free(_cpu_run(preset, enable_gqa=True), q, k, v, dk, dv, BAR[preset], attn_mask=mask)
