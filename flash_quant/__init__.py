"""flash_quant: quantized flash attention for PyTorch.

Layers, bottom up:
  torch.ops.flash_quant.*   schemas in csrc/schema.cpp; kernels per device (csrc/cpu,
                            flash_quant/cuda, csrc/mps + metal)
  flash_quant.ops           typed wrappers, fake kernels, autograd (importing it loads
                            the ops and registers the kernels of every device present)
  flash_quant.quantize / QuantizedTensor / flash_quant.attention / attention_prologue
                            the functional API
  flash_quant.nn            modules (MultiheadAttention)
  flash_quant.integrations  SDPA routing, diffusers, transformers
  flash_quant.planning      dynamic quantization, cost model, recommendations

The public names and subpackages (flash_quant.nn, flash_quant.integrations, ...) load on
first use, so `flash-quant recommend` (pure Python) starts without importing torch. (No
submodule shares a public name: importing a submodule sets the package attribute of its
name, which would shadow a lazily loaded function.) Importing the package does register
QuantizedTensor for torch.load(weights_only=True), without importing torch
(see _serialization.py).
"""
import importlib

from ._serialization import register_safe_globals

__version__ = "0.1.0"

register_safe_globals()

_EXPORTS = {
    "attention": "functional",
    "attention_with_lse": "functional",
    "which_kernel": "functional",
    "attention_prologue": "prologue",
    "quantize": "quantization",
    "QuantizedTensor": "quantized_tensor",
    "quantize_attention": "nn.swap",
    "AttentionConfig": "config",
    "OperandConfig": "config",
    "Precision": "config",
    "PVPrecision": "config",
    "Strategy": "config",
    "Granularity": "config",
    "PerTensor": "config",
    "PerHead": "config",
    "PerToken": "config",
    "PerBlock": "config",
    "PerChannel": "config",
    "PRESETS": "config",
    "STRATEGY_VERSION": "config",
    "get_preset": "config",
    "decode_attention": "decode",
    "QuantizedKVCache": "kv_cache",
}

#: Subpackages reachable as attributes after a plain `import flash_quant`.
_SUBMODULES = ("nn", "integrations", "planning", "ops")

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _SUBMODULES:  # importing a submodule sets the attribute itself
        return importlib.import_module("." + name, __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flash_quant' has no attribute {name!r}")
    importlib.import_module(".ops", __name__)  # the ops must exist before any API is used
    value = getattr(importlib.import_module("." + module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
