"""Which attention calls flash_quant supports, and why not: the one rule.

`why_unsupported(query, key, value, ...)` returns None for a call flash_quant computes,
else an `Unsupported` reason: a short code (what the SDPA router counts its fallbacks
by), a message that names the argument and the fix, and the exception type that
`flash_quant.attention` raises with it. The attention function raises it, the SDPA
router falls back on it, nn.MultiheadAttention asks `head_dim_supported` at
construction; the backends import the constants for the checks their kernels need.

The C++ code (CPU kernels, MPS host logic, Metal kernels) reads the same head-dim limits
from csrc/support.h; tests/test_support.py checks that the two agree and that the
numbers are written nowhere else.

Reason codes:
  "tensor_type"  an operand that is not a tensor (or, for the router, a nested tensor or
                 a tensor subclass)
  "quantized"    a QuantizedTensor operand attention cannot use (rotated V, scales that
                 require grad)
  "dtype"        not float32 / float16 / bfloat16, or dtypes that differ
  "device"       operands on different devices (or, for the router, a device with no
                 flash_quant kernel)
  "dropout"      dropout_p != 0
  "scale"        a non-finite or non-numeric scale
  "rank"         operands that are not 4-D (B, H, S, D)
  "shape"        empty sequences, batch / head / sequence sizes that disagree, GQA
                 without enable_gqa or with a head count that does not divide
  "head_dim"     head dims that differ, or one outside HEAD_DIM_RULE
  "mask"         a mask that is not bool / floating, on another device, or that does not
                 broadcast to (B, Hq, Sq, Skv)
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch

__all__ = [
    "FLOAT_DTYPES",
    "HEAD_DIM_MULTIPLE",
    "HEAD_DIM_RULE",
    "MAX_HEAD_DIM",
    "MIN_HEAD_DIM",
    "Unsupported",
    "has_kernel",
    "head_dim_supported",
    "warm_kernel_cache",
    "why_unsupported",
]

#: Input dtypes of every attention kernel (q, k, v and the output).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Head-dim limits of every attention kernel (csrc/support.h holds the same numbers for
#: C++). The Metal kernels keep one register tile per 8 columns up to the maximum; the
#: CPU kernels pad D to 16-float vectors; the multiple of 8 is the smallest MMA K step.
MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 256
HEAD_DIM_MULTIPLE = 8
#: The head-dim rule in words, for messages.
HEAD_DIM_RULE = f"a multiple of {HEAD_DIM_MULTIPLE} in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"

#: Device types with a compiled attention kernel when registered, and their dispatch key.
_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA", "mps": "MPS"}
_kernel_cache: dict = {}


class Unsupported(NamedTuple):
    """Why a call is not supported: `code` (a short reason name), `message` (what is
    wrong and how to fix it) and `error` (the exception type to raise it as)."""

    code: str
    message: str
    error: type = ValueError


def head_dim_supported(d: int) -> bool:
    """Whether every attention kernel takes head dim `d` (HEAD_DIM_RULE)."""
    return MIN_HEAD_DIM <= d <= MAX_HEAD_DIM and d % HEAD_DIM_MULTIPLE == 0


def has_kernel(device_type: str) -> bool:
    """Whether flash_quant::attention_forward has a kernel for this device type (cached:
    torch.compile cannot trace the dispatcher lookup, so callers warm it in eager code)."""
    if device_type not in _kernel_cache:
        key = _DISPATCH_KEY.get(device_type)
        _kernel_cache[device_type] = key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
            "flash_quant::attention_forward", key
        )
    return _kernel_cache[device_type]


def warm_kernel_cache() -> None:
    """Look up every device type now (eager), so that traced calls only read the cache."""
    for device_type in _DISPATCH_KEY:
        has_kernel(device_type)


def why_unsupported(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale=None,
    enable_gqa: bool = False,
    *,
    quantized_type: Optional[type] = None,
    plain_tensors_only: bool = False,
    need_kernel: bool = False,
) -> Optional[Unsupported]:
    """None when flash_quant computes scaled_dot_product_attention(query, key, value,
    attn_mask, dropout_p, is_causal, scale, enable_gqa), else the first reason it does not.

    quantized_type: operands of this type (flash_quant.QuantizedTensor, passed by the
      caller so that this module imports nothing of the package) are accepted and checked
      by the quantized-operand rules.
    plain_tensors_only / need_kernel: what only a router needs, since it hands a call to
      one of two implementations: refuse nested tensors and tensor subclasses, and devices
      with no compiled kernel (`flash_quant.attention` leaves both to torch's dispatcher).
    is_causal never makes a call unsupported (with a mask, both apply)."""
    names = ("query", "key", "value")
    operands = (query, key, value)
    for name, t in zip(names, operands):
        reason = _operand_reason(name, t, quantized_type, plain_tensors_only)
        if reason is not None:
            return reason
    if len({t.dtype for t in operands}) != 1:
        return Unsupported(
            "dtype",
            "query, key and value must share one dtype, got "
            f"{query.dtype}, {key.dtype}, {value.dtype} (a QuantizedTensor counts as its original dtype)",
            TypeError,
        )
    devices = {t.device for t in operands}
    if len(devices) != 1:
        return Unsupported("device", f"query, key and value must be on one device, got {sorted(map(str, devices))}")
    if dropout_p != 0.0:
        return Unsupported("dropout", f"dropout_p={dropout_p}: dropout is not supported by flash_quant attention (use 0.0)")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        return Unsupported("scale", f"scale must be a finite number or None, got {scale!r}")
    reason = _shape_reason(tuple(query.shape), tuple(key.shape), tuple(value.shape), enable_gqa)
    if reason is not None:
        return reason
    if need_kernel and not has_kernel(query.device.type):
        return Unsupported("device", f"no flash_quant attention kernel for {query.device.type}", NotImplementedError)
    b, h, sq, _ = query.shape
    return _mask_reason(attn_mask, (b, h, sq, key.shape[2]), query.device)


# ---------------------------------------------------------------------------- the parts
def _operand_reason(name: str, t, quantized_type, plain_tensors_only: bool) -> Optional[Unsupported]:
    if quantized_type is not None and isinstance(t, quantized_type):
        return _quantized_reason(name, t)
    if not isinstance(t, torch.Tensor):
        kinds = "a torch.Tensor or a QuantizedTensor" if quantized_type is not None else "a torch.Tensor"
        return Unsupported("tensor_type", f"{name} must be {kinds}, got {type(t).__name__}", TypeError)
    if plain_tensors_only and (
        not (type(t) is torch.Tensor or isinstance(t, torch.nn.Parameter)) or t.is_nested
    ):
        return Unsupported("tensor_type", f"{name} is a nested tensor or a tensor subclass ({type(t).__name__})",
                           TypeError)
    if t.dtype not in FLOAT_DTYPES:
        return Unsupported("dtype", f"{name} must be float32, float16 or bfloat16, got {t.dtype}", TypeError)
    return None


def _quantized_reason(name: str, qt) -> Optional[Unsupported]:
    """A QuantizedTensor given to attention as `name`: what the kernels cannot use
    correctly is refused here, before any kernel runs."""
    if name == "value" and qt.rotated:
        # P·V reads V's codes as they are: rotated codes would give P·(V H), not P·V
        return Unsupported(
            "quantized",
            "value is a QuantizedTensor quantized with rotate=True: attention cannot use a Hadamard-rotated V "
            "(P·V would be computed in the rotated basis); quantize V with rotate=False (rotation helps Q·Kᵀ only)",
        )
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (qt.scale, qt.mean)):
        # attention differentiates with respect to its float operands only: a QuantizedTensor
        # quantized from a tensor that requires grad would otherwise pass that tensor zeros
        return Unsupported(
            "quantized",
            f"{name} is a QuantizedTensor whose scale/mean require grad (it was quantized from a tensor that "
            "requires grad), but attention passes no gradient through a QuantizedTensor: pass the float tensor "
            "itself (attention quantizes it, with straight-through gradients), or quantize under torch.no_grad() "
            "(or from a detached tensor) when no gradient is wanted",
        )
    return None


def _shape_reason(q_shape, k_shape, v_shape, enable_gqa: bool) -> Optional[Unsupported]:
    """(B, H, S, D) shapes of query, key, value."""
    for name, s in (("query", q_shape), ("key", k_shape), ("value", v_shape)):
        if len(s) != 4:
            return Unsupported("rank", f"{name} must be 4-D (batch, heads, seq, head_dim), got shape {tuple(s)}")
        if s[1] < 1:
            return Unsupported("shape", f"{name} has no heads: shape {tuple(s)}")
        if s[2] < 1:
            return Unsupported("shape", f"{name} has an empty sequence: shape {tuple(s)}")
    (b, hq, _, d), (bk, hk, sk, dk), (bv, hv, sv, dv) = q_shape, k_shape, v_shape
    if not (b == bk == bv):
        return Unsupported("shape", f"batch sizes differ: query {b}, key {bk}, value {bv}")
    if hk != hv:
        return Unsupported("shape", f"key and value must have the same number of heads, got {hk} and {hv}")
    if sk != sv:
        return Unsupported("shape", f"key and value must have the same sequence length, got {sk} and {sv}")
    if d != dk:
        return Unsupported("head_dim", f"query and key head dims differ: {d} and {dk}")
    if dv != d:
        return Unsupported(
            "head_dim", f"value head dim {dv} must equal the query head dim {d} (flash_quant kernels share one head dim)"
        )
    if not head_dim_supported(d):
        return Unsupported("head_dim", f"head dim {d} is not supported: it must be {HEAD_DIM_RULE}")
    if hq != hk:
        if not enable_gqa:
            return Unsupported(
                "shape", f"query has {hq} heads but key/value have {hk}: pass enable_gqa=True for grouped-query attention"
            )
        if hq % hk:
            return Unsupported("shape", f"GQA needs query heads ({hq}) to be a multiple of key/value heads ({hk})")
    return None


def _mask_reason(attn_mask, scores: Tuple[int, int, int, int], device) -> Optional[Unsupported]:
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        return Unsupported("mask", f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}", TypeError)
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        return Unsupported(
            "mask", f"attn_mask must be bool (True = attend) or floating (added to scores), got {attn_mask.dtype}",
            TypeError,
        )
    if attn_mask.device != device:
        return Unsupported("mask", f"attn_mask is on {attn_mask.device} but query is on {device}")
    if attn_mask.dim() > 4 or not _broadcasts(tuple(attn_mask.shape), scores):
        return Unsupported(
            "mask",
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (batch, heads, q_len, kv_len) = "
            f"{scores}",
        )
    return None


def _broadcasts(shape, target) -> bool:
    """Whether `shape` broadcasts to `target` (not merely with it: the result must be
    `target`, so no dim of `shape` may be larger)."""
    return all(s == 1 or s == t for s, t in zip(reversed(shape), reversed(target)))
