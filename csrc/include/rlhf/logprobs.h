// token_logprobs: per-token logprobs and entropy from logits, and their gradient.
// The spec: rlhf_engine/reference/logprobs.py; the Triton kernels: kernels/logprobs.py.
//
// With z = logits / T per row and u = z * log2(e) (the kernels work in base 2: exp2 is the
// hardware exponential):
//   lse     = logsumexp(z)              = (m + log2 s) * ln 2
//   logp    = z[label] - lse
//   entropy = lse - sum(softmax(z) * z) = (log2 s - t / s) * ln 2
// where m = max u, s = sum 2^(u - m), t = sum 2^(u - m) (u - m), kept online (running max)
// in fp32 as the row is read once. Backward, with p = softmax(z):
//   dlogits = ((p - onehot) * (-dlogp) - dentropy * p * (log p + H)) / T
// in fp32, stored in the logits dtype (log p + H = z - E_p[z]).
//
// Shapes: logits [D0, D1, V] with unit stride along V and any leading strides (row r at
// element (r / D1) * stride_outer + (r % D1) * stride_inner), so logits[:, :-1] is read in
// place; labels [N = D0 * D1] int32/int64 contiguous; logp, entropy, lse fp32 [N]
// contiguous. Backward: grad_logp, grad_entropy fp32 [N] with any element stride (0 for an
// expanded gradient); dlogits [D0, D1', V] in the logits dtype, its own leading layout.
// logits dtypes: fp32, fp16, bf16 (dlogits the same dtype).
//
// Rows whose label equals ignore_index: logp = entropy = lse = 0, a zero gradient row, and
// their logits are never read. Forward, a label outside [0, V) (not ignore_index): the
// logits are not read and logp, entropy and lse are NaN (so the backward's row is NaN too).
// Backward, the one-hot column is label - label_offset; a label outside [label_offset,
// label_offset + V) adds no one-hot term (the fused lm_head passes vocabulary slices).
//
// Aliasing: dlogits may be logits itself (in-place backward): every element is read and
// then overwritten by the same thread, never read after another thread wrote it. Nothing
// else may alias.
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "rlhf/elements.h"

#ifdef __CUDACC__
#include <cuda_fp16.h>
#endif

namespace rlhf {

namespace logprobs {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// The logits element types, typed so the kernels can load 16-byte vectors of them and the
// dtype switch happens once per launch, not per element. Conversions are exact (to fp32)
// or round to nearest even (to the 16-bit types) on both sides.
struct F32 {
  using Storage = float;
  static RLHF_HD float to_float(Storage v) { return v; }
  static RLHF_HD Storage from_float(float v) { return v; }
};

struct BF16 {
  using Storage = uint16_t;
  static RLHF_HD float to_float(Storage v) { return bf16_to_float(v); }
  static RLHF_HD Storage from_float(float v) { return float_to_bf16(v); }
};

struct F16 {
  using Storage = uint16_t;
#ifdef __CUDA_ARCH__
  // The hardware conversions: one instruction each, same results as elements.h's.
  static __device__ __forceinline__ float to_float(Storage v) { return __half2float(__ushort_as_half(v)); }
  static __device__ __forceinline__ Storage from_float(float v) { return __half_as_ushort(__float2half_rn(v)); }
#else
  static inline float to_float(Storage v) { return f16_to_float(v); }
  static inline Storage from_float(float v) { return float_to_f16(v); }
#endif
};

// Row r's first element: the [D0, D1] leading layout of a [D0, D1, V] view.
struct RowLayout {
  int64_t inner;         // D1
  int64_t stride_outer;  // elements between rows r and r + D1
  int64_t stride_inner;  // elements between rows r and r + 1 within one D1 run
  RLHF_HD int64_t offset(int64_t row) const { return (row / inner) * stride_outer + (row % inner) * stride_inner; }
};

// The online logsumexp state over the u values seen so far: m their max (-inf while none
// is finite), s = sum 2^(u - c), t = sum 2^(u - c) (u - c), centred on c = m (0 while m is
// -inf, so -inf - -inf never makes NaN). Centring keeps the entropy from cancelling two
// large numbers.
struct LseState {
  float m;
  float s;
  float t;
};

RLHF_HD LseState lse_empty() { return {-INFINITY, 0.0f, 0.0f}; }

RLHF_HD float lse_centre(float m) { return m == -INFINITY ? 0.0f : m; }

// Moves the state's sums onto the centre `shift` of a max at least st.m (a new tile's
// max, or the row's max when the partial states of several threads are combined).
template <bool WithEntropy>
RLHF_HD void lse_recentre(LseState& st, float shift) {
  const float alpha = exp2f(st.m - shift);
  if (WithEntropy) st.t = st.s > 0.0f ? alpha * (st.t + (st.m - shift) * st.s) : 0.0f;
  st.s *= alpha;
}

// Folds a group of N values u (-inf for columns past V) into the state: Triton's
// online_lse_rescale step followed by the group's sums of e = 2^d and e * d, d = u - shift.
template <int N, bool WithEntropy>
RLHF_HD void lse_fold(LseState& st, const float (&u)[N]) {
  float group_max = u[0];
  for (int k = 1; k < N; ++k) group_max = fmaxf(group_max, u[k]);
  const float m_new = fmaxf(st.m, group_max);
  const float shift = lse_centre(m_new);
  lse_recentre<WithEntropy>(st, shift);
  float sum = 0.0f, weighted = 0.0f;
  for (int k = 0; k < N; ++k) {
    const float d = u[k] - shift;
    const float e = exp2f(d);
    sum += e;
    // e == 0 exactly where u == -inf: those terms are 0, not 0 * inf.
    if (WithEntropy && e > 0.0f) weighted += e * d;
  }
  st.s += sum;
  st.t += weighted;
  st.m = m_new;
}

struct RowResult {
  float logp;
  float entropy;
  float lse;
};

// The row's outputs from its final state; z_label is 0 for a row whose logits were not
// read (ignored or out of range).
RLHF_HD RowResult row_result(LseState st, float z_label, bool ignored, bool out_of_range) {
  if (ignored) return {0.0f, 0.0f, 0.0f};
  if (out_of_range) return {NAN, NAN, NAN};
  const float log2s = log2f(st.s);
  const float lse = (st.m + log2s) * kLn2;
  return {z_label - lse, (log2s - st.t / st.s) * kLn2, lse};
}

// The per-row constants of the backward (fp32, like the Triton kernel).
struct GradRow {
  float lse2;  // lse * log2(e): log2 p = u - lse2
  float c;     // -dlogp / T
  float c_h;   // -dentropy / T (0 without the entropy term)
  float h;     // the row's entropy
};

// Row `row`'s GradRow from the saved forward outputs and the upstream gradients
// (grad_entropy / entropy unread without the entropy term).
template <bool WithEntropy>
RLHF_HD GradRow grad_row(In grad_logp, int64_t grad_logp_stride, In grad_entropy, int64_t grad_entropy_stride,
                         const float* lse, const float* entropy, int64_t row, float inv_t) {
  GradRow r{lse[row] * kLog2e, -load(grad_logp, row * grad_logp_stride) * inv_t, 0.0f, 0.0f};
  if (WithEntropy) {
    r.c_h = -load(grad_entropy, row * grad_entropy_stride) * inv_t;
    r.h = entropy[row];
  }
  return r;
}

// d loss / d logits of one element with u = logit * log2(e) / T.
template <bool WithEntropy>
RLHF_HD float grad_element(float u, bool is_label, GradRow r) {
  const float log2p = u - r.lse2;
  const float p = exp2f(log2p);
  float g = p * r.c - (is_label ? r.c : 0.0f);
  // dH/dz = -p (log p + H); p == 0 terms are 0 (not 0 * -inf).
  if (WithEntropy) g += (p > 0.0f ? p * (log2p * kLn2 + r.h) : 0.0f) * r.c_h;
  return g;
}

// Calls f(type tag) for a logits dtype code; both sides' entry points dispatch through it.
template <class F>
void dispatch_logits_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kF32: f(F32{}); break;
    case kBF16: f(BF16{}); break;
    case kF16: f(F16{}); break;
    default:
      throw std::invalid_argument("rlhf_engine._C: token_logprobs takes fp32, fp16 or bf16 logits, got dtype code " +
                                  std::to_string(dtype));
  }
}

