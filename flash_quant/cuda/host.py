"""Host-side helpers of the CUDA launchers (no kernels here).

An eager quantized attention call at diffusion sizes is bound by host time as much as by
the GPU: on the H100 host a `flash_quant.attention(config="fast")` call took ~1.1 ms of
Python and launches against ~0.6 ms of GPU work at the Flux shape
(benchmarks/results/host_overhead_2026-11-23.txt), which left the 1024² Flux step
host-bound. Two things here cut the launchers' share:

* plain integer helpers: ``triton.cdiv`` and ``triton.next_power_of_2`` are
  constexpr-function objects in Triton 3.6, whose host-side call unwraps every argument
  (microseconds per call, a dozen calls per attention);
* :class:`PlanCache`: a launcher resolves everything that depends only on the call's
  signature (shapes, strides, dtypes, device, flags) once: grids, tile sizes, stride
  arguments, constexprs. A repeated call allocates its outputs and launches. Validation
  runs on the first call of a signature, before any kernel: every check is a function of
  the signature, so a cached plan is a validated one.
"""
from __future__ import annotations

from typing import Any, Dict, Hashable, Optional

import torch

__all__ = ["cdiv", "next_pow2", "tensor_signature", "PlanCache"]


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def tensor_signature(t: Optional[torch.Tensor]):
    """What a launch plan may depend on in a tensor argument: None, or (shape, strides,
    dtype, device). Data pointers are not part of it: plans never hold tensors."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):  # never cached: the launcher's checks name it
        return ("not a tensor", id(t))
    return (t.shape, t.stride(), t.dtype, t.device)


class PlanCache:
    """A bounded map from a call signature to its launch plan (oldest entry evicted
    first). Decode with a growing context makes a new signature per step, so the bound
    keeps such a loop from growing the cache without limit; each miss costs what an
    uncached call costs. ``hits`` / ``misses`` count lookups."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._plans: Dict[Hashable, Any] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable):
        try:
            plan = self._plans.get(key)
        except TypeError:  # an unhashable argument: let the launcher's checks name it
            plan = None
        if plan is None:
            self.misses += 1
        else:
            self.hits += 1
        return plan

    def put(self, key: Hashable, plan: Any) -> None:
        if len(self._plans) >= self.capacity:
            try:  # (another thread may evict at the same time: plans are only a cache)
                self._plans.pop(next(iter(self._plans)), None)
            except (StopIteration, RuntimeError):
                pass
        self._plans[key] = plan

    def clear(self) -> None:
        self._plans.clear()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._plans)
