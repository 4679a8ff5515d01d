// Host twin of csrc/cuda/advantages.cu: the same two centred passes and the same statistics
// (rlhf/advantages.h), over fixed chunks whose partial sums are combined in order, so the
// result does not depend on the thread count.
#include <cmath>
#include <vector>

#include "rlhf/chunks.h"
#include "rlhf/advantages.h"

namespace rlhf::cpu {

void masked_whiten(In x, In mask, float* out, int64_t n, bool shift_mean, float eps, int threads) {
  const int64_t chunks = chunk_count(n);
  std::vector<double> count(chunks), sum(chunks), square(chunks);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    double w_sum = 0, wx_sum = 0;
    for (int64_t i = chunk_begin(c); i < chunk_end(c, n); ++i) {
      const float w = load(mask, i);
      if (w != 0) {  // values at zero weight are never read into a sum (padding may hold NaN)
        w_sum += w;
        wx_sum += double(w) * load(x, i);
      }
    }
    count[c] = w_sum;
    sum[c] = wx_sum;
  }
  double total_count = 0, total_sum = 0;
  for (int64_t c = 0; c < chunks; ++c) total_count += count[c], total_sum += sum[c];
  const double mean = total_count > 0 ? total_sum / total_count : 0.0;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    double acc = 0;
    for (int64_t i = chunk_begin(c); i < chunk_end(c, n); ++i) {
      const float w = load(mask, i);
      if (w != 0) {
        const double d = load(x, i) - mean;
        acc += w * d * d;
      }
    }
    square[c] = acc;
  }
  double total_square = 0;
  for (int64_t c = 0; c < chunks; ++c) total_square += square[c];
  const WhitenStats stats = whiten_stats(float(total_count), float(total_sum), float(total_square), eps);
  const float offset = shift_mean ? 0.0f : stats.mean;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t i = chunk_begin(c); i < chunk_end(c, n); ++i) {
      out[i] = load(mask, i) != 0 ? (load(x, i) - stats.mean) * stats.inv_std + offset : 0.0f;
    }
  }
}

}  // namespace rlhf::cpu
