"""Dynamic quantization: scales computed per call from the statistics of the activation.

`DynamicQuantizer.quantize(x)` chooses a clipping range per group (per tensor, head,
token, block of tokens or channel) with one of three calibrations,

* ``absmax``: the group's largest magnitude (no clipping);
* ``percentile``: the p-th percentile of |x| in the group (default 99.9): clips the tail;
* ``mse_optimal``: the clip c = r * absmax, r on a grid, that minimises the group's
  reconstruction error ||x - dequant(quant(x))||^2 (rounding against clipping error);

optionally smooths the range over calls with an exponential moving average, measures the
group outliers, and, when they exceed a threshold, falls back to 16-bit for that call
(`result.fallback`, `result.metadata`, `quantizer.counters`).

The codes come from the core op `quantize_with_scale` (and go back through `dequantize`)
with the scales chosen here, so the output layout is docs/op_contract.md's (data dtype,
INT4 nibble order, scale and zero_point shapes): a result converts to a
`flash_quant.QuantizedTensor` (`to_quantized_tensor()`) and can be fed to
`flash_quant.attention`. The outlier statistic is the core's (flash_quant.outliers).

Graph capture: quantization without fallback is pure tensor code (no host sync). The
fallback decision reads one scalar on the host (``.item()``): a sync per call, and a graph
break under torch.compile.  Use ``fallback=False`` inside compiled regions.

The 4-bit float storage formats NVFP4 and MXFP4 are `quantize_nvfp4` / `quantize_mxfp4`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from .. import ops
from ..config import QUANTIZED_PRECISIONS, Precision
from ..outliers import granularity_name, outlier_ratio
from ..scales import mse_scale, round_trip

__all__ = [
    "DynamicQuantConfig", "DynamicQuantizer", "DynamicQuantResult", "ActivationStats",
    "outlier_ratio", "choose_clip", "fake_quantize", "QMAX",
    "FP4Tensor", "quantize_nvfp4", "quantize_mxfp4", "E2M1_VALUES", "HAS_FLOAT4_DTYPE",
]

CALIBRATIONS = ("absmax", "percentile", "mse_optimal")
PRECISIONS = QUANTIZED_PRECISIONS
#: Symmetric range of each precision (symmetric integers use [-qmax, qmax]): the op contract's.
QMAX = ops.QMAX
_QRANGE = {p: (Precision(p).qmin, Precision(p).qmax) for p in PRECISIONS if Precision(p).is_integer}
_FP8 = {p: Precision(p).storage_dtype for p in PRECISIONS if not Precision(p).is_integer}
#: E2M1's largest magnitude (NVFP4 / MXFP4 elements) and E8M0's exponent bias (MXFP4 scales).
_E2M1_MAX = 6.0
_E8M0_BIAS = 127.0

#: Default fallback thresholds on `outlier_ratio` (see its docstring): a group whose
#: largest value is this many times the Gaussian expectation of the maximum.  Clean
#: Gaussian data scores about 1-1.5 (tested).  Integers pay for an outlier with resolution
#: over the whole group (INT8 at ratio 4 on 1M elements: about 4 * 5.3 / 440 = 5 % of
#: sigma as rounding error, vs ~1 % clean); floats only with dynamic range (E4M3 keeps 3 mantissa bits over 2^-6..448, so
#: ratio 64 still leaves the bulk of a Gaussian group in the normal range).
DEFAULT_OUTLIER_THRESHOLD = {"int4": 2.5, "int8": 4.0, "fp8_e4m3": 64.0, "fp8_e5m2": 256.0}


def _norm_granularity(g) -> Tuple[str, int]:
    """(name, block_size) from a string or a flash_quant.config Granularity."""
    return granularity_name(g)


def _norm_precision(p) -> str:
    p = getattr(p, "value", p)
    if p not in PRECISIONS:
        raise ValueError(f"dynamic quantization precision must be one of {PRECISIONS}, got {p!r} "
                         "(NVFP4 / MXFP4: use quantize_nvfp4 / quantize_mxfp4)")
    return p


# --------------------------------------------------------------------------- grouping
def _groups(x: torch.Tensor, gran: str, block: int) -> torch.Tensor:
    """A view (or padded copy) of x as (*groups, n): one row per scale group.  per_block
    pads the last block with NaN (the statistics below ignore NaN)."""
    if gran == "per_tensor":
        return x.reshape(1, -1)
    if gran == "per_token":
        return x
    if gran == "per_head":
        if x.dim() < 3:
            raise ValueError(f"per_head granularity needs rank >= 3, got shape {tuple(x.shape)}")
        return x.reshape(*x.shape[:-2], -1)
    if x.dim() < 2:
        raise ValueError(f"{gran} granularity needs rank >= 2, got shape {tuple(x.shape)}")
    if gran == "per_channel":
        return x.transpose(-1, -2)
    s, d = x.shape[-2], x.shape[-1]
    nb = -(-s // block)
    if nb * block != s:
        pad = x.new_full((*x.shape[:-2], nb * block - s, d), float("nan"))
        x = torch.cat([x, pad], dim=-2)
    return x.reshape(*x.shape[:-2], nb, block * d)


def _to_scale_shape(v: torch.Tensor, x_shape, gran: str) -> torch.Tensor:
    """Per-group values (shape = groups) to the contract's scale shape."""
    rank = len(x_shape)
    if gran == "per_tensor":
        return v.reshape((1,) * rank)
    if gran == "per_channel":
        return v.unsqueeze(-2)
    if gran == "per_head":
        return v.unsqueeze(-1).unsqueeze(-1)
    return v.unsqueeze(-1)


