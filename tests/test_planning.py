"""Precision planning (issue 7): dynamic quantization, adaptive preset choice, strategies,
hardware registry, cost model, calibration and recommendations."""
import json
import math
import os
import pathlib

import numpy as np
import pytest
import torch

from flash_quant.planning import adaptive, calibrate, cost_model, dynamic, hardware, models, strategies
from flash_quant.planning import recommend  # the module; its function is recommend.recommend
from flash_quant.planning.cost_model import AttentionCostModel, AttentionPrecision, AttentionShape
from flash_quant.planning.dynamic import DynamicQuantizer, outlier_ratio


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- dynamic quantization
def _flash_quant_kernels():
    try:
        import flash_quant
        flash_quant.quantize(torch.randn(2, 4, 8))
        return flash_quant
    except Exception:  # the CPU kernels are not built in this checkout
        return None


@pytest.mark.parametrize("prec,gran,strat", [
    ("int8", "per_token", "symmetric"), ("int8", "per_channel", "asymmetric"), ("int4", "per_token", "symmetric"),
    ("int4", "per_block", "asymmetric"), ("fp8_e4m3", "per_head", "symmetric"), ("fp8_e5m2", "per_tensor", "symmetric"),
])
def test_absmax_matches_the_quantize_op(prec, gran, strat):
    fq = _flash_quant_kernels()
    if fq is None:
        pytest.skip("flash_quant CPU kernels not built")
    from flash_quant.config import PerBlock, PerChannel, PerHead, PerTensor, PerToken
    G = {"per_tensor": PerTensor(), "per_token": PerToken(), "per_channel": PerChannel(), "per_head": PerHead(),
         "per_block": PerBlock(32)}[gran]
    x = torch.randn(2, 3, 100, 64, generator=_gen(1))
    r = DynamicQuantizer(precision=prec, granularity=G, strategy=strat, fallback=False).quantize(x)
    ref = fq.quantize(x, precision=prec, granularity=G, strategy=strat)
    assert torch.equal(r.data.view(torch.uint8), ref.data.view(torch.uint8))
    assert torch.equal(r.scale, ref.scale) and torch.equal(r.zero_point, ref.zero_point)
    torch.testing.assert_close(r.to_quantized_tensor().dequantize(), ref.dequantize())


def test_int8_per_token_against_the_contract_formula():
    x = torch.randn(3, 50, 32, generator=_gen(2))
    r = DynamicQuantizer(precision="int8", granularity="per_token", fallback=False).quantize(x)
    s = x.abs().amax(-1, keepdim=True) / 127
    assert torch.equal(r.scale, s)
    assert torch.equal(r.data, torch.clamp(torch.round(x / s), -127, 127).to(torch.int8))
    err = (r.dequantize() - x).norm() / x.norm()
    assert err < 0.01


def test_int4_packing_low_nibble_first():
    x = torch.tensor([[[1.0, -7.0, 7.0, 0.0]]])
    r = DynamicQuantizer(precision="int4", granularity="per_tensor", fallback=False).quantize(x)
    # scale 1: values 1, -7 -> byte (1 & 0xF) | ((-7 & 0xF) << 4) = 0x91; 7, 0 -> 0x07
    assert r.data.tolist() == [[[0x91, 0x07]]]
    assert torch.equal(r.dequantize(), x)


@pytest.mark.parametrize("prec,gran,gain", [("int4", "per_tensor", 0.7), ("int8", "per_tensor", 0.99),
                                             ("int4", "per_token", 0.85)])
def test_mse_optimal_beats_absmax_on_heavy_tails(prec, gran, gain):
    torch.manual_seed(11)
    x = torch.distributions.StudentT(4.0).sample((64, 512))     # heavy-tailed (kurtosis infinite)
    errs = {}
    for cal in ("absmax", "mse_optimal"):
        r = DynamicQuantizer(precision=prec, granularity=gran, calibration=cal, fallback=False).quantize(x)
        errs[cal] = float((r.dequantize() - x).norm() / x.norm())
    assert errs["mse_optimal"] < gain * errs["absmax"], errs


def test_percentile_clip_is_the_percentile():
    x = torch.randn(1, 10000, generator=_gen(3)).reshape(1, 10000)
    r = DynamicQuantizer(precision="int8", granularity="per_token", calibration="percentile", percentile=99.0,
                         fallback=False).quantize(x)
    expected = torch.quantile(x.abs(), 0.99, interpolation="higher") / 127
    assert abs(float(r.scale) - float(expected)) / float(expected) < 1e-3
    assert float(r.scale) * 127 < float(x.abs().max())


