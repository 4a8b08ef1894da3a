"""Statistics over the key axis that only the keys a query may see enter.

Quantizing K and V takes statistics over the keys: K's smoothing centre, and the scales of
every group spanning several keys (V per channel, per tensor, ...). A key that no query row
can see (key padding, the keys past the last row of a top-left causal mask) must not change
them: padded rows often hold garbage, and one large padded value took the fast preset from
0.8 % to 92 % rel-L2. A few huge keys that are visible (attention sinks) must not dominate
the centre either; softmax is shift-invariant per row, so any centre is exact and a robust
one costs nothing in accuracy.

Plain torch ops (CPU, CUDA, MPS alike); nothing here synchronises with the device.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["visible_keys", "robust_center", "CENTER_BLOCKS"]

#: The centre is the per-channel median of the means of about this many blocks of keys:
#: a few outlier keys move at most a few block means, which the median ignores.
CENTER_BLOCKS = 32


def visible_keys(
    attn_mask: Optional[torch.Tensor], is_causal: bool, b: int, hq: int, hkv: int, sq: int, skv: int,
    device=None,
) -> Optional[torch.Tensor]:
    """Which keys some query of their GQA group may see: bool (B|1, Hkv|1, 1, Skv), or
    None when no key is excluded structurally (no mask, and no causal mask with Sq < Skv).

    A key is excluded iff no query row of any head of its group may see it: a bool mask
    False (a float mask -inf) for every row, or, with `is_causal` (top-left: row i sees
    keys j <= i), every row that the mask lets see it lies above it. `attn_mask` is any
    shape broadcastable to (B, Hq, Sq, Skv); `device`: where a causal-only result goes
    (default: the CPU)."""
    causal_cut = bool(is_causal) and sq < skv
    if attn_mask is None and not causal_cut:
        return None
    if attn_mask is None:  # causal only: the keys j < Sq
        return (torch.arange(skv, device=device) < sq).view(1, 1, 1, skv)
    allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask != float("-inf")
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    if is_causal:  # row i sees key j only if j <= i: the lower triangle (one mask copy)
        allowed = allowed & torch.ones(sq, skv, dtype=torch.bool, device=allowed.device).tril()
    seen = allowed.any(dim=-2, keepdim=True)  # (B|1, Hq|1, 1, Skv|1)
    if seen.shape[1] != 1 and hq != hkv:  # a key of a GQA group: seen by any of its heads
        seen = seen.unflatten(1, (hkv, hq // hkv)).any(dim=2)
    return seen.expand(-1, -1, -1, skv)


def robust_center(k: torch.Tensor, visible: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A smoothing centre for k (..., S, D) over its visible keys, float32 (..., 1, D):
    per channel, the median of the means of blocks of ~S / CENTER_BLOCKS keys (the last
    block may be shorter), weighted by their visible key counts when `visible` is given. `visible`: bool
    broadcastable to (..., 1, S), or None (every key). Blocks with no visible key are
    ignored; a slice with no visible key at all gets 0. One read of k, in k's dtype (the
    block sums accumulate in float32); no float32 copy of k."""
    with torch.no_grad():  # the centre is a constant to the quantization (no gradient)
        s = k.shape[-2]
        bs = max(1, s // CENTER_BLOCKS)
        full = s // bs
        tail = s - full * bs
        if visible is None:
            means = k[..., : full * bs, :].unflatten(-2, (full, bs)).mean(dim=-2, dtype=torch.float32)
            if tail:  # (the shorter last block counts as one: any centre is exact)
                last = k[..., full * bs:, :].mean(dim=-2, keepdim=True, dtype=torch.float32)
                means = torch.cat([means, last], dim=-2)
            return means.median(dim=-2, keepdim=True).values
        w = visible.to(torch.float32)  # (..., 1, S)
        counts = w[..., : full * bs].unflatten(-1, (full, bs)).sum(dim=-1)  # (..., 1, full)
        if tail:
            counts = torch.cat([counts, w[..., full * bs:].sum(dim=-1, keepdim=True)], dim=-1)
        means = _block_means(k, w, counts, full, bs, tail)
        return _weighted_median(means, counts.transpose(-1, -2))


def _block_means(k, w, counts, full, bs, tail):
    """Means of each block's visible keys, (..., blocks, D) float32 (0 for a block with
    none): products with the block weights 1/count (so no sum can overflow k's dtype),
    on the matrix units, reading k once."""
    inv = (w / _per_key(counts, full, bs, tail).clamp_min(1.0)).to(k.dtype)  # (..., 1, S)
    head = inv[..., : full * bs].unflatten(-1, (full, bs)).transpose(-2, -3)  # (..., full, 1, bs)
    means = torch.matmul(head, k[..., : full * bs, :].unflatten(-2, (full, bs))).squeeze(-2)
    if tail:
        last = torch.matmul(inv[..., full * bs:], k[..., full * bs:, :])  # (..., 1, D)
        means = torch.cat([means, last.expand(*means.shape[:-2], 1, -1)], dim=-2)
    return means.float()


def _per_key(counts, full, bs, tail):
    """Each key's block count, (..., 1, S), from the block counts (..., 1, blocks)."""
    per = counts[..., :full].repeat_interleave(bs, dim=-1)
    return torch.cat([per, counts[..., full:].expand(*counts.shape[:-1], tail)], dim=-1) if tail else per


def _weighted_median(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per channel, the lower weighted median of values (..., n, D) with weights (..., n, 1)
    (>= 0; zero-weight entries are never chosen), as (..., 1, D); 0 where every weight is 0.
    Sort-based: no nanmedian (MPS lacks it)."""
    sorted_vals, order = values.sort(dim=-2)
    w = torch.gather(weights.expand_as(values), -2, order)
    cum = w.cumsum(dim=-2)
    total = cum[..., -1:, :]
    pick = (cum < 0.5 * total).sum(dim=-2, keepdim=True).clamp_max(values.shape[-2] - 1)
    center = torch.gather(sorted_vals, -2, pick)
    return torch.where(total > 0, center, torch.zeros_like(center))
