// Pieces of the CPU k-means assignment shared by kmeans_assign (kmeans_kernel.cpp) and the bounded
// assignment of bounded k-means (kmeans_bounded_kernel.cpp), so that both choose labels the same way.
//
// The label of a point is the arg-min over centroids of its score ||c||^2 - 2 x.c *in exact arithmetic*
// (up to float64 rounding), ties to the lowest centroid index. A float32 GEMM (BLAS, any summation order)
// ranks the centroids; when its best and second-best scores are further apart than twice
// kmeans_score_error_bound, the float32 winner is the exact winner; otherwise the row is settled by
// fixed-order float64 scores against every centroid whose float32 score is within that margin of the best
// (the others are provably farther; rare: near-ties and duplicates). The label is thus a
// function of the inputs alone, not of the BLAS, its blocking, the ISA level or the thread count, which is
// what lets bounded k-means skip rows and still return Lloyd's labels exactly.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/checks.h"
#include "common/kmeans_math.h"
#include "ops/cpu/blas_gemm.h"
#include "ops/cpu/cpu_kernels.h"
#include "ops/kmeans.h"

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

// Points per thread-local block for n points: max_rows, or fewer so that every thread of torch's pool gets a
// block when n is small (at least 16 rows per block).
inline int64_t kmeans_thread_block_rows(int64_t n, int64_t max_rows = kPerThreadGemmRows) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return std::clamp<int64_t>((n + threads - 1) / threads, 16, max_rows);
}

// The fixed-order float64 winner (kmeans_settle_row's score and tie rule: lowest ids[j], or position for
// nullptr) among the scored centroids whose float32 score is within `margin` (twice kmeans_score_error_bound)
// of the best one; visit(fn) calls fn(position, float32 score) for every scored centroid. Every other centroid
// is provably farther: an unscored one by the bound filters' margin, a scored one because its exact score
// exceeds the best's by more than 2% of the error bound (the bound's 1% slack), far above float64 rounding. So
// the winner is kmeans_settle_row's, without its k float64 dot products (the points halfway between clusters
// need a settle often). Returns the winner's position and its float64 score in *score.
template <typename Visit>
int64_t kmeans_settle_near_best(const float* x, const float* centroids, const double* sq_norms_f64, const int64_t* ids,
                                int64_t d, float best_score, double margin, double* score, Visit visit) {
  const CpuKernels& kernels = cpu_kernels();
  double best = kKMeansInf;  // the start of kmeans_settle_row's scan, whose first centroid is position 0
  int64_t best_position = 0, best_id = ids != nullptr ? ids[0] : 0;
  visit([&](int64_t j, float float_score) {
    // NaN scores are candidates, as in a full settle (their float64 score never wins)
    if (static_cast<double>(float_score) - static_cast<double>(best_score) > margin) return;
    const double s = sq_norms_f64[j] - 2.0 * kernels.dot_f64(x, centroids + j * d, d);
    const int64_t id = ids != nullptr ? ids[j] : j;
    if (s < best || (s == best && id < best_id)) {
      best = s;
      best_position = j;
      best_id = id;
    }
  });
  *score = best;
  return best_position;
}

// kmeans_settle_row's winner of a point whose whole row of float32 dot products x . c_j is at hand (dot, k of
// them): only the centroids whose float32 score is within twice kmeans_score_error_bound of the best one get a
// float64 score (kmeans_settle_near_best), not all k (a row scored by GEMM needs a settle whenever its two
// best centroids are nearly as close: 0.3-0.4% of the rows of unstructured data at 100k x 256, k = 1000, which
// cost 6% of a kmeans_assign profile when each computed k float64 dot products).
inline int64_t kmeans_settle_full_row(const float* x, const float* centroids, const KMeansCentroidInfo& info,
                                      const int64_t* ids, const float* dot, const float* centroid_sq_norms, int64_t k,
                                      int64_t d, float best_score, float point_sq_norm, double* score) {
  const double margin = 2.0 * kmeans_score_error_bound(point_sq_norm, info.max_norm, d);
  return kmeans_settle_near_best(x, centroids, info.sq_norms_f64.data(), ids, d, best_score, margin, score,
                                 [&](auto fn) {
                                   for (int64_t j = 0; j < k; ++j) fn(j, kmeans_score(centroid_sq_norms[j], dot[j]));
                                 });
}

