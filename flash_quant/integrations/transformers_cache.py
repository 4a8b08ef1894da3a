"""FlashQuantCache: a transformers Cache whose layers hold quantized K/V (issue 18 item 4).

    from flash_quant.integrations.transformers_hf import FlashQuantCache, register
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=register())
    cache = FlashQuantCache(model.config, precision="int8", max_cache_len=prompt + new)
    model.generate(ids, past_key_values=cache, max_new_tokens=new)
    cache.nbytes                                  # codes, scales, zero points, window

One flash_quant.kv_cache.QuantizedKVCache per attention layer, allocated for
`max_cache_len` tokens at the first update (batch, heads, head dim, dtype and device come
from the model's K/V). New tokens are quantized in place; decode steps read the codes
through flash_quant.decode_attention (hf_cache_attention.py). The model must run a
flash_quant attention implementation (`register()`): any other one would see only the new
tokens, and the cache refuses the update after one that was not read through flash_quant.

Imports transformers at load: reached through transformers_hf.FlashQuantCache only.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._extras import require
from .hf_cache_attention import link

_cache_utils = require("transformers.cache_utils", "transformers", "flash_quant's FlashQuantCache")

__all__ = ["FlashQuantCache", "FlashQuantLayer"]

#: the transformers layer type this cache holds (sliding / chunked / linear layers keep
#: other states, which QuantizedKVCache does not model)
_SUPPORTED_LAYER_TYPE = "full_attention"


class FlashQuantLayer(_cache_utils.CacheLayerMixin):
    """One attention layer's quantized K/V (a QuantizedKVCache, created at the first update)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, max_cache_len: int, precision: str, dtype: Optional[torch.dtype] = None, **scheme_options):
        super().__init__()
        self.max_cache_len = max_cache_len
        self.precision = precision
        self.cache_dtype = dtype
        self.scheme_options = scheme_options
        self.quantized = None
        # True from an update until the attention function read it through the link
        self._unread = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        from ..kv_cache import QuantizedKVCache

        batch, heads, _, head_dim = key_states.shape
        if value_states.shape[:2] != key_states.shape[:2] or value_states.shape[-1] != head_dim:
            raise ValueError(
                f"FlashQuantCache: keys {tuple(key_states.shape)} and values {tuple(value_states.shape)} must share "
                "batch, heads and head dim"
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        self.quantized = QuantizedKVCache(
            batch, heads, head_dim, self.max_cache_len, precision=self.precision,
            dtype=self.cache_dtype or key_states.dtype, device=key_states.device, **self.scheme_options,
        )
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._unread and self.quantized.length > 0:
            raise RuntimeError(
                "FlashQuantCache: the attention of the previous forward did not read this cache through flash_quant "
                "(it saw the new tokens only, the quantized ones are invisible to it). Load or switch the model to a "
                "flash_quant attention implementation: name = flash_quant.integrations.transformers_hf.register(); "
                "model.set_attn_implementation(name)"
            )
        held, new = self.quantized.length, key_states.shape[-2]
        if held + new > self.max_cache_len:
            raise ValueError(
                f"FlashQuantCache: {held} cached + {new} new tokens exceed max_cache_len={self.max_cache_len}; "
                "build the cache with a larger max_cache_len (prompt length + new tokens)"
            )
        self.quantized.append(key_states, value_states)
        self._unread = True
        return link(key_states, self), value_states

    def mark_read(self) -> None:
        """Called by the attention function once it read this layer through the link."""
        self._unread = False

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.quantized.length if self.quantized is not None else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    @property
    def nbytes(self) -> int:
        return self.quantized.nbytes if self.quantized is not None else 0

    def reset(self) -> None:
        if self.quantized is not None:
            self.quantized.reset()
        self._unread = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.quantized is not None:
            self.quantized.reorder(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "FlashQuantCache cannot drop tokens (crop: assisted / speculative generation rollback); use DynamicCache"
        )

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise NotImplementedError("FlashQuantCache cannot repeat its batch; build it after expanding the inputs")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("FlashQuantCache cannot select batch rows (contrastive search); use DynamicCache")

    def offload(self):
        raise NotImplementedError("FlashQuantCache does not offload layers to the CPU")

    def prefetch(self):
        raise NotImplementedError("FlashQuantCache does not offload layers to the CPU")


class FlashQuantCache(_cache_utils.Cache):
    """A transformers Cache of quantized K/V, one QuantizedKVCache per attention layer.

    config: the model's config (its decoder's layer types: full attention layers only).
    precision: "int8" or "int4" (flash_quant.kv_cache's schemes).
    max_cache_len: tokens each layer holds at most (prompt + new tokens), allocated at the
      first update.
    dtype: the 16-bit type of the window / dequantized K/V (default: the model's K/V dtype).
    scheme_options: passed to QuantizedKVCache (group sizes and the like).
    """

    def __init__(
        self,
        config,
        precision: str = "int8",
        max_cache_len: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
        **scheme_options,
    ):
        if not isinstance(max_cache_len, int) or isinstance(max_cache_len, bool) or max_cache_len < 1:
            raise ValueError(
                f"FlashQuantCache needs max_cache_len, a positive int (prompt length + new tokens), got {max_cache_len!r}:"
                " its buffers are allocated once for that many tokens"
            )
        from ..kv_cache import PRECISIONS

        if precision not in PRECISIONS:  # checked here too: the layers are built at the first update
            raise ValueError(f"FlashQuantCache: precision must be one of {PRECISIONS}, got {precision!r}")
        decoder_config = config.get_text_config(decoder=True)
        layer_types, _ = _cache_utils.get_layer_types_and_kwargs(decoder_config)
        other = sorted({t for t in layer_types if t != _SUPPORTED_LAYER_TYPE})
        if other:
            raise ValueError(
                f"FlashQuantCache holds {_SUPPORTED_LAYER_TYPE!r} layers only; this model also has {other}"
            )
        self.precision = precision
        self.max_cache_len = max_cache_len
        layers = [
            FlashQuantLayer(max_cache_len, precision, dtype=dtype, **scheme_options) for _ in layer_types
        ]
        super().__init__(layers=layers)

    @property
    def nbytes(self) -> int:
        """Bytes of every layer's buffers: codes, scales, zero points and 16-bit window."""
        return sum(layer.nbytes for layer in self.layers)

    def __repr__(self):
        return f"FlashQuantCache(precision={self.precision!r}, max_cache_len={self.max_cache_len}, layers={len(self.layers)})"
