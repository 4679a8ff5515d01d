// The advantage family on the GPU (rlhf/advantages.h). No atomics and fixed summation
// orders: every result is deterministic.
//
// masked_whiten: three launches over a fixed grid of at most kBlocks blocks, each
// grid-striding over the input. Pass 1 writes each block's (sum w, sum w x); pass 2
// re-reduces those few partials to the mean and writes sum w (x - mean)^2; pass 3 re-reduces
// all partials and writes the output.
//
// group_advantages: one warp per group. Fixed layout: the warp reads its G consecutive
// scores three times (sums, centred squares, output) in one launch. group_ids layout: the
// warp of group g scans all S ids for its members (ids staged in shared memory, one tile
// shared by the block's kWarps groups), in index order within each lane, then reduces over
// the lanes: a fixed order, so the result is deterministic (the Triton kernel's float
// atomics are not). The cost is O(S * num_groups) shared-memory id reads (S * num_groups /
// kWarps from global memory): cheap at RLHF batch sizes (thousands of sequences, hundreds
// of groups), quadratic for huge ones (estimated, not measured: tens of milliseconds for
// S = 10^6 in 10^5 groups; the fixed layout or the triton backend suit those). A second
// launch writes each sample's advantage from its group's statistics. The batch std (scale
// "batch") is whitening passes 1-2 over the scores with unit weights, re-reduced by every
// block of the advantage launch; REINFORCE++-baseline whitens the output in place afterwards.
#include <cuda_runtime.h>

#include "rlhf/cuda_runtime.h"
#include "rlhf/reduce.cuh"
#include "rlhf/advantages.h"

namespace rlhf::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;  // groups per block of the group kernels
constexpr int kBlocks = kWhitenBlocks;  // partials per pass; one block of kThreads re-reduces them
static_assert(kBlocks <= kThreads, "sum_partials reads one partial a thread");
constexpr int kIdTile = 1024;  // ids staged per step of the group_ids scan (8 KiB as int64)
static_assert(kIdTile % kThreads == 0, "stage_ids loads the same number of ids in every thread");
constexpr int kApplyBlocks = 4096;  // grid cap of the elementwise pass (it grid-strides)

int blocks_for(int64_t n) {
  const int64_t wanted = (n + 4 * kThreads - 1) / (4 * kThreads);
  return int(wanted < 1 ? 1 : (wanted > kBlocks ? kBlocks : wanted));
}

// The sum over the `parts` partials at `partials` (parts <= kThreads), in every thread.
__device__ float sum_partials(const float* partials, int parts, float* scratch) {
  return block_sum(threadIdx.x < parts ? partials[threadIdx.x] : 0.0f, scratch);
}

__global__ void __launch_bounds__(kThreads) whiten_sums(In x, In mask, float* partials, int64_t n) {
  __shared__ float scratch[32];
  float w_sum = 0.0f, wx_sum = 0.0f;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    const float w = whiten_weight(mask, i);
    if (w != 0.0f) {  // padding may hold NaN: values at zero weight are never read into a sum
      w_sum += w;
      wx_sum += w * load(x, i);
    }
  }
  w_sum = block_sum(w_sum, scratch);
  wx_sum = block_sum(wx_sum, scratch);
  if (threadIdx.x == 0) {
    partials[blockIdx.x] = w_sum;
    partials[gridDim.x + blockIdx.x] = wx_sum;
  }
}

__global__ void __launch_bounds__(kThreads) whiten_squares(In x, In mask, float* partials, int64_t n) {
  __shared__ float scratch[32];
  const int parts = gridDim.x;
  const float count = sum_partials(partials, parts, scratch);
  const float mean = count > 0 ? sum_partials(partials + parts, parts, scratch) / count : 0.0f;
  float acc = 0.0f;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    const float w = whiten_weight(mask, i);
    if (w != 0.0f) {
      const float d = load(x, i) - mean;
      acc += w * d * d;
    }
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) partials[2 * parts + blockIdx.x] = acc;
}

// x may alias out: each thread reads x[i] before it writes out[i], after the partials.
__global__ void __launch_bounds__(kThreads)
    whiten_apply(In x, In mask, float* out, const float* partials, int64_t n, bool shift_mean, float eps) {
  __shared__ float scratch[32];
  const int parts = gridDim.x;
  const float count = sum_partials(partials, parts, scratch);
  const float sum = sum_partials(partials + parts, parts, scratch);
  const float square = sum_partials(partials + 2 * parts, parts, scratch);
  const WhitenStats stats = whiten_stats(count, sum, square, eps);
  const float offset = shift_mean ? 0.0f : stats.mean;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    out[i] = whiten_weight(mask, i) != 0.0f ? (load(x, i) - stats.mean) * stats.inv_std + offset : 0.0f;
  }
}