def _nan_safe_abs(g: torch.Tensor) -> torch.Tensor:
    a = g.abs()
    return torch.where(torch.isnan(a), torch.zeros_like(a), a)


@dataclass(frozen=True)
class ActivationStats:
    """Summary statistics of one activation (host floats: computing them syncs)."""

    absmax: float
    mean: float
    std: float
    percentile_99: float
    percentile_999: float
    outlier_ratio: float
    granularity: str
    shape: Tuple[int, ...]

    @classmethod
    def from_tensor(cls, x: torch.Tensor, granularity="per_token", block_size: int = 64,
                    max_samples: int = 1 << 20) -> "ActivationStats":
        """Percentiles are taken on an evenly strided subsample of at most `max_samples`
        elements (exact when the tensor is smaller)."""
        xf = x.detach().float()
        flat = xf.reshape(-1)
        step = max(1, flat.numel() // max_samples)
        sample = flat[::step].abs()
        n = sample.numel()

        def pct(p):
            return sample.kthvalue(max(1, min(n, math.ceil(p / 100.0 * n)))).values

        vals = torch.stack([flat.abs().amax(), flat.mean(), flat.std() if flat.numel() > 1 else flat.new_zeros(()),
                            pct(99.0), pct(99.9), outlier_ratio(xf, granularity, block_size)])
        a, m, s, p99, p999, orat = vals.tolist()
        name, _ = _norm_granularity(granularity)
        return cls(a, m, s, p99, p999, orat, name, tuple(x.shape))

    @property
    def dynamic_range(self) -> float:
        """The 99.9th percentile magnitude: the range a percentile clip would keep."""
        return self.percentile_999


# --------------------------------------------------------------------------- quantization math
def _round_to_format(y: torch.Tensor, zp: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """x / scale (`y`) onto an asymmetric integer grid, ``clamp(round(y) + zp)`` as the op
    contract says (the symmetric formats go through scales.round_trip)."""
    return (torch.round(y) + zp).clamp(lo, hi)        # torch.round is half-to-even


def _params_from_range(lo_r: torch.Tensor, hi_r: torch.Tensor, precision: str, asymmetric: bool):
    """(scale, zero_point as float) from a clipping range; all-zero groups get scale 1."""
    if asymmetric:
        qmin, qmax = _QRANGE[precision]
        lo_r, hi_r = lo_r.clamp_max(0.0), hi_r.clamp_min(0.0)
        span = hi_r - lo_r
        scale = torch.where(span > 0, span / (qmax - qmin), torch.ones_like(span))
        zp = torch.round(qmin - lo_r / scale).clamp(qmin, qmax)
        return scale, zp
    amax = torch.maximum(hi_r.abs(), lo_r.abs())
    scale = torch.where(amax > 0, amax / QMAX[precision], torch.ones_like(amax))
    return scale, torch.zeros_like(scale)


def fake_quantize(g: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, precision: str,
                  asymmetric: bool) -> torch.Tensor:
    """dequant(quant(g)) with per-group (trailing-dim broadcast) scale and zero point.
    Symmetric: the core's round trip (flash_quant.scales, the one mse_scale searches with)."""
    if not asymmetric:
        return round_trip(g, scale, precision)
    lo, hi = _QRANGE[precision]
    q = _round_to_format(g / scale, zp, lo, hi)
    return (q - zp) * scale


def choose_clip(g: torch.Tensor, calibration: str, precision: str, asymmetric: bool,
                percentile: float = 99.9, grid: int = 40, min_ratio: float = 0.2):
    """Clipping range (lo, hi) per group row of `g` (shape (*groups, n), NaN = padding)."""
    if calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {calibration!r}; expected one of {CALIBRATIONS}")
    valid = ~torch.isnan(g)
    gz = torch.where(valid, g, torch.zeros_like(g))
    if asymmetric:
        hi = torch.where(valid, g, torch.full_like(g, -float("inf"))).amax(-1).clamp_min(0.0)
        lo = torch.where(valid, g, torch.full_like(g, float("inf"))).amin(-1).clamp_max(0.0)
    else:
        hi = _nan_safe_abs(g).amax(-1)
        lo = -hi
    if calibration == "absmax":
        return lo, hi
    if calibration == "percentile":
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        n = g.shape[-1]
        has_pad = not bool(valid.all()) if g.numel() else False
        if asymmetric:
            if has_pad:
                hi_p = torch.nanquantile(g, percentile / 100.0, dim=-1)
                lo_p = torch.nanquantile(g, 1.0 - percentile / 100.0, dim=-1)
            else:
                k_hi = max(1, min(n, math.ceil(percentile / 100.0 * n)))
                k_lo = max(1, min(n, math.floor((1.0 - percentile / 100.0) * n) + 1))
                hi_p, lo_p = g.kthvalue(k_hi, dim=-1).values, g.kthvalue(k_lo, dim=-1).values
            return lo_p.clamp_max(0.0), hi_p.clamp_min(0.0)
        a = torch.where(valid, g.abs(), torch.full_like(g, float("nan")))
        if has_pad:
            p = torch.nanquantile(a, percentile / 100.0, dim=-1)
        else:
            p = a.kthvalue(max(1, min(n, math.ceil(percentile / 100.0 * n))), dim=-1).values
        return -p, p
    # mse_optimal: grid search of r in [min_ratio, 1] on the clip r * range.
    if grid < 2 or not 0.0 < min_ratio < 1.0:
        raise ValueError(f"mse_optimal needs grid >= 2 and 0 < min_ratio < 1, got {grid}, {min_ratio}")
    ratios = torch.linspace(min_ratio, 1.0, grid).tolist()
    if not asymmetric:
        # The core's search (scales.mse_scale), one group per row; padding enters as
        # zeros, which every scale represents exactly. All-zero groups keep a zero range.
        scale = mse_scale(gz, precision, "per_token", 1, clip_ratios=ratios).squeeze(-1)
        best_hi = torch.where(hi > 0, scale * QMAX[precision], hi)
        return -best_hi, best_hi
    best_err = None
    best_r = torch.ones_like(hi)
    for r in ratios:
        scale, zp = _params_from_range(lo * r, hi * r, precision, asymmetric)
        rec = fake_quantize(gz, scale.unsqueeze(-1), zp.unsqueeze(-1), precision, asymmetric)
        err = torch.where(valid, (rec - gz) ** 2, torch.zeros_like(gz)).sum(-1)
        if best_err is None:
            best_err, best_r = err, torch.full_like(hi, r)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_r = torch.where(better, torch.full_like(hi, r), best_r)
    return lo * best_r, hi * best_r


# --------------------------------------------------------------------------- config / result
@dataclass(frozen=True)
class DynamicQuantConfig:
    """Parameters of `DynamicQuantizer` (all documented in docs/planning.md).

    precision: int8 | int4 | fp8_e4m3 | fp8_e5m2.
    granularity: per_tensor | per_head | per_token | per_block | per_channel (or a
      flash_quant.config granularity object); block_size for per_block.
    strategy: symmetric | asymmetric (integers only).
    calibration: absmax | percentile | mse_optimal; percentile in (0, 100];
      mse_grid / mse_min_ratio: the clip ratios searched by mse_optimal.
    fallback: fall back to 16 bits when `outlier_ratio` > outlier_threshold (None: the
      precision's entry of DEFAULT_OUTLIER_THRESHOLD).  fallback_dtype None picks bf16 for
      bf16 inputs or values beyond the fp16 range, else fp16.
    ema_momentum: None (off) or m in [0, 1): range_t = m * range_{t-1} + (1 - m) * range
      (per operator name; reset when the group shape changes).
    measure_error: also report the relative L2 reconstruction error in the metadata.
    """

    precision: str = "int8"
    granularity: object = "per_token"
    block_size: int = 64
    strategy: str = "symmetric"
    calibration: str = "absmax"
    percentile: float = 99.9
    mse_grid: int = 40
    mse_min_ratio: float = 0.2
    fallback: bool = True
    outlier_threshold: Optional[float] = None
    fallback_dtype: Optional[torch.dtype] = None
    ema_momentum: Optional[float] = None
    measure_error: bool = False

    def __post_init__(self):
        object.__setattr__(self, "precision", _norm_precision(self.precision))
        name, block = _norm_granularity(self.granularity)
        if not isinstance(self.granularity, str):
            object.__setattr__(self, "block_size", block)
        object.__setattr__(self, "granularity", name)
        strat = getattr(self.strategy, "value", self.strategy)
        if strat not in ("symmetric", "asymmetric"):
            raise ValueError(f"strategy must be 'symmetric' or 'asymmetric', got {self.strategy!r}")
        if strat == "asymmetric" and self.precision in _FP8:
            raise ValueError("asymmetric strategy needs int8 or int4 precision (fp8 is symmetric only)")
        object.__setattr__(self, "strategy", strat)
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"unknown calibration {self.calibration!r}; expected one of {CALIBRATIONS}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.ema_momentum is not None and not 0.0 <= self.ema_momentum < 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1) or None, got {self.ema_momentum}")
        if self.outlier_threshold is not None and not self.outlier_threshold > 0:
            raise ValueError(f"outlier_threshold must be > 0, got {self.outlier_threshold}")
        if self.fallback_dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"fallback_dtype must be torch.float16, torch.bfloat16 or None, got {self.fallback_dtype}")

    @property
    def threshold(self) -> float:
        return self.outlier_threshold if self.outlier_threshold is not None else DEFAULT_OUTLIER_THRESHOLD[self.precision]


