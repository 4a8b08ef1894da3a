"""What a user gets on the CPU: one whole `flash_quant.attention` call (rotation,
quantization, attention, output cast) against `F.scaled_dot_product_attention` on the
same inputs — median wall time and peak transient memory, per dtype, shape and preset.

    python benchmarks/cpu_call_time.py                         # writes benchmarks/results/cpu_call_<date>.{md,json}
    PYTHONPATH=<tree> python benchmarks/cpu_call_time.py --out /tmp/a   # A/B of two trees

Time: median of --iters calls after --warmup calls, in this process (default malloc).
Memory: the peak resident memory one call adds above its inputs, output included
(flash_quant/call_memory.py: VmHWM with glibc's mmap threshold fixed; its docstring
gives the limits), median of 3 calls, measured in a child process so that the
measurement's allocator settings do not slow the timed calls.
(bench_cpu.py times the kernels and the quantize ops separately: kernel-only figures.)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import flash_quant
from flash_quant.call_memory import MMAP_THRESHOLD, peak_call_bytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SDPA = "sdpa"
MIB = 2**20


def _inputs(shape, dtype):
    torch.manual_seed(0)
    return [torch.randn(*shape, dtype=dtype) for _ in range(3)]


def _call(name, q, k, v):
    if name == SDPA:
        return lambda: F.scaled_dot_product_attention(q, k, v)
    return lambda: flash_quant.attention(q, k, v, config=name)


def _cases(args):
    for dt in args.dtypes:
        for shape in args.shapes.split(";"):
            yield dt, tuple(int(x) for x in shape.split(","))


def _median_ms(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e3


def _measure_memory(args) -> dict:
    """{"dtype|shape|path": bytes} — runs in the child process."""
    out = {}
    for dt, shape in _cases(args):
        q, k, v = _inputs(shape, DTYPES[dt])
        for name in [SDPA] + args.presets:
            out[f"{dt}|{shape}|{name}"] = peak_call_bytes(_call(name, q, k, v), "cpu")
    return out


def _child_memory(args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", "--shapes", args.shapes,
           "--dtypes", *args.dtypes, "--presets", *args.presets]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1,8,1024,64;1,8,1024,128",
                    help="B,H,S,D shapes separated by ';'")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--presets", nargs="+", default=["accurate", "fast", "fp32"])
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=None, help="result path stem (default benchmarks/results/cpu_call_<date>)")
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        print(json.dumps(_measure_memory(args)))
        return

    now = datetime.datetime.now(datetime.timezone.utc)
    env = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
           f"torch {torch.__version__}, flash_quant from {os.path.dirname(flash_quant.__file__)}, "
           f"{now:%Y-%m-%d %H:%M} UTC")
    print(env, flush=True)
    memory = _child_memory(args)
    rows = []
    for dt, shape in _cases(args):
        q, k, v = _inputs(shape, DTYPES[dt])
        sdpa_ms = _median_ms(_call(SDPA, q, k, v), args.warmup, args.iters)
        sdpa_mem = memory[f"{dt}|{shape}|{SDPA}"]
        for name in [SDPA] + args.presets:
            ms = sdpa_ms if name == SDPA else _median_ms(_call(name, q, k, v), args.warmup, args.iters)
            mem = memory[f"{dt}|{shape}|{name}"]
            row = {"dtype": dt, "shape": "x".join(map(str, shape)), "path": name, "ms": ms,
                   "speedup_vs_sdpa": sdpa_ms / ms, "peak_bytes": mem,
                   "peak_vs_sdpa": None if mem is None or not sdpa_mem else mem / sdpa_mem,
                   "input_bytes": 3 * q.nbytes}
            rows.append(row)
            print(_md_row(row), flush=True)

    stem = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"cpu_call_{now:%Y-%m-%d}")
    cmd = "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:])
    with open(stem + ".json", "w") as f:
        json.dump({"environment": env, "command": cmd, "iters": args.iters, "warmup": args.warmup,
                   "mmap_threshold": MMAP_THRESHOLD, "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"# CPU: one `flash_quant.attention` call vs SDPA\n\n{env}\n\nCommand: `{cmd}`\n\n"
                f"Time: median of {args.iters} calls after {args.warmup} warm-up. Peak: resident memory one call "
                "adds above its inputs, output included (flash_quant/call_memory.py), median of 3.\n\n")
        f.write(_md_header() + "\n" + "\n".join(_md_row(r) for r in rows) + "\n")
    print(f"wrote {stem}.md / .json")


def _md_header():
    return ("| dtype | shape | path | ms | SDPA / this | peak MiB | peak / SDPA's |\n"
            "|---|---|---|---:|---:|---:|---:|")


def _md_row(r):
    mem = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / MIB:.2f}"
    ratio = "n/a" if r["peak_vs_sdpa"] is None else f"{r['peak_vs_sdpa']:.2f}×"
    return (f"| {r['dtype']} | {r['shape']} | {r['path']} | {r['ms']:.1f} | {r['speedup_vs_sdpa']:.2f}× | "
            f"{mem} | {ratio} |")


if __name__ == "__main__":
    main()
