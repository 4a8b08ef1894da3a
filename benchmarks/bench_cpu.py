"""CPU forward speed of flash_quant's kernels against F.scaled_dot_product_attention (fp32).

    python benchmarks/bench_cpu.py [--seq 1024] [--heads 8] [--dims 64 128] [--iters 15]

Per head dim, one row per configuration: quantization time (the quantize ops), attention
time (attention_forward on pre-quantized operands), end-to-end (both), each the median
of --iters runs after warm-up. The runs of all configurations are interleaved round by
round, so that load from other processes on a shared machine hits them alike. Prints a
markdown table and writes benchmarks/results/cpu_<date>.{json,md} stamped with the CPU
model, torch version, thread count and date.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ops():
    try:
        import flash_quant._C  # noqa: F401
    except Exception:
        torch.ops.load_library(glob.glob(os.path.join(ROOT, "flash_quant", "_C*.so"))[0])
    return torch.ops.flash_quant


ops = _ops()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return [x for x in line.split(":", 1)[1].split() if x.startswith("avx512")]
    except OSError:
        pass
    return []


def attention(q, k, v, qq=None, kq=None, k_mean=None, vq=None):
    qq, kq, vq = qq or (None,) * 3, kq or (None,) * 3, vq or (None,) * 3
    return ops.attention_forward(q, k, v, *qq, *kq, k_mean, *vq, None, False, None, "none")[0]


def quant(x, prec, gran="per_token", smooth=False):
    d, s, _, m = ops.quantize(x, prec, gran, 1, "symmetric", smooth)
    return (d, s, None), (m if smooth else None)


def configs(q, k, v):
    """name -> (quantize fn returning attention kwargs, or None)."""

    def int8():  # the accurate INT8 recipe: Q, K int8 per token, K smoothed, V float
        qq, _ = quant(q, "int8")
        kq, km = quant(k, "int8", smooth=True)
        return dict(qq=qq, kq=kq, k_mean=km)

    def int4():
        qq, _ = quant(q, "int4")
        kq, km = quant(k, "int4", smooth=True)
        return dict(qq=qq, kq=kq, k_mean=km)

    def fp8():  # Q, K per token, V per channel, all e4m3
        qq, _ = quant(q, "fp8_e4m3")
        kq, km = quant(k, "fp8_e4m3", smooth=True)
        vq, _ = quant(v, "fp8_e4m3", "per_channel")
        return dict(qq=qq, kq=kq, k_mean=km, vq=vq)

    return {
        "flash_quant fp32 (unquantized)": None,
        "flash_quant INT8 (Q/K int8 per-token, K smoothed, V fp32)": int8,
        "flash_quant INT4 (Q/K int4 per-token, K smoothed, V fp32)": int4,
        "flash_quant FP8 e4m3 (Q/K per-token, V per-channel)": fp8,
    }


def median_ms(xs):
    return statistics.median(xs) * 1e3


def run(seq: int, heads: int, d: int, iters: int, warmup: int):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, d, generator=g) for _ in range(3))
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    ref = sdpa()
    cfgs = configs(q, k, v)
    prepared = {name: (fn() if fn else {}) for name, fn in cfgs.items()}
    # One timed callable per measurement; interleaved round by round.
    timers = {"sdpa": sdpa}
    for name, fn in cfgs.items():
        kw = prepared[name]
        timers[name + "/attn"] = lambda kw=kw: attention(q, k, v, **kw)
        if fn is not None:
            timers[name + "/quant"] = fn
            timers[name + "/e2e"] = lambda fn=fn: attention(q, k, v, **fn())
    times = {key: [] for key in timers}
    for _ in range(warmup):
        for f in timers.values():
            f()
    for _ in range(iters):
        for key, f in timers.items():
            t0 = time.perf_counter()
            f()
            times[key].append(time.perf_counter() - t0)
    t_sdpa = median_ms(times["sdpa"])
    rows = [dict(config="F.scaled_dot_product_attention fp32", d=d, quant_ms=None, attn_ms=t_sdpa,
                 e2e_ms=t_sdpa, speedup_attn=1.0, speedup_e2e=1.0, rel_l2_vs_sdpa=0.0)]
    for name in cfgs:
        attn = median_ms(times[name + "/attn"])
        qt = median_ms(times[name + "/quant"]) if name + "/quant" in times else None
        e2e = median_ms(times[name + "/e2e"]) if name + "/e2e" in times else attn
        out = attention(q, k, v, **prepared[name])
        rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
        rows.append(dict(config=name, d=d, quant_ms=qt, attn_ms=attn, e2e_ms=e2e,
                         speedup_attn=t_sdpa / attn, speedup_e2e=t_sdpa / e2e, rel_l2_vs_sdpa=rel))
    return rows


def markdown(rows, meta) -> str:
    lines = [
        f"CPU forward, B=1, H={meta['heads']}, S={meta['seq']} — {meta['cpu']}, {meta['threads']} threads, "
        f"torch {meta['torch']}, {meta['date']}; median of {meta['iters']} runs (ms)",
        "",
        "| D | config | quantize | attention | end-to-end | SDPA / attention | SDPA / end-to-end | rel. L2 vs SDPA |",
        "|---|--------|---------:|----------:|-----------:|-----------------:|------------------:|----------------:|",
    ]
    for r in rows:
        qt = "—" if r["quant_ms"] is None else f"{r['quant_ms']:.2f}"
        lines.append(
            f"| {r['d']} | {r['config']} | {qt} | {r['attn_ms']:.2f} | {r['e2e_ms']:.2f} | "
            f"{r['speedup_attn']:.2f}× | {r['speedup_e2e']:.2f}× | {r['rel_l2_vs_sdpa']:.2e} |"
        )
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args()
    now = _dt.datetime.now()
    meta = dict(cpu=cpu_model(), avx512=cpu_flags(), torch=torch.__version__, threads=torch.get_num_threads(),
                date=now.isoformat(timespec="seconds"), seq=args.seq, heads=args.heads, iters=args.iters,
                command="python benchmarks/bench_cpu.py " + " ".join(
                    f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                    for k, v in vars(args).items() if k != "out_dir"))
    rows = []
    for d in args.dims:
        rows += run(args.seq, args.heads, d, args.iters, args.warmup)
    md = markdown(rows, meta)
    print(md)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"cpu_{now:%Y-%m-%d}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(md + f"\nCommand: `{meta['command']}`\n")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
