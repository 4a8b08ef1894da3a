"""The MPS (Apple GPU) backend of :func:`flash_quant.decode_attention` (issue 18 item 5).

``decode_attention`` calls :func:`decode_attention_mps` for a query on the ``mps`` device.
It passes the cache's buffers as they are stored (flash_quant/kv_cache.py documents the
layout) to ``torch.ops.flash_quant.decode_attention_kv`` (schema: csrc/schema.cpp), whose
MPS kernel (csrc/mps/ops.mm, metal/decode.metal) splits the key range across threadgroups,
packs the query heads of a GQA group into one K / V read and dequantizes K and V as it
loads them: no dequantized copy of the cache is made.

How the cache maps to the op (the layout numbers live in the cache; nothing is copied):

* int8: K codes with one float32 scale per token (group = 1 token x D channels), likewise
  V; every token is coded. The codes hold k / k_smooth: the kernel multiplies q by
  ``k_smooth``. The K centre is not passed: softmax is invariant to one shift of every key
  (q . (k + c) = q . k + q . c, the same for all keys of a row), so the output is exact
  without it (only the op's lse, which decode_attention drops, omits q . c).
* int4: K codes per channel over groups of ``k_group`` tokens (group = k_group x 1) with
  float16 scale and offset (``k_zero``), the newest ``length % k_group`` keys in the 16-bit
  window; V per token over groups of ``v_group`` channels (group = 1 x v_group), every token
  coded.

:func:`op_arguments` builds the op's arguments; the Metal emulator tests
(tests/test_metal_decode.py) run the same arguments through the MPS host logic and kernels.
"""
from __future__ import annotations

from typing import Optional

import torch

from .kv_cache import QuantizedKVCache

__all__ = ["decode_attention_mps", "op_arguments"]

#: Let the backend choose the split count (csrc/mps/host_logic.cpp, decode_num_splits).
AUTO_SPLITS = 0


def _cache_buffers(cache: QuantizedKVCache):
    """(K buffers, V buffers, (k_coded, v_coded), k_group, v_group) of the cache's current
    length: K as (codes, scale, offset, window, centre, smooth), V as (codes, scale, offset,
    window), in the op's order."""
    n, d = cache.length, cache.head_dim
    if cache.precision == "int8":
        # (B, H, L) scales as (B, H, L, 1): one group of D channels per token.
        k = (cache.k_codes, cache.k_scale.unsqueeze(-1), None, None, None, cache.k_smooth.unsqueeze(2))
        v = (cache.v_codes, cache.v_scale.unsqueeze(-1), None, None)
        return k, v, (n, n), (1, d), (1, d)
    g = cache.k_group
    k_coded = (n // g) * g  # complete groups; the rest is in k_window
    k = (cache.k_codes, cache.k_scale, cache.k_zero, cache.k_window, None, None)
    v = (cache.v_codes, cache.v_scale, cache.v_zero, None)
    return k, v, (k_coded, n), (g, 1), (1, cache.v_group)


def op_arguments(q: torch.Tensor, cache: QuantizedKVCache, attn_mask: Optional[torch.Tensor] = None,
                 scale: Optional[float] = None, num_splits: int = AUTO_SPLITS) -> tuple:
    """The arguments of torch.ops.flash_quant.decode_attention_kv for decode_attention(q,
    cache, attn_mask, scale) (already checked by flash_quant.decode._check)."""
    k, v, (k_coded, v_coded), k_group, v_group = _cache_buffers(cache)
    return (q, *k, *v, attn_mask, cache.length, k_coded, v_coded, list(k_group), list(v_group), int(num_splits),
            None if scale is None else float(scale))


def decode_attention_mps(q: torch.Tensor, cache: QuantizedKVCache, attn_mask: Optional[torch.Tensor] = None,
                         scale: Optional[float] = None, num_splits: int = AUTO_SPLITS) -> torch.Tensor:
    """decode_attention on the MPS device through the Metal kernels; (B, Hq, Sq, D) in q.dtype."""
    from . import ops  # noqa: F401  (loads the schemas and the MPS kernels; the fake kernel for torch.compile)

    out, _ = torch.ops.flash_quant.decode_attention_kv(*op_arguments(q, cache, attn_mask, scale, num_splits))
    return out
