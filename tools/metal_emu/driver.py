"""Compile flash_quant's Metal kernels as C++ and run them on the CPU.

* `syntax_check(path)` compiles one .metal file with the host C++ compiler against the
  stand-in <metal_stdlib> (tools/metal_emu/include) and returns (ok, compiler output).
* `Emulator` builds, per .metal file, a shared library holding its kernels plus a small
  harness per kernel, and `run_plan` executes a launch plan made by the MPS backend's own
  host logic (csrc/mps/host_logic.cpp, reached through plan_abi.cpp): the same checks,
  function constants, grids, buffer bindings and argument bytes as on a Mac.

Builds are cached by a hash of every input file and the compiler flags, in
$FQ_METAL_EMU_CACHE or <tmp>/fq_metal_emu, so repeated test runs do not recompile.
"""
from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from typing import Dict, List, Optional, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
METAL_DIR = os.path.join(ROOT, "metal")
INCLUDE_DIR = os.path.join(HERE, "include")
HOST_LOGIC = os.path.join(ROOT, "csrc", "mps", "host_logic.cpp")
SUPPORT_HEADER = os.path.join(ROOT, "csrc", "support.h")  # head-dim limits, included by metal/fq_params.h
CXX = os.environ.get("CXX", "g++")
CACHE_DIR = os.environ.get("FQ_METAL_EMU_CACHE", os.path.join(tempfile.gettempdir(), "fq_metal_emu"))

CHECK_FLAGS = ["-std=c++20", "-x", "c++", "-fsyntax-only", "-Wall", "-Wno-attributes", "-Wno-unused-variable",
               "-Wno-unknown-pragmas", "-Werror=return-type", "-I", INCLUDE_DIR, "-I", METAL_DIR]
BUILD_FLAGS = ["-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-Wno-attributes", "-I", INCLUDE_DIR,
               "-I", METAL_DIR]

# host_logic.h's Dtype enum, in order.
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.float8_e4m3fn,
          torch.float8_e5m2, torch.bool, torch.int32, torch.float64]
OUTPUT = 1000  # host_logic.h kOutput
UNBOUND = -1

_KERNEL_RE = re.compile(r"\bkernel\s+void\s+(\w+)\s*\((.*?)\)\s*\{", re.S)
_BUFFER_RE = re.compile(r"\[\[\s*buffer\(\s*(\d+)\s*\)\s*\]\]")


def metal_sources() -> List[str]:
    return sorted(glob.glob(os.path.join(METAL_DIR, "*.metal")))


def syntax_check(path: str, include_dirs: Sequence[str] = ()) -> tuple:
    """Type-check one Metal source as C++ against the stand-in header."""
    cmd = [CXX] + CHECK_FLAGS + [f"-I{d}" for d in include_dirs] + [path]
    r = subprocess.run(cmd, capture_output=True, text=True)
    return r.returncode == 0, r.stderr


def kernels_in(source: str) -> Dict[str, List[int]]:
    """Kernel name -> buffer indices of its [[buffer(N)]] parameters, in parameter order."""
    out = {}
    for m in _KERNEL_RE.finditer(source):
        params = m.group(2).split(",")
        slots = []
        for prm in params:
            b = _BUFFER_RE.search(prm)
            if b:
                slots.append(int(b.group(1)))
        out[m.group(1)] = slots
    return out


