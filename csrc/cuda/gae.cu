// gae and discounted_returns on the GPU (rlhf/gae.h): a reverse linear scan, one warp per
// sequence, kWarps sequences per block.
//
// A warp walks its sequence from the end in chunks of kChunk = 32 * kPerLane tokens. Time
// runs backwards, so lane 0 holds the chunk's latest kPerLane tokens, lane 1 the next
// earlier ones, and so on; within a lane, token j = 0 is its latest. Each lane composes the
// affine maps of its tokens (latest first) into one map; an inclusive warp scan over the
// lanes (__shfl_up: lane l receives from the lanes holding later tokens) then gives the
// state after each lane's tokens, the carry from the previous (later) chunk folded into
// lane 0's map; each lane re-applies its own tokens' maps from the state entering it, and
// lane 31's final state is the carry into the next (earlier) chunk. GAE runs two such
// scans per chunk: first u (V of the next valid token, exact: only selects), whose state
// entering a token is V_{n(t)}, then A from the per-token maps that V_{n(t)} completes.
// No shared memory, no atomics, no __syncthreads: warps are independent, and the result is
// deterministic.
#include <cuda_runtime.h>

#include "rlhf/cuda_runtime.h"
#include "rlhf/reduce.cuh"
#include "rlhf/gae.h"

namespace rlhf::cuda {
namespace {

constexpr int kWarps = 8;  // sequences per block
constexpr int kThreads = 32 * kWarps;
constexpr int kPerLane = 4;  // tokens per lane and chunk: a few independent loads in flight per lane
constexpr int kChunk = 32 * kPerLane;
// Blocks per SM the register budget must allow (<= 64 registers a thread): uncapped, ptxas
// gave the returns kernel 111-127 registers for its unrolled per-dtype loads, a quarter of
// the warps an SM can hold, for a scan whose speed is the loads it keeps in flight.
constexpr int kMinBlocks = 4;

// Inclusive scan over the lanes, lane 0 first: lane l ends with f_0, then f_1, ..., then f_l.
__device__ __forceinline__ Affine warp_scan(Affine f, int lane) {
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const float a = __shfl_up_sync(kFullMask, f.a, d);
    const float b = __shfl_up_sync(kFullMask, f.b, d);
    if (lane >= d) f = affine_then(Affine{a, b}, f);
  }
  return f;
}

// The state entering this lane's tokens, given `lane_map` (its tokens' maps composed) and
// `carry` (the state entering the chunk, i.e. after every later token); advances `carry`
// to the state after the whole chunk. Lane 0's map absorbs the carry as a constant map
// (a = 0), so every scanned map is constant and its b is the state itself.
__device__ __forceinline__ float enter_lane(Affine lane_map, float& carry, int lane) {
  const float entering_chunk = carry;
  if (lane == 0) lane_map = Affine{0.0f, affine_apply(lane_map, carry)};
  const float after = warp_scan(lane_map, lane).b;
  const float before = __shfl_up_sync(kFullMask, after, 1);
  carry = __shfl_sync(kFullMask, after, 31);
  return lane == 0 ? entering_chunk : before;
}

// kGae: advantages and returns (values, returns used); else discounted returns into `out`.
template <bool kGae>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    reverse_scan(Strided rewards, Strided values, Strided mask, In cu_seqlens, float* out, float* returns,
                 int64_t num_seqs, int64_t T, float gamma, float gamma_lam) {
  const int lane = threadIdx.x & 31;
  const int64_t seq = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (seq >= num_seqs) return;  // the whole warp leaves: the shuffles below see all 32 lanes
  const Span span = sequence_span(cu_seqlens, seq, T);
  const int64_t row = output_row(cu_seqlens, seq, T);
  float carry_u = 0.0f;  // V of the first valid token at or after the chunk's end (0 past the end)
  float carry_h = 0.0f;  // A (or G) of that token
  for (int64_t end = span.end; end > span.begin; end -= kChunk) {  // the same trip count in every lane
    const int64_t latest = end - 1 - int64_t(lane) * kPerLane;  // this lane's token j is latest - j
    bool valid[kPerLane];
    float r[kPerLane], v[kPerLane];
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int64_t i = latest - j;
      valid[j] = i >= span.begin && load_at(mask, seq, i) != 0.0f;  // out of range: the identity
      r[j] = valid[j] ? load_at(rewards, seq, i) : 0.0f;
      v[j] = kGae && valid[j] ? load_at(values, seq, i) : 0.0f;
    }
    Affine step[kPerLane];
    if constexpr (kGae) {
      Affine lane_u = affine_identity();
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) lane_u = affine_then(lane_u, value_step(valid[j], v[j]));
      float u = enter_lane(lane_u, carry_u, lane);  // V_{n(t)} of the lane's latest token
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        step[j] = advantage_step(valid[j], r[j], v[j], u, gamma, gamma_lam);
        u = affine_apply(value_step(valid[j], v[j]), u);
      }
    } else {
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) step[j] = return_step(valid[j], r[j], gamma);
    }
    Affine lane_h = affine_identity();
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) lane_h = affine_then(lane_h, step[j]);
    float h = enter_lane(lane_h, carry_h, lane);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int64_t i = latest - j;
      h = affine_apply(step[j], h);
      if (i >= span.begin) {
        out[row + i] = valid[j] ? h : 0.0f;
        if constexpr (kGae) returns[row + i] = valid[j] ? h + v[j] : 0.0f;
      }
    }
  }
}

unsigned blocks_for(int64_t num_seqs) { return unsigned((num_seqs + kWarps - 1) / kWarps); }

}  // namespace

void gae(Strided rewards, Strided values, Strided mask, In cu_seqlens, float* advantages, float* returns,
         int64_t num_seqs, int64_t T, float gamma, float gamma_lam, std::uintptr_t stream) {
  if (num_seqs == 0) return;
  reverse_scan<true><<<blocks_for(num_seqs), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      rewards, values, mask, cu_seqlens, advantages, returns, num_seqs, T, gamma, gamma_lam);
  check_launch("gae reverse_scan");
}

void discounted_returns(Strided rewards, Strided mask, In cu_seqlens, float* out, int64_t num_seqs, int64_t T,
                        float gamma, std::uintptr_t stream) {
  if (num_seqs == 0) return;
  const Strided no_values{In{nullptr, kF32}, 0, 0};  // never read without kGae
  reverse_scan<false><<<blocks_for(num_seqs), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      rewards, no_values, mask, cu_seqlens, out, nullptr, num_seqs, T, gamma, 1.0f);
  check_launch("discounted_returns reverse_scan");
}

}  // namespace rlhf::cuda
