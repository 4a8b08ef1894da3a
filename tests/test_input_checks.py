"""Input checks that must fire before any kernel runs: empty head counts, and
caller-supplied scales to the raw ops on the CPU (where reading them needs no device sync)."""
import pytest
import torch

import flash_quant
from flash_quant import PerChannel, PerToken, quantize
from flash_quant.testing import make_qkv


@pytest.mark.parametrize("which", ["query", "key"])
def test_zero_heads_rejected_before_any_kernel(monkeypatch, which):
    def forbidden(*a, **k):
        raise AssertionError("a kernel ran before the input was rejected")

    monkeypatch.setattr(flash_quant.ops, "attention_forward", forbidden)
    monkeypatch.setattr(flash_quant.ops, "quantize", forbidden)
    q, k, v = make_qkv(1, 2, 8, 32)
    if which == "query":
        q = q[:, :0]
    else:
        k, v = k[:, :0], v[:, :0]
    with pytest.raises(ValueError, match=f"{which} has no heads"):
        flash_quant.attention(q, k, v, enable_gqa=True)


BAD_SCALES = {"zero": 0.0, "negative": -1.0, "nan": float("nan"), "inf": float("inf")}


def _spoil(scale, value):
    bad = scale.clone()
    bad.view(-1)[bad.numel() // 2] = value
    return bad


@pytest.mark.parametrize("value", BAD_SCALES.values(), ids=BAD_SCALES.keys())
def test_raw_dequantize_and_quantize_with_scale_refuse_bad_cpu_scales(value):
    x = torch.randn(2, 3, 16, 32)
    q = quantize(x, "int8", PerToken())
    bad = _spoil(q.scale, value)
    with pytest.raises(RuntimeError, match="scale must be finite and > 0"):
        torch.ops.flash_quant.dequantize(q.data, bad, q.zero_point, bad.new_empty(0), "int8", 0, torch.float32)
    with pytest.raises(RuntimeError, match="scale must be finite and > 0"):
        torch.ops.flash_quant.quantize_with_scale(x, bad, None, "int8", 1)


@pytest.mark.parametrize("operand", ["q", "k", "v"])
@pytest.mark.parametrize("value", BAD_SCALES.values(), ids=BAD_SCALES.keys())
def test_raw_attention_refuses_bad_cpu_scales(operand, value):
    q, k, v = make_qkv(1, 2, 16, 32)
    qq = quantize(q, "int8", PerToken())
    kq = quantize(k, "int8", PerToken())
    vq = quantize(v, "int8", PerChannel())
    scales = {"q": qq.scale, "k": kq.scale, "v": vq.scale}
    scales[operand] = _spoil(scales[operand], value)
    with pytest.raises(RuntimeError, match=f"{operand}_scale must be finite and > 0"):
        torch.ops.flash_quant.attention_forward(
            q, k, v, qq.data, scales["q"], None, kq.data, scales["k"], None, None,
            vq.data, scales["v"], None, None, False, None, "int8")


def test_valid_scales_still_pass():
    q, k, v = make_qkv(1, 2, 16, 32)
    qq, kq = quantize(q, "int8", PerToken()), quantize(k, "int8", PerToken())
    out, _ = torch.ops.flash_quant.attention_forward(
        q, k, v, qq.data, qq.scale, None, kq.data, kq.scale, None, None, None, None, None, None, False, None, "none")
    assert torch.isfinite(out).all()