@dataclass
class DynamicQuantResult:
    """One call's output.  Quantized: data / scale / zero_point in the op contract's
    layout.  Fallback: `data` is the 16-bit tensor, scale and zero_point are None."""

    data: torch.Tensor
    scale: Optional[torch.Tensor]
    zero_point: Optional[torch.Tensor]
    precision: str
    granularity: str
    block_size: int
    strategy: str
    orig_shape: Tuple[int, ...]
    orig_dtype: torch.dtype
    metadata: Dict[str, object] = field(default_factory=dict)

    @property
    def fallback(self) -> bool:
        return bool(self.metadata.get("fallback", False))

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        dtype = dtype or self.orig_dtype
        if self.scale is None:
            return self.data.to(dtype)
        mean = self.scale.new_empty((0,))
        return ops.dequantize(self.data, self.scale, self.zero_point, mean, self.precision, self.block_size, dtype)

    def to_quantized_tensor(self):
        """A `flash_quant.QuantizedTensor` of this result (refused for a fallback)."""
        if self.scale is None:
            raise ValueError("this call fell back to 16 bits; there is no quantized tensor to convert "
                             f"(outlier_ratio {self.metadata.get('outlier_ratio')})")
        from ..config import PerBlock, PerChannel, PerHead, PerTensor, PerToken, Precision, Strategy
        from ..quantized_tensor import QuantizedTensor
        gran = {"per_tensor": PerTensor(), "per_head": PerHead(), "per_token": PerToken(),
                "per_channel": PerChannel(), "per_block": PerBlock(self.block_size)}[self.granularity]
        return QuantizedTensor(self.data, self.scale, self.zero_point, precision=Precision(self.precision),
                               strategy=Strategy(self.strategy), granularity=gran,
                               orig_shape=self.orig_shape, orig_dtype=self.orig_dtype)


