// Host twins of csrc/cuda/advantages.cu, with the statistics and per-element formulas of
// rlhf/advantages.h. Reductions run over fixed chunks (or serially in index order) and are
// combined in order, so no result depends on the thread count.
#include <cmath>
#include <vector>

#include "rlhf/chunks.h"
#include "rlhf/advantages.h"

namespace rlhf::cpu {
namespace {

// The weighted sums of a whitening: sum w, sum w x and the centred sum w (x - mean)^2.
struct Moments {
  double count, sum, square;
};

// Two centred passes over fixed chunks (as the kernel's two passes), in double: the sums run
// over the whole tensor.
Moments whiten_moments(In x, In mask, int64_t n, int threads) {
  const int64_t chunks = chunk_count(n);
  std::vector<double> count(chunks), sum(chunks), square(chunks);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    double w_sum = 0, wx_sum = 0;
    for (int64_t i = chunk_begin(c); i < chunk_end(c, n); ++i) {
      const float w = whiten_weight(mask, i);
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
      const float w = whiten_weight(mask, i);
      if (w != 0) {
        const double d = load(x, i) - mean;
        acc += w * d * d;
      }
    }
    square[c] = acc;
  }
  double total_square = 0;
  for (int64_t c = 0; c < chunks; ++c) total_square += square[c];
  return {total_count, total_sum, total_square};
}

// The fixed layout: every group is G consecutive scores, one task per group (as one warp per
// group on the GPU).
void fixed_groups(In scores, In lengths, float* out, int64_t group_size, int64_t num_groups, int method, int scale,
                  float eps, bool verl, float batch_sd, int threads) {
  const bool opo = method == kOpo;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t g = 0; g < num_groups; ++g) {
    const int64_t begin = g * group_size, end = begin + group_size;
    double sum = 0, length_sum = 0, length_score_sum = 0;
    for (int64_t i = begin; i < end; ++i) {
      const float s = load(scores, i);
      sum += s;
      if (opo) {
        const float length = load(lengths, i);
        length_sum += length;
        length_score_sum += double(length) * s;
      }
    }
    const float mean = float(sum) / float(group_size);  // the mean group_stats computes
    double square = 0;
    for (int64_t i = begin; i < end; ++i) {
      const float d = load(scores, i) - mean;
      square += double(d) * d;
    }
    const GroupStats stats =
        group_stats(float(group_size), float(sum), float(square), float(length_sum), float(length_score_sum));
    for (int64_t i = begin; i < end; ++i) {
      out[i] = group_advantage(load(scores, i), stats, batch_sd, eps, method, scale, verl);
    }
  }
}

bool valid_group(int64_t g, int64_t num_groups) { return g >= 0 && g < num_groups; }

// The group_ids layout: the per-group sums are one serial pass each, in index order (O(S),
// and the order fixes the result); the elementwise pass runs over fixed chunks.
void grouped_by_ids(In scores, In ids, In lengths, float* out, int64_t n, int64_t num_groups, int method, int scale,
                    float eps, bool verl, float batch_sd, int threads) {
  const bool opo = method == kOpo;
  std::vector<double> count(num_groups), sum(num_groups), length_sum(opo ? num_groups : 0),
      length_score_sum(opo ? num_groups : 0), square(num_groups);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = load_index(ids, i);
    if (!valid_group(g, num_groups)) continue;
    const float s = load(scores, i);
    count[g] += 1;
    sum[g] += s;
    if (opo) {
      const float length = load(lengths, i);
      length_sum[g] += length;
      length_score_sum[g] += double(length) * s;
    }
  }
  std::vector<float> mean(num_groups);
  for (int64_t g = 0; g < num_groups; ++g) mean[g] = count[g] > 0 ? float(sum[g]) / float(count[g]) : 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = load_index(ids, i);
    if (!valid_group(g, num_groups)) continue;
    const float d = load(scores, i) - mean[g];
    square[g] += double(d) * d;
  }
  std::vector<GroupStats> stats(num_groups);
  for (int64_t g = 0; g < num_groups; ++g) {
    stats[g] = group_stats(float(count[g]), float(sum[g]), float(square[g]), opo ? float(length_sum[g]) : 0.0f,
                           opo ? float(length_score_sum[g]) : 0.0f);
  }
  const int64_t chunks = chunk_count(n);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t i = chunk_begin(c); i < chunk_end(c, n); ++i) {
      const int64_t g = load_index(ids, i);
      out[i] = valid_group(g, num_groups)
                   ? group_advantage(load(scores, i), stats[g], batch_sd, eps, method, scale, verl)
                   : bad_group_value();
    }
  }
}

}  // namespace

void masked_whiten(In x, In mask, float* out, int64_t n, bool shift_mean, float eps, int threads) {
  const Moments m = whiten_moments(x, mask, n, threads);
  const WhitenStats stats = whiten_stats(float(m.count), float(m.sum), float(m.square), eps);
  const float offset = shift_mean ? 0.0f : stats.mean;
  const int64_t chunks = chunk_count(n);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t i = chunk_begin(c); i < chunk_end(c, n); ++i) {
      out[i] = whiten_weight(mask, i) != 0 ? (load(x, i) - stats.mean) * stats.inv_std + offset : 0.0f;
    }
  }
}

void group_advantages(In scores, In group_ids, In lengths, float* out, int64_t n, int64_t group_size,
                      int64_t num_groups, int method, int scale, float eps, bool verl, int threads) {
  if (n == 0) return;
  float batch_sd = 0.0f;
  if (method == kGrpo && scale == kScaleBatch) {
    const Moments m = whiten_moments(scores, In{nullptr, kF32}, n, threads);
    batch_sd = batch_std(float(m.count), float(m.square), verl);
  }
  if (group_ids.ptr) {
    grouped_by_ids(scores, group_ids, lengths, out, n, num_groups, method, scale, eps, verl, batch_sd, threads);
  } else {
    fixed_groups(scores, lengths, out, group_size, num_groups, method, scale, eps, verl, batch_sd, threads);
  }
  if (method == kReinforcePpBaseline) {
    // Whitened in place over the batch, each sample weighted by its length (1 without lengths).
    masked_whiten(In{out, kF32}, lengths, out, n, true, eps, threads);
  }
}

}  // namespace rlhf::cpu
