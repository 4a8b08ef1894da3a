"""The MPS (Metal) backend against the CPU backend and fp64, on an Apple GPU.

Skipped where no MPS device exists (Linux CI verifies the same kernels through the
emulator in tests/test_metal_emulator.py); .github/workflows/macos.yml runs it on Apple
Silicon. FP8 is left out: PyTorch's MPS backend cannot allocate float8 tensors.
"""
import pytest
import torch

import flash_quant
from flash_quant.testing import error_stats, make_qkv, reference_attention, reference_attention_backward

pytestmark = pytest.mark.skipif(
    not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()), reason="needs an MPS device"
)

CONFIGS = ["fp32", "accurate", "fast", "int4"]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("is_causal", [False, True])
def test_forward_matches_cpu_backend(config, is_causal):
    q, k, v = make_qkv(1, 4, 130, 64, hkv=2, skv=97, family="realistic")
    mask = torch.rand(130, 97) > 0.2
    cpu = flash_quant.attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True, config=config)
    mps = flash_quant.attention(q.to("mps"), k.to("mps"), v.to("mps"), attn_mask=mask.to("mps"),
                                is_causal=is_causal, enable_gqa=True, config=config).cpu()
    assert error_stats(mps, cpu)["rel_l2"] < (1e-5 if config == "fp32" else 2e-3)
    ref = reference_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    bar = {"fp32": 1e-5, "accurate": 0.01, "fast": 0.025, "int4": 0.12}[config]
    assert error_stats(mps, ref)["rel_l2"] <= bar


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    q, k, v = make_qkv(2, 2, 65, 128, dtype=dtype)
    out = flash_quant.attention(q.to("mps"), k.to("mps"), v.to("mps"), is_causal=True).cpu()
    assert out.dtype == dtype
    assert error_stats(out, reference_attention(q, k, v, is_causal=True))["rel_l2"] < 0.015


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantize_matches_cpu(precision):
    x = torch.randn(2, 3, 50, 64)
    cpu = flash_quant.quantize(x, precision, flash_quant.PerToken(), smooth=True)
    mps = flash_quant.quantize(x.to("mps"), precision, flash_quant.PerToken(), smooth=True)
    assert torch.equal(mps.data.cpu(), cpu.data)
    assert torch.allclose(mps.scale.cpu(), cpu.scale)


def test_backward_matches_reference():
    q, k, v = make_qkv(1, 2, 80, 64)
    leaves = [t.to("mps").requires_grad_() for t in (q, k, v)]
    out = flash_quant.attention(*leaves, is_causal=True, config="fp32")
    g = torch.randn(out.shape)
    out.backward(g.to("mps"))
    ref = reference_attention_backward(g, q, k, v, is_causal=True)
    for got, want in zip((t.grad.cpu() for t in leaves), ref):
        assert error_stats(got, want)["rel_l2"] < 1e-4


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("sq", [1, 7])
def test_decode_matches_cpu_path(precision, sq):
    """decode_attention over a cache on the MPS device (the Metal decode kernels) against the
    same cache on the CPU (the reference path); appends in two steps, odd length, GQA."""
    from flash_quant.kv_cache import QuantizedKVCache

    k = torch.randn(2, 2, 301, 64) + 3 * torch.randn(2, 2, 1, 64)
    v = torch.randn(2, 2, 301, 64)
    q = torch.randn(2, 8, sq, 64)
    caches = {}
    for dev in ("cpu", "mps"):
        c = QuantizedKVCache(2, 2, 64, 320, precision=precision, dtype=torch.float32, device=dev)
        c.append(k[:, :, :290].to(dev), v[:, :, :290].to(dev))
        c.append(k[:, :, 290:].to(dev), v[:, :, 290:].to(dev))
        caches[dev] = c
    cpu = flash_quant.decode_attention(q, caches["cpu"])
    mps = flash_quant.decode_attention(q.to("mps"), caches["mps"]).cpu()
    assert error_stats(mps, cpu)["rel_l2"] < 1e-4
