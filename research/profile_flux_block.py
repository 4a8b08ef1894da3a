#!/usr/bin/env python
"""Where a Flux step's GPU time goes, by kernel category, per attention processor.

    python research/profile_flux_block.py                    # GPU, 1024², sdpa + fast
    python research/profile_flux_block.py --size 2048 --modes sdpa fast accurate
    python research/profile_flux_block.py --tiny --device cpu   # smoke test

Builds a Flux transformer with FLUX.1-dev's width (24 heads × 128) but one double-stream
and one single-stream block (random weights, bf16), runs a few steps under
torch.profiler and sums the device time of every kernel into categories (matmul,
attention, flash_quant quantization, normalisation / RoPE / other elementwise). The
per-block figures times 19 / 38 estimate the full model. Modes are bench_flux.py's.
"""
from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_flux  # noqa: E402  (benchmarks/: same model builder, inputs and processor modes)

CATEGORIES = (
    # (category, substrings of the kernel name, lower case); first match wins
    ("attention", ("flash", "fmha", "cudnn", "sdpa", "_attn_fwd", "attention", "_forward_kernel", "_combine_splits")),
    ("flash_quant quantize / prologue", ("quantize", "_colstats", "_reduce_stats", "hadamard", "_rotate", "_prologue")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "sm90", "sm80", "addmm", "matmul", "mm_")),
)


def categorise(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "elementwise / norm / rope / copy"


def profile_mode(model, inputs, mode, device, iters):
    from torch.profiler import ProfilerActivity, profile

    bench_flux.set_mode(model, mode)
    with torch.inference_mode():
        for _ in range(2):
            model(**inputs, return_dict=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(iters):
                model(**inputs, return_dict=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
    per_kernel = collections.Counter()
    for ev in prof.events():
        if device.type == "cuda":
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                per_kernel[ev.name] += ev.device_time / iters  # µs
        elif ev.cpu_parent is None and ev.name.startswith("aten::"):
            per_kernel[ev.name] += ev.cpu_time_total / iters
    per_cat = collections.Counter()
    for name, us in per_kernel.items():
        per_cat[categorise(name)] += us
    return per_kernel, per_cat


def host_times(model, inputs, device, iters):
    """(host time to enqueue one step, synchronised step time), ms, medians. A step whose
    enqueue time reaches its run time leaves the GPU waiting on Python."""
    import statistics
    import time

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    enqueue, step = [], []
    with torch.inference_mode():
        for _ in range(iters):
            sync()
            t0 = time.perf_counter()
            model(**inputs, return_dict=False)
            t1 = time.perf_counter()
            sync()
            t2 = time.perf_counter()
            enqueue.append((t1 - t0) * 1e3)
            step.append((t2 - t0) * 1e3)
    return statistics.median(enqueue), statistics.median(step)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--modes", nargs="+", default=["sdpa", "fast"])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--sync-check", action="store_true",
                    help="run one step per mode in torch.cuda sync debug mode and print what synchronises")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                    help="also print the N host functions with the most own time over --iters steps")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cfg = dict(bench_flux.TINY if args.tiny else bench_flux.FULL, num_layers=1, num_single_layers=1)
    size = 128 if args.tiny else args.size
    model = bench_flux.build_model(cfg, device, torch.bfloat16)
    inputs = bench_flux.make_inputs(cfg, size, 16 if args.tiny else 512, device, torch.bfloat16)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "size": size, "image_tokens": inputs["hidden_states"].shape[1]}
    print(json.dumps(env))
    for mode in args.modes:
        per_kernel, per_cat = profile_mode(model, inputs, mode, device, args.iters)
        enqueue_ms, step_ms = host_times(model, inputs, device, args.iters)
        total = sum(per_cat.values())
        print(f"\n== {mode}: one double + one single block, {total / 1e3:.3f} ms per step "
              f"(×19/38 blocks ≈ {(total / 2) * 57 / 1e3:.1f} ms)")
        print(f"  host enqueue {enqueue_ms:.3f} ms per step, step (synchronised) {step_ms:.3f} ms "
              f"({'host-bound' if enqueue_ms > 0.95 * step_ms else 'GPU-bound'})")
        for cat, us in per_cat.most_common():
            print(f"  {cat:34s} {us / 1e3:8.3f} ms  {100 * us / total:5.1f} %")
        print(f"  top {args.top} kernels:")
        for name, us in per_kernel.most_common(args.top):
            print(f"    {us:9.1f} µs  [{categorise(name)[:10]}]  {name[:110]}")
        if args.sync_check and device.type == "cuda":
            import warnings

            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
                warnings.simplefilter("always")
                model(**inputs, return_dict=False)
            torch.cuda.set_sync_debug_mode(0)
            print(f"  synchronising calls in one step: {len(caught)}")
            for w in caught[:3]:
                print(f"    {w.message} at {w.filename}:{w.lineno}")
        if args.cprofile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            with torch.inference_mode():
                prof.enable()
                for _ in range(args.iters):
                    model(**inputs, return_dict=False)
                prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(args.cprofile)


if __name__ == "__main__":
    main()
