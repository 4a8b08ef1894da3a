"""Precision planning: dynamic quantization, adaptive preset choice, mixed-precision
strategies, a hardware registry, an attention cost model (calibrated on the device) and a
recommendation engine.  See docs/planning.md.

Submodules load on first use: `recommend`, `cost_model`, `hardware`, `strategies`,
`models` and `formats` import no torch (so `flash-quant recommend` stays light);
`dynamic`, `adaptive` and `calibrate` need torch.  The recommendation function is
`flash_quant.planning.recommend.recommend` (the name `recommend` here is its module).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    # dynamic quantization
    "DynamicQuantConfig": "dynamic", "DynamicQuantizer": "dynamic", "DynamicQuantResult": "dynamic",
    "ActivationStats": "dynamic", "outlier_ratio": "dynamic", "quantize_nvfp4": "dynamic",
    "quantize_mxfp4": "dynamic", "FP4Tensor": "dynamic",
    # adaptive choice
    "select_attention_preset": "adaptive", "select_attention_preset_static": "adaptive",
    "AdaptiveThresholds": "adaptive",
    # strategies, models, hardware
    "OperatorType": "strategies", "OperatorPrecision": "strategies", "MixedPrecisionStrategy": "strategies",
    "get_strategy": "strategies", "list_strategies": "strategies", "create_layerwise_gradient": "strategies",
    "ModelSpec": "models", "MODEL_PRESETS": "models", "load_model": "models",
    "HardwareSpec": "hardware", "get_hardware": "hardware", "list_hardware": "hardware",
    # cost model, calibration, recommendation
    "AttentionShape": "cost_model", "AttentionPrecision": "cost_model", "AttentionCostModel": "cost_model",
    "run_calibration": "calibrate", "measure_errors": "calibrate",
    "format_recommendation": "recommend", "model_cost": "recommend",
}

#: Submodules reachable as attributes (`flash_quant.planning.hardware`), loaded on first use.
_SUBMODULES = ("adaptive", "calibrate", "cost_model", "dynamic", "formats", "hardware", "models",
               "recommend", "strategies", "user_data")

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _SUBMODULES:  # importing a submodule sets the attribute itself
        return importlib.import_module(f".{name}", __name__)
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'flash_quant.planning' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
