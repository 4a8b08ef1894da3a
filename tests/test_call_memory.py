"""Peak memory of one CPU call (flash_quant/call_memory.py): the quantize op and
flash_quant.attention allocate their outputs plus bounded scratch, not float32 copies of
their inputs (issue 15, item 10).

Each measurement runs in a child process: the measurement fixes glibc's mmap threshold
for the whole process, which would slow the rest of the test session.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from flash_quant.call_memory import cpu_measurement_available

pytestmark = pytest.mark.skipif(not cpu_measurement_available(), reason="needs Linux with glibc (VmHWM)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2**20
THREADS = 2
B, H, S, D = 1, 8, 1024, 128
# Scratch a call may add beyond its outputs and its per-thread K / V panels: per-thread
# rows and tiles, the scales, page rounding.
SLACK = 1 * MIB

_CHILD = r"""
import json, sys, torch, flash_quant, flash_quant.ops
from flash_quant.call_memory import peak_call_bytes
torch.set_num_threads(%d)
B, H, S, D = %d, %d, %d, %d
torch.manual_seed(0)
q, k, v = (torch.randn(B, H, S, D, dtype=torch.bfloat16) for _ in range(3))
ops = torch.ops.flash_quant
calls = {
    "quantize": lambda: ops.quantize(k, "int8", "per_token", 1, "symmetric", True, True),
    "quantize_per_channel": lambda: ops.quantize(v, "int8", "per_channel", 1, "symmetric", False, False),
    "accurate": lambda: flash_quant.attention(q, k, v, config="accurate"),
    "fast": lambda: flash_quant.attention(q, k, v, config="fast"),
    "fp32": lambda: flash_quant.attention(q, k, v, config="fp32"),
}
print(json.dumps({name: peak_call_bytes(fn, "cpu") for name, fn in calls.items()}))
""" % (THREADS, B, H, S, D)


@pytest.fixture(scope="module")
def peaks():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


# bf16 (1, 8, 1024, 128): 2 MiB per operand, 4 MiB as float32
OPERAND = B * H * S * D * 2
CODES = OPERAND // 2  # int8: one byte per element
# Each thread holds one kv head's panels: V as float32 rows, K as int8 (integer Q·Kᵀ)
# or float32 (the fp32 preset).
V_PANEL, K_PANEL_INT8, K_PANEL_F32 = S * D * 4, S * D, S * D * 4


def test_quantize_makes_no_float32_copy(peaks):
    # outputs: int8 codes + per-row scales / zero points + the (8, 1, 128) mean; the
    # old kernel held x as float32, rotated, then centred: 12 MiB here
    assert peaks["quantize"] <= CODES + SLACK, peaks
    assert peaks["quantize_per_channel"] <= CODES + SLACK, peaks


@pytest.mark.parametrize("preset", ["accurate", "fast"])
def test_quantized_attention_peak_is_output_plus_codes(peaks, preset):
    # output (bf16, written once) + Q and K codes (+ V codes for fast) + per-thread panels;
    # the old call held float32 copies of the output, of every head's V, and the quantize
    # op's intermediates (12 MiB here)
    codes = 2 * CODES + (CODES if preset == "fast" else 0)
    panels = THREADS * (V_PANEL + K_PANEL_INT8)
    assert peaks[preset] <= OPERAND + codes + panels + SLACK, peaks


def test_fp32_preset_does_not_copy_16bit_inputs(peaks):
    # the CPU kernels compute in float32 from bf16 loads: no float32 q / k / v copies
    # (24 MiB here with them)
    assert peaks["fp32"] <= OPERAND + THREADS * (V_PANEL + K_PANEL_F32) + SLACK, peaks


def test_fp32_preset_on_16bit_inputs_equals_float32_inputs():
    """Skipping the cast changes no bit: the kernel converts each bf16 value exactly and
    rounds the float32 result once, as the cast path's output .to(bf16) did."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 4, 200, 64, dtype=torch.bfloat16) for _ in range(3))
    mask = torch.rand(2, 1, 200, 200) > 0.2
    import flash_quant

    got = flash_quant.attention(q, k, v, attn_mask=mask, config="fp32")
    want = flash_quant.attention(q.float(), k.float(), v.float(), attn_mask=mask, config="fp32").bfloat16()
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)
