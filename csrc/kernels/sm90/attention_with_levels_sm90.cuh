// Block-tile attention over a level map (docs/spec.md section 3) for Hopper (sm_90a): TMA, mbarriers, wgmma,
// warp specialization. Same contract as ../attention_with_levels.cuh (the sm80 kernel, kept as the
// fallback); this file only changes how tiles move and multiply.
//
// A persistent grid (as many CTAs as fit at once); each CTA walks items (one query block of
// kBlockM = 64 * kConsumers rows of one batch and head) gridDim.x apart:
//   - Warp 1 builds each item's schedule (key block ids grouped by level, as sm80 does) into one of
//     two shared-memory slots, up to two items ahead.
//   - Warps 0 (Q and K) and 2 (V) are the loaders (their warpgroup's registers given back with
//     setmaxnreg). Each walks the schedule: a tile is kTileN consecutive pooled tokens of one level, i.e. kTileN / piece pieces,
//     each piece `piece = min(block_n >> L, kTileN)` contiguous rows of level L's K or V (one key
//     block, or a slice of one). Lane i issues piece i as one TMA box per 64 head_dim columns, into
//     consecutive shared-memory rows; empty slots get a box past the end of the tensor, which TMA
//     fills with zeros. The next item's Q and first tiles load while the consumers finish the last.
//   - Warpgroups 1..kConsumers each own 64 query rows. Per tile: S = Q K^T (wgmma, both operands in
//     shared memory), bias + causal mask + online softmax in registers (exp2 domain), O += P V (wgmma
//     with P from registers), overlapped across tiles as FA3 does. The per-column bias log2(count)
//     and the causal mask's last covered keys come from the schedule (common/tile_geometry.cuh), so
//     the producer hands the consumers nothing but TMA bytes.
// K/V stages cycle through a kStages ring of full/empty mbarriers that runs on across items. The
// kernel reads Q, K, V (every level) in place through their strides; GQA maps a query head to its
// key head by index.
//
// With kDq the same kernel is the backward's dq pass (docs/spec.md section 7): the producer loads dO
// beside Q and the same tiles; the consumers compute S = Q K^T and dP = dO V^T, P from the forward's
// lse, dS = P (dP - delta) and dq += dS K on 64-key tiles, and write dq (see the dq consumer).
#pragma once

#include <algorithm>
#include <cfloat>
#include <climits>
#include <type_traits>

#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cute/arch/copy_sm90_tma.hpp>

#include "../common/online_softmax.cuh"
#include "../common/tile_geometry.cuh"
#include "../device_utils.cuh"
#include "../level_schedule.cuh"
#include "../params.h"
#include "shapes_sm90.h"
#include "sm_count.h"
#include "tensor_map.h"
#include "wgmma.cuh"

namespace psa::kernels::sm90 {

// AttentionParams plus one TMA descriptor for Q and one per level for K and V (box rows = the
// level's piece height). Passed as a __grid_constant__ kernel parameter so TMA reads it in place.
struct AttentionSm90Params {
  AttentionParams base;
  CUtensorMap q_map;  // CUtensorMap is 64-byte aligned by its type
  CUtensorMap k_map[kNumLevels];
  CUtensorMap v_map[kNumLevels];
  // The dq pass only (AttentionBackwardParams' fields): dO [B, Hq, Lq, D] through its map, the
  // forward's lse and delta = rowsum(dO * O) - dlse [B, Hq, Lq], dq [B, Hq, Lq, D] contiguous.
  CUtensorMap d_out_map;
  const float* lse;
  const float* delta;
  void* dq;
  float scale;
};

// A thread's two rows of an S accumulator (s[i] belongs to row (i >> 1) & 1) reduced with 4 partial
// results per row instead of one serial chain: with two consumer warps per scheduler there is little
// else to issue while a 32-long chain of dependent FMNMX or FADD waits on its latency.
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct AddOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
template <typename Op>
struct RowPartials {
  float part[2][4];
  __device__ __forceinline__ explicit RowPartials(float identity) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) part[r][c] = identity;
  }
  __device__ __forceinline__ void add(int i, float x) {
    float& slot = part[(i >> 1) & 1][(i >> 2) & 3];
    slot = Op{}(slot, x);
  }
  __device__ __forceinline__ float total(int r) const {
    return Op{}(Op{}(part[r][0], part[r][1]), Op{}(part[r][2], part[r][3]));
  }
};

