"""Decode accuracy of KV-cache quantization schemes (issue 18 item 2), simulated in fp64.

Workload of the issue's bar: one query token per head (or Sq), GQA 32/8 -> here a
smaller head count, N(0,1) Q/K/V with a per-channel bias on K, D=128, N keys. Every
scheme is a quantize->dequantize of K and V; the error is rel-L2 of the attention output
against the unquantized fp64 attention. Bytes/element count codes plus scales/zeros.

    PYTHONPATH=. python research/decode_kv_schemes.py [--keys 4096] [--trials 4] [--cache]
"""
import argparse
import math

import torch

D = 128


def hadamard(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def qdq_groups(x, bits, group, dim, asym, scale_bytes):
    """Quantize-dequantize x with one scale (and zero when asym) per `group` consecutive
    elements along `dim` (-1 channels, -2 tokens). Returns (x_hat, bytes per element)."""
    x = x.movedim(dim, -1)
    shp = x.shape
    g = x.reshape(*shp[:-1], shp[-1] // group, group)
    if asym:
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        levels = 2 ** bits - 1
        s = ((hi - lo) / levels).clamp_min(1e-12)
        lo, s = lo.half().double(), s.half().double()  # stored as fp16
        q = torch.round((g - lo) / s).clamp(0, levels)
        out = q * s + lo
        meta = 2
    else:
        qmax = 2 ** (bits - 1) - 1
        s = (g.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-12)
        s = s.half().double() if scale_bytes == 2 else s.float().double()
        out = torch.round(g / s).clamp(-qmax, qmax) * s
        meta = 1
    bpe = bits / 8 + meta * scale_bytes / group
    return out.reshape(shp).movedim(-1, dim), bpe


def attention(q, k, v):
    hq, hk = q.shape[1], k.shape[1]
    k = k.repeat_interleave(hq // hk, 1)
    v = v.repeat_interleave(hq // hk, 1)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1)
    return p @ v


def schemes():
    c = lambda k: k - k[:, :, :64].mean(-2, keepdim=True)  # centre from the first append
    H = hadamard(D)
    out = {}
    out["int8 K centred per-token sym, V per-token sym (fp32 scales)"] = (
        lambda k: qdq_groups(c(k), 8, D, -1, False, 4),
        lambda v: qdq_groups(v, 8, D, -1, False, 4))

    def smoothed(k):  # divided by a per-channel max |k - c| of the first append (exact undo)
        kc = c(k)
        s = kc[:, :, :64].abs().amax(-2, keepdim=True)
        kh, b = qdq_groups(kc / s, 8, D, -1, False, 4)
        return kh * s, b
    out["int8 K centred+smoothed per-token sym"] = (smoothed, None)
    for gk in (32, 64, 128):
        out[f"int4 K centred per-token asym g{gk}"] = (
            lambda k, gk=gk: qdq_groups(c(k), 4, gk, -1, True, 2), None)
        out[f"int4 K centred+rotated per-token asym g{gk}"] = (
            lambda k, gk=gk: (lambda r: (r[0] @ H.T, r[1]))(qdq_groups(c(k) @ H, 4, gk, -1, True, 2)),
            None)
    for gt in (16, 32, 64):
        out[f"int4 K per-channel asym {gt} tokens (KIVI)"] = (
            lambda k, gt=gt: qdq_groups(k, 4, gt, -2, True, 2), None)
    for gv in (16, 32, 64, 128):
        out[f"int4 V per-token asym g{gv}"] = (None, lambda v, gv=gv: qdq_groups(v, 4, gv, -1, True, 2))
        out[f"int4 V rotated per-token asym g{gv}"] = (
            None, lambda v, gv=gv: (lambda r: (r[0] @ H.T, r[1]))(qdq_groups(v @ H, 4, gv, -1, True, 2)))
        out[f"int4 V per-token sym g{gv}"] = (None, lambda v, gv=gv: qdq_groups(v, 4, gv, -1, False, 2))
    return out


def cache_rows(q, k, v, ref):
    """The implemented schemes end to end: flash_quant's QuantizedKVCache (a prefill of all
    but the last 40 keys, then single-token appends) and decode_attention."""
    import flash_quant
    b, hk, n, d = k.shape
    configs = [("int8", {})] + [("int4", {"k_group": kg, "v_group": vg})
                                for kg, vg in ((32, 32), (32, 16), (64, 32), (64, 64), (16, 16))]
    rows = {}
    for precision, kw in configs:
        cache = flash_quant.QuantizedKVCache(b, hk, d, n, precision=precision, dtype=torch.float32, **kw)
        cache.append(k[:, :, :n - 40].float(), v[:, :, :n - 40].float())
        for i in range(n - 40, n):
            cache.append(k[:, :, i:i + 1].float(), v[:, :, i:i + 1].float())
        o = flash_quant.decode_attention(q.float(), cache)
        name = f"QuantizedKVCache {precision} " + " ".join(f"{a}={c}" for a, c in kw.items())
        rows[name] = (((o.double() - ref).norm() / ref.norm()).item(),
                      cache.nbytes / (2 * b * hk * n * d), None)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=4096)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--sq", type=int, default=1)
    ap.add_argument("--outlier-channels", action="store_true",
                    help="K channels scaled by exp(N(0,1)) (q rescaled so the logits keep unit std)")
    ap.add_argument("--cache", action="store_true", help="also the implemented cache, end to end "
                    "(its bytes column: K and V together, per element)")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = {}
    for _ in range(args.trials):
        B, HQ, HK, N = 1, 8, 2, args.keys
        q = torch.randn(B, HQ, args.sq, D, dtype=torch.float64)
        k = torch.randn(B, HK, N, D, dtype=torch.float64) + 3 * torch.randn(B, HK, 1, D, dtype=torch.float64)
        if args.outlier_channels:  # channel magnitudes spread like a real model's keys
            k = k * torch.exp(torch.randn(B, HK, 1, D, dtype=torch.float64))
            q = q / (k - k.mean(-2, keepdim=True)).std().item()  # logits back to unit scale
        v = torch.randn(B, HK, N, D, dtype=torch.float64)
        ref = attention(q, k, v)
        for name, (fk, fv) in schemes().items():
            # a rotation is undone after dequantization (q.k and P.V are invariant to it)
            kk, bk = (k, None) if fk is None else fk(k)
            vv, bv = (v, None) if fv is None else fv(v)
            o = attention(q, kk, vv)
            e = ((o - ref).norm() / ref.norm()).item()
            rows.setdefault(name, []).append((e, bk, bv))
        if args.cache:
            for name, r in cache_rows(q, k, v, ref).items():
                rows.setdefault(name, []).append(r)
    print(f"| scheme | rel-L2 % (mean of {args.trials}) | K bytes/elem | V bytes/elem |")
    print("|---|---|---|---|")
    for name, rs in rows.items():
        e = sum(r[0] for r in rs) / len(rs)
        bk = rs[0][1]
        bv = rs[0][2]
        print(f"| {name} | {100 * e:.2f} | {'' if bk is None else f'{bk:.4f}'} | {'' if bv is None else f'{bv:.4f}'} |")


if __name__ == "__main__":
    main()
