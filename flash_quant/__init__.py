"""flash_quant: quantized flash attention for PyTorch.

Layers, bottom up:
  torch.ops.flash_quant.*   schemas in csrc/schema.cpp; kernels per device (csrc/cpu,
                            flash_quant/cuda, csrc/mps + metal)
  flash_quant.ops           typed wrappers, fake kernels, autograd
  flash_quant.quantize / QuantizedTensor / flash_quant.attention   the functional API
  flash_quant.nn            modules (MultiheadAttention)
  flash_quant.integrations  SDPA routing, diffusers, transformers
  flash_quant.planning      dynamic quantization, cost model, recommendations
"""
from . import ops  # noqa: F401  (registers fake kernels and autograd)
from .attention import attention, attention_with_lse
from .config import (
    PRESETS,
    STRATEGY_VERSION,
    AttentionConfig,
    Granularity,
    OperandConfig,
    PerBlock,
    PerChannel,
    PerHead,
    PerTensor,
    PerToken,
    Precision,
    PVPrecision,
    Strategy,
    get_preset,
)
from .quantize import quantize
from .quantized_tensor import QuantizedTensor


def _register_device_backends():
    """CUDA kernels are Triton: import (and so register) them only where CUDA exists."""
    import torch

    if torch.cuda.is_available():
        try:
            import triton  # noqa: F401
        except ImportError as exc:  # a visible, explicit failure: no silent CPU fallback
            raise ImportError(
                "flash_quant needs triton for CUDA tensors: pip install 'flash-quant[cuda]'"
            ) from exc
        from . import cuda  # noqa: F401


_register_device_backends()

__version__ = "0.1.0"

__all__ = [
    "attention",
    "attention_with_lse",
    "quantize",
    "QuantizedTensor",
    "AttentionConfig",
    "OperandConfig",
    "Precision",
    "PVPrecision",
    "Strategy",
    "Granularity",
    "PerTensor",
    "PerHead",
    "PerToken",
    "PerBlock",
    "PerChannel",
    "PRESETS",
    "STRATEGY_VERSION",
    "get_preset",
]