// Calls f(type tag, std::bool_constant<with_entropy>{}): the logits dtype and the entropy
// switch become template arguments once per launch.
template <class F>
void dispatch_logits(int dtype, bool with_entropy, F&& f) {
  dispatch_logits_dtype(dtype, [&](auto tag) {
    if (with_entropy) {
      f(tag, std::true_type{});
    } else {
      f(tag, std::false_type{});
    }
  });
}

}  // namespace logprobs

namespace cpu {
// logits: its dtype code (fp32, fp16 or bf16); entropy nullptr: no entropy. OpenMP over
// rows; each row's result does not depend on `threads`.
void token_logprobs_fwd(In logits, logprobs::RowLayout layout, int64_t rows, int64_t vocab, In labels, float* logp,
                        float* entropy, float* lse, float log2e_over_t, float inv_t, int64_t ignore_index,
                        int threads);
// grad_entropy.ptr nullptr: no entropy term (entropy then unread). dlogits: logits' dtype.
void token_logprobs_bwd(In grad_logp, int64_t grad_logp_stride, In grad_entropy, int64_t grad_entropy_stride,
                        In logits, logprobs::RowLayout layout, void* dlogits, logprobs::RowLayout d_layout,
                        int64_t rows, int64_t vocab, In labels, const float* lse, const float* entropy,
                        float log2e_over_t, float inv_t, int64_t ignore_index, int64_t label_offset, int threads);
}  // namespace cpu

namespace cuda {
// The same contracts, launched on `stream`; no workspace.
void token_logprobs_fwd(In logits, logprobs::RowLayout layout, int64_t rows, int64_t vocab, In labels, float* logp,
                        float* entropy, float* lse, float log2e_over_t, float inv_t, int64_t ignore_index,
                        std::uintptr_t stream);
void token_logprobs_bwd(In grad_logp, int64_t grad_logp_stride, In grad_entropy, int64_t grad_entropy_stride,
                        In logits, logprobs::RowLayout layout, void* dlogits, logprobs::RowLayout d_layout,
                        int64_t rows, int64_t vocab, In labels, const float* lse, const float* entropy,
                        float log2e_over_t, float inv_t, int64_t ignore_index, int64_t label_offset,
                        std::uintptr_t stream);
}  // namespace cuda

}  // namespace rlhf
