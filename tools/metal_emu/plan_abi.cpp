// C entry points over csrc/mps/host_logic so that the Python side of the emulator
// (tools/metal_emu/driver.py) plans launches with exactly the code the MPS backend uses:
// the same checks, function constants, grids, bindings and argument bytes.
#include <cstdio>
#include <cstring>
#include <exception>

#include "../../csrc/mps/host_logic.h"

using namespace fq_mps;

extern "C" {

struct CTensor {
  int32_t defined, dtype, rank, pad;
  int64_t sizes[8], strides[8];
};
struct COutput {
  int32_t dtype, rank, zero_fill, pad;
  int64_t sizes[8];
};
struct CLaunch {
  char function[64];
  char key[256];
  int32_t n_const, const_idx[16], const_val[16];
  uint32_t grid[3], threads[3], tg_mem;
  int32_t n_bind, bind_slot[32], bind_src[32];
  int32_t params_slot, params_size;
  uint8_t params[1024];
};
struct CPlan {
  int32_t n_out, n_launch;
  COutput out[8];
  CLaunch launch[4];
};

}  // extern "C"

static TensorDesc to_desc(const CTensor& c) {
  TensorDesc t;
  t.defined = c.defined != 0;
  if (!t.defined) return t;
  t.dtype = Dtype(c.dtype);
  t.sizes.assign(c.sizes, c.sizes + c.rank);
  t.strides.assign(c.strides, c.strides + c.rank);
  return t;
}

static int export_plan(const Plan& p, CPlan* out, char* err, int errlen) {
  std::memset(out, 0, sizeof(CPlan));
  if (p.outputs.size() > 8 || p.launches.size() > 4) {
    std::snprintf(err, errlen, "plan too large for the C ABI");
    return 1;
  }
  out->n_out = int32_t(p.outputs.size());
  for (size_t i = 0; i < p.outputs.size(); ++i) {
    out->out[i].dtype = int32_t(p.outputs[i].dtype);
    out->out[i].rank = int32_t(p.outputs[i].sizes.size());
    out->out[i].zero_fill = p.outputs[i].zero_fill;
    for (size_t k = 0; k < p.outputs[i].sizes.size(); ++k) out->out[i].sizes[k] = p.outputs[i].sizes[k];
  }
  out->n_launch = int32_t(p.launches.size());
  for (size_t i = 0; i < p.launches.size(); ++i) {
    const Launch& l = p.launches[i];
    CLaunch& c = out->launch[i];
    std::snprintf(c.function, sizeof c.function, "%s", l.function.c_str());
    std::snprintf(c.key, sizeof c.key, "%s", l.pipeline_key().c_str());
    c.n_const = int32_t(l.constants.size());
    for (size_t k = 0; k < l.constants.size(); ++k) c.const_idx[k] = l.constants[k].first, c.const_val[k] = l.constants[k].second;
    for (int k = 0; k < 3; ++k) c.grid[k] = l.grid[k], c.threads[k] = l.threads[k];
    c.tg_mem = l.tg_mem_bytes;
    c.n_bind = int32_t(l.bindings.size());
    for (size_t k = 0; k < l.bindings.size(); ++k) c.bind_slot[k] = l.bindings[k].slot, c.bind_src[k] = l.bindings[k].source;
    c.params_slot = l.params_slot;
    c.params_size = int32_t(l.params.size());
    if (l.params.size() > sizeof c.params) {
      std::snprintf(err, errlen, "params too large for the C ABI");
      return 1;
    }
    std::memcpy(c.params, l.params.data(), l.params.size());
  }
  return 0;
}

template <class F>
static int guarded(F&& f, CPlan* out, char* err, int errlen) {
  try {
    return export_plan(f(), out, err, errlen);
  } catch (const std::exception& e) {
    std::snprintf(err, errlen, "%s", e.what());
    return 1;
  }
}

extern "C" int fq_emu_plan_attention(int backward, const CTensor* t, int causal, int every_key, int has_scale,
                                     double scale, const char* pv, CPlan* out, char* err, int errlen) {
  return guarded([&] {
    AttnArgs a;
    for (int i = 0; i < kNumAttnInputs; ++i) a.t[i] = to_desc(t[i]);
    a.causal = causal != 0;
    a.every_key = every_key != 0;
    a.has_scale = has_scale != 0;
    a.scale = scale;
    a.pv_precision = pv;
    return backward ? plan_attention_backward(a) : plan_attention_forward(a);
  }, out, err, errlen);
}

extern "C" int fq_emu_plan_quantize(const CTensor* x, const char* precision, const char* granularity,
                                    long long block_size, const char* strategy, int smooth, const CTensor* center,
                                    CPlan* out, char* err, int errlen) {
  return guarded([&] {
    QuantArgs a;
    a.x = to_desc(*x);
    if (center) a.center = to_desc(*center);
    a.precision = precision;
    a.granularity = granularity;
    a.block_size = block_size;
    a.strategy = strategy;
    a.smooth = smooth != 0;
    return plan_quantize(a);
  }, out, err, errlen);
}

extern "C" int fq_emu_plan_dequantize(const CTensor* t, const char* precision, long long block_size, int dtype,
                                      CPlan* out, char* err, int errlen) {
  return guarded([&] {
    DequantArgs a;
    a.data = to_desc(t[0]);
    a.scale = to_desc(t[1]);
    a.zero_point = to_desc(t[2]);
    a.mean = to_desc(t[3]);
    a.precision = precision;
    a.block_size = block_size;
    a.dtype = Dtype(dtype);
    return plan_dequantize(a);
  }, out, err, errlen);
}

extern "C" int fq_emu_plan_quantize_with_scale(const CTensor* t, const char* precision, long long block_size,
                                               CPlan* out, char* err, int errlen) {
  return guarded([&] {
    QuantWithScaleArgs a;
    a.x = to_desc(t[0]);
    a.scale = to_desc(t[1]);
    a.zero_point = to_desc(t[2]);
    a.precision = precision;
    a.block_size = block_size;
    return plan_quantize_with_scale(a);
  }, out, err, errlen);
}

extern "C" int fq_emu_plan_decode(const CTensor* t, int has_scale, double scale, const char* precision,
                                  long long k_group, long long v_group, long long num_splits, CPlan* out, char* err,
                                  int errlen) {
  return guarded([&] {
    DecodeArgs a;
    for (int i = 0; i < kNumDecodeInputs; ++i) a.t[i] = to_desc(t[i]);
    a.has_scale = has_scale != 0;
    a.scale = scale;
    a.precision = precision;
    a.k_group = k_group, a.v_group = v_group, a.num_splits = num_splits;
    return plan_decode(a);
  }, out, err, errlen);
}
