"""`flash-quant calibrate`: time flash_quant's attention on the present device, fit the
cost model's coefficients, and report predicted vs measured per shape.

Timing: on CUDA the call is captured in a CUDA graph and each replay timed with CUDA
events — the GPU's time: host overhead (Python, launches) depends on the host CPU, not on
the GPU modelled, and made the decode measurements noisy; a call that cannot be captured
is timed eagerly, and each row says which (`timing`). CPU: perf_counter. `warmup` calls
first, the median of `reps`.  Fit, per (kernel family, preset): the additive model of
`cost_model` (launch, serial key-block steps of the forward's critical path — prefill and
decode regimes —, mma, sfu, mem, prep terms computed at peak rates) by least squares
on *relative* errors, non-negative, with a ridge pulling each coefficient towards the
uncalibrated prior (weight `ridge`) so that shapes that cannot separate two terms leave
them at the physical prior.  Reported: each shape's fit error and its leave-one-out
error (the shape predicted by a fit on the other shapes: the honest number).

`refit(path)` (`flash-quant calibrate --refit data/calibration_<hw>.json`) redoes the fit
offline, without a GPU, from the measurements stored in that file with the current model
version: it rewrites the coefficients and the markdown report and keeps the measured
numbers and their provenance untouched.

Also `measure_errors()` (`flash-quant measure-errors`): the attention error of each
preset against float64 on the two input families at S=1024, written to
data/measured_errors.json for the recommendation's quality estimate.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .cost_model import (FEATURES, MODEL_VERSION, AttentionCostModel, AttentionPrecision, AttentionShape, attention_terms,
                         prior_coefficients)
from .hardware import HardwareSpec, get_hardware, hardware_for_device_name
from .recommend import MEASURED_ERRORS
from .user_data import user_data_path

__all__ = ["BENCH_SHAPES", "QUICK_SHAPES", "DEFAULT_PRESETS", "measure", "fit", "fit_group",
           "run_calibration", "markdown_report", "measure_errors", "refit"]

S = AttentionShape
#: flash_quant's benchmark shapes (prefill) plus decode shapes (Llama-3-8B heads) at six
#: (batch, context) points: the decode regime has its own fixed cost and per-step latency,
#: which two points could not separate out of sample (first calibration: LOO up to 67 %).
BENCH_SHAPES = (
    S(1, 24, 4608, 128), S(4, 32, 4096, 128), S(4, 32, 4096, 128, causal=True), S(8, 32, 2048, 64),
    S(1, 32, 16384, 128), S(2, 32, 4096, 128, heads_kv=8),
    S.decode(1, 32, 8, 32768, 128), S.decode(8, 32, 8, 8192, 128),
    S.decode(1, 32, 8, 4096, 128), S.decode(1, 32, 8, 16384, 128), S.decode(8, 32, 8, 2048, 128),
    S.decode(4, 32, 8, 32768, 128),
)
#: Tiny shapes for `--device cpu --quick` (CI exercises the code path, not the numbers).
QUICK_SHAPES = (
    S(1, 2, 128, 64), S(1, 2, 256, 64), S(1, 2, 256, 64, causal=True), S(2, 2, 128, 32),
    S(1, 4, 192, 64, heads_kv=2), S.decode(1, 4, 2, 1024, 64), S.decode(2, 4, 2, 512, 64),
)
DEFAULT_PRESETS = ("accurate", "fast", "int4", "fp16")
RIDGE = 0.05
#: Features the ridge does not pull towards a prior (see _nnls_ridge).
UNPENALIZED = ("launch", "serial", "serial_decode")


def _graph(fn: Callable[[], object]):
    """fn captured in a CUDA graph, or None when it cannot be captured."""
    import torch
    from ..testing import capture_cuda_graph
    try:
        return capture_cuda_graph(fn)
    except Exception:  # e.g. a host sync inside fn: time it eagerly instead
        torch.cuda.synchronize()
        return None


def _time(fn: Callable[[], object], device: str, warmup: int, reps: int) -> Tuple[float, str]:
    """Median seconds of one call and how it was timed. On CUDA the call is replayed from
    a CUDA graph: the GPU's time, without the host's Python and launch overhead (which
    depends on the host CPU, not on the GPU being modelled, and at decode sizes would
    otherwise be most of, and the noise in, every measurement). "eager" otherwise."""
    import torch
    for _ in range(warmup):
        fn()
    times = []
    mode = "eager"
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        graph = _graph(fn)
        if graph is not None:
            fn, mode = graph.replay, "cuda_graph"
            for _ in range(warmup):
                fn()
        torch.cuda.synchronize()
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e-3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), mode


def measure(device: str, shapes: Sequence[AttentionShape], presets: Sequence[str], *, warmup: int = 5,
            reps: int = 20, dtype=None, attention_fn: Optional[Callable] = None, sdpa_baseline: bool = False,
            log=print) -> List[dict]:
    """Median time of each (shape, preset).  attention_fn(q, k, v, is_causal, enable_gqa,
    config) defaults to flash_quant.attention.  sdpa_baseline adds family "fa2" (SDPA's
    flash backend, fp16) on CUDA."""
    import torch
    if attention_fn is None:
        import flash_quant
        attention_fn = lambda q, k, v, is_causal, enable_gqa, config: flash_quant.attention(  # noqa: E731
            q, k, v, is_causal=is_causal, enable_gqa=enable_gqa, config=config)
    if dtype is None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    rows = []
    for shape in shapes:
        g = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(shape.batch, shape.heads_q, shape.seq_q, shape.head_dim, generator=g).to(device, dtype)
        k = torch.randn(shape.batch, shape.heads_kv, shape.seq_kv, shape.head_dim, generator=g).to(device, dtype)
        v = torch.randn(shape.batch, shape.heads_kv, shape.seq_kv, shape.head_dim, generator=g).to(device, dtype)
        gqa = shape.heads_q != shape.heads_kv
        runs = [("flash_quant", p) for p in presets]
        if sdpa_baseline and device.startswith("cuda"):
            runs.append(("fa2", "fp16"))
        for family, preset in runs:
            if family == "fa2":
                from torch.nn.attention import SDPBackend, sdpa_kernel
                import torch.nn.functional as F

                def fn():
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return F.scaled_dot_product_attention(q.half(), k.half(), v.half(),  # noqa: F821 (del below)
                                                              is_causal=shape.causal, enable_gqa=gqa)
            else:
                def fn(preset=preset):
                    return attention_fn(q, k, v, shape.causal, gqa, preset)  # noqa: F821 (used before the del)
            try:
                t, mode = _time(fn, device, warmup, reps)
            except Exception as e:  # a shape a backend refuses is reported, not hidden
                log(f"  {shape.label():<32} {family}/{preset}: FAILED ({type(e).__name__}: {e})")
                rows.append({"shape": shape.to_json(), "family": family, "preset": preset, "error": str(e)})
                continue
            log(f"  {shape.label():<32} {family}/{preset:<9} {t * 1e6:11.1f} us  "
                f"{shape.flops / t / 1e12:8.2f} TFLOPS  ({mode})")
            rows.append({"shape": shape.to_json(), "family": family, "preset": preset, "seconds": t,
                         "timing": mode})
        del q, k, v
    return rows


def _precision(preset: str, family: str) -> AttentionPrecision:
    if family == "fa2":
        return AttentionPrecision("fp16")
    return AttentionPrecision.from_config(preset, input_precision="fp16")


def _nnls(A: np.ndarray, b: np.ndarray, max_iter: int = 200) -> np.ndarray:
    """min ||A x - b||, x >= 0 (Lawson-Hanson active set)."""
    n = A.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    w = A.T @ (b - A @ x)
    tol = 1e-12 * max(1.0, float(np.abs(A).max()))
    for _ in range(max_iter):
        if passive.all() or (w[~passive] <= tol).all():
            break
        j = int(np.argmax(np.where(passive, -np.inf, w)))
        passive[j] = True
        for _ in range(max_iter):
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(A[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / np.maximum(x[neg] - z[neg], 1e-300))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
        w = A.T @ (b - A @ x)
    return x


def _nnls_ridge(X: np.ndarray, y: np.ndarray, prior: np.ndarray, ridge: float) -> np.ndarray:
    """min sum(((X c - y) / y)^2) + ridge * sum over rate terms of ((c - prior) / prior)^2,
    c >= 0.  The fixed-cost and latency terms (launch, serial, serial_decode) have no
    trustworthy prior (host overhead and per-step latency are what the fit measures), so
    they are not pulled; a rate term that no shape exercises keeps its prior."""
    A = X / y[:, None]
    b = np.ones_like(y)
    w = np.array([0.0 if f in UNPENALIZED else 1.0 for f in FEATURES])
    R = np.sqrt(ridge) * np.diag(w / prior)
    prior = prior * w
    A_full, b_full = np.vstack([A, R]), np.concatenate([b, np.sqrt(ridge) * w])
    return _nnls(A_full, b_full)


def fit_group(shapes: Sequence[AttentionShape], seconds: Sequence[float], prec: AttentionPrecision,
              hw: HardwareSpec, ridge: float = RIDGE) -> Dict[str, float]:
    X = np.array([attention_terms(s, prec, hw).features() for s in shapes], dtype=np.float64)
    y = np.array(seconds, dtype=np.float64)
    if (y <= 0).any():
        raise ValueError("measured times must be > 0")
    pri = prior_coefficients(hw, prec)
    prior = np.array([pri[f] for f in FEATURES])
    c = _nnls_ridge(X, y, prior, ridge)
    return {f: float(v) for f, v in zip(FEATURES, c)}


def _predict(coef: Dict[str, float], shape, prec, hw) -> float:
    return float(sum(coef[f] * x for f, x in zip(FEATURES, attention_terms(shape, prec, hw).features())))


def fit(measurements: Sequence[dict], hardware, ridge: float = RIDGE) -> dict:
    """Coefficients per 'family/preset' plus per-row fit and leave-one-out predictions."""
    hw = get_hardware(hardware)
    groups: Dict[str, List[dict]] = {}
    for m in measurements:
        if "seconds" in m:
            groups.setdefault(f"{m['family']}/{m['preset']}", []).append(m)
    fits, rows = {}, []
    uncal = AttentionCostModel(hw, calibration=None)
    for key, ms in groups.items():
        family, preset = key.split("/", 1)
        shapes = [AttentionShape.from_json(m["shape"]) for m in ms]
        secs = [m["seconds"] for m in ms]
        prec = _precision(preset, family)
        coef = fit_group(shapes, secs, prec, hw, ridge)
        fit_err, loo_err = [], []
        for i, (s, t) in enumerate(zip(shapes, secs)):
            p_fit = _predict(coef, s, prec, hw)
            if len(shapes) > 1:
                others = [j for j in range(len(shapes)) if j != i]
                c_loo = fit_group([shapes[j] for j in others], [secs[j] for j in others], prec, hw, ridge)
                p_loo = _predict(c_loo, s, prec, hw)
            else:
                p_loo = float("nan")
            p_unc = uncal.predict(s, prec, family).time_s
            fit_err.append(p_fit / t - 1)
            loo_err.append(p_loo / t - 1)
            rows.append({"key": key, "shape": s.label(), "measured_us": t * 1e6, "tflops": s.flops / t / 1e12,
                         "fit_us": p_fit * 1e6, "fit_err": p_fit / t - 1, "loo_us": p_loo * 1e6,
                         "loo_err": p_loo / t - 1, "uncalibrated_us": p_unc * 1e6, "uncalibrated_err": p_unc / t - 1})
        fits[key] = {"coef": coef, "n": len(shapes),
                     "max_abs_fit_err": max(abs(e) for e in fit_err),
                     "max_abs_loo_err": max((abs(e) for e in loo_err if e == e), default=float("nan"))}
    return {"fits": fits, "rows": rows, "ridge": ridge, "features": list(FEATURES), "model_version": MODEL_VERSION}


def markdown_report(cal: dict) -> str:
    lines = [f"# Cost-model calibration — {cal.get('device_name', '?')} ({cal.get('hardware', '?')})", "",
             f"Measured {cal.get('date', '?')} with `{cal.get('command', '?')}` "
             f"(torch {cal.get('torch', '?')}, triton {cal.get('triton', '-')}; timing: "
             f"{', '.join(sorted({m.get('timing', 'eager') for m in cal.get('measurements', [])}))}; median of {cal.get('reps', '?')} "
             f"after {cal.get('warmup', '?')} warm-up calls; inputs {cal.get('dtype', '?')}).", "",
             *_refit_lines(cal),
             f"Model version {cal.get('model_version', 1)}: t = Σ coefficient × feature, features "
             f"{', '.join(cal.get('features', FEATURES))} (docs/planning.md §5); fitted per preset by "
             f"non-negative least squares on relative errors, ridge {cal.get('ridge', RIDGE)} towards the prior.", "",
             "Errors are predicted / measured - 1. *fit*: the model fitted on all shapes of its preset; "
             "*LOO*: fitted without that shape (held out); *uncal.*: registry efficiencies only.", "",
             "| preset | shape | measured µs | TFLOPS | fit µs | fit err | LOO µs | LOO err | uncal. µs | uncal. err |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in cal["rows"]:
        lines.append(f"| {r['key']} | {r['shape']} | {r['measured_us']:.1f} | {r['tflops']:.1f} | {r['fit_us']:.1f} | "
                     f"{100 * r['fit_err']:+.1f} % | {r['loo_us']:.1f} | {100 * r['loo_err']:+.1f} % | "
                     f"{r['uncalibrated_us']:.1f} | {100 * r['uncalibrated_err']:+.1f} % |")
    lines += ["", "| fit | shapes | max |fit err| | max |LOO err| | within ±25 % (fit / LOO) | coefficients |",
              "|---|---:|---:|---:|---|---|"]
    for key, f in cal["fits"].items():
        ok = lambda e: "yes" if e == e and e <= 0.25 else "no"  # noqa: E731
        coef = ", ".join(f"{k} {v:.3g}" for k, v in f["coef"].items())
        lines.append(f"| {key} | {f['n']} | {100 * f['max_abs_fit_err']:.1f} % | {100 * f['max_abs_loo_err']:.1f} % | "
                     f"{ok(f['max_abs_fit_err'])} / {ok(f['max_abs_loo_err'])} | {coef} |")
    notes = cal.get("notes", [])
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    failed = cal.get("failed", [])
    if failed:
        lines += ["", "Failed runs (not in the fit):", ""] + [f"- {f['family']}/{f['preset']} "
                                                             f"{AttentionShape.from_json(f['shape']).label()}: {f['error']}"
                                                             for f in failed]
    return "\n".join(lines) + "\n"


def _refit_lines(cal: dict) -> List[str]:
    r = cal.get("refit")
    if not r:
        return []
    return [f"**Fit redone offline on {r['date']}** with `{r['command']}` (cost-model version "
            f"{r['model_version']}, previously {r.get('previous_model_version', '?')}): the measured times "
            f"above are those of the original run, unchanged; only the model, its coefficients and the "
            f"predicted columns are new. No GPU was used for the refit.", ""]


def refit(path: str, *, results_dir: Optional[str] = None,
          ridge: float = RIDGE, command: str = "", notes: Optional[Sequence[str]] = None, log=print) -> dict:
    """Re-fit a stored calibration from its measurements (no GPU): rewrite its
    coefficients, rows and model version in `path` and its markdown report in
    results_dir/calibration_<measurement date>_<hardware>.md (default: beside `path`; ""
    writes none).  The measurements and their provenance (device, date, torch/triton,
    command, reps) are kept as they are."""
    with open(path) as f:
        cal = json.load(f)
    ms = cal.get("measurements")
    if not ms or not any("seconds" in m for m in ms):
        raise ValueError(f"{path}: no stored measurements to re-fit")
    hw = get_hardware(cal["hardware"])
    before = json.dumps(ms, sort_keys=True)
    new = fit(ms, hw, ridge)
    assert json.dumps(ms, sort_keys=True) == before, "refit must not alter measurements"
    previous = cal["refit"].get("previous_model_version", 1) if "refit" in cal else cal.get("model_version", 1)
    cal.update(new)
    cal["refit"] = {"date": datetime.date.today().isoformat(), "model_version": MODEL_VERSION,
                    "previous_model_version": previous,
                    "command": command or f"flash-quant calibrate --refit {path}"}
    if notes is not None:
        cal["notes"] = list(notes)
    with open(path, "w") as f:
        json.dump(cal, f, indent=1)
    log(f"wrote {path}")
    if results_dir is None:
        results_dir = os.path.dirname(os.path.abspath(path))
    if results_dir:
        os.makedirs(results_dir, exist_ok=True)
        md = os.path.join(results_dir, f"calibration_{cal.get('date', 'undated')}_{_slug(hw.key)}.md")
        with open(md, "w") as f:
            f.write(markdown_report(cal))
        log(f"wrote {md}")
    for key, fi in cal["fits"].items():
        log(f"  {key:<22} max |fit err| {100 * fi['max_abs_fit_err']:5.1f} %   "
            f"max |LOO err| {100 * fi['max_abs_loo_err']:5.1f} %")
    return cal


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s.lower()).strip("_")


def run_calibration(device: str = "cuda", *, hardware: Optional[str] = None, quick: bool = False,
                    presets: Sequence[str] = DEFAULT_PRESETS, warmup: Optional[int] = None,
                    reps: Optional[int] = None, data_dir: Optional[str] = None,
                    results_dir: Optional[str] = None, out_dir: Optional[str] = None,
                    sdpa_baseline: bool = False, attention_fn: Optional[Callable] = None, command: str = "",
                    log=print) -> dict:
    """Measure, fit, write data_dir/calibration_<hardware>.json (default: the user data
    directory, see user_data.py; + a copy in out_dir or $OUT) and
    results_dir/calibration_<date>.md (default: beside the JSON).  Returns the
    calibration dict."""
    import torch
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch.cuda.is_available() is False; use --device cpu --quick "
                               "to exercise the code path on a CPU")
        device_name = torch.cuda.get_device_name()
        hw = get_hardware(hardware) if hardware else hardware_for_device_name(device_name)
        if hw is None:
            raise ValueError(f"device {device_name!r} is not in the hardware registry; pass --hardware <name>")
    elif device == "cpu":
        device_name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"
        hw = get_hardware(hardware or "cpu")
    else:
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    shapes = QUICK_SHAPES if quick else BENCH_SHAPES
    warmup = warmup if warmup is not None else (2 if quick else 10)
    reps = reps if reps is not None else (5 if quick else 30)
    log(f"calibrating on {device_name} as {hw.key}: {len(shapes)} shapes x {list(presets)}")
    ms = measure(device, shapes, presets, warmup=warmup, reps=reps, attention_fn=attention_fn,
                 sdpa_baseline=sdpa_baseline, log=log)
    cal = fit(ms, hw)
    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    cal.update(device_name=device_name, hardware=hw.key, date=datetime.date.today().isoformat(),
               torch=torch.__version__, triton=triton_v, warmup=warmup, reps=reps,
               dtype="float16" if device.startswith("cuda") else "float32", quick=quick,
               command=command or f"flash-quant calibrate --device {device}{' --quick' if quick else ''}",
               measurements=ms, failed=[m for m in ms if "error" in m])
    name = f"calibration_{hw.key}.json"
    if data_dir:
        os.makedirs(data_dir, exist_ok=True)
        path = os.path.join(data_dir, name)
    else:
        path = user_data_path(name)
    with open(path, "w") as f:
        json.dump(cal, f, indent=1)
    log(f"wrote {path}")
    out_dir = out_dir or os.environ.get("OUT")
    if out_dir and os.path.isdir(out_dir):
        shutil.copy(path, os.path.join(out_dir, os.path.basename(path)))
    results_dir = results_dir or os.path.dirname(os.path.abspath(path))
    os.makedirs(results_dir, exist_ok=True)
    md = os.path.join(results_dir, f"calibration_{cal['date']}_{_slug(hw.key)}.md")
    with open(md, "w") as f:
        f.write(markdown_report(cal))
    log(f"wrote {md}")
    if out_dir and os.path.isdir(out_dir):
        shutil.copy(md, os.path.join(out_dir, os.path.basename(md)))
    for key, fi in cal["fits"].items():
        log(f"  {key:<22} max |fit err| {100 * fi['max_abs_fit_err']:5.1f} %   "
            f"max |LOO err| {100 * fi['max_abs_loo_err']:5.1f} %")
    return cal


def measure_errors(presets: Sequence[str] = ("accurate", "fast", "int4", "fp8", "fp16", "bf16"), *,
                   seq_len: int = 1024, heads: int = 4, head_dim: int = 128, device: str = "cpu",
                   seed: int = 0, path: Optional[str] = None, attention_fn: Optional[Callable] = None,
                   command: str = "flash-quant measure-errors", log=print) -> dict:
    """Relative L2 error and cosine of each preset's output against the float64
    reference on the two input families of flash_quant.testing at S = seq_len.  Written to
    `path` (default: measured_errors.json in the user data directory, see user_data.py)."""
    import torch
    from ..testing import error_stats, make_qkv, reference_attention
    if attention_fn is None:
        import flash_quant
        attention_fn = lambda q, k, v, config: flash_quant.attention(q, k, v, config=config)  # noqa: E731
    out = {"source": {"kind": "measured", "date": datetime.date.today().isoformat(), "device": device,
                      "seq_len": seq_len, "shape": f"1x{heads}x{seq_len}x{head_dim}", "seed": seed,
                      "command": command, "torch": torch.__version__,
                      "reference": "flash_quant.testing.reference_attention (float64)"},
           "presets": {}}
    for family in ("normal", "realistic"):
        q, k, v = make_qkv(1, heads, seq_len, head_dim, family=family, seed=seed, device=device)
        ref = reference_attention(q, k, v)
        for p in presets:
            stats = error_stats(attention_fn(q, k, v, p), ref)
            out["presets"].setdefault(p, {})[family] = {"rel_l2": stats["rel_l2"], "cosine": stats["cosine"]}
            log(f"  {p:<9} {family:<9} rel-L2 {stats['rel_l2']:.3e}  cos {stats['cosine']:.6f}")
    path = path or user_data_path(MEASURED_ERRORS)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    log(f"wrote {path}")
    return out
