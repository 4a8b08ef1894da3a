"""Build and call the CPU-emulated sm90 pre-pass and forward (tests/cuda_emu/*.h): shared by
tests/test_sm90_prepass_emulated.py and tests/test_sm90_forward_emulated.py."""
from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SM90 = ROOT / "csrc" / "cuda" / "sm90"
EMU = Path(__file__).resolve().parent
#: Kernel launches `name<<<grid, block, smem, stream>>>(args);` of the CUDA sources.
LAUNCH = re.compile(r"(\w+(?:<T>)?)<<<(.+?), ([^,]+), (\w+), stream>>>\((.*?)\);")


def _compile(harness: str, define: str, source: Path, out: Path) -> ctypes.CDLL:
    compiler = shutil.which("g++")
    if compiler is None:
        raise FileNotFoundError("g++ not found")
    # -fno-strict-aliasing: the kernels read 16-bit values through a uint4 (one 16-byte
    # load), which CUDA allows and g++ -O2 would otherwise optimise away; -ffp-contract=off:
    # no fused multiply-adds beyond the kernels' explicit fmaf
    cmd = [compiler, "-std=c++20", "-O2", "-fno-strict-aliasing", "-ffp-contract=off", "-fPIC", "-shared",
           "-include", "math.h", f"-I{EMU}", f"-I{SM90}", f'-D{define}="{source}"', "-o", str(out),
           str(EMU / harness), "-lpthread"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"the emulated {source.name} does not compile:\n{run.stderr[-4000:]}")
    return ctypes.CDLL(str(out))


def _rewrite_launches(text: str, expected: int, what: str) -> str:
    text, n = LAUNCH.subn(r"emu_launch_smem(\1, dim3(\2), dim3(\3), \4, \5);", text)
    if n != expected or "<<<" in text:
        raise AssertionError(f"{what}: {n} kernel launches rewritten, {expected} expected: update the emulation")
    return text


def build_prepass(tmp: Path) -> ctypes.CDLL:
    source = tmp / "prepass_emulated.cpp"
    source.write_text(_rewrite_launches((SM90 / "prepass.cu").read_text(), 4, "prepass.cu"))
    return _compile("harness.cpp", "PREPASS_SOURCE", source, tmp / "libprepass_emu.so")


def build_forward(tmp: Path) -> ctypes.CDLL:
    kernel = (SM90 / "fwd_kernel.cuh").read_text()
    for old, new in (('#include "ptx.cuh"', '#include "ptx_emu.h"'),
                     ("extern __shared__ uint8_t smem_raw[];", "uint8_t* smem_raw = emu_smem();")):
        if old not in kernel:
            raise AssertionError(f"fwd_kernel.cuh no longer has {old!r}: update the emulation's rewrite")
        kernel = kernel.replace(old, new)
    (tmp / "fwd_kernel_emulated.cuh").write_text(kernel)
    host = (SM90 / "fwd_sm90.cu").read_text().replace('#include "fwd_kernel.cuh"',
                                                       f'#include "{tmp / "fwd_kernel_emulated.cuh"}"')
    source = tmp / "fwd_emulated.cpp"
    source.write_text(_rewrite_launches(host, 1, "fwd_sm90.cu"))
    return _compile("fwd_harness.cpp", "FORWARD_SOURCE", source, tmp / "libforward_emu.so")


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _triple(*x):
    return (ctypes.c_int64 * 3)(*x)


#: rows of the pre-pass's block-means workspace (>= its most blocks, kMaxCenterBlocks + 1)
_WORK_BLOCKS = 80


