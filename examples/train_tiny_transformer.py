"""Train a small decoder-only transformer on a synthetic sorting task, with attention from
PyTorch's SDPA or from flash_quant, and compare the loss curves.

Task: a sequence `x_1 .. x_n SEP sort(x)_1 .. sort(x)_n` of tokens in [1, V); the model is
trained with next-token cross-entropy on the sorted half only (the first half is random
and carries no learnable signal). Same seed, same initial weights, same batches for every
attention backend, so the curves differ only by the attention numerics.

    python examples/train_tiny_transformer.py --device cpu --steps 300
    python examples/train_tiny_transformer.py --device cuda --preset large --attention sdpa flash_quant

Prints the loss every `--log-every` steps and, with --json, writes the curves.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TrainConfig:
    vocab: int = 16  # token 0 is the separator
    n: int = 8  # tokens to sort
    d_model: int = 64
    heads: int = 2  # head dim = d_model / heads (flash_quant needs 32..256)
    layers: int = 2
    batch: int = 32
    steps: int = 200
    lr: float = 3e-3
    warmup: int = 30
    seed: int = 0
    dtype: str = "float32"  # parameter / activation dtype: float32 | bfloat16 | float16


PRESETS = {
    # CPU CI: well under a minute for two runs on 2 cores.
    "tiny": TrainConfig(),
    # GPU: head dim 128, long enough sequences for several attention blocks.
    "large": TrainConfig(vocab=64, n=255, d_model=512, heads=4, layers=4, batch=32, steps=600,
                         lr=1e-3, warmup=60, dtype="bfloat16"),
}


def make_batch(cfg: TrainConfig, g: torch.Generator, device) -> torch.Tensor:
    x = torch.randint(1, cfg.vocab, (cfg.batch, cfg.n), generator=g)
    sep = torch.zeros(cfg.batch, 1, dtype=torch.long)
    seq = torch.cat([x, sep, x.sort(dim=1).values], dim=1)
    return seq.to(device)


class Block(nn.Module):
    def __init__(self, cfg: TrainConfig, attn_fn: Callable):
        super().__init__()
        self.cfg, self.attn_fn = cfg, attn_fn
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(),
                                 nn.Linear(4 * cfg.d_model, cfg.d_model))

    def forward(self, x):
        b, s, _ = x.shape
        h = self.cfg.heads
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, h, -1).permute(2, 0, 3, 1, 4)
        a = self.attn_fn(q, k, v)  # (B, H, S, D), causal
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, -1))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, cfg: TrainConfig, attn_fn: Callable):
        super().__init__()
        seq = 2 * cfg.n + 1
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(seq, cfg.d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg, attn_fn) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def attention_fn(name: str) -> Callable:
    """name: "sdpa" or "flash_quant[:preset]" (default preset "accurate")."""
    if name == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if name.startswith("flash_quant"):
        import flash_quant

        preset = name.split(":", 1)[1] if ":" in name else "accurate"
        return lambda q, k, v: flash_quant.attention(q, k, v, is_causal=True, config=preset)
    raise ValueError(f"unknown attention {name!r}")


def train(cfg: TrainConfig, attention: str, device="cpu", log_every=0) -> Dict[str, List[float]]:
    """Train from seed cfg.seed; returns {"loss": [...], "seconds": t}."""
    dtype = getattr(torch, cfg.dtype)
    torch.manual_seed(cfg.seed)
    model = TinyLM(cfg, attention_fn(attention)).to(device=device, dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    g = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        seq = make_batch(cfg, g, device)
        logits = model(seq[:, :-1])
        tgt = seq[:, 1:]
        # loss on the sorted half: positions n .. 2n-1 of the input predict sort(x)
        loss = F.cross_entropy(logits[:, cfg.n:].float().reshape(-1, cfg.vocab), tgt[:, cfg.n:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == cfg.steps - 1):
            print(f"[{attention}] step {step:5d} loss {losses[-1]:.4f}", flush=True)
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
    return {"loss": losses, "seconds": time.perf_counter() - t0}


def final_loss(losses: List[float], frac: float = 0.1) -> float:
    """Mean loss over the last `frac` of the steps (smooths the step-to-step noise)."""
    k = max(1, int(len(losses) * frac))
    return sum(losses[-k:]) / k


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--attention", nargs="+", default=["sdpa", "flash_quant"])
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cfg = PRESETS[args.preset]
    if args.steps:
        cfg.steps = args.steps
    results = {}
    for name in args.attention:
        results[name] = train(cfg, name, args.device, args.log_every)
        print(f"{name}: final loss {final_loss(results[name]['loss']):.4f} "
              f"({results[name]['seconds']:.1f} s)")
    if "sdpa" in results:
        base = final_loss(results["sdpa"]["loss"])
        for name, r in results.items():
            if name != "sdpa":
                rel = abs(final_loss(r["loss"]) - base) / base
                print(f"{name} vs sdpa: final loss relative difference {100 * rel:.2f} %")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": asdict(cfg), "device": args.device, "results": results}, f)


if __name__ == "__main__":
    main()
