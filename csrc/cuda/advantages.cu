// masked_whiten on the GPU (rlhf/advantages.h): three launches over a fixed grid of at most
// kBlocks blocks, each grid-striding over the input. Pass 1 writes each block's (sum w,
// sum w x); pass 2 re-reduces those few partials to the mean and writes sum w (x - mean)^2;
// pass 3 re-reduces all partials and writes the output. No atomics and a fixed summation
// order: the result is deterministic.
#include <cuda_runtime.h>

#include "rlhf/cuda_runtime.h"
#include "rlhf/reduce.cuh"
#include "rlhf/advantages.h"

namespace rlhf::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBlocks = kWhitenBlocks;  // partials per pass; one block of kThreads re-reduces them
static_assert(kBlocks <= kThreads, "sum_partials reads one partial a thread");

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
    const float w = load(mask, i);
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
    const float w = load(mask, i);
    if (w != 0.0f) {
      const float d = load(x, i) - mean;
      acc += w * d * d;
    }
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) partials[2 * parts + blockIdx.x] = acc;
}

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
    out[i] = load(mask, i) != 0.0f ? (load(x, i) - stats.mean) * stats.inv_std + offset : 0.0f;
  }
}

}  // namespace

void masked_whiten(In x, In mask, float* out, float* workspace, int64_t n, bool shift_mean, float eps,
                   std::uintptr_t stream) {
  if (n == 0) return;
  const int blocks = blocks_for(n);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  whiten_sums<<<blocks, kThreads, 0, s>>>(x, mask, workspace, n);
  check_launch("whiten_sums");
  whiten_squares<<<blocks, kThreads, 0, s>>>(x, mask, workspace, n);
  check_launch("whiten_squares");
  whiten_apply<<<blocks, kThreads, 0, s>>>(x, mask, out, workspace, n, shift_mean, eps);
  check_launch("whiten_apply");
}

}  // namespace rlhf::cuda
