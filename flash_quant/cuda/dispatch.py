"""Which CUDA kernel serves a flash_quant::attention_forward call: the one place that decides.

Two forward kernels exist for CUDA tensors:

* ``"sm90"``: the Hopper CUDA C++ kernel (csrc/cuda/sm90, issue 17), the internal op
  ``flash_quant::_sm90_attention_forward``. It needs an sm_90 device, an extension built
  with it (setup.py: torch with CUDA and nvcc found) and a call it covers (SM90 below:
  INT8 Q·Kᵀ with per-row scales and no zero points, 16-bit P·V with 16-bit V or INT8 P·V
  with INT8 K-major per-channel V, a head dim that is a multiple of 16 up to 128, bf16 /
  fp16, no mask, a positive softmax scale, operands TMA can read: 16-byte aligned,
  strides multiples of 16 bytes).
* ``"triton"``: flash_quant/cuda/forward.py, every other call and every other GPU.

:func:`forward_kernel` returns ``(name, reason)``: the kernel, and why not sm90 (None when
sm90 serves). Every call that Triton serves in ``auto`` mode is a counted fallback, one
count per reason code (:func:`fallback_counts`), logged once per code: a warning where an
sm90 kernel exists for the device but this call is not covered or the build lacks it, an
info line for a device that is not sm_90 (the normal case on other GPUs).

One step above the op: :func:`fused_sm90` says when a whole ``flash_quant.attention`` call
with the accurate or the fast preset runs as the single op ``flash_quant::_sm90_attention``
(the quantize pre-pass in CUDA C++, then the same sm90 kernel), skipping the Python
quantize steps and their host time (issue 17.3: <= 60 µs a call at the Flux shape). The
fast preset takes it where its INT8 P·V would take sm90 (the measured policy,
SM90_AUTO_SKIPS_PV, or sm90 forced) and, by SM90_FUSED_TAKES_FAST, in "auto" mode (the
measured host-time win).

Forcing a kernel (benchmarks, tests): ``FLASH_QUANT_CUDA_FORWARD=auto|triton|sm90`` (read
once, at the first decision) or the :func:`force_kernel` context manager, which wins over
the variable. Forcing ``sm90`` for a call it cannot serve raises a ValueError naming the
reason: a forced kernel is never silently replaced.

The decision depends only on the call's signature (shapes, strides, dtypes, devices,
flags), the 16-byte alignment of the operands TMA reads and the mode, so it is cached
per signature like the Triton launch plans
(host.PlanCache); the arguments are validated (forward.plan) on the first call of a
signature, before any kernel runs, with the same errors whichever kernel then serves it.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Dict, NamedTuple, Optional, Tuple

import torch

from .host import PlanCache, tensor_signature

__all__ = [
    "SM90", "TRITON", "MODES", "ENV_VAR", "SM90_OP", "forward_kernel", "force_kernel", "mode",
    "fallback_counts", "reset_fallback_counts", "sm90_arguments", "decide", "decide_signed", "signature",
    "fused_sm90", "FUSED_OP",
]

logger = logging.getLogger(__name__)

SM90 = "sm90"
TRITON = "triton"
AUTO = "auto"
MODES = (AUTO, TRITON, SM90)
ENV_VAR = "FLASH_QUANT_CUDA_FORWARD"
SM90_OP = "flash_quant::_sm90_attention_forward"
FUSED_OP = "flash_quant::_sm90_attention"

# What the sm90 kernel covers (docs/hopper.md; the lead's SM90_API coverage, step 1).
SM90_CAPABILITY = (9, 0)
#: TMA reads each operand through a descriptor: 16-byte aligned base, strides multiples
#: of 16 bytes (csrc/cuda/sm90/register_sm90.cpp checks the same and raises).
TMA_ALIGN = 16
#: Tile head dims of the sm90 forward kernel (csrc/cuda/sm90/fwd_params.h kForwardHeadDims,
#: tile_head_dim): a call's head dim D runs in the smallest tile >= D, TMA filling the
#: channels past D with zeros, so D may be any multiple of SM90_HEAD_DIM_GRANULE up to the
#: largest tile (the padded channels are computed all the same) ...
SM90_TILE_HEAD_DIMS = (64, 128)
SM90_HEAD_DIM_GRANULE = 16  # Q / K codes are rows of D bytes; TMA strides are multiples of 16 bytes
#: ... and of the fused accurate path's pre-pass (prepass.cu: 4 lanes x 32 channels a row).
FUSED_HEAD_DIMS = (128,)
SM90_DTYPES = (torch.bfloat16, torch.float16)

# Reason codes (the counters' keys). The message after the code says what this call has.
R_FORCED = "forced_triton"
R_DEVICE = "device_not_sm90"
R_NOT_BUILT = "sm90_not_built"
R_DTYPE = "dtype"
R_HEAD_DIM = "head_dim"
R_MASK = "mask"
R_QK = "qk_not_int8"
R_ZERO_POINT = "zero_point"
R_PV = "pv_precision"
R_V = "v_layout"
R_SCALE = "softmax_scale"
R_LAYOUT = "tma_layout"
R_SLOWER = "sm90_slower"
#: Reasons that are expected (a machine without the sm90 kernel; a call Triton serves
#: faster by measurement): logged at INFO, not WARNING.
_QUIET = (R_DEVICE, R_SLOWER)
#: pv_precision values the sm90 kernel covers but Triton serves faster, so "auto" keeps
#: them on Triton (forcing sm90 still runs them). H100, 2026-12-06, bench_attention.py:
#: INT8 P·V kernel-only sm90 / Triton = 0.545 / 0.460 ms (Flux 1x24x4608x128), 2.146 /
#: 1.815 (4x32x4096x128), 1.341 / 1.048 (causal), 7.623 / 6.975 (1x32x16384x128), 1.104 /
#: 0.942 (GQA 2x32/8x4096x128) — docs/hopper.md, Measurements.
SM90_AUTO_SKIPS_PV = ("int8",)
#: The fast preset's whole call takes the fused sm90 op in "auto" mode although
#: SM90_AUTO_SKIPS_PV keeps its INT8 P·V on Triton at the op level: the Python quantize
#: steps' host time decides. Same run, H100, 2026-12-06 (session 6, research/eager_call_time.py
#: --shape 1,24,4608,128 --presets fast): eager 0.682 ms fused vs 1.003 ms general path
#: (Triton); replayed in a CUDA graph 0.642 vs 0.583 ms. Graph capture takes the fused op
#: too (eager and replayed results stay bit-identical, and capture never runs the general
#: path's first-use set-up; tried: taking the general path while capturing failed there).
SM90_FUSED_TAKES_FAST = True
#: Tile head dims whose calls the sm90 kernel covers (and the GPU tests check) but Triton
#: serves faster, so "auto" keeps them on Triton (forcing sm90 runs them). H200, 2026-12-06
#: (session 7, bench_attention.py --quick, 8x32x2048x64 bf16): kernel-only sm90 / Triton
#: 0.924 / 0.702 ms (accurate), 0.855 / 0.839 (fast); flash_quant.attention accurate 1.063 /
#: 0.869 ms. (Head dims below 64 run in the same tile, padded: no faster.) The 128 tile's
#: padded head dims stay on sm90: H100, 2026-12-07 (session 10, 8x32x2048x96 bf16):
#: kernel-only accurate sm90 / Triton 1.105 / 1.103 ms, flash_quant.attention accurate
#: 1.498 / 1.584 ms.
SM90_AUTO_SKIPS_TILE_HEAD_DIMS = (64,)

_ARGS = ("q", "k", "v", "q_data", "q_scale", "q_zero_point", "k_data", "k_scale", "k_zero_point", "k_mean",
         "v_data", "v_scale", "v_zero_point", "attn_mask", "is_causal", "scale", "pv_precision")


class Decision(NamedTuple):
    kernel: str  # SM90 | TRITON
    code: Optional[str]  # reason code when not SM90
    message: Optional[str]  # "code: what this call has"
    # SM90 only: (B, Hq, Hkv, Sq, Skv, D, softmax scale) and whether q_scale, k_scale,
    # k_mean, v_scale already have full (…, 1) / (…, 1, D) shapes (a squeeze re-views
    # them; a broadcast one is expanded and copied): sm90_arguments' recipe.
    dims: Optional[Tuple] = None
    full: Optional[Tuple[bool, bool, bool, bool]] = None

    @property
    def reason(self) -> Optional[str]:
        return self.message


# ------------------------------------------------------------------------------ mode
_ENV_MODE: Dict[str, str] = {}  # {"mode": ...} once read
_FORCED = []  # force_kernel's stack (innermost last)


def _check_mode(value: str, source: str) -> str:
    if value not in MODES:
        raise ValueError(f"flash_quant: {source} must be one of {MODES}, got {value!r}")
    return value


def mode() -> str:
    """The forward kernel mode in force: force_kernel's, else FLASH_QUANT_CUDA_FORWARD's
    (read once), else "auto"."""
    if _FORCED:
        return _FORCED[-1]
    m = _ENV_MODE.get("mode")
    if m is None:
        m = _ENV_MODE["mode"] = _check_mode(os.environ.get(ENV_VAR, AUTO).strip().lower() or AUTO, ENV_VAR)
    return m


@contextlib.contextmanager
def force_kernel(kernel: str):
    """Within the block, CUDA attention forwards use `kernel` ("sm90", "triton" or "auto").
    Host-side only: a CUDA graph or compiled graph captured inside keeps the kernel it
    captured."""
    _FORCED.append(_check_mode(kernel, "force_kernel's kernel"))
    try:
        yield
    finally:
        _FORCED.pop()


# ------------------------------------------------------------------ device and build
_CAPABILITY: Dict[int, Tuple[int, int]] = {}


def _device_capability(device: torch.device) -> Tuple[int, int]:
    """(major, minor) of a CUDA device, cached per index (tests replace this function)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    cap = _CAPABILITY.get(idx)
    if cap is None:
        cap = _CAPABILITY[idx] = tuple(torch.cuda.get_device_capability(idx))
    return cap


