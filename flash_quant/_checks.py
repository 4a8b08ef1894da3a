"""Named input checks for the quantize and prologue APIs: each raises before any kernel
runs, with a message that says which argument is wrong and how. (Whether an attention
call is supported is answered by support.py.)"""
from __future__ import annotations

from typing import Tuple

import torch

from .support import FLOAT_DTYPES


def check_float_tensor(name: str, t, min_rank: int = 1) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() < min_rank:
        raise ValueError(f"{name} must have rank >= {min_rank}, got shape {tuple(t.shape)}")


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


#: decode_attention's query block (decode, speculative verification of <= 16 tokens)
DECODE_MAX_QUERIES = 16


def check_decode_op(q, k_codes, k_scale, k_zero, k_smooth, k_window, v_codes, v_scale, v_zero,
                    length, attn_mask, precision, k_group, v_group) -> None:
    """The decode_attention op's arguments (csrc/schema.cpp), checked by every kernel
    before it runs (what does not need the token count: that is on the device)."""
    def fail(msg, exc=ValueError):
        raise exc(f"decode_attention: {msg}")
    if q.dtype not in FLOAT_DTYPES:
        fail(f"q must be float32, float16 or bfloat16, got {q.dtype}", TypeError)
    if q.dim() != 4 or k_codes.dim() != 4:
        fail(f"q must be (B, Hq, Sq, D) and the codes (B, Hkv, L, ...), got {tuple(q.shape)}, {tuple(k_codes.shape)}")
    b, hq, sq, d = q.shape
    if not 1 <= sq <= DECODE_MAX_QUERIES:
        fail(f"1 <= Sq <= {DECODE_MAX_QUERIES} queries, got {sq} (use flash_quant.attention for prefill)")
    if k_codes.shape[0] != b or hq % k_codes.shape[1]:
        fail(f"q {tuple(q.shape)} must have the cache's batch and a multiple of its "
             f"{k_codes.shape[1]} kv heads")
    need = {"int8": (k_smooth,), "int4": (k_zero, k_window, v_zero)}
    if precision not in need:
        fail(f"precision must be 'int8' or 'int4', got {precision!r}")
    if any(t is None for t in need[precision]):
        fail(f"precision {precision!r} needs " + ("k_smooth" if precision == "int8" else "k_zero, k_window and v_zero"))
    packed = 2 if precision == "int4" else 1
    if k_codes.shape[-1] * packed != d or v_codes.shape[-1] * packed != d:
        fail(f"q's head dim {d} does not match the codes' {k_codes.shape[-1] * packed}")
    if precision == "int4" and (k_group < 1 or v_group < 1 or d % v_group):
        fail(f"int4 needs k_group >= 1 and v_group dividing {d}, got {k_group}, {v_group}")
    tensors = (k_codes, k_scale, k_zero, k_smooth, k_window, v_codes, v_scale, v_zero, length, attn_mask)
    if any(t is not None and t.device != q.device for t in tensors):
        fail(f"every tensor must be on q's device {q.device}")
    if length.dtype != torch.int32 or length.numel() != 1:
        fail(f"length must be an int32 tensor of one element, got {length.dtype} {tuple(length.shape)}", TypeError)
    if attn_mask is not None and attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        fail(f"attn_mask must be bool or floating, got {attn_mask.dtype}", TypeError)
    if attn_mask is not None and attn_mask.dim() > 4:
        fail(f"attn_mask has more than 4 dims: {tuple(attn_mask.shape)}")
