"""Recommendation engine: per-operator precisions for a model, phase, sequence length and
chip, with predicted speed-up, memory, expected quality loss and the reason.

Time of one forward = sum over linear maps (roofline: max(compute, memory) + weight
dequantization + launch) + attention (`cost_model.AttentionCostModel`, calibrated when a
calibration file exists for the chip) + norms and KV-cache writes (memory-bound).
Quality: attention errors are read from ``data/measured_errors.json`` (our own
measurements, with their source); weight quantization has no measurement here and is
given as a heuristic risk class, labelled as such.  No torch import.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from .cost_model import LAUNCH_S, AttentionCostModel, AttentionPrecision, AttentionShape
from .formats import format_info, storage_bits
from .hardware import HardwareSpec, get_hardware
from .models import ModelSpec, load_model
from .user_data import find_data_file
from .strategies import (LINEAR_OPERATORS, MixedPrecisionStrategy, OperatorPrecision, OperatorType,
                         get_strategy, list_strategies)

__all__ = ["Recommendation", "ModelCost", "model_cost", "recommend", "format_recommendation",
           "load_measured_errors", "QUALITY_LEVELS", "WEIGHT_RISK"]

#: Heuristic risk of quantizing weights/activations to a precision (no measurement in this
#: repository backs it; it orders the choices and is printed as "heuristic").
WEIGHT_RISK = {"fp32": 0, "bf16": 0, "fp16": 0, "fp8_e4m3": 1, "int8": 1, "fp8_e5m2": 2,
               "nvfp4": 2, "mxfp4": 3, "int4": 3}
_RISK_WORDS = {0: "none", 1: "low", 2: "medium", 3: "high"}
#: quality level -> (max weight/activation risk, max measured attention rel-L2 (the worse
#: of the two input families), or None for no limit)
QUALITY_LEVELS = {"strict": (0, 0.0), "balanced": (1, 0.03), "aggressive": (3, None)}
_DEQUANT_OPS = 2            # ALU ops to dequantize one narrow weight element
_M_TILE = 128               # rows per GEMM tile (how often a weight tile is dequantized)


#: File of the measured attention errors (the user's copy if any, else the shipped one).
MEASURED_ERRORS = "measured_errors.json"


def load_measured_errors(path: Optional[str] = None) -> Optional[dict]:
    path = path or find_data_file(MEASURED_ERRORS)
    if path is None or not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


@dataclass
class ModelCost:
    time_s: float
    per_operator_s: Dict[str, float]
    weight_bytes: float
    kv_cache_bytes: float
    flops: float
    bytes_moved: float
    attention_preset: Optional[str]
    attention_note: str
    attention_bottleneck: str
    attention_calibrated: bool


def _weight_bits(p: OperatorPrecision, in_features: int, group: int) -> float:
    w = p.weight
    if format_info(w).kind == "int" and format_info(w).bits < 8:
        return storage_bits(w, group, 16)            # fp16 scale per group
    if format_info(w).bits < 16 and format_info(w).kind != "float4-block":
        return storage_bits(w) + 32.0 / in_features  # one fp32 scale per output channel
    return storage_bits(w)


def _linear_time(hw: HardwareSpec, rows: int, k: int, n: int, p: OperatorPrecision, group: int):
    cp = hw.compute_precision(p.compute)
    flops = 2.0 * rows * k * n
    act_b = storage_bits(p.activation) / 8
    w_bytes = k * n * _weight_bits(p, k, group) / 8
    bytes_ = w_bytes + rows * k * act_b + rows * n * 2.0
    if format_info(p.activation).bits < 16:
        bytes_ += rows * k * (2.0 + act_b)           # quantization pass of the activation
    eff_mma, _ = hw.efficiency_factor("mma", cp)
    t_mma = flops / (hw.peak(cp) * 1e12 * eff_mma)
    t_mem = bytes_ / hw.bandwidth()
    t_deq = 0.0
    if p.weight != cp and format_info(p.weight).bits < 16:   # dequantized in the kernel
        eff_simt, _ = hw.efficiency_factor("simt")
        ops = k * n * math.ceil(rows / _M_TILE) * _DEQUANT_OPS
        t_deq = ops / (hw.simt_fp32_tflops.value * 1e12 / 2 * eff_simt)
    # Dequantization runs on the ALUs beside the matrix units and overlaps the loads.
    return max(t_mma + t_deq, t_mem) + LAUNCH_S, flops, bytes_, w_bytes


def model_cost(model: ModelSpec, strategy: MixedPrecisionStrategy, phase: str, seq_len: int,
               hardware, batch: int = 1, attention_model: Optional[AttentionCostModel] = None) -> ModelCost:
    """Predicted time of one forward (prefill of `seq_len` tokens per sequence, or one
    decode step against `seq_len` cached tokens) and the memory of weights and KV cache."""
    hw = get_hardware(hardware)
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be 'prefill' or 'decode', got {phase!r}")
    if phase == "decode" and not model.has_kv_cache:
        raise ValueError(f"{model.name} has no decode phase (no KV cache): use --phase prefill "
                         "(one denoising step over all tokens)")
    if not isinstance(seq_len, int) or seq_len < 1 or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"seq_len and batch must be positive integers, got {seq_len!r}, {batch!r}")
    am = attention_model or AttentionCostModel(hw)
    rows = batch * seq_len if phase == "prefill" else batch
    per_op: Dict[str, float] = {}
    flops = bytes_ = w_total = 0.0
    group = strategy.weight_group_size
    # Linear maps, layer by layer (layer rules may change precisions).
    cache = {}
    for spec in model.linears(rows, phase, batch):
        if model.arch == "decoder" and spec.op is OperatorType.EMBEDDINGS:
            layer_ids = [None]                               # the LM head is outside the layers
        else:
            layer_ids = range(spec.first_layer, spec.first_layer + spec.layers)
        for layer in layer_ids:
            p = strategy.precision_for(spec.op, layer)
            key = (spec.rows, spec.in_features, spec.out_features, p)
            if key not in cache:
                cache[key] = _linear_time(hw, spec.rows, spec.in_features, spec.out_features, p, group)
            t, f, b, wb = cache[key]
            per_op[spec.op.value] = per_op.get(spec.op.value, 0.0) + t
            flops, bytes_, w_total = flops + f, bytes_ + b, w_total + wb
    if model.vocab:     # token-embedding table (untied from the LM head in Llama 3)
        w_total += model.vocab * model.hidden * storage_bits(strategy.precision_for(OperatorType.EMBEDDINGS).weight) / 8
        t = rows * model.hidden * 2.0 / hw.bandwidth() + LAUNCH_S
        per_op["embeddings"] = per_op.get("embeddings", 0.0) + t
    # Attention.
    sq, skv, calls, causal = model.attention_calls(seq_len, phase, batch)
    t_att = 0.0
    kv_bytes = 0.0
    preset_seen, note_seen, bneck, calibrated = None, "", "", False
    for layer in range(calls):
        qk = strategy.precision_for(OperatorType.QK_MATMUL, layer).activation
        pv = strategy.precision_for(OperatorType.PV_MATMUL, layer).activation
        kv = strategy.precision_for(OperatorType.KV_CACHE, layer).activation
        preset, note = strategy.attention_preset(layer)
        prec = AttentionPrecision.uniform(preset or f"planner:{qk}/{pv}", qk, pv, kv,
                                          kv_prequantized=(phase == "decode"))
        shape = AttentionShape(batch, model.heads, sq, model.head_dim, model.kv_heads, skv, causal)
        cost = am.predict(shape, prec, "flash_quant")
        t_att += cost.time_s
        flops += cost.terms.flops
        bytes_ += cost.terms.kernel_bytes + cost.terms.prep_bytes
        if layer == calls - 1:
            preset_seen, note_seen, bneck, calibrated = preset, note, cost.bottleneck, cost.calibrated
        if model.has_kv_cache:
            kv_row = 2 * model.kv_heads * model.head_dim * storage_bits(kv) / 8
            if format_info(kv).bits < 16:
                kv_row += 2 * model.kv_heads * 4              # fp32 scale per token and head
            kv_bytes += kv_row * skv * batch
            if phase == "prefill":                           # writing the cache
                t_w = kv_row * seq_len * batch / hw.bandwidth()
                per_op["kv_cache"] = per_op.get("kv_cache", 0.0) + t_w
                bytes_ += kv_row * seq_len * batch
    per_op["attention"] = t_att
    # Norms: two per layer, read + write of the 16-bit activations.
    n_norms = 2 * model.layers + 1
    norm_rows = rows + (model.text_tokens * batch if model.arch == "mmdit" else 0)
    t_norm = n_norms * (norm_rows * model.hidden * 4.0 / hw.bandwidth() + LAUNCH_S)
    per_op["norm"] = t_norm
    bytes_ += n_norms * norm_rows * model.hidden * 4.0
    return ModelCost(sum(per_op.values()), per_op, w_total, kv_bytes, flops, bytes_, preset_seen,
                     note_seen, bneck, calibrated)


def _strategy_risk(s: MixedPrecisionStrategy, layers: int) -> int:
    risk = 0
    for op in LINEAR_OPERATORS:
        for layer in ([None] + list(range(layers))):
            p = s.precision_for(op, layer)
            risk = max(risk, WEIGHT_RISK[p.weight], WEIGHT_RISK[p.activation])
    return risk


def _attention_error(errors: Optional[dict], preset: Optional[str]):
    """(the worse rel_l2 of the two input families, or None; human text)."""
    if preset is None:
        return None, "not measured (planner-only attention configuration)"
    if preset in ("fp16", "bf16", "fp32"):
        base = ""
        if errors and preset in errors.get("presets", {}):
            e = errors["presets"][preset]
            base = f"; measured rel-L2 {e['realistic']['rel_l2']:.2e} (realistic)"
        return 0.0, f"none beyond {preset} rounding{base}"
    if not errors or preset not in errors.get("presets", {}):
        return None, f"attention preset {preset!r}: not measured yet (run `flash-quant measure-errors`)"
    e = errors["presets"][preset]
    src = errors.get("source", {})
    return max(e["normal"]["rel_l2"], e["realistic"]["rel_l2"]), (
        f"attention output rel-L2 {100 * e['normal']['rel_l2']:.2f} % (N(0,1) inputs), "
        f"{100 * e['realistic']['rel_l2']:.2f} % (outlier-channel inputs) vs fp64 — measured "
        f"({src.get('date', '?')}, {src.get('device', '?')}, S={src.get('seq_len', '?')}, "
        f"`{src.get('command', '?')}`)")


@dataclass
class Recommendation:
    model: ModelSpec
    hardware: HardwareSpec
    phase: str
    seq_len: int
    batch: int
    quality: str
    strategy: MixedPrecisionStrategy
    cost: ModelCost
    baseline: ModelCost
    speedup: float
    risk: int
    attention_error: Optional[float]
    quality_text: str
    reason: str
    candidates: List[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        ops = {op.value: self.strategy.precision_for(op).to_json() for op in OperatorType}
        return {
            "model": self.model.to_json(), "hardware": self.hardware.key, "phase": self.phase,
            "seq_len": self.seq_len, "batch": self.batch, "quality": self.quality,
            "strategy": self.strategy.to_json(), "operators": ops,
            "attention_preset": self.cost.attention_preset,
            "predicted_time_us": self.cost.time_s * 1e6, "baseline_time_us": self.baseline.time_s * 1e6,
            "predicted_speedup": self.speedup,
            "weight_bytes": self.cost.weight_bytes, "kv_cache_bytes": self.cost.kv_cache_bytes,
            "baseline_weight_bytes": self.baseline.weight_bytes,
            "baseline_kv_cache_bytes": self.baseline.kv_cache_bytes,
            "weight_risk": _RISK_WORDS[self.risk], "attention_error_rel_l2": self.attention_error,
            "quality_note": self.quality_text, "reason": self.reason, "candidates": self.candidates,
            "sources": "times: roofline model (see docs/planning.md); attention calibrated: "
                       f"{self.cost.attention_calibrated}",
        }


#: Format kinds whose activations only pay on native matrix units (block-scaled FP4 MMA):
#: quantizing activations to them on another chip costs work and accuracy for no speed,
#: so a strategy doing it is not a candidate there.
NATIVE_ONLY_ACTIVATION_KINDS = ("float4-block",)


def missing_native_units(strategy: MixedPrecisionStrategy, hw: HardwareSpec, layers: int) -> List[str]:
    """Activation precisions of `strategy` that need matrix units `hw` does not have."""
    acts = {strategy.precision_for(op, layer).activation
            for op in OperatorType for layer in [None] + list(range(layers))}
    return sorted(p for p in acts if p and format_info(p).kind in NATIVE_ONLY_ACTIVATION_KINDS
                  and not hw.has_native(p))


def recommend(model, phase: str, seq_len: int, hardware, batch: int = 1, quality: str = "balanced",
              strategies: Optional[Sequence] = None, errors: Optional[dict] = "auto") -> Recommendation:
    """Pick the fastest strategy allowed by `quality` (strict / balanced / aggressive)
    whose weights and KV cache fit in the chip's memory (if any does)."""
    model = load_model(model)
    hw = get_hardware(hardware)
    if quality not in QUALITY_LEVELS:
        raise ValueError(f"quality must be one of {tuple(QUALITY_LEVELS)}, got {quality!r}")
    if errors == "auto":
        errors = load_measured_errors()
    if strategies is None:  # the named strategies this chip can run
        strategies = [get_strategy(n, num_layers=model.layers) for n in list_strategies()]
        strategies = [s for s in strategies if not missing_native_units(s, hw, model.layers)]
    else:
        strategies = [s if isinstance(s, MixedPrecisionStrategy) else get_strategy(s, model.layers)
                      for s in strategies]
        for s in strategies:
            missing = missing_native_units(s, hw, model.layers)
            if missing:
                raise ValueError(f"strategy {s.name!r} quantizes activations to {', '.join(missing)}, which "
                                 f"{hw.display_name} has no matrix units for (it cannot run this strategy)")
    am = AttentionCostModel(hw)
    base = model_cost(model, get_strategy("fp16_baseline"), phase, seq_len, hw, batch, am)
    max_risk, max_err = QUALITY_LEVELS[quality]
    mem_cap = hw.memory_gb.value * 1e9
    rows = []
    for s in strategies:
        c = model_cost(model, s, phase, seq_len, hw, batch, am)
        risk = _strategy_risk(s, model.layers)
        err, _ = _attention_error(errors, c.attention_preset)
        allowed = risk <= max_risk and (max_err is None or (err is not None and err <= max_err)
                                        or (max_err > 0 and err is None and c.attention_preset in ("fp8", "accurate", "fast")))
        fits = c.weight_bytes + c.kv_cache_bytes <= mem_cap
        rows.append({"strategy": s, "cost": c, "risk": risk, "err": err, "allowed": allowed, "fits": fits})
    pool = [r for r in rows if r["allowed"]] or [r for r in rows if r["strategy"].name == "fp16_baseline"]
    if any(r["fits"] for r in pool):
        pool = [r for r in pool if r["fits"]]
    best = min(pool, key=lambda r: (r["cost"].time_s, r["risk"]))
    s, c = best["strategy"], best["cost"]
    err, qtext = _attention_error(errors, c.attention_preset)
    qtext = (f"weights/activations: {_RISK_WORDS[best['risk']]} risk (heuristic, not measured by flash_quant); "
             f"attention: {qtext}")
    reason = _reason(model, hw, phase, seq_len, batch, quality, best, base, rows)
    cands = [{"strategy": r["strategy"].name, "predicted_time_us": r["cost"].time_s * 1e6,
              "speedup": base.time_s / r["cost"].time_s, "allowed": r["allowed"], "fits_memory": r["fits"],
              "weight_risk": _RISK_WORDS[r["risk"]], "attention_preset": r["cost"].attention_preset}
             for r in rows]
    return Recommendation(model, hw, phase, seq_len, batch, quality, s, c, base, base.time_s / c.time_s,
                          best["risk"], err, qtext, reason, cands)


