#!/usr/bin/env python
"""Generate an image with a Flux pipeline whose attention runs through flash_quant, and
compare wall time per step and peak memory with diffusers' default (SDPA) attention.

    # a real model from a local directory (diffusers layout, e.g. FLUX.1-dev / schnell)
    python examples/flux/generate.py --model /models/FLUX.1-dev --precision fast \
        --steps 28 --height 1024 --width 1024 --device cuda --output flux_fast.png

    # offline smoke run: a tiny random-weight Flux pipeline built from configs (CPU, < 1 min)
    python examples/flux/generate.py --tiny --precision int8 --steps 2 --device cpu

Precisions: fp16 / bf16 / fp32 (flash_quant unquantized), int8 (= the "accurate" preset:
INT8 Q·Kᵀ), fast (INT8 Q·Kᵀ and P·V), int4, fp8, or any flash_quant preset name.
The SDPA baseline runs first with the same seed (skip it with --no-baseline); both images
are saved (<output> and <output stem>_sdpa.png).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import torch

PRECISIONS = {
    "fp16": "fp16",
    "bf16": "bf16",
    "fp32": "fp32",
    "int8": "accurate",
    "accurate": "accurate",
    "fast": "fast",
    "int4": "int4",
    "fp8": "fp8",
    "auto": "auto",
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------ tiny offline pipeline
TINY_TEXT_LEN = 32


def build_tiny_pipeline(seed: int = 0):
    """A FluxPipeline with random weights, built from small configs without any download:
    FluxTransformer2DModel (1 joint + 2 single blocks, 2 heads of dim 32 = sum of
    axes_dims_rope), tiny CLIP and T5 text encoders, a tiny AutoencoderKL. No tokenizers:
    `encode_prompt_offline` turns a prompt into embeddings with the tiny encoders."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
    )
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=1000, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
            projection_dim=32, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1,
        )
    )
    t5 = T5EncoderModel(T5Config(vocab_size=1000, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2))
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=1.0,
        shift_factor=0.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=None,
        text_encoder_2=t5,
        tokenizer_2=None,
        transformer=transformer,
    )
    return pipe


def encode_prompt_offline(pipe, prompt: str, device):
    """Prompt -> (prompt_embeds, pooled_prompt_embeds) with the tiny encoders and a
    byte-level stand-in for the tokenizers (ids 3..999, CLIP's end token 2 last)."""
    ids = [3 + b % 997 for b in prompt.encode("utf-8")][: TINY_TEXT_LEN - 1]
    clip_ids = torch.tensor([ids + [2]], device=device)
    t5_ids = torch.tensor([(ids + [1] * TINY_TEXT_LEN)[:TINY_TEXT_LEN]], device=device)
    with torch.no_grad():
        pooled = pipe.text_encoder(clip_ids).pooler_output
        embeds = pipe.text_encoder_2(t5_ids).last_hidden_state
    dtype = pipe.transformer.dtype
    return embeds.to(dtype), pooled.to(dtype)


# ----------------------------------------------------------------------------- measuring
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB peak allocated (CUDA)"
    if device.type == "mps":
        return f"{torch.mps.driver_allocated_memory() / 2**30:.2f} GiB driver-allocated (MPS, current)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return f"{rss * scale / 2**30:.2f} GiB process peak RSS (CPU; monotonic over the whole run)"


def run(pipe, args, device, label):
    times = []
    last = [0.0]

    def on_step_end(p, step, timestep, kwargs):
        _sync(device)
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
        return kwargs

    call = dict(
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        generator=torch.Generator("cpu").manual_seed(args.seed),
        callback_on_step_end=on_step_end,
        output_type="pil",
    )
    if args.tiny:
        embeds, pooled = encode_prompt_offline(pipe, args.prompt, device)
        call.update(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    else:
        call.update(prompt=args.prompt, guidance_scale=args.guidance)
    _reset_peak(device)
    _sync(device)
    start = time.perf_counter()
    last[0] = start
    with torch.inference_mode():
        image = pipe(**call).images[0]
    _sync(device)
    total = time.perf_counter() - start
    steady = times[1:] or times
    per_step = sum(steady) / len(steady)
    print(
        f"[{label}] {args.steps} steps in {total:.2f} s; per step {per_step * 1e3:.1f} ms "
        f"(first step {times[0] * 1e3:.1f} ms, mean of the rest); {_peak_memory(device)}"
    )
    return image, per_step


def _precision_choices():
    from flash_quant.config import PRESETS

    return sorted(set(PRECISIONS) | set(PRESETS))


def _device_unavailable(device: str):
    """Why `device` cannot run here (None when it can)."""
    if device == "cuda" and not torch.cuda.is_available():
        return f"CUDA is not available here (torch {torch.__version__})"
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return "MPS is not available (needs an Apple Silicon Mac and a torch built with MPS)"
    return None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local path of a diffusers Flux model (FluxPipeline.from_pretrained)")
    src.add_argument("--tiny", action="store_true", help="a tiny random-weight Flux pipeline built offline")
    ap.add_argument("--precision", default="int8", choices=_precision_choices(),
                    help="attention precision: a short name or a flash_quant preset")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="model dtype (default bf16 on cuda/mps, fp32 on cpu)")
    ap.add_argument("--prompt", default="a photo of a red fox in fresh snow, morning light")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--height", type=int, default=None, help="default 1024 (64 with --tiny)")
    ap.add_argument("--width", type=int, default=None, help="default 1024 (64 with --tiny)")
    ap.add_argument("--guidance", type=float, default=3.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda", "mps"])
    ap.add_argument("--output", default="flux_flash_quant.png")
    ap.add_argument("--no-baseline", action="store_true", help="skip the SDPA baseline run")
    args = ap.parse_args(argv)
    unavailable = _device_unavailable(args.device)
    if unavailable:
        ap.error(f"--device {args.device}: {unavailable}")
    size = 64 if args.tiny else 1024
    args.height = args.height or size
    args.width = args.width or size
    return args


def main(argv=None):
    args = parse_args(argv)
    from flash_quant.integrations.diffusers_flux import apply_flux_attention, remove_flux_attention

    preset = PRECISIONS.get(args.precision, args.precision)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    if args.tiny:
        pipe = build_tiny_pipeline(args.seed).to(device)
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    else:
        from diffusers import FluxPipeline

        if not os.path.isdir(args.model):
            raise SystemExit(f"--model {args.model!r} is not a local directory (this example does not download)")
        pipe = FluxPipeline.from_pretrained(args.model, torch_dtype=dtype, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    print(f"Flux {'tiny (random weights)' if args.tiny else args.model}: {args.height}x{args.width}, {args.steps} steps, "
          f"{dtype}, {device}; flash_quant precision {args.precision} (preset {preset!r})")

    stem, ext = os.path.splitext(args.output)
    base_time = None
    if not args.no_baseline:
        remove_flux_attention(pipe)
        base_image, base_time = run(pipe, args, device, "sdpa")
        base_image.save(f"{stem}_sdpa{ext or '.png'}")
    report = apply_flux_attention(pipe, preset)
    print(report)
    image, fq_time = run(pipe, args, device, f"flash_quant {preset}")
    image.save(args.output)
    if base_time is not None:
        import numpy as np

        a = np.asarray(image, dtype=np.float64)
        b = np.asarray(base_image, dtype=np.float64)
        mse = float(((a - b) ** 2).mean())
        psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
        print(f"speed-up per step vs SDPA: {base_time / fq_time:.3f}x; image PSNR vs SDPA: {psnr:.1f} dB")
    print(f"saved {args.output}")
    return image


if __name__ == "__main__":
    main()
