"""Compile flash_quant's Metal kernels as C++ and run them on the CPU.

* `syntax_check(path)` compiles one .metal file with the host C++ compiler against the
  stand-in <metal_stdlib> (tools/metal_emu/include) and returns (ok, compiler output).
* `address_space_check(path)` compiles it again with clang >= 15 and Metal's address
  spaces made real and distinct (device / threadgroup / constant), so a pointer of one
  space passed where another is expected fails as with Apple's compiler.
* `Emulator` builds, per .metal file, a shared library holding its kernels plus a small
  harness per kernel, and `run_plan` executes a launch plan made by the MPS backend's own
  host logic (csrc/mps/host_logic.cpp, reached through plan_abi.cpp): the same checks,
  function constants, grids, buffer bindings and argument bytes as on a Mac.

Strictness of every kernel run (run_kernel / run_launch):
* schedules: the launch runs under each schedule of `Emulator.schedules` (fixed thread
  order, reversed, seeded random interleavings re-drawn at every barrier) from the same
  starting buffers; the results must agree bit for bit, else RaceError;
* guard bands: every bound buffer (and the argument bytes) is copied into the middle of
  a larger allocation whose GUARD_BYTES on each side are poisoned (NaN bytes for float
  buffers, 0x7F otherwise); a kernel that reads out of bounds reads poison, one that
  writes out of bounds fails the run (GuardError), and so does one that writes an input;
* function constants the host did not set hold a poison value, and a kernel that reads
  one fails (the emulator runtime checks every read).

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
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
METAL_DIR = os.path.join(ROOT, "metal")
# The precisions' numbers, included by metal/fq_common.h and csrc/mps/host_logic.cpp: every
# build's cache key covers it.
PRECISION_HEADER = os.path.join(ROOT, "csrc", "precision.h")
INCLUDE_DIR = os.path.join(HERE, "include")
HOST_LOGIC = os.path.join(ROOT, "csrc", "mps", "host_logic.cpp")
SUPPORT_HEADER = os.path.join(ROOT, "csrc", "support.h")  # head-dim limits, included by metal/fq_params.h
CXX = os.environ.get("CXX", "g++")
TOOLS_DIR = os.path.dirname(HERE)
CACHE_DIR = os.environ.get("FQ_METAL_EMU_CACHE", os.path.join(tempfile.gettempdir(), "fq_metal_emu"))

CHECK_FLAGS = ["-std=c++20", "-x", "c++", "-fsyntax-only", "-Wall", "-Wno-attributes", "-Wno-unused-variable",
               "-Wno-unknown-pragmas", "-Werror=return-type", "-I", INCLUDE_DIR, "-I", METAL_DIR]
BUILD_FLAGS = ["-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-Wno-attributes", "-I", INCLUDE_DIR,
               "-I", METAL_DIR]

# Schedules (tools/metal_emu/include/metal_stdlib): fixed, reversed, random + seed.
SCHEDULE_FIXED, SCHEDULE_REVERSED, SCHEDULE_RANDOM = 0, 1, 2
# Every run: its primary schedule, then these, compared bitwise. Reversed and one seeded
# random interleaving (different per launch, so the suite covers many seeds); the count
# keeps the emulator tests' added CPU time within about a minute on 2 cores.
DEFAULT_EXTRA_SCHEDULES = 2
GUARD_BYTES = 16384  # poisoned bytes before and after every buffer (>= a few rows of any operand)

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


def address_space_check(path: str, include_dirs: Sequence[str] = ()) -> tuple:
    """Type-check one Metal source with distinct address spaces (clang >= 15).

    Returns (ok, compiler output). Raises LookupError when no such clang is installed."""
    sys.path.insert(0, TOOLS_DIR)
    import mps_host_check

    clang = mps_host_check.find_clang(min_version=15)
    if clang is None:
        raise LookupError("address-space check needs clang++ >= 15 (scripts/install_clang.sh)")
    flags = [f for f in CHECK_FLAGS if f != "-Wno-attributes"] + ["-Wno-unknown-attributes",
                                                                   "-DMETAL_EMU_ADDRESS_SPACES"]
    cmd = [clang] + flags + [f"-I{d}" for d in include_dirs] + [path]
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
    key = _digest(list(deps) + [PRECISION_HEADER], cpp + " ".join(flags) + CXX)
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
            f'extern "C" int fq_emu_run_{name}(void** b, const int32_t* fc, const uint8_t* fc_set,',
            "    const uint32_t* grid, const uint32_t* threads, uint64_t tgmem, int order, char* err, int errlen) {",
            "  for (int i = 0; i < metal_emu::kMaxFunctionConstants; ++i) {",
            "    metal_emu::g_function_constant_set[i] = fc_set[i];",
            "    metal_emu::g_function_constants[i] = fc_set[i] ? fc[i] : metal_emu::kUnsetFunctionConstant;",
            "  }",
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


class RaceError(RuntimeError):
    """Two schedules of one launch gave different bytes: the kernel has a race."""


class GuardError(RuntimeError):
    """A kernel wrote outside a buffer, or into an input."""


def _span_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes a kernel may address through t's binding: from t's first element to its
    last (strides are non-negative), as a uint8 view of t's storage."""
    span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0)
    flat = t.as_strided((span,), (1,), t.storage_offset())
    return flat.view(torch.uint8) if t.dtype != torch.uint8 else flat


