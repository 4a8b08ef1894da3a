"""HF transformers: flash_quant as an attention implementation.

    from flash_quant.integrations.transformers_hf import register
    name = register()                                  # "fq_accurate" by default
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)
    # or: register("fq_fast", config="fast"); model.set_attn_implementation("fq_fast")

register(name, config) adds an attention function to transformers' AttentionInterface and
SDPA's mask function (bool masks, True = attend, or None when `is_causal` suffices) to
AttentionMaskInterface under the same name. Nothing is registered on import.

Names: transformers treats every implementation whose name contains "flash" as a
FlashAttention variant (is_flash_attention_requested: it then builds 2-D padding masks,
tries to load flash kernels, ...), so a name containing "flash" is refused here.

KV cache (issue 18): FlashQuantCache(model.config, precision="int8" | "int4",
max_cache_len=...) is a transformers Cache holding quantized K/V; with a model running a
name registered here, decode steps read its codes through flash_quant.decode_attention
(transformers_cache.py, hf_cache_attention.py). Reaching the name imports transformers.

Needs the [transformers] extra; transformers is imported only when this is used.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Tuple, Union

import torch

from ..functional import attention as _fq_attention
from ..config import AttentionConfig, resolve_config
from ._extras import require
from .hf_cache_attention import attention_over_cache, linked_layer

__all__ = ["register", "unregister", "make_attention_forward", "DEFAULT_NAME"]

logger = logging.getLogger(__name__)

DEFAULT_NAME = "fq_accurate"

ConfigLike = Union[str, AttentionConfig, None]

_registered: Dict[str, ConfigLike] = {}
_warned_output_attentions = []


def make_attention_forward(config: ConfigLike = "accurate"):
    """The function transformers calls for attention, bound to `config`: (module, query,
    key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs) with
    (B, H, S, D) tensors -> (attn_output (B, S, H, D), None)."""
    if not (isinstance(config, str) and config == "auto"):
        resolve_config(config)
    config = "accurate" if config is None else config

    def flash_quant_attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        dropout: float = 0.0,
        scaling: Optional[float] = None,
        is_causal: Optional[bool] = None,
        position_bias: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> Tuple[torch.Tensor, None]:
        if dropout:
            raise ValueError(
                f"flash_quant attention has no dropout, but the model asks for attention dropout {dropout} (training "
                "mode with config.attention_dropout > 0): set attention_dropout=0, call model.eval(), or use "
                "attn_implementation='sdpa' for training"
            )
        if kwargs.get("softcap") is not None:
            raise ValueError("flash_quant attention does not support logit soft-capping (softcap); use 'eager'")
        if kwargs.get("cache") is not None and type(kwargs["cache"]).__name__ == "PagedAttentionCache":
            raise ValueError("flash_quant attention does not support continuous batching's paged cache; use 'sdpa'")
        if kwargs.get("output_attentions", False) and not _warned_output_attentions:
            _warned_output_attentions.append(True)
            logger.warning("flash_quant attention does not return attention weights (output_attentions=True): None")

        groups = getattr(module, "num_key_value_groups", 1)
        module_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)

        def dense(query, key, value, mask, causal):
            return _dense_attention(query, key, value, mask, causal, scaling, groups, position_bias, config)

        layer = linked_layer(key)
        if layer is not None:  # keys of a FlashQuantCache: decode steps read its codes
            if position_bias is not None:
                raise ValueError("FlashQuantCache does not support position_bias (T5-style relative attention)")
            out = attention_over_cache(layer, query, key, value, attention_mask, module_causal, scaling, dense)
        else:
            out = dense(query, key, value, attention_mask, module_causal)
        return out.transpose(1, 2).contiguous(), None

    flash_quant_attention_forward.flash_quant_config = config
    return flash_quant_attention_forward


def _dense_attention(query, key, value, attention_mask, causal, scaling, groups, position_bias, config):
    """flash_quant.attention over the given K/V, with transformers' mask conventions."""
    q_len = query.shape[2]
    # As transformers' SDPA path: causality through the flag only when there is no
    # mask and more than one query (a single decoding query sees the whole cache).
    causal = bool(q_len > 1 and attention_mask is None and causal)
    if causal and key.shape[2] > q_len:
        # prefill into an empty static cache: the flag is top-left aligned, so drop
        # the unused cache slots (as transformers' SDPA path does)
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        if position_bias is not None:
            position_bias = position_bias[..., :q_len]
    mask = attention_mask
    if position_bias is not None:
        mask = _with_position_bias(position_bias, mask, causal, q_len, key.shape[2])
        causal = False
    return _fq_attention(
        query, key, value, attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=groups > 1, config=config
    )


def _with_position_bias(position_bias, mask, causal: bool, q_len: int, kv_len: int):
    """One additive float mask: position_bias plus the mask (or the causal pattern)."""
    bias = position_bias.float()
    if mask is None:
        if not causal:
            return bias
        visible = torch.ones(q_len, kv_len, dtype=torch.bool, device=bias.device).tril()
        return bias.masked_fill(~visible, float("-inf"))
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    return bias + mask.float()


def register(name: str = DEFAULT_NAME, config: ConfigLike = "accurate") -> str:
    """Register flash_quant with `config` as transformers attention implementation `name`
    (and SDPA's mask function for it). Returns the name, for `attn_implementation=`."""
    if "flash" in name.lower():
        raise ValueError(
            f"{name!r}: transformers treats attention implementations whose name contains 'flash' as FlashAttention "
            "(2-D padding masks, kernel loading); pick a name without it, e.g. 'fq_accurate'"
        )
    if name in ("sdpa", "eager") or name.startswith("paged"):
        raise ValueError(f"{name!r} is reserved by transformers")
    modeling_utils = require("transformers.modeling_utils", "transformers", "flash_quant's transformers integration")
    masking_utils = require("transformers.masking_utils", "transformers", "flash_quant's transformers integration")
    fn = make_attention_forward(config)
    modeling_utils.AttentionInterface.register(name, fn)
    masking_utils.AttentionMaskInterface.register(name, masking_utils.sdpa_mask)
    _registered[name] = config
    return name


def __getattr__(name):
    # FlashQuantCache subclasses transformers.Cache: defined (and transformers imported)
    # on first access only, so importing this module stays light.
    if name == "FlashQuantCache":
        from .transformers_cache import FlashQuantCache

        return FlashQuantCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def unregister(name: str = DEFAULT_NAME) -> None:
    """Remove a name added by `register` from both interfaces."""
    if name not in _registered:
        raise KeyError(f"{name!r} was not registered by flash_quant")
    modeling_utils = require("transformers.modeling_utils", "transformers")
    masking_utils = require("transformers.masking_utils", "transformers")
    modeling_utils.AttentionInterface._global_mapping.pop(name, None)
    masking_utils.AttentionMaskInterface._global_mapping.pop(name, None)
    del _registered[name]
