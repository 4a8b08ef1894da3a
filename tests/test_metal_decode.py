"""The MPS decode path (issue 18 item 5) on Linux: metal/decode.metal run by the Metal
emulator (tools/metal_emu: every launch under several thread schedules compared bit for
bit, between poisoned guard bands), launched as the MPS backend launches it: the arguments
are those flash_quant.decode_attention passes to torch.ops.flash_quant.decode_attention
(checked against it below) and go through csrc/mps/host_logic.cpp's plan_decode, the code
ops.mm runs for the op's MPS kernel (checks, split choice, grid, bindings, argument bytes).

Caches are filled by flash_quant.kv_cache.QuantizedKVCache on the CPU (appends in several
steps), so the kernels read the real layout: int8 per-token codes, int4 K per channel over
token groups with its 16-bit window, int4 V per token over channel groups.

Judged against an fp64 attention of the cache's dequantized K/V (the kernel must be exact up
to float32 rounding, relative to what float32 SDPA makes of the same K/V), against the CPU
path of flash_quant.decode_attention, and against fp64 attention of the unquantized K/V (the
decode accuracy bars of tests/test_decode.py).
"""
import math
import os
import shutil
import sys

import pytest
import torch

import flash_quant.decode
from flash_quant.decode import MAX_QUERIES, decode_attention, reference_attention
from flash_quant.kv_cache import QuantizedKVCache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools", "metal_emu"))
import driver  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which(driver.CXX) is None, reason="needs a C++20 compiler")

D = 64
INT8_BAR, INT4_BAR = 0.01, 0.12  # vs fp64 of the unquantized K/V: tests/test_decode.py's bars
# Apple's limits (as tests/test_metal_host_logic.py): threadgroup memory, threads.
MAX_TG_MEM_BYTES, THREADS_REGISTER_HEADROOM = 32 * 1024, 256


