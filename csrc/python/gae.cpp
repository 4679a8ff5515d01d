// Bindings of the gae family (rlhf/gae.h): gae and discounted_returns. A strided input
// arrives as (address, dtype code, row stride, column stride) in elements.
#include <tuple>

#include "registry.h"
#include "rlhf/gae.h"

namespace rlhf::python {
namespace {

using StridedTensor = std::tuple<std::uintptr_t, int, int64_t, int64_t>;

Strided strided(const StridedTensor& t) {
  return Strided{In{reinterpret_cast<const void*>(std::get<0>(t)), std::get<1>(t)}, std::get<2>(t), std::get<3>(t)};
}

void bind(py::module_& m) {
  m.def(
      "gae_cpu",
      [](StridedTensor rewards, StridedTensor values, StridedTensor mask, Tensor cu_seqlens,
         std::uintptr_t advantages, std::uintptr_t returns, int64_t num_seqs, int64_t T, float gamma,
         float gamma_lam, int threads) {
        cpu::gae(strided(rewards), strided(values), strided(mask), in(cu_seqlens), f32_out(advantages),
                 f32_out(returns), num_seqs, T, gamma, gamma_lam, threads);
      },
      NoGil());
  m.def(
      "gae_cuda",
      [](StridedTensor rewards, StridedTensor values, StridedTensor mask, Tensor cu_seqlens,
         std::uintptr_t advantages, std::uintptr_t returns, int64_t num_seqs, int64_t T, float gamma,
         float gamma_lam, int device, std::uintptr_t stream) {
        RLHF_CUDA_CALL(device, cuda::gae(strided(rewards), strided(values), strided(mask), in(cu_seqlens),
                                         f32_out(advantages), f32_out(returns), num_seqs, T, gamma, gamma_lam,
                                         stream));
      },
      NoGil());
  m.def(
      "discounted_returns_cpu",
      [](StridedTensor rewards, StridedTensor mask, Tensor cu_seqlens, std::uintptr_t out, int64_t num_seqs,
         int64_t T, float gamma, int threads) {
        cpu::discounted_returns(strided(rewards), strided(mask), in(cu_seqlens), f32_out(out), num_seqs, T, gamma,
                                threads);
      },
      NoGil());
  m.def(
      "discounted_returns_cuda",
      [](StridedTensor rewards, StridedTensor mask, Tensor cu_seqlens, std::uintptr_t out, int64_t num_seqs,
         int64_t T, float gamma, int device, std::uintptr_t stream) {
        RLHF_CUDA_CALL(device, cuda::discounted_returns(strided(rewards), strided(mask), in(cu_seqlens),
                                                        f32_out(out), num_seqs, T, gamma, stream));
      },
      NoGil());
}

const Register registered(bind);

}  // namespace
}  // namespace rlhf::python
