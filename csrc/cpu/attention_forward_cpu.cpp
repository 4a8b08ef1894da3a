// CPU kernel of flash_quant::attention_forward (docs/op_contract.md).
//
// Flash-attention tiling: each task owns one (batch, query head, 64-query tile), keeps
// its output tile O (64 × Dp fp32) and the running max / sum in L1/L2, and streams the
// 64-key tiles of its kv head through QKᵀ -> online softmax -> P·V.
//
// Q·Kᵀ takes one of two paths:
//  * integer (Q and K both int8 or int4): exact int32 dot products with vpdpbusd. With
//    q̃ = q - z_q and k̃ = k - z_k (per-row zero points), and Q fed to the
//    instruction as the unsigned u = q + 128,
//      q̃·k̃ = Σ u·k - 128·Σk - z_k·Σq - z_q·(Σk - D·z_k)
//    so per key we precompute c_j = -128·Σk_j and e_j = D·z_kj - Σk_j, per query
//    a_i = -Σq_i; the score is scale · s_qi · s_kj · (q̃·k̃) in fp32. INT4 is unpacked
//    to int8 once per tile (values -8..7, exact).
//  * fp32 (any other combination, e.g. FP8, or float Q with int8 K): both operands are
//    decoded / dequantized to fp32 rows, and Q·Kᵀ is an fp32 tile product.
// K (in its path's packed layout) and V (dequantized to fp32, (data - z) · scale with a
// per-row or per-channel scale) are prepared once per kv head, then shared by every
// query tile and every query head of the GQA group; each thread keeps only the current kv
// head's, so this memory is per thread, not the size of K and V.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/attention_common.h"
#include "cpu/cpu_common.h"
#include "cpu/kernels_cpu.h"
#include "cpu/operand.h"
#include "cpu/tile_ops.h"

