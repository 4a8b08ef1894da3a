"""The CUDA decode kernel (flash_quant/cuda/decode.py) interpreted on the CPU
(TRITON_INTERPRET=1), tiny shapes, against the fp64 reference of flash_quant.decode over
the cache's own dequantized K/V, relative to what SDPA in q's precision makes of them.
The gpu-marked tests (test_decode_gpu.py) run realistic sizes on a GPU."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from flash_quant.cuda.common import enable_interpreter_numpy_compat  # noqa: E402

enable_interpreter_numpy_compat()

from flash_quant.cuda.decode import decode_launch  # noqa: E402
from flash_quant.decode import reference_attention  # noqa: E402
from flash_quant.kv_cache import QuantizedKVCache  # noqa: E402

D = 32


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_cache(precision, b, hkv, n, dtype, chunks=(), max_len=None, **kw):
    k = torch.randn(b, hkv, n, D) + 2 * torch.randn(b, hkv, 1, D)
    v = torch.randn(b, hkv, n, D)
    cache = QuantizedKVCache(b, hkv, D, max_len or n, precision=precision, dtype=dtype, **kw)
    bounds = [0, *chunks, n]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        cache.append(k[:, :, lo:hi].to(dtype), v[:, :, lo:hi].to(dtype))
    return cache


def decode_attention_cuda(q, cache, mask, scale, config):
    """The CUDA kernel of the decode_attention op, with a kernel configuration."""
    return decode_launch(q, *cache.kernel_buffers(), cache.length_tensor, mask, scale, cache.precision,
                         cache.k_group or 0, cache.v_group or 0, config=config)


def baseline_error(q, kd, vd, mask, ref):
    """SDPA in q's dtype on the same (dequantized) K/V, against fp64."""
    sq, n = q.shape[2], kd.shape[2]
    if mask is None:
        mask = torch.arange(n)[None] <= (n - sq + torch.arange(sq))[:, None]
    g = q.shape[1] // kd.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, kd.to(q.dtype).repeat_interleave(g, 1), vd.to(q.dtype).repeat_interleave(g, 1),
        attn_mask=mask.expand(q.shape[0], q.shape[1], sq, n) if mask.dtype == torch.bool else mask.to(q.dtype))
    return rel_l2(out, ref)


def tolerance(base, dtype):
    """4x the same-precision baseline, at least one rounding of q's dtype (the kernel
    rounds P, or P times the int8 value scale, to it before the P.V dot; with one key SDPA
    is exact and the baseline 0)."""
    return 4 * base + torch.finfo(dtype).eps


CASES = [  # precision, B, Hq, Hkv, Sq, n keys, splits, block_n (int4: k_group, its tile), q dtype, mask
    ("int8", 1, 4, 2, 1, 1, 1, 16, torch.float16, None),
    ("int8", 2, 4, 2, 3, 37, 3, 16, torch.float16, None),
    ("int8", 1, 8, 1, 2, 70, 2, 32, torch.bfloat16, "bool"),
    ("int8", 1, 2, 2, 1, 20, 4, 16, torch.float32, "additive"),
    ("int4", 1, 4, 2, 1, 17, 1, 16, torch.float16, None),   # 16 coded keys + 1 in the window
    ("int4", 2, 4, 1, 4, 45, 3, 16, torch.float16, None),   # 2 groups + 13 keys in the window
    ("int4", 1, 6, 2, 2, 64, 2, 32, torch.bfloat16, "bool"),  # 2 groups of 32, empty window
    ("int4", 1, 2, 1, 1, 9, 2, 16, torch.float32, "additive"),  # all keys in the window
]


@pytest.mark.parametrize("precision,b,hq,hkv,sq,n,splits,block_n,dtype,mask_kind", CASES)
def test_decode_kernel_matches_fp64(precision, b, hq, hkv, sq, n, splits, block_n, dtype, mask_kind):
    cache = make_cache(precision, b, hkv, n, dtype, chunks=(n // 3,) if n > 3 else (),
                       **({"k_group": block_n, "v_group": 16} if precision == "int4" else {}))
    q = torch.randn(b, hq, sq, D).to(dtype)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(b, 1, sq, n) > 0.4
        mask[..., 0] = True
    elif mask_kind == "additive":
        mask = torch.randn(1, hq, sq, n)
    out = decode_attention_cuda(q, cache, mask, None, config={"num_splits": splits, "block_n": block_n})
    assert out.shape == q.shape and out.dtype == dtype
    kd, vd = cache.dequantize()
    ref = reference_attention(q, kd, vd, mask, compute_dtype=torch.float64)
    base = baseline_error(q, kd, vd, mask, ref)
    assert rel_l2(out, ref) <= tolerance(base, dtype), (rel_l2(out, ref), base)


def test_fully_masked_row_and_empty_splits_give_zero():
    """A row with no visible key is 0; splits past the keys (more splits than tiles) merge
    to nothing."""
    cache = make_cache("int8", 1, 2, 20, torch.float16)
    q = torch.randn(1, 4, 2, D, dtype=torch.float16)
    mask = torch.rand(1, 4, 2, 20) > 0.5
    mask[0, 1, 0] = False
    mask[0, 2, 1, 3] = True
    out = decode_attention_cuda(q, cache, mask, None, config={"num_splits": 5, "block_n": 16})
    assert torch.equal(out[0, 1, 0], torch.zeros(D, dtype=torch.float16))
    kd, vd = cache.dequantize()
    ref = reference_attention(q, kd, vd, mask, compute_dtype=torch.float64)
    assert rel_l2(out, ref) < 5e-3


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_same_plan_follows_the_device_length(precision):
    """What a replayed CUDA graph relies on: one launch plan (same grid and constexprs),
    called after appends that only the device counter tells it about, reads the new
    keys (the split ranges and the int4 window start come from length_tensor)."""
    kw = {"k_group": 16, "v_group": 16} if precision == "int4" else {}
    cache = make_cache(precision, 1, 2, 30, torch.float16, max_len=60, **kw)
    q = torch.randn(1, 4, 1, D, dtype=torch.float16)
    cfg = {"num_splits": 3, "block_n": 16}
    for step in range(3):
        out = decode_attention_cuda(q, cache, None, None, config=cfg)
        kd, vd = cache.dequantize()
        ref = reference_attention(q, kd, vd, compute_dtype=torch.float64)
        assert rel_l2(out, ref) <= tolerance(baseline_error(q, kd, vd, None, ref), q.dtype)
        t = 1 if step == 0 else 7  # crosses a 16-token group boundary (int4 window flush)
        cache.append(torch.randn(1, 2, t, D, dtype=torch.float16), torch.randn(1, 2, t, D, dtype=torch.float16))
