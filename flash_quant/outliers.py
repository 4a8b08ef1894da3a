"""The outlier statistic of a tensor's scale groups: how far a group's largest value sits
above what Gaussian data of the same spread would reach.

It decides whether quantizing pays: `config="auto"` (flash_quant.auto) reads it on Q, K
and V, and planning's DynamicQuantizer falls back to 16 bits on it. Groups are those of
the quantizer (flash_quant.groups), so the statistic speaks of the groups that share a scale.
"""
from __future__ import annotations

import math

import torch

from .groups import group_amax, reduce_groups, scale_shape

__all__ = ["GRANULARITIES", "granularity_name", "outlier_ratio"]

GRANULARITIES = ("per_tensor", "per_head", "per_token", "per_block", "per_channel")
#: Rank each granularity needs (its groups span the dims from -MIN_RANK on).
_MIN_RANK = {"per_tensor": 1, "per_token": 1, "per_head": 3, "per_block": 2, "per_channel": 2}


def granularity_name(granularity, block_size: int = 64):
    """(name, block_size) from a string or a flash_quant.config granularity object."""
    name = getattr(granularity, "name", granularity)
    block = getattr(granularity, "block_size", block_size)
    if isinstance(name, str):
        name = name.strip().lower()
    if name not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES} "
                         "(or a flash_quant.config granularity object)")
    return name, int(block)


def outlier_ratio(x: torch.Tensor, granularity="per_token", block_size: int = 64) -> torch.Tensor:
    """How far the largest value of any group sits above what clean Gaussian data of the
    same spread would reach (0-dim float32 tensor, computed without a host sync):

        ratio = max_g  absmax_g / (sigma_g * sqrt(2 ln N)),   sigma_g = mean(|x_g|) / sqrt(2/pi)

    N is the total element count: for Gaussian data the largest of N magnitudes grows like
    ``sigma * sqrt(2 ln N)``, so clean data scores about 1-1.5 for any granularity and
    size (tested).  sigma_g is the mean-absolute-value estimate of each group's spread
    (O(n), no sort), which one spike inflates far less than the RMS would.  The relative
    INT rounding error of a group is about ``ratio * sqrt(2 ln N) / (qmax * sqrt(12))``
    (times the group's sigma). NaN elements are left out of their group.
    """
    name, block = granularity_name(granularity, block_size)
    if x.dim() < _MIN_RANK[name]:
        raise ValueError(f"{name} granularity needs rank >= {_MIN_RANK[name]}, got shape {tuple(x.shape)}")
    xf = x.detach().float()
    valid = ~torch.isnan(xf)
    a = torch.where(valid, xf.abs(), torch.zeros_like(xf))
    gshape = scale_shape(xf.shape, name, block)
    count = reduce_groups(valid.float(), gshape, block).clamp_min(1.0)
    sigma = reduce_groups(a, gshape, block) / count / math.sqrt(2.0 / math.pi)
    amax = group_amax(a, gshape, block)
    n_total = max(2, x.numel())
    ratio = amax / (sigma * math.sqrt(2.0 * math.log(n_total))).clamp_min(1e-30)
    ratio = torch.where(amax > 0, ratio, torch.zeros_like(ratio))
    return ratio.amax()
