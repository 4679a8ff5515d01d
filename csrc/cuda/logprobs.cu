// token_logprobs on the GPU (rlhf/logprobs.h). Rows are handled by a warp (V up to
// kWarpRowMaxVocab: 8 rows per block of 256 threads) or by a whole block (larger V), chosen
// by V alone. Either way the row is cut into groups of one 16-byte vector (4 fp32 or 8
// fp16/bf16 columns); thread `lane` of the row takes groups lane, lane + threads, ... and
// folds each into its own online state with the host twin's lse_fold. The forward then
// combines the threads' states: the row max (a max reduction), every state re-centred on it
// (lse_recentre), and sums of s and t, all in a fixed order (no atomics): deterministic.
// The backward needs no reduction: each element's gradient depends on the row's saved lse
// and entropy only, and each thread writes exactly the groups it read (in place safe).
//
// A row is loaded with 16-byte vectors when its address is 16-byte aligned (for the
// backward: logits' and dlogits' rows both), else with scalar loads; a group straddling V
// is always loaded and stored by scalars.
#include <cuda_runtime.h>

#include "rlhf/cuda_runtime.h"
#include "rlhf/logprobs.h"
#include "rlhf/reduce.cuh"

namespace rlhf::cuda {
namespace {

using namespace rlhf::logprobs;

constexpr int kThreads = 256;
constexpr int64_t kWarpRowMaxVocab = 1024;  // a warp covers it in at most 8 (fp32) / 4 (16-bit) groups a lane
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // rows beyond it are grid-strided

// Columns per group: one 16-byte vector.
template <class E>
constexpr int kWidth = 16 / int(sizeof(typename E::Storage));

template <class E>
union Vector {
  uint4 bits;
  typename E::Storage e[kWidth<E>];
};

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// u[k] = x[col + k] * scale as fp32, -inf for columns past `vocab`.
template <class E>
__device__ __forceinline__ void load_group(const typename E::Storage* x, int64_t col, int64_t vocab, bool vector,
                                           float scale, float (&u)[kWidth<E>]) {
  constexpr int W = kWidth<E>;
  if (vector && col + W <= vocab) {
    Vector<E> v;
    v.bits = *reinterpret_cast<const uint4*>(x + col);
#pragma unroll
    for (int k = 0; k < W; ++k) u[k] = E::to_float(v.e[k]) * scale;
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) u[k] = col + k < vocab ? E::to_float(x[col + k]) * scale : -INFINITY;
  }
}

// dx[col + k] = g[k] in the logits dtype, for the columns below `vocab`.
template <class E>
__device__ __forceinline__ void store_group(typename E::Storage* dx, int64_t col, int64_t vocab, bool vector,
                                            const float (&g)[kWidth<E>]) {
  constexpr int W = kWidth<E>;
  if (vector && col + W <= vocab) {
    Vector<E> v;
#pragma unroll
    for (int k = 0; k < W; ++k) v.e[k] = E::from_float(g[k]);
    *reinterpret_cast<uint4*>(dx + col) = v.bits;
  } else {
#pragma unroll
    for (int k = 0; k < W; ++k) {
      if (col + k < vocab) dx[col + k] = E::from_float(g[k]);
    }
  }
}

// A reduction over the kRowThreads threads of one row: a warp's shuffles, or the block's
// (which synchronizes: called in control flow uniform over the block).
template <int kRowThreads, class Op>
__device__ __forceinline__ float row_reduce(float v, Op op, float identity, float* scratch) {
  if constexpr (kRowThreads == 32) {
    return warp_reduce(v, op);
  } else {
    static_assert(kRowThreads == kThreads, "a row is one warp or the whole block");
    return block_reduce(v, op, identity, scratch);
  }
}

template <class E, int kRowThreads, bool WithEntropy>
__global__ void __launch_bounds__(kThreads)
    token_logprobs_fwd_kernel(const typename E::Storage* logits, RowLayout layout, int64_t rows, int64_t vocab,
                              In labels, float* logp, float* entropy, float* lse, float log2e_over_t, float inv_t,
                              int64_t ignore_index) {
  __shared__ float scratch[32];
  constexpr int W = kWidth<E>;
  constexpr int kRowsPerBlock = kThreads / kRowThreads;
  const int lane = threadIdx.x % kRowThreads;
  const int64_t groups = (vocab + W - 1) / W;
  // `row` is the same for all threads of a row (a warp, or the block): every branch on it
  // or on its label is uniform there, as the reductions need.
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kRowThreads; row < rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    const int64_t label = load_index(labels, row);
    const bool ignored = label == ignore_index;
    const bool out_of_range = label < 0 || label >= vocab;
    LseState st = lse_empty();
    float z_label = 0.0f;
    if (!ignored && !out_of_range) {  // the other rows read no logits
      const typename E::Storage* x = logits + layout.offset(row);
      const bool vector = aligned16(x);
      for (int64_t g = lane; g < groups; g += kRowThreads) {
        float u[W];
        load_group<E>(x, g * W, vocab, vector, log2e_over_t, u);
        lse_fold<W, WithEntropy>(st, u);
      }
      const float m = row_reduce<kRowThreads>(st.m, Max(), -INFINITY, scratch);
      lse_recentre<WithEntropy>(st, lse_centre(m));
      st.m = m;
      st.s = row_reduce<kRowThreads>(st.s, Sum(), 0.0f, scratch);
      if (WithEntropy) st.t = row_reduce<kRowThreads>(st.t, Sum(), 0.0f, scratch);
      if (lane == 0) z_label = E::to_float(x[label]) * inv_t;
    }
    if (lane == 0) {
      const RowResult r = row_result(st, z_label, ignored, out_of_range);
      logp[row] = r.logp;
      lse[row] = r.lse;
      if (WithEntropy) entropy[row] = r.entropy;
    }
  }
}

