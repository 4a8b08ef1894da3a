"""Named input checks for the public API: each raises before any kernel runs, with a
message that says which argument is wrong and how."""
from __future__ import annotations

from typing import Tuple

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
        if s[1] < 1:
            raise ValueError(f"{name} has no heads: shape {tuple(s)}")
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


def check_quantized_operand(name: str, qt) -> None:
    """A QuantizedTensor given to attention as `name` ("query", "key" or "value"): what
    the kernels cannot use correctly is refused here, before any kernel runs."""
    if name == "value" and qt.rotated:
        # P·V reads V's codes as they are: rotated codes would give P·(V H), not P·V
        raise ValueError(
            "value is a QuantizedTensor quantized with rotate=True: attention cannot use a Hadamard-rotated V "
            "(P·V would be computed in the rotated basis); quantize V with rotate=False (rotation helps Q·Kᵀ only)"
        )
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (qt.scale, qt.mean)):
        # attention differentiates with respect to its float operands only: a QuantizedTensor
        # quantized from a tensor that requires grad would otherwise pass that tensor zeros
        raise ValueError(
            f"{name} is a QuantizedTensor whose scale/mean require grad (it was quantized from a tensor that "
            "requires grad), but attention passes no gradient through a QuantizedTensor: pass the float tensor "
            "itself (attention quantizes it, with straight-through gradients), or quantize under torch.no_grad() "
            "(or from a detached tensor) when no gradient is wanted"
        )


def check_attention_prologue(x, prefix, weight, prefix_weight, eps, cos, sin) -> None:
    """attention_prologue's contract (csrc/schema.cpp); the CPU/MPS kernel checks the same
    in C++ (csrc/attention_prologue.cpp)."""
    if x.dim() != 4:
        raise ValueError(f"attention_prologue: x must be (B, S, H, D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"attention_prologue: x must be a floating tensor, got {x.dtype}")
    b, s, h, d = x.shape
    total = s
    if prefix is not None:
        if prefix.dim() != 4 or (prefix.shape[0], prefix.shape[2], prefix.shape[3]) != (b, h, d):
            raise ValueError(f"attention_prologue: prefix must be (B, P, H, D) with x's B, H and D "
                             f"{tuple(x.shape)}, got {tuple(prefix.shape)}")
        if prefix.dtype != x.dtype or prefix.device != x.device:
            raise TypeError("attention_prologue: prefix must match x's dtype and device")
        total += prefix.shape[1]
    elif prefix_weight is not None:
        raise ValueError("attention_prologue: prefix_weight given without a prefix")
    for w in (weight, prefix_weight):
        if w is None:
            continue
        if eps is None:
            raise ValueError("attention_prologue: a norm weight needs eps (RMS normalisation)")
        if w.dim() != 1 or w.shape[0] != d:
            raise ValueError(f"attention_prologue: norm weights must be (D,) = ({d},), got {tuple(w.shape)}")
        if w.device != x.device:
            raise ValueError("attention_prologue: norm weights must be on x's device")
    if eps is not None and not (eps >= 0 and eps != float("inf")):
        raise ValueError(f"attention_prologue: eps must be finite and >= 0, got {eps}")
    if (cos is None) != (sin is None):
        raise ValueError("attention_prologue: give both cos and sin, or neither")
    if cos is not None:
        if d % 2:
            raise ValueError(f"attention_prologue: rotary embedding pairs channels: head dim must be even, got {d}")
        for t in (cos, sin):
            if t.dim() != 2 or tuple(t.shape) != (total, d):
                raise ValueError(f"attention_prologue: cos / sin must be (P + S, D) = ({total}, {d}), got {tuple(t.shape)}")
            if not t.is_floating_point() or t.device != x.device:
                raise TypeError("attention_prologue: cos / sin must be floating tensors on x's device")


def check_center(x: torch.Tensor, center: torch.Tensor, smooth: bool) -> Tuple[int, ...]:
    """Checks quantize's `center` (shape, dtype, device: no values, so no sync); returns
    the shape it is expanded to, x.shape[:-2] + (1, D). The C++ backends'
    csrc/quantize_center.h is the same rule."""
    if not isinstance(center, torch.Tensor):
        raise TypeError(f"quantize: center must be a tensor or None, got {type(center).__name__}")
    if not smooth:
        raise ValueError("quantize: center is the smoothing centre, it needs smooth=True")
    if x.dim() < 2:
        raise ValueError(f"quantize: center needs x of rank >= 2, got rank {x.dim()}")
    if center.dtype != torch.float32:
        raise TypeError(f"quantize: center must be float32, got {center.dtype}")
    if center.device != x.device:
        raise ValueError(f"quantize: center is on {center.device} but x is on {x.device}")
    shape = tuple(x.shape[:-2]) + (1, x.shape[-1])
    try:
        if center.dim() > len(shape):
            raise RuntimeError("too many dims")
        center.expand(shape)
    except RuntimeError:
        raise ValueError(f"quantize: center of shape {tuple(center.shape)} does not broadcast to "
                         f"x.shape[:-2] + (1, D) = {shape}") from None
    return shape


def checked_center(x: torch.Tensor, center: torch.Tensor, smooth: bool) -> torch.Tensor:
    """`center` checked (check_center) and returned as a new contiguous float32 tensor of
    shape x.shape[:-2] + (1, D) (an op output must not alias an input)."""
    shape = check_center(x, center, smooth)
    return center.expand(shape).clone(memory_format=torch.contiguous_format)
