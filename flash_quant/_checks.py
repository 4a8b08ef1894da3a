"""Named input checks for the public API: each raises before any kernel runs, with a
message that says which argument is wrong and how."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


def check_float_tensor(name: str, t, min_rank: int = 1) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() < min_rank:
        raise ValueError(f"{name} must have rank >= {min_rank}, got shape {tuple(t.shape)}")


def check_attention_shapes(q_shape, k_shape, v_shape, enable_gqa: bool) -> None:
    """(B, H, S, D) shapes of query, key, value."""
    for name, s in (("query", q_shape), ("key", k_shape), ("value", v_shape)):
        if len(s) != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(s)}")
        if s[2] < 1:
            raise ValueError(f"{name} has an empty sequence: shape {tuple(s)}")
    (b, hq, _, d), (bk, hk, sk, dk), (bv, hv, sv, dv) = q_shape, k_shape, v_shape
    if not (b == bk == bv):
        raise ValueError(f"batch sizes differ: query {b}, key {bk}, value {bv}")
    if hk != hv:
        raise ValueError(f"key and value must have the same number of heads, got {hk} and {hv}")
    if sk != sv:
        raise ValueError(f"key and value must have the same sequence length, got {sk} and {sv}")
    if d != dk:
        raise ValueError(f"query and key head dims differ: {d} and {dk}")
    if dv != d:
        raise ValueError(f"value head dim {dv} must equal the query head dim {d} (flash_quant kernels share one head dim)")
    if not (MIN_HEAD_DIM <= d <= MAX_HEAD_DIM) or d % 8:
        raise ValueError(f"head dim {d} is not supported: it must be a multiple of 8 in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
    if hq != hk:
        if not enable_gqa:
            raise ValueError(
                f"query has {hq} heads but key/value have {hk}: pass enable_gqa=True for grouped-query attention"
            )
        if hq % hk:
            raise ValueError(f"GQA needs query heads ({hq}) to be a multiple of key/value heads ({hk})")


def check_mask(attn_mask, b: int, h: int, sq: int, skv: int, device) -> None:
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True = attend) or floating (added to scores), got {attn_mask.dtype}")
    if attn_mask.device != device:
        raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {device}")
    try:
        torch.broadcast_shapes(tuple(attn_mask.shape), (b, h, sq, skv))
        if attn_mask.dim() > 4:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (batch, heads, q_len, kv_len) = "
            f"{(b, h, sq, skv)}"
        ) from None
