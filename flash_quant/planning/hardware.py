"""Hardware registry: peak rates per precision, memory bandwidth, exp-unit throughput and
efficiency factors, each figure tagged with where it comes from.

The registry lives in ``data/hardware.json``.  A figure is a dict
``{"value", "source", "ref", ["date"]}`` where ``source`` is one of ``datasheet``,
``measured``, ``derived`` or ``estimate`` (see the file's ``_about``).  No torch import.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Dict, Optional, Tuple

from .formats import FORMATS, format_info, normalize_precision

__all__ = ["Figure", "HardwareSpec", "get_hardware", "list_hardware", "hardware_for_device_name",
           "DATA_DIR", "DEFAULT_EFFICIENCY"]

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
_SOURCES = ("datasheet", "measured", "derived", "estimate", "assumption", "calibrated")

# Used where a chip has neither a measurement nor a calibration: fractions of peak that
# well-tuned kernels commonly reach.  Tagged "assumption" wherever they are reported.
DEFAULT_EFFICIENCY = {"memory": 0.85, "mma": 0.6, "exp": 0.9, "simt": 0.5}


@dataclass(frozen=True)
class Figure:
    value: float
    source: str
    ref: str = ""
    date: str = ""

    @classmethod
    def parse(cls, raw, where: str) -> "Figure":
        if not isinstance(raw, dict) or "value" not in raw or "source" not in raw:
            raise ValueError(f"{where}: expected {{'value', 'source', 'ref'}}, got {raw!r}")
        if raw["source"] not in _SOURCES:
            raise ValueError(f"{where}: source {raw['source']!r} is not one of {_SOURCES}")
        value = float(raw["value"])
        if not value > 0:
            raise ValueError(f"{where}: value must be > 0, got {value}")
        return cls(value, raw["source"], raw.get("ref", ""), raw.get("date", ""))

    def cite(self) -> str:
        extra = f", {self.date}" if self.date else ""
        return f"{self.source}{extra}: {self.ref}" if self.ref else self.source + extra


@dataclass(frozen=True)
class HardwareSpec:
    key: str
    display_name: str
    vendor: str
    arch: str
    sm_count: int
    memory_gb: Figure
    memory_bandwidth_tbs: Figure
    peak_tflops: Dict[str, Figure]
    simt_fp32_tflops: Figure
    exp_tops: Figure
    measured: Dict[str, Figure] = field(default_factory=dict)
    efficiency: Dict[str, Figure] = field(default_factory=dict)
    aliases: Tuple[str, ...] = ()

    # ---- precision support -------------------------------------------------------
    def has_native(self, precision) -> bool:
        return normalize_precision(precision) in self.peak_tflops

    def compute_precision(self, precision) -> str:
        """The precision the matrix units actually run for operands stored in
        `precision`: itself when native, else the first native entry of its fallback
        chain (the operand is dequantized to it inside the kernel)."""
        p = normalize_precision(precision)
        if p in self.peak_tflops:
            return p
        for alt in format_info(p).compute_fallback:
            if alt in self.peak_tflops:
                return alt
        raise ValueError(f"{self.display_name} has no matrix-unit rate for {p} or any of its "
                         f"fallbacks {format_info(p).compute_fallback}")

    def peak(self, precision) -> float:
        """Dense matrix-unit peak (TFLOPS / TOPS) for operands stored in `precision`."""
        return self.peak_tflops[self.compute_precision(precision)].value

    # ---- efficiency factors ------------------------------------------------------
    def efficiency_factor(self, kind: str, precision: Optional[str] = None) -> Tuple[float, str]:
        """(fraction of peak, source) for `kind` in memory / mma / exp / simt.  For mma
        the per-precision entry (``mma_<precision>``) wins over a generic ``mma``."""
        keys = []
        if precision is not None:
            keys.append(f"{kind}_{self.compute_precision(precision)}")
        keys.append(kind)
        for k in keys:
            if k in self.efficiency:
                f = self.efficiency[k]
                return f.value, f.source
        return DEFAULT_EFFICIENCY[kind], "assumption"

    def bandwidth(self) -> float:
        """Bytes/s of memory the planner assumes (datasheet x efficiency)."""
        eff, _ = self.efficiency_factor("memory")
        return self.memory_bandwidth_tbs.value * 1e12 * eff

    def summary(self) -> str:
        lines = [f"{self.display_name} [{self.key}] ({self.arch})",
                 f"  memory: {self.memory_gb.value:g} GB ({self.memory_gb.cite()})",
                 f"  bandwidth: {self.memory_bandwidth_tbs.value:g} TB/s ({self.memory_bandwidth_tbs.cite()})"]
        for p, f in self.peak_tflops.items():
            lines.append(f"  {p}: {f.value:g} TFLOPS ({f.cite()})")
        lines.append(f"  exp unit: {self.exp_tops.value:g} Tops/s ({self.exp_tops.cite()})")
        for k, f in self.measured.items():
            lines.append(f"  measured {k}: {f.value:g} ({f.cite()})")
        for k, f in self.efficiency.items():
            lines.append(f"  efficiency {k}: {f.value:.3f} ({f.cite()})")
        return "\n".join(lines)


def _parse_spec(key: str, raw: dict) -> HardwareSpec:
    where = f"hardware.json[{key}]"
    required = ("display_name", "vendor", "arch", "sm_count", "memory_gb", "memory_bandwidth_tbs",
                "peak_tflops", "simt_fp32_tflops", "exp_tops")
    missing = [r for r in required if r not in raw]
    if missing:
        raise ValueError(f"{where}: missing {missing}")
    peaks = {}
    for p, f in raw["peak_tflops"].items():
        if p not in FORMATS:
            raise ValueError(f"{where}.peak_tflops: unknown precision {p!r}")
        peaks[p] = Figure.parse(f, f"{where}.peak_tflops.{p}")
    return HardwareSpec(
        key=key, display_name=raw["display_name"], vendor=raw["vendor"], arch=raw["arch"],
        sm_count=int(raw["sm_count"]),
        memory_gb=Figure.parse(raw["memory_gb"], f"{where}.memory_gb"),
        memory_bandwidth_tbs=Figure.parse(raw["memory_bandwidth_tbs"], f"{where}.memory_bandwidth_tbs"),
        peak_tflops=peaks,
        simt_fp32_tflops=Figure.parse(raw["simt_fp32_tflops"], f"{where}.simt_fp32_tflops"),
        exp_tops=Figure.parse(raw["exp_tops"], f"{where}.exp_tops"),
        measured={k: Figure.parse(v, f"{where}.measured.{k}") for k, v in raw.get("measured", {}).items()},
        efficiency={k: Figure.parse(v, f"{where}.efficiency.{k}") for k, v in raw.get("efficiency", {}).items()},
        aliases=tuple(a.lower() for a in raw.get("aliases", ())),
    )


@lru_cache(maxsize=1)
def _registry() -> Dict[str, HardwareSpec]:
    path = os.path.join(DATA_DIR, "hardware.json")
    with open(path) as f:
        raw = json.load(f)
    return {k: _parse_spec(k, v) for k, v in raw.items() if not k.startswith("_")}


def list_hardware() -> Tuple[str, ...]:
    return tuple(_registry())


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def get_hardware(name) -> HardwareSpec:
    """Look a chip up by key or alias (case-insensitive; '-', '_' and ' ' equivalent).
    A `HardwareSpec` passes through.  Unknown names raise ValueError listing the known."""
    if isinstance(name, HardwareSpec):
        return name
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"hardware must be a non-empty name, got {name!r}")
    reg = _registry()
    n = _norm(name)
    for key, spec in reg.items():
        if n == _norm(key) or n in (_norm(a) for a in spec.aliases):
            return spec
    raise ValueError(f"unknown hardware {name!r}; known: {', '.join(reg)} "
                     f"(aliases: {', '.join(a for s in reg.values() for a in s.aliases)})")


def hardware_for_device_name(device_name: str) -> Optional[HardwareSpec]:
    """Map a runtime device name (``torch.cuda.get_device_name()``) to a registry entry,
    or None.  PCIe / NVL variants of the H100 are not the SXM part and map to None."""
    n = device_name.lower()
    if "h100" in n:
        return None if ("pcie" in n or "nvl" in n) else get_hardware("h100_sxm")
    for token, key in (("h200", "h200"), ("b200", "b200"), ("gb10", "gb10"), ("a100", "a100"),
                       ("m1 max", "m1_max"), ("m2 max", "m2_max"), ("m3 max", "m3_max"),
                       ("m4 max", "m4_max")):
        if token in n:
            return get_hardware(key)
    return None
