// gae and discounted_returns: backward first-order recurrences over each sequence (the
// spec: rlhf_engine/reference/gae.py). For a valid token t (mask != 0) with n(t) the next
// valid token of its sequence (V = A = G = 0 past the end):
//
//   delta_t = r_t + gamma V_{n(t)} - V_t,   A_t = delta_t + gamma lam A_{n(t)},   R_t = A_t + V_t
//   G_t = r_t + gamma G_{n(t)}
//
// Masked tokens are skipped: r and V there are never read into the arithmetic (padding may
// hold NaN), the state passes through unchanged, and their outputs are 0.
//
// Every recurrence is written as one affine map per token, h_t = a_t h_{t+1} + b_t, with the
// identity (1, 0) on masked tokens, so the host twin (a plain backward loop applying the
// maps one by one) and the CUDA kernel (a warp scan composing them) use the same per-token
// formulas. V_{n(t)} is itself such a recurrence: u_t = V_t on a valid token, u_{t+1} on a
// masked one (map (0, V_t) or the identity), and V_{n(t)} = u_{t+1}, the state *before*
// token t is applied.
//
// Layouts: padded [B, T] (cu_seqlens absent: sequence b is row b, tokens 0..T-1) or packed
// [N] (cu_seqlens [B + 1], int32 or int64: sequence b is tokens cu[b]..cu[b+1]-1). Inputs are
// addressed with element strides (row, col): element (b, t) of a padded input is at
// b * row + t * col; packed inputs pass row = 0 and their stride as col. rewards / values:
// any float dtype; mask: any dtype, read as mask != 0. Outputs are fp32 and contiguous
// (padded: b * T + t; packed: t); they may not alias an input.
#pragma once

#include <cstdint>

#include "rlhf/elements.h"

namespace rlhf {

// h -> a h + b.
struct Affine {
  float a;
  float b;
};

RLHF_HD Affine affine_identity() { return {1.0f, 0.0f}; }

// The map that applies `first`, then `second`: h -> second.a (first.a h + first.b) + second.b.
RLHF_HD Affine affine_then(Affine first, Affine second) {
  return {second.a * first.a, second.a * first.b + second.b};
}

RLHF_HD float affine_apply(Affine f, float h) { return f.a * h + f.b; }

// u_t = V_t on a valid token (whatever came after), u_{t+1} on a masked one.
RLHF_HD Affine value_step(bool valid, float v) { return valid ? Affine{0.0f, v} : affine_identity(); }

// A_t = gamma lam A_{n(t)} + delta_t on a valid token; `v_next` is V_{n(t)} = u_{t+1}.
RLHF_HD Affine advantage_step(bool valid, float r, float v, float v_next, float gamma, float gamma_lam) {
  return valid ? Affine{gamma_lam, r + gamma * v_next - v} : affine_identity();
}

// G_t = gamma G_{n(t)} + r_t on a valid token.
RLHF_HD Affine return_step(bool valid, float r, float gamma) {
  return valid ? Affine{gamma, r} : affine_identity();
}

// An input tensor with its element strides along (sequence row, token).
struct Strided {
  In t;
  int64_t row;
  int64_t col;
};

RLHF_HD float load_at(Strided s, int64_t seq, int64_t i) { return load(s.t, seq * s.row + i * s.col); }

// Tokens [begin, end) of sequence `seq`: a row of T tokens, or a cu_seqlens segment.
struct Span {
  int64_t begin;
  int64_t end;
};

RLHF_HD Span sequence_span(In cu_seqlens, int64_t seq, int64_t T) {
  if (cu_seqlens.ptr == nullptr) return {0, T};
  return {load_index(cu_seqlens, seq), load_index(cu_seqlens, seq + 1)};
}

// Offset of sequence `seq`'s token 0 in the contiguous outputs (packed tokens are global).
RLHF_HD int64_t output_row(In cu_seqlens, int64_t seq, int64_t T) { return cu_seqlens.ptr == nullptr ? seq * T : 0; }

namespace cpu {
// advantages / returns: fp32 [num_seqs * T] padded or [N] packed (unwhitened advantages).
void gae(Strided rewards, Strided values, Strided mask, In cu_seqlens, float* advantages, float* returns,
         int64_t num_seqs, int64_t T, float gamma, float gamma_lam, int threads);
void discounted_returns(Strided rewards, Strided mask, In cu_seqlens, float* out, int64_t num_seqs, int64_t T,
                        float gamma, int threads);
}  // namespace cpu

namespace cuda {
void gae(Strided rewards, Strided values, Strided mask, In cu_seqlens, float* advantages, float* returns,
         int64_t num_seqs, int64_t T, float gamma, float gamma_lam, std::uintptr_t stream);
void discounted_returns(Strided rewards, Strided mask, In cu_seqlens, float* out, int64_t num_seqs, int64_t T,
                        float gamma, std::uintptr_t stream);
}  // namespace cuda

}  // namespace rlhf
