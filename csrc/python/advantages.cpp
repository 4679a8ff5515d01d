// Bindings of the advantage family (rlhf/advantages.h): masked_whiten.
#include "registry.h"
#include "rlhf/advantages.h"

namespace rlhf::python {
namespace {

void bind(py::module_& m) {
  m.def(
      "masked_whiten_cpu",
      [](Tensor x, Tensor mask, std::uintptr_t out, int64_t n, bool shift_mean, float eps, int threads) {
        cpu::masked_whiten(in(x), in(mask), f32_out(out), n, shift_mean, eps, threads);
      },
      NoGil());
  m.attr("MASKED_WHITEN_CUDA_WORKSPACE") = 3 * cuda::kWhitenBlocks;
  m.def(
      "masked_whiten_cuda",
      [](Tensor x, Tensor mask, std::uintptr_t out, std::uintptr_t workspace, int64_t n, bool shift_mean, float eps,
         int device, std::uintptr_t stream) {
        RLHF_CUDA_CALL(device, cuda::masked_whiten(in(x), in(mask), f32_out(out),
                                                   reinterpret_cast<float*>(workspace), n, shift_mean, eps, stream));
      },
      NoGil());
}

const Register registered(bind);

}  // namespace
}  // namespace rlhf::python
