// policy_loss: the fused per-token policy-gradient loss and its per-sequence partial sums,
// and seq_scale_bwd, the backward shared with the value loss. The spec:
// rlhf_engine/reference/policy_loss.py (and aggregation.py, applied in Python to the
// partials); the Triton twin: kernels/policy_loss.py.
//
// Forward, per sequence b (tokens [cu[b], cu[b+1]) of the flat [N] inputs), per token with
// m = mask != 0, delta = lp - old, r = exp(clamp(x, log_ratio_min, log_ratio_max)) where
// x = delta (x = the sequence's mean delta over valid tokens for gspo, of GMPO's capped delta
// for geo_mean; a bound may be +-inf):
//   l = pg(r, lp, A) * is_w + kl_coef * KL(lp, ref) [* r with kl_ratio_weight] - entropy_coef * H
//   g = m * dl/dlp (fp32 [N], 0 on masked tokens), the gradient saved for backward
// With kl_ratio_weight r is differentiable; for gspo it is the sequence ratio of every
// token's logprob, so d(r KL)/dlp_t = r dKL_t + dr * mean_b(KL) (mean over the valid tokens).
// The partials[b, :] of reference/policy_loss.PARTIALS (enum Partial below): masked sums
// of l, m, clipped, clipped_lower, delta^2/2, r, KL (r KL with kl_ratio_weight), H,
// -clamp(delta) (-delta for gspo / geo_mean: verl's ppo_kl), TRL's cispo clip flag, and the min / max
// of r over valid tokens (+inf / -inf, the identities, for a sequence without one, as the
// Triton kernel writes). pg per loss: see pg_term. A masked token (mask == 0) reads nothing but
// its mask, so padding may hold NaN / inf.
// Inputs: lp, old, ref, H any float dtype [N]; A, is_w any float dtype, [N] or [S]
// (per sequence); mask any dtype [N]; cu int32 / int64 [S+1]; absent optional tensors
// have ptr == nullptr. Outputs g [N] and partials [S, kNumPartials] fp32, which may not
// alias any input.
//
// Backward: out_t = scale * grad * w[b(t)] * x_t, grad a 0-d tensor (read where the kernel
// runs: no host sync), w [S], x [N] (any dtype, bool too), out [N] in any float dtype
// (rounded to nearest even); out may not alias x.
#pragma once

#include <math.h>

#include <cstdint>

#include "rlhf/elements.h"
#include "rlhf/kl.h"

