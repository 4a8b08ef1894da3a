"""Peak memory one call adds above what was resident before it (benchmarks, examples/demo.py).

CUDA: `torch.cuda.max_memory_allocated` (the caching allocator's own count of live
bytes) after a reset, minus the bytes allocated before the call.

CPU: torch has no allocator statistics for the CPU, and its profiler sees only tensors
(not a kernel's own std::vector buffers). So this reads the process's resident memory:
the kernel's peak resident set (Linux VmHWM, reset through /proc/self/clear_refs) minus
the resident set before the call. Glibc serves a large block from its heap and keeps it
resident after `free`, so a second call would reuse it unseen; `enable_cpu_measurement`
therefore makes glibc map every block of MMAP_THRESHOLD bytes or more on its own and
unmap it on free, and before each measurement returns the heap's free pages to the
system (malloc_trim: blocks freed before the threshold was fixed would otherwise be reused
unseen), so the high-water mark rises by the pages a call touches.
Limits: blocks smaller than MMAP_THRESHOLD may come from heap pages already resident and
are not counted (a call's small blocks — per-thread scratch rows, tile buffers — are
tens of KiB); the count is in whole pages; memory allocated but never written is not
counted (it costs no physical memory). Linux with glibc only. It changes how this process
allocates (every large block is a fresh mapping, which is slower): time calls before
enabling it, or in another process.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Callable, Optional

import torch

__all__ = ["MMAP_THRESHOLD", "cpu_measurement_available", "enable_cpu_measurement", "peak_call_bytes"]

#: Blocks of at least this many bytes get their own mapping while measuring (glibc's
#: default threshold, but fixed: glibc otherwise raises it after the first free).
MMAP_THRESHOLD = 64 * 1024

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_libc = None  # set by enable_cpu_measurement


def cpu_measurement_available() -> bool:
    """Whether the CPU measurement can run here (Linux, glibc, /proc/self/clear_refs)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/clear_refs", "w"):
            pass
    except OSError:
        return False
    return ctypes.util.find_library("c") is not None


def enable_cpu_measurement() -> None:
    """Fix glibc's mmap threshold (see the module docstring); idempotent."""
    global _libc
    if _libc is not None:
        return
    if not cpu_measurement_available():
        raise RuntimeError("CPU peak memory is measured on Linux with glibc only (VmHWM, mallopt)")
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if not (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, 0)):
        raise RuntimeError("mallopt refused the measurement settings (not glibc?)")
    _libc = libc


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _cpu_peak(fn: Callable[[], object]) -> int:
    enable_cpu_measurement()
    _libc.malloc_trim(0)  # free heap pages leave the resident set: reusing them is counted
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = _status_kib("VmRSS")
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    return max(peak - before, 0) * 1024


def _cuda_peak(fn: Callable[[], object], device) -> int:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return peak - before


def peak_call_bytes(fn: Callable[[], object], device="cpu", repeats: int = 3) -> Optional[int]:
    """Bytes `fn()` adds at its peak above the memory in use before it, its result
    included (the median of `repeats` calls after one warm-up call). None where the
    device has no measurement here (MPS; a CPU without Linux / glibc)."""
    device = torch.device(device)
    if device.type == "cuda":
        def measure():
            return _cuda_peak(fn, device)
    elif device.type == "cpu" and cpu_measurement_available():
        def measure():
            return _cpu_peak(fn)
    else:
        return None
    fn()  # warm-up: one-time allocations (thread pools, cached matrices) are not the call's
    samples = sorted(measure() for _ in range(repeats))
    return samples[len(samples) // 2]
