"""Median wall time of one `flash_quant.attention` call on the CPU, per dtype, shape and
preset (the whole call: rotation, quantization, attention) — for A/B comparisons of two
trees on the same machine:

    PYTHONPATH=<tree A> python benchmarks/cpu_call_time.py
    PYTHONPATH=<tree B> python benchmarks/cpu_call_time.py

(bench_cpu.py times the kernels and the quantize ops separately against SDPA.)
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

import flash_quant


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1,8,1024,64;1,4,2048,128")
    ap.add_argument("--presets", nargs="+", default=["accurate", "fast"])
    ap.add_argument("--iters", type=int, default=7)
    args = ap.parse_args()
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"flash_quant from {flash_quant.__file__}")
    torch.manual_seed(0)
    for dt in (torch.float32, torch.bfloat16):
        for shape in args.shapes.split(";"):
            q, k, v = (torch.randn(*(int(x) for x in shape.split(",")), dtype=dt) for _ in range(3))
            for preset in args.presets:
                def call():
                    flash_quant.attention(q, k, v, config=preset)
                for _ in range(2):
                    call()
                times = []
                for _ in range(args.iters):
                    t0 = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - t0)
                times.sort()
                print(f"| {str(dt)[6:]} | {shape.replace(',', 'x')} | {preset} | {times[len(times) // 2] * 1e3:.1f} ms |",
                      flush=True)


if __name__ == "__main__":
    main()
