// Arithmetic of the k-means assignment shared by the CPU and CUDA kernels.
//
// The squared distance is expanded as ||x - c||^2 = ||x||^2 + (||c||^2 - 2 x.c). The arg-min only needs
// the centroid-dependent part, the "score" ||c||^2 - 2 x.c, so ||x||^2 is added once per point at the
// end. Rounding can make the expansion slightly negative for a point equal to its centroid: the distance
// is clamped at 0 (as faiss does). Ties go to the lowest centroid index; a score that is NaN never wins,
// so a row with no finite score keeps the initial candidate (index 0, score +inf).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/hd.h"

#if defined(__CUDACC__)
#define PYDC_UNROLL _Pragma("unroll")
#else
#define PYDC_UNROLL
#endif

namespace pydc {

constexpr float kKMeansInf = std::numeric_limits<float>::infinity();

PYDC_HD float kmeans_score(float centroid_sq_norm, float dot) {
  return centroid_sq_norm - 2.0f * dot;  // 2 * dot is exact, so fused or not this rounds once
}

PYDC_HD float kmeans_distance(float point_sq_norm, float best_score) {
  const float d = point_sq_norm + best_score;
  return d > 0.0f ? d : 0.0f;
}

// True when candidate (score, index) beats the current best: smaller score, or equal score and lower index.
PYDC_HD bool kmeans_prefer(float score, int64_t index, float best_score, int64_t best_index) {
  return score < best_score || (score == best_score && index < best_index);
}

// The K best (score, index) pairs seen so far, best first, under kmeans_prefer. The CUDA kernel keeps K > 1
// candidates from a TF32 product and re-scores them in fp32; K = 1 is the plain arg-min.
template <int K>
struct KMeansTopK {
  float score[K];
  int64_t index[K];

  PYDC_HD void reset() {
    for (int i = 0; i < K; ++i) {
      score[i] = kKMeansInf;
      index[i] = 0;
    }
  }