@pytest.mark.parametrize("shape", [(1, 4, 1024, 128), (2, 8, 16, 64), (4096, 256)])
@pytest.mark.parametrize("gran", ["per_tensor", "per_token", "per_channel"])
@pytest.mark.parametrize("prec", ["int8", "int4", "fp8_e4m3"])
def test_fallback_silent_on_clean_gaussian(shape, gran, prec):
    x = torch.randn(*shape, generator=_gen(4))
    q = DynamicQuantizer(precision=prec, granularity=gran)
    r = q.quantize(x, operator="clean")
    assert not r.fallback and r.metadata["outlier_ratio"] < 1.6
    assert q.counters == {"calls": 1, "fallbacks": 0, "by_operator": {"clean": {"calls": 1, "fallbacks": 0}}}


@pytest.mark.parametrize("gran", ["per_tensor", "per_token", "per_channel"])
def test_fallback_fires_on_planted_outliers(gran):
    x = torch.randn(1, 4, 512, 128, generator=_gen(5))
    idx = torch.randperm(x.numel(), generator=_gen(6))[:20]
    x.view(-1)[idx] = 60.0
    q = DynamicQuantizer(precision="int8", granularity=gran)
    r = q.quantize(x.to(torch.bfloat16), operator="ffn_up")
    assert r.fallback and r.scale is None
    assert r.precision == "bf16" and r.data.dtype == torch.bfloat16
    assert r.metadata["outlier_ratio"] > r.metadata["outlier_threshold"]
    assert q.counters["fallbacks"] == 1 and q.counters["by_operator"]["ffn_up"]["fallbacks"] == 1
    with pytest.raises(ValueError, match="fell back"):
        r.to_quantized_tensor()


def test_channel_outliers_are_harmless_per_channel():
    x = torch.randn(1, 4, 512, 128, generator=_gen(7))
    x[..., 3] *= 30
    assert float(outlier_ratio(x, "per_channel")) < 1.6
    assert float(outlier_ratio(x, "per_token")) > 4.0


def test_ema_blends_ranges_and_resets_on_shape_change():
    q = DynamicQuantizer(precision="int8", granularity="per_token", ema_momentum=0.75, fallback=False)
    a = torch.full((4, 8), 1.0)
    b = torch.full((4, 8), 3.0)
    q.quantize(a, "x")
    r = q.quantize(b, "x")
    assert r.metadata["ema"] == "applied"
    assert torch.allclose(r.scale * 127, torch.full((4, 1), 0.75 * 1.0 + 0.25 * 3.0))
    r = q.quantize(torch.ones(5, 8), "x")
    assert r.metadata["ema"].startswith("reset")


def test_dynamic_config_errors():
    with pytest.raises(ValueError, match="asymmetric"):
        dynamic.DynamicQuantConfig(precision="fp8_e4m3", strategy="asymmetric")
    with pytest.raises(ValueError, match="granularity"):
        dynamic.DynamicQuantConfig(granularity="per_row")
    with pytest.raises(ValueError, match="calibration"):
        dynamic.DynamicQuantConfig(calibration="kl")
    with pytest.raises(ValueError, match="even"):
        DynamicQuantizer(precision="int4").quantize(torch.randn(3, 5))


def test_activation_stats():
    x = torch.randn(1000, 100, generator=_gen(8))
    st = dynamic.ActivationStats.from_tensor(x)
    assert abs(st.std - 1) < 0.02 and abs(st.percentile_999 - 3.29) < 0.15 and st.absmax >= st.percentile_999


# --------------------------------------------------------------------------- FP4
def test_float4_dtype_present_and_e2m1_grid_exact():
    assert dynamic.HAS_FLOAT4_DTYPE
    grid = torch.tensor(dynamic.E2M1_VALUES)
    vals = torch.cat([grid, -grid]).repeat(2)[:32].reshape(1, 32) * 2.0 ** 3
    t = dynamic.quantize_mxfp4(vals)
    assert t.data.dtype == torch.float4_e2m1fn_x2 and t.block_scale.dtype == torch.float8_e8m0fnu
    assert torch.equal(t.dequantize(), vals)


def test_e2m1_ties_round_to_even_code():
    y = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0])
    codes = dynamic._encode_e2m1(y)
    assert dynamic._decode_e2m1(codes).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]


