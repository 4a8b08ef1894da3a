"""Registers and spills of flash_quant's Triton attention kernels for Hopper, without a GPU.

Each kernel is compiled for sm_90a on this machine (``triton.compile`` with an explicit
target) exactly as a launch would specialise it (pointer alignment, integer arguments
equal to 1 or divisible by 16), and its PTX assembled by the ``ptxas`` that ships with
Triton, whose ``-v`` report gives registers per thread and spill bytes. A config that
spills is slow on the GPU; one at 255 registers is at the limit. This is how the Q-tile
spill of the forward (the k_mean term kept Q live past the key loop, 320 B/thread at
BLOCK_M 128, 4 warps) was found and checked at no device time.

    python tools/kernel_registers.py                 # forward, the autotune candidates
    python tools/kernel_registers.py --backward      # dQ and dK/dV kernels as well
    python tools/kernel_registers.py --sass          # + SASS instructions per score of the key loop
    python tools/kernel_registers.py --sass --recipes fast fast-khead   # K scale per token vs per head
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flash_quant.cuda.backward as bw  # noqa: E402
import flash_quant.cuda.forward as fw  # noqa: E402
from flash_quant.cuda import autotune  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
PTR = {torch.int8: "*i8", torch.uint8: "*u8", torch.bfloat16: "*bf16", torch.float16: "*fp16",
       torch.float32: "*fp32", torch.int32: "*i32", torch.float8_e4m3fn: "*fp8e4nv"}
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def compile_like_launch(fn, args, kwargs):
    """Compile `fn` for sm_90a with the specialisation a launch with these arguments gets."""
    kwargs = dict(kwargs)
    options = dict(num_warps=kwargs.pop("num_warps"), num_stages=kwargs.pop("num_stages"))
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        value = args[i] if i < len(args) else kwargs[name]
        if param.is_constexpr or value is None:
            signature[name] = "constexpr"
            constexprs[(i,)] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = PTR[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:  # launches specialise ints equal to 1 into constants
                signature[name] = "constexpr"
                constexprs[(i,)] = 1
            else:
                signature[name] = "i32"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: {type(value).__name__}")
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=TARGET, options=options)


def ptxas_report(compiled) -> tuple:
    """(registers per thread, spill-store bytes) from ptxas -v."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        err = subprocess.run([PTXAS, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True).stderr
    regs = int(re.search(r"Used (\d+) registers", err).group(1))
    spill = int(re.search(r"(\d+) bytes spill stores", err).group(1))
    return regs, spill


