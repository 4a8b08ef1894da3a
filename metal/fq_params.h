// Argument blocks shared, byte for byte, by the Metal kernels (metal/*.metal) and the host
// code that fills them (csrc/mps/host_logic.cpp). The host passes one of these with
// setBytes into the kernel's `constant ...& p [[buffer(N)]]` argument.
//
// Layout rule: 64-bit fields first, then 32-bit ones, so that the Metal compiler and the
// host C++ compiler agree on every offset without packing pragmas (static_asserts in
// host_logic.cpp pin the sizes).
#pragma once

// FQ_MIN_HEAD_DIM / FQ_MAX_HEAD_DIM / FQ_HEAD_DIM_MULTIPLE: the head-dim limits, shared
// with the CPU kernels and Python (flash_quant/support.py).
#include "../csrc/support.h"

#ifdef __METAL_VERSION__
typedef long fq_i64;
typedef int fq_i32;
#else
#include <cstdint>
typedef int64_t fq_i64;
typedef int32_t fq_i32;
#endif

// Element type codes: the io dtype of q/k/v/out, the precision of a bound operand
// (FQ_I4 = two signed nibbles per byte, low nibble first) and mask / scale dtypes.
#define FQ_F32 0
#define FQ_F16 1
#define FQ_BF16 2
#define FQ_I8 3
#define FQ_I4 4
#define FQ_E4M3 5
#define FQ_E5M2 6
#define FQ_BOOL 7
// Decode cache INT4 codes (flash_quant/kv_cache.py): two UNSIGNED nibbles per byte,
// "half-split": byte i of a token's row holds channel i (low) and channel i + D/2 (high).
#define FQ_U4_SPLIT 8
#define FQ_NONE (-1)

// P precision in P·V.
#define FQ_PV_NONE 0
#define FQ_PV_INT8 1
#define FQ_PV_E4M3 2

// Function-constant indices (pipelines are specialised and cached on these).
#define FQ_FC_HEAD_DIM 0
#define FQ_FC_IO_DTYPE 1
#define FQ_FC_Q_MODE 2
#define FQ_FC_K_MODE 3
#define FQ_FC_V_MODE 4
#define FQ_FC_PV_MODE 5
#define FQ_FC_MASK_MODE 6
#define FQ_FC_CAUSAL 7
#define FQ_FC_BLOCK_K 8
#define FQ_FC_QUANT_PRECISION 9
#define FQ_FC_QUANT_ASYMMETRIC 10
#define FQ_FC_DEC_SCALE_DTYPE 11

// Threads per threadgroup of the attention kernels: four simdgroups. Each simdgroup owns
// 8 query rows (forward, dQ) or 8 keys (dK/dV), so a block is 32 rows.
#define FQ_ATTN_THREADS 128
#define FQ_ATTN_SIMDGROUPS 4
// Columns of the head dim staged into threadgroup memory at a time. Staging in chunks
// keeps threadgroup memory independent of the head dim (up to FQ_MAX_HEAD_DIM).
#define FQ_CHUNK 64
#define FQ_MAX_BLOCK_K 64
#define FQ_BLOCK_Q 32

// Threadgroup memory of the forward kernel, in floats: the staging chunk (32 query rows
// or bk key rows of FQ_CHUNK columns), the score/P tile (32 x bk), the query and key row
// scales, the running max and sum per query row, one 8x8 diagonal per simdgroup and one
// flag (a staged V value was inf / NaN).
#define FQ_FWD_CHUNK_ROWS(bk) ((bk) > FQ_BLOCK_Q ? (bk) : FQ_BLOCK_Q)
#define FQ_FWD_TG_FLOATS(bk) \
  (FQ_FWD_CHUNK_ROWS(bk) * FQ_CHUNK + FQ_BLOCK_Q * (bk) + 3 * FQ_BLOCK_Q + FQ_MAX_BLOCK_K + FQ_ATTN_SIMDGROUPS * 64 + 1)

// Backward (dQ and dK/dV kernels): blocks of 32 queries and 32 keys; two staging chunks
// (32 x FQ_CHUNK), two 32 x 32 tiles and four per-row vectors of 32. 25 KiB.
#define FQ_BWD_BLOCK 32
#define FQ_BWD_TG_FLOATS (2 * FQ_BWD_BLOCK * FQ_CHUNK + 2 * FQ_BWD_BLOCK * FQ_BWD_BLOCK + 4 * FQ_BWD_BLOCK)

// Quantize kernels: threads per threadgroup.
#define FQ_QUANT_THREADS 256

// Attention forward and backward. Strides are in elements of the bound buffer (for
// packed INT4 data: bytes, over the packed last dim), already broadcast (0 on a
// broadcast dim), in (B, H, S, D) order.
struct FqAttnParams {
  fq_i64 q_str[4], k_str[4], v_str[4];     // operand data (quantized or floating)
  fq_i64 qs_str[4], ks_str[4], vs_str[4];  // scales
  fq_i64 qz_str[4], kz_str[4], vz_str[4];  // zero points
  fq_i64 km_str[4];                        // k_mean (B, Hkv, 1, D)
  fq_i64 mask_str[4];                      // attn_mask broadcast to (B, Hq, Sq, Skv)
  fq_i64 o_str[4];                         // forward out / backward saved out
  fq_i64 do_str[4];                        // backward grad_out
  fq_i32 B, Hq, Hkv, Sq, Skv, D;
  fq_i32 has_qz, has_kz, has_vz, has_kmean;
  float scale;
  // 1: causal, with an inf / NaN in Q, K or V or a NaN / +inf in a float mask (set by
  // the host): visit every key / query block, since skipping is exact only for finite
  // inputs (SDPA adds the causal -inf, NaN stays NaN; P = 0 meets every V row: 0 * NaN)
  fq_i32 every_key;
};

