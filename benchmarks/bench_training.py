"""Training benchmarks for flash_quant's backward (GPU).

--mode curves : train examples/train_tiny_transformer.py's model with SDPA and with
                flash_quant (same seed / data / init), write
                benchmarks/results/training_<date>.json and .png (loss curves).
--mode kernel : time the Triton backward standalone and through autograd against SDPA
                (cuDNN and FlashAttention-2 backends), bf16, and peak memory of fwd+bwd.
--mode check  : the raw Triton backward vs float64 (accuracy table), standalone.
--mode all    : all three.

    python benchmarks/bench_training.py --mode all --out benchmarks/results

TFLOPS are counted as in /work/shared/CONTEXT.md: forward 4·B·H·S²·D (halved when
causal); backward 2.5× the forward count; fwd+bwd 3.5×.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import platform

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stamp():
    import triton

    return {
        "date": str(datetime.date.today()),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
    }


def _example():
    spec = importlib.util.spec_from_file_location(
        "train_tiny_transformer", os.path.join(ROOT, "examples", "train_tiny_transformer.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------ curves
def run_curves(out_dir, preset, steps):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ex = _example()
    cfg = ex.PRESETS[preset]
    if steps:
        cfg.steps = steps
    names = ["sdpa", "flash_quant:accurate", "flash_quant:bf16"]
    res = {n: ex.train(cfg, n, device="cuda", log_every=max(1, cfg.steps // 6)) for n in names}
    base = ex.final_loss(res["sdpa"]["loss"])
    summary = {n: {"final_loss": ex.final_loss(r["loss"]), "seconds": r["seconds"],
                   "rel_diff_vs_sdpa": abs(ex.final_loss(r["loss"]) - base) / base} for n, r in res.items()}
    stamp = _stamp()
    tag = stamp["date"]
    with open(os.path.join(out_dir, f"training_{tag}.json"), "w") as f:
        json.dump({"stamp": stamp, "config": vars(cfg), "preset": preset, "summary": summary,
                   "loss": {n: r["loss"] for n, r in res.items()}}, f)
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for n, r in res.items():
        ax[0].plot(r["loss"], label=n, lw=1)
        ax[1].plot(r["loss"], label=n, lw=1)
    ax[0].set_yscale("log")
    ax[1].set_xlim(int(cfg.steps * 0.7), cfg.steps)
    lo = min(min(r["loss"][int(cfg.steps * 0.7):]) for r in res.values())
    hi = max(max(r["loss"][int(cfg.steps * 0.7):]) for r in res.values())
    ax[1].set_ylim(lo * 0.95, hi * 1.05)
    for a in ax:
        a.set_xlabel("step")
        a.set_ylabel("loss (sorted half)")
        a.legend()
    ax[1].set_title("last 30 % of steps")
    fig.suptitle(f"tiny transformer, sort task ({preset}: d={cfg.d_model}, heads={cfg.heads}, "
                 f"layers={cfg.layers}, seq={2 * cfg.n + 1}, {cfg.dtype}) — {stamp['device']}, {tag}")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"training_{tag}.png"), dpi=110)
    print("| attention | final loss (mean last 10 %) | rel. diff vs SDPA | train time |")
    print("|---|---|---|---|")
    for n, s in summary.items():
        print(f"| {n} | {s['final_loss']:.4f} | {100 * s['rel_diff_vs_sdpa']:.2f} % | {s['seconds']:.1f} s |")
    return summary


# ------------------------------------------------------------------------ kernel
def quantize_accurate(q, k):
    """INT8 per-token symmetric Q, INT8 per-token symmetric K smoothed by its mean over the
    sequence (torch code, independent of the library's quantizer). Returns the op's
    operands and the dequantized Q and (full, mean added back) K."""
    qf, kf = q.float(), k.float()
    qs = (qf.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
    qd = torch.clamp(torch.round(qf / qs), -127, 127)
    km = kf.mean(-2, keepdim=True)
    ks = ((kf - km).abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
    kd = torch.clamp(torch.round((kf - km) / ks), -127, 127)
    return (qd.to(torch.int8), qs, kd.to(torch.int8), ks, km, (qd * qs).to(q.dtype),
            (kd * ks + km).to(k.dtype))


def _fa2_out_lse(q, k, v, causal):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal)[:2]
    return out, lse.float().contiguous()


def run_check():
    """The raw Triton backward on CUDA vs fp64, no dependence on the forward kernels:
    16-bit path and the INT8-QK path (vs the gradient over the dequantized operands, and
    vs the unquantized fp64 gradient — the issue's bar), S=1024, two input families."""
    from flash_quant.cuda.backward import attention_backward_triton
    from flash_quant.testing import error_stats, make_qkv, reference_attention, reference_attention_backward

    rows = []
    for family in ("normal", "realistic"):
        for d in (64, 128):
            for dt in (torch.bfloat16, torch.float16):
                for causal in ((False, True) if dt == torch.bfloat16 else (False,)):
                    q, k, v = (t.to(dt).cuda() for t in make_qkv(1, 4, 1024, d, family=family, hkv=2))
                    do = torch.randn(q.shape, device="cuda").to(dt)
                    ref = reference_attention_backward(do, q, k, v, is_causal=causal)
                    o, lse = reference_attention(q, k, v, is_causal=causal, return_lse=True)
                    got = attention_backward_triton(do, q, k, v, o.to(dt), lse.float(), is_causal=causal)
                    r16 = [error_stats(g, r) for g, r in zip(got, ref)]
                    qd, qs, kd, ks, km, qdeq, kfull = quantize_accurate(q, k)
                    qdeq64 = qd.double() * qs
                    kfull64 = kd.double() * ks + km
                    o8, lse8 = reference_attention(qdeq64, kfull64, v, is_causal=causal, return_lse=True)
                    got8 = attention_backward_triton(do, q, k, v, o8.to(dt), lse8.float(), qd, qs, None, kd, ks,
                                                     None, km, is_causal=causal)
                    ref8 = reference_attention_backward(do, qdeq64, kfull64, v, is_causal=causal)
                    r8st = [error_stats(g, r) for g, r in zip(got8, ref8)]
                    r8 = [error_stats(g, r) for g, r in zip(got8, ref)]
                    rows.append(dict(family=family, d=d, dtype=str(dt).split(".")[-1], causal=causal,
                                     k16=r16, int8_vs_st=r8st, int8_vs_exact=r8))
    print("| family | D | dtype | causal | 16-bit: max rel-L2 / min cos | INT8-QK vs its own fp64 (straight-through) "
          "| INT8-QK vs unquantized fp64 (bar: ≤3 %, ≥0.999) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda st: f"{100 * max(s['rel_l2'] for s in st):.2f} % / {min(s['cosine'] for s in st):.5f}"  # noqa
        print(f"| {r['family']} | {r['d']} | {r['dtype']} | {r['causal']} | {f(r['k16'])} | "
              f"{f(r['int8_vs_st'])} | {f(r['int8_vs_exact'])} |")
    return rows


def _bench(fn, warmup=5, rep=20):
    import triton

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def run_kernel(out_dir, shapes):
    import flash_quant
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for (b, h, s, d, causal) in shapes:
        dt = torch.bfloat16
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dt) for _ in range(3))
        do = torch.randn_like(q)
        fwd_flops = 4 * b * h * s * s * d * (0.5 if causal else 1.0)
        row = {"shape": f"{b}x{h}x{s}x{d}" + (" causal" if causal else "")}

        def case(attend):
            """(backward ms, fwd+bwd ms, fwd+bwd peak bytes) of attend(q, k, v)."""
            qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
            out = attend(qq, kk, vv)
            bwd_ms = _bench(lambda: torch.autograd.grad(out, (qq, kk, vv), do, retain_graph=True))

            def fb():
                torch.autograd.grad(attend(qq, kk, vv), (qq, kk, vv), do)
            fb_ms = _bench(fb)
            del out
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fb()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            return bwd_ms, fb_ms, peak

        def sdpa_case(backend):
            def attend(qq, kk, vv):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal)
            return case(attend)

        def fq_case(config):
            return case(lambda qq, kk, vv: flash_quant.attention(qq, kk, vv, is_causal=causal, config=config))

        for name, fn in (("cudnn", lambda: sdpa_case(SDPBackend.CUDNN_ATTENTION)),
                         ("fa2", lambda: sdpa_case(SDPBackend.FLASH_ATTENTION)),
                         ("fq_accurate", lambda: fq_case("accurate")),
                         ("fq_bf16", lambda: fq_case("bf16"))):
            try:
                bwd_ms, fb_ms, peak = fn()
                row[name] = {"bwd_ms": bwd_ms, "bwd_tflops": 2.5 * fwd_flops / bwd_ms / 1e9,
                             "fb_ms": fb_ms, "fb_tflops": 3.5 * fwd_flops / fb_ms / 1e9,
                             "peak_mib": peak / 2**20}
            except Exception as e:  # report, never hide
                row[name] = {"error": repr(e)[:300]}
        # The raw kernel, no autograd and no dependence on the forward kernels: operands
        # quantized here (accurate preset's layout), out / lse from FlashAttention-2.
        try:
            from flash_quant.cuda.backward import attention_backward_triton

            qd, qs, kd, ks, km, qdeq, kfull = quantize_accurate(q, k)
            out, lse = _fa2_out_lse(qdeq, kfull, v, causal)
            ms8 = _bench(lambda: attention_backward_triton(do, q, k, v, out, lse, qd, qs, None, kd, ks, None, km,
                                                           is_causal=causal))
            out16, lse16 = _fa2_out_lse(q, k, v, causal)
            ms16 = _bench(lambda: attention_backward_triton(do, q, k, v, out16, lse16, is_causal=causal))
            row["kernel_int8qk"] = {"bwd_ms": ms8, "bwd_tflops": 2.5 * fwd_flops / ms8 / 1e9}
            row["kernel_bf16"] = {"bwd_ms": ms16, "bwd_tflops": 2.5 * fwd_flops / ms16 / 1e9}
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            attention_backward_triton(do, q, k, v, out16, lse16, is_causal=causal)
            torch.cuda.synchronize()
            row["kernel_bf16"]["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        except Exception as e:
            row["kernel_int8qk"] = {"error": repr(e)[:300]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    stamp = _stamp()
    with open(os.path.join(out_dir, f"bench_backward_{stamp['date']}.json"), "w") as f:
        json.dump({"stamp": stamp, "rows": rows}, f, indent=1)

    def cell(r, key, field, fmt="{:.0f}"):
        x = r.get(key, {})
        return fmt.format(x[field]) if field in x else "err"

    print(f"\nbf16, {stamp['device']}, {stamp['date']}, torch {stamp['torch']}, triton {stamp['triton']}")
    print("| shape | bwd TFLOPS cuDNN | FA2 | fq kernel int8-QK | fq kernel bf16 | fq accurate (autograd) | "
          "fq bf16 (autograd) | fwd+bwd TFLOPS cuDNN | fq accurate | peak MiB cuDNN | fq accurate |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {cell(r, 'cudnn', 'bwd_tflops')} | {cell(r, 'fa2', 'bwd_tflops')} | "
              f"{cell(r, 'kernel_int8qk', 'bwd_tflops')} | {cell(r, 'kernel_bf16', 'bwd_tflops')} | "
              f"{cell(r, 'fq_accurate', 'bwd_tflops')} | {cell(r, 'fq_bf16', 'bwd_tflops')} | "
              f"{cell(r, 'cudnn', 'fb_tflops')} | {cell(r, 'fq_accurate', 'fb_tflops')} | "
              f"{cell(r, 'cudnn', 'peak_mib')} | {cell(r, 'fq_accurate', 'peak_mib')} |")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="all", choices=["check", "curves", "kernel", "all"])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--preset", default="large")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--shapes", default="4x32x4096x128,4x32x4096x128c,1x24x4608x128,8x32x2048x64")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_training.py needs a CUDA GPU")
    import flash_quant  # noqa: F401  (registers the CUDA kernels)

    os.makedirs(args.out, exist_ok=True)
    shapes = []
    for s in args.shapes.split(","):
        causal = s.endswith("c")
        b, h, n, d = (int(x) for x in s.rstrip("c").split("x"))
        shapes.append((b, h, n, d, causal))
    stamp = _stamp()
    if args.mode in ("check", "all"):
        rows = run_check()
        with open(os.path.join(args.out, f"backward_check_{stamp['date']}.json"), "w") as f:
            json.dump({"stamp": stamp, "rows": rows}, f)
    if args.mode in ("kernel", "all"):
        run_kernel(args.out, shapes)
    if args.mode in ("curves", "all"):
        run_curves(args.out, args.preset, args.steps)


if __name__ == "__main__":
    main()
