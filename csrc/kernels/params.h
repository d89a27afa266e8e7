// Plain parameter structs shared by host launchers and device kernels (no torch headers here).
#pragma once

#include <cstdint>

namespace psa::kernels {

// Mean pooling of K and V into levels 2, 4, 8 (docs/spec.md section 2).
struct PyramidParams {
  const void* k;         // [B, H, L, D], last dim contiguous
  const void* v;         // [B, H, L, D], last dim contiguous
  int64_t k_stride[3];   // batch, head, token strides of k, in elements
  int64_t v_stride[3];
  void* k_out[3];        // levels 2, 4, 8: contiguous [B, H, ceil(L/l), D]
  void* v_out[3];
  int batch, heads, length, head_dim;
};

// The backward of kv_pyramid: each pooled token's gradient, divided by the tokens it averages, spread back.
struct PyramidBackwardParams {
  const void* d_keys[3];    // gradients of k2, k4, k8: contiguous [B, H, ceil(L/l), D]
  const void* d_values[3];  // of v2, v4, v8
  void* dk;                 // [B, H, L, D], contiguous
  void* dv;
  int batch, heads, length, head_dim;
};

}  // namespace psa::kernels

namespace psa::kernels {

constexpr int kNumLevels = 4;  // pooling factors 1, 2, 4, 8 = 1 << level index

// Attention over a level map (docs/spec.md section 3).
struct AttentionParams {
  const void* q;                      // [B, Hq, Lq, D]
  const void* k[kNumLevels];          // level index L: [B, Hkv, ceil(Lk / 2^L), D]
  const void* v[kNumLevels];
  int64_t q_stride[3];                // batch, head, token strides in elements (token stride % 8 == 0)
  int64_t k_stride[kNumLevels][3];
  int64_t v_stride[kNumLevels][3];
  const int8_t* levels;               // [B, Hq, n_q, n_k], contiguous
  void* out;                          // [B, Hq, Lq, D], contiguous
  float* lse;                         // [B, Hq, Lq], contiguous
  int batch, q_heads, kv_heads, q_len, k_len;
  int block_n, n_q, n_k;
  float scale_log2;                   // softmax scale * log2(e)
  bool causal;
};

// The backward of attention over a level map (docs/spec.md section 7): `base` as the forward got it
// (its out and lse fields unused), plus the forward's lse, the output gradient and the gradients.
struct AttentionBackwardParams {
  AttentionParams base;
  const void* grad_out;               // [B, Hq, Lq, D], contiguous
  const float* lse;                   // [B, Hq, Lq], the forward's (natural log; -inf for rows that saw nothing)
  const float* delta;                 // [B, Hq, Lq]: rowsum(dO * O) - dlse
  void* dq;                           // [B, Hq, Lq, D], contiguous
  void* dk[kNumLevels];               // level L: [B, Hkv, ceil(Lk / 2^L), D], contiguous
  void* dv[kNumLevels];
  float scale;                        // the softmax scale (natural units)
  int block_m;
  int level;                          // the key-major kernel's launch: which level's gradients (0..3)
};

// delta = rowsum(dO * O) - dlse, the per-row term of dS = P (dP - delta), before the backward kernels.
struct AttentionBackwardDeltaParams {
  const void* grad_out;               // [rows, D] contiguous, or null (no gradient reached out)
  const void* out;                    // [rows, D] contiguous, the forward's out
  const float* grad_lse;              // [rows], or null (no gradient reached lse)
  float* delta;                       // [rows]
  int64_t rows;                       // B * Hq * Lq
  int head_dim;                       // 64 or 128
};

// The fused sampled estimator (docs/spec.md section 4, "sampled").
struct SampledParams {
  const void* q;                      // [B, Hq, Lq, D]
  const void* k;                      // [B, Hkv, Lk, D]
  int64_t q_stride[3];
  int64_t k_stride[3];
  const int64_t* q_offsets;           // [q_samples], offsets into a query block; null: the default offsets
  const int64_t* k_offsets;           // [k_samples], offsets into a key block; null: the default offsets
  float* scores;                      // [B, Hq, n_q, n_k], contiguous
  float* table;                       // scratch: per CTA, [n_k][rows] block maxima
  // The sm90 kernel takes its table by slot (table_slots.cuh): table_slots tables of [n_k][rows] floats,
  // table_slot_busy ([table_slots], zeroed) marks those held; the sm80 kernel by CTA index in the launch.
  unsigned* table_slot_busy;
  int table_slots;
  // The sm90 path reads the sampled rows as "compact rows": row block * samples + s is the block's s-th
  // sampled token. With the default offsets (docs/spec.md section 4: every default_step-th token from
  // token default_step / 2) compact row r is token default_step * r + default_step / 2 while that token is
  // in range, so compact rows [0, x_rows_begin) are read from q / k in place through a strided TMA map; the
  // rest (the last, partial block's clamped rows; all rows for other offsets, x_rows_begin = 0) are copied
  // by gather_sampled_rows into x_rows, whose row 0 is compact row x_rows_begin. Both begins are multiples
  // of the kernel's box heights (query rows per CTA, keys per tile).
  int default_step;
  int q_rows_begin, k_rows_begin;
  void* q_rows;                       // [B, Hq, n_q * q_samples - q_rows_begin, D], contiguous
  void* k_rows;                       // [B, Hkv, n_k * k_samples - k_rows_begin, D], contiguous
  int bh_begin, bh_count;             // the (batch * head) range of this launch
  int batch, q_heads, kv_heads, q_len, k_len;
  int block_m, block_n, n_q, n_k;
  int q_samples, k_samples;           // 8, 16 or 32 each
  float scale_log2;
  bool causal;
};

// The fused antidiagonal estimator (docs/spec.md section 4, "antidiagonal"; estimate_antidiagonal.cuh).
struct AntidiagonalParams {
  const void* q;                      // [B, Hq, Lq, D]
  const void* k;                      // [B, Hkv, Lk, D]
  int64_t q_stride[3];
  int64_t k_stride[3];
  float* scores;                      // [B, Hq, n_q, n_k], contiguous
  float* table;                       // scratch: per CTA, [k_groups][rows] sums, then [n_tiles][rows] maxima
  int bh_begin, bh_count;             // the (batch * head) range of this launch
  int batch, q_heads, kv_heads, q_len, k_len;
  int block_m, block_n, n_q, n_k;
  int stride;                         // S: anti-rows and anti-columns cover S tokens
  int q_tiles, k_tiles;               // ceil(Lq / S), ceil(Lk / S)
  float scale_log2;                   // scale * log2(e) / S: anti-logits in the exp2 domain
  bool causal;
  // FP8 scoring (docs/spec.md section 4), Hopper kernel only: q and k are then the quantized anti-rows
  // [B, Hq, q_tiles, S*D] and anti-columns [B, Hkv, k_tiles, S*D] (e4m3 bytes, contiguous) that
  // launch_quantize_anti_rows writes, and these their groups' scales, [B * Hq][q_tiles] and
  // [B * Hkv][k_scale_stride] (k's rows padded with 1 to whole 256-column tiles); null at full precision.
  const float* q_scales;
  const float* k_scales;
  int k_scale_stride;
};

// FP8 scoring's quantization (docs/spec.md section 4), one launch for Q and K: every group of S tokens
// of an operand's x [B, H, L, D] becomes one row of S * D e4m3 bytes of its out [B, H, groups, S * D]
// (contiguous), its tokens in order, or reversed for queries (an anti-row then lies in memory as the
// anti-logits' GEMM reads it), and its float32 scale scales[b * H + h][group]; groups in
// [ceil(L / S), scale_stride) get scale 1 and no row.
struct QuantizeAntiRowsOperand {
  const void* x;
  int64_t x_stride[3];
  uint8_t* out;
  float* scales;
  int heads, length, scale_stride;
  bool reverse_tokens;
};
struct QuantizeAntiRowsParams {
  QuantizeAntiRowsOperand operands[2];  // blockIdx.y: 0 the queries, 1 the keys
  int batch, head_dim, stride;
};

// The pooled estimator (docs/spec.md section 4, "pooled").
struct PooledParams {
  const void* q;                      // [B, Hq, Lq, D]
  const void* k;                      // [B, Hkv, Lk, D]
  const void* k8;                     // [B, Hkv, ceil(Lk/8), D]: the pyramid's level-8 keys, or null (pool k)
  int64_t q_stride[3];
  int64_t k_stride[3];
  int64_t k8_stride[3];
  float* k_means;                     // scratch [B, Hkv, n_k, D]
  float* scores;                      // [B, Hq, n_q, n_k], contiguous
  int batch, q_heads, kv_heads, q_len, k_len;
  int block_m, block_n, n_q, n_k;
  float scale_log2;
  bool causal;
};

// Per-row ranking and level choice (docs/spec.md section 5).
struct AssignParams {
  const void* scores;                 // float or double [B, Hq, n_q, n_k], contiguous
  const bool* force_key_blocks;       // [B, n_k], or null: none forced
  const bool* force_query_blocks;     // [B, n_q], or null: none forced
  const int64_t* cap;                 // [B, Hkv_cap, n_k] or nullptr
  int8_t* levels;                     // [B, Hq, n_q, n_k], contiguous
  double bounds[4];
  double min_full;
  int batch, q_heads, cap_heads, q_len, k_len;
  int block_m, block_n, n_q, n_k;
  bool threshold_mode, causal, sink;
};

}  // namespace psa::kernels