@pytest.fixture(scope="module")
def emu():
    return driver.Emulator()


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def issue_kv(b, hkv, n, d, seed, dtype=torch.float32):
    """N(0,1) K with a per-channel bias, N(0,1) V (the issue's accuracy workload)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, hkv, n, d, generator=g) + 3 * torch.randn(b, hkv, 1, d, generator=g)
    return k.to(dtype), torch.randn(b, hkv, n, d, generator=g).to(dtype)


def filled_cache(precision, k, v, dtype=torch.float32, **kw):
    """A cache filled in several appends: a prefill, then single tokens (group boundaries
    and the int4 window included)."""
    b, h, n, d = k.shape
    cache = QuantizedKVCache(b, h, d, n + 3, precision=precision, dtype=dtype, **kw)
    bounds = sorted({0, n // 2, *range(max(n // 2, n - 5), n + 1)})
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        cache.append(k[:, :, lo:hi], v[:, :, lo:hi])
    return cache


def op_arguments(q, cache, attn_mask=None, scale=None):
    """The decode_attention op's arguments for flash_quant.decode_attention(q, cache, ...)
    (test_op_arguments_are_decode_attentions checks that decode.py passes these)."""
    return (q, *cache.kernel_buffers(), cache.length_tensor, attn_mask, scale, cache.precision,
            cache.k_group or 0, cache.v_group or 0)


def emu_plan(emu, args, num_splits=0):
    return emu.plan_decode(list(args[:11]), *args[11:], num_splits)


def emu_decode(emu, q, cache, attn_mask=None, scale=None, num_splits=0, order=0):
    """decode_attention as the MPS backend runs it: (out, lse, splits launched)."""
    args = op_arguments(q, cache, attn_mask, scale)
    return emu.decode(list(args[:11]), *args[11:], num_splits, order)


def sdpa_baseline(q, kd, vd, mask, ref):
    """rel-L2 of float32 SDPA on the same K/V against the fp64 reference."""
    n, sq = kd.shape[2], q.shape[2]
    if mask is None:
        mask = torch.arange(n)[None] <= (n - sq + torch.arange(sq))[:, None]
    g = q.shape[1] // kd.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float(), kd.float().repeat_interleave(g, 1), vd.float().repeat_interleave(g, 1),
        attn_mask=mask.expand(q.shape[0], q.shape[1], sq, n))
    return rel_l2(out, ref)


# ------------------------------------------------------------------ the op's arguments
def test_op_arguments_are_decode_attentions(monkeypatch):
    """What flash_quant.decode_attention hands the op (and so, on MPS, the Metal kernel) is
    what these tests run: one value per schema argument."""
    k, v = issue_kv(1, 2, 40, D, seed=0)
    for precision in ("int8", "int4"):
        cache = filled_cache(precision, k, v)
        q, mask = torch.randn(1, 4, 2, D), torch.rand(40) > 0.5
        seen = []
        monkeypatch.setattr(flash_quant.decode.ops, "decode_attention", lambda *a: seen.append(a) or q)
        decode_attention(q, cache, attn_mask=mask, scale=0.5)
        expected = op_arguments(q, cache, mask, 0.5)
        assert len(seen) == 1 and len(seen[0]) == len(expected)
        for got, want in zip(seen[0], expected):
            assert got is want or got == want
        monkeypatch.undo()
        schema = torch.ops.flash_quant.decode_attention.default._schema
        assert len(expected) == len(schema.arguments)


# ------------------------------------------------------------------ correctness
CASES = [  # (batch, keys, Hq, Hkv, Sq, splits); splits 0 = the host's choice. (The emulator
    # runs a 1000-key row block in ~1 s per schedule on one core: batch 1 there.)
    (2, 1, 4, 2, 1, 0), (2, 17, 8, 2, 1, 3), (2, 17, 6, 3, 16, 2), (2, 17, 4, 4, 5, 0),
    (1, 1000, 8, 2, 1, 0), (1, 1000, 2, 1, 16, 5), (1, 1000, 8, 1, 3, 1),
]


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("b,n,hq,hkv,sq,splits", CASES, ids=lambda c: str(c))
def test_decode_matches_fp64_and_the_cpu_path(emu, precision, b, n, hq, hkv, sq, splits):
    """Bottom-right causal decode (no mask), odd lengths, GQA (rows of several heads packed
    into one threadgroup: 4 heads x 1 query, 2 x 16 = 32 rows in 4 row blocks, ...), several
    split counts."""
    k, v = issue_kv(b, hkv, n, D, seed=n + hq + sq)
    cache = filled_cache(precision, k, v)
    q = torch.randn(b, hq, sq, D, generator=torch.Generator().manual_seed(sq))
    out, lse, used = emu_decode(emu, q, cache, num_splits=splits, order=splits % 2)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (b, hq, sq)
    if splits:  # splits cover the capacity (n + 3): those past the length hold no key
        assert used == min(splits, n + 3)
    kd, vd = cache.dequantize()
    ref = reference_attention(q, kd, vd, compute_dtype=torch.float64)
    assert rel_l2(out, ref) <= 4 * sdpa_baseline(q, kd, vd, None, ref) + 1e-6
    assert rel_l2(out, decode_attention(q, cache)) <= 1e-5  # the CPU path
    if n == 1000:  # the accuracy of the scheme against the unquantized K/V (fp64)
        err = rel_l2(out, reference_attention(q, k.double(), v.double(), compute_dtype=torch.float64))
        assert err <= (INT8_BAR if precision == "int8" else INT4_BAR)


def test_int4_window_and_groups_both_read(emu):
    """A small K group: 17 keys are two coded groups of 8 and one key in the 16-bit window
    (k_coded = 16); V is coded per token in groups of 16 channels."""
    k, v = issue_kv(1, 2, 17, D, seed=5)
    cache = filled_cache("int4", k, v, k_group=8, v_group=16)
    assert int(cache.length_tensor) == 17 and cache.k_group == 8
    q = torch.randn(1, 4, 3, D)
    out, _, _ = emu_decode(emu, q, cache, num_splits=2)
    kd, vd = cache.dequantize()
    ref = reference_attention(q, kd, vd, compute_dtype=torch.float64)
    assert rel_l2(out, ref) <= 4 * sdpa_baseline(q, kd, vd, None, ref) + 1e-6
    # the window key matters: changing it changes the last query's output
    cache.k_window[:, :, 0] += 5.0
    moved, _, _ = emu_decode(emu, q, cache, num_splits=2)
    assert not torch.allclose(moved[:, :, -1], out[:, :, -1], atol=1e-3)


def test_one_plan_follows_the_growing_cache(emu):
    """The token count is read on the device: a plan made once (as a captured command
    would be) gives the right answer after further appends, K window included."""
    k, v = issue_kv(1, 2, 50, D, seed=4)
    cache = QuantizedKVCache(1, 2, D, 60, precision="int4", dtype=torch.float32, k_group=8)
    cache.append(k[:, :, :30], v[:, :, :30])
    q = torch.randn(1, 4, 1, D)
    args = op_arguments(q, cache)
    plan = emu_plan(emu, args, num_splits=3)
    for n in (30, 31, 40, 50):
        if n > cache.length:
            cache.append(k[:, :, cache.length:n], v[:, :, cache.length:n])
        out = emu.run_plan(plan, list(args[:11]))[0]
        assert rel_l2(out, decode_attention(q, cache)) <= 1e-5, n


def test_split_counts_agree(emu):
    """1, 3, 7 splits and the host's choice give the same output and lse (up to fp32
    rounding); the host's choice keeps every split >= FQ_DEC_MIN_SPLIT_KEYS (256) keys."""
    k, v = issue_kv(1, 1, 700, D, seed=9)
    cache = filled_cache("int8", k, v)
    q = torch.randn(1, 4, 2, D)
    outs = {s: emu_decode(emu, q, cache, num_splits=s) for s in (1, 3, 7, 0)}
    assert outs[0][2] == 2  # 4 heads x 2 queries = 1 row block: capacity 703 // 256 splits
    for s in (3, 7, 0):
        assert rel_l2(outs[s][0], outs[1][0]) <= 1e-6
        assert torch.allclose(outs[s][1], outs[1][1], atol=1e-5)


