"""Attention over a FlashQuantCache layer: what the registered transformers function does
when the keys it is given come from a FlashQuantCache (issue 18 item 4).

A transformers model calls `cache.update(k, v, layer_idx)` and passes what it returns to
the attention function. A FlashQuantCache layer quantizes the new K/V into its buffers and
returns the new 16-bit K/V themselves, linked (a tensor attribute) to the layer; the
attention function finds the layer through that link and then

  * no earlier tokens (a prefill into an empty cache): the new 16-bit K/V are all the keys,
    so flash_quant.attention runs on them as without a cache (no quantization error);
  * 1..DECODE_MAX_QUERIES queries after earlier tokens (decode, speculative verification):
    flash_quant.decode_attention reads the cache's codes directly;
  * more queries after earlier tokens (a later prefill chunk): one dequantized copy of the
    cache for that call, then flash_quant.attention (rare: once per chunk, never per step).

Any other attention function would see only the new tokens, so the layer records whether
its last update was read through the link and refuses the next update if not (see
FlashQuantLayer.update): a model whose attention bypasses this cannot give wrong results
past the first (prefill) step, which is exact anyway.

transformers is not imported here; this module is shared by transformers_hf (the function)
and transformers_cache (the Cache).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..decode import MAX_QUERIES, decode_attention
from ..decode_cpu import causal_decode_mask

__all__ = ["DECODE_MAX_QUERIES", "link", "linked_layer", "attention_over_cache"]

#: the attribute of the returned key tensor that names its cache layer
_LINK_ATTRIBUTE = "_flash_quant_cache_layer"

#: the most queries one decode step may have (decode_attention's query block)
DECODE_MAX_QUERIES = MAX_QUERIES


def link(key: torch.Tensor, layer) -> torch.Tensor:
    """Tag `key` (what a cache update returns) with the layer holding the quantized cache."""
    setattr(key, _LINK_ATTRIBUTE, layer)
    return key


def linked_layer(key: torch.Tensor):
    """The cache layer `key` came from, or None for keys of any other cache (or none)."""
    return getattr(key, _LINK_ATTRIBUTE, None)


def attention_over_cache(
    layer,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    causal: bool,
    scaling: Optional[float],
    dense_attention: Callable,
) -> torch.Tensor:
    """Attention of `query` (B, Hq, Sq, D) over everything `layer` holds (its quantized
    cache, the new tokens already appended). `key`/`value` are the new 16-bit tokens.
    `attention_mask` is transformers' (bool, True = attend, or additive) mask over the
    cache's whole length, or None; `dense_attention(q, k, v, mask, is_causal)` is
    flash_quant.attention bound to the registered config. Returns (B, Hq, Sq, D)."""
    layer.mark_read()
    cache = layer.quantized
    q_len = query.shape[2]
    past = cache.length - q_len
    if past == 0:
        return dense_attention(query, key, value, attention_mask, causal)
    if attention_mask is not None and attention_mask.shape[-1] != cache.length:
        raise ValueError(
            f"FlashQuantCache: the attention mask covers {attention_mask.shape[-1]} keys but the cache holds "
            f"{cache.length} (was the cache shared with another model, or filled outside this forward?)"
        )
    if attention_mask is None and not causal:
        # a bidirectional decoder without a mask: every query sees every key
        attention_mask = torch.ones(1, 1, q_len, cache.length, dtype=torch.bool, device=query.device)
    if q_len <= DECODE_MAX_QUERIES:
        # attention_mask None: decode_attention's bottom-right causal pattern, which is
        # transformers' causal mask for queries that follow `past` cached tokens
        return decode_attention(query, cache, attn_mask=attention_mask, scale=scaling)
    k, v = cache.dequantize()
    if attention_mask is None:
        attention_mask = causal_decode_mask(q_len, cache.length, query.device)  # decode_attention's default
    return dense_attention(query, k.to(query.dtype), v.to(query.dtype), attention_mask, False)

