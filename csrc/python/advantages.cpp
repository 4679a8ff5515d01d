// Bindings of the advantage family (rlhf/advantages.h): masked_whiten, group_advantages.
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

  // group_ids / lengths absent as address 0; method and scale as rlhf/advantages.h's codes.
  m.def(
      "group_advantages_cpu",
      [](Tensor scores, Tensor group_ids, Tensor lengths, std::uintptr_t out, int64_t n, int64_t group_size,
         int64_t num_groups, int method, int scale, float eps, bool verl, int threads) {
        cpu::group_advantages(in(scores), in(group_ids), in(lengths), f32_out(out), n, group_size, num_groups, method,
                              scale, eps, verl, threads);
      },
      NoGil());
  m.def(
      "group_advantages_cuda_workspace",
      [](int64_t num_groups, bool by_ids) { return cuda::group_advantages_workspace(num_groups, by_ids); },
      "fp32 elements of the device workspace of group_advantages_cuda");
  m.def(
      "group_advantages_cuda",
      [](Tensor scores, Tensor group_ids, Tensor lengths, std::uintptr_t out, std::uintptr_t workspace, int64_t n,
         int64_t group_size, int64_t num_groups, int method, int scale, float eps, bool verl, int device,
         std::uintptr_t stream) {
        RLHF_CUDA_CALL(device, cuda::group_advantages(in(scores), in(group_ids), in(lengths), f32_out(out),
                                                      reinterpret_cast<float*>(workspace), n, group_size, num_groups,
                                                      method, scale, eps, verl, stream));
      },
      NoGil());
}

const Register registered(bind);

}  // namespace
}  // namespace rlhf::python
