// The advantage family (spec: rlhf_engine/reference/advantages.py).
//
// masked_whiten: y = (x - mean) / sqrt(var + eps) over the positions where mask != 0
// (mask used as weights w; mean = sum(w x) / sum(w), var = sum(w (x - mean)^2) / (sum(w) - 1),
// unbiased; sum(w) <= 1 maps every valid value to the mean), + mean when !shift_mean, and
// 0 where mask == 0. x: any float dtype, mask: any dtype or absent (ptr null: every weight
// 1), both flat [n]; out fp32 [n]. out may alias x: each output is written by the thread that
// read its x, after both reductions.
//
// group_advantages: per-sequence advantages from scores s [S] (any float dtype) grouped
// either by a fixed group_size G (groups of G consecutive scores, S = num_groups * G) or by
// group_ids [S] (int32 / int64, any order). With a group's count n, mean mu, unbiased var
// and length-weighted mean b = sum(L s) / sum(L) (mu when sum(L) == 0), group_advantage
// below gives each sample's value (method / scale / preset as in the spec: GRPO
// (s - mu) / (std + eps) with std the group's or the batch's, Dr. GRPO s - mu, RLOO
// n / (n - 1) (s - mu), OPO s - b, REINFORCE++-baseline s - mu followed by masked_whiten of
// the result with the lengths as weights (all ones when absent), shift_mean, eps inside the
// rsqrt). Singletons: trl gives 0, verl uses baseline 0 and std 1. An id outside
// [0, num_groups) gives NaN. lengths [S] (any int or float dtype) is read only by opo and
// reinforce_pp_baseline, and may be absent for the latter. out fp32 [S], not aliasing s.
#pragma once

#include <cmath>
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

// The whitening weight of element i: the mask's value, or 1 without a mask.
RLHF_HD float whiten_weight(In mask, int64_t i) { return mask.ptr ? load(mask, i) : 1.0f; }

// Method and scale codes: the order of METHODS / SCALES in reference/advantages.py (and of
// rlhf_engine/native/advantages.py's tables).
enum Method : int { kGrpo = 0, kDrGrpo = 1, kRloo = 2, kReinforcePpBaseline = 3, kOpo = 4 };
enum Scale : int { kScaleGroup = 0, kScaleBatch = 1, kScaleNone = 2 };

// One group's statistics as group_advantage reads them.
struct GroupStats {
  float n;      // members
  float mean;   // mu
  float var;    // unbiased, sum (s - mu)^2 / max(n - 1, 1) (0 for a singleton: unused there)
  float lmean;  // sum(L s) / sum(L), mu when sum(L) == 0 (opo only)
};

// The statistics from a group's sums: count, sum s, sum (s - mu)^2 (centred on mu =
// sum / count), sum L and sum L s (0 unless opo). A group without members gives finite
// values (it is never read).
RLHF_HD GroupStats group_stats(float count, float sum, float square_sum, float length_sum, float length_score_sum) {
  const float mean = count > 0 ? sum / count : 0.0f;
  const float var = square_sum / (count > 1 ? count - 1.0f : 1.0f);
  const float lmean = length_sum > 0 ? length_score_sum / length_sum : mean;
  return {count, mean, var, lmean};
}

// The unbiased std of all S scores for scale "batch" from their (count, sum (s - mean)^2);
// under two scores no spread is known: 0 (trl) or 1 (verl).
RLHF_HD float batch_std(float count, float square_sum, bool verl) {
  if (count < 2.0f) return verl ? 1.0f : 0.0f;
  return sqrtf(square_sum / (count - 1.0f));
}

// One sample's advantage (before REINFORCE++'s whitening, which gets s - mu here) from its
// score s and its group's statistics. trl's singleton is its own baseline, so s - s = 0
// (exactly, at any scale); verl's has baseline 0 and group std 1.
RLHF_HD float group_advantage(float s, GroupStats g, float batch_sd, float eps, int method, int scale, bool verl) {
  const bool single = g.n < 2.0f;
  if (method == kRloo) {  // s - mean of the others = n / (n - 1) (s - mu)
    if (single) return verl ? s : 0.0f;
    return g.n / (g.n - 1.0f) * (s - g.mean);
  }
  const float center = method == kOpo ? g.lmean : g.mean;
  const float y = s - (single ? (verl ? 0.0f : s) : center);
  if (method != kGrpo) return y;
  if (scale == kScaleGroup) {
    const float sd = single ? (verl ? 1.0f : 0.0f) : sqrtf(g.var);
    return y / (sd + eps);
  }
  if (scale == kScaleBatch) return y / (batch_sd + eps);
  return y;
}

// The value written for a sample whose id lies outside [0, num_groups) (as the Triton kernel).
RLHF_HD float bad_group_value() { return bits_to_float(0x7fc00000u); }

namespace cpu {
void masked_whiten(In x, In mask, float* out, int64_t n, bool shift_mean, float eps, int threads);

// group_ids.ptr null: the fixed layout of group_size; else group_size is unused.
void group_advantages(In scores, In group_ids, In lengths, float* out, int64_t n, int64_t group_size,
                      int64_t num_groups, int method, int scale, float eps, bool verl, int threads);
}  // namespace cpu

namespace cuda {
// Blocks of each pass; the caller allocates 3 * kWhitenBlocks floats of device workspace.
constexpr int kWhitenBlocks = 256;
void masked_whiten(In x, In mask, float* out, float* workspace, int64_t n, bool shift_mean, float eps,
                   std::uintptr_t stream);

// Device workspace (floats) of group_advantages: the whitening partials (the batch std, or
// REINFORCE++'s whitening), then with group_ids the 4 rows of GroupStats per group.
constexpr int64_t group_advantages_workspace(int64_t num_groups, bool by_ids) {
  return 3 * kWhitenBlocks + (by_ids ? 4 * num_groups : 0);
}
void group_advantages(In scores, In group_ids, In lengths, float* out, float* workspace, int64_t n,
                      int64_t group_size, int64_t num_groups, int method, int scale, float eps, bool verl,
                      std::uintptr_t stream);
}  // namespace cuda

}  // namespace rlhf
