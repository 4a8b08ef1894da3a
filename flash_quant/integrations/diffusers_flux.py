"""Flux (diffusers) attention through flash_quant.

    from flash_quant.integrations.diffusers_flux import apply_flux_attention
    report = apply_flux_attention(pipe, "fast")        # a FluxPipeline or FluxTransformer2DModel
    image = pipe(prompt, ...).images[0]
    remove_flux_attention(pipe)                         # back to diffusers' FluxAttnProcessor

FluxQuantAttnProcessor has FluxAttnProcessor's call contract:
processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
image_rotary_emb=None). Joint (double-stream) blocks project the text tokens with the
added projections and attend over [text; image]; single-stream blocks attend over the
concatenated sequence they are given. Rotary embeddings are applied to Q and K before
attention, exactly as diffusers does. Attention runs through flash_quant.attention in
(B, H, S, D) with the configured preset.

Needs the [diffusers] extra; diffusers is imported only when this is used.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import torch

from ..functional import attention as _fq_attention
from ..config import AttentionConfig, resolve_config
from ._extras import require

__all__ = ["FluxQuantAttnProcessor", "apply_flux_attention", "remove_flux_attention", "FluxSwapReport"]

logger = logging.getLogger(__name__)

ConfigLike = Union[str, AttentionConfig, None]


def _flux_module():
    return require("diffusers.models.transformers.transformer_flux", "diffusers", "Flux attention")


def _check_config(config: ConfigLike):
    if not (isinstance(config, str) and config == "auto"):
        resolve_config(config)
    return "accurate" if config is None else config


class FluxQuantAttnProcessor:
    """A diffusers Flux attention processor whose attention is flash_quant.attention.

    Args:
      config: flash_quant preset name or AttentionConfig ("accurate" default).
    """

    # read / set by diffusers' attention-backend and context-parallel machinery
    _attention_backend = None
    _parallel_config = None

    def __init__(self, config: ConfigLike = "accurate"):
        embeddings = require("diffusers.models.embeddings", "diffusers", "FluxQuantAttnProcessor")
        self.config = _check_config(config)
        self._apply_rotary_emb = embeddings.apply_rotary_emb

    def __repr__(self) -> str:
        name = self.config if isinstance(self.config, str) else self.config.name
        return f"FluxQuantAttnProcessor(config={name!r})"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        image_rotary_emb=None,
    ):
        if self._parallel_config is not None:
            raise NotImplementedError(
                "FluxQuantAttnProcessor does not support diffusers' context parallelism; remove the parallel config "
                "or use diffusers' FluxAttnProcessor"
            )
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        q, k, v = _projections(attn, hidden_states)  # (B, S, H * D)
        d = attn.head_dim
        q, k, v = (t.unflatten(-1, (-1, d)) for t in (q, k, v))  # (B, S, H, D)
        q, k = attn.norm_q(q), attn.norm_k(k)
        if joint:
            eq, ek, ev = _added_projections(attn, encoder_hidden_states)
            eq, ek, ev = (t.unflatten(-1, (-1, d)) for t in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
        if image_rotary_emb is not None:
            q = self._apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = self._apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)

        mask = _sdpa_mask(attention_mask, q.shape[0], k.shape[1])
        out = self._attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)  # (B, H, S, D)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)  # (B, S, H * D)

        if not joint:
            return out
        text_len = encoder_hidden_states.shape[1]
        text, image = out[:, :text_len], out[:, text_len:]
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        text = attn.to_add_out(text.contiguous())
        return image, text


    def _attend(self, q, k, v, mask):
        """The attention itself, (B, H, S, D) in and out."""
        return _fq_attention(q, k, v, attn_mask=mask, config=self.config)


def _projections(attn, hidden_states):
    if getattr(attn, "fused_projections", False) and hasattr(attn, "to_qkv"):
        return attn.to_qkv(hidden_states).chunk(3, dim=-1)
    return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)


def _added_projections(attn, encoder_hidden_states):
    if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
        return attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
    return (
        attn.add_q_proj(encoder_hidden_states),
        attn.add_k_proj(encoder_hidden_states),
        attn.add_v_proj(encoder_hidden_states),
    )


def _sdpa_mask(mask, batch: int, kv_len: int):
    """diffusers' native-backend mask convention: a (B, S_kv) mask means per-key
    (bool True = attend, float added); other masks are SDPA-shaped (B, H, Sq, Skv)."""
    if mask is None:
        return None
    if mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] == kv_len:
        return mask[:, None, None, :]
    return mask


@dataclass
class FluxSwapReport:
    """What apply_flux_attention did: qualified names of the attention modules whose
    processor was replaced (joint / single stream), and (name, reason) of those left."""

    joint: List[str] = field(default_factory=list)
    single: List[str] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)

    @property
    def replaced(self) -> List[str]:
        return self.joint + self.single

    def __str__(self) -> str:
        lines = [f"flash_quant Flux attention: {len(self.joint)} joint + {len(self.single)} single-stream processors replaced"]
        lines += [f"  skipped {n}: {r}" for n, r in self.skipped]
        return "\n".join(lines)


def _transformer_of(obj):
    transformer = getattr(obj, "transformer", obj)
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(f"expected a FluxPipeline or a FluxTransformer2DModel, got {type(obj).__name__}")
    return transformer


def apply_flux_attention(
    transformer_or_pipe, config: ConfigLike = "accurate", *, single_config: ConfigLike = "same"
) -> FluxSwapReport:
    """Replace the attention processor of every Flux attention module (FluxAttention) in a
    FluxPipeline / FluxTransformer2DModel by a FluxQuantAttnProcessor.

    Args:
      config: flash_quant config for the joint (double-stream) blocks, and for the single
        stream ones unless single_config is given.
      single_config: config for the single-stream blocks ("same" = config).

    Only diffusers' default FluxAttnProcessor (or an earlier FluxQuantAttnProcessor) is
    replaced; other processors (IP-Adapter, custom ones) are left and listed in
    report.skipped. Raises if no Flux attention module is found.
    """
    flux = _flux_module()
    transformer = _transformer_of(transformer_or_pipe)
    joint_proc = FluxQuantAttnProcessor(config)
    single_proc = joint_proc if (isinstance(single_config, str) and single_config == "same") else FluxQuantAttnProcessor(single_config)
    report = FluxSwapReport()
    for name, module in transformer.named_modules():
        if not isinstance(module, flux.FluxAttention):
            continue
        current = module.processor
        if type(current) not in (flux.FluxAttnProcessor, FluxQuantAttnProcessor):
            report.skipped.append((name, f"custom processor {type(current).__name__} kept"))
            continue
        if module.added_kv_proj_dim is not None:
            module.set_processor(joint_proc)
            report.joint.append(name)
        else:
            module.set_processor(single_proc)
            report.single.append(name)
    if not report.replaced and not report.skipped:
        raise ValueError(f"no Flux attention module (FluxAttention) found in {type(transformer).__name__}")
    for name, reason in report.skipped:
        logger.warning("apply_flux_attention: %s: %s", name, reason)
    logger.info("%s", report)
    return report


def remove_flux_attention(transformer_or_pipe) -> int:
    """Put diffusers' FluxAttnProcessor back wherever a FluxQuantAttnProcessor is set.
    Returns how many were restored."""
    flux = _flux_module()
    restored = 0
    for module in _transformer_of(transformer_or_pipe).modules():
        if isinstance(module, flux.FluxAttention) and isinstance(module.processor, FluxQuantAttnProcessor):
            module.set_processor(flux.FluxAttnProcessor())
            restored += 1
    return restored
