// masked_whiten: y = (x - mean) / sqrt(var + eps) over the positions where mask != 0
// (mask used as weights w; mean = sum(w x) / sum(w), var = sum(w (x - mean)^2) / (sum(w) - 1),
// unbiased; sum(w) <= 1 maps every valid value to the mean), + mean when !shift_mean, and
// 0 where mask == 0. x: any float dtype, mask: any dtype, both flat [n]; out fp32 [n]
// (it may not alias x). The spec: rlhf_engine/reference/advantages.py.
#pragma once

#include <cstdint>

#include "rlhf/elements.h"

namespace rlhf {

// (count, mean, 1 / std) of the whitening from the weighted sums; shared by both sides so
// the two finish the statistics identically.
struct WhitenStats {
  float mean;
  float inv_std;
};

RLHF_HD WhitenStats whiten_stats(float count, float sum, float square_sum, float eps) {
  const float mean = count > 0 ? sum / count : 0.0f;
  const float var = count > 1 ? square_sum / (count - 1.0f) : 0.0f;
  // sum(w) <= 1: no spread is known, so every valid value maps to the mean.
  return {mean, count > 1 ? 1.0f / sqrtf(var + eps) : 0.0f};
}

namespace cpu {
void masked_whiten(In x, In mask, float* out, int64_t n, bool shift_mean, float eps, int threads);
}  // namespace cpu

namespace cuda {
// Blocks of each pass; the caller allocates 3 * kWhitenBlocks floats of device workspace.
constexpr int kWhitenBlocks = 256;
void masked_whiten(In x, In mask, float* out, float* workspace, int64_t n, bool shift_mean, float eps,
                   std::uintptr_t stream);
}  // namespace cuda

}  // namespace rlhf