class DynamicQuantizer:
    """Per-call quantization with calibration, EMA smoothing, outlier fallback and counters.

    counters: {"calls", "fallbacks", "by_operator": {name: {"calls", "fallbacks"}}}.
    """

    def __init__(self, config: Optional[DynamicQuantConfig] = None, **kwargs):
        if config is not None and kwargs:
            raise ValueError("pass either a DynamicQuantConfig or keyword arguments, not both")
        self.config = config if config is not None else DynamicQuantConfig(**kwargs)
        self._ema: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.counters = {"calls": 0, "fallbacks": 0, "by_operator": {}}

    def reset(self) -> None:
        self._ema.clear()
        self.counters = {"calls": 0, "fallbacks": 0, "by_operator": {}}

    def _count(self, name: str, fallback: bool) -> None:
        self.counters["calls"] += 1
        op = self.counters["by_operator"].setdefault(name, {"calls": 0, "fallbacks": 0})
        op["calls"] += 1
        if fallback:
            self.counters["fallbacks"] += 1
            op["fallbacks"] += 1

    def quantize(self, x: torch.Tensor, operator: str = "default") -> DynamicQuantResult:
        cfg = self.config
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating torch.Tensor, got {type(x).__name__}"
                            + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
        if x.dim() < 1 or x.numel() == 0:
            raise ValueError(f"x must be non-empty with rank >= 1, got shape {tuple(x.shape)}")
        if cfg.precision == "int4" and x.shape[-1] % 2:
            raise ValueError(f"INT4 packs two values per byte: the last dim must be even, got {x.shape[-1]}")
        if cfg.fallback and not bool(torch.isfinite(x).all()):   # already syncing for the decision
            raise ValueError("x has non-finite values (inf/nan); dynamic quantization needs finite input")
        xf = x.detach().float()
        gran, block = cfg.granularity, cfg.block_size
        asym = cfg.strategy == "asymmetric"
        meta: Dict[str, object] = {"operator": operator, "requested_precision": cfg.precision,
                                   "calibration": cfg.calibration, "granularity": gran}
        ratio_t = outlier_ratio(xf, gran, block)
        if cfg.fallback:
            ratio = float(ratio_t)            # host sync: the data-dependent decision
            meta.update(outlier_ratio=ratio, outlier_threshold=cfg.threshold)
            if ratio > cfg.threshold:
                dtype = cfg.fallback_dtype
                if dtype is None:
                    too_big = float(xf.abs().amax()) > 65504.0
                    dtype = torch.bfloat16 if (x.dtype == torch.bfloat16 or too_big) else torch.float16
                meta.update(fallback=True, precision="bf16" if dtype == torch.bfloat16 else "fp16",
                            reason=f"outlier_ratio {ratio:.2f} > threshold {cfg.threshold:g}")
                self._count(operator, True)
                return DynamicQuantResult(x.detach().to(dtype), None, None, meta["precision"], gran, block,
                                          cfg.strategy, tuple(x.shape), x.dtype, meta)
        else:
            meta["outlier_ratio_tensor"] = ratio_t
        g = _groups(xf, gran, block)
        lo, hi = choose_clip(g, cfg.calibration, cfg.precision, asym, cfg.percentile, cfg.mse_grid,
                             cfg.mse_min_ratio)
        if cfg.ema_momentum is not None:
            prev = self._ema.get(operator)
            if prev is not None and prev[0].shape == lo.shape:
                m = cfg.ema_momentum
                lo, hi = m * prev[0] + (1 - m) * lo, m * prev[1] + (1 - m) * hi
                meta["ema"] = "applied"
            else:
                meta["ema"] = "initialised" if prev is None else "reset (group shape changed)"
            self._ema[operator] = (lo.detach(), hi.detach())
        scale, zp = _params_from_range(lo, hi, cfg.precision, asym)
        scale_t = _to_scale_shape(scale, xf.shape, gran).float().contiguous()
        zp_t = _to_scale_shape(zp, xf.shape, gran).to(torch.int32).contiguous()
        # The rounding and the storage (INT4 packing, fp8 dtypes) are the core op's.
        data = ops.quantize_with_scale(xf, scale_t, zp_t if asym else None, cfg.precision, block)
        meta.update(fallback=False, precision=cfg.precision)
        result = DynamicQuantResult(data, scale_t, zp_t, cfg.precision, gran, block, cfg.strategy,
                                    tuple(x.shape), x.dtype, meta)
        if cfg.measure_error:
            err = (result.dequantize(torch.float32) - xf).norm() / xf.norm().clamp_min(1e-30)
            meta["rel_error"] = float(err)
        self._count(operator, False)
        return result

    __call__ = quantize


