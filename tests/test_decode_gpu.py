"""GPU tests of decode over the quantized KV cache (issue 18): the compiled Triton kernel at
realistic sizes, the accuracy bars, appends on the device and CUDA-graph replay.

Marked ``gpu`` (skipped without CUDA): ``pytest -m gpu tests/test_decode_gpu.py``
(benchmarks/gpu_run.sh's tests stage runs it).
"""
import pytest
import torch

import flash_quant
from flash_quant.decode import reference_attention
from flash_quant.kv_cache import QuantizedKVCache

pytestmark = pytest.mark.gpu
DEV = "cuda"
INT8_BAR, INT4_BAR = 0.01, 0.12  # as tests/test_decode.py (docs/decode.md)


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def issue_kv(b, hkv, n, d, dtype):
    k = torch.randn(b, hkv, n, d, device=DEV) + 3 * torch.randn(b, hkv, 1, d, device=DEV)
    v = torch.randn(b, hkv, n, d, device=DEV)
    return k.to(dtype), v.to(dtype)


def filled(precision, k, v, max_len=None, **kw):
    b, h, n, d = k.shape
    cache = QuantizedKVCache(b, h, d, max_len or n, precision=precision, dtype=k.dtype, device=DEV, **kw)
    cache.append(k[:, :, :n - 3], v[:, :, :n - 3])
    for i in range(n - 3, n):
        cache.append(k[:, :, i:i + 1], v[:, :, i:i + 1])
    return cache


def sdpa_error(q, kd, vd, ref):
    """fp16/bf16 SDPA on the same dequantized K/V (the same-precision baseline)."""
    sq, n, g = q.shape[2], kd.shape[2], q.shape[1] // kd.shape[1]
    mask = torch.arange(n, device=DEV)[None] <= (n - sq + torch.arange(sq, device=DEV))[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, kd.repeat_interleave(g, 1), vd.repeat_interleave(g, 1), attn_mask=mask)
    return rel_l2(out, ref)


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("b,hq,hkv,n,sq,dtype", [
    (1, 32, 8, 32768, 1, torch.float16), (8, 32, 8, 8192, 1, torch.bfloat16),
    (2, 32, 8, 1000, 16, torch.float16), (3, 8, 8, 17, 4, torch.bfloat16), (1, 28, 4, 4099, 7, torch.float16)])
def test_kernel_matches_fp64_on_the_cache(precision, b, hq, hkv, n, sq, dtype):
    k, v = issue_kv(b, hkv, n, 128, dtype)
    cache = filled(precision, k, v)
    q = torch.randn(b, hq, sq, 128, device=DEV, dtype=dtype)
    out = flash_quant.decode_attention(q, cache)
    kd, vd = cache.dequantize()
    ref = reference_attention(q, kd, vd, compute_dtype=torch.float64)
    assert rel_l2(out, ref) <= 4 * sdpa_error(q, kd, vd, ref) + torch.finfo(dtype).eps


@pytest.mark.parametrize("precision,bar", [("int8", INT8_BAR), ("int4", INT4_BAR)])
def test_accuracy_bars(precision, bar):
    k, v = issue_kv(1, 8, 8192, 128, torch.float32)
    cache = filled(precision, k.half(), v.half())
    q = torch.randn(1, 32, 1, 128, device=DEV)
    ref = reference_attention(q.double(), k.double(), v.double(), compute_dtype=torch.float64)
    assert rel_l2(flash_quant.decode_attention(q.half(), cache), ref) <= bar


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_device_append_matches_cpu(precision):
    k, v = issue_kv(2, 4, 300, 128, torch.float32)
    gpu = filled(precision, k, v)
    cpu = QuantizedKVCache(2, 4, 128, 300, precision=precision, dtype=torch.float32)
    cpu.append(k[:, :, :297].cpu(), v[:, :, :297].cpu())
    for i in range(297, 300):
        cpu.append(k[:, :, i:i + 1].cpu(), v[:, :, i:i + 1].cpu())
    for a, c in zip(gpu.dequantize(), cpu.dequantize()):
        # the same ops; the centre's mean may round differently (one code step at most)
        assert rel_l2(a.cpu(), c) < 1e-3


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_cuda_graph_replays_as_the_cache_grows(precision):
    """One graph captures append(new token) + decode; replays then see every appended key
    (the kernels read the device counter), including int4 window flushes."""
    b, hq, hkv, d, n0, steps = 2, 8, 2, 128, 500, 40
    k, v = issue_kv(b, hkv, n0 + steps + 1, d, torch.float16)
    cache = filled(precision, k[:, :, :n0], v[:, :, :n0], max_len=n0 + steps + 1)
    q = torch.randn(b, hq, 1, d, device=DEV, dtype=torch.float16)
    k_in, v_in = k[:, :, n0:n0 + 1].clone(), v[:, :, n0:n0 + 1].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles) outside the graph
        flash_quant.decode_attention(q, cache)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cache.append(k_in, v_in)
        out = flash_quant.decode_attention(q, cache)
    # capture ran nothing: the cache still holds n0 tokens on the device
    assert int(cache.length_tensor) == n0
    for i in range(steps):
        k_in.copy_(k[:, :, n0 + i:n0 + i + 1])
        v_in.copy_(v[:, :, n0 + i:n0 + i + 1])
        graph.replay()
        assert cache.sync_length() == n0 + i + 1
        kd, vd = cache.dequantize()
        ref = reference_attention(q, kd, vd, compute_dtype=torch.float64)
        assert rel_l2(out, ref) <= 4 * sdpa_error(q, kd, vd, ref) + torch.finfo(torch.float16).eps
