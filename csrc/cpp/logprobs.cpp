// Host twin of csrc/cuda/logprobs.cu (rlhf/logprobs.h): the same per-row algorithm (one
// online base-2 logsumexp over groups of the row, the same fold, finish and gradient
// formulas), one row per OpenMP iteration and the row's groups in order, so every row's
// result is independent of the thread count.
#include "rlhf/logprobs.h"

namespace rlhf::cpu {
namespace {

using namespace rlhf::logprobs;

// Columns folded at a time: one max and one rescale per group, as a CUDA thread does per
// 16-byte vector; wider here, where a rescale costs a libm exp2.
constexpr int kGroup = 64;

template <class E, bool WithEntropy>
void fwd_rows(In logits, RowLayout layout, int64_t rows, int64_t vocab, In labels, float* logp, float* entropy,
              float* lse, float log2e_over_t, float inv_t, int64_t ignore_index, int threads) {
  using S = typename E::Storage;
  const S* base = static_cast<const S*>(logits.ptr);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t label = load_index(labels, row);
    const bool ignored = label == ignore_index;
    const bool out_of_range = label < 0 || label >= vocab;
    LseState st = lse_empty();
    float z_label = 0.0f;
    if (!ignored && !out_of_range) {  // the other rows read no logits
      const S* x = base + layout.offset(row);
      for (int64_t start = 0; start < vocab; start += kGroup) {
        float u[kGroup];
        for (int k = 0; k < kGroup; ++k) {
          u[k] = start + k < vocab ? E::to_float(x[start + k]) * log2e_over_t : -INFINITY;
        }
        lse_fold<kGroup, WithEntropy>(st, u);
      }
      z_label = E::to_float(x[label]) * inv_t;
    }
    const RowResult r = row_result(st, z_label, ignored, out_of_range);
    logp[row] = r.logp;
    lse[row] = r.lse;
    if (WithEntropy) entropy[row] = r.entropy;
  }
}

template <class E, bool WithEntropy>
void bwd_rows(In grad_logp, int64_t grad_logp_stride, In grad_entropy, int64_t grad_entropy_stride, In logits,
              RowLayout layout, void* dlogits, RowLayout d_layout, int64_t rows, int64_t vocab, In labels,
              const float* lse, const float* entropy, float log2e_over_t, float inv_t, int64_t ignore_index,
              int64_t label_offset, int threads) {
  using S = typename E::Storage;
  const S* base = static_cast<const S*>(logits.ptr);
  S* d_base = static_cast<S*>(dlogits);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t label = load_index(labels, row);
    S* dx = d_base + d_layout.offset(row);
    if (label == ignore_index) {  // a zero row; the logits are not read
      for (int64_t i = 0; i < vocab; ++i) dx[i] = E::from_float(0.0f);
      continue;
    }
    const S* x = base + layout.offset(row);  // may be dx itself: x[i] is read before dx[i] is written
    const GradRow r =
        grad_row<WithEntropy>(grad_logp, grad_logp_stride, grad_entropy, grad_entropy_stride, lse, entropy, row, inv_t);
    const int64_t label_col = label - label_offset;
    for (int64_t i = 0; i < vocab; ++i) {
      dx[i] = E::from_float(grad_element<WithEntropy>(E::to_float(x[i]) * log2e_over_t, i == label_col, r));
    }
  }
}

}  // namespace

void token_logprobs_fwd(In logits, RowLayout layout, int64_t rows, int64_t vocab, In labels, float* logp,
                        float* entropy, float* lse, float log2e_over_t, float inv_t, int64_t ignore_index,
                        int threads) {
  dispatch_logits(logits.dtype, entropy != nullptr, [&](auto tag, auto with_entropy) {
    fwd_rows<decltype(tag), decltype(with_entropy)::value>(logits, layout, rows, vocab, labels, logp, entropy, lse,
                                                           log2e_over_t, inv_t, ignore_index, threads);
  });
}

void token_logprobs_bwd(In grad_logp, int64_t grad_logp_stride, In grad_entropy, int64_t grad_entropy_stride,
                        In logits, RowLayout layout, void* dlogits, RowLayout d_layout, int64_t rows, int64_t vocab,
                        In labels, const float* lse, const float* entropy, float log2e_over_t, float inv_t,
                        int64_t ignore_index, int64_t label_offset, int threads) {
  dispatch_logits(logits.dtype, grad_entropy.ptr != nullptr, [&](auto tag, auto with_entropy) {
    bwd_rows<decltype(tag), decltype(with_entropy)::value>(grad_logp, grad_logp_stride, grad_entropy,
                                                           grad_entropy_stride, logits, layout, dlogits, d_layout,
                                                           rows, vocab, labels, lse, entropy, log2e_over_t, inv_t,
                                                           ignore_index, label_offset, threads);
  });
}

}  // namespace rlhf::cpu