# --------------------------------------------------------------------------- FP4 (E2M1) formats
#: Magnitudes of the E2M1 codes 0..7 (code 8..15: the same with the sign bit set).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: torch 2.13 has the float4 storage dtype (two E2M1 values per byte) but no conversions to
#: or from it: encoding and decoding are done here, the bytes are then viewed as it.
HAS_FLOAT4_DTYPE = hasattr(torch, "float4_e2m1fn_x2")
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _encode_e2m1(y: torch.Tensor) -> torch.Tensor:
    """float32 values (already scaled into [-6, 6]) to 4-bit codes, round to nearest with
    ties to the even code (an even mantissa bit), saturating at +-6."""
    a = y.abs().clamp_max(6.0)
    mids = torch.tensor(_E2M1_MIDPOINTS, dtype=a.dtype, device=a.device)
    code = torch.bucketize(a, mids, right=False)          # a <= mid -> lower code
    # bucketize(right=False) sends a tie (a == mid) to the lower code; E2M1 ties go to the
    # code with mantissa bit 0 (even code).
    tie = (a.unsqueeze(-1) == mids).any(-1)
    code = torch.where(tie & (code % 2 == 1), code + 1, code)
    sign = ((y < 0) & (code > 0)).to(torch.uint8) << 3
    return code.to(torch.uint8) | sign


