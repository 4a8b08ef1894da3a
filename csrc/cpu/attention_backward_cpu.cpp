// CPU kernel of flash_quant::attention_backward (docs/op_contract.md).
//
// Straight-through gradients: every operand is dequantized to fp32 once (Q, dO as rows;
// K as rows and per-tile transposed; V per-tile transposed), P is recomputed from the
// saved lse, and two deterministic passes (no atomics) produce the gradients:
//  1. one task per (batch, kv head, 64-key tile) owns that tile of dK and dV and loops
//     over every query tile of every query head of its GQA group:
//       dV += Pᵀ·dO,  dK += scale · dSᵀ·Q
//  2. one task per (batch, query head, 64-query tile) owns that tile of dQ:
//       dQ += scale · dS·K
// with dP = dO·Vᵀ and dS = P ∘ (dP - delta), delta_i = Σ_d dO_id · O_id.
// P·V's pv_precision does not enter: the gradient is that of the unrounded P.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

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

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const OptTensor& q_data, const OptTensor& q_scale,
    const OptTensor& q_zero_point, const OptTensor& k_data, const OptTensor& k_scale,
    const OptTensor& k_zero_point, const OptTensor& k_mean, const OptTensor& v_data,
    const OptTensor& v_scale, const OptTensor& v_zero_point, const OptTensor& attn_mask,
    bool is_causal, std::optional<double> scale_opt, c10::string_view pv_precision) {
  const AttnDims d = check_attention_shapes(q, k, v, "attention_backward");
  parse_pv_precision(pv_precision);  // validated; the gradient does not depend on it
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "attention_backward: grad_out must have q's shape ",
              q.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), "attention_backward: out must have q's shape ", q.sizes(),
              ", got ", out.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == d.B && lse.size(1) == d.Hq && lse.size(2) == d.Sq,
              "attention_backward: lse must be (B, Hq, Sq) = (", d.B, ", ", d.Hq, ", ", d.Sq, "), got ",
              lse.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "attention_backward: lse must be float32, got ",
              lse.scalar_type());
  const Operand Q = make_operand(q, q_data, q_scale, q_zero_point, "q", true);
  const Operand K = make_operand(k, k_data, k_scale, k_zero_point, "k", true);
  const Operand V = make_operand(v, v_data, v_scale, v_zero_point, "v", false);
  const Operand dO = make_operand(grad_out, std::nullopt, std::nullopt, std::nullopt, "grad_out", true);
  const Operand Ov = make_operand(out, std::nullopt, std::nullopt, std::nullopt, "out", true);
  const MaskView mask = make_mask(attn_mask, d.B, d.Hq, d.Sq, d.Skv);
  const at::Tensor kmean = expand_k_mean(k_mean, d);
  const float scale = static_cast<float>(scale_opt.has_value() ? *scale_opt : 1.0 / std::sqrt(double(d.D)));
  const TileOps& ops = tile_ops();
  const int64_t D = d.D, Dp = d.Dp;
  const int64_t Sq_pad = d.nqb * kBM;
  const float ninf = -std::numeric_limits<float>::infinity();

  // ---- fp32 panels --------------------------------------------------------------------
  const int64_t qheads = d.B * d.Hq, kvheads = d.B * d.Hkv;
  std::vector<float> qf(qheads * Sq_pad * Dp), dof(qheads * Sq_pad * Dp);
  std::vector<float> delta(qheads * d.Sq), lse2(qheads * d.Sq);
  std::vector<float> kf(kvheads * d.Skv_pad * Dp), kt(kvheads * d.Skv_pad * D), vt(kvheads * d.Skv_pad * D);
  // inf / NaN anywhere in a query head's Q, dO, O or lse, or in a kv head's K, V: the
  // tile skips (causal tiles, tiles without a visible key) are then off for that GQA
  // group, since SDPA's gradient there is 0 · NaN = NaN, not 0 (see the forward). Only
  // causal or masked calls skip tiles, so only they look.
  const bool check_finite = is_causal || attn_mask.has_value();
  std::vector<uint8_t> q_nonfinite(qheads, 0), kv_nonfinite(kvheads, 0);
  const bool mask_poisons = is_causal && mask_has_nan_or_posinf(attn_mask);
  const at::Tensor lse_c = lse.contiguous();
  const float* lsep = lse_c.data_ptr<float>();
  at::parallel_for(0, qheads, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> orow(D);
    for (int64_t bh = h0; bh < h1; ++bh) {
      const int64_t b = bh / d.Hq, h = bh % d.Hq, hk = h / d.group;
      float* qrows = qf.data() + bh * Sq_pad * Dp;
      float* dorows = dof.data() + bh * Sq_pad * Dp;
      pack_rows_f32(Q, b, h, d.Sq, Sq_pad, Dp, qrows);
      pack_rows_f32(dO, b, h, d.Sq, Sq_pad, Dp, dorows);
      bool bad = check_finite && (!all_finite(qrows, Sq_pad * Dp) || !all_finite(dorows, Sq_pad * Dp));
      for (int64_t i = 0; i < d.Sq; ++i) {
        Ov.load_f32(b, h, i, orow.data());
        bad = bad || (check_finite && (!all_finite(orow.data(), D) || std::isnan(lsep[bh * d.Sq + i])));
        double acc = 0.0;
        for (int64_t c = 0; c < D; ++c) acc += double(dorows[i * Dp + c]) * orow[c];
        delta[bh * d.Sq + i] = static_cast<float>(acc);
        // The scores are those of the smoothed K: undo lse's k_mean term.
        double l = lsep[bh * d.Sq + i];
        if (kmean.defined() && std::isfinite(l)) {
          const float* km = kmean.data_ptr<float>();
          const int64_t off = b * kmean.stride(0) + hk * kmean.stride(1);
          double dot = 0.0;
          for (int64_t c = 0; c < D; ++c) dot += double(qrows[i * Dp + c]) * km[off + c * kmean.stride(3)];
          l -= double(scale) * dot;
        }
        lse2[bh * d.Sq + i] = static_cast<float>(l);
      }
      q_nonfinite[bh] = bad;
    }
  });
  at::parallel_for(0, kvheads, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t bh = h0; bh < h1; ++bh) {
      const int64_t b = bh / d.Hkv, h = bh % d.Hkv;
      pack_rows_f32(K, b, h, d.Skv, d.Skv_pad, Dp, kf.data() + bh * d.Skv_pad * Dp);
      pack_transposed_f32(K, b, h, d.Skv, d.Skv_pad, kt.data() + bh * d.Skv_pad * D);
      pack_transposed_f32(V, b, h, d.Skv, d.Skv_pad, vt.data() + bh * d.Skv_pad * D);
      kv_nonfinite[bh] = check_finite && (!all_finite(kf.data() + bh * d.Skv_pad * Dp, d.Skv_pad * Dp) ||
                                          !all_finite(vt.data() + bh * d.Skv_pad * D, d.Skv_pad * D));
    }
  });
  // Per (b, kv head): whether its GQA group must visit every tile.
  std::vector<uint8_t> every_tile(kvheads, 0);
  for (int64_t bhk = 0; bhk < kvheads; ++bhk) {
    bool bad = mask_poisons || kv_nonfinite[bhk];
    const int64_t b = bhk / d.Hkv, hk = bhk % d.Hkv;
    for (int64_t h = hk * d.group; h < (hk + 1) * d.group; ++h) bad = bad || q_nonfinite[b * d.Hq + h];
    every_tile[bhk] = bad;
  }

  // P and dS of the tile (query rows i0.., key tile kb) of query head (b, h): S and dP
  // are kBN wide; returns false when no row has a visible key (nothing to add), unless
  // the group has a non-finite value (then P = 0 rows still give dS = 0 · NaN = NaN).
  auto p_and_ds = [&](int64_t b, int64_t h, int64_t i0, int m, int64_t kb, float* P, float* dS) {
    const int64_t bhq = b * d.Hq + h, bhk = b * d.Hkv + h / d.group, j0 = kb * kBN;
    const float* qrows = qf.data() + (bhq * Sq_pad + i0) * Dp;
    const float* dorows = dof.data() + (bhq * Sq_pad + i0) * Dp;
    ops.gemm_f32(qrows, Dp, kt.data() + bhk * d.Skv_pad * D + kb * D * kBN, kBN, P, kBN, m, kBN,
                 static_cast<int>(D), scale, false);
    mask.apply(b, h, i0, m, j0, static_cast<int>(std::min<int64_t>(kBN, d.Skv - j0)), P);
    if (j0 + kBN > d.Skv || (is_causal && j0 + kBN - 1 > i0))
      mask_bounds_and_causal(P, m, i0, j0, d.Skv, is_causal);
    bool any = every_tile[bhk];
    for (int r = 0; r < m; ++r) {
      const float l = lse2[bhq * d.Sq + i0 + r];
      float* p = P + r * kBN;
      if (l == ninf) {  // fully masked row: contributes nothing
        for (int j = 0; j < kBN; ++j) p[j] = ninf;
        continue;
      }
      any = true;
      for (int j = 0; j < kBN; ++j) p[j] -= l;
    }
    if (!any) return false;
    ops.exp_inplace(P, static_cast<int64_t>(m) * kBN);
    ops.gemm_f32(dorows, Dp, vt.data() + bhk * d.Skv_pad * D + kb * D * kBN, kBN, dS, kBN, m, kBN,
                 static_cast<int>(D), 1.f, false);
    for (int r = 0; r < m; ++r) {
      const float dl = delta[bhq * d.Sq + i0 + r];
      for (int j = 0; j < kBN; ++j) dS[r * kBN + j] = P[r * kBN + j] * (dS[r * kBN + j] - dl);
    }
    return true;
  };

  at::Tensor dq32 = at::empty({d.B, d.Hq, d.Sq, D}, q.options().dtype(at::kFloat));
  at::Tensor dk32 = at::empty({d.B, d.Hkv, d.Skv, D}, q.options().dtype(at::kFloat));
  at::Tensor dv32 = at::empty({d.B, d.Hkv, d.Skv, D}, q.options().dtype(at::kFloat));
  float* dqp = dq32.data_ptr<float>();
  float* dkp = dk32.data_ptr<float>();
  float* dvp = dv32.data_ptr<float>();

  // ---- pass 1: dK, dV per key tile ----------------------------------------------------
  at::parallel_for(0, kvheads * d.nkb, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> P(kBM * kBN), dS(kBM * kBN), T(kBN * kBM), dK(kBN * Dp), dV(kBN * Dp);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t kb = task % d.nkb, bhk = task / d.nkb, b = bhk / d.Hkv, hk = bhk % d.Hkv;
      const int64_t j0 = kb * kBN;
      std::fill(dK.begin(), dK.end(), 0.f);
      std::fill(dV.begin(), dV.end(), 0.f);
      // Causal: query tiles that end before this key tile starts see none of its keys.
      const int64_t qb_begin = is_causal && !every_tile[bhk] ? j0 / kBM : 0;
      for (int64_t h = hk * d.group; h < (hk + 1) * d.group; ++h) {
        const int64_t bhq = b * d.Hq + h;
        for (int64_t qb = qb_begin; qb < d.nqb; ++qb) {
          const int64_t i0 = qb * kBM;
          const int m = static_cast<int>(std::min<int64_t>(kBM, d.Sq - i0));
          if (!p_and_ds(b, h, i0, m, kb, P.data(), dS.data())) continue;
          const float* qrows = qf.data() + (bhq * Sq_pad + i0) * Dp;
          const float* dorows = dof.data() + (bhq * Sq_pad + i0) * Dp;
          for (int r = 0; r < m; ++r)
            for (int j = 0; j < kBN; ++j) T[j * kBM + r] = P[r * kBN + j];
          ops.gemm_f32(T.data(), kBM, dorows, Dp, dV.data(), Dp, kBN, static_cast<int>(Dp), m, 1.f, true);
          for (int r = 0; r < m; ++r)
            for (int j = 0; j < kBN; ++j) T[j * kBM + r] = dS[r * kBN + j];
          ops.gemm_f32(T.data(), kBM, qrows, Dp, dK.data(), Dp, kBN, static_cast<int>(Dp), m, scale, true);
        }
      }
      const int64_t valid = std::min<int64_t>(kBN, d.Skv - j0);
      for (int64_t j = 0; j < valid; ++j) {
        const int64_t row = bhk * d.Skv + j0 + j;
        std::copy(dK.data() + j * Dp, dK.data() + j * Dp + D, dkp + row * D);
        std::copy(dV.data() + j * Dp, dV.data() + j * Dp + D, dvp + row * D);
      }
    }
  });

  // ---- pass 2: dQ per query tile -------------------------------------------------------
  at::parallel_for(0, qheads * d.nqb, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> P(kBM * kBN), dS(kBM * kBN), dQ(kBM * Dp);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t qb = task % d.nqb, bhq = task / d.nqb, b = bhq / d.Hq, h = bhq % d.Hq;
      const int64_t bhk = b * d.Hkv + h / d.group, i0 = qb * kBM;
      const int m = static_cast<int>(std::min<int64_t>(kBM, d.Sq - i0));
      std::fill(dQ.begin(), dQ.end(), 0.f);
      const int64_t kb_end =
          is_causal && !every_tile[bhk] ? std::min<int64_t>(d.nkb, (i0 + m - 1) / kBN + 1) : d.nkb;
      for (int64_t kb = 0; kb < kb_end; ++kb) {
        if (!p_and_ds(b, h, i0, m, kb, P.data(), dS.data())) continue;
        ops.gemm_f32(dS.data(), kBN, kf.data() + (bhk * d.Skv_pad + kb * kBN) * Dp, Dp, dQ.data(), Dp, m,
                     static_cast<int>(Dp), kBN, scale, true);
      }
      for (int r = 0; r < m; ++r)
        std::copy(dQ.data() + r * Dp, dQ.data() + r * Dp + D, dqp + ((bhq * d.Sq) + i0 + r) * D);
    }
  });

  auto cast = [](const at::Tensor& t, at::ScalarType dt) { return dt == at::kFloat ? t : t.to(dt); };
  return {cast(dq32, q.scalar_type()), cast(dk32, k.scalar_type()), cast(dv32, v.scalar_type())};
}

}  // namespace cpu
}  // namespace flash_quant
