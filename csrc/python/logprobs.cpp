// Bindings of the logprobs family (rlhf/logprobs.h): token_logprobs_fwd / _bwd. A [D0, D1, V]
// view arrives as its tensor plus (D1, stride0, stride1) in elements; optional outputs and
// inputs as address 0.
#include <stdexcept>

#include "registry.h"
#include "rlhf/logprobs.h"

namespace rlhf::python {
namespace {

using logprobs::RowLayout;

// The kernels write dlogits in the logits' element type.
void check_same_dtype(const Tensor& logits, const Tensor& dlogits) {
  if (logits.second != dlogits.second) {
    throw std::invalid_argument("rlhf_engine._C: token_logprobs_bwd needs dlogits in the logits dtype");
  }
}

const float* f32_in(std::uintptr_t address) { return reinterpret_cast<const float*>(address); }
void* out(const Tensor& t) { return reinterpret_cast<void*>(t.first); }

void bind(py::module_& m) {
  m.def(
      "token_logprobs_fwd_cpu",
      [](Tensor logits, int64_t d1, int64_t stride0, int64_t stride1, int64_t rows, int64_t vocab, Tensor labels,
         std::uintptr_t logp, std::uintptr_t entropy, std::uintptr_t lse, float log2e_over_t, float inv_t,
         int64_t ignore_index, int threads) {
        cpu::token_logprobs_fwd(in(logits), RowLayout{d1, stride0, stride1}, rows, vocab, in(labels), f32_out(logp),
                                f32_out(entropy), f32_out(lse), log2e_over_t, inv_t, ignore_index, threads);
      },
      NoGil());
  m.def(
      "token_logprobs_fwd_cuda",
      [](Tensor logits, int64_t d1, int64_t stride0, int64_t stride1, int64_t rows, int64_t vocab, Tensor labels,
         std::uintptr_t logp, std::uintptr_t entropy, std::uintptr_t lse, float log2e_over_t, float inv_t,
         int64_t ignore_index, int device, std::uintptr_t stream) {
        RLHF_CUDA_CALL(device, cuda::token_logprobs_fwd(in(logits), RowLayout{d1, stride0, stride1}, rows, vocab,
                                                        in(labels), f32_out(logp), f32_out(entropy), f32_out(lse),
                                                        log2e_over_t, inv_t, ignore_index, stream));
      },
      NoGil());
  m.def(
      "token_logprobs_bwd_cpu",
      [](Tensor grad_logp, int64_t grad_logp_stride, Tensor grad_entropy, int64_t grad_entropy_stride, Tensor logits,
         int64_t d1, int64_t stride0, int64_t stride1, Tensor dlogits, int64_t d_d1, int64_t d_stride0,
         int64_t d_stride1, int64_t rows, int64_t vocab, Tensor labels, std::uintptr_t lse, std::uintptr_t entropy,
         float log2e_over_t, float inv_t, int64_t ignore_index, int64_t label_offset, int threads) {
        check_same_dtype(logits, dlogits);
        cpu::token_logprobs_bwd(in(grad_logp), grad_logp_stride, in(grad_entropy), grad_entropy_stride, in(logits),
                                RowLayout{d1, stride0, stride1}, out(dlogits), RowLayout{d_d1, d_stride0, d_stride1},
                                rows, vocab, in(labels), f32_in(lse), f32_in(entropy), log2e_over_t, inv_t,
                                ignore_index, label_offset, threads);
      },
      NoGil());
  m.def(
      "token_logprobs_bwd_cuda",
      [](Tensor grad_logp, int64_t grad_logp_stride, Tensor grad_entropy, int64_t grad_entropy_stride, Tensor logits,
         int64_t d1, int64_t stride0, int64_t stride1, Tensor dlogits, int64_t d_d1, int64_t d_stride0,
         int64_t d_stride1, int64_t rows, int64_t vocab, Tensor labels, std::uintptr_t lse, std::uintptr_t entropy,
         float log2e_over_t, float inv_t, int64_t ignore_index, int64_t label_offset, int device,
         std::uintptr_t stream) {
        check_same_dtype(logits, dlogits);
        RLHF_CUDA_CALL(device, cuda::token_logprobs_bwd(in(grad_logp), grad_logp_stride, in(grad_entropy),
                                                        grad_entropy_stride, in(logits), RowLayout{d1, stride0, stride1},
                                                        out(dlogits), RowLayout{d_d1, d_stride0, d_stride1}, rows,
                                                        vocab, in(labels), f32_in(lse), f32_in(entropy), log2e_over_t,
                                                        inv_t, ignore_index, label_offset, stream));
      },
      NoGil());
}

const Register registered(bind);

}  // namespace
}  // namespace rlhf::python