// Whitening passes 1-2 (the partials at `partials`, 3 rows of the returned block count).
int whiten_partials(In x, In mask, float* partials, int64_t n, cudaStream_t s) {
  const int blocks = blocks_for(n);
  whiten_sums<<<blocks, kThreads, 0, s>>>(x, mask, partials, n);
  check_launch("whiten_sums");
  whiten_squares<<<blocks, kThreads, 0, s>>>(x, mask, partials, n);
  check_launch("whiten_squares");
  return blocks;
}

// The batch std of scale "batch" from the unit-weight whitening partials of the scores, in
// every thread of the block (all of them must call it).
__device__ float batch_std_of(const float* partials, int parts, bool verl, float* scratch) {
  const float count = sum_partials(partials, parts, scratch);
  const float square = sum_partials(partials + 2 * parts, parts, scratch);
  return batch_std(count, square, verl);
}

// Fixed layout: warp w of block b owns group b * kWarps + w, scores [g G, (g + 1) G).
__global__ void __launch_bounds__(kThreads)
    group_fixed(In scores, In lengths, float* out, const float* batch, int batch_parts, int64_t group_size,
                int64_t num_groups, int method, int scale, float eps, bool verl) {
  __shared__ float scratch[32];
  // Before any warp leaves: the block-wide re-reduction needs every thread.
  const bool by_batch = method == kGrpo && scale == kScaleBatch;
  const float batch_sd = by_batch ? batch_std_of(batch, batch_parts, verl, scratch) : 0.0f;
  const int64_t g = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (g >= num_groups) return;  // a whole warp: the shuffles below keep all 32 lanes
  const int lane = threadIdx.x & 31;
  const bool opo = method == kOpo;
  const int64_t begin = g * group_size, end = begin + group_size;
  float sum = 0.0f, length_sum = 0.0f, length_score_sum = 0.0f;
  for (int64_t i = begin + lane; i < end; i += 32) {
    const float s = load(scores, i);
    sum += s;
    if (opo) {
      const float length = load(lengths, i);
      length_sum += length;
      length_score_sum += length * s;
    }
  }
  sum = warp_reduce(sum, Sum());
  if (opo) {
    length_sum = warp_reduce(length_sum, Sum());
    length_score_sum = warp_reduce(length_score_sum, Sum());
  }
  const float count = float(group_size);
  const float mean = sum / count;  // the mean group_stats computes
  float square = 0.0f;
  for (int64_t i = begin + lane; i < end; i += 32) {
    const float d = load(scores, i) - mean;
    square += d * d;
  }
  square = warp_reduce(square, Sum());
  const GroupStats stats = group_stats(count, sum, square, length_sum, length_score_sum);
  for (int64_t i = begin + lane; i < end; i += 32) {
    out[i] = group_advantage(load(scores, i), stats, batch_sd, eps, method, scale, verl);
  }
}

// Stages ids [base, base + kIdTile) into `tile` (-1 past n, which matches no group) between
// two barriers: every warp is done with the previous tile and sees all of the new one. A
// fixed trip count (unrolled) keeps ptxas from spilling the loop state across the barriers.
__device__ __forceinline__ void stage_ids(int64_t* tile, In ids, int64_t base, int64_t n) {
  __syncthreads();
#pragma unroll
  for (int r = 0; r < kIdTile / kThreads; ++r) {
    const int k = r * kThreads + int(threadIdx.x);
    tile[k] = base + k < n ? load_index(ids, base + k) : -1;
  }
  __syncthreads();
}

