// Block-wide reductions for the CUDA kernels (fixed order: results do not depend on timing).
#pragma once

#include <cuda_runtime.h>

namespace rlhf::cuda {

constexpr unsigned kFullMask = 0xffffffffu;

template <class Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

struct Sum {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct Max {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct Min {
  __device__ __forceinline__ float operator()(float a, float b) const { return fminf(a, b); }
};

// Reduces `v` over the block (blockDim.x a multiple of 32, at most 1024); every thread
// gets the result. `identity` fills the lanes past the last warp; `scratch` is 32 floats
// of shared memory, free again on return.
template <class Op>
__device__ __forceinline__ float block_reduce(float v, Op op, float identity, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_reduce(v, op);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < int(blockDim.x >> 5) ? scratch[lane] : identity;
  v = warp_reduce(v, op);
  __syncthreads();
  return v;
}

__device__ __forceinline__ float block_sum(float v, float* scratch) { return block_reduce(v, Sum(), 0.0f, scratch); }

}  // namespace rlhf::cuda