template <class E, int kRowThreads, bool WithEntropy>
__global__ void __launch_bounds__(kThreads)
    token_logprobs_bwd_kernel(In grad_logp, int64_t grad_logp_stride, In grad_entropy, int64_t grad_entropy_stride,
                              const typename E::Storage* logits, RowLayout layout, typename E::Storage* dlogits,
                              RowLayout d_layout, int64_t rows, int64_t vocab, In labels, const float* lse,
                              const float* entropy, float log2e_over_t, float inv_t, int64_t ignore_index,
                              int64_t label_offset) {
  constexpr int W = kWidth<E>;
  constexpr int kRowsPerBlock = kThreads / kRowThreads;
  const int lane = threadIdx.x % kRowThreads;
  const int64_t groups = (vocab + W - 1) / W;
  for (int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / kRowThreads; row < rows;
       row += int64_t(gridDim.x) * kRowsPerBlock) {
    const int64_t label = load_index(labels, row);
    typename E::Storage* dx = dlogits + d_layout.offset(row);
    if (label == ignore_index) {  // a zero row; the logits are not read
      const bool vector = aligned16(dx);
      const float zeros[W] = {};
      for (int64_t g = lane; g < groups; g += kRowThreads) store_group<E>(dx, g * W, vocab, vector, zeros);
      continue;
    }
    // May be dx itself: each thread loads a group before it stores that same group.
    const typename E::Storage* x = logits + layout.offset(row);
    const bool vector = aligned16(x) && aligned16(dx);
    const GradRow r =
        grad_row<WithEntropy>(grad_logp, grad_logp_stride, grad_entropy, grad_entropy_stride, lse, entropy, row, inv_t);
    const int64_t label_col = label - label_offset;
    for (int64_t g = lane; g < groups; g += kRowThreads) {
      const int64_t col = g * W;
      float u[W];
      load_group<E>(x, col, vocab, vector, log2e_over_t, u);
      float grad[W];
#pragma unroll
      for (int k = 0; k < W; ++k) grad[k] = grad_element<WithEntropy>(u[k], col + k == label_col, r);
      store_group<E>(dx, col, vocab, vector, grad);
    }
  }
}

// (blocks, row per warp?) for `rows` rows of `vocab` columns.
struct Grid {
  int blocks;
  bool warp_rows;
};

Grid grid_for(int64_t rows, int64_t vocab) {
  const bool warp_rows = vocab <= kWarpRowMaxVocab;
  const int64_t rows_per_block = warp_rows ? kThreads / 32 : 1;
  const int64_t wanted = (rows + rows_per_block - 1) / rows_per_block;
  return {int(wanted < kMaxBlocks ? wanted : kMaxBlocks), warp_rows};
}

