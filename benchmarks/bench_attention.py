"""Attention benchmark: flash_quant's Triton kernels vs SDPA backends (and SageAttention).

One run on one GPU. For each shape and method: median time (triton.testing.do_bench,
after warm-up), TFLOPS (4·B·Hq·Sq·Skv·D, halved for causal; backward counted as 2.5x the
forward), peak extra memory, and accuracy against a float64 reference on a slice (the last
``--ref-rows`` query rows of the first two heads of batch 0): rel-L2 and cosine.

Methods (inputs bf16 unless --dtype fp16):
  sdpa-flash / sdpa-cudnn / sdpa-efficient   torch SDPA with that backend forced
  sage                                        sageattention.sageattn, when importable
  fq-<preset>-kernel   flash_quant attention_forward on pre-quantized operands
  fq-<preset>-e2e      flash_quant.attention(config=preset): quantization included
  ...-sm90 / ...-triton  the same, accurate and fast presets, with the CUDA forward kernel
                       forced through flash_quant.cuda.dispatch (the Hopper CUDA C++
                       kernel, or Triton); the unsuffixed rows are what users get (the
                       "kernel" column says which kernel served them)
The sage row is whatever `import sageattention` finds (a wheel in .whl/ installed by
gpu_run.sh, or a build of SageAttention from source on PYTHONPATH); the run's meta names
its version and location.
Rows whose path raises print "n/a (reason)"; rows that ran but cannot be right (a rate past
any tensor-core peak, a rel-L2 past 50 %: `not_a_result`) keep their numbers, say "not a
result" in the kernel column, and stay out of the summary and the plot. Results go to benchmarks/results/:
attention_<stamp>.json, .md, .png (matplotlib), stamped with device, date and versions.

  python benchmarks/bench_attention.py            # full
  python benchmarks/bench_attention.py --quick    # two shapes, fewer reps
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import traceback

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = [
    # name, B, Hq, Hkv, S, D, causal
    ("flux-1024", 1, 24, 24, 4608, 128, False),
    ("4x32x4096x128", 4, 32, 32, 4096, 128, False),
    ("4x32x4096x128-causal", 4, 32, 32, 4096, 128, True),
    ("8x32x2048x64", 8, 32, 32, 2048, 64, False),
    ("8x32x2048x96", 8, 32, 32, 2048, 96, False),  # a head dim between the sm90 kernel's tiles
    ("1x32x16384x128", 1, 32, 32, 16384, 128, False),
    ("gqa-2x32(8)x4096x128", 2, 32, 8, 4096, 128, False),
]
QUICK_SHAPES = ["flux-1024", "4x32x4096x128-causal"]
BWD_SHAPES = ["flux-1024", "4x32x4096x128", "4x32x4096x128-causal", "8x32x2048x64"]

# kernel-only operand recipes: (Q/K precision or None, V precision or None, pv_precision)
KERNEL_RECIPES = {
    "accurate": ("int8", None, "none"),
    "fast": ("int8", "int8", "int8"),
    "fast-fp8": ("int8", "fp8_e4m3", "fp8_e4m3"),
    "int4": ("int4", None, "none"),
    "fp8": ("fp8_e4m3", None, "none"),
    "16bit": (None, None, "none"),
}
E2E_PRESETS = ["accurate", "fast", "int4", "16bit"]
#: A row past this rate did not compute what it claims: no GPU this benchmark runs on
#: reaches it (Hopper's dense INT8 / FP8 tensor-core peak is ~1979 TFLOPS). Seen: a peer's
#: launch that failed quietly (SageAttention2 at 1x32x16384, 4860 "TFLOPS").
IMPLAUSIBLE_TFLOPS = 2000.0
#: A row this far from fp64 returned a wrong output (the 8-bit methods sit at 1-4 %). Seen:
#: a peer's GQA call (rel-L2 112 %).
WRONG_OUTPUT_REL_L2 = 0.5


def not_a_result(row) -> str | None:
    """Why a timed row is not a result (its numbers stay in the JSON, marked), or None."""
    if row.get("tflops", 0.0) > IMPLAUSIBLE_TFLOPS:
        return f"not a result: {row['tflops']:.0f} TFLOPS is past any tensor-core peak (a failed launch)"
    if row.get("rel_l2", 0.0) > WRONG_OUTPUT_REL_L2:
        return f"not a result: wrong output (rel-L2 {row['rel_l2']:.2f})"
    return None
# presets timed with each CUDA forward kernel forced (flash_quant.cuda.dispatch)
FORCED_PRESETS = ["accurate", "fast"]
FORCED_KERNELS = ["sm90", "triton"]


def sage_origin() -> str:
    try:
        import sageattention
    except ImportError as exc:
        return f"not importable: {exc}"
    version = getattr(sageattention, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version("sageattention")
        except Exception:
            version = "?"
    return f"{version} from {os.path.dirname(sageattention.__file__)}"


def stamp():
    import triton

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    try:
        from flash_quant._build_info import SM90_KERNELS
    except ImportError:
        SM90_KERNELS = None
    return {
        "sm90_kernels_built": SM90_KERNELS,
        "sageattention": sage_origin(),
        "device": dev,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }


def flops(b, h, sq, skv, d, causal):
    f = 4.0 * b * h * sq * skv * d
    return f / 2 if causal else f


def reference_slice(q, k, v, causal, rows):
    """fp64 output of the last `rows` query rows of heads 0..1 of batch 0 (on the GPU)."""
    from flash_quant.testing import reference_attention

    sq, skv = q.shape[2], k.shape[2]
    r0 = max(0, sq - rows)
    group = q.shape[1] // k.shape[1]
    qs = q[:1, :2, r0:].double()
    ks = k[:1, : (2 + group - 1) // group].double()
    vs = v[:1, : (2 + group - 1) // group].double()
    mask = None
    if causal:
        i = torch.arange(r0, sq, device=q.device)[:, None]
        j = torch.arange(skv, device=q.device)[None, :]
        mask = j <= i
    return reference_attention(qs, ks, vs, attn_mask=mask), r0


def accuracy(out, ref, r0):
    from flash_quant.testing import error_stats

    o = out[:1, :2, r0:]
    return error_stats(o, ref)


def bench(fn, quick):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 120,
                                   return_mode="median")


def graph_ms(fn, quick):
    """GPU time of fn alone: fn captured once in a CUDA graph, the replay timed. Eager
    rows of many small launches are bound by the host (Python + launch overhead); this
    is what the same work costs on the GPU, e.g. under torch.compile / CUDA graphs."""
    from flash_quant.testing import capture_cuda_graph

    return bench(capture_cuda_graph(fn).replay, quick)


def peak_extra_mib(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def sdpa_fn(backend, q, k, v, causal, gqa):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
          "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]

    def run():
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    return run


def kernel_fn(recipe, q, k, v, causal):
    qk_prec, v_prec, pv = KERNEL_RECIPES[recipe]
    ops = torch.ops.flash_quant
    kw = dict(q_data=None, q_scale=None, k_data=None, k_scale=None, k_mean=None, v_data=None, v_scale=None)
    if qk_prec:
        a, s, _, _ = ops.quantize(q, qk_prec, "per_token", 1, "symmetric", False)
        b, t, _, m = ops.quantize(k, qk_prec, "per_token", 1, "symmetric", True)
        kw.update(q_data=a, q_scale=s, k_data=b, k_scale=t, k_mean=m)
    if v_prec:
        c, u, _, _ = ops.quantize(v, v_prec, "per_channel", 1, "symmetric", False)
        kw.update(v_data=c, v_scale=u)
    qa = torch.empty((), dtype=q.dtype, device=q.device).expand(q.shape) if qk_prec else q
    ka = torch.empty((), dtype=k.dtype, device=k.device).expand(k.shape) if qk_prec else k
    va = torch.empty((), dtype=v.dtype, device=v.device).expand(v.shape) if v_prec else v

    op_args = (qa, ka, va, kw["q_data"], kw["q_scale"], None, kw["k_data"], kw["k_scale"], None, kw["k_mean"],
               kw["v_data"], kw["v_scale"], None, None, causal, None, pv)

    def run():
        return ops.attention_forward(*op_args)[0]

    run.op_args = op_args  # (for served_by)
    return run


def forced(kernel, fn):
    """fn with the CUDA forward kernel forced (a kernel that cannot serve the call raises:
    the row prints n/a with the reason)."""
    from flash_quant.cuda import dispatch

    def run():
        with dispatch.force_kernel(kernel):
            return fn()

    if hasattr(fn, "op_args"):
        run.op_args = fn.op_args
    return run


def served_by(fn=None, e2e=None) -> str:
    """Which CUDA forward kernel serves a row's calls in auto mode: "sm90", or "triton
    (reason)"; e2e: (q, k, v, causal, gqa, preset name) of a flash_quant.attention row."""
    try:
        if e2e is not None:
            import flash_quant

            q, k, v, causal, gqa, name = e2e
            kernel, reason = flash_quant.which_kernel(q, k, v, is_causal=causal, enable_gqa=gqa, config=name)
        else:
            from flash_quant.cuda import dispatch

            kernel, reason = dispatch.forward_kernel(*fn.op_args)
    except Exception as exc:
        return f"? ({type(exc).__name__}: {str(exc)[:80]})"
    return kernel if reason is None else f"{kernel} ({reason})"


