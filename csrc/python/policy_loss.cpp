// Bindings of the policy-loss family (rlhf/policy_loss.h): policy_loss_fwd and
// seq_scale_bwd, plus the constants the kernels mirror from the Python spec (a test checks
// they agree).
#include "registry.h"
#include "rlhf/policy_loss.h"

namespace rlhf::python {
namespace {

PolicyLossInputs inputs(Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, Tensor ref_logp,
                        Tensor entropy, Tensor is_weights, Tensor cu_seqlens, bool adv_per_seq, bool is_per_seq) {
  return {in(logp), in(old_logp), in(advantages), in(mask), in(ref_logp), in(entropy), in(is_weights),
          in(cu_seqlens), adv_per_seq, is_per_seq};
}

PolicyLossOptions options(int loss, float clip_low, float clip_high, bool has_dual_clip, float dual_clip,
                          bool has_delta, float delta, float log_ratio_min, float log_ratio_max, float sapo_tau_pos,
                          float sapo_tau_neg, float kl_coef, int kl_base, bool kl_straight_through, bool kl_clamp,
                          bool kl_ratio_weight, float entropy_coef) {
  if (loss < kPpo || loss > kGeoMean) throw std::invalid_argument("rlhf_engine._C: unknown policy loss code");
  if (kl_base < kKlK1 || kl_base > kKlK3) throw std::invalid_argument("rlhf_engine._C: unknown KL estimator code");
  return {loss,         clip_low,     clip_high,    has_dual_clip, has_delta, dual_clip,           delta,
          log_ratio_min, log_ratio_max, sapo_tau_pos, sapo_tau_neg,  kl_coef,   kl_base, kl_straight_through,
          kl_clamp,      kl_ratio_weight, entropy_coef};
}

void bind(py::module_& m) {
  py::dict constants;
  constants["KAPPA_CLAMP"] = kKlKappaClamp;
  constants["DPPO_KL_EPS"] = kDppoKlEps;
  constants["K3_CLAMP"] = kKlK3Clamp;
  constants["NUM_PARTIALS"] = int(kNumPartials);
  constants["RATIO_MIN_COLUMN"] = int(kPartRatioMin);
  constants["RATIO_MAX_COLUMN"] = int(kPartRatioMax);
  py::dict losses;
  losses["ppo"] = int(kPpo);
  losses["gspo"] = int(kGspo);
  losses["cispo"] = int(kCispo);
  losses["cispo-trl"] = int(kCispoTrl);
  losses["sapo"] = int(kSapo);
  losses["reinforce"] = int(kReinforce);
  losses["dppo_tv"] = int(kDppoTv);
  losses["dppo_kl"] = int(kDppoKl);
  losses["geo_mean"] = int(kGeoMean);
  constants["LOSS_CODES"] = losses;
  py::dict kl_bases;
  kl_bases["k1"] = int(kKlK1);
  kl_bases["abs"] = int(kKlAbs);
  kl_bases["k2"] = int(kKlK2);
  kl_bases["k3"] = int(kKlK3);
  constants["KL_BASE_CODES"] = kl_bases;
  m.attr("POLICY_LOSS_CONSTANTS") = constants;

  m.def(
      "policy_loss_fwd_cpu",
      [](Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, Tensor ref_logp, Tensor entropy,
         Tensor is_weights, Tensor cu_seqlens, std::uintptr_t g, std::uintptr_t partials, int64_t num_seqs,
         bool adv_per_seq, bool is_per_seq, int loss, float clip_low, float clip_high, bool has_dual_clip,
         float dual_clip, bool has_delta, float delta, float log_ratio_min, float log_ratio_max, float sapo_tau_pos,
         float sapo_tau_neg, float kl_coef, int kl_base, bool kl_straight_through, bool kl_clamp,
         bool kl_ratio_weight, float entropy_coef, int threads) {
        cpu::policy_loss_fwd(inputs(logp, old_logp, advantages, mask, ref_logp, entropy, is_weights, cu_seqlens,
                                    adv_per_seq, is_per_seq),
                             options(loss, clip_low, clip_high, has_dual_clip, dual_clip, has_delta, delta,
                                     log_ratio_min, log_ratio_max, sapo_tau_pos, sapo_tau_neg, kl_coef, kl_base,
                                     kl_straight_through, kl_clamp, kl_ratio_weight, entropy_coef),
                             f32_out(g), f32_out(partials), num_seqs, threads);
      },
      NoGil());
  m.def(
      "policy_loss_fwd_cuda",
      [](Tensor logp, Tensor old_logp, Tensor advantages, Tensor mask, Tensor ref_logp, Tensor entropy,
         Tensor is_weights, Tensor cu_seqlens, std::uintptr_t g, std::uintptr_t partials, int64_t num_seqs,
         bool adv_per_seq, bool is_per_seq, int loss, float clip_low, float clip_high, bool has_dual_clip,
         float dual_clip, bool has_delta, float delta, float log_ratio_min, float log_ratio_max, float sapo_tau_pos,
         float sapo_tau_neg, float kl_coef, int kl_base, bool kl_straight_through, bool kl_clamp,
         bool kl_ratio_weight, float entropy_coef, int device, std::uintptr_t stream) {
        RLHF_CUDA_CALL(device, cuda::policy_loss_fwd(inputs(logp, old_logp, advantages, mask, ref_logp, entropy,
                                                            is_weights, cu_seqlens, adv_per_seq, is_per_seq),
                                                     options(loss, clip_low, clip_high, has_dual_clip, dual_clip,
                                                             has_delta, delta, log_ratio_min, log_ratio_max,
                                                             sapo_tau_pos, sapo_tau_neg, kl_coef, kl_base,
                                                             kl_straight_through, kl_clamp, kl_ratio_weight,
                                                             entropy_coef),
                                                     f32_out(g), f32_out(partials), num_seqs, stream));
      },
      NoGil());
  m.def(
      "seq_scale_bwd_cpu",
      [](Tensor grad, Tensor w, Tensor x, Tensor cu_seqlens, float scale, std::uintptr_t out, int out_dtype,
         int64_t num_seqs, int threads) {
        check_dtype("seq_scale_bwd out", out_dtype, true);
        cpu::seq_scale_bwd(in(grad), in(w), in(x), in(cu_seqlens), scale, reinterpret_cast<void*>(out), out_dtype,
                           num_seqs, threads);
      },
      NoGil());
  m.def(
      "seq_scale_bwd_cuda",
      [](Tensor grad, Tensor w, Tensor x, Tensor cu_seqlens, float scale, std::uintptr_t out, int out_dtype,
         int64_t num_seqs, int device, std::uintptr_t stream) {
        check_dtype("seq_scale_bwd out", out_dtype, true);
        RLHF_CUDA_CALL(device, cuda::seq_scale_bwd(in(grad), in(w), in(x), in(cu_seqlens), scale,
                                                   reinterpret_cast<void*>(out), out_dtype, num_seqs, stream));
      },
      NoGil());
}

const Register registered(bind);

}  // namespace
}  // namespace rlhf::python
