"""QuantizedTensor operands that attention cannot use correctly are refused, clearly and
before any kernel runs: a Hadamard-rotated V (issue 15 item 4: it gave rel-L2 1.43 with
no error) and one whose fields require grad (item 5: the gradient to the quantized
tensor's source was silently zero)."""
import pytest
import torch

import flash_quant
from flash_quant import ops
from flash_quant.testing import error_stats, make_qkv, reference_attention


@pytest.fixture
def no_attention_kernel(monkeypatch):
    """Fail if the attention op is reached: the errors must come before any kernel."""
    def boom(*args, **kwargs):
        raise AssertionError("the attention op ran before the input was refused")

    monkeypatch.setattr(ops, "attention_forward", boom)


def test_rotated_value_is_refused(no_attention_kernel):
    q, k, v = make_qkv(1, 2, 32, 32)
    with pytest.raises(ValueError, match="value .*rotate=True.*rotate=False"):
        flash_quant.attention(q, k, flash_quant.quantize(v, rotate=True))
    with pytest.raises(ValueError, match="value .*rotate=True"):  # with rotated Q/K too
        flash_quant.attention(flash_quant.quantize(q, rotate=True), flash_quant.quantize(k, rotate=True),
                              flash_quant.quantize(v, rotate=True))


def test_unrotated_value_with_rotated_query_key_is_accurate():
    """The supported combination next to the refused one: Q/K rotated, V not."""
    q, k, v = make_qkv(1, 2, 64, 32)
    out = flash_quant.attention(flash_quant.quantize(q, rotate=True), flash_quant.quantize(k, rotate=True),
                                flash_quant.quantize(v, "int8", flash_quant.PerChannel()))
    assert error_stats(out, reference_attention(q, k, v))["rel_l2"] < 0.02


@pytest.mark.parametrize("role", ["query", "key", "value"])
def test_quantized_operand_requiring_grad_is_refused(role, no_attention_kernel):
    """quantize(x) of an x that requires grad, given to attention with grad mode on: an
    error that names the operand and the two ways out, never a silently zero x.grad."""
    q, k, v = make_qkv(1, 2, 16, 32)
    x = {"query": q, "key": k, "value": v}[role].requires_grad_(True)
    operands = {"query": q, "key": k, "value": v}
    operands[role] = flash_quant.quantize(x, smooth=role == "key")
    with pytest.raises(ValueError, match=f"{role} is a QuantizedTensor .*require grad.*float tensor.*no_grad"):
        flash_quant.attention(operands["query"], operands["key"], operands["value"])


def test_quantized_operand_without_gradient_still_works():
    """The two ways out the error names: quantize under no_grad, or attend under no_grad
    (inference); and the float tensor itself gets straight-through gradients."""
    q, k, v = make_qkv(1, 2, 16, 32)
    k.requires_grad_(True)
    with torch.no_grad():
        kq = flash_quant.quantize(k, smooth=True)
    out = flash_quant.attention(q, kq, v)
    assert not out.requires_grad
    kq_graph = flash_quant.quantize(k, smooth=True)
    with torch.no_grad():
        torch.testing.assert_close(flash_quant.attention(q, kq_graph, v), out, rtol=0, atol=0)
    flash_quant.attention(q, k, v).sum().backward()
    assert k.grad is not None and bool(k.grad.abs().sum() > 0)
