"""Decode over a quantized KV cache (issue 18): the cache's appends, the decode semantics
and the schemes' accuracy bars, on the CPU reference path (the CUDA kernel is judged
against the same references in test_decode_interpret.py and the gpu-marked tests).

Correctness is judged against float64: decode_attention over the cache's dequantized K/V
against an fp64 attention of the same K/V, relative to what float32 SDPA makes of them;
accuracy against an fp64 attention of the unquantized K/V (the issue's workload).
"""

import pytest
import torch

import flash_quant
from flash_quant.decode import MAX_QUERIES, reference_attention
from flash_quant.kv_cache import QuantizedKVCache, pack_int4, unpack_int4

PRECISIONS = ("int8", "int4")
D = 64
# Accuracy bars on the issue's workload (N(0,1) Q/K/V, per-channel bias on K, D = 128):
INT8_BAR = 0.01   # the issue's INT8 bar, met (docs/decode.md: ~0.9 %)
# INT4: the issue asks <= 5 %, which 4-bit codes cannot meet on Gaussian data (docs/decode.md:
# V alone is ~7.4 % at group 32, the Gaussian rate-distortion bound at 4 bits 6.25 %). The
# measured level of the chosen scheme is ~10.3 %; the bar keeps a margin over it.
INT4_BAR = 0.12


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def issue_kv(b, hkv, n, d, dtype=torch.float32):
    """The issue's accuracy workload: N(0,1) K with a per-channel bias, N(0,1) V."""
    k = torch.randn(b, hkv, n, d) + 3 * torch.randn(b, hkv, 1, d)
    v = torch.randn(b, hkv, n, d)
    return k.to(dtype), v.to(dtype)


def filled_cache(precision, k, v, chunks=None, dtype=torch.float32, **kw):
    b, h, n, d = k.shape
    cache = QuantizedKVCache(b, h, d, n + 5, precision=precision, dtype=dtype, **kw)
    bounds = [0] + (chunks or []) + [n]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            cache.append(k[:, :, lo:hi], v[:, :, lo:hi])
    return cache


def same_precision_baseline(q, k, v, mask, ref):
    """What float32 SDPA makes of the same inputs (its error to fp64 sets the tolerance)."""
    if mask is None:
        sq, n = q.shape[2], k.shape[2]
        keys, last = torch.arange(n), n - sq + torch.arange(sq)
        mask = keys[None] <= last[:, None]
    hq, hkv = q.shape[1], k.shape[1]
    mask = mask.expand(q.shape[0], hq, q.shape[2], k.shape[2])
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(hq // hkv, 1), v.float().repeat_interleave(hq // hkv, 1),
        attn_mask=mask)
    return rel_l2(out, ref)


