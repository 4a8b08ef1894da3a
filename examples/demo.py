"""flash_quant demo: quantized attention against full precision on the best device here.

For each preset it prints the error against an fp64 reference, the median time of a
call, and the memory of the stored Q/K/V (and, on CUDA, the peak memory of the call).

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


def stored_bytes(cfg, q, k, v) -> int:
    """Bytes of Q, K, V as the kernel reads them under `cfg`."""
    total = 0
    for t, op in ((q, cfg.q), (k, cfg.k), (v, cfg.v)):
        if op.quantized:
            total += flash_quant.quantize(t, op.precision, op.granularity, op.strategy, smooth=op.smooth).nbytes
        else:
            dt = cfg.compute_dtype.float_dtype if cfg.compute_dtype else t.dtype
            total += t.numel() * torch.empty((), dtype=dt).element_size()
    return total


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
    full_bytes = 3 * q.numel() * q.element_size()

    rows = []
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)
    rows.append(("torch SDPA (" + str(in_dtype).replace("torch.", "") + ")", sdpa, full_bytes))
    for preset in ("fp16" if device != "cpu" else "fp32", "accurate", "fast", "int4", "fp8"):
        cfg = flash_quant.get_preset(preset)
        fn = lambda cfg=cfg: flash_quant.attention(q, k, v, is_causal=args.causal, config=cfg)
        rows.append((f"flash_quant {preset}", fn, stored_bytes(cfg, q, k, v)))

    print(f"\n{'path':28s} {'rel-L2 vs fp64':>15s} {'cosine':>10s} {'time ms':>9s} {'QKV MiB':>9s} {'peak MiB':>9s}")
    for name, fn, nbytes in rows:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            out = fn()
            secs = timed(fn, device, args.repeats)
        except Exception as exc:  # show it: a path that fails is reported, not hidden
            print(f"{name:28s} failed: {type(exc).__name__}: {exc}")
            continue
        stats = error_stats(out.cpu(), ref)
        peak = f"{torch.cuda.max_memory_allocated() / 2**20:9.1f}" if device == "cuda" else f"{'-':>9s}"
        print(f"{name:28s} {stats['rel_l2']:15.4%} {stats['cosine']:10.6f} {secs * 1e3:9.2f} "
              f"{nbytes / 2**20:9.2f} {peak}")


if __name__ == "__main__":
    main()
