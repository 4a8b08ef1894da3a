"""The sm90 fused pre-pass (csrc/cuda/sm90/prepass.cu) run on the CPU, in CI.

The pre-pass is plain CUDA (no wgmma / TMA), so its kernels can run under a small CPU
emulation of the CUDA features they use (tests/cuda_emu: one block at a time, threads as
std::threads, __syncthreads and warp shuffles as barriers). The kernel launches are
rewritten to the emulation's launcher, the file is compiled with g++ and called through
ctypes, and its outputs are compared with what flash_quant's quantize steps (the CPU
quantize op) make for the same call:

* Q codes and scales: equal (the same rotation, absmax / 127 and correctly rounded
  quotient, round half to even);
* K: the centre and its rotation within float32 rounding, scales within 1e-5 relative,
  codes equal except a few one step apart (the fused path rotates k - centre, the quantize
  op rotate(k) - rotate(centre): float32 rounding moves values at rounding boundaries);
* q · k_mean from the float q: against float64;
* the fast preset's V: per-channel scales and K-major codes equal, the padded keys 0, a
  channel holding a NaN with a NaN scale and codes 0.

This is the pre-pass's logic (indexing, layouts, reductions, NaN handling), not its speed
or the GPU's arithmetic (tests/test_sm90_fused_gpu.py runs the real thing on an H100).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from flash_quant import functional
from flash_quant.rotation import rotate
from flash_quant.testing import make_qkv

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))
import emulated  # noqa: E402

#: Share of K codes one step from the quantize op's (rounding boundaries, see above).
K_CODES_APART = 1e-3
D = 128


@pytest.fixture(scope="module")
def prepass_lib(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    return emulated.build_prepass(tmp_path_factory.mktemp("prepass_emu"))


def _run(lib, q, k, v, fast):
    return emulated.run_prepass(lib, q, k, v, fast)


CASES = [(1, 2, 2, 17, torch.bfloat16, "normal"), (2, 4, 2, 70, torch.bfloat16, "realistic"),
         (1, 2, 1, 130, torch.float16, "normal"), (1, 2, 2, 64, torch.float16, "realistic")]


@pytest.mark.parametrize("b, hq, hkv, s, dtype, family", CASES)
@pytest.mark.parametrize("preset", ["accurate", "fast"])
def test_prepass_makes_the_quantize_ops_operands(prepass_lib, b, hq, hkv, s, dtype, family, preset):
    q, k, v = make_qkv(b, hq, s, D, hkv=hkv, dtype=dtype, family=family)
    got = _run(prepass_lib, q, k, v, preset == "fast")
    want = functional._forward_arguments(q, k, v, None, 0.0, False, None, hq != hkv, preset).kwargs
    assert torch.equal(got["q_data"], want["q_data"])
    assert torch.equal(got["q_scale"], want["q_scale"].squeeze(-1))
    # the quantize op keeps the rotated centre; the orthonormal Sylvester Hadamard is its own inverse
    center = rotate(want["k_mean"].reshape(got["k_center"].shape).double())
    assert (got["k_center"].double() - center).abs().max() <= 1e-6 * max(1.0, center.abs().max().item()) * 16
    torch.testing.assert_close(got["k_scale"], want["k_scale"].squeeze(-1), rtol=1e-5, atol=0)
    apart = (got["k_data"].int() - want["k_data"].int()).abs()
    assert apart.max() <= 1 and (apart > 0).float().mean() <= K_CODES_APART
    dot = torch.einsum("bhsd,bhd->bhs", q.double(), got["k_center"].double().repeat_interleave(hq // hkv, 1))
    assert (got["q_center_dot"].double() - dot).abs().max() <= 1e-5 * dot.abs().max().clamp_min(1.0)
    if preset == "fast":
        codes = emulated.unpermute_v_tokens(got["v_data"])[..., :s].transpose(-1, -2)
        assert torch.equal(codes, want["v_data"])
        assert torch.equal(got["v_scale"], want["v_scale"].reshape(got["v_scale"].shape))
        assert (emulated.unpermute_v_tokens(got["v_data"])[..., s:] == 0).all()


def test_a_nan_in_v_gives_its_channel_a_nan_scale(prepass_lib):
    q, k, v = make_qkv(1, 2, 70, D, dtype=torch.bfloat16)
    v[0, 1, 35, 5] = float("nan")
    got = _run(prepass_lib, q, k, v, fast=True)
    want = functional._forward_arguments(q, k, v.nan_to_num(0.0), None, 0.0, False, None, False, "fast").kwargs
    scale, want_scale = got["v_scale"], want["v_scale"].reshape(got["v_scale"].shape)
    assert torch.isnan(scale[0, 1, 5]) and (emulated.unpermute_v_tokens(got["v_data"])[0, 1, 5] == 0).all()
    others = torch.ones_like(scale, dtype=torch.bool)
    others[0, 1, 5] = False
    assert torch.equal(scale[others], want_scale[others])
    codes = emulated.unpermute_v_tokens(got["v_data"])[..., :70].transpose(-1, -2)
    keep = torch.ones_like(codes, dtype=torch.bool)
    keep[0, 1, :, 5] = False
    assert torch.equal(codes[keep], want["v_data"][keep])


@pytest.mark.parametrize("magnitude", [1e-33, 1e-37], ids=["tiny-scale", "subnormal-scale"])
def test_tiny_rows_get_the_quantize_ops_codes(prepass_lib, magnitude):
    """Rows so small that their scale is below 2^-100 (row_quant.cuh's lifted division:
    1e-33 gives a normal scale there, 1e-37 a subnormal one, whose reciprocal overflows, where a quotient may pass 127
    and is clamped): Q and K codes as the quantize op's, within one step for K's rounding
    boundaries, never past ±127, scales equal."""
    q, k, v = make_qkv(1, 2, 40, D, dtype=torch.float32)
    q, k, v = ((t * magnitude).to(torch.bfloat16) for t in (q, k, v))
    got = _run(prepass_lib, q, k, v, False)
    want = functional._forward_arguments(q, k, v, None, 0.0, False, None, False, "accurate").kwargs
    assert float(want["k_scale"].max()) < 7.888609052210118e-31  # (the branch under test)
    assert torch.equal(got["q_scale"], want["q_scale"].squeeze(-1))
    assert (got["q_data"].int() - want["q_data"].int()).abs().max() <= 1
    assert (got["k_data"].int() - want["k_data"].int()).abs().max() <= 1
    assert got["q_data"].abs().max() <= 127 and got["k_data"].abs().max() <= 127