@pytest.mark.parametrize("kind", ["bool", "additive", "broadcast", "fully_masked_row"])
def test_decode_masks(emu, kind):
    """With a mask the mask alone decides (no causal default); a row with no visible key is 0."""
    n, hq, hkv, sq = 37, 8, 2, 4
    k, v = issue_kv(2, hkv, n, D, seed=11)
    cache = filled_cache("int4", k, v)
    q = torch.randn(2, hq, sq, D)
    g = torch.Generator().manual_seed(3)
    if kind == "bool":
        mask = torch.rand(2, hq, sq, n, generator=g) > 0.3
        mask[..., 0] = True
    elif kind == "additive":
        mask = torch.randn(2, 1, sq, n, generator=g)
    elif kind == "broadcast":
        mask = torch.rand(n, generator=g) > 0.5
        mask[0] = True
    else:
        mask = torch.rand(2, hq, sq, n, generator=g) > 0.3
        mask[0, 1, 2] = False
    out, lse, _ = emu_decode(emu, q, cache, attn_mask=mask, num_splits=2)
    assert rel_l2(out, decode_attention(q, cache, attn_mask=mask)) <= 1e-5  # the CPU path
    kd, vd = cache.dequantize()
    ref = reference_attention(q, kd, vd, mask, compute_dtype=torch.float64)
    if kind == "fully_masked_row":
        assert torch.equal(out[0, 1, 2], torch.zeros(D)) and lse[0, 1, 2] == -math.inf
        mask[0, 1, 2, 0] = True  # SDPA gives NaN there: judge the other rows against it
        ref[0, 1, 2] = 0
    assert rel_l2(out, ref) <= 4 * sdpa_baseline(q, kd, vd, mask, ref) + 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_16bit_cache_and_scale(emu, dtype):
    """A 16-bit model: q, out and the int4 K window in its dtype; an explicit scale."""
    k, v = issue_kv(1, 2, 45, D, seed=2, dtype=dtype)
    cache = filled_cache("int4", k, v, dtype=dtype)
    q = torch.randn(1, 4, 2, D).to(dtype)
    out, _, _ = emu_decode(emu, q, cache, scale=0.3)
    assert out.dtype == dtype
    kd, vd = cache.dequantize()
    ref = reference_attention(q, kd, vd, scale=0.3, compute_dtype=torch.float64)
    assert rel_l2(out, ref) < 1e-2  # 16-bit output rounding
    assert rel_l2(out, decode_attention(q, cache, scale=0.3)) < 1e-2


# ------------------------------------------------------------------ host logic
@pytest.mark.parametrize("d", list(range(16, 257, 8)))
def test_decode_plans_fit_apple_limits(emu, d):
    k, v = issue_kv(1, 2, 40, d, seed=1)
    for precision, kw in (("int8", {}), ("int4", dict(v_group=8))):
        cache = filled_cache(precision, k, v, **kw)
        plan = emu_plan(emu, op_arguments(torch.zeros(1, 16, MAX_QUERIES, d), cache))
        names = [plan.launch[i].function for i in range(plan.n_launch)]
        assert names == [b"fq_decode_partial", b"fq_decode_merge"]
        for i in range(plan.n_launch):
            l = plan.launch[i]
            threads = l.threads[0] * l.threads[1] * l.threads[2]
            assert l.tg_mem <= MAX_TG_MEM_BYTES and threads % 32 == 0 and 0 < threads <= THREADS_REGISTER_HEADROOM
        # GQA rows: 8 heads x 16 queries = 128 rows = 16 row blocks per KV head
        assert list(plan.launch[0].grid)[1:] == [2 * 16, 1]


