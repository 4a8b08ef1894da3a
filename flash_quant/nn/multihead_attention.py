"""flash_quant.nn.MultiheadAttention: a drop-in for torch.nn.MultiheadAttention whose
attention runs through flash_quant.attention (quantized or not, per `config`).

Same constructor arguments, forward signature, return values and state_dict keys as
torch.nn.MultiheadAttention, so checkpoints load both ways and nn.TransformerEncoderLayer
/ nn.TransformerDecoderLayer work with it as their `self_attn` / `multihead_attn`.

Decisions (documented in the class docstring):
  * need_weights=True: the output still comes from flash_quant (so it does not change
    with the flag); the weights are computed on an explicit path (fp32 softmax of the
    unquantized scores). Slower; counted and logged once (reason "need_weights").
  * dropout > 0 is accepted at construction (every nn.TransformerEncoderLayer has 0.1).
    In eval mode, or with dropout 0, attention runs through flash_quant. In training
    mode with dropout > 0 the module runs the explicit unquantized path with dropout on
    the attention weights, as torch does; counted and logged once (reason "dropout").
  * A head dim (embed_dim / num_heads) flash_quant does not support raises at
    construction.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional import attention as _fq_attention
from ..config import AttentionConfig, resolve_config
from ..support import HEAD_DIM_RULE, head_dim_supported
from ._fallback import FallbackCounter

__all__ = ["MultiheadAttention", "mha_fallback_counts", "reset_mha_fallback_counts"]

logger = logging.getLogger(__name__)

_FALLBACKS = FallbackCounter(
    logger,
    "flash_quant.nn.MultiheadAttention takes the explicit (slower) attention path",
    "flash_quant.nn.mha_fallback_counts()",
)


def mha_fallback_counts() -> Dict[str, int]:
    """How many MultiheadAttention calls took the explicit path, per reason:
    "need_weights" (weights requested) and "dropout" (training with dropout > 0)."""
    return _FALLBACKS.counts()


def reset_mha_fallback_counts() -> None:
    _FALLBACKS.reset()


def _fast_path_guard(module, args):
    """A no-op forward pre-hook. nn.TransformerEncoderLayer's fused inference fast path
    (torch._transformer_encoder_layer_fwd) reads self_attn.in_proj_weight and computes
    attention itself, bypassing this module; it is skipped whenever a submodule has a
    hook, so this hook keeps every call going through MultiheadAttention.forward."""
    return None


ConfigLike = Union[str, AttentionConfig, None]


class MultiheadAttention(nn.Module):
    r"""Multi-head attention with flash_quant kernels; a drop-in for nn.MultiheadAttention.

    Args (as torch.nn.MultiheadAttention): embed_dim, num_heads, dropout, bias,
    add_bias_kv, add_zero_attn, kdim, vdim, batch_first, device, dtype; plus
      config: the flash_quant attention config, a preset name ("accurate" default,
        "fast", "int4", "fp8", "fp16", "bf16", "fp32", "auto") or an AttentionConfig.

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (attn_output, attn_weights or None),
    with torch's meanings: bool masks are True where attention is NOT allowed (the
    opposite of F.scaled_dot_product_attention), float masks are added to the scores;
    attn_mask is (L, S) or (N * num_heads, L, S); key_padding_mask is (N, S).

    Differences from torch, all deliberate:
      * is_causal=True is torch's hint that attn_mask is the causal mask: causality is
        applied by the kernel and attn_mask is not read (torch's SDPA path does the same).
        Unlike torch, attn_mask may be omitted with is_causal=True.
      * A query row with every key masked gives zeros, as torch's need_weights=False
        (SDPA) path does; torch's need_weights=True path gives NaN there (torch 2.13,
        tests/test_mha.py::test_fully_masked_rows_match_torch_need_weights_false).
      * need_weights=True (torch's default!) and training with dropout > 0 take a slower
        explicit path, counted per reason in `mha_fallback_counts()` and logged once.
        Pass need_weights=False for the flash_quant path (nn.Transformer* layers do).
      * Nested-tensor inputs are rejected; `quantize_attention` turns off
        nn.TransformerEncoder's nested-tensor conversion where it swaps modules, and a
        no-op forward pre-hook keeps nn.TransformerEncoderLayer's fused fast path (which
        would bypass this module) off.
    """

    __constants__ = ["batch_first"]

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
        *,
        config: ConfigLike = "accurate",
    ) -> None:
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(
                f"embed_dim and num_heads must be greater than 0, got embed_dim={embed_dim} and num_heads={num_heads}"
            )
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        head_dim = embed_dim // num_heads
        if not head_dim_supported(head_dim):
            raise ValueError(
                f"head dim embed_dim / num_heads = {embed_dim} / {num_heads} = {head_dim} is not supported by "
                f"flash_quant: it must be {HEAD_DIM_RULE} "
                "(keep torch.nn.MultiheadAttention for this layer)"
            )
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        super().__init__()
        self.config = _validated_config(config)
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn

        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()
        self.register_forward_pre_hook(_fast_path_guard)

    def _reset_parameters(self) -> None:
        # torch's initialisation scheme: Xavier-uniform projections, zero biases,
        # Xavier-normal bias_k / bias_v; out_proj.weight keeps nn.Linear's default.
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention, config: ConfigLike = "accurate") -> "MultiheadAttention":
        """A flash_quant MultiheadAttention sharing `mha`'s parameters (no copy) and
        settings, in `mha`'s training mode. Raises ValueError if its head dim is not
        supported."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"from_float expects a torch.nn.MultiheadAttention, got {type(mha).__name__}")
        ref = mha.in_proj_weight if mha._qkv_same_embed_dim else mha.q_proj_weight
        new = cls(
            mha.embed_dim,
            mha.num_heads,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            add_bias_kv=mha.bias_k is not None,
            add_zero_attn=mha.add_zero_attn,
            kdim=mha.kdim,
            vdim=mha.vdim,
            batch_first=mha.batch_first,
            device="meta",
            dtype=ref.dtype,
            config=config,
        )
        names = ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k", "bias_v"]
        for name in names:
            setattr(new, name, getattr(mha, name))
        new.out_proj.weight = mha.out_proj.weight
        new.out_proj.bias = mha.out_proj.bias
        new.train(mha.training)
        return new

    def extra_repr(self) -> str:
        parts = [f"embed_dim={self.embed_dim}", f"num_heads={self.num_heads}"]
        if not self._qkv_same_embed_dim:
            parts.append(f"kdim={self.kdim}, vdim={self.vdim}")
        if self.dropout:
            parts.append(f"dropout={self.dropout}")
        parts.append(f"batch_first={self.batch_first}")
        name = self.config if isinstance(self.config, str) else self.config.name
        parts.append(f"config={name!r}")
        return ", ".join(parts)

    # --------------------------------------------------------------------- forward
    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.is_nested:
                raise ValueError(
                    f"flash_quant.nn.MultiheadAttention does not take nested tensors ({name}); pass padded "
                    "tensors with a key_padding_mask"
                )
        batched = query.dim() == 3
        _check_input_ranks(query, key, value, key_padding_mask, attn_mask, batched)
        self_attention = query is key and key is value
        same_kv = key is value

        # to batch-first (N, L, E)
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, tgt_len, e = query.shape
        src_len = key.shape[1]
        if e != self.embed_dim:
            raise ValueError(f"query embedding dim {e} does not match embed_dim {self.embed_dim}")
        if key.shape[:2] != value.shape[:2] or key.shape[0] != n:
            raise ValueError(
                f"key (batch, seq) {tuple(key.shape[:2])} and value {tuple(value.shape[:2])} must match, with the "
                f"query's batch {n}"
            )
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(
                f"key / value feature dims ({key.shape[-1]}, {value.shape[-1]}) do not match kdim / vdim "
                f"({self.kdim}, {self.vdim})"
            )
        attn_mask = _checked_attn_mask(attn_mask, n, self.num_heads, tgt_len, src_len)
        key_padding_mask = _checked_padding_mask(key_padding_mask, n, src_len)
        if is_causal:
            attn_mask = None  # torch's hint contract: attn_mask *is* the causal mask

        q, k, v = self._project(query, key, value, self_attention, same_kv)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(n, 1, e)], dim=1)
            v = torch.cat([v, self.bias_v.expand(n, 1, e)], dim=1)
            attn_mask, key_padding_mask = _pad_key(attn_mask), _pad_key(key_padding_mask)
        h, d = self.num_heads, self.head_dim
        q = q.unflatten(-1, (h, d)).transpose(1, 2)
        k = k.unflatten(-1, (h, d)).transpose(1, 2)
        v = v.unflatten(-1, (h, d)).transpose(1, 2)
        if self.add_zero_attn:
            zeros = k.new_zeros((n, h, 1, d))
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            attn_mask, key_padding_mask = _pad_key(attn_mask), _pad_key(key_padding_mask)
        mask = _sdpa_mask(attn_mask, key_padding_mask, n, h, tgt_len, k.shape[2])

        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if dropout_p > 0.0:
            _FALLBACKS.hit("dropout", f"training with dropout={dropout_p} runs unquantized explicit attention")
            out, weights = _explicit_attention(q, k, v, mask, is_causal, dropout_p)
        else:
            out = _fq_attention(q, k, v, attn_mask=mask, is_causal=is_causal, config=self.config)
            if need_weights:
                _FALLBACKS.hit("need_weights", "attention weights are computed explicitly; pass need_weights=False")
                _, weights = _explicit_attention(q, k, v, mask, is_causal, 0.0, want_output=False)

        out = self.out_proj(out.transpose(1, 2).flatten(2))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            weights = weights.squeeze(0)
        return out, weights.to(query.dtype)

    def _project(self, query, key, value, self_attention: bool, same_kv: bool):
        e = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if self_attention:
                return F.linear(query, w, b).chunk(3, dim=-1)
            wq, wk, wv = w.chunk(3)
            q = F.linear(query, wq, bq)
            if same_kv:
                k, v = F.linear(key, w[e:], None if b is None else b[e:]).chunk(2, dim=-1)
                return q, k, v
            return q, F.linear(key, wk, bk), F.linear(value, wv, bv)
        return (
            F.linear(query, self.q_proj_weight, bq),
            F.linear(key, self.k_proj_weight, bk),
            F.linear(value, self.v_proj_weight, bv),
        )


