"""Study: launch parameters of the quantize kernels (GPU time of one attention call's
quantization, accurate preset: per-token INT8 Q, per-token INT8 K smoothed).

The quantization share of the accurate preset at the Flux shape (quantize / (quantize +
attention kernel), GPU time) sits just above the 10 % bar; this times the Q + K
quantization as a CUDA-graph replay (GPU work only) for each
:class:`flash_quant.cuda.quantize.LaunchTuning` below and prints the fastest. The
product's defaults come from here.

Run on the GPU:  python benchmarks/quantize_study.py [--shape 1,24,4608,128] [--rotate]

``--rotate``: the Hadamard rotation fused into the quantize kernels (``rotate=True``)
against the former route (a matmul writes the rotated copy, the kernels read it), and the
fused kernels' tile (``rotate_tile``), tiles per program (``rotate_tiles``) and warps.
"""
from __future__ import annotations

import argparse
import itertools

import torch
import triton

import flash_quant  # noqa: F401  (registers the CUDA kernels)
from flash_quant.cuda import quantize as qz
from flash_quant.testing import capture_cuda_graph


def graph_us(fn) -> float:
    graph = capture_cuda_graph(fn)
    return 1e3 * triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1,24,4608,128")
    ap.add_argument("--rotate", action="store_true")
    args = ap.parse_args()
    B, H, S, D = (int(x) for x in args.shape.split(","))
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ops = torch.ops.flash_quant
    if args.rotate:
        rotate_study(q, k, v, ops)
        return

    def call():
        ops.quantize(q, "int8", "per_token", 1, "symmetric", False)
        ops.quantize(k, "int8", "per_token", 1, "symmetric", True)

    def k_stats_only():
        ops.quantize(k, "int8", "per_token", 1, "symmetric", True)

    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}; "
          f"shape {B}x{H}x{S}x{D} bf16; GPU time of Q + K quantization (CUDA graph replay, median)")
    header = ("colstats programs", "colstats tile", "colstats warps", "quant tile", "quant warps", "Q+K us", "K us")
    settings = [qz.LaunchTuning(*c) for c in
                itertools.product((528, 1056, 2112), (4096, 8192), (4, 8), (4096, 8192), (4, 8))]
    sweep(header, settings, lambda t: t[:5], lambda: (graph_us(call), graph_us(k_stats_only)), call)


def sweep(header, settings, columns, measure, warm):
    """Time `measure()` (its first value ranks) under each LaunchTuning of `settings` as a
    markdown table; a setting the compiler refuses is reported, not fatal. Prints the
    fastest and restores the default."""
    default = qz.TUNING
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    rows = []
    for tuning in settings:
        qz.TUNING = tuning
        cells = " | ".join(str(c) for c in columns(tuning))
        try:
            warm()
            times = measure()
        except Exception as exc:  # e.g. a tile over the shared-memory limit
            print(f"| {cells} | failed: {str(exc).splitlines()[0][:60]} |")
            continue
        rows.append((times[0], tuning))
        mark = " (default)" if tuning == default else ""
        print(f"| {cells} | " + " | ".join(f"{t:.1f}" for t in times) + f"{mark} |", flush=True)
    qz.TUNING = default
    best = min(rows, key=lambda r: r[0])
    print(f"\nfastest: {best[1]} {best[0]:.1f} us")


def rotate_study(q, k, v, ops):
    from flash_quant.rotation import rotate

    def former():  # a matmul writes the rotated copy; the kernels read it
        ops.quantize(rotate(q), "int8", "per_token", 1, "symmetric", False)
        ops.quantize(rotate(k), "int8", "per_token", 1, "symmetric", True)

    def fused():
        ops.quantize(q, "int8", "per_token", 1, "symmetric", False, True)
        ops.quantize(k, "int8", "per_token", 1, "symmetric", True, True)

    def v_channel():  # the fast preset's V (no rotation): for the fast preset's share
        ops.quantize(v, "int8", "per_channel", 1, "symmetric", False)

    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}; "
          f"shape {tuple(q.shape)} bf16; GPU time (CUDA graph replay, median), accurate preset's Q + K")
    print(f"former route (rotate by matmul, then quantize): {graph_us(former):.1f} us; "
          f"V per channel (fast preset): {graph_us(v_channel):.1f} us")
    settings = [qz.TUNING._replace(rotate_tile=rt, rotate_tiles=tiles, quant_warps=qw)
                for rt, tiles, qw in itertools.product((4096, 8192, 16384), (1, 2, 4, 8), (4, 8))]
    sweep(("rotate tile", "tiles per program", "quant warps", "fused Q+K us"), settings,
          lambda t: (t.rotate_tile, t.rotate_tiles, t.quant_warps), lambda: (graph_us(fused),), fused)


if __name__ == "__main__":
    main()