// kDq false: the forward (out, lse). kDq true: the backward's dq pass over the same schedule.
template <typename T, int kHeadDim, int kBlockM, bool kDq>
__global__ void __launch_bounds__(AttentionSm90Shape<kHeadDim, kBlockM, kDq>::kThreads,
                                  AttentionSm90Shape<kHeadDim, kBlockM, kDq>::kMinBlocks)
    attention_with_levels_sm90_kernel(const __grid_constant__ AttentionSm90Params params) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Shape = AttentionSm90Shape<kHeadDim, kBlockM, kDq>;
  using Storage = AttentionSm90Storage<kHeadDim, kBlockM, kDq>;
  using Barrier = cutlass::arch::ClusterBarrier;
  using TxBarrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr int kTileN = Shape::kTileN, kStages = Shape::kStages, kPanels = Shape::kPanels;
  const AttentionParams& p = params.base;

  extern __shared__ unsigned char smem_unaligned[];
  Storage& smem = aligned_shared<Storage, kSwizzleAtomBytes>(smem_unaligned);
  // The schedules of two items (double-buffered: one built while the other is in use), [2][n_k].
  uint16_t* const schedules = reinterpret_cast<uint16_t*>(&smem + 1);
  // Tile views in the kernel's element type.
  const auto q_panel = [&](int panel) { return reinterpret_cast<T*>(&smem.rows[0][panel][0][0]); };
  const auto d_out_panel = [&](int panel) {  // the dq pass's dO (Q again in the forward, never loaded there)
    return reinterpret_cast<T*>(&smem.rows[Shape::kRowOperands - 1][panel][0][0]);
  };
  const auto k_panel = [&](int stage, int panel) { return reinterpret_cast<T*>(&smem.k[stage][panel][0][0]); };
  const auto v_panel = [&](int stage, int panel) { return reinterpret_cast<T*>(&smem.v[stage][panel][0][0]); };

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // Persistent grid: the CTA's k-th item (one query block of one (batch, head); query blocks
  // fastest, so CTAs running together share a head's K and V in L2) is blockIdx.x + k * gridDim.x.
  // Every role walks the same sequence; schedule slot k & 1 holds item k's schedule.
  const int items = p.n_q * p.batch * p.q_heads;
  struct Item {
    int b, h, kv_head, block, row_begin;
    int64_t bh;
  };
  const auto item_of = [&](int item) {
    Item it;
    it.bh = item / p.n_q;
    it.block = item % p.n_q;
    it.b = static_cast<int>(it.bh / p.q_heads);
    it.h = static_cast<int>(it.bh % p.q_heads);
    it.kv_head = it.h / (p.q_heads / p.kv_heads);
    it.row_begin = it.block * kBlockM;
    return it;
  };
  const auto ids_of = [&](int slot) { return schedules + slot * p.n_k; };

  // ---- Barrier set-up (thread 0). Schedule slots: the builder warp's 32 lanes fill one
  // (sched_full), the two loader warps' and the consumers' threads release it (sched_empty); every
  // thread that touched a slot arrives itself, so each one's own accesses are ordered by its arrive.
  constexpr int kConsumerThreads = Shape::kConsumers * 128;
  if (tid == 0) {
    Barrier::init(&smem.q_full, 1);
    Barrier::init(&smem.q_empty, Shape::kConsumers * 4);     // one arrive per consumer warp
#pragma unroll
    for (int slot = 0; slot < 2; ++slot) {
      Barrier::init(&smem.sched_full[slot], 32);
      Barrier::init(&smem.sched_empty[slot], 64 + kConsumerThreads);  // two loader warps + consumers
    }
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      Barrier::init(&smem.k_full[s], 1);                       // the producer's arrive (+ TMA bytes)
      Barrier::init(&smem.v_full[s], 1);
      Barrier::init(&smem.k_empty[s], Shape::kConsumers * 4);  // one arrive per consumer warp
      Barrier::init(&smem.v_empty[s], Shape::kConsumers * 4);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  using Geometry = TileGeometry<kTileN>;
  // With nothing selected (n_tiles == 0) the producer loads only Q and the consumers go straight to
  // the epilogue: zeros and lse = -inf.

  if (warp < 4) {
    // ================= Producer warpgroup =================
    cutlass::arch::warpgroup_reg_dealloc<Shape::kProducerRegisters>();
    if (warp == 1) {
      // Schedule builder: item k's schedule into slot k & 1, once item k - 2 has released it. It runs
      // up to two items ahead, so a row's schedule is ready before its tiles are due.
      for (int k = 0, item = blockIdx.x; item < items; ++k, item += gridDim.x) {
        const int slot = k & 1;
        if (k >= 2) Barrier::wait(&smem.sched_empty[slot], ((k >> 1) - 1) & 1);
        build_level_schedule(p.levels + static_cast<int64_t>(item) * p.n_k, p.n_k, lane, ids_of(slot),
                             smem.level_count[slot], smem.level_start[slot]);
        Barrier::arrive(&smem.sched_full[slot]);
      }
      return;
    }
    // Warp 0 loads Q and K, warp 2 loads V: a pooled tile is up to 16 TMA boxes per tensor, each
    // issued through a per-lane loop, and one warp issuing both tensors' boxes fell behind.
    if (warp != 0 && warp != 2) return;
    const bool loads_k = warp == 0;
    int ring = 0;  // tiles loaded so far, over all items: the K/V ring's stage and phase
    for (int k = 0, item = blockIdx.x; item < items; ++k, item += gridDim.x) {
      const int slot = k & 1;
      const uint16_t* ids = ids_of(slot);
      const Item it = item_of(item);
      Barrier::wait(&smem.sched_full[slot], (k >> 1) & 1);
      const int n_tiles = Geometry::row_tiles(smem.level_count[slot], p.block_n);
      // Q of this item, once the consumers' last MMA of the previous item has read its Q: while they
      // write the previous item's output, this item's Q and first tiles are already on their way.
      if (loads_k && k > 0) Barrier::wait(&smem.q_empty, (k - 1) & 1);
      if (loads_k && lane == 0) {
        TxBarrier::expect_transaction(&smem.q_full, static_cast<uint32_t>(sizeof(smem.rows)));
        for (int c = 0; c < kBlockM / 64; ++c) {
#pragma unroll
          for (int panel = 0; panel < kPanels; ++panel) {
            cute::SM90_TMA_LOAD_4D::copy(&params.q_map, &smem.q_full, 0, q_panel(panel) + c * 64 * kPanelColumns,
                                         panel * kPanelColumns, it.row_begin + c * 64, it.h, it.b);
            if constexpr (kDq) {
              cute::SM90_TMA_LOAD_4D::copy(&params.d_out_map, &smem.q_full, 0,
                                           d_out_panel(panel) + c * 64 * kPanelColumns, panel * kPanelColumns,
                                           it.row_begin + c * 64, it.h, it.b);
            }
          }
        }
        Barrier::arrive(&smem.q_full);
      }
      Geometry geometry =
          Geometry::locate(0, smem.level_count[slot], smem.level_start[slot], p.block_n, p.k_len, ids);
      for (int index = 0; index < n_tiles; ++index) {
        const int tile = ring + index, stage = tile % kStages;
        const uint32_t empty_phase = ((tile / kStages) & 1) ^ 1;
        if (index > 0) geometry.advance(smem.level_count[slot], smem.level_start[slot], p.block_n, ids);
        // Pieces: lane i issues piece i (kTileN / piece <= 16 pieces: piece >= 8 rows). An empty slot
        // reads rows starting at `tokens`: entirely past the end, so zeros.
        const int piece = min(geometry.per_block, kTileN), pieces = kTileN / piece;
        const int L = geometry.level;
        const auto load = [&](const CUtensorMap* map, uint64_t* full, uint64_t* empty, const auto& panel_of) {
          Barrier::wait(empty, empty_phase);
          if (lane == 0) TxBarrier::expect_transaction(full, static_cast<uint32_t>(Shape::kTileBytes));
          __syncwarp();
          if (lane < pieces) {
            const int row = geometry.token(lane * piece, ids);
#pragma unroll
            for (int panel = 0; panel < kPanels; ++panel) {
              cute::SM90_TMA_LOAD_4D::copy(map, full, 0, panel_of(panel) + lane * piece * kPanelColumns,
                                           panel * kPanelColumns, row, it.kv_head, it.b);
            }
          }
          __syncwarp();
          if (lane == 0) Barrier::arrive(full);
        };
        if (loads_k) {
          load(&params.k_map[L], &smem.k_full[stage], &smem.k_empty[stage],
               [&](int panel) { return k_panel(stage, panel); });
        } else {
          load(&params.v_map[L], &smem.v_full[stage], &smem.v_empty[stage],
               [&](int panel) { return v_panel(stage, panel); });
        }
      }
      ring += n_tiles;
      Barrier::arrive(&smem.sched_empty[slot]);
    }
  } else if constexpr (kDq) {
    // ================= Consumer warpgroups, dq pass =================
    // Per tile: S = Q K^T and dP = dO V^T (two SS batches, V's stage released once dP is done),
    // P = exp2(S scale + bias - lse) from the forward's lse (no online softmax), dS = P (dP - delta)
    // into A fragments, dq += dS K with K's stage read as the forward reads V (both [tokens x D]
    // with the tokens as the MMA's K dimension), then K's stage released. dq is scaled once at the end.
    cutlass::arch::warpgroup_reg_alloc<Shape::kConsumerRegisters>();
    const int consumer = __shfl_sync(0xffffffffu, warp / 4 - 1, 0), warp_in_group = warp % 4;
    const int g = lane >> 2, t = lane & 3;
    const int causal_offset = p.k_len - p.q_len;
    const int group_row = consumer * 64 + warp_in_group * 16;

    float dq[kHeadDim / 2];
    float s[kTileN / 2];          // S, then P, then dS
    float dp[kTileN / 2];         // dP
    uint32_t ds[kTileN / 16][4];  // dS as the dq MMA's A fragments

    const auto q_desc = SmemDescriptor::of(q_panel(0) + consumer * 64 * kPanelColumns, 16, kSwizzleAtomBytes);
    const auto d_out_desc = SmemDescriptor::of(d_out_panel(0) + consumer * 64 * kPanelColumns, 16, kSwizzleAtomBytes);
    const auto k_desc = SmemDescriptor::of(k_panel(0, 0), 16, kSwizzleAtomBytes);
    const auto v_desc = SmemDescriptor::of(v_panel(0, 0), 16, kSwizzleAtomBytes);
    const auto k_as_b_desc = SmemDescriptor::of(k_panel(0, 0), kTileN * kPanelRowBytes, kSwizzleAtomBytes);
    constexpr uint32_t kStageBytes = sizeof(smem.k[0]);
    static_assert(sizeof(smem.v[0]) == kStageBytes, "K and V stages advance alike");
    // S = Q K^T and dP = dO V^T of one stage: one batch of SS MMAs.
    const auto issue_s_dp = [&](int stage) {
      fence_registers(s);
      fence_registers(dp);
      cute::warpgroup_arrive();
      const SmemDescriptor k_stage = k_desc.at(stage * kStageBytes), v_stage = v_desc.at(stage * kStageBytes);
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        const uint32_t row_offset = k_major_step_offset(kk, kBlockM), tile_offset = k_major_step_offset(kk, kTileN);
        mma_ss<T, kTileN>(q_desc.at(row_offset), k_stage.at(tile_offset), s, kk > 0);
        mma_ss<T, kTileN>(d_out_desc.at(row_offset), v_stage.at(tile_offset), dp, kk > 0);
      }
      cute::warpgroup_commit_batch();
    };
    // dq += dS K of one stage, dS from the A fragments in ds.
    const auto issue_dq = [&](int stage) {
      fence_registers(dq);
      cute::warpgroup_arrive();
      const SmemDescriptor k_as_b = k_as_b_desc.at(stage * kStageBytes);
#pragma unroll
      for (int kk = 0; kk < kTileN / 16; ++kk) mma_rs<T, kHeadDim>(ds[kk], k_as_b.at(kk * 16 * kPanelRowBytes), dq);
      cute::warpgroup_commit_batch();
    };
    // dS = P (dP - delta) in s, P = exp2(S scale + bias - lse). Column of s[4j + e]: 8j + 2t + (e & 1),
    // row rows[e >> 1] (the forward's layout).
    const auto make_ds = [&](const Geometry& geometry, const uint16_t* s_ids, const int (&rows)[2],
                             int first_row_limit, const float (&row_lse)[2], const float (&row_delta)[2]) {
      const bool masked = p.causal && geometry.tile_last_key(s_ids) > first_row_limit;
      if (geometry.full && !masked) {
        const float bias = static_cast<float>(geometry.level);
        const float offset[2] = {bias - row_lse[0], bias - row_lse[1]};
#pragma unroll
        for (int i = 0; i < kTileN / 2; ++i) {
          const int r = (i >> 1) & 1;
          s[i] = exp2f(fmaf(s[i], p.scale_log2, offset[r])) * (dp[i] - row_delta[r]);
        }
      } else {
#pragma unroll
        for (int j = 0; j < kTileN / 8; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = 8 * j + 2 * t + (e & 1), r = e >> 1;
            float x = fmaf(s[4 * j + e], p.scale_log2, geometry.bias(col)) - row_lse[r];
            if (masked && geometry.last_key(col, s_ids) > rows[r] + causal_offset) x = -INFINITY;
            s[4 * j + e] = exp2f(x) * (dp[4 * j + e] - row_delta[r]);
          }
        }
      }
    };
    const auto pack_ds = [&] {
#pragma unroll
      for (int kk = 0; kk < kTileN / 16; ++kk) {
#pragma unroll
        for (int i = 0; i < 4; ++i) ds[kk][i] = pack2<T>(s[8 * kk + 2 * i], s[8 * kk + 2 * i + 1]);
      }
    };

    int ring = 0;  // tiles consumed so far, over all items: the K/V ring's stage and phase
    for (int k = 0, item = blockIdx.x; item < items; ++k, item += gridDim.x) {
      const int slot = k & 1;
      const Item it = item_of(item);
      const uint16_t* s_ids = ids_of(slot);
      const int rows[2] = {it.row_begin + group_row + g, it.row_begin + group_row + g + 8};
      const int first_row_limit = it.row_begin + consumer * 64 + causal_offset;
      // Each row's lse in the exp2 domain (+inf for a row that saw nothing, so P = 0) and delta.
      float row_lse[2], row_delta[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const bool valid = rows[r] < p.q_len;
        const float lse = valid ? params.lse[it.bh * p.q_len + rows[r]] : -INFINITY;
        row_lse[r] = lse == -INFINITY ? INFINITY : lse * 1.4426950408889634f;
        row_delta[r] = valid ? params.delta[it.bh * p.q_len + rows[r]] : 0.f;
      }
#pragma unroll
      for (int i = 0; i < kHeadDim / 2; ++i) dq[i] = 0.f;
      Barrier::wait(&smem.sched_full[slot], (k >> 1) & 1);
      const int n_tiles = Geometry::row_tiles(smem.level_count[slot], p.block_n);
      Geometry geometry =
          Geometry::locate(0, smem.level_count[slot], smem.level_start[slot], p.block_n, p.k_len, s_ids);
      Barrier::wait(&smem.q_full, k & 1);
      // Overlapped as the forward: per tile j >= 1, issue S_j / dP_j, then dq += dS_{j-1} K_{j-1}; wait
      // for S_j / dP_j only and compute dS_j in s while the dq MMA runs, then wait for it, release
      // K_{j-1} and pack dS_j (ds is the in-flight MMA's operand until then). Tile 0 is peeled off, as
      // in the forward: a conditional MMA inside the loop makes ptxas serialize every wgmma (C7514).
      const auto wait_tile = [&](int tile) {
        const int stage = tile % kStages;
        const uint32_t full_phase = (tile / kStages) & 1;
        Barrier::wait(&smem.k_full[stage], full_phase);
        Barrier::wait(&smem.v_full[stage], full_phase);
        return stage;
      };
      const auto release_v = [&](int stage) {
        if (lane == 0) Barrier::arrive(&smem.v_empty[stage]);
      };
      const auto release_k = [&](int stage) {
        if (lane == 0) Barrier::arrive(&smem.k_empty[stage]);
      };
      if (n_tiles > 0) {
        const int stage = wait_tile(ring);
        issue_s_dp(stage);
        cute::warpgroup_wait<0>();
        fence_registers(s);
        fence_registers(dp);
        release_v(stage);
        make_ds(geometry, s_ids, rows, first_row_limit, row_lse, row_delta);
        pack_ds();
      }
      for (int index = 1; index < n_tiles; ++index) {
        const int tile = ring + index, previous = (tile - 1) % kStages;
        const int stage = wait_tile(tile);
        issue_s_dp(stage);
        issue_dq(previous);
        cute::warpgroup_wait<1>();  // S_j and dP_j are done; the dq MMA of j - 1 may still run
        fence_registers(s);
        fence_registers(dp);
        release_v(stage);
        geometry.advance(smem.level_count[slot], smem.level_start[slot], p.block_n, s_ids);
        make_ds(geometry, s_ids, rows, first_row_limit, row_lse, row_delta);
        cute::warpgroup_wait<0>();
        fence_registers(dq);
        release_k(previous);
        pack_ds();
      }
      if (n_tiles > 0) {
        const int last_stage = (ring + n_tiles - 1) % kStages;
        issue_dq(last_stage);
        cute::warpgroup_wait<0>();
        fence_registers(dq);
        release_k(last_stage);
      }
      ring += n_tiles;
      if (lane == 0) Barrier::arrive(&smem.q_empty);
      Barrier::arrive(&smem.sched_empty[slot]);

      // ---- Epilogue: dq * scale; a row with nothing selected writes zeros. dq[i] belongs to row
      // rows[(i >> 1) & 1], column 8 (i >> 2) + 2t + (i & 1): consecutive pairs are one 4-byte store.
      T* dq_out = static_cast<T*>(params.dq) + it.bh * p.q_len * kHeadDim;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (rows[r] >= p.q_len) continue;
        T* row_out = dq_out + static_cast<int64_t>(rows[r]) * kHeadDim;
#pragma unroll
        for (int j = 0; j < kHeadDim / 8; ++j) {
          *reinterpret_cast<uint32_t*>(row_out + 8 * j + 2 * t) =
              pack2<T>(dq[4 * j + 2 * r] * params.scale, dq[4 * j + 2 * r + 1] * params.scale);
        }
      }
    }
  } else {
    // ================= Consumer warpgroups, forward =================
    // Intra-warpgroup overlap (FA3): while O += P_{j-1} V_{j-1} runs on the tensor cores, this
    // warpgroup computes S_j = Q K_j^T's softmax. Per tile j >= 1: issue S_j, issue the PV of j - 1,
    // wait for S_j only, softmax, then wait for the PV, rescale O and pack P_j. The softmax reads only
    // S registers while the MMA in flight reads P and writes O, so ptxas keeps the MMAs asynchronous.
    cutlass::arch::warpgroup_reg_alloc<Shape::kConsumerRegisters>();
    // Broadcast from lane 0, so the compiler knows the warpgroup index is warp-uniform and keeps the
    // MMA descriptors derived from it in uniform registers (as CUTLASS's canonical_warp_group_idx).
    const int consumer = __shfl_sync(0xffffffffu, warp / 4 - 1, 0), warp_in_group = warp % 4;
    const int g = lane >> 2, t = lane & 3;
    const int causal_offset = p.k_len - p.q_len;
    const int group_row = consumer * 64 + warp_in_group * 16;  // within the block
    // The current item's: this thread's two rows, the causal mask's first-row limit (a tile needs the
    // mask only if some key it covers lies past this warpgroup's first row) and the schedule.
    int rows[2];
    int first_row_limit;
    const uint16_t* s_ids;

    float o[kHeadDim / 2];
    OnlineSoftmaxRows softmax_rows;
    float s[kTileN / 2];           // S of the newest tile, then its probabilities
    uint32_t pa[kTileN / 16][4];   // P of the previous tile as the PV MMA's A fragments

    // Operand descriptors, built once: per MMA only the start address moves (SmemDescriptor::at), by
    // compile-time offsets plus the stage's. Building each from its pointer cost ~14 instructions
    // per wgmma (a third of the consumer's instructions).
    const auto q_desc = SmemDescriptor::of(q_panel(0) + consumer * 64 * kPanelColumns, 16, kSwizzleAtomBytes);
    const auto k_desc = SmemDescriptor::of(k_panel(0, 0), 16, kSwizzleAtomBytes);
    const auto v_desc = SmemDescriptor::of(v_panel(0, 0), kTileN * kPanelRowBytes, kSwizzleAtomBytes);
    constexpr uint32_t kStageBytes = sizeof(smem.k[0]);
    static_assert(sizeof(smem.v[0]) == kStageBytes, "K and V stages advance alike");
    const auto issue_s = [&](int stage) {
      fence_registers(s);
      cute::warpgroup_arrive();
      const SmemDescriptor k_stage = k_desc.at(stage * kStageBytes);
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        mma_ss<T, kTileN>(q_desc.at(k_major_step_offset(kk, kBlockM)), k_stage.at(k_major_step_offset(kk, kTileN)), s,
                          kk > 0);
      }
      cute::warpgroup_commit_batch();
    };
    const auto issue_pv = [&](int stage) {
      fence_registers(o);
      cute::warpgroup_arrive();
      const SmemDescriptor v_stage = v_desc.at(stage * kStageBytes);
#pragma unroll
      for (int kk = 0; kk < kTileN / 16; ++kk) {
        // k16 step kk: 16 keys further down the V tile.
        mma_rs<T, kHeadDim>(pa[kk], v_stage.at(kk * 16 * kPanelRowBytes), o);
      }
      cute::warpgroup_commit_batch();
    };
    // Bias, causal mask and online softmax of S (exp2 domain) for the tile `geometry` describes;
    // returns how much the old O and row sum shrink. Column of s[4j + e]: 8j + 2t + (e & 1).
    const auto softmax = [&](const Geometry& geometry, float (&scale_old)[2]) {
      fence_registers(s);
      float tile_max[2] = {-INFINITY, -INFINITY};
      float tile_sum[2] = {0.f, 0.f};
      float base[2];
      if (geometry.full && !(p.causal && geometry.tile_last_key(s_ids) > first_row_limit) && p.scale_log2 >= 0.f) {
        // The common tile: every column valid with the same bias L, no mask. max(s * scale + L) is
        // max(s) * scale + L for scale >= 0, so the row max is taken on raw S and each probability
        // costs one FFMA and one exp2: exp2(s * scale + (L - max)).
        RowPartials<MaxOp> maxima(-INFINITY);
#pragma unroll
        for (int i = 0; i < kTileN / 2; ++i) maxima.add(i, s[i]);
        const float bias = static_cast<float>(geometry.level);
#pragma unroll
        for (int r = 0; r < 2; ++r) tile_max[r] = fmaf(maxima.total(r), p.scale_log2, bias);
        softmax_rows.update_max(tile_max, base, scale_old);
        const float offset[2] = {bias - base[0], bias - base[1]};
        RowPartials<AddOp> sums(0.f);
#pragma unroll
        for (int i = 0; i < kTileN / 2; ++i) {
          s[i] = exp2f(fmaf(s[i], p.scale_log2, offset[(i >> 1) & 1]));
          sums.add(i, s[i]);
        }
        tile_sum[0] = sums.total(0);
        tile_sum[1] = sums.total(1);
      } else {
        // Partial or masked tiles: per-column bias (-inf for empty slots) and the causal mask. Two
        // compiled copies, so the unmasked one has no mask test; a per-column branch inside the
        // unrolled loop would be if-converted into every tile.
        RowPartials<MaxOp> maxima(-INFINITY);
        const auto scale_and_bias = [&](auto masked) {
#pragma unroll
          for (int j = 0; j < kTileN / 8; ++j) {
            float col_bias[2];
#pragma unroll
            for (int c = 0; c < 2; ++c) col_bias[c] = geometry.bias(8 * j + 2 * t + c);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int col = 8 * j + 2 * t + (e & 1), r = e >> 1;
              float x = fmaf(s[4 * j + e], p.scale_log2, col_bias[e & 1]);
              if constexpr (decltype(masked)::value) {
                if (geometry.last_key(col, s_ids) > rows[r] + causal_offset) x = -INFINITY;
              }
              s[4 * j + e] = x;
              maxima.add(4 * j + e, x);
            }
          }
        };
        if (p.causal && geometry.tile_last_key(s_ids) > first_row_limit) {
          scale_and_bias(std::true_type{});
        } else {
          scale_and_bias(std::false_type{});
        }
        tile_max[0] = maxima.total(0);
        tile_max[1] = maxima.total(1);
        softmax_rows.update_max(tile_max, base, scale_old);
        RowPartials<AddOp> sums(0.f);
#pragma unroll
        for (int i = 0; i < kTileN / 2; ++i) {
          s[i] = exp2f(s[i] - base[(i >> 1) & 1]);
          sums.add(i, s[i]);
        }
        tile_sum[0] = sums.total(0);
        tile_sum[1] = sums.total(1);
      }
      softmax_rows.add_sum(tile_sum, scale_old);
    };
    // The S accumulator of n8 chunks 2kk, 2kk+1 is the A fragment of k16 step kk of O += P V.
    const auto pack_p = [&] {
#pragma unroll
      for (int kk = 0; kk < kTileN / 16; ++kk) {
#pragma unroll
        for (int i = 0; i < 4; ++i) pa[kk][i] = pack2<T>(s[8 * kk + 2 * i], s[8 * kk + 2 * i + 1]);
      }
    };
    // A stage is released by one arrive per consumer warp, once the warp's MMAs that read it are done.
    const auto release_k = [&](int stage) {
      if (lane == 0) Barrier::arrive(&smem.k_empty[stage]);
    };
    const auto release_v = [&](int stage) {
      if (lane == 0) Barrier::arrive(&smem.v_empty[stage]);
    };

    int ring = 0;  // tiles consumed so far, over all items: the K/V ring's stage and phase
    for (int k = 0, item = blockIdx.x; item < items; ++k, item += gridDim.x) {
      const int slot = k & 1;
      const Item it = item_of(item);
      rows[0] = it.row_begin + group_row + g;
      rows[1] = rows[0] + 8;
      first_row_limit = it.row_begin + consumer * 64 + causal_offset;
      s_ids = ids_of(slot);
#pragma unroll
      for (int i = 0; i < kHeadDim / 2; ++i) o[i] = 0.f;
      softmax_rows.reset();
      Barrier::wait(&smem.sched_full[slot], (k >> 1) & 1);
      const int n_tiles = Geometry::row_tiles(smem.level_count[slot], p.block_n);
      // The tiles' geometry, walked one by one alongside the loop (TileGeometry::advance).
      Geometry geometry =
          Geometry::locate(0, smem.level_count[slot], smem.level_start[slot], p.block_n, p.k_len, s_ids);
      Barrier::wait(&smem.q_full, k & 1);
      if (n_tiles > 0) {
        const int stage = ring % kStages;
        Barrier::wait(&smem.k_full[stage], (ring / kStages) & 1);
        issue_s(stage);
        cute::warpgroup_wait<0>();
        release_k(stage);
        float scale_old[2];
        softmax(geometry, scale_old);  // O is still zero: nothing to rescale
        pack_p();
      }
      for (int index = 1; index < n_tiles; ++index) {
        const int tile = ring + index, stage = tile % kStages, previous = (tile - 1) % kStages;
        Barrier::wait(&smem.k_full[stage], (tile / kStages) & 1);
        Barrier::wait(&smem.v_full[previous], ((tile - 1) / kStages) & 1);
        issue_s(stage);
        issue_pv(previous);
        cute::warpgroup_wait<1>();  // S of this tile is done; the PV of the previous one may still run
        release_k(stage);
        geometry.advance(smem.level_count[slot], smem.level_start[slot], p.block_n, s_ids);
        float scale_old[2];
        softmax(geometry, scale_old);
        cute::warpgroup_wait<0>();
        fence_registers(o);
        release_v(previous);
        // Once the row maxima settle most tiles leave them unchanged (scale exactly 1): the warp skips
        // the rescale then (a uniform branch, so no if-conversion into the common path).
        if (__any_sync(0xffffffffu, scale_old[0] != 1.f || scale_old[1] != 1.f)) {
#pragma unroll
          for (int i = 0; i < kHeadDim / 2; ++i) o[i] *= scale_old[(i >> 1) & 1];
        }
        pack_p();
      }
      if (n_tiles > 0) {
        const int last = ring + n_tiles - 1, last_stage = last % kStages;
        Barrier::wait(&smem.v_full[last_stage], (last / kStages) & 1);
        issue_pv(last_stage);
        cute::warpgroup_wait<0>();
        fence_registers(o);
        release_v(last_stage);
      }
      ring += n_tiles;
      // Every MMA of the item is done: its Q and its schedule slot go back to the producer warps.
      if (lane == 0) Barrier::arrive(&smem.q_empty);
      Barrier::arrive(&smem.sched_empty[slot]);

      // ---- Epilogue: rows that saw no key write zeros and lse = -inf.
      softmax_rows.write<T, kHeadDim>(o, static_cast<T*>(p.out) + it.bh * p.q_len * kHeadDim,
                                      p.lse + it.bh * p.q_len, rows, p.q_len, t);
    }
  }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

