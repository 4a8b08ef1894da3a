"""Launch-configuration tuning of flash_quant's Triton kernels.

A *key* names what a config depends on: the kernel and, for attention, the padded head
dim, the Q·Kᵀ and P·V modes, causal, mask kind, input dtype and a query-length bucket.
The first launch of a key times each candidate (``triton.testing.do_bench``, median) on
the real arguments and keeps the fastest; later launches reuse it. Nothing is tuned
while a CUDA graph is being captured (the heuristic default is used and not cached), so
warm up once before capturing.

Environment:
  ``FLASH_QUANT_AUTOTUNE=0``        never time candidates; use the heuristic default.
  ``FLASH_QUANT_PRINT_AUTOTUNE=1``  print each choice (key, config, the candidates' times).

``describe()`` returns the table of choices made in this process; ``chosen()`` the raw
dict. Under ``TRITON_INTERPRET=1`` the default is always used (interpreting is slow).
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, NamedTuple, Tuple

import torch

__all__ = ["Config", "select", "describe", "chosen", "clear", "forward_candidates", "forward_default"]


class Config(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"BLOCK_M={self.block_m} BLOCK_N={self.block_n} warps={self.num_warps} stages={self.num_stages}"


_CACHE: Dict[Tuple, Config] = {}
_TIMINGS: Dict[Tuple, List[Tuple[Config, float]]] = {}


def _enabled() -> bool:
    return os.environ.get("FLASH_QUANT_AUTOTUNE", "1") != "0" and os.environ.get("TRITON_INTERPRET", "0") != "1"


def _verbose() -> bool:
    return os.environ.get("FLASH_QUANT_PRINT_AUTOTUNE", "0") == "1"


def forward_candidates(head_dim_p2: int, eight_bit: bool, dtype_bytes: int) -> List[Config]:
    """Candidate configs of the attention forward for a padded head dim."""
    if dtype_bytes == 4:  # fp32 inputs: tf32 tiles are twice as large
        return [Config(64, 32, 4, 2), Config(64, 64, 4, 2), Config(32, 32, 4, 2)]
    if head_dim_p2 <= 64:
        return [Config(128, 64, 4, 3), Config(128, 128, 8, 3), Config(64, 64, 4, 3),
                Config(128, 64, 8, 4)]
    if head_dim_p2 <= 128:
        if eight_bit:
            return [Config(128, 128, 8, 3), Config(128, 64, 8, 3), Config(128, 64, 4, 3),
                    Config(64, 128, 4, 3), Config(128, 128, 8, 2)]
        return [Config(128, 64, 8, 3), Config(128, 128, 8, 2), Config(128, 64, 4, 3),
                Config(64, 64, 4, 3)]
    return [Config(64, 64, 4, 2), Config(128, 64, 8, 2), Config(64, 32, 4, 2)]


def forward_default(head_dim_p2: int, eight_bit: bool, dtype_bytes: int, seq_q: int) -> Config:
    """Heuristic config used without tuning (interpreter, FLASH_QUANT_AUTOTUNE=0, capture)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return Config(16, 16, 4, 1)  # smallest tiles: fastest to interpret
    c = forward_candidates(head_dim_p2, eight_bit, dtype_bytes)[0]
    if seq_q <= 64:
        return Config(64 if c.block_m > 64 else c.block_m, c.block_n, 4, c.num_stages)
    return c


def select(key: Tuple, candidates: List[Config], default: Config,
           launch: Callable[[Config], None]) -> Config:
    """The config for `key`: cached, else timed among `candidates` with `launch(cfg)`
    (which must run the kernel once on the real arguments), else `default`."""
    cfg = _CACHE.get(key)
    if cfg is not None:
        return cfg
    if not _enabled() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        return default
    import triton.testing

    results: List[Tuple[Config, float]] = []
    failures = []
    for cand in candidates:
        try:
            launch(cand)  # compile + first run outside the timing
            ms = triton.testing.do_bench(lambda: launch(cand), warmup=5, rep=25, return_mode="median")
            results.append((cand, float(ms)))
        except Exception as exc:  # e.g. out of shared memory for this tile: not a candidate
            failures.append((cand, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"))
    if not results:
        raise RuntimeError(f"flash_quant autotune: every candidate failed for {key}: {failures}")
    best = min(results, key=lambda r: r[1])[0]
    _CACHE[key] = best
    _TIMINGS[key] = results
    if _verbose():
        times = ", ".join(f"[{c}] {ms * 1e3:.1f}us" for c, ms in results)
        fails = f"; failed: {failures}" if failures else ""
        print(f"[flash_quant autotune] {key} -> {best}  ({times}{fails})", file=sys.stderr)
    return best


def chosen() -> Dict[Tuple, Config]:
    """The configs chosen so far in this process, by key."""
    return dict(_CACHE)


def describe() -> str:
    """A readable table of the chosen configs and the candidates' median times."""
    if not _CACHE:
        return "flash_quant autotune: no config chosen yet in this process"
    lines = ["flash_quant autotune choices:"]
    for key, cfg in _CACHE.items():
        times = _TIMINGS.get(key, [])
        t = min((ms for c, ms in times if c == cfg), default=float("nan"))
        lines.append(f"  {key}: {cfg} ({t * 1e3:.1f} us of {len(times)} timed)")
    return "\n".join(lines)


def clear() -> None:
    _CACHE.clear()
    _TIMINGS.clear()
