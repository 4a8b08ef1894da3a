"""flash_quant.quantize (this module: quantization): a float tensor to a QuantizedTensor, through the quantize op."""
from __future__ import annotations

from typing import Union

import torch

from . import ops
from ._checks import check_float_tensor
from .config import Granularity, OperandConfig, PerTensor, PerToken, Precision, Strategy
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
      smooth: subtract the per-channel mean over dim -2 first (kept in `.mean`).
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


def quantize_codes(x: torch.Tensor, cfg: OperandConfig, rotate: bool = False):
    """The quantize op's (data, scale, zero_point, mean) for `x`, Hadamard-rotated first
    when `rotate` (by the op: the CUDA kernels rotate each tile as they load it, so no
    rotated copy of x is written). The attention call's per-call path: it needs the
    tensors only, not a QuantizedTensor around them."""
    g = cfg.granularity
    rank = x.dim()
    if g.name in ("per_head",) and rank < 3:
        raise ValueError(f"per_head granularity needs a tensor of rank >= 3, got rank {rank}")
    if (g.name in ("per_block", "per_channel") or cfg.smooth) and rank < 2:
        raise ValueError(f"{g.name if not cfg.smooth else 'smoothing'} needs a tensor of rank >= 2, got rank {rank}")
    if cfg.precision is Precision.INT4 and x.shape[-1] % 2:
        raise ValueError(f"INT4 packs two values per byte: the last dim must be even, got {x.shape[-1]}")
    if cfg.scale_search == "mse":  # (the search works on float tensors: rotate them here)
        return _quantize_searched(_rotate(x) if rotate else x, cfg)
    return ops.quantize(x, cfg.precision.value, g.name, g.block_size, cfg.strategy.value, cfg.smooth, rotate)


def _quantize_searched(x: torch.Tensor, cfg: OperandConfig):
    """Smoothing in torch, the clip search of scales.mse_scale, then the rounding op."""
    g, prec = cfg.granularity, cfg.precision.value
    xf = x.float()
    # The same refusal as ops.quantize: the search would otherwise pick a scale from the
    # finite values and quantize inf / NaN to clamped codes (silent garbage, issue 15).
    if not bool(torch.isfinite(xf).all()):
        raise ValueError("quantize: x contains non-finite values (inf or nan)")
    mean = xf.mean(dim=-2, keepdim=True) if cfg.smooth else xf.new_empty((0,))
    if cfg.smooth:
        xf = xf - mean
    scale = mse_scale(xf, prec, g.name, g.block_size)
    data = ops.quantize_with_scale(xf, scale, None, prec, g.block_size)
    return data, scale, torch.zeros_like(scale, dtype=torch.int32), mean