namespace rlhf {

// Codes in the order of reference/policy_loss.LOSSES.
enum PolicyLossKind : int {
  kPpo = 0,
  kGspo = 1,
  kCispo = 2,
  kCispoTrl = 3,
  kSapo = 4,
  kReinforce = 5,
  kDppoTv = 6,
  kDppoKl = 7,
  kGeoMean = 8
};

// Mirror of rlhf_engine/reference/policy_loss.py DPPO_KL_EPS (checked via _C.POLICY_LOSS_CONSTANTS).
constexpr float kDppoKlEps = 1e-8f;

RLHF_HD bool sequence_level(int loss) { return loss == kGspo || loss == kGeoMean; }

// Columns of the partials, in the order of reference/policy_loss.PARTIALS.
enum Partial : int {
  kPartLoss = 0,
  kPartCount,
  kPartClipped,
  kPartClippedLower,
  kPartApproxKl,
  kPartRatio,
  kPartRatioMin,
  kPartRatioMax,
  kPartKl,
  kPartEntropy,
  kPartPpoKl,
  kPartCispoClipped,
  kNumPartials
};

RLHF_HD float positive_infinity() { return bits_to_float(0x7f800000u); }

// The identity of each partial's reduction: 0 for the sums, +inf for the min, -inf for the max.
RLHF_HD float partial_identity(int k) {
  return k == kPartRatioMin ? positive_infinity() : (k == kPartRatioMax ? -positive_infinity() : 0.0f);
}

struct PolicyLossInputs {
  In logp, old_logp, advantages, mask, ref_logp, entropy, is_weights, cu_seqlens;
  bool adv_per_seq, is_per_seq;  // advantages / is_weights hold [S] values, not [N]
};

struct PolicyLossOptions {
  int loss;  // PolicyLossKind
  float clip_low, clip_high;
  bool has_dual_clip, has_delta;
  float dual_clip, delta;
  float log_ratio_min, log_ratio_max;  // the clamp of the log-ratio; -inf / +inf: none
  float sapo_tau_pos, sapo_tau_neg;
  float kl_coef;
  int kl_base;  // KlBase
  bool kl_straight_through, kl_clamp, kl_ratio_weight;
  float entropy_coef;
};

// The policy-gradient term of one token: ratio r, its derivative w.r.t. lp (0 where the
// clamp is active), loss, d loss / d lp, and the clip flags.
struct PgTerm {
  float ratio, dratio, clamped_arg, loss, grad, clipped, lower, cispo_clipped;
};

// GMPO's per-token log-ratio sgn(A) min(sgn(A) d, sgn(A) clamp(d, -clip_low, clip_high)): d
// capped from above where A > 0, from below where A < 0, 0 where A == 0; and its derivative.
RLHF_HD float geo_mean_log_ratio(const PolicyLossOptions& o, float d, float adv) {
  return adv > 0.0f ? fminf(d, o.clip_high) : (adv < 0.0f ? fmaxf(d, -o.clip_low) : 0.0f);
}
RLHF_HD float geo_mean_dlog_ratio(const PolicyLossOptions& o, float d, float adv) {
  return (adv > 0.0f && d <= o.clip_high) || (adv < 0.0f && d >= -o.clip_low) ? 1.0f : 0.0f;
}

// DPPO's mask: the token's probability p = e^lp moved less than the divergence bound from
// q = e^old (total variation, or the binary KL).
RLHF_HD bool dppo_valid(const PolicyLossOptions& o, float lp, float old, float adv) {
  const float p = expf(lp);
  const float q = expf(old);
  if (o.loss == kDppoTv) return adv > 0.0f ? p - q <= o.clip_high : p - q >= -o.clip_low;
  const float binary_kl = q * (old - lp) + (1.0f - q) * logf((1.0f - q + kDppoKlEps) / (1.0f - p + kDppoKlEps));
  return adv > 0.0f ? (binary_kl <= o.clip_high || p <= q) : (binary_kl <= o.clip_low || p >= q);
}

// ratio_arg: delta, or the sequence's statistic (gspo, geo_mean), whose per-token derivative
// w.r.t. lp is dseq (1, or GMPO's cap); the ratio's gradient is 0 where the clamp of
// ratio_arg is active, as in the reference (verl's clamp; NaN counts as clamped). adv: the
// advantage the loss uses (geo_mean: the sequence's mean), adv_token the token's own.
RLHF_HD PgTerm pg_term(const PolicyLossOptions& o, float ratio_arg, float dseq, float lp, float old, float adv,
                       float adv_token) {
  const float clamped_arg = fminf(fmaxf(ratio_arg, o.log_ratio_min), o.log_ratio_max);
  const float ratio = expf(clamped_arg);
  const float dratio = (ratio_arg >= o.log_ratio_min && ratio_arg <= o.log_ratio_max) ? ratio * dseq : 0.0f;
  PgTerm t{ratio, dratio, clamped_arg, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  if (o.loss == kPpo || o.loss == kGspo) {
    // max(-A min(r, delta?), -A clip(r, 1 - eps_low, 1 + eps_high)), then the dual clip for A < 0.
    const float bounded = o.has_delta ? fminf(ratio, o.delta) : ratio;
    const float dbounded = o.has_delta ? (ratio <= o.delta ? dratio : 0.0f) : dratio;
    const float low = 1.0f - o.clip_low;
    const float high = 1.0f + o.clip_high;
    const float loss1 = -adv * bounded;
    const float loss2 = -adv * fminf(fmaxf(ratio, low), high);
    const bool is_clipped = loss2 > loss1;
    t.loss = is_clipped ? loss2 : loss1;
    t.grad = -adv * (is_clipped ? ((ratio >= low && ratio <= high) ? dratio : 0.0f) : dbounded);
    t.clipped = is_clipped ? 1.0f : 0.0f;
    if (o.has_dual_clip) {
      const float loss3 = -adv * o.dual_clip;
      if (adv < 0.0f && t.loss > loss3) {
        t.loss = loss3;
        t.grad = 0.0f;
        t.lower = 1.0f;
      }
    }
  } else if (o.loss == kCispo || o.loss == kCispoTrl) {
    // -sg(w) A lp: w = clip(r, 1 - eps_low, 1 + eps_high) (verl) or min(r, clip_high) (TRL).
    const float weight =
        o.loss == kCispo ? fminf(fmaxf(ratio, 1.0f - o.clip_low), 1.0f + o.clip_high) : fminf(ratio, o.clip_high);
    t.clipped = weight != ratio ? 1.0f : 0.0f;
    // TRL's cispo_clip_ratio: capped from above with a positive advantage
    const float cap = o.loss == kCispo ? 1.0f + o.clip_high : o.clip_high;
    t.cispo_clipped = (ratio > cap && adv > 0.0f) ? 1.0f : 0.0f;
    t.loss = -weight * adv * lp;
    t.grad = -weight * adv;
  } else if (o.loss == kSapo) {
    // -A sigmoid(tau (r - 1)) 4 / tau
    const float tau = adv > 0.0f ? o.sapo_tau_pos : o.sapo_tau_neg;
    const float gate = 1.0f / (1.0f + expf(-tau * (ratio - 1.0f)));
    t.loss = -adv * gate * 4.0f / tau;
    t.grad = -adv * 4.0f * gate * (1.0f - gate) * dratio;
  } else if (o.loss == kDppoTv || o.loss == kDppoKl) {
    // -A sg(min(r, delta?)) lp v: truncated IS on the tokens whose probability moved little
    const bool valid = dppo_valid(o, lp, old, adv);
    const float weight = o.has_delta ? fminf(ratio, o.delta) : ratio;
    const float v = valid ? 1.0f : 0.0f;
    t.clipped = 1.0f - v;
    t.lower = (o.has_delta && ratio > o.delta && valid) ? 1.0f : 0.0f;
    t.loss = -adv * weight * lp * v;
    t.grad = -adv * weight * v;
  } else if (o.loss == kGeoMean) {
    // -mean(A) g_b, g_b the geometric mean of the capped token ratios
    const float d = lp - old;
    const bool outside = d < -o.clip_low || d > o.clip_high;
    t.clipped = outside && adv_token > 0.0f ? 1.0f : 0.0f;
    t.lower = outside && adv_token < 0.0f ? 1.0f : 0.0f;
    t.loss = -adv * ratio;
    t.grad = -adv * dratio;
  } else {  // reinforce: -A lp
    t.loss = -adv * lp;
    t.grad = -adv;
  }
  return t;
}

// What token i of sequence `seq` adds to each partial (already times m), and its g.
struct TokenOut {
  float g;
  float part[kNumPartials];  // the min / max columns hold r itself
};

// What a sequence-level loss needs of its whole sequence before its tokens: the mean
// (capped, for geo_mean) delta, the mean advantage (geo_mean) and, with kl_ratio_weight,
// the mean KL, over the valid tokens (mask-weighted; 0 without one).
struct SeqStats {
  float log_ratio, kl, adv;
};

// Token i (valid: mask m != 0) of sequence `seq`; `stats` is read for gspo / geo_mean only.
RLHF_HD TokenOut policy_loss_token(const PolicyLossInputs& in, const PolicyLossOptions& o, int64_t i, int64_t seq,
                                   float m, SeqStats stats) {
  const float lp = load(in.logp, i);
  const float old = load(in.old_logp, i);
  const float log_ratio = lp - old;
  const float adv = load(in.advantages, in.adv_per_seq ? seq : i);
  const bool sequence = sequence_level(o.loss);
  const bool geo_mean = o.loss == kGeoMean;
  const PgTerm pg = pg_term(o, sequence ? stats.log_ratio : log_ratio,
                            geo_mean ? geo_mean_dlog_ratio(o, log_ratio, adv) : 1.0f, lp, old,
                            geo_mean ? stats.adv : adv, adv);
  float loss = pg.loss;
  float grad = pg.grad;
  if (in.is_weights.ptr != nullptr) {  // truncated IS weights scale the policy-gradient term only
    const float isw = load(in.is_weights, in.is_per_seq ? seq : i);
    loss *= isw;
    grad *= isw;
  }
  TokenOut out;
  out.part[kPartKl] = 0.0f;
  if (in.ref_logp.ptr != nullptr) {
    const KlTerm kl = kl_estimate(lp, load(in.ref_logp, i), o.kl_base, o.kl_straight_through, o.kl_clamp);
    float value = kl.value;
    float dvalue = kl.grad;
    if (o.kl_ratio_weight) {  // TRL's use_bias_correction_kl: r KL, r differentiable
      value = pg.ratio * kl.value;
      dvalue = pg.ratio * kl.grad + pg.dratio * (sequence ? stats.kl : kl.value);
    }
    loss += o.kl_coef * value;
    grad += o.kl_coef * dvalue;
    out.part[kPartKl] = value * m;
  }
  out.part[kPartEntropy] = 0.0f;
  if (in.entropy.ptr != nullptr) {
    const float entropy = load(in.entropy, i);
    loss -= o.entropy_coef * entropy;
    out.part[kPartEntropy] = entropy * m;
  }
  out.g = grad * m;
  out.part[kPartLoss] = loss * m;
  out.part[kPartCount] = m;
  out.part[kPartClipped] = pg.clipped * m;
  out.part[kPartClippedLower] = pg.lower * m;
  out.part[kPartApproxKl] = 0.5f * log_ratio * log_ratio * m;
  out.part[kPartRatio] = pg.ratio * m;
  out.part[kPartPpoKl] = -(sequence ? log_ratio : pg.clamped_arg) * m;
  out.part[kPartCispoClipped] = pg.cispo_clipped * m;
  out.part[kPartRatioMin] = pg.ratio;
  out.part[kPartRatioMax] = pg.ratio;
  return out;
}

// Adds a token's contributions into accumulators of either precision (fp32 on the device,
// double on the host), min / max for the ratio extremes.
template <class Acc>
RLHF_HD void add_token(Acc (&acc)[kNumPartials], const TokenOut& t) {
  for (int k = 0; k < kNumPartials; ++k) {
    const Acc v = Acc(t.part[k]);
    if (k == kPartRatioMin) {
      acc[k] = v < acc[k] ? v : acc[k];
    } else if (k == kPartRatioMax) {
      acc[k] = v > acc[k] ? v : acc[k];
    } else {
      acc[k] += v;
    }
  }
}

// Token i's share of its sequence: g[i] (0 on a masked token, whose inputs are never read:
// padding may hold NaN) and, on a valid one, its partials added into `acc`.
template <class Acc>
RLHF_HD void accumulate_token(const PolicyLossInputs& in, const PolicyLossOptions& o, int64_t i, int64_t seq,
                              SeqStats stats, float* g, Acc (&acc)[kNumPartials]) {
  const float m = load(in.mask, i);
  if (m == 0.0f) {
    g[i] = 0.0f;
    return;
  }
  const TokenOut t = policy_loss_token(in, o, i, seq, m, stats);
  g[i] = t.g;
  add_token(acc, t);
}

// The first pass of a sequence-level loss, token i: adds its log-ratio times m (GMPO's
// capped one for geo_mean), m, KL m (with kl_ratio_weight and a reference) and A m (geo_mean)
// into sums[0..3] for a valid token; see seq_stats.
constexpr int kNumSeqSums = 4;
template <class Acc>
RLHF_HD void add_seq_stats(const PolicyLossInputs& in, const PolicyLossOptions& o, int64_t i, int64_t seq,
                           Acc (&sums)[kNumSeqSums]) {
  const float m = load(in.mask, i);
  if (m != 0.0f) {
    const float lp = load(in.logp, i);
    const float log_ratio = lp - load(in.old_logp, i);
    if (o.loss == kGeoMean) {
      const float adv = load(in.advantages, in.adv_per_seq ? seq : i);
      sums[0] += Acc(geo_mean_log_ratio(o, log_ratio, adv) * m);
      sums[3] += Acc(adv * m);
    } else {
      sums[0] += Acc(log_ratio * m);
    }
    sums[1] += Acc(m);
    if (o.kl_ratio_weight && in.ref_logp.ptr != nullptr) {
      sums[2] += Acc(kl_estimate(lp, load(in.ref_logp, i), o.kl_base, o.kl_straight_through, o.kl_clamp).value * m);
    }
  }
}

// The sequence means from the first pass's sums (0 without a valid token).
template <class Acc>
RLHF_HD SeqStats seq_stats(const Acc (&sums)[kNumSeqSums]) {
  if (!(sums[1] > Acc(0))) return SeqStats{0.0f, 0.0f, 0.0f};
  return SeqStats{float(sums[0] / sums[1]), float(sums[2] / sums[1]), float(sums[3] / sums[1])};
}

namespace cpu {
// OpenMP over sequences; each sequence's sums in double, in token order (thread-count independent).
void policy_loss_fwd(const PolicyLossInputs& in, const PolicyLossOptions& o, float* g, float* partials,
                     int64_t num_seqs, int threads);
void seq_scale_bwd(In grad, In w, In x, In cu_seqlens, float scale, void* out, int out_dtype, int64_t num_seqs,
                   int threads);
}  // namespace cpu

namespace cuda {
// One block per sequence, fixed-order block reductions (deterministic); on `stream`.
void policy_loss_fwd(const PolicyLossInputs& in, const PolicyLossOptions& o, float* g, float* partials,
                     int64_t num_seqs, std::uintptr_t stream);
void seq_scale_bwd(In grad, In w, In x, In cu_seqlens, float scale, void* out, int out_dtype, int64_t num_seqs,
                   std::uintptr_t stream);
}  // namespace cuda

}  // namespace rlhf