def e2e_fn(preset, q, k, v, causal, gqa):
    import flash_quant

    name = e2e_config(preset, q)

    def run():
        return flash_quant.attention(q, k, v, is_causal=causal, enable_gqa=gqa, config=name)

    return run


def e2e_config(preset, q):
    return {"16bit": "bf16" if q.dtype == torch.bfloat16 else "fp16"}.get(preset, preset)


def sage_fn(q, k, v, causal):
    from sageattention import sageattn  # noqa: F401

    def run():
        return sageattn(q, k, v, tensor_layout="HND", is_causal=causal)

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two shapes, fewer repetitions")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--ref-rows", type=int, default=256)
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--shapes", default=None,
                    help="comma-separated shape names to run (default: all, or the two of --quick); "
                         "--quick then only shortens the repetitions")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU")
    import flash_quant  # noqa: F401  (registers the CUDA kernels)
    import flash_quant._C  # noqa: F401  (the op schemas, whatever flash_quant loads lazily)
    import flash_quant.cuda  # noqa: F401
    from flash_quant.testing import make_qkv

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    meta = stamp()
    meta["dtype"] = args.dtype
    print(json.dumps(meta))
    if args.shapes:
        wanted = args.shapes.split(",")
        unknown = sorted(set(wanted) - {s[0] for s in SHAPES})
        if unknown:
            ap.error(f"unknown shape(s) {unknown}; known: {[s[0] for s in SHAPES]}")
        shapes = [s for s in SHAPES if s[0] in wanted]
    else:
        shapes = [s for s in SHAPES if not args.quick or s[0] in QUICK_SHAPES]
    rows = []
    tag = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")

    def record(shape, method, phase, fn, fl, ref=None, r0=0, graph=False, kernel=None):
        name, b, hq, hkv, s, d, causal = shape
        row = dict(shape=name, method=method, phase=phase)
        if kernel is not None:
            row["kernel"] = kernel
        try:
            out = fn()
            if isinstance(out, tuple):
                out = out[0]
            torch.cuda.synchronize()
            ms = bench(fn, args.quick)
            row.update(ms=ms, tflops=fl / (ms * 1e-3) / 1e12, peak_mib=peak_extra_mib(fn))
            if graph:
                try:
                    row["graph_ms"] = graph_ms(fn, args.quick)
                except Exception as exc:  # not capturable: say so
                    row["graph_na"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
            if ref is not None and out is not None and torch.is_tensor(out) and out.dim() == 4:
                row.update(accuracy(out, ref, r0))
            invalid = not_a_result(row)
            if invalid:
                row["invalid"] = invalid
                row["kernel"] = f"{row['kernel']}; {invalid}" if "kernel" in row else invalid
        except Exception as exc:  # the row prints n/a with the reason, never a number
            row["na"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            if os.environ.get("FQ_BENCH_TRACE"):
                traceback.print_exc()
        rows.append(row)
        if "na" in row:
            print(f"{name:24s} {phase:8s} {method:24s} n/a ({row['na']})", flush=True)
        else:
            acc = f"rel-L2 {row['rel_l2']:.2e} cos {row['cosine']:.6f}" if "rel_l2" in row else ""
            gr = f" graph {row['graph_ms']:.3f} ms" if "graph_ms" in row else (
                f" graph n/a ({row['graph_na']})" if "graph_na" in row else "")
            kn = f" [{row['kernel']}]" if "kernel" in row else ""
            print(f"{name:24s} {phase:8s} {method:24s} {row['ms']:8.3f} ms {row['tflops']:7.1f} TFLOPS "
                  f"peak+{row['peak_mib']:8.1f} MiB {acc}{gr}{kn}", flush=True)
        return row

    for shape in shapes:
        name, b, hq, hkv, s, d, causal = shape
        q, k, v = make_qkv(b, hq, s, d, hkv=hkv, family="normal", dtype=dtype, device="cuda", seed=0)
        gqa = hq != hkv
        ref, r0 = reference_slice(q, k, v, causal, args.ref_rows)
        fl = flops(b, hq, s, s, d, causal)
        for be in ("flash", "cudnn", "efficient"):
            record(shape, f"sdpa-{be}", "fwd", sdpa_fn(be, q, k, v, causal, gqa), fl, ref, r0)
        try:
            record(shape, "sage", "fwd", sage_fn(q, k, v, causal), fl, ref, r0)
        except ImportError as exc:
            rows.append(dict(shape=name, method="sage", phase="fwd", na=f"not importable: {exc}"))
            print(f"{name:24s} fwd      sage                     n/a (not importable: {exc})")
        # the quantization kernels alone (what "kernel" rows exclude), as the presets call
        # them: Q int8 per token and K int8 per token smoothed, both Hadamard-rotated (in
        # the kernels), V int8 / fp8 per channel (K-major)
        ops = torch.ops.flash_quant
        for vprec in ("none", "int8", "fp8_e4m3"):
            byts = (q.numel() + (2 if vprec != "none" else 1) * k.numel()) * (q.element_size() + 1)

            def quant_all(vprec=vprec):
                ops.quantize(q, "int8", "per_token", 1, "symmetric", False, True)
                ops.quantize(k, "int8", "per_token", 1, "symmetric", True, True)
                if vprec != "none":
                    ops.quantize(v, vprec, "per_channel", 1, "symmetric", False)
            r = record(shape, f"quantize-qkv(v {vprec})", "quant", quant_all, 0.0, graph=True)
            if "ms" in r:
                r["gbps"] = byts / (r["ms"] * 1e-3) / 1e9
                print(f"{'':24s} quant    {'':24s} {r['gbps']:.0f} GB/s (bytes read + written, colstats pass not counted)")
        for recipe in KERNEL_RECIPES:
            try:
                fn = kernel_fn(recipe, q, k, v, causal)
            except Exception as exc:
                rows.append(dict(shape=name, method=f"fq-{recipe}-kernel", phase="fwd", na=str(exc)[:160]))
                continue
            record(shape, f"fq-{recipe}-kernel", "fwd", fn, fl, ref, r0, kernel=served_by(fn))
            if recipe in FORCED_PRESETS:
                for kern in FORCED_KERNELS:
                    record(shape, f"fq-{recipe}-kernel-{kern}", "fwd", forced(kern, fn), fl, ref, r0, kernel=kern)
        for preset in E2E_PRESETS:
            fn = e2e_fn(preset, q, k, v, causal, gqa)
            record(shape, f"fq-{preset}-e2e", "fwd", fn, fl, ref, r0, graph=True,
                   kernel=served_by(e2e=(q, k, v, causal, gqa, e2e_config(preset, q))))
            if preset in FORCED_PRESETS:
                for kern in FORCED_KERNELS:
                    record(shape, f"fq-{preset}-e2e-{kern}", "fwd", forced(kern, fn), fl, ref, r0, graph=True,
                           kernel=kern)
        if not args.no_backward and name in BWD_SHAPES and (not args.quick or name == "flux-1024"):
            qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
            g = torch.randn_like(q)
            methods = [("sdpa-cudnn", lambda: sdpa_fn("cudnn", qg, kg, vg, causal, gqa)()),
                       ("sdpa-flash", lambda: sdpa_fn("flash", qg, kg, vg, causal, gqa)())]
            methods += [(f"fq-{p}", (lambda p=p: e2e_fn(p, qg, kg, vg, causal, gqa)())) for p in ("accurate", "16bit")]
            for mname, fwd in methods:
                def fwd_bwd(fwd=fwd):
                    out = fwd()
                    out.backward(g)
                    return None

                record(shape, mname, "fwd+bwd", fwd_bwd, fl * 3.5)
                # backward alone: a fresh graph each call, timed as fwd+bwd minus fwd
                try:
                    fw = [r for r in rows if r["shape"] == name and r["phase"] == "fwd+bwd" and r["method"] == mname][-1]
                    fwd_ms = bench(lambda: fwd(), args.quick)
                    if "ms" in fw:
                        bms = fw["ms"] - fwd_ms
                        rows.append(dict(shape=name, method=mname, phase="bwd", ms=bms,
                                         tflops=fl * 2.5 / (bms * 1e-3) / 1e12, derived="fwd+bwd minus fwd"))
                        print(f"{name:24s} bwd      {mname:24s} {bms:8.3f} ms {rows[-1]['tflops']:7.1f} TFLOPS (fwd+bwd minus fwd)")
                    else:
                        rows.append(dict(shape=name, method=mname, phase="bwd", na=fw.get("na", "fwd+bwd failed")))
                except Exception as exc:
                    rows.append(dict(shape=name, method=mname, phase="bwd", na=f"{type(exc).__name__}: {exc}"[:160]))
            del qg, kg, vg, g
        del q, k, v
        torch.cuda.empty_cache()
        write_results(meta, rows, {}, args.out, tag, quiet=True)  # partial results survive a kill

    # quantization share of end-to-end time (Flux shape)
    summary = {}
    for sh in [x[0] for x in shapes]:
        for preset, vprec in (("accurate", "none"), ("fast", "int8"), ("fast-fp8", "fp8_e4m3")):
            qr = [r for r in rows if r["shape"] == sh and r["method"] == f"quantize-qkv(v {vprec})" and "ms" in r]
            kr = [r for r in rows if r["shape"] == sh and r["method"] == f"fq-{preset}-kernel" and "ms" in r]
            if qr and kr:
                qms = qr[0]["ms"]
                summary[f"{sh}: quantize / (quantize + attention kernel), {preset}, eager (host-bound)"] = qms / (qms + kr[0]["ms"])
                if "graph_ms" in qr[0]:
                    qg = qr[0]["graph_ms"]
                    summary[f"{sh}: quantize / (quantize + attention kernel), {preset}, GPU time (CUDA graph)"] = qg / (qg + kr[0]["ms"])
    for preset in ("accurate", "fast", "int4"):
        kr = [r for r in rows if r["shape"] == "flux-1024" and r["method"] == f"fq-{preset}-kernel" and "ms" in r]
        er = [r for r in rows if r["shape"] == "flux-1024" and r["method"] == f"fq-{preset}-e2e" and "ms" in r]
        if kr and er:
            summary[f"flux: (e2e - kernel) / e2e, {preset} (flash_quant.attention incl. rotation), eager"] = (er[0]["ms"] - kr[0]["ms"]) / er[0]["ms"]
            if "graph_ms" in er[0]:
                summary[f"flux: (e2e - kernel) / e2e, {preset}, GPU time (CUDA graph)"] = (er[0]["graph_ms"] - kr[0]["ms"]) / er[0]["graph_ms"]
    # the bars are speed ratios within the run: SDPA cuDNN's time over each method's
    for sh in [x[0] for x in shapes]:
        cu = [r for r in rows if r["shape"] == sh and r["method"] == "sdpa-cudnn" and "ms" in r]
        if not cu:
            continue
        for r in rows:
            if r["shape"] == sh and r["phase"] == "fwd" and "ms" in r and "invalid" not in r and (
                    r["method"] == "sage" or r["method"].startswith("fq-")):
                summary[f"{sh}: speed vs sdpa-cudnn (cudnn ms / ms), {r['method']}"] = cu[0]["ms"] / r["ms"]
    try:
        from flash_quant.cuda import autotune

        meta["autotune"] = autotune.describe()
    except Exception as exc:
        meta["autotune"] = f"n/a: {exc}"
    write_results(meta, rows, summary, args.out, tag)


def write_results(meta, rows, summary, out_dir, tag, quiet=False):
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"attention_{tag}")
    with open(base + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows, summary=summary), f, indent=1)
    lines = [f"# Attention benchmark — {meta['device']}, {meta['date']}",
             "", f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, inputs {meta['dtype']}; "
             f"command `{meta['command']}`. TFLOPS = 4·B·H·Sq·Skv·D (÷2 causal; bwd ×2.5, fwd+bwd ×3.5) over the "
             "median time. Accuracy vs float64 on the last query rows of heads 0-1 of batch 0. "
             "*graph ms*: the same call captured in a CUDA graph and replayed (GPU time without the "
             "host's Python and launch overhead, which bounds the eager rows of many small launches).", "",
             f"Hopper sm90 kernels built: {meta.get('sm90_kernels_built')}; sageattention: "
             f"{meta.get('sageattention')}. *kernel*: the CUDA forward kernel that served the row "
             "(forced for the -sm90 / -triton rows; for the others the dispatcher's pick and why).", "",
             "| shape | phase | method | ms | TFLOPS | graph ms | peak extra MiB | rel-L2 | cosine | kernel |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kn = r.get("kernel", "")
        if "na" in r:
            lines.append(f"| {r['shape']} | {r['phase']} | {r['method']} | n/a ({r['na']}) | | | | | | {kn} |")
        else:
            rel = f"{r['rel_l2']:.2e}" if "rel_l2" in r else ""
            cos = f"{r['cosine']:.6f}" if "cosine" in r else ""
            pk = f"{r['peak_mib']:.1f}" if "peak_mib" in r else ""
            gr = f"{r['graph_ms']:.3f}" if "graph_ms" in r else ("n/a" if "graph_na" in r else "")
            lines.append(f"| {r['shape']} | {r['phase']} | {r['method']} | {r['ms']:.3f} | {r['tflops']:.1f} | {gr} | {pk} | {rel} | {cos} | {kn} |")
    if summary:
        lines += ["", "| summary | value |", "|---|---|"] + [f"| {k} | {v:.1%} |" for k, v in summary.items()]
    lines += ["", "```", str(meta.get("autotune", "")), "```"]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    if quiet:
        return
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fwd = [r for r in rows if r["phase"] == "fwd" and "tflops" in r and "invalid" not in r]
        shapes = sorted({r["shape"] for r in fwd}, key=[s[0] for s in SHAPES].index)
        methods = sorted({r["method"] for r in fwd})
        fig, ax = plt.subplots(figsize=(max(10, 1.8 * len(shapes)), 6))
        w = 0.8 / max(1, len(methods))
        for i, m in enumerate(methods):
            ys = [next((r["tflops"] for r in fwd if r["shape"] == s and r["method"] == m), 0) for s in shapes]
            ax.bar([x + i * w for x in range(len(shapes))], ys, w, label=m)
        ax.set_xticks([x + 0.4 for x in range(len(shapes))])
        ax.set_xticklabels(shapes, rotation=15, fontsize=8)
        ax.set_ylabel("TFLOPS (forward)")
        ax.set_title(f"{meta['device']} {meta['date']} torch {meta['torch']} triton {meta['triton']}", fontsize=9)
        ax.legend(fontsize=7, ncol=3)
        fig.tight_layout()
        fig.savefig(base + ".png", dpi=110)
    except Exception as exc:
        print(f"chart: n/a ({exc})")
    print(f"wrote {base}.json / .md / .png")


if __name__ == "__main__":
    main()