def run_prepass(lib, q, k, v, fast: bool, q_in_kernel: bool = False) -> dict:
    """The pre-pass's outputs for 16-bit q, k, v: Q / K codes and scales, k_center (the
    centre, unrotated), q_center_dot, and with `fast` V's scale and its K-major codes buffer
    (B, Hkv, D, S padded to 16; each 16 tokens in the forward's order: unpermute_v_tokens).
    `q_in_kernel`: Q is left to the forward (no Q outputs)."""
    assert q.dtype in (torch.bfloat16, torch.float16), "the pre-pass reads 16-bit inputs"
    b, hq, sq, d = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    i8, f32 = dict(dtype=torch.int8), dict(dtype=torch.float32)
    out = dict(q_data=torch.zeros(b, hq, sq, d, **i8), q_scale=torch.zeros(b, hq, sq, **f32),
               k_data=torch.zeros(b, hkv, skv, d, **i8), k_scale=torch.zeros(b, hkv, skv, **f32),
               work=torch.zeros(b * hkv * _WORK_BLOCKS * d, **f32),
               q_center_dot=torch.zeros(b, hq, sq, **f32))
    padded = -(-skv // 16) * 16
    if fast:
        out.update(v_data=torch.full((b, hkv, d, padded), 99, **i8), v_scale=torch.zeros(b, hkv, d, **f32),
                   v_work=torch.zeros(b * hkv * _WORK_BLOCKS * d, **f32))
    if q_in_kernel:
        for name in ("q_data", "q_scale", "q_center_dot"):
            out[name] = None
    strides = [_triple(*t.stride()[:3]) for t in (q, k, v)]
    blocks = lib.run_prepass(
        _ptr(q), _ptr(k), _ptr(v), *strides, b, hq, hkv, sq, skv, int(q.dtype == torch.bfloat16),
        _ptr(out["q_data"]), _ptr(out["q_scale"]), _ptr(out["k_data"]), _ptr(out["k_scale"]), _ptr(out["work"]), _ptr(out["q_center_dot"]), None, _ptr(out.get("v_data")), ctypes.c_longlong(padded),
        _ptr(out.get("v_scale")), _ptr(out.get("v_work")))
    assert 0 < blocks < _WORK_BLOCKS, "the emulated pre-pass raised (see stderr)"
    # the workspace as register_sm90.cpp lays it out: the block means, then the centre
    out["k_center"] = out.pop("work")[b * hkv * blocks * d:][:b * hkv * d].reshape(b, hkv, d).clone()
    return out


def v_token_slots(n: int) -> torch.Tensor:
    """Where each of tokens 0 .. n-1 (n a multiple of 16) sits in the pre-pass's INT8 V^T
    (prepass.cu v_token_slot: in each 16, key 2t + i of 8-key block b at 4t + 2b + i)."""
    a = torch.arange(n)
    within = a % 16
    return a - within + 4 * ((within % 8) // 2) + 2 * (within // 8) + within % 2


def permute_v_tokens(v_buf: torch.Tensor) -> torch.Tensor:
    """A K-major V^T buffer (..., D, S_pad) in token order -> the pre-pass's order."""
    out = torch.empty_like(v_buf)
    out[..., v_token_slots(v_buf.shape[-1])] = v_buf
    return out


def unpermute_v_tokens(v_buf: torch.Tensor) -> torch.Tensor:
    """The pre-pass's permuted V^T (..., D, S_pad) -> token order."""
    return v_buf[..., v_token_slots(v_buf.shape[-1])]


#: elements after the emulated forward's output that it must not write
_GUARD = 256


def run_forward(lib, qd, qs, kd, ks, v, v_buf, vs, causal: bool, scale: float, lse_shift=None, k_center=None,
                v_permuted: bool = False, k_mean=None):
    """(out, lse) of the emulated forward on quantized operands: Q / K INT8 codes with
    (B, H, S) scales; v 16-bit, or with v_buf the K-major INT8 V buffer (B, Hkv, D, S_pad)
    and vs (B, Hkv, D) for INT8 P·V; lse_shift (B, Hq, Sq): the fused path's q · k_mean.
    qs None: qd is the 16-bit q, quantized in the kernel against k_center (the pre-pass's
    unrotated centre). v_permuted: v_buf's tokens are in the pre-pass's order. k_mean
    (B, Hkv, D): the smoothing mean, added into the lse. The output is followed by a guard
    region that must stay untouched (a store past the last row fails)."""
    b, hq, sq, d = qd.shape
    hkv, skv = kd.shape[1], kd.shape[2]
    numel = b * hq * sq * d
    out_buf = torch.full((numel + _GUARD,), float("nan"), dtype=v.dtype)
    out = out_buf[:numel].view(b, hq, sq, d)
    lse = torch.zeros(b, hq, sq)
    vt = v_buf if v_buf is not None else v
    rc = lib.run_forward(
        _ptr(qd), _ptr(None if qs is None else qs.contiguous()), _ptr(kd), _ptr(ks.contiguous()), _ptr(vt),
        _ptr(None if vs is None else vs.contiguous()), _triple(*qd.stride()[:3]), _triple(*kd.stride()[:3]),
        _triple(*vt.stride()[:3]), b, hq, hkv, sq, skv, d, int(v.dtype == torch.bfloat16), int(v_buf is not None),
        int(causal), ctypes.c_float(scale), _ptr(lse_shift), _ptr(None if k_mean is None else k_mean.contiguous()),
        _ptr(k_center), int(qs is None), int(v_permuted), _ptr(out), _ptr(lse))
    assert rc == 0, "the emulated launch raised (see stderr)"
    assert out_buf[numel:].isnan().all(), "the kernel stored past the output"
    return out, lse
