// See host_logic.h. Everything here is plain C++17 so that it builds on every platform.
#include "host_logic.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>
#include <stdexcept>

#include "../precision.h"  // FQ_INT4_PER_BYTE: the precisions' numbers, shared with CPU and Metal
#include "../../metal/fq_params.h"
#include "../support.h"

namespace fq_mps {

static_assert(sizeof(FqAttnParams) == 13 * 4 * 8 + 12 * 4, "FqAttnParams layout changed: keep it in sync with Metal");
static_assert(sizeof(FqQuantParams) == 15 * 8 + 12 * 4, "FqQuantParams layout changed: keep it in sync with Metal");

namespace {

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

bool is_floating_io(Dtype d) { return d == Dtype::F32 || d == Dtype::F16 || d == Dtype::BF16; }

int io_code(Dtype d) {
  switch (d) {
    case Dtype::F32: return FQ_F32;
    case Dtype::F16: return FQ_F16;
    case Dtype::BF16: return FQ_BF16;
    default: fail(std::string("unsupported floating dtype ") + dtype_name(d));
  }
}

// The precision code of a quantized operand, from its data dtype (the contract's rule).
int data_code(const TensorDesc& t, const char* name) {
  switch (t.dtype) {
    case Dtype::I8: return FQ_I8;
    case Dtype::U8: return FQ_I4;
    case Dtype::E4M3: return FQ_E4M3;
    case Dtype::E5M2: return FQ_E5M2;
    default:
      fail(std::string(name) + " must be int8, uint8 (packed int4), float8_e4m3fn or float8_e5m2, got " +
           dtype_name(t.dtype));
  }
}

// Strides of `t` broadcast to `target` (right-aligned, 0 on broadcast dims).
void broadcast_strides(const TensorDesc& t, const std::vector<int64_t>& target, const char* name, fq_i64* out) {
  const size_t n = target.size();
  if (t.sizes.size() > n)
    fail(std::string(name) + " of shape " + shape_str(t.sizes) + " has more dims than " + shape_str(target));
  for (size_t i = 0; i < n; ++i) {
    const ptrdiff_t j = ptrdiff_t(i) - ptrdiff_t(n - t.sizes.size());
    if (j < 0) {
      out[i] = 0;
      continue;
    }
    const int64_t sz = t.sizes[j];
    if (sz == target[i])
      out[i] = sz == 1 ? 0 : t.strides[j];
    else if (sz == 1)
      out[i] = 0;
    else
      fail(std::string(name) + " of shape " + shape_str(t.sizes) + " is not broadcastable to " + shape_str(target));
  }
}

template <class P>
std::vector<uint8_t> bytes_of(const P& p) {
  std::vector<uint8_t> b(sizeof(P));
  std::memcpy(b.data(), &p, sizeof(P));
  return b;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

uint32_t grid_dim(int64_t v, const char* what) {
  if (v <= 0 || v > int64_t(UINT32_MAX)) fail(std::string(what) + " out of range for a Metal grid");
  return uint32_t(v);
}

// Everything forward and backward share: checks, modes, the argument block.
struct AttnSetup {
  FqAttnParams p{};
  int64_t B, Hq, Hkv, Sq, Skv, D;
  int io, q_mode, k_mode, v_mode, pv_mode, mask_mode;
};

void check_4d(const TensorDesc& t, const char* name) {
  if (!t.defined) fail(std::string(name) + " is required");
  if (t.sizes.size() != 4) fail(std::string(name) + " must have rank 4 (B, H, S, D), got shape " + shape_str(t.sizes));
}

// A quantized operand: its data (logical (B, H, S, D), packed last dim for INT4), scale,
// optional zero point. Fills the stride blocks and returns the precision code.
int setup_operand(const AttnArgs& a, int data_i, int scale_i, int zp_i, const std::vector<int64_t>& shape,
                  bool per_row_scale, const char* name, fq_i64* str, fq_i64* sstr, fq_i64* zstr, fq_i32* has_zp,
                  int io, const TensorDesc& plain) {
  const TensorDesc& d = a.t[data_i];
  const std::string n(name);
  if (!d.defined) {
    if (a.t[scale_i].defined || a.t[zp_i].defined)
      fail(n + "_scale / " + n + "_zero_point given without " + n + "_data");
    for (int i = 0; i < 4; ++i) str[i] = plain.strides[i];
    *has_zp = 0;
    return io;
  }
  const int code = data_code(d, (n + "_data").c_str());
  std::vector<int64_t> want = shape;
  if (code == FQ_I4) {
    if (shape[3] % FQ_INT4_PER_BYTE) fail(n + "_data: int4 needs an even head dim, got " + std::to_string(shape[3]));
    want[3] = shape[3] / FQ_INT4_PER_BYTE;
  }
  if (d.sizes != want)
    fail(n + "_data must have shape " + shape_str(want) + ", got " + shape_str(d.sizes));
  for (int i = 0; i < 4; ++i) str[i] = d.strides[i];
  const TensorDesc& s = a.t[scale_i];
  if (!s.defined) fail(n + "_scale is required with " + n + "_data");
  if (s.dtype != Dtype::F32) fail(n + "_scale must be float32, got " + dtype_name(s.dtype));
  std::vector<int64_t> sshape = shape;
  if (per_row_scale) {
    sshape[3] = 1;
    if (s.sizes.empty() || s.sizes.back() != 1)
      fail(n + "_scale must be broadcastable to (B, H, S, 1) (one scale per row or coarser), got " +
           shape_str(s.sizes));
  }
  broadcast_strides(s, sshape, (n + "_scale").c_str(), sstr);
  const TensorDesc& z = a.t[zp_i];
  *has_zp = z.defined ? 1 : 0;
  if (z.defined) {
    if (z.dtype != Dtype::I32) fail(n + "_zero_point must be int32, got " + dtype_name(z.dtype));
    if (z.sizes != s.sizes)
      fail(n + "_zero_point must have the scale's shape " + shape_str(s.sizes) + ", got " + shape_str(z.sizes));
    if (code == FQ_E4M3 || code == FQ_E5M2) fail(n + "_zero_point is not allowed with fp8 data");
    broadcast_strides(z, sshape, (n + "_zero_point").c_str(), zstr);
  }
  return code;
}

AttnSetup setup_attention(const AttnArgs& a) {
  AttnSetup s;
  const TensorDesc &q = a.t[kQ], &k = a.t[kK], &v = a.t[kV];
  check_4d(q, "q");
  check_4d(k, "k");
  check_4d(v, "v");
  if (!is_floating_io(q.dtype)) fail(std::string("q must be float32, float16 or bfloat16, got ") + dtype_name(q.dtype));
  if (k.dtype != q.dtype || v.dtype != q.dtype) fail("q, k and v must have the same dtype");
  s.B = q.sizes[0], s.Hq = q.sizes[1], s.Sq = q.sizes[2], s.D = q.sizes[3];
  s.Hkv = k.sizes[1], s.Skv = k.sizes[2];
  if (k.sizes[0] != s.B || v.sizes[0] != s.B) fail("q, k and v must have the same batch size");
  if (k.sizes != v.sizes) fail("k and v must have the same shape, got " + shape_str(k.sizes) + " and " + shape_str(v.sizes));
  if (k.sizes[3] != s.D) fail("k's head dim " + std::to_string(k.sizes[3]) + " differs from q's " + std::to_string(s.D));
  if (!fq_head_dim_supported(s.D))
    fail("head dim must be a multiple of " + std::to_string(FQ_HEAD_DIM_MULTIPLE) + " in " +
         std::to_string(FQ_MIN_HEAD_DIM) + ".." + std::to_string(FQ_MAX_HEAD_DIM) + ", got " + std::to_string(s.D));
  if (s.Hkv < 1 || s.Hq % s.Hkv) fail("Hq (" + std::to_string(s.Hq) + ") must be a multiple of Hkv (" + std::to_string(s.Hkv) + ")");
  if (s.Sq < 1 || s.Skv < 1 || s.B < 1) fail("q and k need at least one row and one batch");
  if (s.B > 65535 || s.Hq > 65535) fail("batch and head counts above 65535 are not supported");
  s.io = io_code(q.dtype);

  FqAttnParams& p = s.p;
  const std::vector<int64_t> qshape = q.sizes, kshape = k.sizes;
  s.q_mode = setup_operand(a, kQData, kQScale, kQZp, qshape, true, "q", p.q_str, p.qs_str, p.qz_str, &p.has_qz, s.io, q);
  s.k_mode = setup_operand(a, kKData, kKScale, kKZp, kshape, true, "k", p.k_str, p.ks_str, p.kz_str, &p.has_kz, s.io, k);
  s.v_mode = setup_operand(a, kVData, kVScale, kVZp, kshape, false, "v", p.v_str, p.vs_str, p.vz_str, &p.has_vz, s.io, v);

  const TensorDesc& km = a.t[kKMean];
  p.has_kmean = km.defined && km.numel() > 0 ? 1 : 0;
  if (p.has_kmean) {
    if (km.dtype != Dtype::F32) fail(std::string("k_mean must be float32, got ") + dtype_name(km.dtype));
    broadcast_strides(km, {s.B, s.Hkv, 1, s.D}, "k_mean", p.km_str);
  }

  const TensorDesc& m = a.t[kMask];
  s.mask_mode = FQ_NONE;
  if (m.defined) {
    switch (m.dtype) {
      case Dtype::Bool: s.mask_mode = FQ_BOOL; break;
      case Dtype::F32: s.mask_mode = FQ_F32; break;
      case Dtype::F16: s.mask_mode = FQ_F16; break;
      case Dtype::BF16: s.mask_mode = FQ_BF16; break;
      default: fail(std::string("attn_mask must be bool, float32, float16 or bfloat16, got ") + dtype_name(m.dtype));
    }
    broadcast_strides(m, {s.B, s.Hq, s.Sq, s.Skv}, "attn_mask", p.mask_str);
  }

  if (a.pv_precision == "none") s.pv_mode = FQ_PV_NONE;
  else if (a.pv_precision == "int8") s.pv_mode = FQ_PV_INT8;
  else if (a.pv_precision == "fp8_e4m3") s.pv_mode = FQ_PV_E4M3;
  else fail("pv_precision must be 'none', 'int8' or 'fp8_e4m3', got '" + a.pv_precision + "'");

  p.B = fq_i32(s.B), p.Hq = fq_i32(s.Hq), p.Hkv = fq_i32(s.Hkv), p.Sq = fq_i32(s.Sq), p.Skv = fq_i32(s.Skv),
  p.D = fq_i32(s.D);
  if (s.Sq > INT32_MAX / 2 || s.Skv > INT32_MAX / 2) fail("sequence too long");
  p.scale = float(a.has_scale ? a.scale : 1.0 / std::sqrt(double(s.D)));
  p.every_key = a.causal && a.every_key ? 1 : 0;
  return s;
}

void common_constants(Launch& l, const AttnSetup& s, int block_k) {
  l.constants = {{FQ_FC_HEAD_DIM, int32_t(s.D)},   {FQ_FC_IO_DTYPE, s.io},       {FQ_FC_Q_MODE, s.q_mode},
                 {FQ_FC_K_MODE, s.k_mode},         {FQ_FC_V_MODE, s.v_mode},     {FQ_FC_PV_MODE, s.pv_mode},
                 {FQ_FC_MASK_MODE, s.mask_mode},   {FQ_FC_CAUSAL, 0},            {FQ_FC_BLOCK_K, block_k}};
}

// Binds the operands: the quantized data when present, else the floating tensor.
void bind_operands(Launch& l, const AttnArgs& a) {
  auto src = [&](int data_i, int plain_i) { return a.t[data_i].defined ? data_i : plain_i; };
  auto opt = [&](int i) { return a.t[i].defined && a.t[i].numel() > 0 ? i : kUnbound; };
  l.bindings = {{0, src(kQData, kQ)}, {1, opt(kQScale)}, {2, opt(kQZp)},  {3, src(kKData, kK)},
                {4, opt(kKScale)},    {5, opt(kKZp)},    {6, opt(kKMean)}, {7, src(kVData, kV)},
                {8, opt(kVScale)},    {9, opt(kVZp)},    {10, opt(kMask)}};
}

}  // namespace

const char* dtype_name(Dtype d) {
  switch (d) {
    case Dtype::F32: return "float32";
    case Dtype::F16: return "float16";
    case Dtype::BF16: return "bfloat16";
    case Dtype::I8: return "int8";
    case Dtype::U8: return "uint8";
    case Dtype::E4M3: return "float8_e4m3fn";
    case Dtype::E5M2: return "float8_e5m2";
    case Dtype::Bool: return "bool";
    case Dtype::I32: return "int32";
    case Dtype::F64: return "float64";
    default: return "an unsupported dtype";
  }
}

int64_t dtype_size(Dtype d) {
  switch (d) {
    case Dtype::F32: case Dtype::I32: return 4;
    case Dtype::F16: case Dtype::BF16: return 2;
    case Dtype::F64: return 8;
    default: return 1;
  }
}

int64_t TensorDesc::numel() const {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  return n;
}

TensorDesc TensorDesc::contiguous(Dtype dtype, std::vector<int64_t> sizes) {
  TensorDesc t;
  t.defined = true;
  t.dtype = dtype;
  t.sizes = std::move(sizes);
  t.strides.assign(t.sizes.size(), 1);
  for (int i = int(t.sizes.size()) - 2; i >= 0; --i) t.strides[i] = t.strides[i + 1] * t.sizes[i + 1];
  return t;
}

std::string Launch::pipeline_key() const {
  std::ostringstream o;
  o << function;
  for (auto& c : constants) o << '|' << c.first << '=' << c.second;
  return o.str();
}

Plan plan_attention_forward(const AttnArgs& a) {
  AttnSetup s = setup_attention(a);
  Plan plan;
  plan.outputs.push_back({a.t[kQ].dtype, {s.B, s.Hq, s.Sq, s.D}});
  plan.outputs.push_back({Dtype::F32, {s.B, s.Hq, s.Sq}});
  const TensorDesc out = TensorDesc::contiguous(a.t[kQ].dtype, {s.B, s.Hq, s.Sq, s.D});
  for (int i = 0; i < 4; ++i) s.p.o_str[i] = out.strides[i];

  Launch l;
  l.function = "fq_attention_forward";
  // Keys per block: 64 while a 64-wide K chunk is the whole head (fewer barriers per key),
  // 32 above to keep the score tile and the register arrays small.
  const int block_k = s.D <= 64 ? 64 : 32;
  common_constants(l, s, block_k);
  l.constants[7].second = a.causal ? 1 : 0;
  l.grid[0] = grid_dim(ceil_div(s.Sq, FQ_BLOCK_Q), "query blocks");
  l.grid[1] = grid_dim(s.Hq, "heads");
  l.grid[2] = grid_dim(s.B, "batch");
  l.threads[0] = FQ_ATTN_THREADS;
  l.tg_mem_bytes = uint32_t(FQ_FWD_TG_FLOATS(block_k) * sizeof(float));
  bind_operands(l, a);
  l.bindings.push_back({11, kOutput + 0});
  l.bindings.push_back({12, kOutput + 1});
  l.params_slot = 13;
  l.params = bytes_of(s.p);
  plan.launches.push_back(std::move(l));
  return plan;
}

Plan plan_attention_backward(const AttnArgs& a) {
  AttnSetup s = setup_attention(a);
  const TensorDesc &go = a.t[kGradOut], &o = a.t[kOut], &lse = a.t[kLse];
  const std::vector<int64_t> oshape{s.B, s.Hq, s.Sq, s.D};
  check_4d(go, "grad_out");
  check_4d(o, "out");
  if (go.sizes != oshape) fail("grad_out must have shape " + shape_str(oshape) + ", got " + shape_str(go.sizes));
  if (o.sizes != oshape) fail("out must have shape " + shape_str(oshape) + ", got " + shape_str(o.sizes));
  if (go.dtype != a.t[kQ].dtype || o.dtype != a.t[kQ].dtype) fail("grad_out and out must have q's dtype");
  if (!lse.defined || lse.dtype != Dtype::F32 || lse.sizes != std::vector<int64_t>{s.B, s.Hq, s.Sq})
    fail("lse must be float32 of shape " + shape_str({s.B, s.Hq, s.Sq}));
  if (lse.strides != TensorDesc::contiguous(Dtype::F32, lse.sizes).strides) fail("lse must be contiguous");
  for (int i = 0; i < 4; ++i) s.p.o_str[i] = o.strides[i], s.p.do_str[i] = go.strides[i];

  Plan plan;
  const Dtype io = a.t[kQ].dtype;
  plan.outputs.push_back({io, a.t[kQ].sizes});  // dq
  plan.outputs.push_back({io, a.t[kK].sizes});  // dk
  plan.outputs.push_back({io, a.t[kV].sizes});  // dv
  plan.outputs.push_back({Dtype::F32, {s.B, s.Hq, s.Sq}});  // delta = rowsum(dO * O)
  plan.outputs.push_back({Dtype::F32, {s.B, s.Hq, s.Sq}});  // lse' = lse - scale * q . k_mean
  const std::vector<uint8_t> params = bytes_of(s.p);

  auto make = [&](const char* fn, int64_t rows, int64_t heads, bool uses_tg) {
    Launch l;
    l.function = fn;
    common_constants(l, s, FQ_BWD_BLOCK);
    l.constants[7].second = a.causal ? 1 : 0;
    l.grid[0] = grid_dim(ceil_div(rows, FQ_BWD_BLOCK), "blocks");
    l.grid[1] = grid_dim(heads, "heads");
    l.grid[2] = grid_dim(s.B, "batch");
    l.threads[0] = FQ_ATTN_THREADS;
    l.tg_mem_bytes = uses_tg ? uint32_t(FQ_BWD_TG_FLOATS * sizeof(float)) : 0;
    bind_operands(l, a);
    l.bindings.push_back({11, kOut});
    l.bindings.push_back({12, kLse});
    l.bindings.push_back({14, kGradOut});
    l.bindings.push_back({15, kOutput + 3});
    l.bindings.push_back({16, kOutput + 4});
    l.params_slot = 13;
    l.params = params;
    return l;
  };
  Launch prep = make("fq_attention_backward_prep", s.Sq, s.Hq, false);
  Launch dq = make("fq_attention_backward_dq", s.Sq, s.Hq, true);
  dq.bindings.push_back({17, kOutput + 0});
  Launch dkdv = make("fq_attention_backward_dkdv", s.Skv, s.Hkv, true);
  dkdv.bindings.push_back({18, kOutput + 1});
  dkdv.bindings.push_back({19, kOutput + 2});
  plan.launches = {prep, dq, dkdv};
  return plan;
}

// ------------------------------------------------------------------ quantization
namespace {

struct PrecisionInfo {
  int code;
  Dtype data;
};

PrecisionInfo precision_info(const std::string& p) {
  if (p == "int8") return {FQ_I8, Dtype::I8};
  if (p == "int4") return {FQ_I4, Dtype::U8};
  if (p == "fp8_e4m3") return {FQ_E4M3, Dtype::E4M3};
  if (p == "fp8_e5m2") return {FQ_E5M2, Dtype::E5M2};
  fail("precision must be 'int8', 'int4', 'fp8_e4m3' or 'fp8_e5m2', got '" + p + "'");
}

// Splits a shape into (lead..., S, D) with the leading dims padded to four.
void split_shape(const std::vector<int64_t>& shape, FqQuantParams& p, const char* name) {
  const size_t r = shape.size();
  if (r < 1) fail(std::string(name) + " must have rank >= 1");
  if (r > 6) fail(std::string(name) + " must have rank <= 6 on MPS, got " + std::to_string(r));
  p.D = fq_i32(shape[r - 1]);
  p.S = fq_i32(r >= 2 ? shape[r - 2] : 1);
  int64_t L = 1;
  for (int i = 0; i < 4; ++i) {
    const ptrdiff_t j = ptrdiff_t(r) - 2 - 4 + i;
    p.lead_size[i] = j >= 0 ? shape[j] : 1;
    L *= p.lead_size[i];
  }
  if (L * p.S * int64_t(p.D) > INT32_MAX) fail(std::string(name) + " is too large (2^31 elements or more)");
  p.L = fq_i32(L);
}

// Strides of a scale / zero point (row_str given) or mean (row_str null) over the
// (lead..., row group, column) view of a tensor of logical `shape`, broadcasting.
void group_strides(const TensorDesc& t, const char* name, const std::vector<int64_t>& shape, const FqQuantParams& p,
                   bool is_mean, fq_i64* lead_str, fq_i64* row_str, fq_i64* col_str) {
  const size_t rank = shape.size();
  if (t.sizes.size() > rank)
    fail(std::string(name) + " of shape " + shape_str(t.sizes) + " has more dims than the data");
  std::vector<int64_t> ts(rank - t.sizes.size(), 1), tst(rank - t.sizes.size(), 0);
  ts.insert(ts.end(), t.sizes.begin(), t.sizes.end());
  tst.insert(tst.end(), t.strides.begin(), t.strides.end());
  for (int i = 0; i < 4; ++i) {
    const ptrdiff_t j = ptrdiff_t(rank) - 2 - 4 + i;
    if (j < 0) { lead_str[i] = 0; continue; }
    if (ts[j] != 1 && ts[j] != shape[j])
      fail(std::string(name) + " of shape " + shape_str(t.sizes) + " does not broadcast to " + shape_str(shape));
    lead_str[i] = ts[j] == 1 ? 0 : tst[j];
  }
  const int64_t rows = rank >= 2 ? ts[rank - 2] : 1, cols = ts[rank - 1];
  if (cols != 1 && cols != p.D)
    fail(std::string(name) + " of shape " + shape_str(t.sizes) + " does not broadcast to " + shape_str(shape));
  *col_str = cols == 1 ? 0 : tst[rank - 1];
  if (row_str) {
    if (rows > 1 && rows != ceil_div(p.S, p.block_rows))
      fail(std::string(name) + " has " + std::to_string(rows) + " row groups; " + std::to_string(p.S) +
           " rows in blocks of " + std::to_string(p.block_rows) + " need " +
           std::to_string(ceil_div(p.S, p.block_rows)));
    *row_str = rows > 1 ? tst[rank - 2] : 0;
  } else if (is_mean && rows != 1) {
    fail(std::string(name) + " must have size 1 along dim -2, got " + shape_str(t.sizes));
  }
}

// A zero point must match its scale (shape and strides, as the kernels index both with
// the scale's offsets). quantize returns an all-zero one for fp8, which is accepted
// (quantizing to fp8 ignores it). Returns whether one is present.
int check_zero_point(const TensorDesc& z, const TensorDesc& s) {
  if (!z.defined || z.numel() == 0) return 0;
  if (z.dtype != Dtype::I32) fail(std::string("zero_point must be int32, got ") + dtype_name(z.dtype));
  if (z.sizes != s.sizes) fail("zero_point must have the scale's shape " + shape_str(s.sizes));
  if (z.strides != s.strides) fail("zero_point must have the scale's strides");
  return 1;
}

}  // namespace

Plan plan_quantize(const QuantArgs& a) {
  const TensorDesc& x = a.x;
  if (!x.defined) fail("x is required");
  if (!is_floating_io(x.dtype)) fail(std::string("x must be float32, float16 or bfloat16, got ") + dtype_name(x.dtype));
  if (x.strides != TensorDesc::contiguous(x.dtype, x.sizes).strides) fail("x must be contiguous");
  const PrecisionInfo pi = precision_info(a.precision);
  const bool fp8 = pi.code == FQ_E4M3 || pi.code == FQ_E5M2;
  const size_t rank = x.sizes.size();
  FqQuantParams p{};
  split_shape(x.sizes, p, "x");
  if (pi.code == FQ_I4 && p.D % FQ_INT4_PER_BYTE) fail("int4 needs an even last dim, got " + std::to_string(p.D));
  if (x.numel() == 0) fail("x must not be empty");

  bool asym = false;
  std::string gran = a.granularity;
  if (a.strategy == "asymmetric") {
    if (fp8) fail("strategy 'asymmetric' is not defined for fp8 precisions");
    asym = true;
  } else if (a.strategy == "legacy") {
    if (gran != "per_tensor") fail("strategy 'legacy' needs granularity 'per_tensor', got '" + gran + "'");
  } else if (a.strategy != "symmetric") {
    fail("strategy must be 'symmetric', 'asymmetric' or 'legacy', got '" + a.strategy + "'");
  }
  if (a.smooth && rank < 2) fail("smooth needs x of rank >= 2");
  const bool given_center = a.center.defined;
  if (given_center) {
    if (!a.smooth) fail("center is the smoothing centre, it needs smooth=True");
    std::vector<int64_t> cshape(x.sizes.begin(), x.sizes.end() - 2);
    cshape.push_back(1), cshape.push_back(x.sizes.back());
    if (a.center.dtype != Dtype::F32) fail(std::string("center must be float32, got ") + dtype_name(a.center.dtype));
    if (a.center.sizes != cshape) fail("center must have shape " + shape_str(cshape) + ", got " + shape_str(a.center.sizes));
    if (a.center.strides != TensorDesc::contiguous(Dtype::F32, cshape).strides) fail("center must be contiguous");
  }

  // Group boxes over (L, S, D) and the scale's shape.
  std::vector<int64_t> lead(x.sizes.begin(), x.sizes.end() - std::min<size_t>(rank, 2));
  std::vector<int64_t> sshape;
  if (gran == "per_tensor") {
    p.gl = p.L, p.gs = p.S, p.gd = p.D;
    sshape.assign(rank, 1);
  } else if (gran == "per_head") {
    if (rank < 3) fail("granularity 'per_head' needs x of rank >= 3");
    p.gl = 1, p.gs = p.S, p.gd = p.D;
    sshape = lead, sshape.push_back(1), sshape.push_back(1);
  } else if (gran == "per_token") {
    p.gl = 1, p.gs = 1, p.gd = p.D;
    sshape = std::vector<int64_t>(x.sizes.begin(), x.sizes.end() - 1), sshape.push_back(1);
  } else if (gran == "per_block") {
    if (a.block_size < 1) fail("block_size must be >= 1 for 'per_block', got " + std::to_string(a.block_size));
    if (rank < 2) fail("granularity 'per_block' needs x of rank >= 2");
    p.gl = 1, p.gs = fq_i32(std::min<int64_t>(a.block_size, p.S)), p.gd = p.D;
    sshape = lead, sshape.push_back(ceil_div(p.S, a.block_size)), sshape.push_back(1);
  } else if (gran == "per_channel") {
    if (rank < 2) fail("granularity 'per_channel' needs x of rank >= 2");
    p.gl = 1, p.gs = p.S, p.gd = 1;
    sshape = lead, sshape.push_back(1), sshape.push_back(p.D);
  } else {
    fail("granularity must be per_tensor, per_head, per_token, per_block or per_channel, got '" + gran + "'");
  }
  p.n_gs = fq_i32(ceil_div(p.S, p.gs));
  p.n_gd = fq_i32(ceil_div(p.D, p.gd));
  const int64_t n_groups = (p.L / p.gl) * p.n_gs * p.n_gd;
  p.has_mean = a.smooth ? 1 : 0;
  p.has_zp = asym ? 1 : 0;

  Plan plan;
  std::vector<int64_t> dshape = x.sizes;
  if (pi.code == FQ_I4) dshape.back() /= FQ_INT4_PER_BYTE;
  plan.outputs.push_back({pi.data, dshape});
  plan.outputs.push_back({Dtype::F32, sshape});
  plan.outputs.push_back({Dtype::I32, sshape, true});  // symmetric: stays 0
  std::vector<int64_t> mshape;
  if (a.smooth && !given_center) mshape = lead, mshape.push_back(1), mshape.push_back(p.D);
  else mshape = {0};
  plan.outputs.push_back({Dtype::F32, mshape});

  const std::vector<uint8_t> params = bytes_of(p);
  const std::vector<std::pair<int, int32_t>> consts{{FQ_FC_IO_DTYPE, io_code(x.dtype)},
                                                    {FQ_FC_QUANT_PRECISION, pi.code},
                                                    {FQ_FC_QUANT_ASYMMETRIC, asym ? 1 : 0}};
  auto make = [&](const char* fn, int64_t groups) {
    Launch l;
    l.function = fn;
    l.constants = consts;
    l.grid[0] = grid_dim(groups, "quantize groups");
    l.threads[0] = FQ_QUANT_THREADS;
    l.tg_mem_bytes = 2 * (FQ_QUANT_THREADS / 32) * sizeof(float);  // per-simdgroup min and max
    l.bindings = {{0, 0}, {1, kOutput + 0}, {2, kOutput + 1}, {3, kOutput + 2}, {4, given_center ? 1 : a.smooth ? kOutput + 3 : kUnbound}};
    l.params_slot = 5;
    l.params = params;
    return l;
  };
  if (a.smooth && !given_center) plan.launches.push_back(make("fq_quantize_mean", ceil_div(int64_t(p.L) * p.D, FQ_QUANT_THREADS)));
  plan.launches.push_back(make("fq_quantize_reduce", n_groups));
  const int64_t per_thread = pi.code == FQ_I4 ? FQ_INT4_PER_BYTE : 1;
  plan.launches.push_back(
      make("fq_quantize_apply", ceil_div(x.numel() / per_thread, FQ_QUANT_THREADS)));
  return plan;
}

Plan plan_dequantize(const DequantArgs& a) {
  const PrecisionInfo pi = precision_info(a.precision);
  const TensorDesc& d = a.data;
  if (!d.defined) fail("data is required");
  if (d.dtype != pi.data)
    fail("data must be " + std::string(dtype_name(pi.data)) + " for precision '" + a.precision + "', got " +
         dtype_name(d.dtype));
  if (d.strides != TensorDesc::contiguous(d.dtype, d.sizes).strides) fail("data must be contiguous");
  if (!is_floating_io(a.dtype)) fail(std::string("dtype must be float32, float16 or bfloat16, got ") + dtype_name(a.dtype));
  std::vector<int64_t> shape = d.sizes;
  if (shape.empty()) fail("data must have rank >= 1");
  if (pi.code == FQ_I4) shape.back() *= FQ_INT4_PER_BYTE;
  FqQuantParams p{};
  split_shape(shape, p, "data");
  const size_t rank = shape.size();

  const TensorDesc& s = a.scale;
  if (!s.defined || s.dtype != Dtype::F32) fail("scale must be a float32 tensor");
  const int64_t srows = s.sizes.size() >= 2 && rank >= 2 ? s.sizes[s.sizes.size() - 2] : 1;
  p.block_rows = fq_i32(srows > 1 ? std::max<int64_t>(a.block_size, 1) : 1);
  group_strides(s, "scale", shape, p, false, p.scale_lead_str, &p.scale_row_str, &p.scale_col_str);
  p.has_zp = check_zero_point(a.zero_point, s);
  const TensorDesc& m = a.mean;
  p.has_mean = m.defined && m.numel() > 0 ? 1 : 0;
  if (p.has_mean) {
    if (m.dtype != Dtype::F32) fail(std::string("mean must be float32, got ") + dtype_name(m.dtype));
    group_strides(m, "mean", shape, p, true, p.mean_lead_str, nullptr, &p.mean_col_str);
  }
  p.out_dtype = io_code(a.dtype);

  Plan plan;
  plan.outputs.push_back({a.dtype, shape});
  Launch l;
  l.function = "fq_dequantize";
  l.constants = {{FQ_FC_IO_DTYPE, p.out_dtype}, {FQ_FC_QUANT_PRECISION, pi.code}};
  const int64_t per_thread = pi.code == FQ_I4 ? FQ_INT4_PER_BYTE : 1;
  l.grid[0] = grid_dim(std::max<int64_t>(1, ceil_div(int64_t(p.L) * p.S * p.D / per_thread, FQ_QUANT_THREADS)),
                       "dequantize threads");
  l.threads[0] = FQ_QUANT_THREADS;
  l.bindings = {{0, 0}, {1, 1}, {2, p.has_zp ? 2 : kUnbound}, {3, p.has_mean ? 3 : kUnbound}, {4, kOutput + 0}};
  l.params_slot = 5;
  l.params = bytes_of(p);
  plan.launches.push_back(std::move(l));
  return plan;
}

Plan plan_quantize_with_scale(const QuantWithScaleArgs& a) {
  const TensorDesc& x = a.x;
  if (!x.defined) fail("x is required");
  if (!is_floating_io(x.dtype)) fail(std::string("x must be float32, float16 or bfloat16, got ") + dtype_name(x.dtype));
  if (x.strides != TensorDesc::contiguous(x.dtype, x.sizes).strides) fail("x must be contiguous");
  if (x.numel() == 0) fail("x must not be empty");
  const PrecisionInfo pi = precision_info(a.precision);
  FqQuantParams p{};
  split_shape(x.sizes, p, "x");
  if (pi.code == FQ_I4 && p.D % FQ_INT4_PER_BYTE) fail("int4 needs an even last dim, got " + std::to_string(p.D));
  const TensorDesc& s = a.scale;
  if (!s.defined || s.dtype != Dtype::F32) fail("scale must be a float32 tensor");
  const int64_t srows = s.sizes.size() >= 2 && x.sizes.size() >= 2 ? s.sizes[s.sizes.size() - 2] : 1;
  p.block_rows = fq_i32(srows > 1 ? std::max<int64_t>(a.block_size, 1) : 1);
  group_strides(s, "scale", x.sizes, p, false, p.scale_lead_str, &p.scale_row_str, &p.scale_col_str);
  p.has_zp = check_zero_point(a.zero_point, s);

  Plan plan;
  std::vector<int64_t> dshape = x.sizes;
  if (pi.code == FQ_I4) dshape.back() /= FQ_INT4_PER_BYTE;
  plan.outputs.push_back({pi.data, dshape});
  Launch l;
  l.function = "fq_quantize_with_scale";
  l.constants = {{FQ_FC_IO_DTYPE, io_code(x.dtype)}, {FQ_FC_QUANT_PRECISION, pi.code},
                 {FQ_FC_QUANT_ASYMMETRIC, p.has_zp}};
  const int64_t per_thread = pi.code == FQ_I4 ? FQ_INT4_PER_BYTE : 1;
  l.grid[0] = grid_dim(ceil_div(x.numel() / per_thread, FQ_QUANT_THREADS), "quantize threads");
  l.threads[0] = FQ_QUANT_THREADS;
  l.bindings = {{0, 0}, {1, kOutput + 0}, {2, 1}, {3, p.has_zp ? 2 : kUnbound}};
  l.params_slot = 5;
  l.params = bytes_of(p);
  plan.launches.push_back(std::move(l));
  return plan;
}

}  // namespace fq_mps

// ------------------------------------------------------------------ decode
namespace fq_mps {
namespace {

// A 3-dim per-token / per-channel tensor as the 4-dim (B, H, S, D) view the kernel
// indexes, with a size-1 dim inserted at `at` (2: per channel, 3: per token).
TensorDesc with_unit_dim(const TensorDesc& t, size_t at) {
  TensorDesc r = t;
  if (!t.defined || t.sizes.size() != 3) return r;  // the caller's rank check names it
  r.sizes.insert(r.sizes.begin() + ptrdiff_t(at), 1);
  r.strides.insert(r.strides.begin() + ptrdiff_t(at), 0);
  return r;
}

// One cache operand (K or V) as the kernel reads it.
struct CacheOperand {
  const char* name;
  TensorDesc codes, scale, offset, window, smooth;
  int64_t group_rows, group_cols;  // tokens x channels of one scale group
  int64_t coded_multiple;          // tokens [0, (length / m) * m) are codes, the rest the window
};

void require(const TensorDesc& t, const std::string& name, const std::string& why) {
  if (!t.defined) fail(name + " is required " + why);
}

// Checks one operand's buffers against the capacity and fills its strides. Every length
// up to `capacity` is then in bounds. Returns the code precision (FQ_I8 / FQ_U4_SPLIT).
int setup_cache_operand(const CacheOperand& o, int64_t B, int64_t Hkv, int64_t D, int64_t capacity,
                        FqDecCacheStrides& st, fq_i32* has_offset, fq_i32* has_smooth, Dtype* window_dtype) {
  const std::string n(o.name);
  const TensorDesc &c = o.codes, &s = o.scale;
  if (o.group_rows < 1 || o.group_cols < 1 || D % o.group_cols)
    fail(n + " groups must be >= 1 token and a divisor of the head dim " + std::to_string(D) + " in channels, got " +
         std::to_string(o.group_rows) + " x " + std::to_string(o.group_cols));
  check_4d(c, (n + "_codes").c_str());
  int code;
  if (c.dtype == Dtype::I8) code = FQ_I8;
  else if (c.dtype == Dtype::U8) code = FQ_U4_SPLIT;
  else fail(n + "_codes must be int8 or uint8 (packed int4), got " + dtype_name(c.dtype));
  const int64_t width = code == FQ_U4_SPLIT ? D / FQ_INT4_PER_BYTE : D;
  const int64_t max_coded = (capacity / o.coded_multiple) * o.coded_multiple;
  if (c.sizes[0] != B || c.sizes[1] != Hkv || c.sizes[2] < max_coded || c.sizes[3] != width)
    fail(n + "_codes must have shape (" + std::to_string(B) + ", " + std::to_string(Hkv) + ", >= " +
         std::to_string(max_coded) + ", " + std::to_string(width) + "), got " + shape_str(c.sizes));
  for (int i = 0; i < 4; ++i) st.code[i] = c.strides[i];
  check_4d(s, (n + "_scale").c_str());
  if (!is_floating_io(s.dtype)) fail(n + "_scale must be float32, float16 or bfloat16, got " + dtype_name(s.dtype));
  const std::vector<int64_t> groups{B, Hkv, ceil_div(max_coded, o.group_rows), D / o.group_cols};
  for (int i = 0; i < 4; ++i) {
    const bool ok = s.sizes[i] == 1 || (i == 2 ? s.sizes[i] >= groups[i] : s.sizes[i] == groups[i]);
    if (!ok)
      fail(n + "_scale of shape " + shape_str(s.sizes) + " does not cover the groups " + shape_str(groups) + " of " +
           std::to_string(max_coded) + " coded tokens");
    st.scale[i] = s.sizes[i] == 1 ? 0 : s.strides[i];
  }
  *has_offset = o.offset.defined ? 1 : 0;
  if (o.offset.defined) {
    if (o.offset.sizes != s.sizes || o.offset.dtype != s.dtype) fail(n + "_zero must have the scale's shape and dtype");
    for (int i = 0; i < 4; ++i) st.offset[i] = o.offset.sizes[i] == 1 ? 0 : o.offset.strides[i];
  }
  if (o.coded_multiple > 1) {  // up to coded_multiple - 1 tokens wait in the window
    const TensorDesc& w = o.window;
    check_4d(w, (n + "_window").c_str());
    if (!is_floating_io(w.dtype)) fail(n + "_window must be float32, float16 or bfloat16, got " + dtype_name(w.dtype));
    if (w.sizes[0] != B || w.sizes[1] != Hkv || w.sizes[2] < o.coded_multiple - 1 || w.sizes[3] != D)
      fail(n + "_window must have shape (" + std::to_string(B) + ", " + std::to_string(Hkv) + ", >= " +
           std::to_string(o.coded_multiple - 1) + ", " + std::to_string(D) + "), got " + shape_str(w.sizes));
    for (int i = 0; i < 4; ++i) st.window[i] = w.strides[i];
    *window_dtype = w.dtype;
  }
  if (o.smooth.defined) {
    if (o.smooth.dtype != Dtype::F32) fail(n + "_smooth must be float32, got " + dtype_name(o.smooth.dtype));
    broadcast_strides(o.smooth, {B, Hkv, 1, D}, (n + "_smooth").c_str(), st.smooth);
    *has_smooth = 1;
  }
  return code;
}

}  // namespace

int64_t decode_num_splits(int64_t batch, int64_t kv_heads, int64_t row_blocks, int64_t capacity) {
  const int64_t groups = std::max<int64_t>(1, batch * kv_heads * row_blocks);
  const int64_t want = ceil_div(FQ_DEC_TARGET_THREADGROUPS, groups);
  return std::max<int64_t>(1, std::min(want, capacity / FQ_DEC_MIN_SPLIT_KEYS));
}

static_assert(sizeof(FqDecodeParams) == 2 * 20 * 8 + 12 * 8 + 22 * 4, "FqDecodeParams layout changed: keep it in sync with Metal");

Plan plan_decode(const DecodeArgs& a) {
  const TensorDesc& q = a.t[kDecQ];
  check_4d(q, "q");
  if (!is_floating_io(q.dtype)) fail(std::string("q must be float32, float16 or bfloat16, got ") + dtype_name(q.dtype));
  const int64_t B = q.sizes[0], Hq = q.sizes[1], Sq = q.sizes[2], D = q.sizes[3];
  if (Sq < 1 || Sq > FQ_DEC_MAX_SQ)
    fail("decode takes 1 to " + std::to_string(FQ_DEC_MAX_SQ) + " queries, got " + std::to_string(Sq));
  if (!fq_head_dim_supported(D))
    fail("head dim must be a multiple of " + std::to_string(FQ_HEAD_DIM_MULTIPLE) + " in " +
         std::to_string(FQ_MIN_HEAD_DIM) + ".." + std::to_string(FQ_MAX_HEAD_DIM) + ", got " + std::to_string(D));
  if (B < 1 || Hq < 1) fail("q needs at least one batch and one head");
  if (B > 65535) fail("batch sizes above 65535 are not supported");
  check_4d(a.t[kDecKCodes], "k_codes");
  check_4d(a.t[kDecVCodes], "v_codes");
  const int64_t Hkv = a.t[kDecKCodes].sizes[1], capacity = a.t[kDecVCodes].sizes[2];
  if (Hkv < 1 || Hq % Hkv) fail("Hq (" + std::to_string(Hq) + ") must be a multiple of Hkv (" + std::to_string(Hkv) + ")");
  if (capacity < 1 || capacity > INT32_MAX / 2) fail("cache capacity out of range: " + std::to_string(capacity));
  const TensorDesc& len = a.t[kDecLength];
  if (!len.defined || len.dtype != Dtype::I32 || len.numel() != 1)
    fail("length must be an int32 tensor of one element (the cache's length_tensor)");

  // The cache's layout (flash_quant/kv_cache.py) as generic operands.
  CacheOperand K{"k", a.t[kDecKCodes], a.t[kDecKScale], a.t[kDecKZero], a.t[kDecKWindow], a.t[kDecKSmooth], 1, D, 1};
  CacheOperand V{"v", a.t[kDecVCodes], a.t[kDecVScale], a.t[kDecVZero], TensorDesc(), TensorDesc(), 1, D, 1};
  const std::string why = "for precision '" + a.precision + "'";
  if (a.precision == "int8") {
    for (int i : {kDecKZero, kDecKWindow, kDecVZero})
      if (a.t[i].defined) fail("k_zero, k_window and v_zero must be None " + why);
    require(a.t[kDecKSmooth], "k_smooth", why);
    K.scale = with_unit_dim(K.scale, 3), V.scale = with_unit_dim(V.scale, 3);  // one scale per token
    K.smooth = with_unit_dim(K.smooth, 2);
    for (const TensorDesc* t : {&K.scale, &V.scale, &K.smooth})
      if (t->sizes.size() != 4) fail("int8 k_scale / v_scale must be (B, Hkv, L) and k_smooth (B, Hkv, D)");
  } else if (a.precision == "int4") {
    require(a.t[kDecKZero], "k_zero", why);
    require(a.t[kDecKWindow], "k_window", why);
    require(a.t[kDecVZero], "v_zero", why);
    if (a.t[kDecKSmooth].defined) fail("k_smooth must be None " + why);
    if (a.k_group < 1 || a.v_group < 1)
      fail("int4 needs k_group >= 1 and v_group >= 1, got " + std::to_string(a.k_group) + ", " + std::to_string(a.v_group));
    K.group_rows = a.k_group, K.group_cols = 1, K.coded_multiple = a.k_group;  // per channel over k_group tokens
    V.group_rows = 1, V.group_cols = a.v_group;                                // per token over v_group channels
    if (a.t[kDecKCodes].dtype != Dtype::U8 || a.t[kDecVCodes].dtype != Dtype::U8)
      fail("int4 codes must be uint8 (two codes a byte)");
  } else {
    fail("precision must be 'int8' or 'int4', got '" + a.precision + "'");
  }
  if (a.precision == "int8" && (a.t[kDecKCodes].dtype != Dtype::I8 || a.t[kDecVCodes].dtype != Dtype::I8))
    fail("int8 codes must be int8");

  FqDecodeParams p{};
  Dtype window = q.dtype, unused_window = q.dtype;
  fq_i32 unused = 0;
  const int k_mode = setup_cache_operand(K, B, Hkv, D, capacity, p.k, &p.has_k_offset, &p.has_k_smooth, &window);
  const int v_mode = setup_cache_operand(V, B, Hkv, D, capacity, p.v, &p.has_v_offset, &unused, &unused_window);
  if (a.t[kDecKScale].dtype != a.t[kDecVScale].dtype) fail("k_scale and v_scale must have the same dtype");

  const TensorDesc& m = a.t[kDecMask];
  int mask_mode = FQ_NONE;
  if (m.defined) {
    switch (m.dtype) {
      case Dtype::Bool: mask_mode = FQ_BOOL; break;
      case Dtype::F32: mask_mode = FQ_F32; break;
      case Dtype::F16: mask_mode = FQ_F16; break;
      case Dtype::BF16: mask_mode = FQ_BF16; break;
      default: fail(std::string("attn_mask must be bool, float32, float16 or bfloat16, got ") + dtype_name(m.dtype));
    }
    // Its key dim is the length's (the caller checked it on the host) or 1.
    const int64_t keys = m.sizes.empty() ? 1 : m.sizes.back();
    if (keys > capacity) fail("attn_mask has " + std::to_string(keys) + " keys, the cache holds at most " + std::to_string(capacity));
    broadcast_strides(m, {B, Hq, Sq, keys}, "attn_mask", p.mask_str);
  }
  if (a.num_splits < 0) fail("num_splits must be >= 0 (0: automatic), got " + std::to_string(a.num_splits));

  const int64_t rows = (Hq / Hkv) * Sq, row_blocks = ceil_div(rows, FQ_DEC_ROWS);
  const int64_t want = a.num_splits > 0 ? a.num_splits : decode_num_splits(B, Hkv, row_blocks, capacity);
  const int64_t split_len = ceil_div(capacity, std::min(want, capacity));
  const int64_t n_splits = ceil_div(capacity, split_len);  // splits past the length hold no key: lse -inf
  const TensorDesc out = TensorDesc::contiguous(q.dtype, {B, Hq, Sq, D});
  for (int i = 0; i < 4; ++i) p.q_str[i] = q.strides[i], p.o_str[i] = out.strides[i];
  p.B = fq_i32(B), p.Hq = fq_i32(Hq), p.Hkv = fq_i32(Hkv), p.Sq = fq_i32(Sq), p.D = fq_i32(D);
  p.capacity = fq_i32(capacity);
  p.k_coded_multiple = fq_i32(K.coded_multiple), p.v_coded_multiple = fq_i32(V.coded_multiple);
  p.rows = fq_i32(rows), p.row_blocks = fq_i32(row_blocks);
  p.split_len = fq_i32(split_len), p.n_splits = fq_i32(n_splits);
  p.k_group_rows = fq_i32(K.group_rows), p.k_group_cols = fq_i32(K.group_cols);
  p.v_group_rows = fq_i32(V.group_rows), p.v_group_cols = fq_i32(V.group_cols);
  p.window_dtype = io_code(window);
  p.scale = float(a.has_scale ? a.scale : 1.0 / std::sqrt(double(D)));

  Plan plan;
  plan.outputs.push_back({q.dtype, {B, Hq, Sq, D}});
  plan.outputs.push_back({Dtype::F32, {B, Hq, Sq}});
  plan.outputs.push_back({Dtype::F32, {n_splits, B, Hq, Sq, D}});
  plan.outputs.push_back({Dtype::F32, {n_splits, B, Hq, Sq}});
  const std::vector<uint8_t> params = bytes_of(p);
  const std::vector<std::pair<int, int32_t>> consts{
      {FQ_FC_HEAD_DIM, int32_t(D)}, {FQ_FC_IO_DTYPE, io_code(q.dtype)}, {FQ_FC_K_MODE, k_mode},
      {FQ_FC_V_MODE, v_mode},       {FQ_FC_MASK_MODE, mask_mode},       {FQ_FC_DEC_SCALE_DTYPE, io_code(a.t[kDecKScale].dtype)}};
  auto opt = [&](int i) { return a.t[i].defined && a.t[i].numel() > 0 ? i : kUnbound; };

  Launch part;
  part.function = "fq_decode_partial";
  part.constants = consts;
  part.grid[0] = grid_dim(n_splits, "splits");
  part.grid[1] = grid_dim(Hkv * row_blocks, "KV heads x row blocks");
  part.grid[2] = grid_dim(B, "batch");
  part.threads[0] = FQ_ATTN_THREADS;
  part.tg_mem_bytes = uint32_t(FQ_DEC_TG_FLOATS(D) * sizeof(float));
  part.bindings = {{0, kDecQ},         {1, kDecKCodes},      {2, kDecKScale},      {3, opt(kDecKZero)},
                   {4, opt(kDecKWindow)}, {5, opt(kDecKSmooth)}, {6, kDecVCodes},  {7, kDecVScale},
                   {8, opt(kDecVZero)},   {9, kDecLength},    {10, opt(kDecMask)}, {11, kOutput + 2},
                   {12, kOutput + 3}};
  part.params_slot = 13;
  part.params = params;

  Launch merge;
  merge.function = "fq_decode_merge";
  merge.constants = {{FQ_FC_HEAD_DIM, int32_t(D)}, {FQ_FC_IO_DTYPE, io_code(q.dtype)}};
  merge.grid[0] = grid_dim(Sq, "queries");
  merge.grid[1] = grid_dim(Hq, "heads");
  merge.grid[2] = grid_dim(B, "batch");
  merge.threads[0] = FQ_DEC_MERGE_THREADS;
  merge.bindings = {{11, kOutput + 2}, {12, kOutput + 3}, {14, kOutput + 0}, {15, kOutput + 1}};
  merge.params_slot = 13;
  merge.params = params;
  plan.launches = {part, merge};
  return plan;
}

}  // namespace fq_mps
