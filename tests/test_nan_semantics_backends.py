"""The non-finite cases of test_nan_semantics.py on the other backends' kernels, where
they run here: the CUDA Triton forward under TRITON_INTERPRET=1 and the Metal kernels
(forward and backward) under tools/metal_emu. fp32, against math SDPA in float64.

Before issue 15 item 3 was fixed on these backends, 3 CUDA cases (causal tile skip,
masks assigning -inf) and 12 Metal ones (NaN / inf spread over a simdgroup's 8 rows by
the diagonal-matrix rescale, masked NaN keys dropped, the causal skip) failed.
The interpreter computes tl.max / tl.maximum with numpy, which keeps NaN; on a GPU those
drop NaN, which the forward tolerates by design (P = exp2(NaN - m) stays NaN whatever the
max), but a pass here is not a GPU run.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import shutil  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_nan_semantics as nan  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _check(name, got):
    ref = nan.reference(name, "fp32", nan._seed())
    for g, r, what in zip(got, ref, ("out", "lse", "dq", "dk", "dv")):
        nan.assert_same_pattern(g.float(), r, "fp32", f"{name} {what}")


@pytest.mark.parametrize("name", nan.CASES)
def test_cuda_interpreted_forward_non_finite(name):
    pytest.importorskip("triton")
    from flash_quant.cuda.common import enable_interpreter_numpy_compat
    from flash_quant.cuda.forward import attention_forward_launch

    enable_interpreter_numpy_compat()
    q, k, v, mask, causal = nan._case(name, nan._seed())
    _check(name, attention_forward_launch(q, k, v, attn_mask=mask, is_causal=causal))


@pytest.mark.parametrize("name", nan.CASES)
def test_cuda_interpreted_backward_non_finite(name):
    pytest.importorskip("triton")
    from flash_quant.cuda.backward import attention_backward_triton
    from flash_quant.cuda.common import enable_interpreter_numpy_compat
    from flash_quant.cuda.forward import attention_forward_launch

    enable_interpreter_numpy_compat()
    q, k, v, mask, causal = nan._case(name, nan._seed())
    out, lse = attention_forward_launch(q, k, v, attn_mask=mask, is_causal=causal)
    grads = attention_backward_triton(nan._grad_out(nan._seed()), q, k, v, out, lse, attn_mask=mask, is_causal=causal)
    _check(name, [out, lse, *grads])


@pytest.mark.parametrize("name", nan.CASES)
def test_metal_emulated_non_finite(name):
    sys.path.insert(0, os.path.join(ROOT, "tools", "metal_emu"))
    import driver

    if shutil.which(driver.CXX) is None:
        pytest.skip("needs a C++20 compiler")
    emu = _emulator()
    q, k, v, mask, causal = nan._case(name, nan._seed())
    out, lse = emu.attention_forward(q, k, v, attn_mask=mask, is_causal=causal)
    grads = emu.attention_backward(nan._grad_out(nan._seed()), q, k, v, out, lse, attn_mask=mask, is_causal=causal)
    _check(name, [out, lse, *grads])


_EMU = []


def _emulator():
    import driver

    if not _EMU:
        _EMU.append(driver.Emulator())
    return _EMU[0]


def _nan_grad_out_case():
    """Causal, finite q, k, v; a NaN in one early row of dO: SDPA's (math backend, float64)
    gradient pattern, which reaches keys after that row (whose tiles the causal skips
    leave out) through 0 * NaN terms."""
    q, k, v, _, _ = nan._case("masked_row", nan._seed())  # (its mask unused: finite inputs)
    do = nan._grad_out(nan._seed())
    do[0, 0, 5, 3] = float("nan")
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    with sdpa_kernel(SDPBackend.MATH):
        F.scaled_dot_product_attention(q64, k64, v64, is_causal=True).backward(do.double())
    return (q, k, v, do), [q64.grad, k64.grad, v64.grad]


def _check_grads(got, ref):
    assert all(r.isnan().any() for r in ref)  # the case puts NaN into each gradient
    for g, r, what in zip(got, ref, ("dq", "dk", "dv")):
        nan.assert_same_pattern(g.float(), r, "fp32", f"nan_grad_out_causal {what}")


def test_cuda_interpreted_backward_nan_grad_out_causal():
    pytest.importorskip("triton")
    from flash_quant.cuda.backward import attention_backward_triton
    from flash_quant.cuda.common import enable_interpreter_numpy_compat
    from flash_quant.cuda.forward import attention_forward_launch

    enable_interpreter_numpy_compat()
    (q, k, v, do), ref = _nan_grad_out_case()
    out, lse = attention_forward_launch(q, k, v, is_causal=True)
    _check_grads(attention_backward_triton(do, q, k, v, out, lse, is_causal=True), ref)


def test_metal_emulated_backward_nan_grad_out_causal():
    sys.path.insert(0, os.path.join(ROOT, "tools", "metal_emu"))
    import driver

    if shutil.which(driver.CXX) is None:
        pytest.skip("needs a C++20 compiler")
    emu = _emulator()
    (q, k, v, do), ref = _nan_grad_out_case()
    out, lse = emu.attention_forward(q, k, v, is_causal=True)
    _check_grads(emu.attention_backward(do, q, k, v, out, lse, is_causal=True), ref)