def _poison_byte(dtype: torch.dtype) -> int:
    return 0xFF if dtype.is_floating_point and dtype.itemsize >= 2 else 0x7F  # NaN for float buffers


class _Guarded:
    """One buffer of a launch, copied between two poisoned guard bands."""

    def __init__(self, raw: torch.Tensor, poison: int, writable: bool, name: str):
        self.raw, self.poison, self.writable, self.name = raw, poison, writable, name
        n = raw.numel()
        self.mem = torch.full((GUARD_BYTES + n + GUARD_BYTES,), poison, dtype=torch.uint8)
        self.body = self.mem[GUARD_BYTES:GUARD_BYTES + n]
        self.initial = raw.clone()

    def reset(self) -> None:
        self.body.copy_(self.initial)

    def ptr(self) -> int:
        return self.body.data_ptr()

    def check(self, kernel: str) -> None:
        for side, band in (("before", self.mem[:GUARD_BYTES]), ("after", self.mem[-GUARD_BYTES:])):
            bad = (band != self.poison).nonzero()
            if bad.numel():
                off = GUARD_BYTES - int(bad[0]) if side == "before" else int(bad[-1]) + 1
                raise GuardError(f"{kernel} wrote {bad.numel()} bytes {side} {self.name} "
                                 f"(up to {off} bytes {'before its start' if side == 'before' else 'past its end'})")
        if not self.writable and not torch.equal(self.body, self.initial):
            raise GuardError(f"{kernel} wrote into {self.name}, an input")


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


def _any_non_finite(ins) -> bool:
    """As ops.mm's any_non_finite: an inf / NaN in q, k or v given without quantized data
    (or, backward, in grad_out or out; a NaN lse), or a NaN / +inf in a float mask
    (FqAttnParams::every_key, causal calls only)."""
    bad = any(t is not None and d is None and not bool(torch.isfinite(t).all())
              for t, d in ((ins[0], ins[3]), (ins[1], ins[6]), (ins[2], ins[10]), (ins[14], None), (ins[15], None)))
    bad = bad or (ins[16] is not None and bool(ins[16].isnan().any()))
    m = ins[13]
    return bad or (m is not None and m.is_floating_point() and bool((m.isnan() | m.isposinf()).any()))


