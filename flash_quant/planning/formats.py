"""Number formats known to the planner, without importing torch.

The planner reasons about more formats than the attention kernels implement: besides the
kernel precisions of `flash_quant.config.Precision` it knows the 4-bit float storage
formats NVFP4 and MXFP4 (E2M1 elements with block scales).  Everything here is plain data
so that `flash-quant recommend` starts without importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from ..config import QUANTIZED_PRECISIONS, Precision

__all__ = ["FormatInfo", "FORMATS", "format_info", "normalize_precision", "storage_bits"]


@dataclass(frozen=True)
class FormatInfo:
    name: str
    bits: int                     # bits per element of the data
    kind: str                     # "float", "int" or "float4-block"
    block_size: int = 0           # elements sharing one block scale (0: none)
    block_scale_bits: int = 0     # bits of that block scale
    max_value: float = 0.0        # largest finite magnitude of the element format
    # Precisions tried, in order, when a chip has no native matrix unit for this one:
    # the operand is dequantized to the first precision the chip has.
    compute_fallback: Tuple[str, ...] = ()

    def bits_per_element(self, group_size: int = 0, scale_bits: int = 0) -> float:
        """Average storage bits per element including block scales, plus an optional
        extra scale of `scale_bits` shared by `group_size` elements (e.g. an fp16 weight
        scale per 128-element group for INT4 weights)."""
        b = float(self.bits)
        if self.block_size:
            b += self.block_scale_bits / self.block_size
        if group_size and scale_bits:
            b += scale_bits / group_size
        return b


# What each flash_quant precision computes in where the hardware lacks it.
_QUANTIZED_FALLBACK = {"fp8_e4m3": ("fp16", "bf16", "fp32"), "fp8_e5m2": ("fp16", "bf16", "fp32"),
                       "int8": ("fp16", "fp32"), "int4": ("int8", "fp16", "fp32")}

FORMATS: Dict[str, FormatInfo] = {
    "fp32": FormatInfo("fp32", 32, "float", max_value=3.4028234663852886e38),
    "bf16": FormatInfo("bf16", 16, "float", max_value=3.3895313892515355e38,
                       compute_fallback=("fp16", "fp32")),
    "fp16": FormatInfo("fp16", 16, "float", max_value=65504.0, compute_fallback=("fp32",)),
    # The flash_quant precisions: bits and largest magnitude from the Precision table.
    **{p.value: FormatInfo(p.value, p.bits, "int" if p.is_integer else "float", max_value=p.qmax,
                           compute_fallback=_QUANTIZED_FALLBACK[p.value]) for p in map(Precision, QUANTIZED_PRECISIONS)},
    # NVFP4: E2M1 elements, one E4M3 scale per 16 elements (+ one fp32 scale per tensor).
    "nvfp4": FormatInfo("nvfp4", 4, "float4-block", block_size=16, block_scale_bits=8,
                        max_value=6.0, compute_fallback=("fp8_e4m3", "fp16", "fp32")),
    # MXFP4 (OCP MX v1.0): E2M1 elements, one E8M0 power-of-two scale per 32 elements.
    "mxfp4": FormatInfo("mxfp4", 4, "float4-block", block_size=32, block_scale_bits=8,
                        max_value=6.0, compute_fallback=("fp8_e4m3", "fp16", "fp32")),
}

_ALIASES = {
    "float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
    "fp8": "fp8_e4m3", "e4m3": "fp8_e4m3", "fp8e4m3": "fp8_e4m3", "float8_e4m3fn": "fp8_e4m3",
    "e5m2": "fp8_e5m2", "fp8e5m2": "fp8_e5m2", "float8_e5m2": "fp8_e5m2",
    "nvfp4_kv": "nvfp4", "fp4": "nvfp4",
}


def normalize_precision(name) -> str:
    """Canonical precision name for `name` (a string, a `Precision` enum member or any
    object whose `.value` is such a string).  Raises ValueError naming the known ones."""
    raw = getattr(name, "value", name)
    if not isinstance(raw, str):
        raise ValueError(f"precision must be a string, got {type(name).__name__}: {name!r}")
    key = raw.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in FORMATS:
        raise ValueError(
            f"unknown precision {raw!r}; known: {', '.join(FORMATS)} "
            f"(aliases: {', '.join(sorted(_ALIASES))})")
    return key


def format_info(name) -> FormatInfo:
    return FORMATS[normalize_precision(name)]


def storage_bits(name, group_size: int = 0, scale_bits: int = 0) -> float:
    """Average bits per stored element of `name`, block scales included."""
    return format_info(name).bits_per_element(group_size, scale_bits)
