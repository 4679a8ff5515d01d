// Element types the kernels read and write, shared by the host twins (csrc/cpp) and the
// CUDA kernels (csrc/cuda). Python passes a tensor as (address, dtype code); the codes are
// rlhf_engine/native/library.py's DTYPE_CODES.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#ifdef __CUDACC__
#define RLHF_HD __host__ __device__ __forceinline__
#else
#define RLHF_HD inline
#endif

namespace rlhf {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3, kU8 = 4, kI32 = 5, kI64 = 6 };

// A read-only tensor of any element type, addressed as flat elements: the switch is on a
// value that is the same for every element, so it costs a predicted branch, not a pass.
struct In {
  const void* ptr;
  int dtype;
};

RLHF_HD float bits_to_float(uint32_t bits) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  union { uint32_t u; float f; } v{bits};
  return v.f;
#endif
}

RLHF_HD uint32_t float_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  union { float f; uint32_t u; } v{f};
  return v.u;
#endif
}

// bfloat16 is the top half of a float32.
RLHF_HD float bf16_to_float(uint16_t b) { return bits_to_float(uint32_t(b) << 16); }

// IEEE half -> float, exact (subnormals, inf and NaN included).
RLHF_HD float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float magnitude = float(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// float -> bfloat16, round to nearest even; NaN stays NaN.
RLHF_HD uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// float -> IEEE half, round to nearest even, overflow to inf, NaN stays NaN.
RLHF_HD uint16_t float_to_f16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t magnitude = u & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return uint16_t(sign | 0x7e00u);
  if (magnitude >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds past 65504
  if (magnitude < 0x38800000u) {  // below 2^-14: a subnormal half (or zero)
    // The value in units of 2^-24, rounded to nearest even by the float addition.
    const float scaled = bits_to_float(magnitude) + 0.5f;  // 0.5 = 2^-1: puts 2^-24 at bit 0
    return uint16_t(sign | (float_to_bits(scaled) - 0x3f000000u));
  }
  const uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
  return uint16_t(sign | ((rounded - 0x38000000u) >> 13));
}

RLHF_HD float load(In t, int64_t i) {
  switch (t.dtype) {
    case kF32: return static_cast<const float*>(t.ptr)[i];
    case kF16: return f16_to_float(static_cast<const uint16_t*>(t.ptr)[i]);
    case kBF16: return bf16_to_float(static_cast<const uint16_t*>(t.ptr)[i]);
    case kF64: return float(static_cast<const double*>(t.ptr)[i]);
    case kU8: return float(static_cast<const uint8_t*>(t.ptr)[i]);
    case kI32: return float(static_cast<const int32_t*>(t.ptr)[i]);
    default: return float(static_cast<const int64_t*>(t.ptr)[i]);
  }
}

RLHF_HD int64_t load_index(In t, int64_t i) {
  return t.dtype == kI32 ? int64_t(static_cast<const int32_t*>(t.ptr)[i]) : static_cast<const int64_t*>(t.ptr)[i];
}

// Stores fp32 into a float tensor of any float dtype (the gradient in its input's dtype).
RLHF_HD void store(void* ptr, int dtype, int64_t i, float value) {
  switch (dtype) {
    case kF16: static_cast<uint16_t*>(ptr)[i] = float_to_f16(value); break;
    case kBF16: static_cast<uint16_t*>(ptr)[i] = float_to_bf16(value); break;
    case kF64: static_cast<double*>(ptr)[i] = double(value); break;
    default: static_cast<float*>(ptr)[i] = value;
  }
}

inline void check_dtype(const char* what, int dtype, bool float_only) {
  const int last = float_only ? kF64 : kI64;
  if (dtype < kF32 || dtype > last) {
    throw std::invalid_argument(std::string("rlhf_engine._C: unsupported dtype code ") + std::to_string(dtype) +
                                " for " + what);
  }
}

}  // namespace rlhf
