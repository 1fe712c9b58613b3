// Arithmetic of the ODC memory ops, shared by the CPU and CUDA kernels.
//
// Row math (one memory row, one batch feature x, momentum m), all in double and rounded to the bank's
// dtype once at the end, so that every device and the float64 reference round the same exact values:
//   f = x / (||x|| + 1e-10);  v = (1 - m) * old + m * f;  row = v / (||v|| + 1e-10).
// Labels: argmax_k centroid_k . row, ties -> lowest k. The kernels take the candidates from a float GEMM
// and settle every candidate within the GEMM's error bound by a fixed-order double dot product, so the
// label is the argmax of the (double-accurate) dot products whatever the GEMM's summation order.
// Class sums: every row is stored in the class sums as fixed-point int64 (value * 2^bits, rounded to
// nearest even); integer addition is associative, so sums are bitwise identical whatever the order of
// the updates (atomics, threads, devices), and centroid = sum / 2^bits / count.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/hd.h"

namespace pydc {

constexpr double kOdcNormEps = 1e-10;
// |row value| <= 1 (rows are L2-normalised), so a class sum of N rows stays below N * 2^bits <= 2^62.
constexpr int kOdcMaxFixedBits = 50;

// Number of fractional bits of the fixed-point class sums of a bank of `length` rows.
inline int odc_fixed_bits(int64_t length) {
  int bits = 0;
  while (bits < 63 && (int64_t(1) << bits) <= length) ++bits;  // bit length of `length`
  const int fixed = 62 - bits;
  return fixed < kOdcMaxFixedBits ? fixed : kOdcMaxFixedBits;
}

// Round-to-nearest-even of y = value * scale (|y| <= 2^51) by the 1.5 * 2^52 trick: after the addition the
// integer sits in the low mantissa bits, so subtracting the magic number's bit pattern gives it without a
// double -> int64 conversion (which SSE2/AVX2 cannot vectorize). Identical on host and device.
PYDC_HD int64_t odc_quantize(double value, double scale) {
  constexpr double kMagic = 6755399441055744.0;          // 1.5 * 2^52
  constexpr int64_t kMagicBits = 0x4338000000000000LL;   // its bit pattern
  const double shifted = value * scale + kMagic;
#if defined(__CUDA_ARCH__)
  return __double_as_longlong(shifted) - kMagicBits;
#else
  int64_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  return bits - kMagicBits;
#endif
}

PYDC_HD double odc_mean_from_sum(int64_t sum, int64_t count, double inv_scale) {
  return static_cast<double>(sum) * inv_scale / static_cast<double>(count);
}

PYDC_HD double odc_norm_denominator(double sum_squares) {
  return sqrt(sum_squares) + kOdcNormEps;
}

PYDC_HD double odc_blend(double old_value, double normalized_feature, double momentum) {
  return (1.0 - momentum) * old_value + momentum * normalized_feature;
}

// Sum of squares in double with four interleaved partial sums: a fixed order (so deterministic) that lets
// the additions overlap instead of waiting on one another.
template <typename scalar_t>
PYDC_HD double odc_sum_squares(const scalar_t* x, int64_t n) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int64_t d = 0;
  for (; d + 4 <= n; d += 4) {
    const double v0 = static_cast<double>(x[d]), v1 = static_cast<double>(x[d + 1]);
    const double v2 = static_cast<double>(x[d + 2]), v3 = static_cast<double>(x[d + 3]);
    s0 += v0 * v0;
    s1 += v1 * v1;
    s2 += v2 * v2;
    s3 += v3 * v3;
  }
  for (; d < n; ++d) s0 += static_cast<double>(x[d]) * static_cast<double>(x[d]);
  return (s0 + s1) + (s2 + s3);
}

// Fixed-order double dot product: the tie-breaker of the relabelling.
template <typename scalar_t>
PYDC_HD double odc_dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  double s = 0.0;
  for (int64_t d = 0; d < n; ++d) s += static_cast<double>(a[d]) * static_cast<double>(b[d]);
  return s;
}

// Why a batch is refused before anything changes (bits of one device word, so that the CUDA kernels learn it
// without a host sync): an index outside [0, N), or the label of an indexed row outside [0, K). A refused
// batch's op returns -(its bits): -1, -2 or -3; pydc.ops.odc decodes them into IndexError / ValueError.
constexpr unsigned long long kOdcIndexOutOfRange = 1;
constexpr unsigned long long kOdcLabelOutOfRange = 2;

// Status bits of one batch position: `label` is read only for an index inside the bank.
PYDC_HD unsigned long long odc_position_status(int64_t index, int64_t length, const int64_t* label_bank,
                                               int64_t num_classes) {
  if (index < 0 || index >= length) return kOdcIndexOutOfRange;
  const int64_t label = label_bank[index];
  return (label < 0 || label >= num_classes) ? kOdcLabelOutOfRange : 0;
}

// Arg-max order of the relabelling: a NaN never wins (the CPU's row_max skips NaN), a larger value wins, equal
// values go to the lower class index; best_index < 0 means "nothing yet".
PYDC_HD bool odc_argmax_prefer(double value, int64_t index, double best, int64_t best_index) {
  if (value != value) return false;
  return best_index < 0 || value > best || (value == best && index < best_index);
}

// Bound on |GEMM(row, c) - dot(row, c)| for any summation order, rows of norm <= 1 and centroids of norm
// <= max_centroid_norm: gamma_D * |c| * |row| (Higham), plus the rounding of the inputs when the GEMM
// runs in reduced precision (TF32/BF16), doubled because both the best and a rival carry an error.
PYDC_HD double odc_candidate_tolerance(int64_t dim, double unit_roundoff, double input_rounding,
                                       double max_centroid_norm) {
  const double gamma = (dim + 2) * unit_roundoff / (1.0 - (dim + 2) * unit_roundoff);
  return 2.0 * 1.01 * (gamma + 2.0 * input_rounding) * max_centroid_norm + 1e-300;
}

}  // namespace pydc
