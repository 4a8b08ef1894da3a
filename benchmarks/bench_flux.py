#!/usr/bin/env python
"""Full-size Flux transformer, one denoising step: flash_quant presets against SDPA.

    python benchmarks/bench_flux.py                       # GPU: 1024² and 2048², presets fast + accurate
    python benchmarks/bench_flux.py --sizes 1024 --presets fast --iters 10
    python benchmarks/bench_flux.py --tiny --device cpu   # smoke test of the script itself

Model: FluxTransformer2DModel with FLUX.1-dev's architecture (19 double-stream + 38
single-stream blocks, 24 heads of dim 128, joint_attention_dim 4096, guidance embedding)
and random weights, in bf16 (~24 GB). Inputs: batch 1, 512 text tokens, and 4096 image
tokens at 1024² (16384 at 2048²), i.e. (H/16)·(W/16).

Modes, all on the same inputs and weights:
  sdpa                diffusers' FluxAttnProcessor → F.scaled_dot_product_attention, whatever
                      backend SDPA picks by default;
  <preset>            flash_quant's FluxQuantAttnProcessor with that preset (its default:
                      QK-norm + concatenation + RoPE fused into one attention_prologue
                      kernel per tensor);
  <preset>_unfused    the same with diffusers' own QK-norm / RoPE / concatenation steps;
  no_attention        the processor with diffusers' steps and the attention op replaced by
                      "return V" (projections, QK-norm, RoPE, concatenation and output
                      projections all still run): the step time of everything but attention;
  no_attention_fused  likewise with the fused prologue;
  sdpa_fused          the fused prologue followed by SDPA (default backend): separates
                      what the prologue gains from what flash_quant's attention gains.
A step is one transformer forward (FLUX.1-dev uses guidance distillation: no CFG pass).
Timing: CUDA events around each step after --warmup steps; the median of --iters.
Accuracy: cosine similarity of each preset's output to the SDPA output.

Bars (H100): fast ≥ 1.04× SDPA at 1024², ≥ 1.12× at 2048²; cosine ≥ 0.99.
Writes benchmarks/results/flux_<date>.json and .md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import statistics
import time

import torch

BARS = {("fast", 1024): 1.04, ("fast", 2048): 1.12}
COSINE_BAR = 0.99
RESULTS = pathlib.Path(__file__).resolve().parent / "results"

FULL = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
TINY = dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=32,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
    axes_dims_rope=(8, 12, 12),
)


def build_model(cfg, device, dtype):
    from diffusers import FluxTransformer2DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in bf16 on the device (no fp32 copy)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = FluxTransformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval()


def make_inputs(cfg, side_px: int, text_tokens: int, device, dtype):
    side = side_px // 16  # 8x VAE downsampling, then 2x2 patch packing
    g = torch.Generator(device="cpu").manual_seed(1)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    x = dict(
        hidden_states=torch.randn(1, side * side, cfg["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(1, text_tokens, cfg["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=img_ids,
        txt_ids=torch.zeros(text_tokens, 3),
    )
    if cfg["guidance_embeds"]:
        x["guidance"] = torch.tensor([3.5])
    out = {}
    for k, v in x.items():
        out[k] = v.to(device=device, dtype=dtype if v.is_floating_point() and not k.endswith("ids") else v.dtype)
    return out


BASELINE_MODES = ("sdpa", "no_attention", "no_attention_fused", "sdpa_fused")


def _processor_with_attention(attend, fuse_prologue: bool):
    """A FluxQuantAttnProcessor whose attention op is `attend(q, k, v, mask)`."""
    from flash_quant.integrations.diffusers_flux import FluxQuantAttnProcessor

    class Processor(FluxQuantAttnProcessor):
        def _attend(self, q, k, v, mask):
            return attend(q, k, v, mask)

    return Processor("fp32", fuse_prologue=fuse_prologue)


def _sdpa(q, k, v, mask):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def set_mode(model, mode):
    from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

    from flash_quant.integrations.diffusers_flux import apply_flux_attention

    procs = {
        "no_attention": lambda: _processor_with_attention(lambda q, k, v, mask: v, fuse_prologue=False),
        "no_attention_fused": lambda: _processor_with_attention(lambda q, k, v, mask: v, fuse_prologue=True),
        "sdpa_fused": lambda: _processor_with_attention(_sdpa, fuse_prologue=True),
    }
    proc = procs[mode]() if mode in procs else FluxAttnProcessor()
    for m in model.modules():
        if isinstance(m, FluxAttention):
            m.set_processor(proc)
    if mode not in BASELINE_MODES:
        preset, unfused = (mode[: -len("_unfused")], True) if mode.endswith("_unfused") else (mode, False)
        report = apply_flux_attention(model, preset, fuse_prologue=not unfused)
        assert not report.skipped, report


def time_steps(model, inputs, device, warmup: int, iters: int):
    with torch.inference_mode():
        for _ in range(warmup):
            out = model(**inputs, return_dict=False)[0]
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = model(**inputs, return_dict=False)[0]
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                out = model(**inputs, return_dict=False)[0]
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times, out


def cosine(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="image side in pixels")
    ap.add_argument("--presets", nargs="+", default=["fast", "fast_unfused", "accurate"],
                    help="flash_quant modes: a preset name, or <preset>_unfused")
    ap.add_argument("--baselines", nargs="+", default=list(BASELINE_MODES), choices=BASELINE_MODES)
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny config (to test this script on CPU)")
    ap.add_argument("--out", default=None, help="result file stem (default benchmarks/results/flux_<date>)")
    args = ap.parse_args(argv)
    if args.tiny and args.sizes == [1024, 2048]:
        args.sizes = [128]
        args.text_tokens = min(args.text_tokens, 16)

    device = torch.device(args.device)
    dtype = torch.bfloat16
    cfg = TINY if args.tiny else FULL
    model = build_model(cfg, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    env = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype),
        "model": "tiny" if args.tiny else "FLUX.1-dev architecture, random weights",
        "params": n_params,
        "text_tokens": args.text_tokens,
        "warmup": args.warmup,
        "iters": args.iters,
    }
    try:
        import diffusers
        import triton

        env["diffusers"], env["triton"] = diffusers.__version__, triton.__version__
    except ImportError:
        pass
    print(json.dumps(env))
    rows = []
    for size in args.sizes:
        inputs = make_inputs(cfg, size, args.text_tokens, device, dtype)
        image_tokens = inputs["hidden_states"].shape[1]
        results = {}
        for mode in ["sdpa", "no_attention"] + [b for b in args.baselines if b not in ("sdpa", "no_attention")] + list(args.presets):
            set_mode(model, mode)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            ms, all_ms, out = time_steps(model, inputs, device, args.warmup, args.iters)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            results[mode] = (ms, out.float().cpu() if mode == "sdpa" else out)
            row = {"size": size, "image_tokens": image_tokens, "mode": mode, "step_ms": ms, "all_ms": all_ms, "peak_gib": peak}
            if mode != "sdpa" and not mode.startswith("no_attention"):
                row["speedup_vs_sdpa"] = results["sdpa"][0] / ms
                row["cosine_vs_sdpa"] = cosine(out.float().cpu(), results["sdpa"][1])
                bar = BARS.get((mode, size))
                row["speedup_bar"] = bar
                row["passes"] = (bar is None or row["speedup_vs_sdpa"] >= bar) and row["cosine_vs_sdpa"] >= COSINE_BAR
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "all_ms"}))
        sdpa_ms, free_ms = results["sdpa"][0], results["no_attention"][0]
        fused_free = results.get("no_attention_fused", (None,))[0]
        for row in rows:
            if row["size"] == size:
                row["attention_share_sdpa"] = (sdpa_ms - free_ms) / sdpa_ms
                if fused_free is not None:
                    row["prologue_saving_share_sdpa"] = (free_ms - fused_free) / sdpa_ms
        del inputs, results
    write(env, rows, args.out)


def write(env, rows, stem):
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = pathlib.Path(stem) if stem else RESULTS / f"flux_{env['date']}"
    stem.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    lines = [
        f"# Flux transformer step: flash_quant vs SDPA ({env['date']})",
        "",
        f"{env['device']}, torch {env['torch']}, {env['dtype']}, {env['model']} ({env['params'] / 1e9:.2f} B params), "
        f"{env['text_tokens']} text tokens; median of {env['iters']} steps after {env['warmup']} warm-up.",
        "`no_attention`: diffusers' steps with the attention op replaced by `return V` (the step without attention); "
        "`*_fused` / presets: QK-norm + concatenation + RoPE fused into one `attention_prologue` kernel per tensor; "
        "`*_unfused`: diffusers' own steps around flash_quant attention; `sdpa_fused`: fused prologue + SDPA.",
        "",
        "| image | tokens | mode | step ms | vs SDPA | cosine vs SDPA | bar | peak GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = f"{r['speedup_vs_sdpa']:.3f}×" if "speedup_vs_sdpa" in r else ""
        cos = f"{r['cosine_vs_sdpa']:.5f}" if "cosine_vs_sdpa" in r else ""
        bar = ""
        if "passes" in r:
            bar = ("pass" if r["passes"] else "FAIL") + (f" (≥ {r['speedup_bar']}×, cos ≥ {COSINE_BAR})" if r["speedup_bar"] else f" (cos ≥ {COSINE_BAR})")
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else ""
        lines.append(f"| {r['size']}² | {r['image_tokens']}+{env['text_tokens']} | {r['mode']} | {r['step_ms']:.1f} | {speed} | {cos} | {bar} | {peak} |")
    shares = {r["size"]: r["attention_share_sdpa"] for r in rows}
    lines += ["", "Attention share of the SDPA step ((sdpa − no_attention) / sdpa): " + ", ".join(f"{s}²: {v * 100:.0f} %" for s, v in shares.items())]
    saved = {r["size"]: r["prologue_saving_share_sdpa"] for r in rows if "prologue_saving_share_sdpa" in r}
    if saved:
        lines += ["", "Share of the SDPA step the fused prologue removes ((no_attention − no_attention_fused) / sdpa): "
                  + ", ".join(f"{s}²: {v * 100:.0f} %" for s, v in saved.items())]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
