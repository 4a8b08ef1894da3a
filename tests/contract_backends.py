"""The backends the op-contract suite (tests/test_contract.py) runs on, and their bars.

Each `Backend` runs the ops of docs/op_contract.md on CPU tensors in, CPU tensors out:
`forward` / `backward` take attention_forward's / attention_backward's operands as
keywords, `quantize` takes quantize's. Which backends are present:

- "cpu": always (the compiled extension's CPU kernels, torch.ops.flash_quant).
- "cuda-interpret": the Triton kernels of flash_quant/cuda under TRITON_INTERPRET=1, on
  CPU tensors, when triton is installed and no CUDA device is: the interpreter flag is
  process-wide and read when the kernels are defined, so one process runs Triton either
  interpreted or compiled.
- "cuda": the registered ops on a CUDA device, when one is present.
- "metal-emulator": the Metal kernels compiled as C++ by tools/metal_emu (launch plans
  from the MPS backend's own host logic), when a C++20 compiler is present.
- "mps": the registered ops on an Apple GPU, when one is present.

The interpreter and the emulator are slow: each case names which of them run it (mostly the
cases their own test files held before, at those sizes); the others run every case.

Bars: every backend keeps the numbers its own test file held before the suite took the
case over (the file named next to each number). `Bar.close` is an element-wise bound
(rtol = atol), `Bar.rel_l2` a relative-L2 bound; `lse_abs` bounds |lse - reference| on
the finite entries, relative to max(1, |reference lse|max / lse_scale) when lse_scale
is set.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA = torch.cuda.is_available()
HAS_MPS = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
CAN_INTERPRET = not HAS_CUDA and importlib.util.find_spec("triton") is not None
if CAN_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"  # before any flash_quant.cuda kernel is defined

# The interpreter's backward tile: 16x16, so every case has several blocks and ragged tails
# (as tests/test_cuda_backward_interpret.py forces it).
INTERPRET_BACKWARD_TILE = ((16, 16, 4, 1), (16, 16, 4, 1))

INTERP, EMU = "cuda-interpret", "metal-emulator"
# which slow backends run a case (besides the fast ones, which run all)
FAST_ONLY, ON_INTERP, ON_EMU, ON_ALL = frozenset(), frozenset({INTERP}), frozenset({EMU}), frozenset({INTERP, EMU})

OPERANDS = ("q_data", "q_scale", "q_zero_point", "k_data", "k_scale", "k_zero_point", "k_mean", "v_data",
            "v_scale", "v_zero_point")


@dataclass(frozen=True)
class Bar:
    close: Optional[float] = None  # element-wise rtol = atol on out (and lse)
    rel_l2: Optional[float] = None  # relative L2 of out
    lse_abs: Optional[float] = None  # max |lse - ref| (finite entries)
    lse_scale: Optional[float] = None  # lse_abs is relative to max(1, |ref lse|max / lse_scale)


@dataclass
class Backend:
    name: str
    device: str
    forward: Callable  # (q, k, v, **operands, attn_mask, is_causal, scale, pv_precision) -> (out, lse)
    backward: Callable  # (grad_out, q, k, v, out, lse, **same) -> (dq, dk, dv)
    quantize: Callable  # (x, precision, granularity, block_size, strategy, smooth) -> 4 tensors
    fast: bool = True  # False: runs only the cases that name it (slow: the interpreter, the emulator)
    bars: Dict[str, Bar] = field(default_factory=dict)
    bf16_backward: bool = True  # False: the backend's bf16 backward cannot be checked here

    def runs(self, slow_backends: frozenset) -> bool:
        """Whether it runs a case meant for the fast backends and `slow_backends`."""
        return self.fast or self.name in slow_backends


def _to(device, x):
    return x.to(device) if isinstance(x, torch.Tensor) else x


def _cpu(xs):
    return tuple(x.cpu() for x in xs)


def _positional(kw):
    return [kw.get(n) for n in OPERANDS]


def _op_backend(name, device, **extra):
    """A backend reached through the registered ops (cpu, cuda, mps)."""
    import flash_quant.ops  # noqa: F401  (loads the ops; registers the kernels of every built backend)

    ops = torch.ops.flash_quant

    def forward(q, k, v, attn_mask=None, is_causal=False, scale=None, pv_precision="none", **kw):
        q, k, v, attn_mask = (_to(device, t) for t in (q, k, v, attn_mask))
        kw = {n: _to(device, t) for n, t in kw.items()}
        return _cpu(ops.attention_forward(q, k, v, *_positional(kw), attn_mask, is_causal, scale, pv_precision))

    def backward(g, q, k, v, out, lse, attn_mask=None, is_causal=False, scale=None, pv_precision="none", **kw):
        args = [_to(device, t) for t in (g, q, k, v, out, lse)]
        kw = {n: _to(device, t) for n, t in kw.items()}
        return _cpu(ops.attention_backward(*args, *_positional(kw), _to(device, attn_mask), is_causal, scale,
                                           pv_precision))

    def quantize(x, *args):
        return _cpu(ops.quantize(x.to(device), *args))

    return Backend(name, device, forward, backward, quantize, **extra)


def _interpret_backend():
    from flash_quant.cuda.common import enable_interpreter_numpy_compat

    enable_interpreter_numpy_compat()
    from flash_quant.cuda.backward import attention_backward_triton
    from flash_quant.cuda.forward import attention_forward_launch
    from flash_quant.cuda.quantize import quantize_launch

    def backward(*args, **kw):
        return attention_backward_triton(*args, blocks=INTERPRET_BACKWARD_TILE, **kw)

    return Backend(INTERP, "cpu", attention_forward_launch, backward, quantize_launch,
                   fast=False,
                   # Triton 3.6's interpreter multiplies the raw bits of bf16 tiles in tl.dot
                   # (test_cuda_backward_interpret.py): bf16 backward is checked on GPUs only.
                   bf16_backward=False, bars=TRITON_BARS)


def _emulator_backend():
    sys.path.insert(0, os.path.join(ROOT, "tools", "metal_emu"))
    import driver

    if shutil.which(driver.CXX) is None:
        return None
    emu = driver.Emulator()
    return Backend(EMU, "cpu", emu.attention_forward, emu.attention_backward, emu.quantize,
                   fast=False, bars=METAL_BARS)


# Bars by check: fwd32 / fwd16 (unquantized forward, fp32 / 16-bit inputs), fwd_quant_int
# / fwd_quant_fp (quantized forward against fp64 of the dequantized operands: integer
# Q.K / fp32 products), bwd32 / bwd16 (unquantized backward, rel-L2 of each gradient or,
# with `close`, max error normalised by 1 + max |reference|).
CPU_BARS = {  # tests/test_cpu_kernels.py
    "fwd32": Bar(close=2e-5),
    "fwd16": Bar(rel_l2=1e-2),
    "fwd_quant_int": Bar(close=2e-5),
    "fwd_quant_fp": Bar(close=1e-4),
    "bwd32": Bar(close=2e-5),
    "bwd16": Bar(rel_l2=1e-2),  # (new here: the CPU file checked only the dtype)
}
METAL_BARS = {  # tests/test_metal_emulator.py: rel-L2 1e-5 (16-bit 1e-2), lse within 10x that
    "fwd32": Bar(rel_l2=1e-5, lse_abs=1e-4),
    "fwd16": Bar(rel_l2=1e-2, lse_abs=1e-1),
    "fwd_quant_int": Bar(rel_l2=1e-5, lse_abs=1e-4, lse_scale=10),
    "fwd_quant_fp": Bar(rel_l2=1e-5, lse_abs=1e-4, lse_scale=10),
    "bwd32": Bar(rel_l2=1e-5),
    "bwd16": Bar(rel_l2=1e-2),
}
TRITON_BARS = {  # tests/test_cuda_interpret.py, tests/test_cuda_backward_interpret.py
    "fwd32": Bar(rel_l2=2e-3, lse_abs=1e-3),  # tf32-class dots on GPU
    "fwd16": Bar(rel_l2=3e-3, lse_abs=2e-2),  # P and out in fp16
    "fwd16_bf16": Bar(rel_l2=1e-2, lse_abs=2e-2),  # P and out in bf16: ~4e-3 from rounding alone
    "fwd_quant_int": Bar(rel_l2=3e-3, lse_abs=2e-2),
    "fwd_quant_fp": Bar(rel_l2=3e-3, lse_abs=2e-2),
    "bwd32": Bar(rel_l2=1e-5),
    "bwd16": Bar(rel_l2=4e-3),
    "bwd16_bf16": Bar(rel_l2=2.5e-2),  # tests/test_cuda_backward_interpret.py's GPU-only bf16 bar
}
CUDA_BARS = {  # the compiled Triton kernels: the interpreter's numbers, except where the GPU's
    # dots are coarser than the interpreter's numpy products (fp32 inputs take tf32 dots in
    # the backward too; 16-bit backward: tests/test_training.py's GPU bars)
    **TRITON_BARS,
    # Measured on an H100 (2026-12-06, the first GPU run of this suite): tf32 dots put lse
    # off by up to 2.4e-3 at D = 32 and dq at up to 3.8e-3 rel-L2; a float or fp8 operand
    # beside a quantized one is multiplied in 16 bits (forward.py COMPUTE), so scores of
    # |s| ~ 20 move lse by up to 0.216 (int8 Q, float K, D = 32) and the output by up to
    # 3.2e-3: a relative bound, 1e-2 of |lse| (bf16 rounding is 3.9e-3 relative).
    "fwd32": Bar(rel_l2=2e-3, lse_abs=1e-2),
    "fwd_quant_int": Bar(rel_l2=5e-3, lse_abs=1e-2, lse_scale=1),
    "fwd_quant_fp": Bar(rel_l2=5e-3, lse_abs=1e-2, lse_scale=1),
    "bwd32": Bar(rel_l2=5e-3),
    "bwd16": Bar(rel_l2=1e-2),
}
MPS_BARS = {  # tests/test_mps.py (fp32 1e-5 and 16-bit 1.5e-2 rel-L2); the rest as the emulator's
    **METAL_BARS,
    "fwd16": Bar(rel_l2=1.5e-2, lse_abs=1e-1),
}


def _present():
    found = [_op_backend("cpu", "cpu", bars=CPU_BARS)]
    if CAN_INTERPRET:
        found.append(_interpret_backend())
    if HAS_CUDA:
        found.append(_op_backend("cuda", "cuda", bars=CUDA_BARS))
    emulator = _emulator_backend()
    if emulator is not None:
        found.append(emulator)
    if HAS_MPS:
        found.append(_op_backend("mps", "mps", bars=MPS_BARS))
    return found


BACKENDS = _present()


def bar(backend: Backend, check: str, dtype: torch.dtype) -> Bar:
    """The backend's bar for `check`, with a bf16-specific one where it has one."""
    if dtype == torch.bfloat16 and f"{check}_bf16" in backend.bars:
        return backend.bars[f"{check}_bf16"]
    return backend.bars[check]