def _digest(paths: Sequence[str], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for p in sorted(paths):
        with open(p, "rb") as f:
            h.update(p.encode() + b"\0" + f.read())
    return h.hexdigest()[:20]


def _build(name: str, sources: Sequence[str], deps: Sequence[str], cpp: str, flags: Sequence[str]) -> str:
    """Compile `cpp` (plus `sources`) into a cached shared library; returns its path."""
    key = _digest(list(deps), cpp + " ".join(flags) + CXX)
    os.makedirs(CACHE_DIR, exist_ok=True)
    lib = os.path.join(CACHE_DIR, f"{name}-{key}.so")
    if os.path.exists(lib):
        return lib
    work = tempfile.mkdtemp(dir=CACHE_DIR)
    try:
        src = os.path.join(work, f"{name}.cpp")
        with open(src, "w") as f:
            f.write(cpp)
        tmp = os.path.join(work, "out.so")
        r = subprocess.run([CXX] + list(flags) + [src] + list(sources) + ["-o", tmp], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"building {name} failed:\n{r.stderr[-6000:]}")
        os.replace(tmp, lib)  # atomic: concurrent test processes never see half a file
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return lib


def _harness(metal_path: str, kernels: Dict[str, List[int]]) -> str:
    lines = [
        "#include <cstdint>",
        "#include <cstdio>",
        "#include <cstring>",
        "#include <string>",
        f'#include "{metal_path}"',
        "",
    ]
    for name, slots in kernels.items():
        args = ", ".join(f"metal_emu::Arg{{b[{s}]}}" for s in slots)
        lines += [
            f'extern "C" int fq_emu_run_{name}(void** b, const int32_t* fc, const uint32_t* grid,',
            "    const uint32_t* threads, uint64_t tgmem, int order, char* err, int errlen) {",
            "  std::memcpy(metal_emu::g_function_constants, fc, sizeof(metal_emu::g_function_constants));",
            "  const uint64_t sizes[1] = {tgmem};",
            f"  const std::string e = metal_emu::launch([&] {{ {name}({args}); }}, grid, threads, sizes, 1, order);",
            '  std::snprintf(err, errlen, "%s", e.c_str());',
            "  return e.empty() ? 0 : 1;",
            "}",
            "",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------- plan ABI (plan_abi.cpp)
class CTensor(ctypes.Structure):
    _fields_ = [("defined", ctypes.c_int32), ("dtype", ctypes.c_int32), ("rank", ctypes.c_int32),
                ("pad", ctypes.c_int32), ("sizes", ctypes.c_int64 * 8), ("strides", ctypes.c_int64 * 8)]


class COutput(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int32), ("rank", ctypes.c_int32), ("zero_fill", ctypes.c_int32),
                ("pad", ctypes.c_int32), ("sizes", ctypes.c_int64 * 8)]


class CLaunch(ctypes.Structure):
    _fields_ = [("function", ctypes.c_char * 64), ("key", ctypes.c_char * 256), ("n_const", ctypes.c_int32),
                ("const_idx", ctypes.c_int32 * 16), ("const_val", ctypes.c_int32 * 16),
                ("grid", ctypes.c_uint32 * 3), ("threads", ctypes.c_uint32 * 3), ("tg_mem", ctypes.c_uint32),
                ("n_bind", ctypes.c_int32), ("bind_slot", ctypes.c_int32 * 32), ("bind_src", ctypes.c_int32 * 32),
                ("params_slot", ctypes.c_int32), ("params_size", ctypes.c_int32), ("params", ctypes.c_uint8 * 1024)]


class CPlan(ctypes.Structure):
    _fields_ = [("n_out", ctypes.c_int32), ("n_launch", ctypes.c_int32), ("out", COutput * 8),
                ("launch", CLaunch * 4)]


class PlanError(ValueError):
    """host_logic rejected the arguments (the message a Mac user would see from TORCH_CHECK)."""


def _desc(t: Optional[torch.Tensor]) -> CTensor:
    c = CTensor()
    if t is None:
        return c
    c.defined = 1
    c.dtype = DTYPES.index(t.dtype) if t.dtype in DTYPES else len(DTYPES)
    c.rank = t.dim()
    for i in range(t.dim()):
        c.sizes[i] = t.shape[i]
        c.strides[i] = t.stride(i)
    return c


class Emulator:
    """Plans with host_logic and runs Metal kernels on the CPU."""

    def __init__(self):
        abi = os.path.join(HERE, "plan_abi.cpp")
        deps = [abi, HOST_LOGIC, os.path.join(ROOT, "csrc", "mps", "host_logic.h"),
                os.path.join(METAL_DIR, "fq_params.h"), SUPPORT_HEADER]
        flags = ["-std=c++17", "-O1", "-fPIC", "-shared"]
        lib = _build("fq_plan", [HOST_LOGIC], deps, f'#include "{abi}"\n', flags)
        self._plan = ctypes.CDLL(lib)
        self._libs: Dict[str, ctypes.CDLL] = {}
        self._kernel_file: Dict[str, str] = {}
        for path in metal_sources():
            with open(path) as f:
                for name in kernels_in(f.read()):
                    self._kernel_file[name] = path

    def kernel_names(self) -> List[str]:
        return sorted(self._kernel_file)

    def _lib_for(self, kernel: str, path: Optional[str] = None) -> ctypes.CDLL:
        path = path or self._kernel_file[kernel]
        if path not in self._libs:
            with open(path) as f:
                kernels = kernels_in(f.read())
            deps = [path, SUPPORT_HEADER] + glob.glob(os.path.join(METAL_DIR, "*.h")) + glob.glob(os.path.join(INCLUDE_DIR, "*"))
            name = os.path.splitext(os.path.basename(path))[0]
            self._libs[path] = ctypes.CDLL(_build(name, [], deps, _harness(path, kernels), BUILD_FLAGS))
        return self._libs[path]

    def run_kernel(self, path: str, kernel: str, buffers: Dict[int, Optional[torch.Tensor]], grid, threads,
                   tg_mem: int = 0, constants: Optional[Dict[int, int]] = None, order: int = 0) -> None:
        """Run one kernel of any .metal file on explicit buffers (slot -> tensor)."""
        bufs = (ctypes.c_void_p * 32)()
        for slot, t in buffers.items():
            bufs[slot] = None if t is None else t.data_ptr()
        fc = (ctypes.c_int32 * 64)()
        for i, v in (constants or {}).items():
            fc[i] = v
        fn = getattr(self._lib_for(kernel, os.path.abspath(path)), f"fq_emu_run_{kernel}")
        err = ctypes.create_string_buffer(1024)
        rc = fn(bufs, fc, (ctypes.c_uint32 * 3)(*grid), (ctypes.c_uint32 * 3)(*threads), ctypes.c_uint64(tg_mem),
                int(order), err, 1024)
        if rc != 0:
            raise RuntimeError(f"{kernel}: {err.value.decode()}")

    # -- planning (the MPS backend's host logic)
    def _finish(self, rc, plan, err):
        if rc != 0:
            raise PlanError(err.value.decode())
        return plan

    def plan_attention(self, tensors: Sequence[Optional[torch.Tensor]], causal: bool, scale: Optional[float],
                       pv_precision: str, backward: bool = False) -> CPlan:
        arr = (CTensor * len(tensors))(*[_desc(t) for t in tensors])
        plan, err = CPlan(), ctypes.create_string_buffer(1024)
        rc = self._plan.fq_emu_plan_attention(int(backward), arr, int(causal), int(scale is not None),
                                              ctypes.c_double(scale or 0.0), pv_precision.encode(),
                                              ctypes.byref(plan), err, 1024)
        return self._finish(rc, plan, err)

    def plan_quantize(self, x, precision, granularity, block_size, strategy, smooth) -> CPlan:
        plan, err = CPlan(), ctypes.create_string_buffer(1024)
        d = _desc(x)
        rc = self._plan.fq_emu_plan_quantize(ctypes.byref(d), precision.encode(), granularity.encode(),
                                             ctypes.c_longlong(block_size), strategy.encode(), int(smooth),
                                             ctypes.byref(plan), err, 1024)
        return self._finish(rc, plan, err)

    def plan_quantize_with_scale(self, x, scale, zero_point, precision, block_size) -> CPlan:
        arr = (CTensor * 3)(*[_desc(t) for t in (x, scale, zero_point)])
        plan, err = CPlan(), ctypes.create_string_buffer(1024)
        rc = self._plan.fq_emu_plan_quantize_with_scale(arr, precision.encode(), ctypes.c_longlong(block_size),
                                                        ctypes.byref(plan), err, 1024)
        return self._finish(rc, plan, err)

    def plan_dequantize(self, data, scale, zero_point, mean, precision, block_size, dtype) -> CPlan:
        arr = (CTensor * 4)(*[_desc(t) for t in (data, scale, zero_point, mean)])
        plan, err = CPlan(), ctypes.create_string_buffer(1024)
        rc = self._plan.fq_emu_plan_dequantize(arr, precision.encode(), ctypes.c_longlong(block_size),
                                               DTYPES.index(dtype), ctypes.byref(plan), err, 1024)
        return self._finish(rc, plan, err)

    # -- execution
    def run_plan(self, plan: CPlan, inputs: Sequence[Optional[torch.Tensor]], order: int = 0) -> List[torch.Tensor]:
        """Allocate the plan's outputs and run its launches in order, as ops.mm does."""
        outs = []
        for i in range(plan.n_out):
            o = plan.out[i]
            dtype = DTYPES[o.dtype]
            shape = [o.sizes[k] for k in range(o.rank)]
            if o.zero_fill:
                outs.append(torch.zeros(shape, dtype=dtype))
            elif dtype.is_floating_point and dtype.itemsize >= 2:
                # Poison: an output element a kernel forgets to write stays NaN.
                outs.append(torch.full(shape, float("nan"), dtype=dtype))
            else:
                outs.append(torch.full(shape, 0x5A, dtype=torch.uint8).view(dtype) if dtype.itemsize == 1
                            else torch.full(shape, -12345, dtype=dtype))
        for li in range(plan.n_launch):
            self.run_launch(plan.launch[li], inputs, outs, order)
        return outs

    def run_launch(self, launch: CLaunch, inputs, outs, order: int = 0) -> None:
        bufs = (ctypes.c_void_p * 32)()
        for k in range(launch.n_bind):
            slot, src = launch.bind_slot[k], launch.bind_src[k]
            if src == UNBOUND:
                continue  # left NULL: a kernel that reads it crashes the test
            t = outs[src - OUTPUT] if src >= OUTPUT else inputs[src]
            if t is None:
                raise RuntimeError(f"binding {slot} refers to an absent input {src}")
            bufs[slot] = t.data_ptr() if t.numel() else None
        params = (ctypes.c_uint8 * max(1, launch.params_size)).from_buffer_copy(
            bytes(launch.params[: launch.params_size]))
        bufs[launch.params_slot] = ctypes.addressof(params)
        fc = (ctypes.c_int32 * 64)()
        for k in range(launch.n_const):
            fc[launch.const_idx[k]] = launch.const_val[k]
        name = launch.function.decode()
        fn = getattr(self._lib_for(name), f"fq_emu_run_{name}")
        err = ctypes.create_string_buffer(1024)
        rc = fn(bufs, fc, launch.grid, launch.threads, ctypes.c_uint64(launch.tg_mem), int(order), err, 1024)
        if rc != 0:
            raise RuntimeError(f"{name}: {err.value.decode()}")

    # -- the ops, as the MPS backend computes them
    def attention_forward(self, q, k, v, q_data=None, q_scale=None, q_zero_point=None, k_data=None, k_scale=None,
                          k_zero_point=None, k_mean=None, v_data=None, v_scale=None, v_zero_point=None,
                          attn_mask=None, is_causal=False, scale=None, pv_precision="none", order=0):
        ins = [q, k, v, q_data, q_scale, q_zero_point, k_data, k_scale, k_zero_point, k_mean, v_data, v_scale,
               v_zero_point, attn_mask, None, None, None]
        plan = self.plan_attention(ins, is_causal, scale, pv_precision)
        out, lse = self.run_plan(plan, ins, order)
        return out, lse

    def attention_backward(self, grad_out, q, k, v, out, lse, q_data=None, q_scale=None, q_zero_point=None,
                           k_data=None, k_scale=None, k_zero_point=None, k_mean=None, v_data=None, v_scale=None,
                           v_zero_point=None, attn_mask=None, is_causal=False, scale=None, pv_precision="none",
                           order=0):
        ins = [q, k, v, q_data, q_scale, q_zero_point, k_data, k_scale, k_zero_point, k_mean, v_data, v_scale,
               v_zero_point, attn_mask, grad_out, out, lse]
        plan = self.plan_attention(ins, is_causal, scale, pv_precision, backward=True)
        dq, dk, dv = self.run_plan(plan, ins, order)[:3]
        return dq, dk, dv

    def quantize(self, x, precision, granularity, block_size, strategy, smooth, order=0):
        x = x.contiguous()
        plan = self.plan_quantize(x, precision, granularity, block_size, strategy, smooth)
        return tuple(self.run_plan(plan, [x], order))

    def quantize_with_scale(self, x, scale, zero_point, precision, block_size, order=0):
        ins = [x.contiguous(), scale.contiguous(), None if zero_point is None else zero_point.contiguous()]
        plan = self.plan_quantize_with_scale(*ins, precision, block_size)
        return self.run_plan(plan, ins, order)[0]

    def dequantize(self, data, scale, zero_point, mean, precision, block_size, dtype, order=0):
        data = data.contiguous()
        ins = [data, scale.contiguous(), zero_point.contiguous(), mean.contiguous()]
        plan = self.plan_dequantize(*ins, precision, block_size, dtype)
        return self.run_plan(plan, ins, order)[0]
