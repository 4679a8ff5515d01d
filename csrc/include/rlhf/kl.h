// Per-token KL estimators (the spec: rlhf_engine/reference/kl.py; the Triton twin:
// kernels/kl.py kl_estimate). Value and derivative w.r.t. lp of KL(lp, ref) with
// diff = lp - ref:
//   k1: diff (d/dlp 1)          abs: |diff| (sign(diff))
//   k2: diff^2 / 2 (diff)       k3: e^kappa - kappa - 1 (1 - e^kappa), kappa = ref - lp
// clamp (verl, k3 only): kappa clamped to +-kKlKappaClamp before exp, the value to
// +-kKlK3Clamp; the gradient is 0 where either clamp is active. straight_through ("k1+",
// "k3+"): the value of the base estimator with k2's gradient (diff). All fp32.
// Header only: the policy loss uses it today, a native kl_penalty kernel may later.
#pragma once

#include <math.h>

#include "rlhf/elements.h"

namespace rlhf {

// Mirrors of rlhf_engine/reference/kl.py KAPPA_CLAMP and K3_CLAMP (tests/test_policy_loss.py
// checks they agree through _C.POLICY_LOSS_CONSTANTS).
constexpr float kKlKappaClamp = 20.0f;
constexpr float kKlK3Clamp = 10.0f;

// Base estimator codes: kernels/kl.py BASE_CODES (same check).
enum KlBase : int { kKlK1 = 0, kKlAbs = 1, kKlK2 = 2, kKlK3 = 3 };

struct KlTerm {
  float value;
  float grad;  // d value / d lp
};

RLHF_HD KlTerm kl_estimate(float lp, float ref, int base, bool straight_through, bool clamp) {
  const float diff = lp - ref;
  KlTerm out;
  if (base == kKlK1) {
    out = {diff, 1.0f};
  } else if (base == kKlAbs) {
    out = {fabsf(diff), diff > 0.0f ? 1.0f : (diff < 0.0f ? -1.0f : 0.0f)};
  } else if (base == kKlK2) {
    out = {0.5f * diff * diff, diff};
  } else {
    const float kappa = -diff;
    if (clamp) {
      const float kappa_c = fminf(fmaxf(kappa, -kKlKappaClamp), kKlKappaClamp);
      const float e = expf(kappa_c);
      const float raw = e - kappa_c - 1.0f;
      const bool live = fabsf(kappa) <= kKlKappaClamp && fabsf(raw) <= kKlK3Clamp;
      out = {fminf(fmaxf(raw, -kKlK3Clamp), kKlK3Clamp), live ? 1.0f - e : 0.0f};
    } else {
      const float e = expf(kappa);
      out = {e - kappa - 1.0f, 1.0f - e};
    }
  }
  if (straight_through) out.grad = diff;
  return out;
}

}  // namespace rlhf
