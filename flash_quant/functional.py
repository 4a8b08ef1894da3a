"""flash_quant.attention: a drop-in for F.scaled_dot_product_attention that quantizes."""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch

from . import ops
from .config import PRESETS, AttentionConfig, OperandConfig, Strategy, resolve_config
from .key_stats import visible_keys
from .operand import OperandArgs, operand_kwargs, stand_in
from .quantization import quantize_codes
from .quantized_tensor import QuantizedTensor
from .rotation import rotate, rotated_stand_in, unrotate
from .support import why_unsupported

__all__ = ["attention", "attention_with_lse", "which_kernel"]

Operand = Union[torch.Tensor, QuantizedTensor]


def attention(
    query: Operand,
    key: Operand,
    value: Operand,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    config: Union[str, AttentionConfig, None] = "accurate",
) -> torch.Tensor:
    """Scaled dot-product attention with quantized operands, SDPA semantics.

    Args:
      query: (B, Hq, Sq, D) float32 / float16 / bfloat16 tensor, or a QuantizedTensor.
      key:   (B, Hkv, Skv, D), same dtype and device as query, or a QuantizedTensor.
      value: (B, Hkv, Skv, D), likewise.
      attn_mask: None, a bool mask (True = attend) or a float mask added to the scores,
        broadcastable to (B, Hq, Sq, Skv). A float mask that requires grad (a learned
        bias) gets SDPA's gradient, summed over the dims it broadcasts along.
      dropout_p: must be 0 (dropout is not supported; a ValueError says so).
      is_causal: key j is visible to query i iff j <= i (top-left aligned, as SDPA).
        May be combined with attn_mask.
      scale: score scale, default 1/sqrt(D).
      enable_gqa: allow Hq to be a multiple of Hkv (grouped-query attention; K/V are not
        repeated in memory).
      config: a preset name — "accurate" (default: INT8 Q·Kᵀ per token with K smoothing
        and Hadamard rotation, 16-bit P·V), "fast" (INT8 P·V too), "int4", "fp8",
        "fp16" / "bf16" / "fp32" (unquantized), "auto" (chosen from the inputs' statistics,
        eager only) — or an AttentionConfig for per-operand precision / strategy /
        granularity.

    Returns:
      (B, Hq, Sq, D) in the dtype of the query (its original dtype when quantized). Rows
      with every key masked out are zeros. Differentiable with respect to float inputs
      and a float mask (straight-through for the quantized ones). A QuantizedTensor
      operand gets no gradient: one whose scale/mean require grad is refused in grad mode
      (pass the float tensor instead). A V quantized with rotate=True is refused.
    """
    return _attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, config)[0][0]


def attention_with_lse(
    query: Operand,
    key: Operand,
    value: Operand,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    config: Union[str, AttentionConfig, None] = "accurate",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """As `attention`, also returning the log-sum-exp of the scores, (B, Hq, Sq) float32
    (natural log; -inf for fully masked rows), so partial results over key shards can be
    merged: out = sum_i exp(lse_i - lse) * out_i with lse = logsumexp_i(lse_i)."""
    (out, lse), call = _attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, config)
    return out, lse if call is None else _lse_centre_term_from_float(lse, query, call)


def which_kernel(
    query: Operand,
    key: Operand,
    value: Operand,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    config: Union[str, AttentionConfig, None] = "accurate",
) -> Tuple[str, Optional[str]]:
    """Which forward kernel `attention(...)` with these arguments would run, and why not the
    fastest: ("sm90", None) (the Hopper CUDA C++ kernel), ("triton", reason) for other CUDA
    calls, ("cpu", None) or ("mps", None) on those devices. Quantizes the operands as the
    call would (the decision depends on what quantization produces) but runs no attention
    and counts no fallback. A call that runs as the one fused sm90 op (the accurate and fast
    presets on Hopper: `_fused_call`) is ("sm90", None) without quantizing."""
    if _is_cuda_tensor(query) and _fused_call(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                              enable_gqa, config) is not None:
        return "sm90", None
    kwargs = _forward_arguments(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, config).kwargs
    device = kwargs["q"].device
    if device.type != "cuda":
        return device.type, None
    from .cuda import dispatch

    return dispatch.forward_kernel(**kwargs)


