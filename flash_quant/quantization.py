"""flash_quant.quantize (this module: quantization): a float tensor to a QuantizedTensor, through the quantize op."""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import ops
from ._checks import check_float_tensor
from .config import Granularity, OperandConfig, PerTensor, PerToken, Precision, Strategy
from .key_stats import robust_center
from .quantized_tensor import QuantizedTensor
from .rotation import rotate as _rotate
from .scales import mse_scale

__all__ = ["quantize", "quantize_operand", "quantize_codes"]


def quantize(
    x: torch.Tensor,
    precision: Union[Precision, str] = Precision.INT8,
    granularity: Granularity = None,
    strategy: Union[Strategy, str] = Strategy.SYMMETRIC,
    *,
    smooth: bool = False,
    rotate: bool = False,
) -> QuantizedTensor:
    """Quantize `x` (fp32 / fp16 / bf16, any rank; last dim = channels, dim -2 = tokens).

    Args:
      precision: int8 | int4 | fp8_e4m3 | fp8_e5m2.
      granularity: PerTensor() | PerHead() | PerToken() | PerBlock(rows) | PerChannel();
        default PerToken(), or PerTensor() for the legacy strategy.
      strategy: symmetric | asymmetric (int8/int4) | legacy (per-tensor symmetric).
      smooth: subtract a per-channel centre over dim -2 first (kept in `.mean`): the median
        of block means (flash_quant.key_stats.robust_center), which a few outlier rows
        cannot drag away as they drag the plain mean.
      rotate: Hadamard-rotate along the last dim first (undone by dequantize()).
    Returns a QuantizedTensor whose dequantize() approximates x.
    """
    precision, strategy = Precision(precision), Strategy(strategy)
    if granularity is None:
        granularity = PerTensor() if strategy is Strategy.LEGACY else PerToken()
    cfg = OperandConfig(precision, strategy, granularity, smooth=smooth, rotate=rotate)
    if not cfg.quantized:
        raise ValueError(f"quantize needs a quantized precision (int8/int4/fp8_e4m3/fp8_e5m2), got {precision.value}")
    check_float_tensor("x", x, min_rank=1)
    return quantize_operand(x, cfg)


def quantize_operand(x: torch.Tensor, cfg: OperandConfig) -> QuantizedTensor:
    """Quantize with a validated OperandConfig (no value checks: this runs per call)."""
    data, scale, zero_point, mean = quantize_codes(x, cfg, rotate=cfg.rotate)
    return QuantizedTensor(
        data, scale, zero_point, precision=cfg.precision, strategy=cfg.strategy, granularity=cfg.granularity,
        orig_shape=tuple(x.shape), orig_dtype=x.dtype, mean=mean if cfg.smooth else None,
        rotated=cfg.rotate, check_values=False,
    )


def quantize_codes(x: torch.Tensor, cfg: OperandConfig, rotate: bool = False,
                   visible: Optional[torch.Tensor] = None):
    """The quantize op's (data, scale, zero_point, mean) for `x`, Hadamard-rotated first
    when `rotate` (by the op: the CUDA kernels rotate each tile as they load it, so no
    rotated copy of x is written). The attention call's per-call path: it needs the
    tensors only, not a QuantizedTensor around them.

    visible: for keys / values, bool broadcastable to x.shape[:-2] + (1, S), False for the
    rows no query may see (flash_quant.key_stats.visible_keys), or None. Those rows enter
    no statistic: not the smoothing centre, and not a scale whose group spans rows (they
    are quantized as the neutral value: the centre, or 0 unsmoothed)."""
    g = cfg.granularity
    rank = x.dim()
    if g.name in ("per_head",) and rank < 3:
        raise ValueError(f"per_head granularity needs a tensor of rank >= 3, got rank {rank}")
    if (g.name in ("per_block", "per_channel") or cfg.smooth) and rank < 2:
        raise ValueError(f"{g.name if not cfg.smooth else 'smoothing'} needs a tensor of rank >= 2, got rank {rank}")
    if cfg.precision is Precision.INT4 and x.shape[-1] % 2:
        raise ValueError(f"INT4 packs two values per byte: the last dim must be even, got {x.shape[-1]}")
    center = x_center = None
    if cfg.smooth:  # the centre in x's space, then in the quantized values' (rotated) one
        x_center = robust_center(x, visible)
        center = _rotate(x_center) if rotate else x_center
    if visible is not None and g.name in _ROW_SPANNING:  # (per_token: each row its own scale)
        x = _neutral_where_hidden(x, visible, x_center)
    if cfg.scale_search == "mse":  # (the search works on float tensors: rotate them here)
        return _quantize_searched(_rotate(x) if rotate else x, cfg, center)
    return ops.quantize(x, cfg.precision.value, g.name, g.block_size, cfg.strategy.value, cfg.smooth, rotate,
                        center)


#: Granularities whose scale groups span several rows (keys): a hidden row would enter them.
_ROW_SPANNING = ("per_tensor", "per_head", "per_block", "per_channel")


def _neutral_where_hidden(x: torch.Tensor, visible: torch.Tensor, x_center: Optional[torch.Tensor]):
    """x with the rows `visible` excludes replaced by the value that quantizes to 0 (the
    smoothing centre, or 0): a copy of x, made only on calls with a mask that can exclude
    rows. No gradient flows into those rows (attention gives them none anyway)."""
    fill = x.new_zeros(()) if x_center is None else x_center.to(x.dtype)
    return torch.where(visible.transpose(-1, -2), x, fill)


def _quantize_searched(x: torch.Tensor, cfg: OperandConfig, center: Optional[torch.Tensor]):
    """Smoothing by `center` in torch, the clip search of scales.mse_scale, then the
    rounding op."""
    g, prec = cfg.granularity, cfg.precision.value
    xf = x.float()
    # The same refusal as ops.quantize: the search would otherwise pick a scale from the
    # finite values and quantize inf / NaN to clamped codes (silent garbage, issue 15).
    if not bool(torch.isfinite(xf).all()):
        raise ValueError("quantize: x contains non-finite values (inf or nan)")
    mean = center if cfg.smooth else xf.new_empty((0,))
    if cfg.smooth:
        xf = xf - mean
    scale = mse_scale(xf, prec, g.name, g.block_size)
    data = ops.quantize_with_scale(xf, scale, None, prec, g.block_size)
    return data, scale, torch.zeros_like(scale, dtype=torch.int32), mean
