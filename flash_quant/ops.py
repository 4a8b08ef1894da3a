"""Typed wrappers over torch.ops.flash_quant.*, with their fake kernels and autograd.

The schemas live in csrc/schema.cpp; the kernels per device in csrc/cpu (CPU),
flash_quant/cuda (CUDA, Triton) and csrc/mps + metal (MPS). This file adds what every
backend shares: shape inference for torch.compile (fake kernels) and the derivative
formulas (built only from registered ops). docs/op_contract.md is the contract.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _extension  # noqa: F401  (checks the build's torch, loads the schemas and CPU kernels)
from . import rotation
from ._checks import check_center
from .config import QUANTIZED_PRECISIONS, Precision
from .groups import expand_groups, group_amax, reduce_groups, scale_shape
from .layout import cuda_kmajor_layout, cuda_kmajor_seq_len
from .mask_gradient import mask_gradient
from .operand import ROLES, OperandArgs, operand_kwargs, schema_names, stand_in

__all__ = [
    "quantize",
    "quantize_with_scale",
    "dequantize",
    "attention_forward",
    "attention_backward",
    "attention_prologue",
    "decode_attention",
    "scale_shape",
    "expand_groups",
    "reduce_groups",
    "DATA_DTYPES",
    "QMAX",
]

_ops = torch.ops.flash_quant

#: Largest quantized magnitude of each precision (docs/op_contract.md, scale = absmax / QMAX),
#: read from the Precision table (flash_quant/config.py).
QMAX = {p: Precision(p).qmax for p in QUANTIZED_PRECISIONS}

#: Storage dtype of each quantized precision (from the same table).
DATA_DTYPES = {p: Precision(p).storage_dtype for p in QUANTIZED_PRECISIONS}


# --------------------------------------------------------------------------- quantize
def quantize(
    x: torch.Tensor,
    precision: str,
    granularity: str,
    block_size: int,
    strategy: str,
    smooth: bool,
    rotate: bool = False,
    center: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(data, scale, zero_point, mean) — see docs/op_contract.md. rotate: quantize
    x @ hadamard_matrix(D) (every output is then of the rotated values). center (with
    smooth): the smoothing centre to subtract instead of the mean over dim -2, in the
    quantized values' space; returned as `mean`."""
    if center is not None:  # one error type and message on every backend, before any kernel
        check_center(x, center, smooth)
    return _ops.quantize(x, precision, granularity, block_size, strategy, smooth, rotate, center)


