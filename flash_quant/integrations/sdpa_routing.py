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

Calls flash_quant does not support (flash_quant.support.why_unsupported, the rule
flash_quant.attention raises by) go to the original function, counted per reason code and
logged once per reason:
  "dropout"       dropout_p > 0
  "rank"          inputs that are not 4-D (B, H, S, D)
  "dtype"         not float32 / float16 / bfloat16, or dtypes that differ
  "head_dim"      a head dim outside support.HEAD_DIM_RULE, or V's / K's head dim != Q's
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
import threading
from typing import Dict, Iterator, Union

import torch
import torch.nn.functional as F

from ..functional import attention as _fq_attention
from ..config import AttentionConfig, resolve_config
from ..nn._fallback import FallbackCounter
from ..support import warm_kernel_cache, why_unsupported

__all__ = [
    "route_sdpa",
    "enable_sdpa_routing",
    "disable_sdpa_routing",
    "sdpa_routing_enabled",
    "sdpa_routing_stats",
    "reset_sdpa_routing_stats",
]

logger = logging.getLogger(__name__)

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
        warm_kernel_cache()  # look up now: torch.compile cannot trace the lookup
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
    reason = why_unsupported(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, plain_tensors_only=True, need_kernel=True
    )
    original = _original
    if reason is not None:
        _FALLBACKS.hit(reason.code, reason.message)
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