// group_ids layout, statistics: warp w of block b owns group g = b * kWarps + w and writes its
// GroupStats as column g of the 4 rows at `stats` (n, mean, var, lmean). Warps past the last
// group still stage ids and meet every barrier; they write nothing.
__global__ void __launch_bounds__(kThreads)
    group_ids_stats(In scores, In ids, In lengths, float* stats, int64_t n, int64_t num_groups, bool opo) {
  __shared__ int64_t tile[kIdTile];
  const int64_t g = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  float count = 0.0f, sum = 0.0f, length_sum = 0.0f, length_score_sum = 0.0f;
  for (int64_t base = 0; base < n; base += kIdTile) {
    stage_ids(tile, ids, base, n);
    for (int k = lane; k < kIdTile; k += 32) {
      if (tile[k] == g) {
        const float s = load(scores, base + k);
        count += 1.0f;
        sum += s;
        if (opo) {
          const float length = load(lengths, base + k);
          length_sum += length;
          length_score_sum += length * s;
        }
      }
    }
  }
  count = warp_reduce(count, Sum());
  sum = warp_reduce(sum, Sum());
  if (opo) {
    length_sum = warp_reduce(length_sum, Sum());
    length_score_sum = warp_reduce(length_score_sum, Sum());
  }
  const float mean = count > 0 ? sum / count : 0.0f;  // the mean group_stats computes
  float square = 0.0f;
  for (int64_t base = 0; base < n; base += kIdTile) {
    stage_ids(tile, ids, base, n);
    for (int k = lane; k < kIdTile; k += 32) {
      if (tile[k] == g) {
        const float d = load(scores, base + k) - mean;
        square += d * d;
      }
    }
  }
  square = warp_reduce(square, Sum());
  if (lane == 0 && g < num_groups) {
    const GroupStats st = group_stats(count, sum, square, length_sum, length_score_sum);
    stats[g] = st.n;
    stats[num_groups + g] = st.mean;
    stats[2 * num_groups + g] = st.var;
    stats[3 * num_groups + g] = st.lmean;
  }
}

// group_ids layout, output: each sample's advantage from its group's column of `stats`; NaN
// for an id outside [0, num_groups).
__global__ void __launch_bounds__(kThreads)
    group_ids_apply(In scores, In ids, float* out, const float* stats, const float* batch, int batch_parts, int64_t n,
                    int64_t num_groups, int method, int scale, float eps, bool verl) {
  __shared__ float scratch[32];
  const bool by_batch = method == kGrpo && scale == kScaleBatch;
  const float batch_sd = by_batch ? batch_std_of(batch, batch_parts, verl, scratch) : 0.0f;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    const int64_t g = load_index(ids, i);
    if (g < 0 || g >= num_groups) {
      out[i] = bad_group_value();
      continue;
    }
    const GroupStats st{stats[g], stats[num_groups + g], stats[2 * num_groups + g], stats[3 * num_groups + g]};
    out[i] = group_advantage(load(scores, i), st, batch_sd, eps, method, scale, verl);
  }
}

}  // namespace

void masked_whiten(In x, In mask, float* out, float* workspace, int64_t n, bool shift_mean, float eps,
                   std::uintptr_t stream) {
  if (n == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  const int blocks = whiten_partials(x, mask, workspace, n, s);
  whiten_apply<<<blocks, kThreads, 0, s>>>(x, mask, out, workspace, n, shift_mean, eps);
  check_launch("whiten_apply");
}

void group_advantages(In scores, In group_ids, In lengths, float* out, float* workspace, int64_t n,
                      int64_t group_size, int64_t num_groups, int method, int scale, float eps, bool verl,
                      std::uintptr_t stream) {
  if (n == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  float* batch = workspace;  // 3 * kWhitenBlocks floats: whitening partials
  int batch_parts = 0;
  if (method == kGrpo && scale == kScaleBatch) batch_parts = whiten_partials(scores, In{nullptr, kF32}, batch, n, s);
  const int group_blocks = int((num_groups + kWarps - 1) / kWarps);
  if (group_ids.ptr) {
    float* stats = workspace + 3 * kWhitenBlocks;  // 4 rows of num_groups
    if (num_groups > 0) {  // else every id is out of range: the output is all NaN
      group_ids_stats<<<group_blocks, kThreads, 0, s>>>(scores, group_ids, lengths, stats, n, num_groups,
                                                       method == kOpo);
      check_launch("group_ids_stats");
    }
    const int64_t wanted = (n + kThreads - 1) / kThreads;
    const int apply_blocks = int(wanted < kApplyBlocks ? wanted : kApplyBlocks);
    group_ids_apply<<<apply_blocks, kThreads, 0, s>>>(scores, group_ids, out, stats, batch, batch_parts, n,
                                                      num_groups, method, scale, eps, verl);
    check_launch("group_ids_apply");
  } else {
    group_fixed<<<group_blocks, kThreads, 0, s>>>(scores, lengths, out, batch, batch_parts, group_size, num_groups,
                                                  method, scale, eps, verl);
    check_launch("group_fixed");
  }
  // Whitened in place over the batch, each sample weighted by its length (1 without lengths).
  if (method == kReinforcePpBaseline) masked_whiten(In{out, kF32}, lengths, out, workspace, n, true, eps, stream);
}

}  // namespace rlhf::cuda