def _attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, config):
    """((out in the query's dtype, the op's lse), the general path's _Call, or None where
    the fused sm90 op served the call: its lse already takes the centre term from the float q)."""
    if _is_cuda_tensor(query):
        fused = _fused_sm90(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, config)
        if fused is not None:
            return fused, None
    call = _forward_arguments(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, config)
    out, lse = ops.attention_forward(**call.kwargs)
    return (out.to(call.out_dtype), lse), call


_ACCURATE = PRESETS["accurate"]
_FAST = PRESETS["fast"]
_CUDA_DISPATCH = []  # [flash_quant.cuda.dispatch], imported at the first CUDA call


def _is_cuda_tensor(t) -> bool:
    """A plain tensor on a CUDA device: the only calls the fused sm90 op may take (tests
    replace this to route CPU tensors through a mocked Hopper dispatcher)."""
    return type(t) is torch.Tensor and t.is_cuda


def _fused_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, config):
    """(softmax scale, pv_int8) when the CUDA dispatcher says the call is the accurate or
    the fast preset on the Hopper kernel with nothing the general path must do first
    (dispatch.fused_sm90: the same quantization and kernel, ~10x less host time), else None."""
    if config is _ACCURATE or config is None or (type(config) is str and config == "accurate"):
        pv_int8 = False
    elif config is _FAST or (type(config) is str and config == "fast"):
        pv_int8 = True
    else:
        return None
    if not _CUDA_DISPATCH:
        from .cuda import dispatch

        _CUDA_DISPATCH.append(dispatch)
    s = _CUDA_DISPATCH[0].fused_sm90(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                     pv_int8)
    return None if s is None else (s, pv_int8)


def _fused_sm90(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, config):
    """(out, lse) from one fused op call where `_fused_call` takes the call, else None."""
    fused = _fused_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, config)
    return None if fused is None else ops.sm90_attention(query, key, value, bool(is_causal), *fused)


class _Call(NamedTuple):
    """One attention call as the op takes it."""

    kwargs: dict  # attention_forward's keyword arguments
    out_dtype: torch.dtype
    q_precision: str  # Q's precision ("none" when unquantized)
    rotated: bool  # Q and K quantized in the Hadamard-rotated space (k_mean is rotated too)


def _forward_arguments(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, config) -> _Call:
    """attention_forward's keyword arguments, and what else the call needs, of one call."""
    cfg = _resolve(config, query, key, value, is_causal)
    _check(query, key, value, attn_mask, dropout_p, scale, enable_gqa)
    out_dtype = query.dtype
    q, k, v = _operand_float(query), _operand_float(key), _operand_float(value)

    if cfg.compute_dtype is not None and not _computes_in(q, cfg.compute_dtype.float_dtype):
        # unquantized presets compute in one chosen dtype
        dt = cfg.compute_dtype.float_dtype
        q, k, v = (t.to(dt) if t.dtype != dt else t for t in (q, k, v))

    rotated = _rotation_wanted(cfg, query, key)
    q_op, q_rot = _rotated_operand(query, q, cfg.q) if rotated else (q, False)
    k_op, k_rot = _rotated_operand(key, k, cfg.k) if rotated else (k, False)
    visible = _visible_keys_if_needed(cfg, key, value, attn_mask, is_causal, q.shape, k.shape)
    with torch.no_grad():  # straight-through: gradients reach q/k/v through the attention
        # op's own formula, so the quantization steps need no autograd graph (nor its
        # saved copies of q and k)
        q_args = _operand_args(q_op, query, q, cfg.q, "q", q_rot)
        k_args = _operand_args(k_op, key, k, cfg.k, "k", k_rot, visible)
        v_args = _operand_args(v, value, v, cfg.v, "v", visible=visible)

    mask = _prepare_mask(attn_mask)
    kwargs = dict(operand_kwargs(q_args, k_args, v_args), attn_mask=mask, is_causal=bool(is_causal), scale=scale,
                  pv_precision=cfg.pv.value)
    if isinstance(query, QuantizedTensor):
        q_precision = query.precision.value
    else:
        q_precision = cfg.q.precision.value if cfg.q.quantized else "none"
    return _Call(kwargs, out_dtype, q_precision, rotated)