def _reason(model, hw, phase, seq_len, batch, quality, best, base, rows) -> str:
    c = base
    ai = c.flops / max(c.bytes_moved, 1.0)
    ridge = hw.peak("fp16") * 1e12 / (hw.memory_bandwidth_tbs.value * 1e12)
    bound = "memory-bound" if ai < ridge else "compute-bound"
    top = sorted(c.per_operator_s.items(), key=lambda kv: -kv[1])[:2]
    share = ", ".join(f"{k} {100 * v / c.time_s:.0f} %" for k, v in top)
    parts = [f"{phase} of {model.name} at {seq_len} tokens (batch {batch}) on {hw.display_name}: the fp16 "
             f"step is {bound} (arithmetic intensity {ai:.0f} FLOP/B vs the chip's fp16 ridge {ridge:.0f} FLOP/B); "
             f"largest shares: {share}."]
    if bound == "memory-bound":
        parts.append("Fewer bytes per weight and per cached token is what buys time here.")
    else:
        parts.append("Faster matrix units (8-bit / 4-bit tensor cores) are what buy time here.")
    s = best["strategy"]
    parts.append(f"'{s.name}' is the fastest strategy allowed by quality '{quality}' "
                 f"({base.time_s / best['cost'].time_s:.2f}x predicted over fp16).")
    faster = [r for r in rows if r["cost"].time_s < best["cost"].time_s * 0.98 and not r["allowed"]]
    if faster:
        parts.append("Faster but excluded by the quality level: " + ", ".join(
            f"{r['strategy'].name} ({base.time_s / r['cost'].time_s:.2f}x)" for r in faster) + ".")
    if not best["fits"]:
        parts.append(f"Warning: no allowed strategy fits in {hw.memory_gb.value:g} GB.")
    used = {p for op in OperatorType for layer in [None] + list(range(model.layers))
            for p in (s.precision_for(op, layer).activation, s.precision_for(op, layer).weight) if p}
    nat = sorted(p for p in used if not hw.has_native(p))
    if nat:
        parts.append(f"{hw.display_name} has no matrix-unit rate for {', '.join(nat)}: modelled as storage-only "
                     f"(dequantized to {', '.join(sorted({hw.compute_precision(p) for p in nat}))}).")
    return " ".join(parts)


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB"