template <class E, bool WithEntropy>
void launch_fwd(In logits, RowLayout layout, int64_t rows, int64_t vocab, In labels, float* logp, float* entropy,
                float* lse, float log2e_over_t, float inv_t, int64_t ignore_index, cudaStream_t stream) {
  const auto* x = static_cast<const typename E::Storage*>(logits.ptr);
  const Grid grid = grid_for(rows, vocab);
  if (grid.warp_rows) {
    token_logprobs_fwd_kernel<E, 32, WithEntropy><<<grid.blocks, kThreads, 0, stream>>>(
        x, layout, rows, vocab, labels, logp, entropy, lse, log2e_over_t, inv_t, ignore_index);
  } else {
    token_logprobs_fwd_kernel<E, kThreads, WithEntropy><<<grid.blocks, kThreads, 0, stream>>>(
        x, layout, rows, vocab, labels, logp, entropy, lse, log2e_over_t, inv_t, ignore_index);
  }
  check_launch("token_logprobs_fwd_kernel");
}

template <class E, bool WithEntropy>
void launch_bwd(In grad_logp, int64_t grad_logp_stride, In grad_entropy, int64_t grad_entropy_stride, In logits,
                RowLayout layout, void* dlogits, RowLayout d_layout, int64_t rows, int64_t vocab, In labels,
                const float* lse, const float* entropy, float log2e_over_t, float inv_t, int64_t ignore_index,
                int64_t label_offset, cudaStream_t stream) {
  using S = typename E::Storage;
  const auto* x = static_cast<const S*>(logits.ptr);
  auto* dx = static_cast<S*>(dlogits);
  const Grid grid = grid_for(rows, vocab);
  if (grid.warp_rows) {
    token_logprobs_bwd_kernel<E, 32, WithEntropy><<<grid.blocks, kThreads, 0, stream>>>(
        grad_logp, grad_logp_stride, grad_entropy, grad_entropy_stride, x, layout, dx, d_layout, rows, vocab, labels,
        lse, entropy, log2e_over_t, inv_t, ignore_index, label_offset);
  } else {
    token_logprobs_bwd_kernel<E, kThreads, WithEntropy><<<grid.blocks, kThreads, 0, stream>>>(
        grad_logp, grad_logp_stride, grad_entropy, grad_entropy_stride, x, layout, dx, d_layout, rows, vocab, labels,
        lse, entropy, log2e_over_t, inv_t, ignore_index, label_offset);
  }
  check_launch("token_logprobs_bwd_kernel");
}

}  // namespace

void token_logprobs_fwd(In logits, RowLayout layout, int64_t rows, int64_t vocab, In labels, float* logp,
                        float* entropy, float* lse, float log2e_over_t, float inv_t, int64_t ignore_index,
                        std::uintptr_t stream) {
  if (rows == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_logits(logits.dtype, entropy != nullptr, [&](auto tag, auto with_entropy) {
    launch_fwd<decltype(tag), decltype(with_entropy)::value>(logits, layout, rows, vocab, labels, logp, entropy, lse,
                                                             log2e_over_t, inv_t, ignore_index, s);
  });
}

void token_logprobs_bwd(In grad_logp, int64_t grad_logp_stride, In grad_entropy, int64_t grad_entropy_stride,
                        In logits, RowLayout layout, void* dlogits, RowLayout d_layout, int64_t rows, int64_t vocab,
                        In labels, const float* lse, const float* entropy, float log2e_over_t, float inv_t,
                        int64_t ignore_index, int64_t label_offset, std::uintptr_t stream) {
  if (rows == 0) return;
  auto s = reinterpret_cast<cudaStream_t>(stream);
  dispatch_logits(logits.dtype, grad_entropy.ptr != nullptr, [&](auto tag, auto with_entropy) {
    launch_bwd<decltype(tag), decltype(with_entropy)::value>(grad_logp, grad_logp_stride, grad_entropy,
                                                             grad_entropy_stride, logits, layout, dlogits, d_layout,
                                                             rows, vocab, labels, lse, entropy, log2e_over_t, inv_t,
                                                             ignore_index, label_offset, s);
  });
}

}  // namespace rlhf::cuda