_REGISTERED: Dict[str, bool] = {}


def _cuda_kernel_registered(op: str) -> bool:
    """Whether the extension registered a CUDA kernel for `op`, cached per op."""
    r = _REGISTERED.get(op)
    if r is None:
        try:
            r = bool(torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"))
        except RuntimeError:  # (no such op: a stale extension; flash_quant.ops refuses to load first)
            r = False
        _REGISTERED[op] = r
    return r


def _sm90_op_registered() -> bool:
    """Whether the sm90 forward op has its CUDA kernel (tests replace this)."""
    return _cuda_kernel_registered(SM90_OP)


def _fused_op_registered() -> bool:
    """Whether the fused accurate op has its CUDA kernel (tests replace this)."""
    return _cuda_kernel_registered(FUSED_OP)


def _why_not_built() -> Optional[str]:
    """Why setup.py left the sm90 kernels out (flash_quant/_build_info.py), or None."""
    try:
        from .._build_info import SM90_NOT_BUILT_BECAUSE
    except ImportError:  # a build from before the flag existed
        return None
    return SM90_NOT_BUILT_BECAUSE


# ------------------------------------------------------------------------- coverage
def _per_row(scale: Optional[torch.Tensor]) -> bool:
    """A Q/K scale that is one value per row or coarser (never per element)."""
    return scale is not None and scale.dim() == 4 and scale.size(-1) == 1


def sm90_tile_head_dim(d: int) -> Optional[int]:
    """The sm90 kernel's tile head dim that serves head dim `d`, or None where none does
    (fwd_params.h tile_head_dim)."""
    if d < SM90_HEAD_DIM_GRANULE or d % SM90_HEAD_DIM_GRANULE:
        return None
    return next((t for t in SM90_TILE_HEAD_DIMS if d <= t), None)


def _sm90_gap(a: dict, p: dict) -> Optional[Tuple[str, str]]:
    """Why the sm90 kernel cannot serve this (validated) call, or None. `a`: the call's
    arguments by schema name; `p`: forward.plan's resolved modes."""
    if p["dtype"] not in SM90_DTYPES:
        return R_DTYPE, f"{p['dtype']} (sm90 takes bfloat16 / float16)"
    if sm90_tile_head_dim(p["D"]) is None:
        return R_HEAD_DIM, (f"head dim {p['D']} (sm90 covers multiples of {SM90_HEAD_DIM_GRANULE} "
                            f"up to {SM90_TILE_HEAD_DIMS[-1]})")
    if a["attn_mask"] is not None:
        return R_MASK, "an attn_mask (sm90 takes none; is_causal is covered)"
    if a["q_data"] is None or a["k_data"] is None or a["q_data"].dtype != torch.int8 \
            or a["k_data"].dtype != torch.int8:
        return R_QK, "Q and K must both be INT8 codes"
    if any(a[n] is not None for n in ("q_zero_point", "k_zero_point", "v_zero_point")):
        return R_ZERO_POINT, "asymmetric operand (zero point)"
    if not (_per_row(a["q_scale"]) and _per_row(a["k_scale"])):
        return R_QK, "Q / K scales must be per row or coarser"
    pv = a["pv_precision"]
    v_data = a["v_data"]
    if pv == "none":
        if v_data is not None:
            return R_V, "quantized V with 16-bit P·V (sm90 reads a 16-bit V for pv_precision='none')"
    elif pv == "int8":
        if v_data is None or v_data.dtype != torch.int8:
            return R_V, "INT8 P·V needs INT8 V codes"
        vs = a["v_scale"]
        if vs.dim() != 4 or vs.size(-2) != 1:
            return R_V, "INT8 V needs a per-channel scale (…, 1, D)"
        if v_data.stride(-2) != 1:
            return R_V, "INT8 V must be stored K-major (stride(-2) == 1, as the CUDA quantize does)"
    else:
        return R_PV, f"pv_precision={pv!r} (sm90 covers 'none' and 'int8')"
    if not p["scale"] > 0:
        return R_SCALE, f"softmax scale {p['scale']} (sm90 folds it into a positive factor)"
    for name, t, rows in (("q_data", a["q_data"], True), ("k_data", a["k_data"], True),
                          ("v", a["v"], True) if v_data is None else ("v_data", v_data, False)):
        if not _tma_strides(t, rows):
            return R_LAYOUT, (f"{name} strides {tuple(t.stride())} ({t.element_size()}-byte elements): TMA needs "
                              f"a contiguous {'last dim' if rows else 'token dim'} and the others multiples of "
                              f"{TMA_ALIGN} bytes")
    return None


def _tma_strides(t: torch.Tensor, rows: bool) -> bool:
    """Whether TMA can read `t`: unit stride along the head dim (`rows`) or along the
    tokens (K-major), every other stride a multiple of TMA_ALIGN bytes."""
    unit = 3 if rows else 2
    return t.stride(unit) == 1 and all((t.stride(d) * t.element_size()) % TMA_ALIGN == 0
                                       for d in range(4) if d != unit)


def _aligned(a: dict) -> Tuple[bool, ...]:
    """Per call (not a signature property): whether the tensors TMA reads start on a
    TMA_ALIGN-byte boundary. Part of the decision's cache key."""
    return _aligned_args(tuple(a[n] for n in _ARGS))


_QD, _KD, _V, _VD = (_ARGS.index(n) for n in ("q_data", "k_data", "v", "v_data"))


def _aligned_args(args: tuple) -> Tuple[bool, ...]:
    read = (args[_QD], args[_KD], args[_V] if args[_VD] is None else args[_VD])  # (V's floats are unread beside codes)
    return tuple([t.data_ptr() % TMA_ALIGN == 0 for t in read if t is not None])


_VALIDATE = []  # [forward.plan]: registered by flash_quant/cuda/forward.py at its import


def use_validator(plan) -> None:
    """Called by forward.py (which imports this module; the reverse import would be a
    circle): `plan(**arguments)` validates a call, raising the op's errors, and returns
    its resolved modes."""
    _VALIDATE[:] = [plan]


def _decide(a: dict, m: str) -> Decision:
    # (importing this module imports the package flash_quant.cuda first, whose
    # __init__ imports forward, which registers its validator)
    p = _VALIDATE[0](**a)  # validates; raises the op's errors before any kernel
    if m == TRITON:
        return Decision(TRITON, R_FORCED, f"{R_FORCED}: {ENV_VAR} / force_kernel")
    gap = None
    cap = _device_capability(p["device"])
    if cap != SM90_CAPABILITY:
        gap = R_DEVICE, f"{p['device']} is sm_{cap[0]}{cap[1]} (the sm90 kernel needs sm_90)"
    elif not _sm90_op_registered():
        why = _why_not_built()
        gap = R_NOT_BUILT, ("flash_quant._C was built without the sm90 kernels (" + (
            f"setup.py: {why}; rebuild with a CUDA torch and nvcc)" if why else "its CUDA kernel is not registered)"))
    else:
        gap = _sm90_gap(a, p)
        if gap is None and not all(_aligned(a)):
            gap = R_LAYOUT, f"an operand's data is not {TMA_ALIGN}-byte aligned (a sliced tensor?)"
    if gap is None and m != SM90 and a["pv_precision"] in SM90_AUTO_SKIPS_PV:
        gap = R_SLOWER, (f"pv_precision={a['pv_precision']!r}: the Triton kernel measured faster on H100 "
                         "(docs/hopper.md); force sm90 to run it anyway")
    tile = sm90_tile_head_dim(p["D"])
    if gap is None and m != SM90 and tile in SM90_AUTO_SKIPS_TILE_HEAD_DIMS:
        gap = R_SLOWER, (f"head dim {p['D']}: the Triton kernel measured faster in this head dim's "
                         f"tile ({tile}; docs/hopper.md); force sm90 to run it anyway")
    if gap is None:
        B, Hq, Hkv, Sq, Skv, D = (p[n] for n in ("B", "Hq", "Hkv", "Sq", "Skv", "D"))
        full = tuple(t is None or tuple(t.shape) == shape for t, shape in (
            (a["q_scale"], (B, Hq, Sq, 1)), (a["k_scale"], (B, Hkv, Skv, 1)), (a["k_mean"], (B, Hkv, 1, D)),
            (a["v_scale"], (B, Hkv, 1, D))))
        return Decision(SM90, None, None, (B, Hq, Hkv, Sq, Skv, D, p["scale"]), full)
    if m == SM90:
        raise ValueError(f"flash_quant.attention_forward: the sm90 kernel was forced ({ENV_VAR} / force_kernel) "
                         f"but cannot serve this call: {gap[0]}: {gap[1]}")
    return Decision(TRITON, gap[0], f"{gap[0]}: {gap[1]}")


_DECISIONS = PlanCache()


def _normalized(args, kwargs) -> tuple:
    """The 17 arguments in schema order, defaults filled in."""
    a = dict(zip(_ARGS, args))
    a.update(kwargs)
    for name in _ARGS[3:]:
        a.setdefault(name, None)
    if a["is_causal"] is None:
        a["is_causal"] = False
    if a["pv_precision"] is None:
        a["pv_precision"] = "none"
    return tuple(a[n] for n in _ARGS)


def signature(args: tuple) -> tuple:
    """The tensors' part of a call's cache key: host.tensor_signature of each of the 14
    tensor arguments (forward.attention_forward_launch takes it to key its plan, so a
    call computes it once)."""
    try:  # (the op's own calls: tensors or None, as the schema guarantees)
        return tuple([None if t is None else (t.shape, t.stride(), t.dtype, t.device) for t in args[:14]])
    except AttributeError:  # a direct call with a non-tensor: tensor_signature names it
        return tuple(tensor_signature(t) for t in args[:14])


def decide(*args, **kwargs) -> Decision:
    """The cached Decision for one attention_forward call (arguments as the op's schema)."""
    return decide_signed(args if len(args) == len(_ARGS) and not kwargs else _normalized(args, kwargs))[0]


def decide_signed(args: tuple, sig: Optional[tuple] = None) -> Tuple[Decision, tuple]:
    """(Decision, signature(args)) for the 17 arguments in schema order; the hot path of
    every CUDA forward call (host time counts: docs/hopper.md)."""
    m = _FORCED[-1] if _FORCED else _ENV_MODE.get("mode") or mode()
    if sig is None:
        sig = signature(args)
    key = (sig, bool(args[14]), args[15], args[16], m, _aligned_args(args))
    d = _DECISIONS.get(key)
    if d is None:
        d = _decide(dict(zip(_ARGS, args)), m)
        _DECISIONS.put(key, d)
    return d, sig


def forward_kernel(*args, **kwargs) -> Tuple[str, Optional[str]]:
    """(kernel, reason) for an attention_forward call given as the op's arguments:
    ("sm90", None) or ("triton", why not sm90). Counts nothing (see `record`)."""
    d = decide(*args, **kwargs)
    return d.kernel, d.reason


# ------------------------------------------------------------------------ fallbacks
_COUNTS: Dict[str, int] = {}
_LOGGED: set = set()


def record(d: Decision) -> None:
    """Count a call that Triton serves in auto mode (a fallback), logging its reason
    the first time it occurs."""
    if d.kernel != TRITON or d.code == R_FORCED:
        return
    _COUNTS[d.code] = _COUNTS.get(d.code, 0) + 1
    if d.code not in _LOGGED and not torch.compiler.is_compiling():
        _LOGGED.add(d.code)
        level = logging.INFO if d.code in _QUIET else logging.WARNING
        logger.log(level, "flash_quant attention forward: Triton kernel instead of sm90 [%s] (logged once per "
                   "reason; counts: flash_quant.cuda.dispatch.fallback_counts())", d.message)


def fallback_counts() -> Dict[str, int]:
    """Calls served by Triton in auto mode, per reason code (a copy)."""
    return dict(_COUNTS)


def reset_fallback_counts() -> None:
    """Zero the counts, and log each reason again the next time it occurs."""
    _COUNTS.clear()
    _LOGGED.clear()


def _reset_for_tests() -> None:
    """Forget the cached mode, capabilities, registration and decisions (tests)."""
    _ENV_MODE.clear()
    _CAPABILITY.clear()
    _REGISTERED.clear()
    _DECISIONS.clear()
    _FUSED.clear()
    reset_fallback_counts()


# ---------------------------------------------------- the fused accurate preset (one op)
#: The fused op's pre-pass reads 16-byte vectors: strides in elements must be multiples of this.
FUSED_STRIDE_ELEMS = 8
_FUSED = PlanCache()


def fused_sm90(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
               pv_int8: bool = False) -> Optional[float]:
    """The softmax scale when `flash_quant.attention(...)` with these arguments and the
    accurate preset (pv_int8: the fast preset; the caller checks the preset) runs as one
    ``_sm90_attention`` call (the preset's quantize pre-pass in CUDA C++, then the sm90
    kernel: the host cost of one op instead of the Python quantize steps), else None
    (the call takes the general path, which gives the same result from the same kernel,
    or raises the error a bad call gets).

    Taken when: plain CUDA tensors of an sm_90 device and
    a build with the sm90 kernels, no mask, no dropout, no autograd needed, not while
    torch.compile traces (the general path is the compiled one), every key visible to some
    query (not causal with Sq < Skv: key_stats.visible_keys), head dim 128, bf16 / fp16,
    unit channel stride and 16-byte vectors, and a mode other than "triton"; for the fast
    preset also sm90 forced, INT8 P·V off SM90_AUTO_SKIPS_PV, or SM90_FUSED_TAKES_FAST (the
    measured policies)."""
    if attn_mask is not None or dropout_p:
        return None
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return None
    if type(key) is not torch.Tensor or type(value) is not torch.Tensor or torch.compiler.is_compiling():
        return None
    m = _FORCED[-1] if _FORCED else _ENV_MODE.get("mode") or mode()
    if m == TRITON or (query.data_ptr() | key.data_ptr() | value.data_ptr()) % TMA_ALIGN:
        return None
    if pv_int8 and m != SM90 and "int8" in SM90_AUTO_SKIPS_PV and not SM90_FUSED_TAKES_FAST:
        return None
    key_ = (query.shape, query.stride(), key.shape, key.stride(), value.shape, value.stride(), query.dtype,
            key.dtype, value.dtype, query.device, key.device, value.device, bool(is_causal), scale,
            bool(enable_gqa), m)
    found = _FUSED.get(key_)
    if found is None:
        found = _fused_scale(query, key, value, bool(is_causal), scale, bool(enable_gqa))
        _FUSED.put(key_, found)
    return found or None


def _fused_scale(q, k, v, is_causal, scale, enable_gqa) -> float:
    """fused_sm90's per-signature part: the softmax scale, or 0.0 when not covered."""
    from ..support import why_unsupported

    if why_unsupported(q, k, v, None, 0.0, scale=scale, enable_gqa=enable_gqa) is not None:
        return 0.0  # (the general path raises the error)
    if q.dim() != 4 or q.dtype not in SM90_DTYPES or q.shape[-1] not in FUSED_HEAD_DIMS or k.shape != v.shape:
        return 0.0
    if k.device != q.device or v.device != q.device or _device_capability(q.device) != SM90_CAPABILITY:
        return 0.0
    if is_causal and q.shape[2] < k.shape[2]:
        return 0.0  # keys past the last row are excluded from K's statistics: the general path
    if not all(t.stride(3) == 1 and all(t.stride(d) % FUSED_STRIDE_ELEMS == 0 for d in range(3)) for t in (q, k, v)):
        return 0.0
    if not _fused_op_registered():
        return 0.0
    s = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return s if s > 0 else 0.0


# ------------------------------------------------------------------------ the sm90 op
def sm90_arguments(d: Decision, args: tuple, nonfinite: Optional[torch.Tensor] = None) -> tuple:
    """The sm90 op's arguments for a call `d` covers (the 17 arguments in schema order),
    re-viewed as it wants them: Q/K scales (B, H, S), k_mean (B, Hkv, D), v_scale
    (B, Hkv, D) — squeezed when full, expanded when broadcast; `nonfinite`: the (B, Hq)
    int32 per-head flag of causal calls with a 16-bit V."""
    B, Hq, Hkv, Sq, Skv, D, scale = d.dims
    fq, fk, fm, fv = d.full
    (_, _, v, q_data, q_scale, _, k_data, k_scale, _, k_mean, v_data, v_scale, _, _, is_causal, _, _) = args
    qs = q_scale.squeeze(3) if fq else q_scale.expand(B, Hq, Sq, 1).reshape(B, Hq, Sq)
    ks = k_scale.squeeze(3) if fk else k_scale.expand(B, Hkv, Skv, 1).reshape(B, Hkv, Skv)
    km = None if k_mean is None else k_mean.squeeze(2) if fm else k_mean.expand(B, Hkv, 1, D).reshape(B, Hkv, D)
    vs = None if v_scale is None else v_scale.squeeze(2) if fv else v_scale.expand(B, Hkv, 1, D).reshape(B, Hkv, D)
    return q_data, qs, k_data, ks, km, v, v_data, vs, nonfinite, bool(is_causal), scale