// Level L's piece height: the rows of one key block at that level, at most a tile.
template <int kTileN>
inline int piece_rows(int block_n, int level) { return block_n >> level < kTileN ? block_n >> level : kTileN; }

// Encodes the TMA maps of Q and of every level's K and V (box rows: the level's piece height) and
// launches the persistent grid: the forward and the dq pass share all of it.
template <typename T, int kHeadDim, int kBlockM, bool kDq>
cudaError_t launch_level_map_kernel(AttentionSm90Params& params, cudaStream_t stream) {
  using Shape = AttentionSm90Shape<kHeadDim, kBlockM, kDq>;
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  const AttentionParams& p = params.base;
  cudaError_t status = encode_bhld_map(&params.q_map, p.q, kBf16, p.batch, p.q_heads, p.q_len, kHeadDim,
                                       p.q_stride, 64);
  for (int level = 0; level < kNumLevels && status == cudaSuccess; ++level) {
    const int64_t length = (static_cast<int64_t>(p.k_len) + (1 << level) - 1) >> level;
    const int rows = piece_rows<Shape::kTileN>(p.block_n, level);
    status = encode_bhld_map(&params.k_map[level], p.k[level], kBf16, p.batch, p.kv_heads, length, kHeadDim,
                             p.k_stride[level], rows);
    if (status == cudaSuccess) {
      status = encode_bhld_map(&params.v_map[level], p.v[level], kBf16, p.batch, p.kv_heads, length, kHeadDim,
                               p.v_stride[level], rows);
    }
  }
  if (status != cudaSuccess) return status;
  const size_t smem = Shape::smem_bytes(p.n_k);
  auto kernel = attention_with_levels_sm90_kernel<T, kHeadDim, kBlockM, kDq>;
  status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (status != cudaSuccess) return status;
  // Persistent grid: as many CTAs as fit on the GPU at once, each walking items gridDim.x apart.
  int sms = 0, per_sm = 0;
  status = current_sm_count(&sms);
  if (status == cudaSuccess) {
    status = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, Shape::kThreads, smem);
  }
  if (status != cudaSuccess) return status;
  const int64_t items = static_cast<int64_t>(p.n_q) * p.batch * p.q_heads;
  const int64_t ctas = std::min<int64_t>(items, static_cast<int64_t>(sms) * std::max(per_sm, 1));
  kernel<<<static_cast<unsigned>(ctas), Shape::kThreads, smem, stream>>>(params);
  return cudaGetLastError();
}