def _lse_centre_term_from_float(lse: torch.Tensor, query: Operand, call: _Call) -> torch.Tensor:
    """The lse with its smoothing term scale * q . k_mean taken from the float query.

    K smoothed by its centre (k_mean) leaves the scores' softmax unchanged, and the op
    adds scale * q . k_mean back to its lse from the Q it computes with: the dequantized
    codes. With a large centre (outlier channels: |k_mean| ~ 45) Q's rounding moves that
    term by tenths (max |lse - fp64| 0.13-0.35 on the realistic family, S 1-1000). The
    float query is at hand here (not in the op, which never reads a quantized operand's
    float), so swap the term: + scale * (q - q_deq) . k_mean, in float32, under no_grad
    (the lse is not differentiable). The fused sm90 path does the same in its pre-pass.
    Only attention_with_lse pays it (an O(B*H*S*D) pass); the backward keeps the op's
    own lse, against which it recomputes the scores."""
    kw = call.kwargs
    k_mean, q_data = kw["k_mean"], kw["q_data"]
    if k_mean is None or q_data is None or not isinstance(query, torch.Tensor):
        return lse
    with torch.no_grad():
        q_scale = kw["q_scale"]
        zero_point = kw["q_zero_point"]
        if zero_point is None:
            zero_point = q_scale.new_empty((0,), dtype=torch.int32)
        # (block_size 1: Q's scales are per token, one group a row)
        q_deq = ops.dequantize(q_data, q_scale, zero_point, q_scale.new_empty((0,)), call.q_precision, 1,
                               torch.float32)
        k_mean = k_mean.float()
        k_mean_x = unrotate(k_mean) if call.rotated else k_mean  # (q . Hm = Hq . m: H orthonormal)
        b, hq, sq, d = query.shape
        hkv = k_mean.shape[1]

        def dot(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:  # (B, Hq, Sq): x . m per query head
            grouped = x.float().view(b, hkv, hq // hkv, sq, d)
            return torch.einsum("bkgsd,bkd->bkgs", grouped, m.expand(b, hkv, 1, d)[:, :, 0]).reshape(b, hq, sq)

        scale = kw["scale"] if kw["scale"] is not None else d ** -0.5
        return lse + scale * (dot(query, k_mean_x) - dot(q_deq, k_mean))


# ---------------------------------------------------------------------------- helpers
def _resolve(config, query, key, value, is_causal) -> AttentionConfig:
    if isinstance(config, str) and config == "auto":
        # Eager: decided from the operands' statistics (one host sync). Under
        # torch.compile only shapes and dtype are known, so the static rule decides.
        from . import auto

        if any(isinstance(t, QuantizedTensor) for t in (query, key, value)):
            raise ValueError("config='auto' needs float query, key and value (not QuantizedTensors)")
        if torch.compiler.is_compiling():
            name, _ = auto.select_attention_preset_static(query.shape[-2], key.shape[-2], query.dtype)
        else:
            name, _ = auto.select_attention_preset(query, key, value)
        return resolve_config(name)
    return resolve_config(config)


def _check(query, key, value, attn_mask, dropout_p, scale, enable_gqa):
    problem = why_unsupported(
        query, key, value, attn_mask, dropout_p, scale=scale, enable_gqa=enable_gqa, quantized_type=QuantizedTensor
    )
    if problem is not None:
        raise problem.error(problem.message)


def _operand_float(x: Operand) -> torch.Tensor:
    """The float tensor the op sees as q/k/v. For a QuantizedTensor: a zero-stride
    stand-in of the right shape and dtype (the kernels read its data instead)."""
    if isinstance(x, QuantizedTensor):
        return stand_in(x.orig_shape, x.orig_dtype, x.device)
    return x


def _computes_in(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the kernels already compute in `dtype` for inputs like x: the CPU kernels
    convert every float input to float32 as they load it (exactly) and round the output
    once, so casting to float32 first would only copy q, k and v."""
    return x.dtype == dtype or (x.device.type == "cpu" and dtype == torch.float32)


def _rotation_wanted(cfg: AttentionConfig, query, key) -> bool:
    pre = [t.rotated for t in (query, key) if isinstance(t, QuantizedTensor)]
    if pre and len(set(pre)) > 1:
        raise ValueError("query and key QuantizedTensors disagree on Hadamard rotation (rotated=True/False)")
    if pre:
        return pre[0]
    return cfg.q.rotate and (cfg.q.quantized or cfg.k.quantized)


def _rotated_operand(given: Operand, x: torch.Tensor, cfg: OperandConfig):
    """(what the op sees as this float operand, whether its quantization rotates) when
    the call rotates Q and K. A quantized float operand is rotated by the quantize op
    (fused into the CUDA kernels), and every backend reads a quantized operand's codes,
    never its float: the op gets a stand-in for rotate(x) that costs nothing and carries
    the gradient back through the rotation. An unquantized one is rotated here (its
    floats are what the kernels read); a QuantizedTensor's codes are rotated already."""
    if not isinstance(given, torch.Tensor):
        return x, False
    if cfg.quantized:
        return rotated_stand_in(x), True
    return rotate(x), False


def _visible_keys_if_needed(cfg: AttentionConfig, key, value, attn_mask, is_causal, q_shape, k_shape):
    """key_stats.visible_keys when this call quantizes K or V here (their statistics over
    the keys must skip the keys no query sees), else None (no mask reduction)."""
    if not any(isinstance(t, torch.Tensor) and c.quantized for t, c in ((key, cfg.k), (value, cfg.v))):
        return None
    b, hq, sq, _ = q_shape
    return visible_keys(attn_mask, is_causal, b, hq, k_shape[1], sq, k_shape[2], device=key.device)


def _operand_args(float_arg: torch.Tensor, given: Operand, x: torch.Tensor, cfg: OperandConfig, role: str,
                  rotate: bool = False, visible: Optional[torch.Tensor] = None) -> OperandArgs:
    """The op's arguments for one operand: `float_arg` as its float tensor, with a given
    QuantizedTensor's fields, or `x` quantized per `cfg` (Hadamard-rotated first when
    `rotate`; `visible`: the keys some query sees, for K and V), or no codes for an
    unquantized operand. No QuantizedTensor is built per call."""
    if isinstance(given, QuantizedTensor):
        return _op_args(float_arg, given.data, given.scale, given.zero_point, given.mean, given.granularity,
                        given.strategy, given.orig_shape, role)
    if not cfg.quantized:
        return OperandArgs(float_arg)
    data, scale, zero_point, mean = quantize_codes(x, cfg, rotate=rotate, visible=visible)
    return _op_args(float_arg, data, scale, zero_point, mean if cfg.smooth else None, cfg.granularity,
                    cfg.strategy, tuple(x.shape), role)


def _op_args(float_arg, data, scale, zero_point, mean, granularity, strategy, shape, role: str) -> OperandArgs:
    """The operand as the op wants it: Q/K scales expanded to rows when blocked, zero
    points only for asymmetric operands, a mean only for K."""
    if granularity.name == "per_channel" and role in ("q", "k"):
        raise ValueError(f"a per_channel {role.upper()} cannot be used in attention: its scale varies along the head dim")
    zp = zero_point if strategy is Strategy.ASYMMETRIC else None
    if granularity.name == "per_block":  # the op takes row scales: expand the blocks
        rows = tuple(shape[:-1]) + (1,)
        scale = ops.expand_groups(scale, rows, granularity.block_size)
        zp = None if zp is None else ops.expand_groups(zp, rows, granularity.block_size)
    if role == "k":
        return OperandArgs(float_arg, data, scale, zp, mean)
    if role == "q" and mean is not None:
        raise ValueError("a smoothed query cannot be used in attention (smoothing Q needs a correction); smooth K only")
    if role == "v" and mean is not None:
        raise ValueError("a smoothed value cannot be used in attention; smooth K only")
    return OperandArgs(float_arg, data, scale, zp)


def _prepare_mask(attn_mask):
    """The mask at its own broadcastable 4-D shape (each dim 1 or full): the kernels
    broadcast it, and a float mask's gradient then has the mask's own shape (summed over
    the broadcast dims) rather than (B, Hq, Sq, Skv)."""
    if attn_mask is None:
        return None
    if attn_mask.dtype != torch.bool and attn_mask.dtype != torch.float32:
        attn_mask = attn_mask.float()
    while attn_mask.dim() < 4:
        attn_mask = attn_mask.unsqueeze(0)
    return attn_mask
