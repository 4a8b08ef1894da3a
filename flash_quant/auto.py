"""config="auto": the attention preset chosen from runtime statistics and context.

`select_attention_preset(q, k, v, phase=..., kv_cache=..., thresholds=...)` returns
``(preset_name, reason)``; `flash_quant.attention(..., config="auto")` uses it.

**Eager only.** The decision depends on tensor values, so it reads them on the host: one
device sync per call (all statistics are stacked and fetched with a single ``.tolist()``).
Under torch.compile it raises; inside compiled code call
`select_attention_preset_static` (shapes, dtype and context only, no sync) or pass a
fixed preset.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Tuple

import torch

from .outliers import outlier_ratio

__all__ = ["AdaptiveThresholds", "select_attention_preset", "select_attention_preset_static"]


@dataclass(frozen=True)
class AdaptiveThresholds:
    """The documented parameters of the adaptive choice (docs/planning.md).

    min_seq_kv: below this many keys the 16-bit preset is chosen: the quantization passes
      are extra launches and memory sweeps that an attention this small cannot amortise.
    qk_outlier_max: largest `outlier_ratio` of Q (per token) and of K (per token, after
      subtracting its per-channel mean, as the presets do) for INT8 Q·Kᵀ.  Above it, the
      16-bit preset.  (The INT8 presets also Hadamard-rotate Q and K, which spreads channel
      outliers, so this limit is looser than the INT8 fallback of dynamic quantization.)
    v_outlier_max: largest per-channel `outlier_ratio` of V for INT8 V / INT8 P·V ("fast").
    fast_min_seq_kv: prefill uses "fast" (8-bit P·V too) only from this many keys on.
    allow_int4: allow the "int4" preset (INT4 Q·Kᵀ; larger error, see measured_errors).
    int4_outlier_max / int4_min_seq_kv: its limits (prefill, very clean Q/K, long context).
    """

    min_seq_kv: int = 256
    qk_outlier_max: float = 8.0
    v_outlier_max: float = 4.0
    fast_min_seq_kv: int = 2048
    allow_int4: bool = False
    int4_outlier_max: float = 2.0
    int4_min_seq_kv: int = 4096

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "allow_int4":
                if not isinstance(v, bool):
                    raise ValueError(f"AdaptiveThresholds.allow_int4 must be a bool, got {v!r}")
            elif not v > 0:
                raise ValueError(f"AdaptiveThresholds.{f.name} must be > 0, got {v!r}")


def _unquantized(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, "fp16")


def _phase(phase: str, sq: int, skv: int) -> str:
    if phase == "auto":
        return "decode" if sq <= 16 and skv > sq else "prefill"
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be 'prefill', 'decode' or 'auto', got {phase!r}")
    return phase


def select_attention_preset_static(seq_q: int, seq_kv: int, dtype: torch.dtype = torch.float16, *,
                                   phase: str = "auto", kv_cache: bool = False,
                                   thresholds: Optional[AdaptiveThresholds] = None) -> Tuple[str, str]:
    """The context-only part of the choice (no tensor values: torch.compile friendly)."""
    th = thresholds or AdaptiveThresholds()
    ph = _phase(phase, seq_q, seq_kv)
    base = _unquantized(dtype)
    if seq_kv < th.min_seq_kv:
        return base, f"{seq_kv} keys < min_seq_kv {th.min_seq_kv}: too short to amortise quantization"
    if ph == "decode" and not kv_cache:
        return base, ("decode without a quantized KV cache: quantizing K/V on every call reads them in "
                      "16 bits anyway, so quantization adds traffic instead of saving it")
    if ph == "decode":
        return "fast", "decode with a KV cache: memory-bound, INT8 K and V halve the bytes read"
    if seq_kv >= th.fast_min_seq_kv:
        return "fast", f"prefill over {seq_kv} keys: compute-bound, 8-bit Q·Kᵀ and P·V"
    return "accurate", f"prefill over {seq_kv} keys: INT8 Q·Kᵀ, 16-bit P·V"


def select_attention_preset(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, phase: str = "auto",
                            kv_cache: bool = False,
                            thresholds: Optional[AdaptiveThresholds] = None) -> Tuple[str, str]:
    """Choose a preset name among accurate / fast / int4 / fp16 / bf16 / fp32 for these
    (B, H, S, D) inputs; returns (name, human-readable reason).  Eager only (one sync)."""
    if torch.compiler.is_compiling():
        raise RuntimeError("select_attention_preset reads tensor values (a host sync) and cannot run under "
                           "torch.compile; use select_attention_preset_static or a fixed preset there")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating (B, H, S, D) tensor, got "
                             f"{type(t).__name__}{tuple(t.shape) if isinstance(t, torch.Tensor) else ''}")
    th = thresholds or AdaptiveThresholds()
    sq, skv = q.shape[-2], k.shape[-2]
    base = _unquantized(q.dtype)
    preset, reason = select_attention_preset_static(sq, skv, q.dtype, phase=phase, kv_cache=kv_cache,
                                                    thresholds=th)
    if preset == base:
        return preset, reason
    ph = _phase(phase, sq, skv)
    with torch.no_grad():
        kf = k.float()
        ks = kf - kf.mean(dim=-2, keepdim=True)          # the presets smooth K
        stats = torch.stack([
            outlier_ratio(q, "per_token"), outlier_ratio(ks, "per_token"), outlier_ratio(v, "per_channel"),
            torch.isfinite(q).all().float() * torch.isfinite(k).all().float() * torch.isfinite(v).all().float(),
        ]).tolist()                                      # the one host sync
    q_r, k_r, v_r, finite = stats
    if finite < 1.0:
        return base, "non-finite values in q/k/v: computed unquantized so they propagate as in SDPA"
    worst = max(q_r, k_r)
    if worst > th.qk_outlier_max:
        return base, (f"Q/K outlier ratio {worst:.1f} > qk_outlier_max {th.qk_outlier_max:g}: "
                      "INT8 Q·Kᵀ would lose the small scores")
    if (th.allow_int4 and ph == "prefill" and skv >= th.int4_min_seq_kv and worst <= th.int4_outlier_max):
        return "int4", (f"Q/K outlier ratio {worst:.2f} <= int4_outlier_max {th.int4_outlier_max:g} at "
                        f"{skv} keys: INT4 Q·Kᵀ")
    if preset == "fast" and v_r > th.v_outlier_max:
        return "accurate", (f"{reason}; but V outlier ratio {v_r:.1f} > v_outlier_max {th.v_outlier_max:g}: "
                            "keep P·V in 16 bits")
    return preset, f"{reason} (Q/K outlier ratio {worst:.2f}, V {v_r:.2f})"
