// Per-element and per-row arithmetic of PCA-whitening, shared by the CPU and CUDA kernels.
//
// Both ops start with the same row pass: centre each value (x - shift in float64 rounded once to the GEMM
// type, or its float32 twin pca_center_split; either way a large common offset costs no precision) and
// flag rows holding NaN or +-Inf; such rows are written as zeros and counted. The transform ends with a
// row pass that scales a projected row to unit L2 norm with MMSelfSup's guard: y / (||y|| + norm_eps).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/hd.h"

namespace pydc {

// True for finite values: v - v is 0 for every finite v and NaN for NaN and +-Inf. Written without
// std::isfinite so that the same code compiles for host and device and for every floating type.
template <typename T>
PYDC_HD bool pca_is_finite(T v) {
  return (v - v) == T(0);
}

// float64 stays float64; every other floating type (float, c10::Half, c10::BFloat16) converts through float,
// the one conversion all of them define on host and device.
template <typename T>
using pca_wide_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
PYDC_HD double pca_load(T v) {
  return static_cast<double>(static_cast<pca_wide_t<T>>(v));
}

template <typename T>
PYDC_HD T pca_store(double v) {
  return static_cast<T>(static_cast<pca_wide_t<T>>(v));
}

// One centred value in float64, before it is rounded to the GEMM type.
PYDC_HD double pca_center(double x, double shift) {
  return x - shift;
}

// The same difference in float32 arithmetic, for float32/float16/bfloat16 x, with the float64 shift split
// as hi + lo (hi = float(shift), lo = float(shift - hi)): x - hi is exact when x is near hi (Sterbenz) and
// rounded once otherwise, so (x - hi) - lo lies within about one float32 ulp of the float64 difference
// rounded to float32, at float32 speed (twice the SIMD lanes of float64 on the CPU).
PYDC_HD float pca_center_split(float x, float shift_hi, float shift_lo) {
  return (x - shift_hi) - shift_lo;
}

// float32 -> TF32 (10 explicit mantissa bits, what the tensor cores read) by round to nearest even on the 13
// dropped bits, kept in a float. Finite inputs only (centred values are: non-finite rows are zeroed first).
// Used by the CUDA Gram's 3xTF32 split: hi = tf32(c), lo = tf32(c - hi); c - hi is exact in float32 (it
// keeps c's low 13 bits), so hi + lo equals c to within 2^-22 |c|.
PYDC_HD float pca_tf32_round(float value) {
  uint32_t bits;
#if defined(__CUDA_ARCH__)
  bits = __float_as_uint(value);
#else
  std::memcpy(&bits, &value, sizeof(bits));
#endif
  bits += 0x0fffu + ((bits >> 13) & 1u);
  bits &= 0xffffe000u;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
#endif
}

// The factor that scales a row with squared L2 norm `sum_squares` to unit norm (0 rows stay 0).
template <typename acc_t>
PYDC_HD acc_t pca_inverse_norm(acc_t sum_squares, acc_t norm_eps) {
#if defined(__CUDA_ARCH__)
  return acc_t(1) / (sqrt(sum_squares) + norm_eps);
#else
  return acc_t(1) / (std::sqrt(sum_squares) + norm_eps);
#endif
}

}  // namespace pydc