namespace flash_quant {
namespace cpu {
namespace {

// K of one (b, kv head) in the layout its Q·Kᵀ path needs, and V as fp32 rows. Each
// thread holds the panels of the kv head it is working on, not every head's: a copy of
// every head's K and V is as large as K and V (twice for 16-bit inputs).
struct KvPanels {
  bool integer = false;
  std::vector<int8_t> kp;       // integer: [nkb][D/4][kBN][4]
  std::vector<int32_t> col_c, col_zk, col_ek;  // integer: per key, see the file comment
  std::vector<float> col_mul;   // integer: per-key scale s_k (0 for padding keys)
  std::vector<float> kt;        // fp32: [nkb][D][kBN]
  std::vector<float> v;         // [Skv_pad][Dp]
  bool nonfinite = false;       // this kv head's K or V holds an inf / NaN (checked only
                                // for causal calls, the only ones that skip tiles)
};

// Sizes the panels for one kv head.
void size_kv(const AttnDims& d, bool integer, KvPanels& p) {
  p.integer = integer;
  p.v.resize(d.Skv_pad * d.Dp);
  if (integer) {
    p.kp.resize(d.Skv_pad * d.D);
    for (auto* c : {&p.col_c, &p.col_zk, &p.col_ek}) c->resize(d.Skv_pad);
    p.col_mul.resize(d.Skv_pad);
  } else {
    p.kt.resize(d.Skv_pad * d.D);
  }
}

// Fills the panels with kv head bh = b * Hkv + h (padding keys: zero K, V, scale and
// correction terms).
void prepare_kv(const Operand& K, const Operand& V, const AttnDims& d, int64_t bh, bool check_finite,
                KvPanels& p) {
  const int64_t b = bh / d.Hkv, h = bh % d.Hkv;
  pack_rows_f32(V, b, h, d.Skv, d.Skv_pad, d.Dp, p.v.data());
  p.nonfinite = check_finite && !all_finite(p.v.data(), static_cast<int64_t>(p.v.size()));
  if (!p.integer) {  // (integer K is finite by construction)
    pack_transposed_f32(K, b, h, d.Skv, d.Skv_pad, p.kt.data());
    p.nonfinite = p.nonfinite || (check_finite && !all_finite(p.kt.data(), static_cast<int64_t>(p.kt.size())));
    return;
  }
  std::fill(p.kp.begin(), p.kp.end(), int8_t(0));
  for (auto* c : {&p.col_c, &p.col_zk, &p.col_ek}) std::fill(c->begin(), c->end(), 0);
  std::fill(p.col_mul.begin(), p.col_mul.end(), 0.f);
  std::vector<int8_t> row(d.D);
  for (int64_t j = 0; j < d.Skv; ++j) {
    K.load_int(b, h, j, row.data());
    int8_t* tile = p.kp.data() + (j / kBN) * d.D * kBN;
    const int64_t jj = j % kBN;
    int32_t sum = 0;
    for (int64_t t = 0; t < d.D / 4; ++t)
      for (int c = 0; c < 4; ++c) {
        tile[(t * kBN + jj) * 4 + c] = row[4 * t + c];
        sum += row[4 * t + c];
      }
    const int32_t zk = K.row_zero_point(b, h, j);
    p.col_c[j] = -128 * sum;
    p.col_zk[j] = zk;
    p.col_ek[j] = static_cast<int32_t>(d.D) * zk - sum;
    p.col_mul[j] = K.row_scale(b, h, j);
  }
}

// Row `row` of the output, o · inv (zeros when o is null), in the output's dtype: no
// float32 copy of the output for 16-bit inputs.
template <typename T>
void store_row_as(T* dst, const float* o, float inv, int64_t D) {
  for (int64_t c = 0; c < D; ++c) dst[c] = static_cast<T>(o != nullptr ? o[c] * inv : 0.f);
}

void store_row(const at::Tensor& out, int64_t row, const float* o, float inv, int64_t D) {
  switch (out.scalar_type()) {
    case at::kFloat: store_row_as(out.data_ptr<float>() + row * D, o, inv, D); break;
    case at::kHalf: store_row_as(out.data_ptr<c10::Half>() + row * D, o, inv, D); break;
    default: store_row_as(out.data_ptr<c10::BFloat16>() + row * D, o, inv, D); break;
  }
}

// pv_precision != "none": P (≤ 1 after the running max is subtracted) rounded to the
// P·V operand precision. The row sum l keeps the unrounded P. INT8 uses one scale per
// row and key tile, (max of P over the tile) / 127: a fixed 1/127 would round away the
// small probabilities of flat rows (docs/op_contract.md).
// A tile whose largest P is below kMinTileMax (a tile ~83 nats under the row's running
// max) adds nothing representable to O, and its scale tile_max / 127 would be denormal
// or 0 (P / 0 = NaN): its P is 0 after rounding.
constexpr float kMinTileMax = FQ_INT8_QMAX * std::numeric_limits<float>::min();

void round_p(float* P, int rows, PvPrecision pv) {
  const int64_t n = static_cast<int64_t>(rows) * kBN;
  if (pv == PvPrecision::Int8) {
    for (int r = 0; r < rows; ++r) {
      float* row = P + static_cast<int64_t>(r) * kBN;
      float tile_max = 0.f;
      for (int j = 0; j < kBN; ++j) tile_max = max_keep_nan(tile_max, row[j]);  // NaN P stays NaN
      if (tile_max < kMinTileMax) {
        std::fill(row, row + kBN, 0.f);
        continue;
      }
      const float s = tile_max / FQ_INT8_QMAX;
      for (int j = 0; j < kBN; ++j) row[j] = round_half_even(row[j] / s) * s;
    }
  } else if (pv == PvPrecision::FP8E4M3) {
    for (int64_t i = 0; i < n; ++i) P[i] = static_cast<float>(c10::Float8_e4m3fn(P[i]));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& q_data,
    const OptTensor& q_scale, const OptTensor& q_zero_point, const OptTensor& k_data,
    const OptTensor& k_scale, const OptTensor& k_zero_point, const OptTensor& k_mean,
    const OptTensor& v_data, const OptTensor& v_scale, const OptTensor& v_zero_point,
    const OptTensor& attn_mask, bool is_causal, std::optional<double> scale_opt,
    c10::string_view pv_precision) {
  const AttnDims d = check_attention_shapes(q, k, v, "attention_forward");
  const PvPrecision pv = parse_pv_precision(pv_precision);
  const Operand Q = make_operand(q, q_data, q_scale, q_zero_point, "q", /*per_row_scale=*/true);
  const Operand K = make_operand(k, k_data, k_scale, k_zero_point, "k", /*per_row_scale=*/true);
  const Operand V = make_operand(v, v_data, v_scale, v_zero_point, "v", /*per_row_scale=*/false);
  const MaskView mask = make_mask(attn_mask, d.B, d.Hq, d.Sq, d.Skv);
  const at::Tensor kmean = expand_k_mean(k_mean, d);
  const float scale = static_cast<float>(scale_opt.has_value() ? *scale_opt : 1.0 / std::sqrt(double(d.D)));
  const bool integer = Q.integer() && K.integer();
  const TileOps& ops = tile_ops();
  // Causal tiling skips the key tiles after a query tile's last row. That is exact only
  // while every skipped score is finite (or -inf) and every skipped V row finite: SDPA
  // adds its causal -inf (NaN + -inf = NaN) and multiplies masked P = 0 by V (0 · NaN =
  // NaN). A NaN / +inf float-mask entry, or an inf / NaN in the head's K, V or the
  // query tile, turns the skip off for that tile (a rare path: same results, more work).
  const bool mask_poisons = is_causal && mask_has_nan_or_posinf(attn_mask);

  // Output in q's dtype, written once per row (a float32 copy then a cast would double
  // the output's memory for 16-bit inputs).
  at::Tensor out = at::empty({d.B, d.Hq, d.Sq, d.D}, q.options());
  at::Tensor lse = at::empty({d.B, d.Hq, d.Sq}, q.options().dtype(at::kFloat));
  float* lsep = lse.data_ptr<float>();
  const float ninf = -std::numeric_limits<float>::infinity();

  // Tasks in kv-head order: at::parallel_for gives each thread one contiguous range, so a
  // thread meets each kv head's tasks together and builds that head's K / V panels once
  // (a head split between two threads is built by both), then shares them among the
  // head's query tiles and GQA query heads.
  const int64_t tasks_per_head = d.group * d.nqb;
  at::parallel_for(0, d.B * d.Hkv * tasks_per_head, 1, [&](int64_t t0, int64_t t1) {
    KvPanels kv;
    size_kv(d, integer, kv);
    int64_t panels_of = -1;  // the kv head whose panels kv holds
    const int64_t Dp = d.Dp, D = d.D;
    std::vector<float> qf(kBM * Dp, 0.f), S(kBM * kBN), O(kBM * Dp), mrow(kBM), lrow(kBM);
    std::vector<uint8_t> qu(kBM * D);
    std::vector<int8_t> qrow(D);
    std::vector<float> row_mul(kBM);
    std::vector<int32_t> row_a(kBM), row_zq(kBM);
    for (int64_t task = t0; task < t1; ++task) {
      // task = (kv head, query head of its group, query tile)
      const int64_t bh = task / tasks_per_head, qb = task % d.nqb;
      const int64_t b = bh / d.Hkv, hk = bh % d.Hkv;
      const int64_t h = hk * d.group + (task % tasks_per_head) / d.nqb;
      if (bh != panels_of) {
        prepare_kv(K, V, d, bh, /*check_finite=*/is_causal, kv);
        panels_of = bh;
      }
      const int64_t i0 = qb * kBM;
      const int m = static_cast<int>(std::min<int64_t>(kBM, d.Sq - i0));

      // Load the query tile in the form its path needs (fp32 rows are also needed for
      // the k_mean correction of lse).
      bool zero_points = false;
      for (int r = 0; r < m; ++r) {
        if (integer) {
          Q.load_int(b, h, i0 + r, qrow.data());
          int32_t sum = 0;
          for (int64_t c = 0; c < D; ++c) {
            qu[r * D + c] = static_cast<uint8_t>(qrow[c] + 128);
            sum += qrow[c];
          }
          row_a[r] = -sum;
          row_zq[r] = Q.row_zero_point(b, h, i0 + r);
          row_mul[r] = scale * Q.row_scale(b, h, i0 + r);
        }
        if (!integer || kmean.defined()) Q.load_f32(b, h, i0 + r, qf.data() + r * Dp);
      }
      if (integer) zero_points = Q.zp != nullptr || K.zp != nullptr;
      const bool every_key =
          is_causal && (mask_poisons || kv.nonfinite || (!integer && !all_finite(qf.data(), m * Dp)));
      IntScoreParams ip{row_mul.data(), row_a.data(), row_zq.data(), nullptr, nullptr, nullptr, nullptr,
                        zero_points};

      std::fill(O.begin(), O.end(), 0.f);
      std::fill(mrow.begin(), mrow.end(), ninf);
      std::fill(lrow.begin(), lrow.end(), 0.f);
      // Causal: key tiles past the last query row of this tile are never visible.
      const int64_t kb_end =
          is_causal && !every_key ? std::min<int64_t>(d.nkb, (i0 + m - 1) / kBN + 1) : d.nkb;
      for (int64_t kb = 0; kb < kb_end; ++kb) {
        const int64_t j0 = kb * kBN;
        if (integer) {
          ip.col_mul = kv.col_mul.data() + j0;
          ip.col_c = kv.col_c.data() + j0;
          ip.col_zk = kv.col_zk.data() + j0;
          ip.col_ek = kv.col_ek.data() + j0;
          ops.qk_int8_scores(qu.data(), D, m, static_cast<int>(D), kv.kp.data() + kb * D * kBN, ip, S.data());
        } else {
          ops.gemm_f32(qf.data(), Dp, kv.kt.data() + kb * D * kBN, kBN, S.data(), kBN, m, kBN,
                       static_cast<int>(D), scale, false);
        }
        mask.apply(b, h, i0, m, j0, static_cast<int>(std::min<int64_t>(kBN, d.Skv - j0)), S.data());
        if (j0 + kBN > d.Skv || (is_causal && j0 + kBN - 1 > i0))
          mask_bounds_and_causal(S.data(), m, i0, j0, d.Skv, is_causal);
        ops.softmax_update(S.data(), m, mrow.data(), lrow.data(), O.data(), Dp, static_cast<int>(Dp));
        round_p(S.data(), m, pv);
        ops.gemm_f32(S.data(), kBN, kv.v.data() + j0 * Dp, Dp, O.data(), Dp, m,
                     static_cast<int>(Dp), kBN, 1.f, true);
      }

      for (int r = 0; r < m; ++r) {
        const int64_t row = (b * d.Hq + h) * d.Sq + i0 + r;
        if (mrow[r] == ninf) {  // no visible key: P = 0, so O holds 0 · V: zeros, or NaN
          // where a V row is inf / NaN (as SDPA's P @ V)
          store_row(out, row, O.data() + r * Dp, 1.f, D);
          lsep[row] = ninf;
          continue;
        }
        store_row(out, row, O.data() + r * Dp, 1.f / lrow[r], D);
        double l = double(mrow[r]) + std::log(double(lrow[r]));
        if (kmean.defined()) {
          // lse of the unsmoothed scores: + scale · q_i · k_mean.
          const float* km = kmean.data_ptr<float>();
          const int64_t off = b * kmean.stride(0) + hk * kmean.stride(1);
          double dot = 0.0;
          for (int64_t c = 0; c < D; ++c) dot += double(qf[r * Dp + c]) * km[off + c * kmean.stride(3)];
          l += double(scale) * dot;
        }
        lsep[row] = static_cast<float>(l);
      }
    }
  });
  return {out, lse};
}

}  // namespace cpu
}  // namespace flash_quant
