"""Route torch.nn.functional.scaled_dot_product_attention to flash_quant.attention.

    with flash_quant.integrations.route_sdpa("fast"):
        model(x)                      # every F.scaled_dot_product_attention call it makes
    print(flash_quant.integrations.sdpa_routing_stats())

or enable_sdpa_routing(config) / disable_sdpa_routing(). Never on by import.

Only the attribute `torch.nn.functional.scaled_dot_product_attention` is patched (and
restored to the very same object): code that looks it up at call time
(`F.scaled_dot_product_attention(...)`, as torch, diffusers and transformers do) is routed;
code that bound the function earlier (`from torch.nn.functional import
scaled_dot_product_attention` at import time) is not.

Calls flash_quant does not support go to the original function, counted per reason and
logged once per reason:
  "dropout"       dropout_p > 0
  "rank"          inputs that are not 4-D (B, H, S, D)
  "dtype"         not float32 / float16 / bfloat16, or dtypes that differ
  "head_dim"      head dim not a multiple of 8 in [16, 256], or V's head dim != Q's
  "shape"         batch / head / sequence shapes flash_quant does not take (incl. GQA
                  without enable_gqa, or empty sequences)
  "mask"          a mask that is not bool / floating or does not broadcast to
                  (B, H, Sq, Skv); a mask with
                  is_causal=True is routed (both apply, as in torch's SDPA)
  "device"        tensors on different devices, or a device with no flash_quant kernel
  "tensor_type"   nested tensors or tensor subclasses
  "scale"         a non-finite or non-numeric scale
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
from typing import Dict, Iterator, Optional, Union

import torch
import torch.nn.functional as F

from ..functional import attention as _fq_attention
from ..config import AttentionConfig, resolve_config
from ..nn._fallback import FallbackCounter

__all__ = [
    "route_sdpa",
    "enable_sdpa_routing",
    "disable_sdpa_routing",
    "sdpa_routing_enabled",
    "sdpa_routing_stats",
    "reset_sdpa_routing_stats",
]

logger = logging.getLogger(__name__)

_MIN_HEAD_DIM, _MAX_HEAD_DIM = 16, 256
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA", "mps": "MPS"}

_lock = threading.RLock()
_original = None  # the function that was in place when routing was enabled
_config: Union[str, AttentionConfig] = "accurate"
_stack = []  # (previous original-or-None, previous config) for nested route_sdpa
_routed = {"count": 0}
_FALLBACKS = FallbackCounter(
    logger,
    "flash_quant SDPA routing: call sent to the original F.scaled_dot_product_attention",
    "flash_quant.integrations.sdpa_routing_stats()",
)


def sdpa_routing_enabled() -> bool:
    return _original is not None


def sdpa_routing_stats() -> Dict[str, object]:
    """{"routed": calls sent to flash_quant, "fallback": {reason: calls sent to the
    original}} since the last reset."""
    return {"routed": _routed["count"], "fallback": _FALLBACKS.counts()}


def reset_sdpa_routing_stats() -> None:
    _routed["count"] = 0
    _FALLBACKS.reset()


def enable_sdpa_routing(config: Union[str, AttentionConfig, None] = "accurate") -> None:
    """Patch F.scaled_dot_product_attention so that calls go to flash_quant.attention with
    `config`. Calling it again while enabled only changes the config."""
    global _original, _config
    if not (isinstance(config, str) and config == "auto"):
        resolve_config(config)  # fail now on a bad config, not at the first call
    with _lock:
        _config = "accurate" if config is None else config
        for device_type in _DISPATCH_KEY:  # look up now: torch.compile cannot trace the lookup
            _has_kernel(device_type)
        if _original is None:
            _original = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = _routed_sdpa


def disable_sdpa_routing() -> None:
    """Restore the exact function that was in place before enable_sdpa_routing. Raises
    if some other code replaced F.scaled_dot_product_attention in between (restoring then
    would silently drop that patch)."""
    global _original
    with _lock:
        if _original is None:
            return
        if F.scaled_dot_product_attention is not _routed_sdpa:
            raise RuntimeError(
                "torch.nn.functional.scaled_dot_product_attention was replaced by other code while flash_quant "
                f"routing was on (it is now {F.scaled_dot_product_attention!r}); undo that patch first"
            )
        F.scaled_dot_product_attention = _original
        _original = None


@contextlib.contextmanager
def route_sdpa(config: Union[str, AttentionConfig, None] = "accurate") -> Iterator[None]:
    """Route F.scaled_dot_product_attention to flash_quant inside the block; on exit the
    previous state (off, or on with the previous config) is restored. Nests."""
    with _lock:
        _stack.append((sdpa_routing_enabled(), _config))
        enable_sdpa_routing(config)
    try:
        yield
    finally:
        with _lock:
            was_enabled, previous = _stack.pop()
            if was_enabled:
                enable_sdpa_routing(previous)
            else:
                disable_sdpa_routing()


# ------------------------------------------------------------------------- the patch
def _routed_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    reason = _unsupported(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    original = _original
    if reason is not None:
        _FALLBACKS.hit(*reason)
        if original is None:  # routing was disabled while this call was in flight
            original = torch._C._nn.scaled_dot_product_attention
        return original(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )
    _routed["count"] += 1
    return _fq_attention(
        query, key, value, attn_mask=attn_mask, is_causal=bool(is_causal), scale=scale, enable_gqa=enable_gqa,
        config=_config,
    )


def _unsupported(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> Optional[tuple]:
    """(reason, detail) when flash_quant cannot compute this call, else None."""
    tensors = (query, key, value)
    if not all(type(t) is torch.Tensor or isinstance(t, torch.nn.Parameter) for t in tensors) or any(
        t.is_nested for t in tensors
    ):
        return "tensor_type", "nested tensors / tensor subclasses"
    if dropout_p != 0.0:
        return "dropout", f"dropout_p={dropout_p}"
    if any(t.dim() != 4 for t in tensors):
        return "rank", f"shapes {[tuple(t.shape) for t in tensors]} (flash_quant takes 4-D (B, H, S, D))"
    if query.dtype not in _FLOATS or key.dtype != query.dtype or value.dtype != query.dtype:
        return "dtype", f"dtypes {query.dtype}, {key.dtype}, {value.dtype}"
    d = query.shape[-1]
    if key.shape[-1] != d or value.shape[-1] != d or not (_MIN_HEAD_DIM <= d <= _MAX_HEAD_DIM) or d % 8:
        return "head_dim", f"head dims q {d}, k {key.shape[-1]}, v {value.shape[-1]}"
    (b, hq, sq, _), (bk, hk, sk, _), (bv, hv, sv, _) = query.shape, key.shape, value.shape
    if not (b == bk == bv) or hk != hv or sk != sv or min(sq, sk) < 1:
        return "shape", f"q {tuple(query.shape)}, k {tuple(key.shape)}, v {tuple(value.shape)}"
    if hq != hk and (not enable_gqa or hq % hk):
        return "shape", f"{hq} query heads vs {hk} key/value heads (enable_gqa={enable_gqa})"
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return "device", f"devices {sorted(map(str, devices))}"
    device = query.device
    if not _has_kernel(device.type):
        return "device", f"no flash_quant attention kernel for {device.type}"
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor) or (attn_mask.dtype != torch.bool and not attn_mask.is_floating_point()):
            return "mask", f"mask of type {getattr(attn_mask, 'dtype', type(attn_mask).__name__)}"
        if attn_mask.device != device or attn_mask.dim() > 4 or not _broadcasts(attn_mask.shape, (b, hq, sq, sk)):
            return "mask", f"mask {tuple(attn_mask.shape)} on {attn_mask.device} for scores {(b, hq, sq, sk)}"
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        return "scale", f"scale={scale!r}"
    return None


def _broadcasts(shape, target) -> bool:
    shape = tuple(shape)
    for s, t in zip(reversed(shape), reversed(target)):
        if s != 1 and s != t:
            return False
    return True


_kernel_cache: Dict[str, bool] = {}


def _has_kernel(device_type: str) -> bool:
    if device_type not in _kernel_cache:
        key = _DISPATCH_KEY.get(device_type)
        _kernel_cache[device_type] = key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
            "flash_quant::attention_forward", key
        )
    return _kernel_cache[device_type]
