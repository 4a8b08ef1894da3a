"""Scale groups: which elements of a tensor share one scale, for each granularity.

A group tensor (scale, zero point) has the tensor's rank; each dim is either the
tensor's size, 1 (shared), or — for dim -2 under per_block — ceil(S / block_size).
"""
from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["scale_shape", "expand_groups", "reduce_groups", "group_amax"]


def scale_shape(shape, granularity: str, block_size: int) -> Tuple[int, ...]:
    """Shape of the scale tensor for a tensor of `shape` (see docs/op_contract.md)."""
    shape = tuple(shape)
    rank = len(shape)
    if granularity == "per_tensor":
        return (1,) * rank
    if granularity == "per_token":
        return shape[:-1] + (1,)
    if granularity == "per_head":
        return shape[:-2] + (1, 1)
    if granularity == "per_block":
        return shape[:-2] + (-(-shape[-2] // block_size), 1)
    if granularity == "per_channel":
        return shape[:-2] + (1, shape[-1])
    raise ValueError(f"unknown granularity {granularity!r}")


def _blocked(group_rows: int, rows: int) -> bool:
    return 1 < group_rows != rows


def expand_groups(t: torch.Tensor, shape, block_size: int) -> torch.Tensor:
    """Broadcast a group tensor to `shape`, expanding blocked rows."""
    if t.dim() >= 2 and _blocked(t.shape[-2], shape[-2]):
        t = t.repeat_interleave(block_size, dim=-2)[..., : shape[-2], :]
    return t.expand(shape)


def _fold_blocks(t: torch.Tensor, groups: int, block_size: int, fill: float) -> torch.Tensor:
    pad = groups * block_size - t.shape[-2]
    if pad:
        t = torch.nn.functional.pad(t, (0, 0, 0, pad), value=fill)
    return t.unflatten(-2, (groups, block_size))


def reduce_groups(t: torch.Tensor, group_shape, block_size: int) -> torch.Tensor:
    """Sum a full-shape tensor over each group (the adjoint of expand_groups)."""
    if t.dim() >= 2 and _blocked(group_shape[-2], t.shape[-2]):
        t = _fold_blocks(t, group_shape[-2], block_size, 0.0).sum(-2)
    return t.sum_to_size(group_shape)


def group_amax(t: torch.Tensor, group_shape, block_size: int) -> torch.Tensor:
    """Max over each group."""
    if t.dim() >= 2 and _blocked(group_shape[-2], t.shape[-2]):
        t = _fold_blocks(t, group_shape[-2], block_size, float("-inf")).amax(-2)
    dims = [i for i, (a, b) in enumerate(zip(t.shape, group_shape)) if b == 1 and a != 1]
    return t.amax(dim=dims, keepdim=True) if dims else t
