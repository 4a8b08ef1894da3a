"""Orthonormal Hadamard rotation along the head dim.

Rotating both Q and K by the same orthonormal H leaves Q·Kᵀ unchanged (QH·(KH)ᵀ = Q·Kᵀ)
but spreads a few large channels over all channels, so per-row INT8/INT4 scales stop
being dominated by outlier channels. For a head dim that is not a power of two the
matrix is block-diagonal with the largest power-of-two block that divides it.
"""
from __future__ import annotations

import functools
import math

import torch

from .operand import stand_in

__all__ = ["hadamard_matrix", "rotate", "unrotate", "rotated_stand_in"]


@functools.lru_cache(maxsize=None)
def _hadamard_cpu(d: int) -> torch.Tensor:
    block = d & (-d)  # largest power of two dividing d
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / math.sqrt(block)
    return torch.block_diag(*([h] * (d // block)))


def _stream_capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_not_capturing(device: torch.device, what: str) -> None:
    """Raises when a device constant built on first use would be built while a CUDA graph
    is being captured: the host-to-device copy is not allowed there, and a tensor from the
    graph's memory pool must not be cached past it. Called on a cache miss only. Skipped
    while torch.compile traces (Dynamo ignores the cache and traces the constant's creation
    into the graph; the capture query returns a bool it cannot trace, a graph break that
    fails fullgraph=True: found on the H100/H200 by test_fused_cuda_graph_and_compile)."""
    if torch.compiler.is_compiling():
        return
    if device.type == "cuda" and _stream_capturing():
        raise RuntimeError(
            f"flash_quant: {what} is built on the first call that needs it, and this first call is "
            "being captured in a CUDA graph: run the same call once before capturing (a warm-up call)")


@functools.lru_cache(maxsize=None)
def _hadamard_on(d: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # One copy per (size, device, dtype): a host-to-device copy on every attention call
    # would stall the GPU pipeline.
    check_not_capturing(device, f"the {d}x{d} Hadamard rotation ({dtype}, {device})")
    return _hadamard_cpu(d).to(device=device, dtype=dtype)


def hadamard_matrix(d: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The (d, d) orthonormal rotation used by `rotate` (cached per device and dtype)."""
    if d < 1:
        raise ValueError(f"head dim must be positive, got {d}")
    return _hadamard_on(d, torch.device(device) if device is not None else torch.device("cpu"), dtype)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x @ H along the last dim, in x's dtype (16-bit inputs use the tensor cores: the
    rounding this adds is far below an 8-bit quantization step)."""
    return torch.matmul(x, hadamard_matrix(x.shape[-1], device=x.device, dtype=x.dtype))


def unrotate(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `rotate` (H is orthonormal: the inverse is Hᵀ)."""
    return torch.matmul(x, hadamard_matrix(x.shape[-1], device=x.device, dtype=x.dtype).t())


class _RotatedStandIn(torch.autograd.Function):
    """Forward: a zero-stride tensor of x's shape and dtype (no values are computed).
    Backward: the incoming gradient, taken with respect to rotate(x), unrotated."""

    @staticmethod
    def forward(ctx, x):
        return stand_in(x.shape, x.dtype, x.device)

    @staticmethod
    def backward(ctx, grad):
        return unrotate(grad)


def rotated_stand_in(x: torch.Tensor) -> torch.Tensor:
    """Stands for rotate(x) where only its shape, dtype and gradient path matter: the
    attention op reads a quantized operand's codes, never its float tensor, so rotating
    the floats (a matmul over the whole tensor) is skipped. Gradients reaching the stand-in
    flow to x as they would through rotate(x)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _RotatedStandIn.apply(x)
    return stand_in(x.shape, x.dtype, x.device)
