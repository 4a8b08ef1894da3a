"""flash_quant.attention_prologue: the steps between the Q/K/V projections and attention
in one pass (per-head RMS norm, text-prefix concatenation, rotary embedding, layout)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import ops
from ._checks import check_attention_prologue

__all__ = ["attention_prologue"]


def attention_prologue(
    x: torch.Tensor,
    *,
    prefix: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    prefix_weight: Optional[torch.Tensor] = None,
    eps: Optional[float] = None,
    rotary: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """Prepare one attention operand from a projection's output, in one kernel.

    What a Flux / SD3-style block does between `to_q` and attention — RMSNorm per head,
    concatenating the text tokens in front of the image tokens, rotary embedding, and the
    transpose to the attention layout — takes about ten elementwise kernels per tensor in
    eager PyTorch; this is one read of x and one write of the result.

    Args:
      x: (B, S, H, D) float32 / float16 / bfloat16, any strides (e.g. `to_q(h).unflatten(-1, (H, D))`).
      prefix: optional (B, P, H, D) tokens placed before x's (the text stream of a joint
        block), same dtype and device.
      weight, prefix_weight: optional (D,) RMSNorm weights of x's and the prefix's tokens.
      eps: RMS-normalise each (token, head) vector over D, x / sqrt(mean(x²) + eps), when
        given (required with a weight); None skips the normalisation.
      rotary: optional (cos, sin), each (P + S, D), rotary embedding on interleaved channel
        pairs (diffusers' `apply_rotary_emb(..., use_real_unbind_dim=-1)` convention):
        out[2i] = y[2i]·cos[2i] − y[2i+1]·sin[2i], out[2i+1] = y[2i+1]·cos[2i+1] + y[2i]·sin[2i+1].

    Returns:
      (B, H, P + S, D) contiguous, in x's dtype, computed in float32 and rounded once.
      Differentiable with respect to x, prefix and the weights (not the rotary tables).
    """
    cos, sin = rotary if rotary is not None else (None, None)
    check_attention_prologue(x, prefix, weight, prefix_weight, eps, cos, sin)
    return ops.attention_prologue(x, prefix, weight, prefix_weight, eps, cos, sin)
