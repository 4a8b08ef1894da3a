"""CUDA backend: Triton kernels registered for the CUDA key of the flash_quant ops.

Importing this package registers them (flash_quant does so when CUDA is available).
quantize: quantize / dequantize; forward: attention_forward; backward: attention_backward;
prologue: attention_prologue; decode: decode_attention.
"""
from . import backward, decode, forward, prologue, quantize  # noqa: F401