// Quantize / dequantize on the logical view (L, S, D): L = product of the leading dims.
// A group is the box [l0, l0+gl) x [s0, s0+gs) x [d0, d0+gd) with
// (l0, s0, d0) = (gi_l*gl, gi_s*gs, gi_d*gd); groups are numbered
// ((gi_l * n_gs) + gi_s) * n_gd + gi_d, which is also the scale's flat layout.
struct FqQuantParams {
  fq_i64 lead_size[4];     // leading dims of x, padded with 1 at the front
  fq_i64 scale_lead_str[4];  // dequantize: scale/zp strides over the leading dims
  fq_i64 mean_lead_str[4];   // dequantize: mean strides over the leading dims
  fq_i64 scale_row_str, scale_col_str;  // dequantize: stride of a scale group row / column
  fq_i64 mean_col_str;
  fq_i32 L, S, D;
  fq_i32 gl, gs, gd;        // group box extents
  fq_i32 n_gs, n_gd;        // groups along S and D
  fq_i32 block_rows;        // dequantize: rows per scale group along S (1 = per row)
  fq_i32 has_zp, has_mean;
  fq_i32 out_dtype;         // dequantize output dtype
};

// Decode over a quantized KV cache (metal/decode.metal). A threadgroup of the partial
// kernel takes FQ_DEC_ROWS query rows (GQA heads x queries, packed) against
// FQ_DEC_BLOCK_K keys at a time (one 8-key slice per simdgroup); the merge kernel is one
// simdgroup per query row.
#define FQ_DEC_ROWS 8
#define FQ_DEC_BLOCK_K (8 * FQ_ATTN_SIMDGROUPS)
#define FQ_DEC_MERGE_THREADS 32
// Query rows (Hq / Hkv heads x Sq queries) of one decode call at most: Sq <= 16.
#define FQ_DEC_MAX_SQ 16
// Split-count choice (csrc/mps/host_logic.cpp, decode_num_splits). Not tuned on a Mac (none
// was available): a few threadgroups per GPU core of the larger Apple GPUs (38-40 cores),
// and splits long enough that a split's fixed cost (Q staging, the merge) stays small.
#define FQ_DEC_TARGET_THREADGROUPS 128
#define FQ_DEC_MIN_SPLIT_KEYS 256
// Threadgroup memory of fq_decode_partial, in floats: the staging chunk, the score / P
// tile, running max, sum and rescale factor per row, and the O accumulator (rows x D).
#define FQ_DEC_TG_FLOATS(d) (FQ_DEC_BLOCK_K * FQ_CHUNK + FQ_DEC_ROWS * FQ_DEC_BLOCK_K + 3 * FQ_DEC_ROWS + FQ_DEC_ROWS * (d))

// Where one cache operand's buffers are, in elements of each buffer, (B, Hkv, token,
// channel) order, 0 on a broadcast dim: the codes (INT4: bytes over the packed last dim),
// the scale and offset of a group (indexed by (token / group_rows, channel / group_cols)),
// the 16-bit window (its token 0 is the first token past the coded ones) and, K only, the
// smoothing divisors (B, Hkv, 1, D; the kernel multiplies q by them: q . k =
// (q * smooth) . (k / smooth)).
struct FqDecCacheStrides {
  fq_i64 code[4], scale[4], offset[4], window[4], smooth[4];
};

struct FqDecodeParams {
  FqDecCacheStrides k, v;
  fq_i64 q_str[4];     // q (B, Hq, Sq, D)
  fq_i64 o_str[4];     // out (B, Hq, Sq, D)
  fq_i64 mask_str[4];  // attn_mask broadcast to (B, Hq, Sq, keys)
  fq_i32 B, Hq, Hkv, Sq, D;
  fq_i32 capacity;     // tokens the cache can hold: the device-side length is clamped to it
  // Tokens [0, (length / m) * m) are codes, the rest the window (m = 1: every token coded;
  // int4 K: m = k_group, a group is quantized once complete).
  fq_i32 k_coded_multiple, v_coded_multiple;
  fq_i32 rows;         // (Hq / Hkv) * Sq query rows per KV head
  fq_i32 row_blocks;   // ceil(rows / FQ_DEC_ROWS)
  fq_i32 split_len, n_splits;  // split s holds keys [s * split_len, (s + 1) * split_len)
  fq_i32 k_group_rows, k_group_cols, v_group_rows, v_group_cols;
  fq_i32 has_k_offset, has_v_offset, has_k_smooth;
  fq_i32 window_dtype;  // FQ_F32 / FQ_F16 / FQ_BF16
  float scale;
  fq_i32 pad;  // keeps the size a multiple of 8 under every compiler
};