def _decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    mag = lut[(codes & 0x7).long()]
    return torch.where((codes & 0x8) > 0, -mag, mag)


def _pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.view(torch.float4_e2m1fn_x2) if HAS_FLOAT4_DTYPE else packed


def _unpack_fp4(data: torch.Tensor) -> torch.Tensor:
    b = data.view(torch.uint8)
    return torch.stack([b & 0xF, b >> 4], dim=-1).reshape(*b.shape[:-1], b.shape[-1] * 2)


@dataclass
class FP4Tensor:
    """NVFP4 / MXFP4 storage: `data` packs two E2M1 codes per byte along the last dim
    (element 2i in the low nibble), viewed as torch.float4_e2m1fn_x2 when torch has it;
    `block_scale` holds one scale per `block` elements of the last dim (float8_e4m3fn for
    NVFP4, float8_e8m0fnu for MXFP4); `tensor_scale` is NVFP4's fp32 second-level scale
    (1.0 for MXFP4)."""

    data: torch.Tensor
    block_scale: torch.Tensor
    tensor_scale: torch.Tensor
    format: str
    block: int
    orig_shape: Tuple[int, ...]
    orig_dtype: torch.dtype

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        vals = _decode_e2m1(_unpack_fp4(self.data))
        s = self.block_scale.float().repeat_interleave(self.block, dim=-1)
        return (vals * s * self.tensor_scale).to(dtype or self.orig_dtype).reshape(self.orig_shape)

    @property
    def bits_per_element(self) -> float:
        return 4.0 + 8.0 / self.block


