"""Reference math and input families used by tests and benchmarks.

`reference_attention` is the fp64 ground truth every backend is judged against;
`make_qkv` draws the two input families of the accuracy bars; `error_stats` gives the
relative L2 error and cosine similarity the bars are stated in.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["reference_attention", "reference_attention_backward", "make_qkv", "make_far_key_tile_qkv", "kernel_operands",
           "error_stats", "capture_cuda_graph"]


def _expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    return x.repeat_interleave(hq // x.shape[1], dim=1) if x.shape[1] != hq else x


def _visible_and_bias(q, k, attn_mask, is_causal):
    sq, skv = q.shape[-2], k.shape[-2]
    visible = torch.ones(sq, skv, dtype=torch.bool, device=q.device)
    if is_causal:
        visible = visible.tril()  # top-left aligned, as SDPA
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            bias = attn_mask.to(torch.float64)
    return visible, bias


def reference_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, return_lse=False):
    """SDPA semantics in float64: (B, H, S, D), GQA by head groups, bool or additive masks,
    top-left causal. Rows with no visible key give 0 (lse -inf)."""
    q64, k64, v64 = (t.to(torch.float64) for t in (q, k, v))
    k64, v64 = _expand_kv(k64, q.shape[1]), _expand_kv(v64, q.shape[1])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q64, k64.transpose(-1, -2)) * scale
    visible, bias = _visible_and_bias(q, k, attn_mask, is_causal)
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1).masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0))
    p = torch.nan_to_num(p, nan=0.0)
    out = torch.matmul(p, v64)
    return (out, lse) if return_lse else out


def reference_attention_backward(grad_out, q, k, v, attn_mask=None, is_causal=False, scale=None):
    """dq, dk, dv of reference_attention in float64 (through autograd on fp64 copies)."""
    leaves = [t.detach().to(torch.float64).requires_grad_(True) for t in (q, k, v)]
    out = reference_attention(*leaves, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    grads = torch.autograd.grad(out, leaves, grad_out.to(torch.float64))
    return tuple(grads)


def make_qkv(
    b: int,
    hq: int,
    sq: int,
    d: int,
    *,
    hkv: Optional[int] = None,
    skv: Optional[int] = None,
    family: str = "normal",
    dtype: torch.dtype = torch.float32,
    device="cpu",
    seed: Optional[int] = None,
):
    """Draw q (B, Hq, Sq, D), k and v (B, Hkv, Skv, D).

    family "normal": N(0, 1). family "realistic": N(0, 1) plus a per-channel bias on K
    (sigma 4), four outlier channels scaled x8 in Q and K, and a per-channel bias on V
    (sigma 1) — the shape of activations of real transformers.
    """
    hkv = hq if hkv is None else hkv
    skv = sq if skv is None else skv
    g = torch.Generator(device="cpu")
    # no seed: one drawn from torch's global generator, so torch.manual_seed (the tests'
    # FQ_TEST_SEED) replays the draw (torch.seed() would reseed it from the OS instead)
    g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, (1,)).item()))
    q = torch.randn(b, hq, sq, d, generator=g)
    k = torch.randn(b, hkv, skv, d, generator=g)
    v = torch.randn(b, hkv, skv, d, generator=g)
    if family == "realistic":
        k = k + 4.0 * torch.randn(b, hkv, 1, d, generator=g)
        outliers = torch.randperm(d, generator=g)[:4]
        q[..., outliers] *= 8.0
        k[..., outliers] *= 8.0
        v = v + torch.randn(b, hkv, 1, d, generator=g)
    elif family != "normal":
        raise ValueError(f"unknown input family {family!r}; expected 'normal' or 'realistic'")
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def make_far_key_tile_qkv(seed: Optional[int] = None):
    """(q, k, v) of shape (1, 1, 4, 64) / (1, 1, 128, 64) fp32 where row 0 scores keys
    0..63 at 87.8 and keys 64..127 at -12.5 (scale 1/8): the second 64-key tile lies
    ~100 nats under the running max, so its largest P (e^-100) is a denormal. Quantized-P
    kernels must round such a tile to (nearly) 0, not divide by its underflowed scale."""
    q, _, v = make_qkv(1, 1, 4, 64, skv=128, seed=seed)
    q = q / q.norm(dim=-1, keepdim=True) * 26.5  # |q|² ≈ 702: row i scores q_i·q_0 / 8
    k = q[0, 0, 0].expand(1, 1, 128, 64).clone()
    k[..., 64:, :] *= -1.0 / 7
    return q, k, v


def kernel_operands(q, k, v, recipe: str = "accurate", k_granularity: str = "per_token"):
    """The attention_forward operands of a preset's recipe, quantized by the ops (no
    rotation): INT8 Q per token and smoothed INT8 K (per token, or `k_granularity`); for
    recipe "fast" also INT8 V per channel (stored K-major by the quantizer) with INT8 P.
    Returns (keyword arguments of the op's quantized operands, pv_precision)."""
    if recipe not in ("accurate", "fast"):
        raise ValueError(f"recipe must be 'accurate' or 'fast', got {recipe!r}")
    from . import ops  # (loads the compiled extension: late, the references here need none)

    a, s, _, _ = ops.quantize(q, "int8", "per_token", 1, "symmetric", False)
    b, t, _, m = ops.quantize(k, "int8", k_granularity, 1, "symmetric", True)
    kw = dict(q_data=a, q_scale=s, k_data=b, k_scale=t, k_mean=m)
    if recipe == "accurate":
        return kw, "none"
    c, u, _, _ = ops.quantize(v, "int8", "per_channel", 1, "symmetric", False)
    kw.update(v_data=c, v_scale=u)
    return kw, "int8"


def group_reduce(x: torch.Tensor, granularity: str, block_size: int, fn) -> torch.Tensor:
    """fn (torch.amin / torch.amax: differentiable) over each quantization group of x, in
    the scale's shape (docs/op_contract.md) — the tests' reference for group ranges."""
    if granularity == "per_tensor":
        return fn(x.reshape(-1), 0).reshape((1,) * x.dim())
    if granularity == "per_head":
        return fn(fn(x, -1, keepdim=True), -2, keepdim=True)
    if granularity == "per_token":
        return fn(x, -1, keepdim=True)
    if granularity == "per_channel":
        return fn(x, -2, keepdim=True)
    rows = fn(x, -1, keepdim=True)  # per_block: runs of block_size rows
    return torch.cat([fn(b, -2, keepdim=True) for b in rows.split(block_size, dim=-2)], dim=-2)


def error_stats(actual: torch.Tensor, expected: torch.Tensor) -> dict:
    """Relative L2 error and cosine similarity of `actual` against `expected` (float64)."""
    a = actual.detach().to(torch.float64).flatten().cpu()
    e = expected.detach().to(torch.float64).flatten().cpu()
    denom = e.norm().item()
    rel = (a - e).norm().item() / denom if denom > 0 else (a - e).norm().item()
    na, ne = a.norm().item(), e.norm().item()
    cos = float((a @ e).item() / (na * ne)) if na > 0 and ne > 0 else float(na == ne)
    return {"rel_l2": rel, "cosine": cos, "max_abs": (a - e).abs().max().item() if a.numel() else 0.0}


def capture_cuda_graph(fn) -> "torch.cuda.CUDAGraph":
    """fn captured in a CUDA graph after one warm-up call on a side stream (as capture
    requires). Replaying it times the GPU's work alone, without the host's Python and
    launch overhead. Raises when fn cannot be captured (e.g. a host sync inside)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
