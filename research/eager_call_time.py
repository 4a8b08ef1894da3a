"""Eager time of one `flash_quant.attention` call as a user makes it (host + GPU, synced),
against SDPA, for A/B comparisons between two trees of flash_quant.

    PYTHONPATH=<tree> python research/eager_call_time.py [--shape 1,24,4608,128] [--iters 50]

Prints one line per method: median and min of `iters` calls (after warm-up), each call
synchronised, so the figure is what an eager loop of calls sees; plus the GPU time of the
same call replayed from a CUDA graph. Public API only.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import flash_quant


def _eager_ms(fn, iters: int) -> tuple:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def _graph_ms(fn, iters: int) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.replay()
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1,24,4608,128")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--presets", nargs="+", default=["accurate", "fast"])
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--label", default=flash_quant.__file__)
    a = ap.parse_args()
    b, h, s, d = (int(x) for x in a.shape.split(","))
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    c = a.causal
    calls = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=c)}
    for p in a.presets:
        calls[p] = (lambda p=p: flash_quant.attention(q, k, v, is_causal=c, config=p))
    print(f"# {a.label} | {torch.cuda.get_device_name()} | torch {torch.__version__} | shape {a.shape} bf16"
          f"{' causal' if c else ''}")
    with torch.inference_mode():
        for name, fn in calls.items():
            med, low = _eager_ms(fn, a.iters)
            print(f"{name:10s} eager median {med:.3f} ms  min {low:.3f} ms  graph {_graph_ms(fn, a.iters):.3f} ms")


if __name__ == "__main__":
    main()