@pytest.mark.parametrize("fn,block,bound", [(dynamic.quantize_nvfp4, 16, 0.12), (dynamic.quantize_mxfp4, 32, 0.14)])
def test_fp4_round_trip_and_layout(fn, block, bound):
    x = torch.randn(4, 8, 256, generator=_gen(9))
    t = fn(x)
    assert tuple(t.data.shape) == (4, 8, 128) and tuple(t.block_scale.shape) == (4, 8, 256 // block)
    err = float((t.dequantize() - x).norm() / x.norm())
    assert 0.02 < err < bound
    assert t.bits_per_element == 4 + 8 / block
    with pytest.raises(ValueError, match=f"multiple of {block}"):
        fn(torch.randn(3, block + 2))


def test_mxfp4_scales_are_powers_of_two_and_nvfp4_scale_max():
    x = torch.randn(2, 64, generator=_gen(10)) * 5
    s = dynamic.quantize_mxfp4(x).block_scale.float()
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    nv = dynamic.quantize_nvfp4(x)
    assert math.isclose(float(nv.block_scale.float().max()), 448.0, rel_tol=0.07)


# --------------------------------------------------------------------------- adaptive choice
def test_adaptive_choices():
    sel = adaptive.select_attention_preset
    q, k, v = (torch.randn(1, 4, 4096, 64, generator=_gen(i)) for i in range(3))
    assert sel(q, k, v)[0] == "fast"
    assert sel(q[:, :, :1024], k[:, :, :1024], v[:, :, :1024])[0] == "accurate"
    assert sel(q[:, :, :64], k[:, :, :64], v[:, :, :64])[0] == "fp32"            # fp32 inputs
    assert sel(q.half()[:, :, :64], k[:, :, :64], v[:, :, :64])[0] == "fp16"
    assert sel(q.bfloat16()[:, :, :64], k[:, :, :64], v[:, :, :64])[0] == "bf16"
    q_out = q.clone()
    q_out[0, 0, 5, 7] = 500.0
    name, reason = sel(q_out, k, v)
    assert name == "fp32" and "outlier" in reason
    v_out = v.clone()
    v_out[0, 1, 100, :] = 300.0
    assert sel(q, k, v_out)[0] == "accurate"
    # decode: quantizing K/V per call does not pay; with a quantized KV cache it does
    assert sel(q[:, :, :1], k, v, phase="decode")[0] == "fp32"
    assert sel(q[:, :, :1], k, v, phase="decode", kv_cache=True)[0] == "fast"
    th = adaptive.AdaptiveThresholds(allow_int4=True)
    assert sel(q, k, v, thresholds=th)[0] == "int4"
    with pytest.raises(ValueError, match="min_seq_kv"):
        adaptive.AdaptiveThresholds(min_seq_kv=0)
    with pytest.raises(ValueError, match="phase"):
        sel(q, k, v, phase="train")


def test_adaptive_k_bias_is_smoothed_away():
    q, k, v = (torch.randn(1, 2, 1024, 64, generator=_gen(i)) for i in range(3))
    k = k + 20 * torch.randn(1, 2, 1, 64, generator=_gen(9))      # channel bias only
    assert adaptive.select_attention_preset(q, k, v)[0] == "accurate"


# --------------------------------------------------------------------------- strategies
@pytest.mark.parametrize("name", strategies.STRATEGY_NAMES)
def test_named_strategies_round_trip(name):
    s = strategies.get_strategy(name)
    back = strategies.MixedPrecisionStrategy.from_json(json.loads(s.dumps()))
    assert back == s
    for op in strategies.OperatorType:
        assert s.precision_for(op) is not None


def test_custom_strategy_with_layer_rules_round_trip():
    s = strategies.MixedPrecisionStrategy.build(
        "custom", "aggressive FFN", strategies.get_strategy("fp8_balanced").to_json()["operators"],
        overrides={"ffn_up": {"weight": "nvfp4", "activation": "fp8"}, "kv_cache": "int4"},
        layer_rules=[{"start": 0, "end": 2, "overrides": {"ffn_up": "fp16"}}])
    assert s.precision_for("ffn_up").weight == "nvfp4" and s.precision_for("ffn_up").activation == "fp8_e4m3"
    assert s.precision_for("ffn_up", layer=1).weight == "fp16"
    assert s.precision_for("ffn_up", layer=2).weight == "nvfp4"
    assert strategies.MixedPrecisionStrategy.from_json(s.dumps()) == s
    lw = strategies.create_layerwise_gradient(12)
    assert lw.precision_for("ffn_down", 0).weight == "fp16"
    assert lw.precision_for("ffn_down", 5).weight == "fp8_e4m3"
    assert lw.precision_for("ffn_down", 9).weight == "int4"
    assert lw.precision_for("ffn_down", 11).weight == "fp8_e4m3"


def test_strategy_errors():
    base = strategies.get_strategy("fp16_baseline").to_json()
    bad = json.loads(json.dumps(base))
    bad["operators"]["softmax"] = {"activation": "int8"}
    with pytest.raises(ValueError, match="softmax computes in"):
        strategies.MixedPrecisionStrategy.from_json(bad)
    bad = json.loads(json.dumps(base))
    bad["operators"]["attention_out"] = "fp16"
    with pytest.raises(ValueError, match="unknown operator"):
        strategies.MixedPrecisionStrategy.from_json(bad)
    bad = json.loads(json.dumps(base))
    del bad["operators"]["kv_cache"]
    with pytest.raises(ValueError, match="kv_cache"):
        strategies.MixedPrecisionStrategy.from_json(bad)
    bad = json.loads(json.dumps(base))
    bad["operators"]["q_proj"] = {"weight": "int3", "activation": "fp16"}
    with pytest.raises(ValueError, match="unknown precision 'int3'"):
        strategies.MixedPrecisionStrategy.from_json(bad)
    with pytest.raises(ValueError, match="unknown strategy"):
        strategies.get_strategy("fp2_extreme")
    assert strategies.attention_preset_for("int8", "int8")[0] == "fast"
    assert strategies.attention_preset_for("nvfp4", "fp16")[0] is None


# --------------------------------------------------------------------------- hardware
def test_hardware_registry():
    h100 = hardware.get_hardware("H100")
    assert h100.key == "h100_sxm" and h100.peak("fp16") == pytest.approx(989.4)
    assert h100.peak("int4") == h100.peak("int8")            # no INT4 tensor cores on Hopper
    assert h100.compute_precision("nvfp4") == "fp8_e4m3"
    m = h100.measured["memory_bandwidth_tbs"]
    assert m.source == "measured" and m.date == "2026-11-23" and m.value == 3.0
    assert hardware.get_hardware("b200").has_native("nvfp4")
    assert hardware.get_hardware("a100").compute_precision("fp8_e4m3") == "fp16"
    for key in ("h100_sxm", "h200", "b200", "gb10", "a100", "m1_max", "m2_max", "m3_max", "m4_max"):
        spec = hardware.get_hardware(key)
        figs = [spec.memory_bandwidth_tbs, spec.exp_tops, spec.memory_gb, *spec.peak_tflops.values()]
        assert all(f.source in ("datasheet", "measured", "derived", "estimate") and f.ref for f in figs)
    assert hardware.hardware_for_device_name("NVIDIA H100 80GB HBM3").key == "h100_sxm"
    assert hardware.hardware_for_device_name("NVIDIA H100 PCIe") is None
    with pytest.raises(ValueError, match="unknown hardware 'tpu-v5'.*h100_sxm"):
        hardware.get_hardware("tpu-v5")


# --------------------------------------------------------------------------- cost model
def test_shape_counts():
    s = AttentionShape(2, 8, 100, 64, causal=True)
    assert s.visible_pairs == 100 * 101 // 2 and s.flops == 4 * 2 * 8 * 5050 * 64
    assert AttentionShape(1, 1, 10, 64, seq_kv=4, causal=True).visible_pairs == 4 * 5 // 2 + 6 * 4
    with pytest.raises(ValueError, match="multiple"):
        AttentionShape(1, 6, 8, 64, heads_kv=4)


def test_cost_model_bytes_bottlenecks_and_families():
    h100 = hardware.get_hardware("h100_sxm")
    m = AttentionCostModel(h100, calibration=None)
    fp16 = AttentionPrecision("fp16")
    dec = AttentionShape.decode(1, 32, 8, 32768, 128)
    mha = AttentionShape.decode(1, 32, 32, 32768, 128)
    t_gqa, t_mha = cost_model.attention_terms(dec, fp16, h100), cost_model.attention_terms(mha, fp16, h100)
    kv = 2 * 8 * 32768 * 128 * 2
    assert t_gqa.kernel_bytes == pytest.approx(kv + 32 * 128 * 2 * 2 + 32 * 4)
    assert t_mha.kernel_bytes > 3.9 * t_gqa.kernel_bytes
    assert m.predict(dec, fp16, "fa2").bottleneck == "memory bandwidth"
    # INT8 KV cache (pre-quantized) halves the K/V bytes, scales included
    int8kv = AttentionPrecision.uniform("fast", "int8", "int8", "int8", kv_prequantized=True)
    t8 = cost_model.attention_terms(dec, int8kv, h100)
    assert t8.kernel_bytes < 0.52 * t_gqa.kernel_bytes and t8.prep_bytes < 1e5
    pre = AttentionShape(4, 32, 4096, 128)
    times = {f: m.predict(pre, fp16, f).time_s for f in ("fa1", "fa2", "fa3", "fa4")}
    assert times["fa1"] > times["fa2"] > times["fa3"] >= times["fa4"]
    assert m.predict(pre, fp16, "fa2").bottleneck in ("tensor-core matmul", "exp/softmax units")
    fp8 = AttentionPrecision.uniform("fp8", "fp8_e4m3", "fp8_e4m3", "fp8_e4m3")
    assert m.predict(pre, fp8, "fa3").time_s < times["fa3"]
    with pytest.raises(ValueError, match="fa2 computes in fp16/bf16"):
        m.predict(pre, int8kv, "fa2")
    # the exp unit caps 8-bit attention harder at head dim 64 than at 128
    t64 = cost_model.attention_terms(AttentionShape(8, 32, 2048, 64), int8kv, h100)
    t128 = cost_model.attention_terms(AttentionShape(4, 32, 2048, 128), int8kv, h100)
    assert t64.t_exp / t64.t_mma > 1.9 * t128.t_exp / t128.t_mma


def test_preset_precisions_follow_the_config():
    acc = AttentionPrecision.from_config("accurate")
    assert (acc.q, acc.k, acc.v, acc.qk, acc.pv) == ("int8", "int8", "fp16", "int8", "fp16")
    assert acc.smooth_k and acc.rotate
    fast = AttentionPrecision.from_config("fast")
    assert fast.v == "int8" and fast.pv == "int8" and fast.v_granularity == "per_channel"
    assert AttentionPrecision.from_config("fp32").qk == "fp32"


# --------------------------------------------------------------------------- calibration
def test_fit_recovers_known_coefficients_and_reports_loo():
    hw = hardware.get_hardware("h100_sxm")
    prec = AttentionPrecision.from_config("accurate")
    true = {"launch": 8.0, "serial": 0.5, "serial_decode": 2.0, "mma": 1.9, "sfu": 1.3, "mem": 1.15, "prep": 1.4}
    rows = []
    rng = np.random.default_rng(0)
    for s in calibrate.BENCH_SHAPES:
        t = sum(true[f] * x for f, x in zip(cost_model.FEATURES, cost_model.attention_terms(s, prec, hw).features()))
        rows.append({"shape": s.to_json(), "family": "flash_quant", "preset": "accurate",
                     "seconds": t * (1 + 0.02 * rng.standard_normal())})
    cal = calibrate.fit(rows, hw)
    f = cal["fits"]["flash_quant/accurate"]
    assert f["n"] == len(calibrate.BENCH_SHAPES) and cal["model_version"] == cost_model.MODEL_VERSION
    assert f["max_abs_fit_err"] < 0.06 and f["max_abs_loo_err"] < 0.25
    md = calibrate.markdown_report(dict(cal, device_name="synthetic", hardware="h100_sxm"))
    assert "| flash_quant/accurate | 1x24x4608x128 |" in md and "LOO" in md
    m = AttentionCostModel(hw, calibration=cal)
    p = m.predict(calibrate.BENCH_SHAPES[0], prec)
    assert p.calibrated and p.time_s == pytest.approx(rows[0]["seconds"], rel=0.08)


def test_kernel_schedule_waves_and_serial_steps():
    hw = hardware.get_hardware("h100_sxm")
    fp16 = AttentionPrecision.from_config("fp16")
    # decode: the 4 query heads of a GQA group are packed into one program (8 kv heads ->
    # 8 programs < 132 SMs), and the keys split into ranges (split-KV) so that about two
    # programs run per SM; each walks its range
    dec = cost_model.kernel_schedule(AttentionShape.decode(1, 32, 8, 32768, 128), fp16, hw)
    split_len = -(-(-(-32768 // -(-2 * 132 // 8))) // dec.block_n) * dec.block_n  # ~2 per SM, whole tiles
    assert dec.splits == 32768 // split_len and dec.programs == 8 * dec.splits and dec.decode_regime
    mha = cost_model.kernel_schedule(AttentionShape.decode(1, 32, 32, 32768, 128), fp16, hw)
    assert mha.programs == 32 * mha.splits  # no GQA group: one program per query head
    assert dec.steps == dec.waves * split_len / dec.block_n < 32768 / dec.block_n / 4
    pre = cost_model.kernel_schedule(AttentionShape(4, 32, 4096, 128), fp16, hw)
    slots = hw.sm_count * pre.occupancy
    assert pre.programs == 4 * 32 * 4096 // pre.block_m and pre.waves == -(-pre.programs // slots)
    assert pre.steps == pre.waves * 4096 / pre.block_n and not pre.decode_regime
    causal = cost_model.kernel_schedule(AttentionShape(4, 32, 4096, 128, causal=True), fp16, hw)
    assert 0.45 * pre.steps < causal.steps < 0.55 * pre.steps   # causal halves the walk
    f = cost_model.attention_terms(AttentionShape.decode(1, 32, 8, 32768, 128), fp16, hw).features()
    names = dict(zip(cost_model.FEATURES, f))
    assert names["serial"] == 0 and names["serial_decode"] == pytest.approx(dec.steps * 1e-6)


def test_refit_from_stored_measurements(tmp_path):
    """Synthetic measurements generated by the model itself: the offline refit recovers
    them, rewrites coefficients and report, and leaves measurements and provenance alone."""
    hw = hardware.get_hardware("h100_sxm")
    true = {"fp16": {"launch": 60.0, "serial": 0.4, "serial_decode": 2.0, "mma": 1.6, "sfu": 1.1, "mem": 1.0,
                     "prep": 1.1},
            "accurate": {"launch": 150.0, "serial": 0.3, "serial_decode": 2.5, "mma": 1.3, "sfu": 0.9, "mem": 1.1,
                         "prep": 1.2}}
    ms = []
    for preset, coef in true.items():
        prec = AttentionPrecision.from_config(preset)
        for s in calibrate.BENCH_SHAPES:
            t = sum(coef[f] * x for f, x in zip(cost_model.FEATURES, cost_model.attention_terms(s, prec, hw).features()))
            ms.append({"shape": s.to_json(), "family": "flash_quant", "preset": preset, "seconds": t})
    old = {"fits": {"flash_quant/fp16": {"coef": {"launch": 1, "mma": 1, "sfu": 1, "mem": 1, "prep": 1}}},
           "hardware": "h100_sxm", "device_name": "synthetic GPU", "date": "2026-01-02", "torch": "9.9",
           "triton": "8.8", "command": "flash-quant calibrate --device cuda", "reps": 30, "warmup": 10,
           "measurements": ms, "failed": []}
    path = tmp_path / "calibration_h100_sxm.json"
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="--refit"):
        cost_model.load_calibration("h100_sxm", str(path))
    from flash_quant import cli
    assert cli.main(["calibrate", "--refit", str(path), "--results-dir", str(tmp_path)]) == 0
    new = cost_model.load_calibration("h100_sxm", str(path))
    assert new["measurements"] == ms
    for k in ("device_name", "date", "torch", "triton", "command", "reps", "warmup"):
        assert new[k] == old[k]
    assert new["model_version"] == cost_model.MODEL_VERSION and new["refit"]["previous_model_version"] == 1
    for key in ("flash_quant/fp16", "flash_quant/accurate"):
        assert new["fits"][key]["max_abs_fit_err"] < 0.02
    md = (tmp_path / "calibration_2026-01-02_h100_sxm.md").read_text()
    assert "Fit redone offline" in md and "flash-quant calibrate --device cuda" in md and "LOO err" in md


def test_calibration_report_defaults_beside_its_json(tmp_path, monkeypatch):
    """Without --results-dir the markdown report goes beside the calibration JSON, not
    into a benchmarks/results folder of whatever directory the command runs in."""
    hw = hardware.get_hardware("h100_sxm")
    prec = AttentionPrecision.from_config("fp16")
    ms = [{"shape": s.to_json(), "family": "flash_quant", "preset": "fp16",
           "seconds": 1e-6 * sum(cost_model.attention_terms(s, prec, hw).features())}
          for s in calibrate.BENCH_SHAPES]
    data = tmp_path / "data"
    data.mkdir()
    path = data / "calibration_h100_sxm.json"
    path.write_text(json.dumps({"hardware": "h100_sxm", "date": "2026-01-03", "measurements": ms,
                                "fits": {}, "failed": []}))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    from flash_quant import cli
    assert cli.main(["calibrate", "--refit", str(path)]) == 0
    assert (data / "calibration_2026-01-03_h100_sxm.md").is_file()
    assert not any(cwd.iterdir())


def test_stored_h100_calibration_loads_and_fits():
    cal = cost_model.load_calibration("h100_sxm")
    assert cal is not None and cal["model_version"] == cost_model.MODEL_VERSION
    for key in ("flash_quant/accurate", "flash_quant/fast", "flash_quant/fp16"):
        assert cal["fits"][key]["max_abs_fit_err"] <= 0.25


def test_calibrate_cpu_quick_end_to_end(tmp_path):
    fq = _flash_quant_kernels()
    if fq is None:
        pytest.skip("flash_quant CPU kernels not built")
    cal = calibrate.run_calibration("cpu", quick=True, presets=("accurate", "fp16"), warmup=1, reps=3,
                                    data_dir=str(tmp_path), results_dir=str(tmp_path), out_dir=None, log=lambda *_: None)
    assert set(cal["fits"]) == {"flash_quant/accurate", "flash_quant/fp16"}
    assert len(cal["rows"]) == 2 * len(calibrate.QUICK_SHAPES)
    stored = cost_model.load_calibration("cpu", str(tmp_path / "calibration_cpu.json"))
    assert stored["hardware"] == "cpu" and stored["measurements"][0]["seconds"] > 0
    assert list(tmp_path.glob("calibration_*_cpu.md"))


# --------------------------------------------------------------------------- models and recommendations
def test_model_presets_and_json_errors(tmp_path):
    assert models.MODEL_PRESETS["llama-3-8b"].params() + 128256 * 4096 == pytest.approx(8.03e9, rel=0.01)
    assert models.MODEL_PRESETS["llama-3-70b"].params() + 128256 * 8192 == pytest.approx(70.55e9, rel=0.01)
    assert models.MODEL_PRESETS["flux-dev"].params() == pytest.approx(11.8e9, rel=0.02)
    with pytest.raises(ValueError, match=r"missing \['layers'"):
        models.load_model('{"hidden": 4096}')
    with pytest.raises(ValueError, match="malformed"):
        models.load_model('{"hidden": 4096,')
    p = tmp_path / "m.json"
    p.write_text('{"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 3, "head_dim": 16, "ffn_dim": 128}')
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        models.load_model(str(p))
    p.write_text('{"hidden": "big", "layers": 2, "heads": 4, "kv_heads": 4, "head_dim": 16, "ffn_dim": 128}')
    with pytest.raises(ValueError, match="hidden must be an integer"):
        models.load_model(str(p))
    p.write_text("not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        models.load_model(str(p))
    with pytest.raises(ValueError, match="not a preset"):
        models.load_model("gpt-5")


def test_recommend_decode_and_prefill():
    rec = recommend.recommend("llama-3-8b", "decode", 4096, "h100", quality="aggressive")
    assert rec.speedup > 1.2 and rec.strategy.name != "fp16_baseline"
    assert rec.baseline.kv_cache_bytes == 2 * 32 * 8 * 128 * 4096 * 2
    assert rec.baseline.weight_bytes == pytest.approx(8.03e9 * 2, rel=0.01)
    assert rec.cost.weight_bytes < 0.6 * rec.baseline.weight_bytes
    strict = recommend.recommend("llama-3-8b", "decode", 4096, "h100", quality="strict")
    assert strict.strategy.name == "fp16_baseline" and strict.speedup == pytest.approx(1.0)
    text = recommend.format_recommendation(rec)
    for needle in ("Per-operator precision", "speed-up", "KV cache", "Expected quality loss", "Reason"):
        assert needle in text
    json.dumps(rec.to_json())
    flux = recommend.recommend("flux-dev", "prefill", 4096, "b200", quality="aggressive")
    assert flux.cost.kv_cache_bytes == 0 and flux.speedup > 1.0
    with pytest.raises(ValueError, match="no decode phase"):
        recommend.recommend("flux-dev", "decode", 4096, "h100")


def test_cli(capsys, tmp_path):
    from flash_quant import cli
    assert cli.main(["recommend", "--model", "llama-3-8b", "--phase", "decode", "--seq-len", "2048",
                     "--hardware", "h100"]) == 0
    assert "Recommendation for Llama-3-8B" in capsys.readouterr().out
    assert cli.main(["recommend", "--model", "llama-3-8b", "--seq-len", "2048", "--hardware", "tpu-v9"]) == 2
    assert "unknown hardware 'tpu-v9'" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"hidden": 4096, "layers": 32}')
    assert cli.main(["recommend", "--model", str(bad), "--seq-len", "8", "--hardware", "h100"]) == 2
    assert "missing ['heads', 'kv_heads', 'head_dim', 'ffn_dim']" in capsys.readouterr().err
    assert cli.main(["recommend", "--model", "llama-3-8b", "--seq-len", "8", "--hardware", "h100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hardware"] == "h100_sxm"
    assert cli.main(["hardware", "h100"]) == 0
    assert "measured, 2026-11-23" in capsys.readouterr().out


# --------------------------------------------------------------------------- user data (not the package)
def _tree_digest(directory):
    import hashlib
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(pathlib.Path(directory).iterdir())}


def test_measure_errors_writes_user_data_not_the_package(tmp_path, monkeypatch):
    """measure-errors used to rewrite the tracked planning/data/measured_errors.json."""
    from flash_quant.planning import user_data
    monkeypatch.setenv("FLASH_QUANT_DATA_DIR", str(tmp_path / "user"))
    shipped = _tree_digest(user_data.SHIPPED_DIR)
    exact = lambda q, k, v, config: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
    calibrate.measure_errors(("accurate",), seq_len=32, heads=1, head_dim=16, attention_fn=exact,
                             log=lambda *_: None)
    assert _tree_digest(user_data.SHIPPED_DIR) == shipped
    mine = tmp_path / "user" / "measured_errors.json"
    assert mine.exists()
    # read back before the shipped copy (the user's own measurement wins)
    assert recommend.load_measured_errors()["source"]["seq_len"] == 32


def test_calibrate_default_goes_to_user_data_and_is_read_back(tmp_path, monkeypatch):
    from flash_quant.planning import user_data
    monkeypatch.setenv("FLASH_QUANT_DATA_DIR", str(tmp_path / "user"))
    shipped = _tree_digest(user_data.SHIPPED_DIR)
    assert cost_model.load_calibration("cpu") is None
    sdpa = lambda q, k, v, is_causal, enable_gqa, config: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q, k, v, is_causal=is_causal, enable_gqa=enable_gqa)
    calibrate.run_calibration("cpu", quick=True, presets=("fp16",), warmup=0, reps=1, attention_fn=sdpa,
                              results_dir=str(tmp_path / "results"), out_dir=None, log=lambda *_: None)
    assert _tree_digest(user_data.SHIPPED_DIR) == shipped
    assert (tmp_path / "user" / "calibration_cpu.json").exists()
    assert cost_model.load_calibration("cpu")["hardware"] == "cpu"
    # the shipped calibration of another chip is still found
    assert cost_model.load_calibration("h100_sxm") is not None


def test_user_data_dir_follows_xdg(monkeypatch, tmp_path):
    from flash_quant.planning import user_data
    monkeypatch.delenv("FLASH_QUANT_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    if os.name != "nt":
        assert user_data.user_data_dir() == str(tmp_path / "flash_quant")


def test_recommend_lists_only_strategies_the_chip_can_run():
    """nvfp4_blackwell quantizes activations to NVFP4: a candidate on Blackwell only."""
    h100 = recommend.recommend("llama-3-8b", "prefill", 4096, "h100")
    assert "nvfp4_blackwell" not in {c["strategy"] for c in h100.candidates}
    b200 = recommend.recommend("llama-3-8b", "prefill", 4096, "b200")
    assert "nvfp4_blackwell" in {c["strategy"] for c in b200.candidates}
    with pytest.raises(ValueError, match="no matrix units for"):
        recommend.recommend("llama-3-8b", "prefill", 4096, "h100", strategies=["nvfp4_blackwell"])


def test_outlier_ratio_per_block_uses_the_block_size():
    """outlier_ratio groups per_block rows by the block_size it is given (it used to take
    64 whatever it was told for a string granularity), as the quantizer's scales do."""
    x = torch.randn(2, 96, 16, generator=_gen(12), dtype=torch.float64)
    x[0, 40, 3] = 25.0    # one spike, in rows 32..63
    block = 32
    a = x.abs().reshape(2, 96 // block, block * 16)
    sigma = a.mean(-1) / math.sqrt(2.0 / math.pi)
    expected = float((a.amax(-1) / (sigma * math.sqrt(2.0 * math.log(x.numel())))).max())
    got = float(outlier_ratio(x, "per_block", block))
    assert abs(got - expected) <= 1e-5 * expected
    assert abs(float(outlier_ratio(x, "per_block", 64)) - expected) > 1e-3 * expected


def test_planning_reuses_the_core_statistic_and_choice():
    import flash_quant.auto
    import flash_quant.ops
    import flash_quant.outliers

    assert dynamic.outlier_ratio is flash_quant.outliers.outlier_ratio
    assert adaptive.select_attention_preset is flash_quant.auto.select_attention_preset
    assert dynamic.QMAX is flash_quant.ops.QMAX