def test_auto_split_count(emu):
    """Enough threadgroups for a large Apple GPU, no split under 256 keys of capacity."""
    def splits(capacity, hq=4, sq=1):
        k, v = issue_kv(1, 2, 3, 16, seed=1)
        cache = QuantizedKVCache(1, 2, 16, capacity, precision="int8", dtype=torch.float32)
        cache.append(k, v)
        return emu_plan(emu, op_arguments(torch.zeros(1, hq, sq, 16), cache)).launch[0].grid[0]

    assert splits(100) == 1 and splits(300) == 1 and splits(600) == 2
    assert splits(4000) == 15  # 4000 // 256; 2 KV heads x 1 row block want 64
    assert splits(4000, hq=16, sq=16) == 4  # 2 KV heads x 16 row blocks: 128 / 32 splits


def test_decode_plan_errors_name_the_problem(emu):
    """Bad arguments fail in the host logic, before any kernel, with the argument named."""
    k, v = issue_kv(1, 2, 40, D, seed=1)
    caches = {p: filled_cache(p, k, v) for p in ("int8", "int4")}
    names = ["q", "k_codes", "k_scale", "k_zero", "k_smooth", "k_window", "v_codes", "v_scale", "v_zero", "length",
             "attn_mask", "scale", "precision", "k_group", "v_group"]

    def plan(cache="int4", splits=0, **change):
        args = dict(zip(names, op_arguments(torch.zeros(1, 4, 1, D), caches[cache])))
        args.update(change)
        return emu.plan_decode([args[n] for n in names[:11]], *[args[n] for n in names[11:]], splits)

    plan(), plan("int8")  # the valid calls
    c4 = caches["int4"]
    cases = [
        (dict(q=torch.zeros(1, 4, MAX_QUERIES + 1, D)), "1 to 16 queries"),
        (dict(q=torch.zeros(1, 3, 1, D)), "multiple of Hkv"),
        (dict(q=torch.zeros(1, 4, 1, D, dtype=torch.float64)), "q must be float32"),
        (dict(q=torch.zeros(1, 4, 1, D + 8)), "k_codes must have shape"),
        (dict(k_codes=c4.k_codes.to(torch.int16)), "int4 codes must be uint8"),
        (dict(k_codes=c4.k_codes[:, :, :8]), "k_codes must have shape"),
        (dict(k_scale=c4.k_scale[..., :8], k_zero=c4.k_zero[..., :8]), "k_scale of shape"),
        (dict(k_zero=c4.k_zero.float()), "k_zero must have the scale's shape and dtype"),
        (dict(k_window=None), "k_window is required for precision 'int4'"),
        (dict(k_window=c4.k_window[:, :, :3]), "k_window must have shape"),
        (dict(v_scale=c4.v_scale.float(), v_zero=c4.v_zero.float()), "k_scale and v_scale must have the same dtype"),
        (dict(length=torch.zeros(1, dtype=torch.int64)), "length must be an int32 tensor"),
        (dict(attn_mask=torch.ones(3, 40, dtype=torch.bool)), "attn_mask of shape"),
        (dict(attn_mask=torch.ones(40, dtype=torch.int32)), "attn_mask must be bool"),
        (dict(attn_mask=torch.ones(99, dtype=torch.bool)), "attn_mask has 99 keys"),
        (dict(precision="int2"), "precision must be 'int8' or 'int4'"),
        (dict(v_group=48), "v groups"),
        (dict(k_group=0), "int4 needs k_group >= 1"),
        (dict(k_smooth=torch.ones(1, 2, D)), "k_smooth must be None"),
    ]
    for change, message in cases:
        with pytest.raises(driver.PlanError, match=message):
            plan(**change)
    with pytest.raises(driver.PlanError, match="num_splits must be >= 0"):
        plan(splits=-1)
    c8 = caches["int8"]
    with pytest.raises(driver.PlanError, match="k_smooth is required for precision 'int8'"):
        plan("int8", k_smooth=None)
    with pytest.raises(driver.PlanError, match="k_smooth must be float32"):
        plan("int8", k_smooth=c8.k_smooth.half())
    with pytest.raises(driver.PlanError, match="k_zero, k_window and v_zero must be None"):
        plan("int8", v_zero=c8.v_scale)
