"""Where does one `flash_quant.attention` call spend its time? (GPU)

Prints, per preset at one shape: the GPU time of each kernel (torch.profiler, summed over
`--calls` calls), the end-to-end time per call with CUDA events, and the host time per
call (Python + dispatch, measured without synchronising), so that the quantization steps'
share and any host-bound gap are visible.

    python research/profile_call.py [--shape 1,24,4608,128] [--presets accurate fast]

Two builds against each other: `--trees DIR_A DIR_B [--rounds 2]` runs the same
measurement once per tree (PYTHONPATH=DIR, a checkout built with `python setup.py
build_ext --inplace`), each in its own process, alternating A B A B ...: on an H100 the
same kernel measured up to 8 % apart between two processes (docs/hopper.md, Session 9),
so a difference that does not hold across rounds is not a result.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch


def alternate(trees, rounds: int, argv) -> int:
    """Runs this script with `argv` (the measurement's options) once per tree per round, in order."""
    failed = 0
    for r in range(rounds):
        for tree in trees:
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.path.abspath(tree),
                                                                          os.environ.get("PYTHONPATH")) if p))
            print(f"\n# round {r + 1} of {rounds}, tree {tree}", flush=True)
            failed += subprocess.run([sys.executable, os.path.abspath(__file__), *argv], env=env).returncode != 0
    return failed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trees", nargs="+", metavar="DIR", help="built checkouts to compare, alternating")
    ap.add_argument("--rounds", type=int, default=2, help="with --trees: how many times each tree runs")
    ap.add_argument("--shape", default="1,24,4608,128")
    ap.add_argument("--presets", nargs="+", default=["accurate", "fast"])
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--cprofile", type=int, default=0, help="also print the N costliest Python functions")
    args = ap.parse_args()
    if args.trees:
        child = ["--shape", args.shape, "--presets", *args.presets, "--calls", str(args.calls), "--dtype", args.dtype,
                 "--cprofile", str(args.cprofile)]
        sys.exit(alternate(args.trees, args.rounds, child))
    import flash_quant  # (here: the --trees parent runs each tree's own flash_quant in a child)

    B, H, S, D = (int(x) for x in args.shape.split(","))
    dt = getattr(torch, args.dtype)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dt) for _ in range(3))
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; shape {B}x{H}x{S}x{D} {args.dtype}; "
          f"flash_quant from {os.path.dirname(flash_quant.__file__)}")
    for preset in args.presets:
        f = lambda: flash_quant.attention(q, k, v, config=preset)  # noqa: E731
        for _ in range(5):
            f()
        torch.cuda.synchronize()
        # host time per call: enqueue only (the GPU queue absorbs the calls)
        t0 = time.perf_counter()
        for _ in range(args.calls):
            f()
        host_ms = (time.perf_counter() - t0) * 1e3 / args.calls
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.calls):
            f()
        end.record()
        torch.cuda.synchronize()
        e2e_ms = start.elapsed_time(end) / args.calls
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.calls):
                f()
            torch.cuda.synchronize()
        print(f"\n## {preset}: end to end {e2e_ms:.3f} ms/call, host enqueue {host_ms:.3f} ms/call")
        rows = []
        for evt in prof.key_averages():
            t = getattr(evt, "device_time_total", None)
            if t is None:
                t = evt.cuda_time_total
            if t > 0:
                rows.append((t / args.calls / 1e3, evt.count // args.calls, evt.key))
        total = sum(r[0] for r in rows)
        print("| kernel | ms/call | launches/call | share |\n|---|---:|---:|---:|")
        for ms, n, key in sorted(rows, reverse=True)[:15]:
            print(f"| {key[:70]} | {ms:.4f} | {n} | {ms / total * 100:.1f} % |")
        print(f"| (all GPU work) | {total:.4f} | | |")
        if args.cprofile:
            import cProfile
            import pstats

            pr = cProfile.Profile()
            pr.enable()
            for _ in range(args.calls):
                f()
            pr.disable()
            torch.cuda.synchronize()
            pstats.Stats(pr).sort_stats("tottime").print_stats(args.cprofile)


if __name__ == "__main__":
    main()