_CLASSES = (  # SASS opcode -> class, first match wins
    ("tensor", ("HGMMA", "IGMMA", "QGMMA", "WARPGROUP", "HMMA", "IMMA")),
    ("mufu", ("MUFU",)),
    ("fp32", ("FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "FCHK", "FMAX", "FMIN")),
    ("fp16x2", ("HFMA2", "HADD2", "HMUL2", "HMNMX2", "HSETP2")),
    ("convert", ("F2F", "F2I", "I2F", "F2FP", "I2FP", "F2IP")),
    ("memory", ("LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LDGSTS", "UBLKCP", "UTMALDG", "SYNCS", "LDGDEPBAR", "DEPBAR")),
    ("int/logic", ("IADD", "IMAD", "LOP", "SHF", "PRMT", "LEA", "ISETP", "IABS", "SEL", "MOV", "IMNMX", "SHL", "SHR", "VIADD", "VIMNMX")),
)


def sass_loop_mix(compiled) -> dict:
    """Instruction mix of the largest loop of a compiled kernel (the key loop of the
    attention kernels): SASS from the bundled ``nvdisasm``, the loop found as the longest
    backward branch; counts per class plus the total. Fewer instructions per iteration is
    the lever when the softmax, not the tensor cores, bounds a kernel."""
    nvdisasm = os.path.join(os.path.dirname(PTXAS), "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        text = subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout
    labels, instrs = {}, []
    for line in text.splitlines():
        m = re.match(r"^\s*(\.L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = re.match(r"^\s*/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)\s*([^;]*);", line)
        if m:
            instrs.append((m.group(2), m.group(3)))
    best = (0, 0)
    for i, (op, operands) in enumerate(instrs):
        if op.startswith("BRA"):
            target = re.search(r"(\.L_x_\d+)", operands)
            if target and labels.get(target.group(1), i + 1) <= i and i - labels[target.group(1)] > best[1] - best[0]:
                best = (labels[target.group(1)], i)
    counts = {name: 0 for name, _ in _CLASSES}
    counts["other"] = 0
    for op, _ in instrs[best[0]:best[1] + 1]:
        base = op.split(".")[0]
        cls = next((name for name, ops in _CLASSES if base in ops), "other")
        counts[cls] += 1
    counts["total"] = best[1] + 1 - best[0]
    return counts


class _Capture:
    """Stands in for a @triton.jit kernel: records the launch arguments instead."""

    def __init__(self, store, name):
        self.store, self.name = store, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.store[self.name] = (args, kwargs)
        return launch


def _operands(recipe, B, H, S, D):
    """CPU stand-ins with the dtypes and layouts of a recipe's operands. A "-khead" suffix
    gives K one scale per head (constant along the keys: the kernel's KS_CONST path)."""
    if recipe.endswith("-khead"):
        kw, pv = _operands(recipe[:-len("-khead")], B, H, S, D)
        kw["k_scale"] = torch.rand(B, H, 1, 1)
        return kw, pv
    dt = torch.bfloat16
    x = torch.randn(B, H, S, D, dtype=dt)
    if recipe == "16bit":
        return dict(q=x, k=x, v=x), "none"
    ph = torch.empty((), dtype=dt).expand(x.shape)
    i8 = torch.randint(-127, 127, (B, H, S, D), dtype=torch.int8)
    kw = dict(q=ph, k=ph, v=x, q_data=i8, q_scale=torch.rand(B, H, S, 1), k_data=i8,
              k_scale=torch.rand(B, H, S, 1), k_mean=torch.zeros(B, H, 1, D))
    if recipe == "fast":  # V int8 per channel, stored K-major as the quantizer does
        kw.update(v=ph, v_data=torch.randint(-127, 127, (B, H, D, S), dtype=torch.int8).transpose(2, 3),
                  v_scale=torch.rand(B, H, 1, D))
        return kw, "int8"
    return kw, "none"


def forward_report(recipe, D, cfg, causal, sass=False):
    store = {}
    original = fw._attn_fwd_kernel
    fw._attn_fwd_kernel = _Capture(store, "fwd")
    try:
        kw, pv = _operands(recipe, 1, 2, 4096, D)
        fw.attention_forward_launch(pv_precision=pv, is_causal=causal, config=cfg, num_splits=1, **kw)
    finally:
        fw._attn_fwd_kernel = original
    compiled = compile_like_launch(original, *store["fwd"])
    regs, spill = ptxas_report(compiled)
    if sass:  # instructions per score of the key loop (per thread: BLOCK_M*BLOCK_N / threads scores)
        mix = sass_loop_mix(compiled)
        return regs, spill, mix["total"] * cfg.num_warps * 32 / (cfg.block_m * cfg.block_n)
    return regs, spill


def backward_report(recipe, D, cfg_dq, cfg_kv, causal):
    store = {}
    names = ("_bwd_preprocess", "_bwd_dq", "_bwd_dkdv")
    originals = {n: getattr(bw, n) for n in names}
    for n in names:
        setattr(bw, n, _Capture(store, n))
    try:
        kw, _ = _operands(recipe if recipe != "fast" else "accurate", 1, 2, 4096, D)
        q = torch.randn(1, 2, 4096, D, dtype=torch.bfloat16)
        kw = {n: t for n, t in kw.items() if n not in ("q", "k", "v")}
        bw.attention_backward_triton(q, q, q, q, q, torch.zeros(1, 2, 4096), is_causal=causal,
                                     blocks=(tuple(cfg_dq), tuple(cfg_kv)), **kw)
    finally:
        for n in names:
            setattr(bw, n, originals[n])
    return [ptxas_report(compile_like_launch(originals[n], *store[n])) for n in ("_bwd_dq", "_bwd_dkdv")]


def _fmt(cfg, regs, spill, per_score=None):
    return f"{cfg.block_m}/{cfg.block_n}/{cfg.num_warps}/{cfg.num_stages}: {regs} regs" + (
        f" SPILL {spill} B" if spill else "") + (f", {per_score:.1f} instr/score" if per_score else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--recipes", nargs="+", default=["accurate", "fast", "16bit"])
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--sass", action="store_true", help="also the key loop's SASS instructions per score")
    args = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    print("config = BLOCK_M/BLOCK_N/warps/stages; sm_90a, ptxas -v")
    for D in args.head_dims:
        for recipe in args.recipes:
            for causal in (False, True):
                cands = autotune.forward_candidates(max(16, triton.next_power_of_2(D)), not recipe.startswith("16bit"), 2)
                cells = [_fmt(c, *forward_report(recipe, D, c, causal, args.sass)) for c in cands]
                print(f"forward D={D} {recipe}{' causal' if causal else ''}: " + "; ".join(cells), flush=True)
            if args.backward and recipe != "fast":
                for causal in (False, True):
                    cells = []
                    for cdq, ckv in zip(bw._candidates("dq", D, 2), bw._candidates("dkdv", D, 2)):
                        (r1, s1), (r2, s2) = backward_report(recipe, D, cdq, ckv, causal)
                        cells.append(f"dq {_fmt(cdq, r1, s1)} | dkdv {_fmt(ckv, r2, s2)}")
                    print(f"backward D={D} {recipe}{' causal' if causal else ''}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()