// kmeans_assign's winner of every point from full rows of scores, for the passes that also need the whole row
// (the bounds of bounded k-means): each thread of at::parallel_for multiplies its own blocks of rows by all
// centroids in one single-threaded BLAS GEMM (cpu_gemm_abt_per_thread, a buffer of at most 2^18 floats per
// thread unless that is under 64 rows), folds each row to its top-2 and settles it in float64 where float32
// cannot decide, while the block is in its core's cache. Calls row_fn(i, dot_row, position, best, score) for
// every point, on the thread that computed it: its dot products x_i . c_j, the winner's position (ties by
// ids[j], or by position for nullptr), the float32 best score and the winner's score (settled or float32).
template <typename RowFn>
void kmeans_full_rows(const at::Tensor& x, const at::Tensor& centroids, const KMeansCentroidInfo& info,
                      const float* point_sq_norms, const int64_t* ids, RowFn row_fn) {
  constexpr int64_t kBufferFloats = int64_t(1) << 18;  // 1 MiB of scores per thread
  const int64_t n = x.size(0), k = centroids.size(0), d = x.size(1);
  const float* xs = x.const_data_ptr<float>();
  const float* cs = centroids.const_data_ptr<float>();
  const float* cn = info.sq_norms.const_data_ptr<float>();
  const CpuKernels& kernels = cpu_kernels();
  const int64_t rows_per_thread = kmeans_thread_block_rows(n);  // at least 64 rows per GEMM where n allows
  const int64_t block =
      std::max(std::min(rows_per_thread, kBufferFloats / k), std::min<int64_t>(rows_per_thread, 64));
  PerThreadCpuGemm one_thread_each;
  const CpuGemmRhs rhs(centroids);
  at::parallel_for(0, (n + block - 1) / block, 1, [&](int64_t b_begin, int64_t b_end) {
    at::Tensor buffer = at::empty({std::min(n, block), k}, x.options());
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t i0 = b * block, rows = std::min(block, n - i0);
      at::Tensor dots = buffer.narrow(0, 0, rows);
      rhs.multiply(dots, x.narrow(0, i0, rows));
      const float* dot_rows = dots.const_data_ptr<float>();
      for (int64_t r = 0; r < rows; ++r) {
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
    }
  });
}

// Checks the arguments every bounded pass takes first (kmeans_elkan_kernel.cpp, kmeans_delta_kernel.cpp): x (N, d)
// and centroids (k, d) float32 with the same d >= 1, 1 <= k < 2^31 (centroid indices are int32 inside), and
// x_sq_norms (N,) float32.
inline void check_points_and_centroids(const char* op, const at::Tensor& x, const at::Tensor& centroids,
                                       const at::Tensor& x_sq_norms) {
  PYDC_CHECK_DIM(op, "x", x, 2);
  PYDC_CHECK_DIM(op, "centroids", centroids, 2);
  PYDC_CHECK_DTYPE(op, "x", x, at::kFloat);
  PYDC_CHECK_DTYPE(op, "centroids", centroids, at::kFloat);
  PYDC_CHECK_DTYPE(op, "x_sq_norms", x_sq_norms, at::kFloat);
  const int64_t n = x.size(0), k = centroids.size(0), d = x.size(1);
  TORCH_CHECK(d >= 1 && centroids.size(1) == d && k >= 1, op, ": expected x (N, d) and centroids (k, d) with the "
              "same d >= 1 and k >= 1, got x of shape ", x.sizes(), " and centroids of shape ", centroids.sizes());
  TORCH_CHECK(k <= std::numeric_limits<int32_t>::max(), op, ": expected k < 2^31, got ", k);
  TORCH_CHECK(x_sq_norms.dim() == 1 && x_sq_norms.size(0) == n, op, ": expected x_sq_norms of shape (", n,
              ",), got ", describe(x_sq_norms));
}

// --- bounded (Yinyang) k-means: kmeans_bounded_kernel.cpp, kmeans_yinyang_kernel.cpp ---

// gamma_n = n u / (1 - n u) (u = 2^-24), with 1% slack: the error of a float32 dot product of length n, summed in
// any order, per unit of the sum of its terms' magnitudes (|x| |y|) (the delta and bfloat16 passes' bounds).
inline double kmeans_gamma(int64_t n) {
  const double nu = static_cast<double>(n) * 5.9604644775390625e-08;
  return 1.01 * nu / (1.0 - nu);
}

// Calls row_fn(p, sq_norms, dot_row) for every centroid p, in parallel: the fixed float64 squared norms of all
// centroids (each within gamma_d ||c||^2) and row p of their float64 Gram matrix (exact products, float64 sums),
// computed 256 rows at a time (256 x k float64), for the separation bounds of bounded k-means.
template <typename RowFn>
void kmeans_centroid_gram_rows(const at::Tensor& centroids, RowFn row_fn) {
  constexpr int64_t kGramRows = 256;
  const int64_t k = centroids.size(0);
  const at::Tensor c64 = centroids.to(at::kDouble);
  const at::Tensor sq_norms = c64.mul(c64).sum(1);
  const double* norm = sq_norms.const_data_ptr<double>();
  for (int64_t p0 = 0; p0 < k; p0 += kGramRows) {
    const int64_t p1 = std::min(k, p0 + kGramRows);
    const at::Tensor gram = at::mm(c64.slice(0, p0, p1), c64.t()).contiguous();
    const double* dot = gram.const_data_ptr<double>();
    at::parallel_for(p0, p1, 16, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) row_fn(p, norm, dot + (p - p0) * k);
    });
  }
}

}  // namespace pydc