def _new_data(x, shape, precision, granularity):
    dtype = DATA_DTYPES[precision]
    if x.device.type == "cuda" and cuda_kmajor_layout(shape, precision, granularity):
        s, d = shape[-2], shape[-1]
        s_pad = cuda_kmajor_seq_len(s)
        return x.new_empty(tuple(shape[:-2]) + (d, s_pad), dtype=dtype)[..., :s].transpose(-1, -2)
    data_shape = shape[:-1] + (shape[-1] // 2,) if precision == "int4" else shape
    return x.new_empty(data_shape, dtype=dtype)


@torch.library.register_fake("flash_quant::quantize")
def _quantize_fake(x, precision, granularity, block_size, strategy, smooth, rotate=False, center=None):
    if center is not None:
        check_center(x, center, smooth)  # the kernels' errors, under torch.compile too
    shape = tuple(x.shape)
    data = _new_data(x, shape, precision, granularity)  # strides as the real kernels
    sshape = scale_shape(shape, granularity, block_size)
    scale = x.new_empty(sshape, dtype=torch.float32)
    zero_point = x.new_empty(sshape, dtype=torch.int32)
    mean = x.new_empty(shape[:-2] + (1, shape[-1]) if smooth else (0,), dtype=torch.float32)
    return data, scale, zero_point, mean


def _quantize_setup(ctx, inputs, output):
    x, precision, granularity, block_size, strategy, smooth, rotate, center = inputs  # defaults filled in
    data, scale, zero_point, _ = output
    ctx.mark_non_differentiable(data, zero_point)
    ctx.save_for_backward(x, scale, zero_point, center)
    ctx.args = (precision, granularity, block_size, strategy, smooth, rotate)


def _quantize_backward(ctx, grad_data, grad_scale, grad_zero_point, grad_mean):
    """Exact derivatives of the float outputs: the mean (linear) and the scale (a
    subgradient of absmax for symmetric, of the clipped range for asymmetric).

    With rotate, the statistics are of y = x @ H (float32): the gradients below are with
    respect to y, and the one with respect to x is that times Hᵀ.

    A given centre is a constant here (it gets no gradient): the mean output is then not a
    function of x, and the statistics were taken on y - center."""
    x, scale, zero_point, center = ctx.saved_tensors
    precision, granularity, block_size, strategy, smooth, rotate = ctx.args

    def to_x(g):  # gradient w.r.t. the quantized values -> w.r.t. x
        return (rotation.unrotate(g.float()) if rotate else g).to(x.dtype)

    grad_x = None
    if grad_mean is not None and smooth and center is None:
        grad_x = to_x((grad_mean / x.shape[-2]).expand(x.shape))
    if grad_scale is not None:
        # rotation.rotate works in its input's dtype: rotate the float32 copy
        xf = rotation.rotate(x.float()) if rotate else x.float()
        if smooth:
            xf = xf - (center if center is not None else xf.mean(dim=-2, keepdim=True))
        qmax = QMAX[precision]
        g = expand_groups(grad_scale, x.shape, block_size)
        if strategy == "asymmetric":
            qmin = Precision(precision).qmin
            levels = qmax - qmin
            hi = expand_groups(group_amax(xf, scale.shape, block_size).clamp_min(0), x.shape, block_size)
            lo = expand_groups((-group_amax(-xf, scale.shape, block_size)).clamp_max(0), x.shape, block_size)
            is_hi = (xf == hi) & (hi > 0)
            is_lo = (xf == lo) & (lo < 0)
            n_hi = expand_groups(reduce_groups(is_hi.float(), scale.shape, block_size), x.shape, block_size)
            n_lo = expand_groups(reduce_groups(is_lo.float(), scale.shape, block_size), x.shape, block_size)
            d = is_hi.float() / n_hi.clamp_min(1) - is_lo.float() / n_lo.clamp_min(1)
            contrib = g * d / levels
        else:
            # the group absmax recomputed from xf, not scale * qmax: (a / qmax) * qmax is
            # not always a in float32 (~0.5 % of groups got no gradient), and with rotate
            # xf may differ from the kernel's rotated values in the last bit
            absmax = expand_groups(group_amax(xf.abs(), scale.shape, block_size), x.shape, block_size)
            is_max = (xf.abs() == absmax) & (absmax > 0)
            n = expand_groups(reduce_groups(is_max.float(), scale.shape, block_size), x.shape, block_size)
            contrib = g * torch.sign(xf) * is_max.float() / n.clamp_min(1) / qmax
        if smooth and center is None:  # the group statistics were taken on x - mean(x)
            contrib = contrib - contrib.mean(dim=-2, keepdim=True)
        grad_x = to_x(contrib) if grad_x is None else grad_x + to_x(contrib)
    return grad_x, None, None, None, None, None, None, None


torch.library.register_autograd("flash_quant::quantize", _quantize_backward, setup_context=_quantize_setup)


def quantize_with_scale(
    x: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], precision: str, block_size: int
) -> torch.Tensor:
    """data = clamp(round(x / scale) + zero_point) with caller-supplied group scales."""
    return _ops.quantize_with_scale(x, scale, zero_point, precision, block_size)