def _blocks(x: torch.Tensor, block: int, fmt: str) -> torch.Tensor:
    if x.dim() < 1 or x.shape[-1] % block:
        raise ValueError(f"{fmt} quantizes blocks of {block} elements along the last dim: its size "
                         f"({x.shape[-1] if x.dim() else 'scalar'}) must be a multiple of {block}")
    return x.detach().float().reshape(*x.shape[:-1], x.shape[-1] // block, block)


def quantize_nvfp4(x: torch.Tensor) -> FP4Tensor:
    """NVFP4: E2M1 values, one float8_e4m3fn scale per 16 consecutive elements of the last
    dim, and one fp32 scale for the tensor chosen so that the largest block scale is 448
    (``tensor_scale = absmax / (448 * 6)``)."""
    xb = _blocks(x, 16, "NVFP4")
    amax = xb.abs().amax()
    e4m3 = Precision.FP8_E4M3
    tscale = torch.where(amax > 0, amax / (e4m3.qmax * _E2M1_MAX), torch.ones_like(amax))
    bmax = xb.abs().amax(-1)
    bscale = (bmax / _E2M1_MAX / tscale).clamp(max=e4m3.qmax).to(e4m3.storage_dtype)
    eff = bscale.float() * tscale
    eff_safe = torch.where(eff > 0, eff, torch.ones_like(eff))
    codes = _encode_e2m1(xb / eff_safe.unsqueeze(-1)).reshape(x.shape)
    return FP4Tensor(_pack_fp4(codes), bscale, tscale.float(), "nvfp4", 16, tuple(x.shape), x.dtype)


def quantize_mxfp4(x: torch.Tensor) -> FP4Tensor:
    """MXFP4 (OCP MX v1.0): E2M1 values, one power-of-two scale per 32 elements stored as
    float8_e8m0fnu, ``2^(floor(log2(block absmax)) - 2)`` (2 = E2M1's largest exponent);
    values beyond 6 after scaling saturate."""
    xb = _blocks(x, 32, "MXFP4")
    bmax = xb.abs().amax(-1)
    exp = torch.floor(torch.log2(bmax.clamp_min(2.0 ** -_E8M0_BIAS))) - 2.0
    exp = exp.clamp(-_E8M0_BIAS, _E8M0_BIAS)
    scale = torch.exp2(exp)
    codes = _encode_e2m1(xb / scale.unsqueeze(-1)).reshape(x.shape)
    e8m0 = (exp + _E8M0_BIAS).to(torch.uint8).view(torch.float8_e8m0fnu)
    one = torch.ones((), dtype=torch.float32, device=x.device)
    return FP4Tensor(_pack_fp4(codes), e8m0, one, "mxfp4", 32, tuple(x.shape), x.dtype)
