// Host twin of csrc/cuda/gae.cu: the same per-token affine maps (rlhf/gae.h), applied by a
// plain backward loop over each sequence, the state in fp32 like the kernel's. OpenMP runs
// whole sequences, each on one thread, so the result does not depend on the thread count.
#include "rlhf/gae.h"

namespace rlhf::cpu {

void gae(Strided rewards, Strided values, Strided mask, In cu_seqlens, float* advantages, float* returns,
         int64_t num_seqs, int64_t T, float gamma, float gamma_lam, int threads) {
  // Dynamic: packed sequences differ in length, so a static split could leave threads idle.
#pragma omp parallel for num_threads(threads) schedule(dynamic, 8)
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    const Span span = sequence_span(cu_seqlens, seq, T);
    float* adv = advantages + output_row(cu_seqlens, seq, T);
    float* ret = returns + output_row(cu_seqlens, seq, T);
    float u = 0.0f;  // V of the first valid token after i (0 past the end)
    float h = 0.0f;  // A of the first valid token after i
    for (int64_t i = span.end - 1; i >= span.begin; --i) {
      const bool valid = load_at(mask, seq, i) != 0.0f;
      const float r = valid ? load_at(rewards, seq, i) : 0.0f;
      const float v = valid ? load_at(values, seq, i) : 0.0f;
      h = affine_apply(advantage_step(valid, r, v, u, gamma, gamma_lam), h);
      u = affine_apply(value_step(valid, v), u);
      adv[i] = valid ? h : 0.0f;
      ret[i] = valid ? h + v : 0.0f;
    }
  }
}

void discounted_returns(Strided rewards, Strided mask, In cu_seqlens, float* out, int64_t num_seqs, int64_t T,
                        float gamma, int threads) {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 8)
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    const Span span = sequence_span(cu_seqlens, seq, T);
    float* g = out + output_row(cu_seqlens, seq, T);
    float h = 0.0f;  // G of the first valid token after i
    for (int64_t i = span.end - 1; i >= span.begin; --i) {
      const bool valid = load_at(mask, seq, i) != 0.0f;
      h = affine_apply(return_step(valid, valid ? load_at(rewards, seq, i) : 0.0f, gamma), h);
      g[i] = valid ? h : 0.0f;
    }
  }
}

}  // namespace rlhf::cpu