def format_recommendation(rec: Recommendation) -> str:
    s, c, b = rec.strategy, rec.cost, rec.baseline
    lines = [f"Recommendation for {rec.model.name}, {rec.phase}, seq_len {rec.seq_len}, batch {rec.batch}, "
             f"on {rec.hardware.display_name} (quality: {rec.quality})",
             f"Strategy: {s.name} — {s.description}", "", "Per-operator precision:"]
    for op in OperatorType:
        p = s.precision_for(op)
        lines.append(f"  {op.value:<11} {p.label()}")
    if s.layer_rules:
        for r in s.layer_rules:
            lines.append(f"  layers {r.start}-{r.end - 1}: " + ", ".join(f"{o.value}={p.label()}" for o, p in r.overrides[:3])
                         + (" ..." if len(r.overrides) > 3 else ""))
    lines += ["", f"Attention: flash_quant preset {c.attention_preset or '(none: planner-only)'}; "
                  f"{c.attention_note}; bottleneck {c.attention_bottleneck}; "
                  f"{'calibrated' if c.attention_calibrated else 'uncalibrated'} model",
              f"Predicted time: {c.time_s * 1e3:.3f} ms vs fp16 {b.time_s * 1e3:.3f} ms -> speed-up {rec.speedup:.2f}x "
              f"(roofline model; {'attention calibrated' if c.attention_calibrated else 'not calibrated on this chip'})",
              f"Memory: weights {_gb(c.weight_bytes)} (fp16 {_gb(b.weight_bytes)}), "
              + (f"KV cache {_gb(c.kv_cache_bytes)} (fp16 {_gb(b.kv_cache_bytes)})" if rec.model.has_kv_cache
                 else "no KV cache"),
              f"Expected quality loss: {rec.quality_text}", f"Reason: {rec.reason}", "", "Candidates:"]
    for cand in sorted(rec.candidates, key=lambda x: x["predicted_time_us"]):
        flag = "" if cand["allowed"] else " (excluded by quality)"
        if not cand["fits_memory"]:
            flag += " (does not fit memory)"
        lines.append(f"  {cand['strategy']:<20} {cand['predicted_time_us'] / 1e3:9.3f} ms  {cand['speedup']:.2f}x  "
                     f"risk {cand['weight_risk']:<6} attention {cand['attention_preset']}{flag}")
    return "\n".join(lines)