@torch.library.register_fake("flash_quant::quantize_with_scale")
def _quantize_with_scale_fake(x, scale, zero_point, precision, block_size):
    shape = tuple(x.shape)
    if precision == "int4":
        shape = shape[:-1] + (shape[-1] // 2,)
    return x.new_empty(shape, dtype=DATA_DTYPES[precision])


def _no_gradient(ctx, grad_data):
    # The only output is integer / float8 data: autograd never asks for this. Registered
    # so the op has an explicit (empty) derivative like every flash_quant op.
    return None, None, None, None, None


torch.library.register_autograd("flash_quant::quantize_with_scale", _no_gradient)


# ------------------------------------------------------------------------- dequantize
def dequantize(
    data: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    mean: torch.Tensor,
    precision: str,
    block_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(data - zero_point) * scale + mean, in `dtype`, INT4 unpacked."""
    return _ops.dequantize(data, scale, zero_point, mean, precision, block_size, dtype)


@torch.library.register_fake("flash_quant::dequantize")
def _dequantize_fake(data, scale, zero_point, mean, precision, block_size, dtype):
    shape = tuple(data.shape)
    if precision == "int4":
        shape = shape[:-1] + (shape[-1] * 2,)
    return data.new_empty(shape, dtype=dtype)


def _dequantize_setup(ctx, inputs, output):
    data, scale, zero_point, mean, precision, block_size, dtype = inputs
    ctx.save_for_backward(data, scale, zero_point)
    ctx.args = (precision, block_size, mean.numel() > 0, tuple(mean.shape))


def _dequantize_backward(ctx, grad):
    """d/dscale = (q - z) summed per group; d/dmean = grad summed over the sequence."""
    data, scale, zero_point = ctx.saved_tensors
    precision, block_size, has_mean, mean_shape = ctx.args
    grad_scale = grad_mean = None
    if ctx.needs_input_grad[1]:
        unit = torch.ones_like(scale)
        empty = scale.new_empty((0,))
        centered = _ops.dequantize(data, unit, zero_point, empty, precision, block_size, torch.float32)
        grad_scale = reduce_groups(grad.float() * centered, scale.shape, block_size)
    if has_mean and ctx.needs_input_grad[3]:
        grad_mean = grad.float().sum_to_size(mean_shape)
    return None, grad_scale, None, grad_mean, None, None, None


torch.library.register_autograd("flash_quant::dequantize", _dequantize_backward, setup_context=_dequantize_setup)


# ----------------------------------------------------------------- attention prologue
def attention_prologue(
    x: torch.Tensor,
    prefix: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    prefix_weight: Optional[torch.Tensor] = None,
    eps: Optional[float] = None,
    cos: Optional[torch.Tensor] = None,
    sin: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """RMS norm per head, prefix tokens, rotary embedding, (B, S, H, D) -> (B, H, P + S, D)
    in one pass (csrc/schema.cpp states the formulas)."""
    return _ops.attention_prologue(x, prefix, weight, prefix_weight, eps, cos, sin)


@torch.library.register_fake("flash_quant::attention_prologue")
def _attention_prologue_fake(x, prefix, weight, prefix_weight, eps, cos, sin):
    b, s, h, d = x.shape
    p = 0 if prefix is None else prefix.shape[1]
    return x.new_empty((b, h, p + s, d))


def _attention_prologue_setup(ctx, inputs, output):
    x, prefix, weight, prefix_weight, eps, cos, sin = inputs
    ctx.save_for_backward(x, prefix, weight, prefix_weight, cos, sin)
    ctx.eps = eps


def _rope_partner(t: torch.Tensor) -> torch.Tensor:
    """The rotary partner of each channel: (-t[2i+1], t[2i]) at (2i, 2i+1)."""
    pairs = t.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def _rms_norm_backward(x, weight, eps, grad):
    """Gradients of y = x * rsqrt(mean(x^2) + eps) (* weight) for x and weight, given dL/dy."""
    xf = x.to(grad.dtype)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    n = xf * r
    grad_w = None if weight is None else (grad * n).flatten(0, -2).sum(0).to(weight.dtype)
    dn = grad if weight is None else grad * weight.to(grad.dtype)
    dx = r * (dn - n * (dn * n).mean(-1, keepdim=True))
    return dx, grad_w


def _attention_prologue_backward(ctx, grad):
    x, prefix, weight, prefix_weight, cos, sin = ctx.saved_tensors
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    g = grad.to(ct).transpose(1, 2)  # (B, P + S, H, D)
    if cos is not None:  # y*c + partner(y)*s is linear in y: its transpose is g*c - partner(g*s)
        c, s = (t.to(ct)[None, :, None, :] for t in (cos, sin))
        g = g * c - _rope_partner(g * s)
    p = 0 if prefix is None else prefix.shape[1]
    gp, gx = g[:, :p], g[:, p:]
    if ctx.eps is None:
        dx, dw, dp, dpw = gx, None, (gp if prefix is not None else None), None
    else:
        dx, dw = _rms_norm_backward(x, weight, ctx.eps, gx)
        dp, dpw = (None, None) if prefix is None else _rms_norm_backward(prefix, prefix_weight, ctx.eps, gp)
    return (
        dx.to(x.dtype),
        None if dp is None else dp.to(prefix.dtype),
        dw,
        dpw,
        None,  # eps
        None,  # cos: the rotary tables get no gradient (docs/op_contract.md)
        None,  # sin
    )


torch.library.register_autograd(
    "flash_quant::attention_prologue", _attention_prologue_backward, setup_context=_attention_prologue_setup
)


# ------------------------------------------------------------------- attention forward
def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_data: Optional[torch.Tensor] = None,
    q_scale: Optional[torch.Tensor] = None,
    q_zero_point: Optional[torch.Tensor] = None,
    k_data: Optional[torch.Tensor] = None,
    k_scale: Optional[torch.Tensor] = None,
    k_zero_point: Optional[torch.Tensor] = None,
    k_mean: Optional[torch.Tensor] = None,
    v_data: Optional[torch.Tensor] = None,
    v_scale: Optional[torch.Tensor] = None,
    v_zero_point: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    pv_precision: str = "none",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Hq, Sq, D) in q.dtype, lse (B, Hq, Sq) float32)."""
    return _ops.attention_forward(
        q, k, v, q_data, q_scale, q_zero_point, k_data, k_scale, k_zero_point, k_mean,
        v_data, v_scale, v_zero_point, attn_mask, is_causal, scale, pv_precision,
    )


@torch.library.register_fake("flash_quant::attention_forward")
def _attention_forward_fake(q, k, v, *args):
    b, hq, sq, d = q.shape
    out = q.new_empty((b, hq, sq, v.shape[-1]))
    lse = q.new_empty((b, hq, sq), dtype=torch.float32)
    return out, lse


# (a flash_quant._C compiled before csrc/schema.cpp had them)
if not hasattr(_ops, "_sm90_attention_forward") or not hasattr(_ops, "_sm90_attention"):
    raise ImportError("flash_quant's C++ extension (flash_quant._C) predates the ops _sm90_attention_forward / "
                      f"_sm90_attention of csrc/schema.cpp: it is stale; {_extension._REBUILD}")


@torch.library.register_fake("flash_quant::_sm90_attention_forward")
def _sm90_attention_forward_fake(q_data, q_scale, k_data, k_scale, k_mean, v, v_data, v_scale,
                                 nonfinite, is_causal, scale):
    # Internal op of the Hopper CUDA kernel (flash_quant/cuda/dispatch.py): out in v's
    # 16-bit dtype, lse float32; shapes as attention_forward's.
    b, hq, sq, _ = q_data.shape
    out = q_data.new_empty((b, hq, sq, v.shape[-1]), dtype=v.dtype)
    lse = q_data.new_empty((b, hq, sq), dtype=torch.float32)
    return out, lse


def sm90_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool,
                   scale: float, pv_int8: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the accurate preset (pv_int8: the fast preset) on the Hopper kernel
    from 16-bit q, k, v in one op call (internal: flash_quant.cuda.dispatch.fused_sm90
    says when; no autograd)."""
    return _SM90_ATTENTION(q, k, v, is_causal, scale, pv_int8)


_SM90_ATTENTION = _ops._sm90_attention.default


@torch.library.register_fake("flash_quant::_sm90_attention")
def _sm90_attention_fake(q, k, v, is_causal, scale, pv_int8=False):
    b, hq, sq, d = q.shape
    return q.new_empty((b, hq, sq, d)), q.new_empty((b, hq, sq), dtype=torch.float32)


#: attention_forward's argument names in schema order: its inputs are read by these names.
_FORWARD_ARGS = schema_names(_ops.attention_forward.default)


def _attention_setup(ctx, inputs, output):
    args = dict(zip(_FORWARD_ARGS, inputs))
    out, lse = output
    ctx.mark_non_differentiable(lse)
    # Every backend's backward reads a quantized operand's data, never its float tensor
    # (docs/op_contract.md: a zero-stride stand-in may take its place). Keep only the
    # float's metadata, so the graph does not hold e.g. the rotated copies of q and k:
    # at 4x32x4096x128 bf16 that is 256 MiB of the fwd+bwd peak.
    operands = [OperandArgs.from_inputs(role, args) for role in ROLES]
    ctx.stand_ins = [(x.float.shape, x.float.dtype, x.float.device) if x.quantized else None for x in operands]
    kept = [x._replace(float=None) if x.quantized else x for x in operands]
    ctx.save_for_backward(args["attn_mask"], out, lse, *(t for x in kept for t in x))
    ctx.flags = {name: args[name] for name in ("is_causal", "scale", "pv_precision")}


def _attention_backward(ctx, grad_out, grad_lse):
    attn_mask, out, lse, *flat = ctx.saved_tensors
    n = len(OperandArgs._fields)
    operands = (OperandArgs(*flat[i:i + n]) for i in range(0, len(flat), n))
    q, k, v = (x if meta is None else x._replace(float=stand_in(*meta)) for x, meta in zip(operands, ctx.stand_ins))
    grad_out = grad_out.contiguous()
    need = dict(zip(_FORWARD_ARGS, ctx.needs_input_grad))
    grads = {}
    if any(need[role] for role in ROLES):
        dq, dk, dv = _ops.attention_backward(
            grad_out=grad_out, out=out, lse=lse, **operand_kwargs(q, k, v), attn_mask=attn_mask, **ctx.flags
        )
        grads.update((role, g) for role, g in zip(ROLES, (dq, dk, dv)) if need[role])
    # A float mask that requires grad gets dS summed to its shape (flash_quant/mask_gradient.py);
    # a bool mask never requires grad. Nothing is computed for a mask without gradient.
    if need["attn_mask"]:
        grads["attn_mask"] = mask_gradient(grad_out, q, k, v, out, lse, attn_mask, ctx.flags["is_causal"],
                                           ctx.flags["scale"])
    return tuple(grads.get(name) for name in _FORWARD_ARGS)


torch.library.register_autograd(
    "flash_quant::attention_forward", _attention_backward, setup_context=_attention_setup
)


# ------------------------------------------------------------------ attention backward
def attention_backward(
    grad_out, q, k, v, out, lse,
    q_data=None, q_scale=None, q_zero_point=None,
    k_data=None, k_scale=None, k_zero_point=None, k_mean=None,
    v_data=None, v_scale=None, v_zero_point=None,
    attn_mask=None, is_causal=False, scale=None, pv_precision="none",
):
    """(dq, dk, dv) — gradients of attention_forward's output (straight-through)."""
    return _ops.attention_backward(
        grad_out, q, k, v, out, lse, q_data, q_scale, q_zero_point, k_data, k_scale, k_zero_point,
        k_mean, v_data, v_scale, v_zero_point, attn_mask, is_causal, scale, pv_precision,
    )


@torch.library.register_fake("flash_quant::attention_backward")
def _attention_backward_fake(grad_out, q, k, v, *args):
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
    )


def _attention_backward_setup(ctx, inputs, output):
    pass


def _attention_double_backward(ctx, *grads):
    raise RuntimeError(
        "flash_quant.attention_backward is not differentiable (no double backward); "
        "use config='fp32' with torch.nn.functional.scaled_dot_product_attention for higher-order gradients"
    )


torch.library.register_autograd(
    "flash_quant::attention_backward", _attention_double_backward, setup_context=_attention_backward_setup
)


# --------------------------------------------------------------------------- decode
def decode_attention(q, k_codes, k_scale, k_zero, k_smooth, k_window, v_codes, v_scale, v_zero,
                     length, attn_mask=None, scale=None, precision="int8", k_group=0, v_group=0):
    """Decode attention over a quantized KV cache's buffers (csrc/schema.cpp;
    flash_quant.decode_attention takes the QuantizedKVCache itself)."""
    return _ops.decode_attention(q, k_codes, k_scale, k_zero, k_smooth, k_window, v_codes, v_scale,
                                 v_zero, length, attn_mask, scale, precision, k_group, v_group)


@torch.library.register_fake("flash_quant::decode_attention")
def _decode_attention_fake(q, *args):
    return q.new_empty(q.shape)


def _register_device_backends():
    """CUDA kernels are Triton: import (and so register) them where CUDA exists."""
    if not torch.cuda.is_available():
        return
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # explicit: there is no silent CPU fallback for CUDA tensors
        raise ImportError("flash_quant needs triton for CUDA tensors: pip install '.[cuda]' from the flash_quant "
                          "checkout (or pip install 'triton>=3.2')") from exc
    from . import cuda  # noqa: F401


from . import decode_cpu  # noqa: E402,F401  (the CPU kernel of decode_attention: a torch reference)

_register_device_backends()
