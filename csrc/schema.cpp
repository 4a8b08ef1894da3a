// The one place where flash_quant's operator schemas are defined.
//
// Every backend (csrc/cpu for CPU, flash_quant/cuda for the CUDA key through Triton,
// csrc/mps for Apple's MPS key) registers kernels for exactly these schemas; fake
// kernels and autograd formulas live in flash_quant/ops.py. docs/op_contract.md is the
// written contract: layouts, scale shapes, masks, causal alignment and error rules.
#include <torch/library.h>

TORCH_LIBRARY(flash_quant, m) {
  // Quantize `x` group by group.
  //   precision   : "int8" | "int4" | "fp8_e4m3" | "fp8_e5m2"
  //   granularity : "per_tensor" | "per_head" | "per_token" | "per_block" | "per_channel"
  //   block_size  : rows (along dim -2) per group for "per_block"; ignored otherwise
  //   strategy    : "symmetric" | "asymmetric" | "legacy"
  //   smooth      : subtract the per-channel mean over dim -2 before quantizing
  //   rotate      : first multiply the last dim by flash_quant.rotation.hadamard_matrix(D)
  //                 (orthonormal, block-diagonal Hadamard), in float32. Everything
  //                 returned is then of the rotated values x @ H: codes, scale, zero
  //                 point, and mean (the mean over dim -2 of x @ H). dequantize gives
  //                 back the rotated values; undoing the rotation (@ Hᵀ) is the caller's
  //                 (QuantizedTensor does it).
  //   center      : (needs smooth) the smoothing centre to subtract instead of the mean
  //                 over dim -2: float32, broadcastable to x.shape[:-2] + (1, D), in the
  //                 space of the quantized values (rotated already when rotate). It is
  //                 returned as `mean`. Attention passes one taken over the keys a query
  //                 may see (flash_quant/key_stats.py).
  // Returns data (int8 / packed uint8 for int4 / float8), scale (float32, the group
  // shape), zero_point (int32, same shape as scale) and mean (float32 of shape
  // x.shape[:-2] + (1, D) when smooth, else an empty tensor).
  m.def(
      "quantize(Tensor x, str precision, str granularity, int block_size, str strategy, "
      "bool smooth, bool rotate=False, Tensor? center=None) -> (Tensor data, Tensor scale, Tensor zero_point, Tensor mean)");

  // Quantize with given scales (static quantization, or scales chosen by a search such
  // as flash_quant.scales.mse_scale): data = clamp(round(x / scale) + zero_point). scale
  // (float32) and zero_point (int32, or None for symmetric) have a group shape as
  // returned by quantize; block_size as in dequantize. Returns the data only.
  m.def(
      "quantize_with_scale(Tensor x, Tensor scale, Tensor? zero_point, str precision, "
      "int block_size) -> Tensor");

  // Inverse of quantize: (data - zero_point) * scale (+ mean), in `dtype`.
  // block_size: rows per scale group along dim -2 when scale.size(-2) > 1.
  m.def(
      "dequantize(Tensor data, Tensor scale, Tensor zero_point, Tensor mean, str precision, "
      "int block_size, ScalarType dtype) -> Tensor");

  // The steps between a projection and attention, in one pass (Flux / SD3-style
  // transformer blocks): per-head RMS normalisation, prepending prefix tokens (the text
  // stream of a joint block), rotary embedding on interleaved pairs, and the (B, H, S, D)
  // layout attention wants.
  //   x       : (B, S, H, D) any strides; prefix: (B, P, H, D) or None (P = 0)
  //   eps     : RMS-normalise each (token, head) vector over D when given:
  //             y = x / sqrt(mean(x^2) + eps), times weight (D,) for x's tokens and
  //             prefix_weight (D,) for the prefix's, each when given
  //   cos, sin: (P + S, D) rotary tables, both or neither (D even):
  //             out[2i] = y[2i] cos[2i] - y[2i+1] sin[2i];
  //             out[2i+1] = y[2i+1] cos[2i+1] + y[2i] sin[2i+1]
  // Returns (B, H, P + S, D) contiguous in x.dtype, computed in float32 (float64 for
  // float64 x) and rounded once.
  m.def(
      "attention_prologue(Tensor x, Tensor? prefix, Tensor? weight, Tensor? prefix_weight, "
      "float? eps, Tensor? cos, Tensor? sin) -> Tensor");

  // Attention with SDPA semantics, (B, H, S, D) layout.
  // q, k, v: floating tensors that carry shape, dtype and gradient. When *_data is given,
  // the kernel computes with that quantized operand (data, per-row or broadcastable
  // scale, optional zero point) instead of reading the floating one.
  // k_mean: the mean removed from K by smoothing; only used to return the exact lse.
  // pv_precision: "none" (P unquantized) | "int8" | "fp8_e4m3" — precision of P in P·V.
  // Returns out (B, Hq, Sq, D) in q.dtype and lse (B, Hq, Sq) float32 (natural log;
  // -inf for a row with every key masked, whose output is 0).
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, "
      "Tensor? q_data, Tensor? q_scale, Tensor? q_zero_point, "
      "Tensor? k_data, Tensor? k_scale, Tensor? k_zero_point, Tensor? k_mean, "
      "Tensor? v_data, Tensor? v_scale, Tensor? v_zero_point, "
      "Tensor? attn_mask, bool is_causal, float? scale, str pv_precision) "
      "-> (Tensor out, Tensor lse)");

  // Gradients of attention_forward's `out` with respect to q, k, v (straight-through
  // for quantized operands: the gradient of the quantized forward). dk/dv are summed
  // over the query heads of a GQA group. Scores are recomputed from lse.
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, "
      "Tensor? q_data, Tensor? q_scale, Tensor? q_zero_point, "
      "Tensor? k_data, Tensor? k_scale, Tensor? k_zero_point, Tensor? k_mean, "
      "Tensor? v_data, Tensor? v_scale, Tensor? v_zero_point, "
      "Tensor? attn_mask, bool is_causal, float? scale, str pv_precision) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");

  // Internal: the Hopper (sm_90a) CUDA C++ forward of the INT8 presets (issue 17),
  // registered for CUDA only by csrc/cuda/sm90/register_sm90.cpp when the extension is
  // built with it. Users call attention_forward; flash_quant/cuda/dispatch.py decides
  // when this op serves a call and passes its operands re-viewed as it wants them:
  //   q_data int8 (B, Hq, Sq, D), q_scale float32 (B, Hq, Sq) per token;
  //   k_data int8 (B, Hkv, Skv, D), k_scale float32 (B, Hkv, Skv);
  //   k_mean float32 (B, Hkv, D) or None (the smoothing mean: only enters lse);
  //   v 16-bit (B, Hkv, Skv, D), read when v_data is None (16-bit P·V);
  //   v_data int8 (B, Hkv, Skv, D) K-major (stride(-2) == 1) with v_scale float32
  //   (B, Hkv, D) per channel (INT8 P·V);
  //   nonfinite int32 (B, Hq) or None: 1 where a head's V may hold an inf / NaN, which
  //   turns causal tile skipping off for it (see "Non-finite values" in op_contract.md).
  // Returns out (B, Hq, Sq, D) in v.dtype and lse (B, Hq, Sq) float32 (natural log);
  // causal is top-left aligned (key j visible to query i iff j <= i), as in attention_forward.
  m.def(
      "_sm90_attention_forward(Tensor q_data, Tensor q_scale, Tensor k_data, Tensor k_scale, "
      "Tensor? k_mean, Tensor v, Tensor? v_data, Tensor? v_scale, Tensor? nonfinite, bool is_causal, "
      "float scale) "
      "-> (Tensor out, Tensor lse)");

  // Internal: the whole accurate-preset forward on the Hopper kernel from 16-bit q, k, v
  // (issue 17: one op call, no Python between the steps): the quantize pre-pass of
  // csrc/cuda/sm90/prepass.h (Q and K rotated, K centred by its robust centre, INT8 per
  // token), then _sm90_attention_forward with 16-bit P·V. Registered for CUDA with it.
  // flash_quant/cuda/dispatch.py (fused_sm90) says when a flash_quant.attention call
  // takes it: no mask, no autograd, every key visible, operands the kernels can read.
  //   q (B, Hq, Sq, 128), k / v (B, Hkv, Skv, 128), bfloat16 or float16 alike; unit
  //   channel stride, other strides multiples of 8 elements, 16-byte aligned data.
  // Returns out (B, Hq, Sq, 128) in q.dtype and lse (B, Hq, Sq) float32, as attention_forward
  // with the accurate preset's operands gives them (non-finite q / k rows: NaN scales, so
  // NaN where SDPA gives NaN, instead of the CPU quantizer's error).
  // pv_int8: the fast preset instead — V also quantized (INT8 per channel, symmetric,
  // stored K-major) and INT8 P·V, as attention_forward with the fast preset's operands.
  m.def("_sm90_attention(Tensor q, Tensor k, Tensor v, bool is_causal, float scale, bool pv_int8=False) "
        "-> (Tensor out, Tensor lse)");

  // Decode attention over a quantized KV cache (issue 18). The buffers are those of
  // flash_quant.QuantizedKVCache (layout and schemes: flash_quant/kv_cache.py's
  // docstring); semantics: flash_quant/decode.py. q (B, Hq, Sq, D), 1 <= Sq <= 16,
  // Hq % Hkv == 0, attends to the cache's first `length` tokens (int32 (1,) tensor on
  // the cache's device: kernels read it there, so a captured graph follows the cache).
  //   precision "int8": k_smooth required; k_zero, k_window, v_zero None
  //   precision "int4": k_zero, k_window, v_zero required; k_smooth None; k_group
  //                     tokens per K group, v_group channels per V group
  //   attn_mask: bool (True = attend) or additive, broadcastable to (B, Hq, Sq, length);
  //              None: query i sees keys [0, length - Sq + i]
  // Returns (B, Hq, Sq, D) in q.dtype; a row with no visible key is 0.
  m.def(
      "decode_attention(Tensor q, Tensor k_codes, Tensor k_scale, Tensor? k_zero, "
      "Tensor? k_smooth, Tensor? k_window, Tensor v_codes, Tensor v_scale, Tensor? v_zero, "
      "Tensor length, Tensor? attn_mask, float? scale, str precision, int k_group, "
      "int v_group) -> Tensor");
}
