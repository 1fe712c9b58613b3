// Pieces of the CPU k-means assignment shared by kmeans_assign (kmeans_kernel.cpp) and the bounded
// assignment of bounded k-means (kmeans_bounded_kernel.cpp), so that both choose labels the same way.
//
// The label of a point is the arg-min over centroids of its score ||c||^2 - 2 x.c *in exact arithmetic*
// (up to float64 rounding), ties to the lowest centroid index. A float32 GEMM (BLAS, any summation order)
// ranks the centroids; when its best and second-best scores are further apart than twice
// kmeans_score_error_bound, the float32 winner is the exact winner; otherwise the row is settled by
// fixed-order float64 scores against every centroid (rare: near-ties and duplicates). The label is thus a
// function of the inputs alone, not of the BLAS, its blocking, the ISA level or the thread count, which is
// what lets bounded k-means skip rows and still return Lloyd's labels exactly.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/kmeans_math.h"
#include "ops/cpu/blas_gemm.h"
#include "ops/cpu/cpu_kernels.h"

namespace pydc {

struct KMeansCentroidInfo {
  at::Tensor sq_norms;                 // (k,) float32: kmeans_squared_norm of every centroid (the GEMM path)
  std::vector<double> sq_norms_f64;    // (k,) fixed-order float64 squared norms (the settle path)
  double max_norm = 0.0;               // largest centroid norm (float64), for kmeans_score_error_bound
};

KMeansCentroidInfo kmeans_centroid_info(const at::Tensor& centroids);

// The exact winner of one point by fixed-order float64 scores against all k centroids. `ids` maps a
// centroid's position to the index that breaks ties (nullptr: its position). Returns the winner's position
// and its float64 score in *score (+inf and position 0 when no score is finite).
int64_t kmeans_settle_row(const float* x, const float* centroids, const double* sq_norms_f64, const int64_t* ids,
                          int64_t k, int64_t d, double* score);

// True when the float32 best and second-best scores of a point do not prove the float32 winner exact.
bool kmeans_needs_settle(float best_score, float second_score, float point_sq_norm, double max_centroid_norm,
                         int64_t d);

// kmeans_assign's winner of every point from full rows of scores, for the passes that also need the whole row
// (the bounds of bounded k-means): x in blocks of rows, each multiplied by all centroids in one BLAS GEMM
// (cpu_gemm_abt, into a buffer of at most 2^22 floats), each row folded to its top-2 and settled in float64
// where float32 cannot decide. Calls row_fn(i, dot_row, position, best, score) for every point, in parallel
// (at::parallel_for, outside which the GEMM runs): its dot products x_i . c_j, the winner's position (ties by
// ids[j], or by position for nullptr), the float32 best score and the winner's score (settled or float32).
template <typename RowFn>
void kmeans_full_rows(const at::Tensor& x, const at::Tensor& centroids, const KMeansCentroidInfo& info,
                      const float* point_sq_norms, const int64_t* ids, RowFn row_fn) {
  constexpr int64_t kBufferFloats = int64_t(1) << 22;  // 16 MiB of scores per block
  const int64_t n = x.size(0), k = centroids.size(0), d = x.size(1);
  const float* xs = x.const_data_ptr<float>();
  const float* cs = centroids.const_data_ptr<float>();
  const float* cn = info.sq_norms.const_data_ptr<float>();
  const CpuKernels& kernels = cpu_kernels();
  const int64_t block = std::max<int64_t>(16, std::min<int64_t>(4096, kBufferFloats / k));
  at::Tensor buffer = at::empty({std::min(n, block), k}, x.options());
  for (int64_t i0 = 0; i0 < n; i0 += block) {
    const int64_t rows = std::min(block, n - i0);
    at::Tensor dots = buffer.narrow(0, 0, rows);
    cpu_gemm_abt(dots, x.narrow(0, i0, rows), centroids);  // BLAS (blas_gemm.h), multithreaded
    const float* dot_rows = dots.const_data_ptr<float>();
    at::parallel_for(0, rows, 16, [&](int64_t r_begin, int64_t r_end) {
      for (int64_t r = r_begin; r < r_end; ++r) {
        const int64_t i = i0 + r;
        const float* dot = dot_rows + r * k;
        float best = kKMeansInf, second = kKMeansInf;
        int64_t position = 0;
        kernels.fold_row_top2(dot, cn, k, 0, &best, &position, &second);
        float score = best;
        if (kmeans_needs_settle(best, second, point_sq_norms[i], info.max_norm, d)) {
          double exact;
          position = kmeans_settle_row(xs + i * d, cs, info.sq_norms_f64.data(), ids, k, d, &exact);
          score = static_cast<float>(exact);
        }
        row_fn(i, dot, position, best, score);
      }
    });
  }
}

// --- bounded (Yinyang) k-means: kmeans_bounded_kernel.cpp, kmeans_yinyang_kernel.cpp ---

// Checks the arguments shared by the bounded-assignment ops (x (N, d) and centroids (k, d) float32, centroid
// ids (k,) int64, group offsets (G + 1,) int64 from 0 to k, non-decreasing, x_sq_norms (N,) float32) and
// returns the number of groups G.
int64_t check_grouped_centroids(const char* op, const at::Tensor& x, const at::Tensor& centroids,
                                const at::Tensor& ids, const at::Tensor& offsets, const at::Tensor& x_sq_norms);

// Relative rounding of ||x||^2 as a caller computed it (float32, any order): gamma_d, with 1% slack.
inline double kmeans_norm_rounding(int64_t d) { return static_cast<double>(d) * 5.9604644775390625e-08 * 1.01; }

// A lower bound on the exact distance from a point to every centroid whose float32 score (kmeans_score) is
// at least group_min: the score's error and the rounding of ||x||^2 taken off. 0 for NaN.
inline double kmeans_group_lower_bound(double point_sq, double norm_rounding, float group_min, double error) {
  const double lower_sq = point_sq * (1.0 - norm_rounding) + static_cast<double>(group_min) - error;
  return lower_sq > 0.0 ? std::sqrt(lower_sq) : 0.0;
}

// A lower bound, rounded down to float32, on the distance between two float32 centroids from their float64
// squared norms and float64 dot product (a Gram matrix entry): each float64 sum of d terms errs by at most
// gamma_d (d 2^-53 / (1 - d 2^-53)) times the sum of |terms| <= (||c_p||^2 + ||c_j||^2) / 2 (Cauchy-Schwarz), so
// with the three final roundings the error is below 4 (d + 4) 2^-53 (||c_p||^2 + ||c_j||^2), taken off before a
// square root rounded down. 0 for NaN.
inline float centroid_separation_bound(double sq_norm_p, double sq_norm_j, double dot, int64_t d) {
  const double relative = 4.0 * static_cast<double>(d + 4) * 1.1102230246251565e-16;  // 4 (d + 4) 2^-53
  const double sq = sq_norm_p + sq_norm_j - 2.0 * dot - relative * (sq_norm_p + sq_norm_j);
  const double root = sq > 0.0 ? std::sqrt(sq) / (1.0 + 1e-12) : 0.0;
  float lower = static_cast<float>(root);
  if (static_cast<double>(lower) > root) lower = std::nextafter(lower, 0.0f);
  return lower;
}

}  // namespace pydc
