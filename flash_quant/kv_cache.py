"""A quantized, preallocated K/V cache for decode (issue 18; contract in the issue's
DECODE_API: names and semantics here are what the CUDA, Metal and HF code read).

One :class:`QuantizedKVCache` holds one attention layer's keys and values for a batch,
quantized as they are appended (in place, into buffers sized for ``max_len`` tokens; no
token is ever requantized). ``decode_attention`` (flash_quant/decode.py) reads the codes
directly. Why these schemes: docs/decode.md (measured table).

Storage layout (B = batch, H = kv_heads, L = max_len, D = head_dim; every buffer is
contiguous, token-major within a head; kernels index them as ``[b, h, token, ...]``)

precision="int8"  (K centred and smoothed per channel, then per-token symmetric int8;
                   V per-token symmetric int8)
    k_center  float32 (B, H, D)      per-channel centre, the mean of the first append's
                                     keys; fixed afterwards. Softmax is invariant to a
                                     per-channel shift of every key (q.(k - c) = q.k - q.c,
                                     the same for all keys of a row), so kernels ignore it;
                                     only dequantize() adds it back.
    k_smooth  float32 (B, H, D)      per-channel divisor in (0, 1], fixed at the first
                                     append (its max |k - k_center| per channel, floored,
                                     over its largest): keys are divided by it before the
                                     per-token scale, so a channel of large keys does not
                                     set every token's scale (docs/decode.md: per-token
                                     int8 K goes from 0.9 % to ~2-3.5 % rel-L2 when channel
                                     magnitudes spread like a model's). Kernels multiply q
                                     by it: q.k = (q * k_smooth) . (k / k_smooth).
    k_codes   int8    (B, H, L, D)   round((k - k_center) / k_smooth / k_scale), in [-127, 127]
    k_scale   float32 (B, H, L)      max |(k - k_center) / k_smooth| over the token's D channels / 127
    v_codes   int8    (B, H, L, D)   round(v / v_scale)
    v_scale   float32 (B, H, L)
    key j = k_codes[b, h, j] * k_scale[b, h, j] * k_smooth[b, h] (+ k_center[b, h]);
    value j = v_codes[b, h, j] * v_scale[b, h, j].

precision="int4"  (K per channel over groups of k_group tokens, asymmetric (KIVI);
                   V per token over groups of v_group channels, asymmetric)
    Codes are unsigned 4-bit, two per byte, "half-split": byte i of a token's row holds
    channel i in its low nibble and channel i + D/2 in its high nibble (a kernel unpacks
    a row into its two channel halves without interleaving).
    k_codes   uint8   (B, H, Lg*k_group, D/2)   Lg = ceil(L / k_group) + 1; tokens of
                                                 complete groups only (the last group
                                                 slot is an append's scratch, never read)
    k_scale   float16 (B, H, Lg, D)     (max - min) / 15 over the group's tokens, per channel
    k_zero    float16 (B, H, Lg, D)     min over the group's tokens, per channel
    k_window  dtype   (B, H, k_group, D) the newest length % k_group keys, unquantized
                                         (a group's per-channel statistics need all its
                                         tokens); window row r is token nfull + r with
                                         nfull = (length // k_group) * k_group
    v_codes   uint8   (B, H, L, D/2)
    v_scale   float16 (B, H, L, D / v_group)
    v_zero    float16 (B, H, L, D / v_group)
    key j < nfull = code * k_scale[b, h, j // k_group, c] + k_zero[b, h, j // k_group, c];
    value j, channel c = code * v_scale[b, h, j, c // v_group] + v_zero[...].
    fp16 scales / zeros bound the int4 cache to |x| < 65504 (a float16 model's range).

Both: ``length`` is a host int (tokens held, kept by eager appends) and ``length_tensor``
an int32 (1,) tensor on the cache's device holding the same count. Appends write at the
device count with device-side indices (no host sync), so a CUDA graph that captured an
append and a decode replays correctly as the cache grows; the host ``length`` is advanced
only by eager calls (after replaying a graph, :meth:`sync_length` reads the device count
back, a host sync).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from .config import Precision

__all__ = ["QuantizedKVCache", "dequantize_buffers", "PRECISIONS", "INT8_MAX", "INT4_MAX", "DEFAULT_K_GROUP",
           "DEFAULT_V_GROUP", "pack_int4", "unpack_int4"]

PRECISIONS = ("int8", "int4")
INT8_MAX = Precision.INT8.qmax                          # symmetric int8 codes in [-127, 127]
INT4_MAX = Precision.INT4.qmax - Precision.INT4.qmin    # asymmetric unsigned int4 codes in [0, 15]
DEFAULT_K_GROUP = 32    # int4 K: tokens per per-channel scale group (docs/decode.md)
DEFAULT_V_GROUP = 32    # int4 V: channels per per-token scale group (docs/decode.md)
#: int8 K smoothing: a channel's divisor is at least the mean one over this (a channel that
#: was near-constant in the first append must not blow up later keys divided by it)
SMOOTH_FLOOR_RATIO = 16.0
INT8_SCALE_DTYPE = torch.float32   # 4 bytes per 128-channel token: 3 % of the codes
INT4_SCALE_DTYPE = torch.float16   # fp32 would add 25 % to int4's bytes at group 32
CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 15] (..., D) -> (..., D/2): channel i low nibble, i + D/2 high."""
    half = codes.shape[-1] // 2
    return codes[..., :half] | (codes[..., half:] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: (..., D/2) uint8 -> (..., D) uint8 codes."""
    return torch.cat([packed & 0xF, packed >> 4], dim=-1)


def _symmetric_int8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dim) symmetric int8 of float32 x: (codes, scale)."""
    scale = x.abs().amax(-1) / INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: codes 0
    codes = torch.round(x / safe.unsqueeze(-1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


def _asymmetric_int4(x: torch.Tensor, dim: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes of float32 x with one (scale, zero) per slice along `dim`
    (reduced over `dim`). Codes use the stored (fp16-rounded) scale and zero, so dequantizing
    reproduces exactly what the codes were computed against."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    zero = lo.to(INT4_SCALE_DTYPE)
    scale = ((hi - lo) / INT4_MAX).to(INT4_SCALE_DTYPE)
    s = scale.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))  # a constant slice: codes 0
    codes = torch.round((x - zero.float()) / safe).clamp_(0, INT4_MAX).to(torch.uint8)
    return codes, scale.squeeze(dim), zero.squeeze(dim)


def dequantize_buffers(precision: str, n: int, k_codes, k_scale, k_zero, k_smooth, k_window,
                       v_codes, v_scale, v_zero, k_group: int, v_group: int):
    """The first n keys and values of a cache's buffers (the module docstring's formulas)
    in float32, (B, Hkv, n, D) each. int8 keys come without the centre: attention does
    not depend on it."""
    if precision == "int8":
        k = k_codes[:, :, :n].float() * k_scale[:, :, :n, None] * k_smooth[:, :, None]
        v = v_codes[:, :, :n].float() * v_scale[:, :, :n, None]
        return k, v
    b, h, d = k_codes.shape[0], k_codes.shape[1], 2 * k_codes.shape[3]
    g, gv = k_group, v_group
    nfull = (n // g) * g
    kc = unpack_int4(k_codes[:, :, :nfull]).float().reshape(b, h, nfull // g, g, d)
    kq = kc * k_scale[:, :, :nfull // g, None].float() + k_zero[:, :, :nfull // g, None].float()
    k = torch.cat([kq.reshape(b, h, nfull, d), k_window[:, :, :n - nfull].float()], 2)
    vc = unpack_int4(v_codes[:, :, :n]).float().reshape(b, h, n, d // gv, gv)
    v = vc * v_scale[:, :, :n, :, None].float() + v_zero[:, :, :n, :, None].float()
    return k, v.reshape(b, h, n, d)


class QuantizedKVCache:
    """One layer's quantized K/V (see the module docstring for the layout and schemes).

    Args: batch, kv_heads, head_dim, max_len: the buffers' sizes; precision "int8" |
    "int4"; dtype: the model's dtype (dequantize() returns it; the int4 window holds it);
    device; k_group / v_group: int4 group sizes (tokens per K group, channels per V group).
    """

    def __init__(self, batch: int, kv_heads: int, head_dim: int, max_len: int,
                 precision: str = "int8", dtype: torch.dtype = torch.bfloat16,
                 device=None, k_group: int = DEFAULT_K_GROUP, v_group: int = DEFAULT_V_GROUP):
        for name, value in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim),
                            ("max_len", max_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"QuantizedKVCache: {name} must be a positive int, got {value!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"QuantizedKVCache: precision must be one of {PRECISIONS}, got {precision!r}")
        if dtype not in CACHE_DTYPES:
            raise TypeError(f"QuantizedKVCache: dtype must be float32, float16 or bfloat16, got {dtype}")
        if precision == "int4":
            if head_dim % 2:
                raise ValueError(f"QuantizedKVCache: int4 packs two channels a byte: head_dim must be even, got {head_dim}")
            if not isinstance(k_group, int) or k_group < 1:
                raise ValueError(f"QuantizedKVCache: k_group must be a positive int, got {k_group!r}")
            if not isinstance(v_group, int) or v_group < 1 or head_dim % v_group:
                raise ValueError(f"QuantizedKVCache: v_group must divide head_dim {head_dim}, got {v_group!r}")
        self.batch, self.kv_heads, self.head_dim, self.max_len = batch, kv_heads, head_dim, max_len
        self.precision, self.dtype = precision, dtype
        # the device as tensors report it ("cuda" -> "cuda:<current>"), for the device checks
        self.device = torch.empty(0, device=device if device is not None else "cpu").device
        self.k_group, self.v_group = (k_group, v_group) if precision == "int4" else (None, None)
        shape = (batch, kv_heads)
        dev = self.device
        if precision == "int8":
            self.k_center = torch.zeros(*shape, head_dim, dtype=torch.float32, device=dev)
            self.k_smooth = torch.ones(*shape, head_dim, dtype=torch.float32, device=dev)
            self.k_codes = torch.zeros(*shape, max_len, head_dim, dtype=torch.int8, device=dev)
            self.k_scale = torch.zeros(*shape, max_len, dtype=INT8_SCALE_DTYPE, device=dev)
            self.v_codes = torch.zeros(*shape, max_len, head_dim, dtype=torch.int8, device=dev)
            self.v_scale = torch.zeros(*shape, max_len, dtype=INT8_SCALE_DTYPE, device=dev)
        else:
            groups = math.ceil(max_len / k_group) + 1  # + the scratch slot (_append_keys_int4)
            self.k_codes = torch.zeros(*shape, groups * k_group, head_dim // 2, dtype=torch.uint8, device=dev)
            self.k_scale = torch.zeros(*shape, groups, head_dim, dtype=INT4_SCALE_DTYPE, device=dev)
            self.k_zero = torch.zeros(*shape, groups, head_dim, dtype=INT4_SCALE_DTYPE, device=dev)
            self.k_window = torch.zeros(*shape, k_group, head_dim, dtype=dtype, device=dev)
            self.v_codes = torch.zeros(*shape, max_len, head_dim // 2, dtype=torch.uint8, device=dev)
            nv = head_dim // v_group
            self.v_scale = torch.zeros(*shape, max_len, nv, dtype=INT4_SCALE_DTYPE, device=dev)
            self.v_zero = torch.zeros(*shape, max_len, nv, dtype=INT4_SCALE_DTYPE, device=dev)
        self.length_tensor = torch.zeros(1, dtype=torch.int32, device=dev)
        self.length = 0

    # ------------------------------------------------------------------ bookkeeping
    def _buffers(self):
        names = (("k_center", "k_smooth", "k_codes", "k_scale", "v_codes", "v_scale") if self.precision == "int8"
                 else ("k_codes", "k_scale", "k_zero", "k_window", "v_codes", "v_scale", "v_zero"))
        return [(n, getattr(self, n)) for n in names] + [("length_tensor", self.length_tensor)]

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer: codes, scales, zero points, centre, window, counter."""
        return sum(t.numel() * t.element_size() for _, t in self._buffers())

    def reset(self) -> None:
        """Forget every token (buffers are kept; int8's centre and smoothing are set again
        by the next append)."""
        self.length = 0
        self.length_tensor.zero_()

    def sync_length(self) -> int:
        """Read the device token count back into ``length`` (a host sync): needed only after
        replaying a CUDA graph that appended."""
        self.length = int(self.length_tensor.item())
        return self.length

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Reorder the batch rows (beam search): row i becomes old row beam_idx[i], in place."""
        idx = beam_idx.to(self.device, torch.long)
        if idx.dim() != 1 or idx.shape[0] != self.batch:
            raise ValueError(f"reorder: beam_idx must be ({self.batch},), got {tuple(beam_idx.shape)}")
        for name, t in self._buffers():
            if name != "length_tensor":
                t.copy_(t.index_select(0, idx))

    # ------------------------------------------------------------------ append
    def _check_append(self, k, v) -> int:
        want = (self.batch, self.kv_heads)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"append: {name} must be a floating torch.Tensor")
            if t.dim() != 4 or tuple(t.shape[:2]) != want or t.shape[3] != self.head_dim:
                raise ValueError(f"append: {name} must be (B, Hkv, T, D) = ({want[0]}, {want[1]}, T, "
                                 f"{self.head_dim}), got {tuple(t.shape)}")
            if t.device != self.device:
                raise ValueError(f"append: {name} is on {t.device}, the cache on {self.device}")
        if k.shape != v.shape:
            raise ValueError(f"append: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        t = k.shape[2]
        if t < 1:
            raise ValueError("append: no tokens (T = 0)")
        if self.length + t > self.max_len:
            raise ValueError(f"append: {self.length} + {t} tokens exceed the cache's max_len {self.max_len}")
        return t

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize k, v (B, Hkv, T, D) into the buffers at the current length, in place."""
        t = self._check_append(k, v)
        if self.precision == "int8" and self.length == 0:
            self._set_key_statistics(k.float())
        self._write(k, v, t)
        self.length += t
        self.length_tensor.add_(t)

    def _set_key_statistics(self, k: torch.Tensor) -> None:
        """int8: the centre and smoothing divisors, from the first append's keys."""
        center = k.mean(2)
        spread = (k - center.unsqueeze(2)).abs().amax(2)
        spread = torch.maximum(spread, spread.mean(-1, keepdim=True) / SMOOTH_FLOOR_RATIO)
        top = spread.amax(-1, keepdim=True)
        # (one token, or constant keys: no spread, no smoothing)
        smooth = torch.where(top > 0, spread / torch.where(top > 0, top, torch.ones_like(top)),
                             torch.ones_like(spread))
        self.k_center.copy_(center)
        self.k_smooth.copy_(smooth)

    def _write(self, k, v, t: int) -> None:
        """Quantize into the buffers at the device count (no host sync, CUDA-graph safe):
        on CUDA the Triton append kernels (1-3 launches), elsewhere (and for shapes they do
        not take) the torch reference."""
        if k.is_cuda:
            from .cuda import kv_append
            if kv_append.supported(self):
                kv_append.append_cuda(self, k, v)
                return
        self._append_torch(k, v, t)

    def _positions(self, t: int) -> torch.Tensor:
        """Token indices length .. length + t - 1, computed on the device (no host sync)."""
        return self.length_tensor.long() + torch.arange(t, device=self.device)

    def _append_torch(self, k, v, t: int) -> None:
        """The reference append (torch ops, device-side offsets)."""
        pos = self._positions(t)
        if self.precision == "int8":
            kc, ks = _symmetric_int8((k.float() - self.k_center.unsqueeze(2)) / self.k_smooth.unsqueeze(2))
            vc, vs = _symmetric_int8(v.float())
            self.k_codes.index_copy_(2, pos, kc)
            self.k_scale.index_copy_(2, pos, ks)
            self.v_codes.index_copy_(2, pos, vc)
            self.v_scale.index_copy_(2, pos, vs)
            return
        b, h, d, gv = self.batch, self.kv_heads, self.head_dim, self.v_group
        vc, vs, vz = _asymmetric_int4(v.float().reshape(b, h, t, d // gv, gv), -1)
        self.v_codes.index_copy_(2, pos, pack_int4(vc.reshape(b, h, t, d)))
        self.v_scale.index_copy_(2, pos, vs)
        self.v_zero.index_copy_(2, pos, vz)
        self._append_keys_int4(k, t)

    def _append_keys_int4(self, k, t: int) -> None:
        """K goes through the window: tokens from the window's first one (nfull) onwards
        are staged, every complete group of k_group tokens is quantized per channel into
        its slot, the incomplete rest becomes the new window. Offsets are device tensors,
        so the same ops serve a captured graph at any length."""
        g = self.k_group
        b, h, d = self.batch, self.kv_heads, self.head_dim
        n_stage = math.ceil((g + t) / g) * g  # window + new tokens, in whole groups
        length = self.length_tensor.long()
        fill = length % g                      # tokens already in the window
        group0 = length // g                   # the window's group index
        stage = torch.zeros(b, h, n_stage, d, dtype=torch.float32, device=self.device)
        stage[:, :, :g] = self.k_window.float()
        stage.index_copy_(2, fill + torch.arange(t, device=self.device), k.float())
        complete = (fill + t) // g             # complete groups in the stage (device)
        codes, scale, zero = _asymmetric_int4(stage.reshape(b, h, n_stage // g, g, d), 3)
        codes = pack_int4(codes).reshape(b, h, n_stage, d // 2)
        # complete groups go to their slots, the others to the scratch slot (whose content
        # is never read; several groups may land there)
        scratch = self.k_scale.shape[2] - 1
        j = torch.arange(n_stage // g, device=self.device)
        slot = torch.where(j < complete, group0 + j, torch.full_like(j, scratch))
        self.k_scale.index_copy_(2, slot, scale)
        self.k_zero.index_copy_(2, slot, zero)
        tok = (slot[:, None] * g + torch.arange(g, device=self.device)).reshape(-1)
        self.k_codes.index_copy_(2, tok, codes)
        # the new window: the stage's tokens after its complete groups
        rest = complete * g + torch.arange(g, device=self.device)
        rest = rest.clamp_max(n_stage - 1)
        self.k_window.copy_(stage.index_select(2, rest).to(self.dtype))

    # ------------------------------------------------------------------ reading
    def dequantize(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(k, v), each (B, Hkv, length, D) in the cache's dtype (tests, reference path)."""
        k, v = dequantize_buffers(self.precision, self.length, *self.kernel_buffers(),
                                  self.k_group or 0, self.v_group or 0)
        if self.precision == "int8":
            k = k + self.k_center[:, :, None]
        return k.to(self.dtype), v.to(self.dtype)

    def kernel_buffers(self):
        """The buffers a decode kernel reads, in the order of the decode_attention op's
        schema (csrc/schema.cpp): k_codes, k_scale, k_zero, k_smooth, k_window, v_codes,
        v_scale, v_zero (None where the precision has no such buffer)."""
        if self.precision == "int8":
            return (self.k_codes, self.k_scale, None, self.k_smooth, None,
                    self.v_codes, self.v_scale, None)
        return (self.k_codes, self.k_scale, self.k_zero, None, self.k_window,
                self.v_codes, self.v_scale, self.v_zero)

    def __repr__(self) -> str:
        return (f"QuantizedKVCache({self.precision}, batch={self.batch}, kv_heads={self.kv_heads}, "
                f"head_dim={self.head_dim}, length={self.length}/{self.max_len}, nbytes={self.nbytes})")
