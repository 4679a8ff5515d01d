// policy_loss on the GPU (rlhf/policy_loss.h): one block per sequence. Each thread walks
// the sequence's tokens at a stride of kThreads, accumulating its partials in fp32; the
// block then reduces all of them at once (warp shuffles, then one warp over the per-warp
// results) in a fixed order, so results are deterministic (no atomics). GSPO first runs
// the same loop for the sequence's mean log-ratio (and mean KL; geo_mean its statistics too). seq_scale_bwd: one block per sequence.
#include <cuda_runtime.h>

#include "rlhf/cuda_runtime.h"
#include "rlhf/policy_loss.h"
#include "rlhf/reduce.cuh"

namespace rlhf::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
static_assert(kThreads % 32 == 0 && kWarps <= 32, "one warp reduces the per-warp results");
// Resident blocks per SM the forward is compiled for: caps it at 64 registers. Without a
// minimum, ptxas for sm_90a aims at 40 registers and spills one; 4 blocks of 256 threads
// keep enough loads in flight for this bandwidth-bound loop.
constexpr int kFwdMinBlocks = 4;

// The reduction of partial column k (sum, or min / max for the ratio extremes).
struct PartialOps {
  __device__ __forceinline__ float operator()(int k, float a, float b) const {
    return k == kPartRatioMin ? fminf(a, b) : (k == kPartRatioMax ? fmaxf(a, b) : a + b);
  }
  __device__ __forceinline__ float identity(int k) const { return partial_identity(k); }
};

struct SumOps {
  __device__ __forceinline__ float operator()(int, float a, float b) const { return a + b; }
  __device__ __forceinline__ float identity(int) const { return 0.0f; }
};

// Reduces each v[k] over the block (blockDim.x == kThreads) with ops(k, ., .); every
// thread gets the results. scratch: K x 32 floats of shared memory, free again on return.
// Must be reached by every thread of the block (it synchronizes).
template <int K, class Ops>
__device__ __forceinline__ void block_reduce_all(float (&v)[K], Ops ops, float (*scratch)[32]) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    for (int offset = 16; offset > 0; offset >>= 1) v[k] = ops(k, v[k], __shfl_xor_sync(kFullMask, v[k], offset));
    if (lane == 0) scratch[k][warp] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    v[k] = lane < kWarps ? scratch[k][lane] : ops.identity(k);
    for (int offset = 16; offset > 0; offset >>= 1) v[k] = ops(k, v[k], __shfl_xor_sync(kFullMask, v[k], offset));
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kThreads, kFwdMinBlocks)
    policy_loss_fwd_kernel(PolicyLossInputs in, PolicyLossOptions o, float* g, float* partials) {
  __shared__ float scratch[kNumPartials][32];
  const int64_t seq = blockIdx.x;
  const int64_t start = load_index(in.cu_seqlens, seq);
  const int64_t end = load_index(in.cu_seqlens, seq + 1);

  SeqStats stats{0.0f, 0.0f, 0.0f};
  if (sequence_level(o.loss)) {  // uniform over the block: the reduction's barriers are reached by all
    float sums[kNumSeqSums] = {0.0f, 0.0f, 0.0f, 0.0f};  // see add_seq_stats
    for (int64_t i = start + threadIdx.x; i < end; i += kThreads) add_seq_stats(in, o, i, seq, sums);
    block_reduce_all(sums, SumOps(), scratch);
    stats = seq_stats(sums);
  }

  float acc[kNumPartials];
#pragma unroll
  for (int k = 0; k < kNumPartials; ++k) acc[k] = partial_identity(k);
  for (int64_t i = start + threadIdx.x; i < end; i += kThreads) accumulate_token(in, o, i, seq, stats, g, acc);
  block_reduce_all(acc, PartialOps(), scratch);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < kNumPartials; ++k) partials[seq * kNumPartials + k] = acc[k];
  }
}

__global__ void __launch_bounds__(kThreads)
    seq_scale_kernel(In grad, In w, In x, In cu_seqlens, float scale, void* out, int out_dtype) {
  const int64_t seq = blockIdx.x;
  const float coef = scale * load(grad, 0) * load(w, seq);
  const int64_t end = load_index(cu_seqlens, seq + 1);
  for (int64_t i = load_index(cu_seqlens, seq) + threadIdx.x; i < end; i += kThreads) {
    store(out, out_dtype, i, coef * load(x, i));
  }
}

}  // namespace

void policy_loss_fwd(const PolicyLossInputs& in, const PolicyLossOptions& o, float* g, float* partials,
                     int64_t num_seqs, std::uintptr_t stream) {
  if (num_seqs == 0) return;
  policy_loss_fwd_kernel<<<unsigned(num_seqs), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(in, o, g,
                                                                                                       partials);
  check_launch("policy_loss_fwd_kernel");
}

void seq_scale_bwd(In grad, In w, In x, In cu_seqlens, float scale, void* out, int out_dtype, int64_t num_seqs,
                   std::uintptr_t stream) {
  if (num_seqs == 0) return;
  seq_scale_kernel<<<unsigned(num_seqs), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      grad, w, x, cu_seqlens, scale, out, out_dtype);
  check_launch("seq_scale_kernel");
}

}  // namespace rlhf::cuda
