#!/usr/bin/env python
"""HF transformers with flash_quant attention: a Llama-style model, logits against SDPA.

    python examples/hf_llama.py                       # tiny random-weight Llama built offline
    python examples/hf_llama.py --model /models/Llama-3.2-1B --preset fast --device cuda
    python examples/hf_llama.py --kv-cache int8 --dtype bf16 --seq 1024 --new-tokens 32

flash_quant registers itself under a name of your choice (not containing "flash":
transformers treats such names as FlashAttention) with
flash_quant.integrations.transformers_hf.register(name, config); then
`attn_implementation=name` (from_pretrained / _from_config) or
model.set_attn_implementation(name) selects it.

--kv-cache int8|int4 also generates with a FlashQuantCache (quantized K/V, decode steps
through flash_quant.decode_attention) and prints its tokens/s and bytes against SDPA over
transformers' DynamicCache (the bytes compare with a 16-bit DynamicCache when --dtype is
bf16 or fp16).
"""
from __future__ import annotations

import argparse
import time

import torch


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=4096,  # head dim 32, GQA 8 query / 2 kv heads
    )


def build(args, attn_implementation):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if args.model:
        return AutoModelForCausalLM.from_pretrained(
            args.model, attn_implementation=attn_implementation, torch_dtype=dtype, local_files_only=True
        ).to(args.device).eval()
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM._from_config(tiny_llama_config(), attn_implementation=attn_implementation)
    return model.to(device=args.device, dtype=dtype).eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="local path of a causal LM (default: a tiny random Llama built offline)")
    ap.add_argument("--preset", default="accurate", help="flash_quant preset (accurate, fast, int4, fp8, fp32, ...)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-cache", choices=["int8", "int4"], help="also generate with a FlashQuantCache of this precision")
    args = ap.parse_args(argv)

    from flash_quant.integrations.transformers_hf import register

    name = register(f"fq_{args.preset}", config=args.preset)
    sdpa = build(args, "sdpa")
    fq = build(args, name)
    if not args.model:
        fq.load_state_dict(sdpa.state_dict())
    vocab = sdpa.config.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, vocab, (args.batch, args.seq), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    mask[0, : args.seq // 4] = 0  # left padding in the first sequence
    with torch.no_grad():
        ref = sdpa(ids, attention_mask=mask).logits.float()
        t0 = time.perf_counter()
        out = fq(ids, attention_mask=mask).logits.float()
        dt = time.perf_counter() - t0
        keep = mask.bool()
        cos = torch.nn.functional.cosine_similarity(out[keep].flatten(), ref[keep].flatten(), dim=0).item()
        agree = (out[keep].argmax(-1) == ref[keep].argmax(-1)).float().mean().item()
        gen_ref = sdpa.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False)
        gen = fq.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False)
    same = (gen[:, args.seq:] == gen_ref[:, args.seq:]).float().mean().item()
    print(f"attn_implementation={name!r} (flash_quant preset {args.preset!r}) vs 'sdpa', {args.dtype} on {args.device}")
    print(f"  logits cosine {cos:.6f}; top-1 agreement {agree * 100:.1f} %; forward {dt * 1e3:.1f} ms")
    print(f"  greedy generation of {args.new_tokens} tokens: {same * 100:.1f} % identical to SDPA's")
    if args.kv_cache:
        compare_kv_cache(args, sdpa, fq, ids, mask)
    return cos


def _timed_generate(model, ids, mask, new_tokens, cache):
    """Greedy generation into `cache`: (tokens, seconds). A device sync brackets the timing."""
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, past_key_values=cache)
    sync()
    return out, time.perf_counter() - t0


def compare_kv_cache(args, sdpa, fq, ids, mask):
    """Generation with SDPA over DynamicCache against flash_quant over FlashQuantCache:
    tokens/s (prefill included) and the caches' bytes once the generation is done."""
    from transformers import DynamicCache

    from flash_quant.integrations.transformers_hf import FlashQuantCache

    dynamic = DynamicCache()
    ref, dt_ref = _timed_generate(sdpa, ids, mask, args.new_tokens, dynamic)
    cache = FlashQuantCache(fq.config, precision=args.kv_cache, max_cache_len=ids.shape[1] + args.new_tokens)
    out, dt = _timed_generate(fq, ids, mask, args.new_tokens, cache)
    dynamic_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in dynamic.layers)
    tokens = args.batch * args.new_tokens
    same = (out[:, args.seq:] == ref[:, args.seq:]).float().mean().item()
    print(f"KV cache: {args.batch} x {args.seq} prompt + {args.new_tokens} new tokens, {args.dtype}")
    rows = [("DynamicCache, sdpa", tokens / dt_ref, dynamic_bytes, ""),
            (f"FlashQuantCache {args.kv_cache}, {fq.config._attn_implementation}", tokens / dt, cache.nbytes,
             f" ({cache.nbytes / dynamic_bytes:.3f}x)")]
    for label, rate, nbytes, ratio in rows:
        print(f"  {label:<36} {rate:9.1f} tokens/s {nbytes:>13,} bytes{ratio}")
    print(f"  greedy tokens identical to DynamicCache's: {same * 100:.1f} %")


if __name__ == "__main__":
    main()