# ----------------------------------------------------------------------- helpers
def _validated_config(config: ConfigLike):
    if isinstance(config, str) and config == "auto":
        return config
    resolve_config(config)  # raises on an unknown preset / wrong type
    return config if config is not None else "accurate"


def _check_input_ranks(query, key, value, key_padding_mask, attn_mask, batched: bool) -> None:
    want = 3 if batched else 2
    if query.dim() not in (2, 3):
        raise ValueError(f"query must be 2-D (unbatched) or 3-D (batched), got shape {tuple(query.shape)}")
    if key.dim() != want or value.dim() != want:
        raise ValueError(
            f"for a {query.dim()}-D query, key and value must be {want}-D, got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    if key_padding_mask is not None and key_padding_mask.dim() != want - 1:
        raise ValueError(
            f"key_padding_mask must be {want - 1}-D for a {query.dim()}-D query, got shape {tuple(key_padding_mask.shape)}"
        )
    if attn_mask is not None and attn_mask.dim() not in (2, 3):
        raise ValueError(f"attn_mask must be 2-D or 3-D, got shape {tuple(attn_mask.shape)}")


def _check_mask_dtype(name: str, mask: Tensor) -> None:
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be bool (True = not allowed) or floating (added to the scores), got {mask.dtype}")


def _checked_attn_mask(mask, n, h, tgt_len, src_len):
    if mask is None:
        return None
    _check_mask_dtype("attn_mask", mask)
    if mask.dim() == 2:
        if tuple(mask.shape) != (tgt_len, src_len):
            raise ValueError(f"2-D attn_mask must be {(tgt_len, src_len)}, got {tuple(mask.shape)}")
        return mask
    if tuple(mask.shape) != (n * h, tgt_len, src_len):
        raise ValueError(f"3-D attn_mask must be {(n * h, tgt_len, src_len)} (batch * heads, L, S), got {tuple(mask.shape)}")
    return mask.view(n, h, tgt_len, src_len)


def _checked_padding_mask(mask, n, src_len):
    if mask is None:
        return None
    _check_mask_dtype("key_padding_mask", mask)
    if tuple(mask.shape) != (n, src_len):
        raise ValueError(f"key_padding_mask must be (batch, S) = {(n, src_len)}, got {tuple(mask.shape)}")
    return mask


def _pad_key(mask):
    """One more key column (bias_k / zero attention), allowed: False or 0."""
    return None if mask is None else F.pad(mask, (0, 1))


def _sdpa_mask(attn_mask, key_padding_mask, n, h, tgt_len, src_len):
    """torch MHA masks (bool True = not allowed, float added) to one SDPA-convention mask
    broadcastable to (N, H, L, S): bool True = attend when both are bool, else float."""
    masks = [m for m in (attn_mask, None if key_padding_mask is None else key_padding_mask.view(n, 1, 1, src_len)) if m is not None]
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        blocked = masks[0] if len(masks) == 1 else masks[0] | masks[1]
        return ~blocked
    total = None
    for m in masks:
        f = torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m.float()
        total = f if total is None else total + f
    return total


def _explicit_attention(q, k, v, mask, is_causal: bool, dropout_p: float, want_output: bool = True):
    """fp32 softmax(q kᵀ / sqrt(d) + mask) [· v]: the reference path for attention weights
    and dropout. Rows with no visible key give zero weights (as flash_quant)."""
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if is_causal:
        lq, lk = scores.shape[-2:]
        visible = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)
    if not want_output:
        return None, weights
    return torch.matmul(weights, v.float()).to(q.dtype), weights