# ------------------------------------------------------------------ appends
def test_int4_packing_round_trips():
    codes = torch.randint(0, 16, (3, 5, 2 * D), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (3, 5, D) and torch.equal(unpack_int4(packed), codes)
    # half-split layout: byte i = channel i (low nibble) | channel i + D/2 (high nibble)
    assert torch.equal(packed[..., 0], codes[..., 0] | (codes[..., D] << 4))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("n", [1, 17, 1000])
def test_appending_in_steps_equals_quantizing_once(precision, n):
    """No token is requantized: appending in several steps (single tokens across group
    boundaries included) gives the same codes as one append. (int8's centre is the first
    append's mean, so both start with the same first append.)"""
    k, v = issue_kv(2, 3, n, D)
    first = min(n, 5)
    steps = sorted({first, *torch.randint(first, n + 1, (6,)).tolist(), *range(first, min(n, first + 40))})
    once = filled_cache(precision, k, v, chunks=[first])
    stepped = filled_cache(precision, k, v, chunks=steps)
    assert once.length == stepped.length == n
    assert int(stepped.length_tensor) == n
    for a, b in zip(once.dequantize(), stepped.dequantize()):
        assert torch.equal(a, b)
    if precision == "int4":  # quantizing once from the start equals it too (no centre)
        for a, b in zip(filled_cache(precision, k, v).dequantize(), stepped.dequantize()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_dequantize_is_close_and_window_exact(precision):
    k, v = issue_kv(1, 2, 45, D)
    cache = filled_cache(precision, k, v, chunks=[7, 30])
    kd, vd = cache.dequantize()
    assert kd.shape == vd.shape == k.shape and kd.dtype == torch.float32
    tol = 0.02 if precision == "int8" else 0.15  # per-element rel-L2 of 8 / 4 bits
    assert rel_l2(kd, k) < tol * k.norm() / (k - k.mean(2, keepdim=True)).norm() + tol
    assert rel_l2(vd, v) < tol
    if precision == "int4":  # the newest 45 % 32 = 13 keys wait unquantized in the window
        assert torch.equal(kd[:, :, 32:], k[:, :, 32:])
        assert not torch.equal(kd[:, :, :32], k[:, :, :32])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_nbytes_counts_every_buffer(precision):
    b, h, n, d = 2, 8, 4096, 128
    cache = QuantizedKVCache(b, h, d, n, precision=precision, dtype=torch.float16)
    fp16 = 2 * b * h * n * d * 2
    ratio = cache.nbytes / fp16
    # int8: codes + fp32 per-token scales + centre; int4: codes + fp16 group scales/zeros
    # + the window + the scratch group
    lo, hi = (0.51, 0.53) if precision == "int8" else (0.31, 0.32)
    assert lo < ratio < hi, ratio
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in vars(cache).values()
                               if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_reset_and_reorder(precision):
    k, v = issue_kv(3, 2, 40, D)
    cache = filled_cache(precision, k, v)
    kd, vd = cache.dequantize()
    idx = torch.tensor([2, 0, 0])
    cache.reorder(idx)
    k2, v2 = cache.dequantize()
    assert torch.equal(k2, kd[idx]) and torch.equal(v2, vd[idx])
    cache.reset()
    assert cache.length == 0 and int(cache.length_tensor) == 0
    cache.append(k[:, :, :3], v[:, :, :3])
    assert cache.dequantize()[0].shape[2] == 3


def test_append_rejects_bad_input_before_writing():
    cache = QuantizedKVCache(1, 2, D, 8, precision="int4", dtype=torch.float32)
    good = torch.randn(1, 2, 4, D)
    with pytest.raises(ValueError, match="exceed the cache's max_len 8"):
        cache.append(torch.randn(1, 2, 9, D), torch.randn(1, 2, 9, D))
    with pytest.raises(ValueError, match=r"\(B, Hkv, T, D\)"):
        cache.append(torch.randn(1, 3, 4, D), good)
    with pytest.raises(ValueError, match="same shape"):
        cache.append(good, torch.randn(1, 2, 3, D))
    with pytest.raises(TypeError, match="floating"):
        cache.append(good.to(torch.int32), good)
    assert cache.length == 0 and int(cache.length_tensor) == 0
    with pytest.raises(ValueError, match="precision"):
        QuantizedKVCache(1, 2, D, 8, precision="int2")
    with pytest.raises(ValueError, match="v_group must divide"):
        QuantizedKVCache(1, 2, D, 8, precision="int4", v_group=48)


# ------------------------------------------------------------------ decode semantics
CASES = [  # (n keys, Hq, Hkv, Sq)
    (1, 4, 4, 1), (17, 8, 2, 1), (17, 8, 2, 5), (17, 6, 3, 16), (1000, 8, 2, 1), (1000, 4, 1, 16),
    (1000, 8, 8, 3)]


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("n,hq,hkv,sq", CASES)
def test_decode_matches_fp64_on_the_cache(precision, n, hq, hkv, sq):
    """The default (bottom-right causal) decode over the cache's own K/V, against fp64."""
    k, v = issue_kv(2, hkv, n, D)
    cache = filled_cache(precision, k, v, chunks=[n // 2])
    q = torch.randn(2, hq, sq, D)
    out = flash_quant.decode_attention(q, cache)
    assert out.shape == q.shape and out.dtype == q.dtype
    kd, vd = cache.dequantize()
    ref = reference_attention(q, kd, vd, compute_dtype=torch.float64)
    base = same_precision_baseline(q, kd, vd, None, ref)
    assert rel_l2(out, ref) <= 4 * base + 1e-6


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kind", ["bool", "additive", "broadcast", "fully_masked_row"])
def test_decode_masks(precision, kind):
    n, hq, hkv, sq = 37, 8, 2, 4
    k, v = issue_kv(2, hkv, n, D)
    cache = filled_cache(precision, k, v)
    q = torch.randn(2, hq, sq, D)
    if kind == "bool":
        mask = torch.rand(2, hq, sq, n) > 0.3
        mask[..., 0] = True
    elif kind == "additive":
        mask = torch.randn(2, 1, sq, n)
    elif kind == "broadcast":
        mask = torch.rand(n) > 0.5
        mask[0] = True
    else:
        mask = torch.rand(2, hq, sq, n) > 0.3
        mask[0, 1, 2] = False  # row with no visible key
    out = flash_quant.decode_attention(q, cache, attn_mask=mask)
    kd, vd = cache.dequantize()
    ref = reference_attention(q, kd, vd, mask, compute_dtype=torch.float64)
    if kind == "fully_masked_row":
        assert torch.equal(out[0, 1, 2], torch.zeros(D))  # as flash_quant.attention: 0
        mask[0, 1, 2, 0] = True  # SDPA gives NaN there: judge the other rows against it
    base = same_precision_baseline(q, kd, vd, mask, ref)
    assert rel_l2(out, ref) <= 4 * base + 1e-6
    # the mask alone decides: a mask equal to the causal default gives the default
    causal = torch.arange(n)[None] <= (n - sq + torch.arange(sq))[:, None]
    assert torch.allclose(flash_quant.decode_attention(q, cache, attn_mask=causal),
                          flash_quant.decode_attention(q, cache), atol=1e-6)


def test_decode_scale_and_dtypes():
    k, v = issue_kv(1, 2, 20, D, torch.bfloat16)
    cache = filled_cache("int8", k, v, dtype=torch.bfloat16)
    q = torch.randn(1, 4, 2, D, dtype=torch.bfloat16)
    out = flash_quant.decode_attention(q, cache, scale=0.3)
    assert out.dtype == torch.bfloat16
    kd, vd = cache.dequantize()
    ref = reference_attention(q, kd, vd, scale=0.3, compute_dtype=torch.float64)
    assert rel_l2(out, ref) < 1e-2  # bf16 output rounding


def test_decode_rejects_bad_input():
    k, v = issue_kv(1, 2, 10, D)
    cache = filled_cache("int8", k, v)
    with pytest.raises(ValueError, match="Sq <= 16"):
        flash_quant.decode_attention(torch.randn(1, 4, MAX_QUERIES + 1, D), cache)
    with pytest.raises(ValueError, match="multiple"):
        flash_quant.decode_attention(torch.randn(1, 3, 1, D), cache)
    with pytest.raises(ValueError, match="head_dim"):
        flash_quant.decode_attention(torch.randn(1, 4, 1, D + 2), cache)
    with pytest.raises(ValueError, match="holds 10"):
        flash_quant.decode_attention(torch.randn(1, 4, 11, D), cache)
    with pytest.raises(ValueError, match="does not broadcast"):
        flash_quant.decode_attention(torch.randn(1, 4, 1, D), cache, attn_mask=torch.ones(9, dtype=torch.bool))
    with pytest.raises(TypeError, match="QuantizedKVCache"):
        flash_quant.decode_attention(torch.randn(1, 4, 1, D), (k, v))
    empty = QuantizedKVCache(1, 2, D, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="empty"):
        flash_quant.decode_attention(torch.randn(1, 4, 1, D), empty)


# ------------------------------------------------------------------ accuracy bars
@pytest.mark.parametrize("precision,bar", [("int8", INT8_BAR), ("int4", INT4_BAR)])
def test_accuracy_bar_on_the_issue_workload(precision, bar):
    """rel-L2 of one decode step against fp64 attention of the unquantized K/V: the issue's
    GQA 32/8 heads (enough output elements that the measured error varies by ~1 %), hd 128,
    4096 keys appended as a prefill then single tokens."""
    n, d = 4096, 128
    k, v = issue_kv(1, 8, n, d, torch.float64)
    cache = filled_cache(precision, k.float(), v.float(), chunks=[n - 40 + i for i in range(40)])
    q = torch.randn(1, 32, 1, d, dtype=torch.float64)
    err = rel_l2(flash_quant.decode_attention(q.float(), cache),
                 reference_attention(q, k, v, compute_dtype=torch.float64))
    assert err <= bar, f"{precision} decode rel-L2 {err:.4f} > {bar}"


def spread_channels(heads: int, d: int) -> torch.Tensor:
    """Per-channel key magnitudes exp(z) with z the N(0,1) quantiles in a random order per
    head: the spread of a model's keys, without the draw-to-draw tail of exp(N(0,1))
    (a drawn largest channel set the int8 error from 0.9 % to 1.7 % across CI runs)."""
    z = torch.erfinv(torch.linspace(-1 + 1 / d, 1 - 1 / d, d, dtype=torch.float64)) * 2 ** 0.5
    order = torch.argsort(torch.rand(heads, d), dim=-1)
    return torch.exp(z[order])[None, :, None, :]


# measured over 20 seeds (CPU, 2026-12-06): int8 0.91-1.03 %, int4 10.6-11.8 %
@pytest.mark.parametrize("precision,bar", [("int8", 0.015), ("int4", 0.14)])
def test_accuracy_with_spread_key_channels(precision, bar):
    """Keys whose channel magnitudes spread like a model's (x exp(N(0,1)) per channel; q
    rescaled so the logits keep unit std). int8: the per-channel smoothing fixed at the
    first append keeps ~1 % (per-token codes alone: 3.2 % in docs/decode.md's simulation);
    int4: per-channel K groups are indifferent to it."""
    n, d = 4096, 128
    k, v = issue_kv(1, 8, n, d, torch.float64)
    k = k * spread_channels(8, d)
    q = torch.randn(1, 32, 1, d, dtype=torch.float64) / (k - k.mean(2, keepdim=True)).std()
    cache = filled_cache(precision, k.float(), v.float(), chunks=[n - 8 + i for i in range(8)])
    err = rel_l2(flash_quant.decode_attention(q.float(), cache),
                 reference_attention(q, k, v, compute_dtype=torch.float64))
    assert err <= bar, f"{precision} decode rel-L2 {err:.4f} > {bar}"


def test_int8_smoothing_is_exact_and_bounded():
    """The smoothing divisors are in (0, 1], floored at mean / SMOOTH_FLOOR_RATIO relative to
    the largest, 1 for a single-token first append; dequantize() undoes them."""
    from flash_quant.kv_cache import SMOOTH_FLOOR_RATIO
    k, v = issue_kv(2, 3, 50, D)
    k[:, :, :, 5] = 0.25  # a constant channel in the first append
    k[:, :, :, 7] *= 40   # an outlier channel
    cache = filled_cache("int8", k, v)
    s = cache.k_smooth
    assert (s > 0).all() and (s <= 1).all() and torch.equal(s.amax(-1), torch.ones(2, 3))
    # (the floor is taken from the mean before flooring, a little below the mean after it)
    assert (s.amin(-1) >= s.mean(-1) / (1.1 * SMOOTH_FLOOR_RATIO)).all()
    assert torch.equal(s[..., 5], s.amin(-1))  # the constant channel sits on the floor
    assert rel_l2(cache.dequantize()[0], k) < 0.01
    one = filled_cache("int8", k[:, :, :1], v[:, :, :1])
    assert torch.equal(one.k_smooth, torch.ones_like(one.k_smooth))


# ------------------------------------------------------------------ the op
def test_decode_op_traces_without_graph_breaks():
    """decode_attention is torch.ops.flash_quant.decode_attention (fake kernel in ops.py):
    a compiled step over the cache's buffers has no graph break, and follows the device
    token count (no recompilation as the cache grows)."""
    from flash_quant import ops
    k, v = issue_kv(1, 2, 40, D)
    cache = filled_cache("int4", k, v, k_group=16, v_group=16)
    bufs = cache.kernel_buffers()

    def step(q, length):
        return ops.decode_attention(q, *bufs, length, None, None, "int4", 16, 16)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    q = torch.randn(1, 4, 1, D)
    assert torch.equal(compiled(q, cache.length_tensor), step(q, cache.length_tensor))
    shorter = torch.tensor([33], dtype=torch.int32)
    assert torch.equal(compiled(q, shorter), step(q, shorter))


def test_decode_op_rejects_bad_buffers():
    from flash_quant import ops
    k, v = issue_kv(1, 2, 10, D)
    cache = filled_cache("int8", k, v)
    kc, ks, kz, ksm, kw, vc, vs, vz = cache.kernel_buffers()
    q = torch.randn(1, 4, 1, D)
    with pytest.raises(ValueError, match="needs k_smooth"):
        ops.decode_attention(q, kc, ks, kz, None, kw, vc, vs, vz, cache.length_tensor, None, None, "int8", 0, 0)
    with pytest.raises(TypeError, match="int32"):
        ops.decode_attention(q, kc, ks, kz, ksm, kw, vc, vs, vz, cache.length_tensor.long(), None, None, "int8", 0, 0)
    with pytest.raises(ValueError, match="precision"):
        ops.decode_attention(q, kc, ks, kz, ksm, kw, vc, vs, vz, cache.length_tensor, None, None, "int2", 0, 0)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_deepcopy_is_an_independent_cache(precision):
    """(HF's generate may copy caches.) A copy holds the same tokens in its own buffers."""
    import copy
    k, v = issue_kv(1, 2, 20, D)
    cache = filled_cache(precision, k, v)
    twin = copy.deepcopy(cache)
    assert all(torch.equal(a, b) for a, b in zip(cache.dequantize(), twin.dequantize()))
    twin.append(k[:, :, :3], v[:, :, :3])
    assert cache.length == 20 and int(cache.length_tensor) == 20 and twin.length == 23
    assert cache.dequantize()[0].shape[2] == 20


def test_cache_device_is_the_tensors_device():
    """device="cuda" must compare equal to the tensors' "cuda:0": the cache keeps the
    device as its buffers report it."""
    cache = QuantizedKVCache(1, 1, D, 4, device="cpu")
    assert cache.device == cache.k_codes.device == torch.empty(0).device
    if torch.cuda.is_available():
        gpu = QuantizedKVCache(1, 1, D, 4, device="cuda")
        assert gpu.device == torch.empty(0, device="cuda").device == gpu.k_codes.device