class Emulator:
    """Plans with host_logic and runs Metal kernels on the CPU."""

    def __init__(self, extra_schedules: int = DEFAULT_EXTRA_SCHEDULES):
        self.extra_schedules = int(os.environ.get("FQ_METAL_EMU_EXTRA_SCHEDULES", extra_schedules))
        self._launch_count = 0
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
                   tg_mem: int = 0, constants: Optional[Dict[int, int]] = None, order: int = 0,
                   schedules: Optional[Sequence[int]] = None, read_only: Sequence[int] = ()) -> None:
        """Run one kernel of any .metal file on explicit buffers (slot -> tensor). The
        slots in `read_only` are inputs (a write into one fails); `schedules` replaces the
        extra schedules run after `order`."""
        fn = getattr(self._lib_for(kernel, os.path.abspath(path)), f"fq_emu_run_{kernel}")
        bound = {slot: (t, slot not in read_only) for slot, t in buffers.items() if t is not None and t.numel()}
        self._execute(kernel, fn, bound, None, constants or {}, grid, threads, tg_mem,
                      self._schedules(order) if schedules is None else [order] + list(schedules))

    def _schedules(self, order: int) -> List[int]:
        """The primary schedule, then the extra ones: reversed first, then random seeds
        that differ from launch to launch (a counter), so the suite sweeps many."""
        extra = []
        pool = [SCHEDULE_REVERSED] if order != SCHEDULE_REVERSED else [SCHEDULE_FIXED]
        while len(extra) < self.extra_schedules:
            if pool:
                extra.append(pool.pop())
            else:
                self._launch_count += 1
                extra.append(SCHEDULE_RANDOM + self._launch_count)
        return [order] + extra

    def _execute(self, name, fn, bound, params: Optional[bytes], constants: Dict[int, int], grid, threads,
                 tg_mem: int, schedules: Sequence[int]) -> None:
        """Run `fn` once per schedule on guarded copies of the bound buffers; bitwise
        agreement, intact guard bands and untouched inputs are required. The result
        goes back into the writable tensors."""
        guarded: Dict[int, _Guarded] = {}
        bufs = (ctypes.c_void_p * 32)()
        for slot, (t, writable) in bound.items():
            key = id(t)  # one tensor bound at two slots is one buffer
            if key not in guarded:
                guarded[key] = _Guarded(_span_bytes(t), _poison_byte(t.dtype), writable, f"buffer({slot})")
            bufs[slot] = guarded[key].ptr()
        if params is not None:
            slot, raw = params
            g = _Guarded(torch.frombuffer(bytearray(raw), dtype=torch.uint8), 0xFF, False, f"argument bytes({slot})")
            guarded[-1 - slot] = g
            bufs[slot] = g.ptr()
        fc = (ctypes.c_int32 * 64)()
        fc_set = (ctypes.c_uint8 * 64)()
        for i, v in constants.items():
            fc[i], fc_set[i] = v, 1
        first: Optional[Dict[int, torch.Tensor]] = None
        for order in schedules:
            for g in guarded.values():
                g.reset()
            err = ctypes.create_string_buffer(1024)
            rc = fn(bufs, fc, fc_set, (ctypes.c_uint32 * 3)(*grid), (ctypes.c_uint32 * 3)(*threads),
                    ctypes.c_uint64(tg_mem), int(order), err, 1024)
            if rc != 0:
                raise RuntimeError(f"{name} (schedule {order}): {err.value.decode()}")
            for g in guarded.values():
                g.check(f"{name} (schedule {order})")
            result = {k: g.body.clone() for k, g in guarded.items() if g.writable}
            if first is None:
                first = result
                continue
            for k, b in result.items():
                if not torch.equal(b, first[k]):
                    n = int((b != first[k]).sum())
                    raise RaceError(f"{name}: schedule {order} and schedule {schedules[0]} disagree on "
                                    f"{guarded[k].name} ({n} bytes differ): a race between threads")
        for g in guarded.values():
            if g.writable:
                g.raw.copy_(g.body)

    # -- planning (the MPS backend's host logic)
    def _finish(self, rc, plan, err):
        if rc != 0:
            raise PlanError(err.value.decode())
        return plan

    def plan_attention(self, tensors: Sequence[Optional[torch.Tensor]], causal: bool, scale: Optional[float],
                       pv_precision: str, backward: bool = False, every_key: bool = False) -> CPlan:
        arr = (CTensor * len(tensors))(*[_desc(t) for t in tensors])
        plan, err = CPlan(), ctypes.create_string_buffer(1024)
        rc = self._plan.fq_emu_plan_attention(int(backward), arr, int(causal), int(every_key),
                                              int(scale is not None),
                                              ctypes.c_double(scale or 0.0), pv_precision.encode(),
                                              ctypes.byref(plan), err, 1024)
        return self._finish(rc, plan, err)

    def plan_quantize(self, x, precision, granularity, block_size, strategy, smooth, center=None) -> CPlan:
        plan, err = CPlan(), ctypes.create_string_buffer(1024)
        d = _desc(x)
        c = None if center is None else ctypes.byref(_desc(center))
        rc = self._plan.fq_emu_plan_quantize(ctypes.byref(d), precision.encode(), granularity.encode(),
                                             ctypes.c_longlong(block_size), strategy.encode(), int(smooth), c,
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

    def plan_decode(self, tensors: Sequence[Optional[torch.Tensor]], scale: Optional[float], precision: str,
                    k_group: int, v_group: int, num_splits: int = 0) -> CPlan:
        """The decode_attention op's arguments (csrc/schema.cpp order: q, the cache's eight
        buffers, length, attn_mask; then scale, precision, k_group, v_group); num_splits
        0 is the automatic choice ops.mm uses."""
        arr = (CTensor * len(tensors))(*[_desc(t) for t in tensors])
        plan, err = CPlan(), ctypes.create_string_buffer(1024)
        rc = self._plan.fq_emu_plan_decode(arr, int(scale is not None), ctypes.c_double(scale or 0.0),
                                           precision.encode(), ctypes.c_longlong(k_group), ctypes.c_longlong(v_group),
                                           ctypes.c_longlong(num_splits), ctypes.byref(plan), err, 1024)
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
        bound = {}
        for k in range(launch.n_bind):
            slot, src = launch.bind_slot[k], launch.bind_src[k]
            if src == UNBOUND:
                continue  # left NULL: a kernel that reads it crashes the test
            t = outs[src - OUTPUT] if src >= OUTPUT else inputs[src]
            if t is None:
                raise RuntimeError(f"binding {slot} refers to an absent input {src}")
            if t.numel():
                bound[slot] = (t, src >= OUTPUT)  # a kernel may write only the plan's outputs
        params = (launch.params_slot, bytes(launch.params[: max(1, launch.params_size)]))
        constants = {launch.const_idx[k]: launch.const_val[k] for k in range(launch.n_const)}
        name = launch.function.decode()
        fn = getattr(self._lib_for(name), f"fq_emu_run_{name}")
        self._execute(name, fn, bound, params, constants, list(launch.grid), list(launch.threads), launch.tg_mem,
                      self._schedules(order))

    # -- the ops, as the MPS backend computes them
    def attention_forward(self, q, k, v, q_data=None, q_scale=None, q_zero_point=None, k_data=None, k_scale=None,
                          k_zero_point=None, k_mean=None, v_data=None, v_scale=None, v_zero_point=None,
                          attn_mask=None, is_causal=False, scale=None, pv_precision="none", order=0):
        ins = [q, k, v, q_data, q_scale, q_zero_point, k_data, k_scale, k_zero_point, k_mean, v_data, v_scale,
               v_zero_point, attn_mask, None, None, None]
        plan = self.plan_attention(ins, is_causal, scale, pv_precision, every_key=is_causal and _any_non_finite(ins))
        out, lse = self.run_plan(plan, ins, order)
        return out, lse

    def attention_backward(self, grad_out, q, k, v, out, lse, q_data=None, q_scale=None, q_zero_point=None,
                           k_data=None, k_scale=None, k_zero_point=None, k_mean=None, v_data=None, v_scale=None,
                           v_zero_point=None, attn_mask=None, is_causal=False, scale=None, pv_precision="none",
                           order=0):
        ins = [q, k, v, q_data, q_scale, q_zero_point, k_data, k_scale, k_zero_point, k_mean, v_data, v_scale,
               v_zero_point, attn_mask, grad_out, out, lse]
        plan = self.plan_attention(ins, is_causal, scale, pv_precision, backward=True,
                                   every_key=is_causal and _any_non_finite(ins))
        dq, dk, dv = self.run_plan(plan, ins, order)[:3]
        return dq, dk, dv

    def decode(self, tensors, scale, precision, k_group, v_group, num_splits=0, order=0):
        """decode_attention as the MPS backend computes it: (out, lse, splits launched)."""
        plan = self.plan_decode(tensors, scale, precision, k_group, v_group, num_splits)
        out, lse, part_o, _ = self.run_plan(plan, list(tensors), order)
        return out, lse, part_o.shape[0]

    def quantize(self, x, precision, granularity, block_size, strategy, smooth, order=0, center=None):
        """As ops.mm: a given centre goes to the plan as a contiguous float32 copy of shape
        x.shape[:-2] + (1, D) and comes back as `mean`."""
        x = x.contiguous()
        if center is not None:
            center = center.expand(x.shape[:-2] + (1, x.shape[-1])).clone(memory_format=torch.contiguous_format)
        plan = self.plan_quantize(x, precision, granularity, block_size, strategy, smooth, center)
        data, scale, zp, mean = self.run_plan(plan, [x, center], order)
        return data, scale, zp, (center if center is not None else mean)

    def quantize_with_scale(self, x, scale, zero_point, precision, block_size, order=0):
        ins = [x.contiguous(), scale.contiguous(), None if zero_point is None else zero_point.contiguous()]
        plan = self.plan_quantize_with_scale(*ins, precision, block_size)
        return self.run_plan(plan, ins, order)[0]

    def dequantize(self, data, scale, zero_point, mean, precision, block_size, dtype, order=0):
        data = data.contiguous()
        ins = [data, scale.contiguous(), zero_point.contiguous(), mean.contiguous()]
        plan = self.plan_dequantize(*ins, precision, block_size, dtype)
        return self.run_plan(plan, ins, order)[0]
