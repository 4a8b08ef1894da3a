#!/usr/bin/env python
"""Host (CPU) cost of flash_quant's calls: what bounds a step whose GPU work is small.

    python benchmarks/host_overhead.py            # GPU machine
    python benchmarks/host_overhead.py --shape 1,24,4608,128

For each piece of a quantized attention call at one shape, the host time to enqueue it
(median over --iters calls, no synchronisation inside the timed loop, after warm-up),
and whether any of them synchronises with the device (torch.cuda sync debug mode). A
call whose host time exceeds its GPU time leaves the GPU idle in a model whose other
work is also small (Flux at 1024²).
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def host_us(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
        if len(times) % 20 == 0:
            torch.cuda.synchronize()  # keep the launch queue from filling (that would block)
    torch.cuda.synchronize()
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1,24,4608,128")
    ap.add_argument("--iters", type=int, default=100)
    args = ap.parse_args(argv)
    import triton
    import triton.language as tl

    import flash_quant
    from flash_quant.cuda.quantize import quantize_launch

    b, h, s, d = map(int, args.shape.split(","))
    dev = torch.device("cuda")
    q, k, v = (torch.randn(b, h, s, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
    ops = torch.ops.flash_quant

    @triton.jit
    def _empty_kernel(x_ptr, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    tiny = torch.zeros(128, device=dev)
    qq = ops.quantize(q, "int8", "per_token", 1, "symmetric", False)
    kq = ops.quantize(k, "int8", "per_token", 1, "symmetric", True)
    vq = ops.quantize(v, "int8", "per_channel", 1, "symmetric", False)
    rows = {
        "triton launch (empty kernel, 1 arg tensor)": lambda: _empty_kernel[(1,)](tiny, 128, BLOCK=128),
        "torch.empty": lambda: torch.empty(b, h, s, d, device=dev),
        "op quantize Q per_token": lambda: ops.quantize(q, "int8", "per_token", 1, "symmetric", False),
        "launch quantize Q per_token (no dispatcher)": lambda: quantize_launch(q, "int8", "per_token", 1, "symmetric", False),
        "op quantize K per_token smooth": lambda: ops.quantize(k, "int8", "per_token", 1, "symmetric", True),
        "op quantize V per_channel": lambda: ops.quantize(v, "int8", "per_channel", 1, "symmetric", False),
        "launch quantize V per_channel (no dispatcher)": lambda: quantize_launch(v, "int8", "per_channel", 1, "symmetric", False),
        "op attention_forward accurate": lambda: ops.attention_forward(
            q, k, v, qq[0], qq[1], None, kq[0], kq[1], None, kq[3], None, None, None, None, False, None, "none"),
        "op attention_forward fast": lambda: ops.attention_forward(
            q, k, v, qq[0], qq[1], None, kq[0], kq[1], None, kq[3], vq[0], vq[1], None, None, False, None, "int8"),
        "op attention_prologue (layout only)": lambda: ops.attention_prologue(
            q.transpose(1, 2), None, None, None, None, None, None),
        "flash_quant.attention accurate": lambda: flash_quant.attention(q, k, v, config="accurate"),
        "flash_quant.attention fast": lambda: flash_quant.attention(q, k, v, config="fast"),
        "sdpa (default backend)": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
    }
    print(f"flash_quant imported from {flash_quant.__file__}")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"shape {b}x{h}x{s}x{d} bf16; host µs per call (median of {args.iters})")
    for mode in (False, True):
        ctx = torch.inference_mode() if mode else torch.no_grad()
        print(f"\n## under {'torch.inference_mode()' if mode else 'torch.no_grad()'}")
        with ctx:
            for name, fn in rows.items():
                print(f"  {host_us(fn, args.iters):8.1f} µs  {name}")
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        for name, fn in rows.items():
            n0 = len(caught)
            fn()
            if len(caught) > n0:
                print(f"  SYNC in {name}: {caught[n0].message}")
    torch.cuda.set_sync_debug_mode(0)
    print("sync check done")


if __name__ == "__main__":
    main()
