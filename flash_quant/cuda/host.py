"""Host-side helpers of the CUDA launchers (no kernels here).

An eager quantized attention call at diffusion sizes is bound by host time as much as by
the GPU: on the H100 host a `flash_quant.attention(config="fast")` call took ~1.1 ms of
Python and launches against ~0.6 ms of GPU work at the Flux shape (docs/studies.md, host
time), which left the 1024² Flux step host-bound. Two things here cut the launchers' share:

* plain integer helpers: ``triton.cdiv`` and ``triton.next_power_of_2`` are
  constexpr-function objects in Triton 3.6, whose host-side call unwraps every argument
  (microseconds per call, a dozen calls per attention);
* :class:`PlanCache`: a launcher resolves everything that depends only on the call's
  signature (shapes, strides, dtypes, device, flags) once: grids, tile sizes, stride
  arguments, constexprs. A repeated call allocates its outputs and launches. Validation
  runs on the first call of a signature, before any kernel: every check is a function of
  the signature, so a cached plan is a validated one.
* :func:`launch`: a plan's kernels are launched through their compiled launchers,
  skipping ``JITFunction.run``'s per-call binding and specialisation of every argument
  (the attention kernel has ~60; on the H200 host that run cost 180 µs per launch against
  17 µs for a one-argument kernel).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Hashable, Optional, Sequence

import torch
from triton import knobs
from triton.runtime import driver

__all__ = ["cdiv", "next_pow2", "tensor_signature", "PlanCache", "launch", "direct_launches"]


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

    def get_or_put(self, key: Hashable, make):
        """The entry for `key`, made by `make()` and stored when missing."""
        plan = self.get(key)
        if plan is None:
            plan = make()
            self.put(key, plan)
        return plan

    def clear(self) -> None:
        self._plans.clear()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._plans)


_DIRECT = {"launches": 0}


def direct_launches() -> int:
    """How many launches in this process went straight to a cached compiled kernel."""
    return _DIRECT["launches"]


def launch(fn, grid: Sequence[int], args: tuple, meta: Dict[str, Any], kernels: Dict, key: Hashable) -> None:
    """``fn[grid](*args, **meta)``, the compiled kernel kept in `kernels` (a plan's dict).

    A later call with the same `key`, the same 16-byte alignment of each tensor argument
    and the same current device (a loaded kernel belongs to one) calls that kernel's
    launcher directly. The caller promises that `key` fixes `grid`, `meta` and every
    non-tensor argument: then the cached kernel is the one
    ``JITFunction.run`` would select, since Triton specialises a launch on the constexprs,
    on integers equal to 1 or divisible by 16, and on pointer alignment (part of the cache
    key here). Launch hooks (profilers) are honoured as ``run`` does. Off with
    ``FLASH_QUANT_DIRECT_LAUNCH=0``; under ``TRITON_INTERPRET=1`` nothing is compiled, so
    every call takes ``fn[grid]``.
    """
    align = tuple(a.data_ptr() % 16 == 0 for a in args if isinstance(a, torch.Tensor))
    # (an empty dict asks no driver: under the interpreter nothing is ever cached, and
    # there may be no GPU driver to ask)
    device = driver.active.get_current_device() if kernels else None
    entry = kernels.get((key, align, device)) if kernels else None
    if entry is None:
        compiled = fn[grid](*args, **meta)
        if (compiled is not None and hasattr(compiled, "packed_metadata")
                and os.environ.get("FLASH_QUANT_DIRECT_LAUNCH", "1") != "0"):
            try:  # the constexpr parameters after the positional ones, in signature order
                tail = tuple(meta[p.name] for p in fn.params[len(args):])
            except KeyError:  # a defaulted parameter: keep launching through fn[grid]
                return
            if device is None:
                device = driver.active.get_current_device()
            kernels[(key, align, device)] = (compiled, tail)
        return
    compiled, tail = entry
    full = args + tail
    stream = driver.active.get_current_stream(device)
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata,
                 compiled.launch_metadata(grid, stream, *full),
                 knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *full)
    _DIRECT["launches"] += 1
