"""flash_quant demo: quantized attention against full precision on the best device here.

For each preset it prints the error against an fp64 reference, the median time of a
call, and the measured peak memory one call adds above its inputs (output included), next
to SDPA's (flash_quant/call_memory.py: CUDA's allocator statistics; on a Linux CPU the
resident-memory high-water mark; "n/a" where neither is available, e.g. MPS).

    python examples/demo.py                  # best device present (cuda > mps > cpu)
    python examples/demo.py --device cpu --seq 2048 --head-dim 128
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import flash_quant
from flash_quant.call_memory import peak_call_bytes
from flash_quant.testing import error_stats, make_qkv, reference_attention


def _available(device: str) -> bool:
    if device == "cuda":
        return torch.cuda.is_available()
    if device == "mps":
        return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    return device == "cpu"


def best_device() -> str:
    return next(d for d in ("cuda", "mps", "cpu") if _available(d))


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up (and compilation of Triton kernels on CUDA)
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, choices=("cpu", "cuda", "mps"), help="default: best present")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=None, help="default 1024 on CPU, 4096 on a GPU")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--family", default="realistic", choices=["normal", "realistic"])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.device and not _available(args.device):
        ap.error(f"--device {args.device}: no {args.device.upper()} device here (torch {torch.__version__}; "
                 f"best present: {best_device()})")

    device = args.device or best_device()
    seq = args.seq or (1024 if device == "cpu" else 4096)
    in_dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = make_qkv(args.batch, args.heads, seq, args.head_dim, family=args.family, dtype=in_dtype,
                       device=device, seed=0)
    print(f"flash_quant {flash_quant.__version__} | torch {torch.__version__} | device {device}"
          f" | B={args.batch} H={args.heads} S={seq} D={args.head_dim} causal={args.causal}"
          f" | inputs {args.family} {in_dtype}")
    ref = reference_attention(q.cpu(), k.cpu(), v.cpu(), is_causal=args.causal)

    rows = []
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)
    rows.append(("torch SDPA (" + str(in_dtype).replace("torch.", "") + ")", sdpa))
    for preset in ("fp16" if device != "cpu" else "fp32", "accurate", "fast", "int4", "fp8"):
        fn = lambda preset=preset: flash_quant.attention(q, k, v, is_causal=args.causal, config=preset)
        rows.append((f"flash_quant {preset}", fn))

    results = []
    for name, fn in rows:
        try:
            out = fn()
            secs = timed(fn, device, args.repeats)
        except Exception as exc:  # show it: a path that fails is reported, not hidden
            results.append((name, fn, f"failed: {type(exc).__name__}: {exc}"))
            continue
        results.append((name, fn, (error_stats(out.cpu(), ref), secs)))
    # Peak memory after every timing: on the CPU the measurement changes how this process
    # allocates (flash_quant/call_memory.py), which would slow the timed calls.
    peaks = {name: peak_call_bytes(fn, device) for name, fn, r in results if not isinstance(r, str)}
    sdpa_peak = peaks.get(rows[0][0])

    print(f"\n{'path':28s} {'rel-L2 vs fp64':>15s} {'cosine':>10s} {'time ms':>9s} {'peak MiB':>9s} {'vs SDPA':>8s}")
    for name, _, r in results:
        if isinstance(r, str):
            print(f"{name:28s} {r}")
            continue
        stats, secs = r
        peak = peaks[name]
        mib = "n/a" if peak is None else f"{peak / 2**20:.2f}"
        ratio = "n/a" if peak is None or not sdpa_peak else f"{peak / sdpa_peak:.2f}x"
        print(f"{name:28s} {stats['rel_l2']:15.4%} {stats['cosine']:10.6f} {secs * 1e3:9.2f} {mib:>9s} {ratio:>8s}")


if __name__ == "__main__":
    main()
