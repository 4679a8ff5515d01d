// Host twin of csrc/cuda/policy_loss.cu: the same per-token formulas (rlhf/policy_loss.h),
// one sequence per OpenMP iteration. A sequence is summed in token order in double, by
// one thread, so the partials do not depend on the thread count.
#include "rlhf/policy_loss.h"

namespace rlhf::cpu {
namespace {

// A sequence-level loss's sequence means (add_seq_stats), summed in token order in double.
SeqStats sequence_stats(const PolicyLossInputs& in, const PolicyLossOptions& o, int64_t seq, int64_t start,
                        int64_t end) {
  double sums[kNumSeqSums] = {0, 0, 0, 0};
  for (int64_t i = start; i < end; ++i) add_seq_stats(in, o, i, seq, sums);
  return seq_stats(sums);
}

}  // namespace

void policy_loss_fwd(const PolicyLossInputs& in, const PolicyLossOptions& o, float* g, float* partials,
                     int64_t num_seqs, int threads) {
  // Sequences differ in length: dynamic scheduling balances them (each is still summed by one thread).
#pragma omp parallel for num_threads(threads) schedule(dynamic, 4)
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    const int64_t start = load_index(in.cu_seqlens, seq);
    const int64_t end = load_index(in.cu_seqlens, seq + 1);
    const SeqStats stats = sequence_level(o.loss) ? sequence_stats(in, o, seq, start, end) : SeqStats{0.0f, 0.0f, 0.0f};
    double acc[kNumPartials];
    for (int k = 0; k < kNumPartials; ++k) acc[k] = partial_identity(k);
    for (int64_t i = start; i < end; ++i) accumulate_token(in, o, i, seq, stats, g, acc);
    float* row = partials + seq * kNumPartials;
    for (int k = 0; k < kNumPartials; ++k) row[k] = float(acc[k]);
  }
}

void seq_scale_bwd(In grad, In w, In x, In cu_seqlens, float scale, void* out, int out_dtype, int64_t num_seqs,
                   int threads) {
  const float upstream = load(grad, 0);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 4)
  for (int64_t seq = 0; seq < num_seqs; ++seq) {
    const float coef = scale * upstream * load(w, seq);
    const int64_t end = load_index(cu_seqlens, seq + 1);
    for (int64_t i = load_index(cu_seqlens, seq); i < end; ++i) store(out, out_dtype, i, coef * load(x, i));
  }
}

}  // namespace rlhf::cpu