  // Sorted insertion with compile-time indices only (fully unrolled on the GPU), so the arrays stay in
  // registers; it runs only for a candidate that beats the current K-th best, which is rare.
  PYDC_HD void insert(float s, int64_t j) {
    if (!kmeans_prefer(s, j, score[K - 1], index[K - 1])) return;
    score[K - 1] = s;
    index[K - 1] = j;
    PYDC_UNROLL
    for (int pos = K - 1; pos > 0; --pos) {
      if (kmeans_prefer(score[pos], index[pos], score[pos - 1], index[pos - 1])) {
        const float moved_score = score[pos - 1];
        const int64_t moved_index = index[pos - 1];
        score[pos - 1] = score[pos];
        index[pos - 1] = index[pos];
        score[pos] = moved_score;
        index[pos] = moved_index;
      }
    }
  }
};

// Bound on |fl(score) - score| for one point and any centroid, where score = ||c||^2 - 2 x.c is computed in
// float32 from a float32 ||c||^2 and a float32 dot product summed in any order, with or without FMA (a BLAS
// GEMM): |error| <= gamma_{d+2} (||c||^2 + 2 ||x|| ||c||) <= gamma_{d+2} (||x|| + R)^2 (Higham's gamma_n =
// n u / (1 - n u), u = 2^-24; R = the largest centroid norm), times 1.01 so that the float64 arithmetic of
// the callers (this bound, a float64 settle, bounds on distances) stays inside it. Two float scores further
// apart than 2 * bound order the exact scores the same way; closer ones are settled in float64.
PYDC_HD double kmeans_score_error_bound(double point_sq_norm, double max_centroid_norm, int64_t d) {
  const double n_u = static_cast<double>(d + 2) * 5.9604644775390625e-08;  // (d + 2) * 2^-24
  const double gamma = n_u / (1.0 - n_u);
  const double radius = sqrt(point_sq_norm > 0.0 ? point_sq_norm : 0.0) + max_centroid_norm;
  return 1.01 * gamma * radius * radius;
}

// True when the float32 best and second-best scores of a point do not prove the float32 winner exact.
PYDC_HD bool kmeans_needs_settle(float best_score, float second_score, float point_sq_norm, double max_centroid_norm,
                                 int64_t d) {
  if (!(fabsf(best_score) <= 3.40282347e38f)) return false;  // no finite score: index 0 stays, as in every path
  const double gap = static_cast<double>(second_score) - static_cast<double>(best_score);
  return !(gap > 2.0 * kmeans_score_error_bound(point_sq_norm, max_centroid_norm, d));
}

// Relative rounding of ||x||^2 as a caller computed it (float32, any order): gamma_d, with 1% slack.
PYDC_HD double kmeans_norm_rounding(int64_t d) { return static_cast<double>(d) * 5.9604644775390625e-08 * 1.01; }

// A lower bound on the exact distance from a point to every centroid whose float32 score (kmeans_score) is
// at least group_min: the score's error and the rounding of ||x||^2 taken off. 0 for NaN.
PYDC_HD double kmeans_group_lower_bound(double point_sq, double norm_rounding, float group_min, double error) {
  const double lower_sq = point_sq * (1.0 - norm_rounding) + static_cast<double>(group_min) - error;
  return lower_sq > 0.0 ? sqrt(lower_sq) : 0.0;
}

// A lower bound, rounded down to float32, on the distance between two float32 centroids from their float64
// squared norms and float64 dot product (a Gram matrix entry): each float64 sum of d terms errs by at most
// gamma_d (d 2^-53 / (1 - d 2^-53)) times the sum of |terms| <= (||c_p||^2 + ||c_j||^2) / 2 (Cauchy-Schwarz), so
// with the three final roundings the error is below 4 (d + 4) 2^-53 (||c_p||^2 + ||c_j||^2), taken off before a
// square root rounded down. 0 for NaN. Any summation order (a BLAS DGEMM's too) is inside the bound.
PYDC_HD float centroid_separation_bound(double sq_norm_p, double sq_norm_j, double dot, int64_t d) {
  const double relative = 4.0 * static_cast<double>(d + 4) * 1.1102230246251565e-16;  // 4 (d + 4) 2^-53
  const double sq = sq_norm_p + sq_norm_j - 2.0 * dot - relative * (sq_norm_p + sq_norm_j);
  const double root = sq > 0.0 ? sqrt(sq) / (1.0 + 1e-12) : 0.0;
  float lower = static_cast<float>(root);
  if (static_cast<double>(lower) > root) lower = nextafterf(lower, 0.0f);
  return lower;
}

// --- bounded k-means with one lower bound per (point, centroid) (Elkan; pydc/cluster/kmeans_elkan.py) ---
// A lower bound l on the distance from x to c_j, stored as an "anchor" a = l + D_j where D_j is the
// centroid's cumulative drift (the sum of its moves since the start, rounded up), stays valid while c_j
// moves: a - D_j(now) <= l - (D_j(now) - D_j(then)) <= d(x, c_j(now)). Each helper rounds so that the value
// it returns is below the exact one (float32, round to nearest: every operation errs by at most 2^-24
// relative; the factor 1 - 2^-22 takes off more than two such errors), so the bounds hold in exact
// arithmetic, not only for the float32 distances.
constexpr float kElkanShrink = 1.0f - 0x1p-22f;

// A lower bound on the exact distance ||x - c|| from the float32 score ||c||^2 - 2 x.c of the pair, where
// base <= ||x||^2 - (the score's error bound) holds exactly: sqrt(base + score) with the rounding of the sum
// taken off (2^-22 (|base| + |score|) exceeds the two roundings of sum and difference). 0 for NaN.
PYDC_HD float elkan_lower_bound(float base, float score) {
  const float sq = (base + score) - 0x1p-22f * (fabsf(base) + fabsf(score));
  return (sq > 0.0f ? sqrtf(sq) : 0.0f) * kElkanShrink;
}

// The anchor of a lower bound `lower` >= 0 taken when the cumulative drift was >= offset_down >= 0.
PYDC_HD float elkan_anchor(float lower, float offset_down) { return (lower + offset_down) * kElkanShrink; }

// The lower bound an anchor gives now that the cumulative drift is <= offset_up (at most 0 once the drift has
// used it up: such a pair is always scored).
PYDC_HD float elkan_bound(float anchor, float offset_up) { return (anchor - offset_up) * kElkanShrink; }

// Squared L2 norm of a row, accumulated in float in index order.
PYDC_HD float kmeans_squared_norm(const float* row, int64_t d) {
  float sum = 0.0f;
  for (int64_t t = 0; t < d; ++t) sum += row[t] * row[t];
  return sum;
}

}  // namespace pydc