template <typename T, int kHeadDim, int kBlockM>
cudaError_t launch_attention_with_levels_sm90(const AttentionParams& p, cudaStream_t stream) {
  AttentionSm90Params params{};
  params.base = p;
  return launch_level_map_kernel<T, kHeadDim, kBlockM, false>(params, stream);
}

template <typename T, int kHeadDim, int kBlockM>
cudaError_t launch_attention_backward_dq_sm90(const AttentionBackwardParams& bp, cudaStream_t stream) {
  AttentionSm90Params params{};
  params.base = bp.base;
  params.lse = bp.lse;
  params.delta = bp.delta;
  params.dq = bp.dq;
  params.scale = bp.scale;
  // dO is contiguous [B, Hq, Lq, D] (the host makes it so).
  const AttentionParams& p = bp.base;
  const int64_t d_out_strides[3] = {static_cast<int64_t>(p.q_heads) * p.q_len * kHeadDim,
                                    static_cast<int64_t>(p.q_len) * kHeadDim, kHeadDim};
  const cudaError_t status = encode_bhld_map(&params.d_out_map, bp.grad_out, std::is_same_v<T, __nv_bfloat16>,
                                             p.batch, p.q_heads, p.q_len, kHeadDim, d_out_strides, 64);
  if (status != cudaSuccess) return status;
  return launch_level_map_kernel<T, kHeadDim, kBlockM, true>(params, stream);
}

}  // namespace psa::kernels::sm90
