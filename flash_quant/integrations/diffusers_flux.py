"""Flux (diffusers) attention through flash_quant.

    from flash_quant.integrations.diffusers_flux import apply_flux_attention
    report = apply_flux_attention(pipe, "fast")        # a FluxPipeline or FluxTransformer2DModel
    image = pipe(prompt, ...).images[0]
    remove_flux_attention(pipe)                         # back to diffusers' FluxAttnProcessor

FluxQuantAttnProcessor has FluxAttnProcessor's call contract:
processor(attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
image_rotary_emb=None). Joint (double-stream) blocks project the text tokens with the
added projections and attend over [text; image]; single-stream blocks attend over the
concatenated sequence they are given. Attention runs through flash_quant.attention in
(B, H, S, D) with the configured preset.

The steps between the projections and attention (QK RMSNorm, text/image concatenation,
rotary embedding, the transpose to (B, H, S, D)) run as one flash_quant.attention_prologue
kernel per tensor when the norms are RMSNorms (diffusers' or torch's) and the rotary
embedding is a (cos, sin) pair — diffusers' Flux. Eager diffusers spends about ten
elementwise kernels per tensor there (on the H100 at 1024²: ~0.9 ms per block, more
than the attention itself). Anything else takes diffusers' own steps; each such call is
counted in `processor.prologue_counts` under its reason and logged once.

Needs the [diffusers] extra; diffusers is imported only when this is used.
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import torch

from ..config import AttentionConfig, resolve_config
from ..functional import attention as _fq_attention
from ..prologue import attention_prologue
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
      fuse_prologue: run QK-norm, concatenation and RoPE as one attention_prologue kernel
        per tensor where the block allows it (default True); False always takes
        diffusers' steps.

    `prologue_counts` counts the calls per path: "fused", or "diffusers: <reason>".
    """

    # read / set by diffusers' attention-backend and context-parallel machinery
    _attention_backend = None
    _parallel_config = None

    def __init__(self, config: ConfigLike = "accurate", *, fuse_prologue: bool = True):
        embeddings = require("diffusers.models.embeddings", "diffusers", "FluxQuantAttnProcessor")
        self.config = _check_config(config)
        self.fuse_prologue = fuse_prologue
        self.prologue_counts = collections.Counter()
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
        eq = ek = ev = None
        if joint:
            eq, ek, ev = _added_projections(attn, encoder_hidden_states)
            eq, ek, ev = (t.unflatten(-1, (-1, d)) for t in (eq, ek, ev))
        if self._fusable(attn, joint, image_rotary_emb, q.shape[1] + (eq.shape[1] if joint else 0)):
            q, k, v = self._fused_prologue(attn, joint, image_rotary_emb, q, k, v, eq, ek, ev)
        else:
            q, k, v = self._diffusers_prologue(attn, joint, image_rotary_emb, q, k, v, eq, ek, ev)

        mask = _sdpa_mask(attention_mask, q.shape[0], k.shape[2])
        out = self._attend(q, k, v, mask)  # (B, H, S, D)
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

    # ------------------------------------------------------------------ prologue
    def _fusable(self, attn, joint, rotary, total_len) -> bool:
        """Whether attention_prologue computes exactly this block's steps; counts the path."""
        reason = None
        norms = [attn.norm_q, attn.norm_k] + ([attn.norm_added_q, attn.norm_added_k] if joint else [])
        eps = {_rms_eps(n) for n in norms}
        if not self.fuse_prologue:
            reason = "fuse_prologue=False"
        elif None in eps or len(eps) != 1:
            reason = "QK norms are not RMSNorms with one eps and no bias"
        elif rotary is not None and not (
            isinstance(rotary, (tuple, list)) and len(rotary) == 2
            and all(isinstance(t, torch.Tensor) and tuple(t.shape) == (total_len, attn.head_dim) for t in rotary)
        ):
            reason = "rotary embedding is not a (cos, sin) pair of (S, D) tables"
        key = "fused" if reason is None else f"diffusers: {reason}"
        if key not in self.prologue_counts and reason is not None and reason != "fuse_prologue=False":
            logger.warning("FluxQuantAttnProcessor: QK-norm / RoPE not fused (%s); diffusers' steps used", reason)
        self.prologue_counts[key] += 1
        return reason is None

    def _fused_prologue(self, attn, joint, rotary, q, k, v, eq, ek, ev):
        eps = _rms_eps(attn.norm_q)
        wq, wk = attn.norm_q.weight, attn.norm_k.weight
        pwq, pwk = (attn.norm_added_q.weight, attn.norm_added_k.weight) if joint else (None, None)
        q = attention_prologue(q, prefix=eq, weight=wq, prefix_weight=pwq, eps=eps, rotary=rotary)
        k = attention_prologue(k, prefix=ek, weight=wk, prefix_weight=pwk, eps=eps, rotary=rotary)
        v = attention_prologue(v, prefix=ev)
        return q, k, v

    def _diffusers_prologue(self, attn, joint, rotary, q, k, v, eq, ek, ev):
        """diffusers' FluxAttnProcessor steps, unchanged; returns (B, H, S, D) views."""
        q, k = attn.norm_q(q), attn.norm_k(k)
        if joint:
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
        if rotary is not None:
            q = self._apply_rotary_emb(q, rotary, sequence_dim=1)
            k = self._apply_rotary_emb(k, rotary, sequence_dim=1)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _rms_eps(norm) -> Optional[float]:
    """eps of an RMSNorm over the last dim with no bias (diffusers' or torch's, weight (D,)
    or none), else None."""
    weight = getattr(norm, "weight", None)
    if weight is not None and weight.dim() != 1:
        return None
    if isinstance(norm, torch.nn.RMSNorm):
        return None if norm.eps is None or len(norm.normalized_shape) != 1 else float(norm.eps)
    if (type(norm).__name__ == "RMSNorm" and type(norm).forward.__module__.startswith("diffusers.")
            and getattr(norm, "bias", None) is None):
        return float(norm.eps)
    return None


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
    transformer_or_pipe,
    config: ConfigLike = "accurate",
    *,
    single_config: ConfigLike = "same",
    fuse_prologue: bool = True,
) -> FluxSwapReport:
    """Replace the attention processor of every Flux attention module (FluxAttention) in a
    FluxPipeline / FluxTransformer2DModel by a FluxQuantAttnProcessor.

    Args:
      config: flash_quant config for the joint (double-stream) blocks, and for the single
        stream ones unless single_config is given.
      single_config: config for the single-stream blocks ("same" = config).
      fuse_prologue: see FluxQuantAttnProcessor.

    Only diffusers' default FluxAttnProcessor (or an earlier FluxQuantAttnProcessor) is
    replaced; other processors (IP-Adapter, custom ones) are left and listed in
    report.skipped. Raises if no Flux attention module is found.
    """
    flux = _flux_module()
    transformer = _transformer_of(transformer_or_pipe)
    joint_proc = FluxQuantAttnProcessor(config, fuse_prologue=fuse_prologue)
    same = isinstance(single_config, str) and single_config == "same"
    single_proc = joint_proc if same else FluxQuantAttnProcessor(single_config, fuse_prologue=fuse_prologue)
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
