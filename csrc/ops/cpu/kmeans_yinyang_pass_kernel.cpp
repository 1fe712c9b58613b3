// CPU kernel of kmeans_yinyang_pass (ops/kmeans.cpp): the per-point pass of common/kmeans_yinyang_pass.h run
// by one thread per point (SerialTeam), the same code the CUDA kernel runs one warp per point. Refresh passes
// take the float32 dot products from torch's GEMM (at::mm, blocks of rows), filter passes compute the scores
// of the groups they need with sequential float32 dot products, after the separation table of the pass
// (yinyang_separation_row over the float64 Gram matrix, at::mm, a block of rows at a time).
//
// On the CPU, bounded k-means runs the faster kmeans_assign_bounds / kmeans_assign_yinyang kernels (blocked
// scores, BLAS, the separation filter per block of 8 too); this kernel is what the tests that run without a
// GPU check the GPU's pass with, and it gives the same labels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "common/kmeans_math.h"
#include "common/kmeans_yinyang_pass.h"
#include "ops/kmeans.h"

namespace pydc {
namespace {

constexpr int64_t kRefreshBlockFloats = int64_t(1) << 18;  // dot products of one refresh block (1 MiB)
constexpr int64_t kGramDoubles = int64_t(1) << 22;         // rows of the centroids' Gram matrix at a time (32 MiB)

std::tuple<at::Tensor, at::Tensor, at::Tensor> kmeans_yinyang_pass_cpu(
    const at::Tensor& x_in, const at::Tensor& centroids_in, const at::Tensor& ids, const at::Tensor& offsets,
    const at::Tensor& norms, const at::Tensor& drift, bool refresh, const at::Tensor& labels,
    const at::Tensor& lower) {
  YinyangPassPlan plan = plan_kmeans_yinyang_pass(x_in, centroids_in, ids, offsets, norms, drift, labels, lower);
  const int64_t n = plan.x.size(0), k = plan.centroids.size(0), d = plan.x.size(1);
  if (n == 0) return {plan.distances, plan.upper, plan.counts};
  const float* cs = plan.centroids.const_data_ptr<float>();
  std::vector<float> sq_norms(k);
  std::vector<double> sq_norms_f64(k);
  double max_sq = 0.0;
  for (int64_t j = 0; j < k; ++j) {
    sq_norms[j] = kmeans_squared_norm(cs + j * d, d);
    sq_norms_f64[j] = kmeans_dot_f64(cs + j * d, cs + j * d, d);
    if (sq_norms_f64[j] > max_sq) max_sq = sq_norms_f64[j];  // NaN norms are skipped, as kmeans_centroid_info
  }
  YinyangPassArgs args = yinyang_pass_args(plan, plan.ids.data(), plan.position_of.data(), plan.offsets.data(),
                                           plan.group_of.data(), sq_norms.data(), sq_norms_f64.data(), max_sq);

  // filter passes: the separation table (k x G), from the float64 Gram matrix a block of rows at a time
  std::vector<float> separation;
  if (!refresh) {
    separation.resize(k * plan.groups);
    const at::Tensor c64 = plan.centroids.to(at::kDouble);
    const int64_t gram_rows = std::max<int64_t>(1, std::min(k, kGramDoubles / k));
    for (int64_t p0 = 0; p0 < k; p0 += gram_rows) {
      const int64_t p1 = std::min(k, p0 + gram_rows);
      const at::Tensor gram = at::mm(c64.slice(0, p0, p1), c64.t()).contiguous();
      const double* gram_rows_data = gram.const_data_ptr<double>();
      at::parallel_for(p0, p1, 16, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          yinyang_separation_row(p, sq_norms_f64.data(), gram_rows_data + (p - p0) * k, plan.group_of.data(), k, d,
                                 plan.groups, separation.data() + p * plan.groups);
        }
      });
    }
    args.separation = separation.data();
  }

  std::atomic<int64_t> rows{0}, scores{0};
  const SerialTeam team;
  if (refresh) {
    const int64_t block = std::max<int64_t>(1, std::min(n, kRefreshBlockFloats / k));
    at::parallel_for(0, (n + block - 1) / block, 1, [&](int64_t b_begin, int64_t b_end) {
      YinyangGroupTops tops;
      int64_t block_rows = 0, block_scores = 0;
      for (int64_t b = b_begin; b < b_end; ++b) {
        const int64_t i0 = b * block, count = std::min(block, n - i0);
        const at::Tensor dots = at::mm(plan.x.narrow(0, i0, count), plan.centroids.t()).contiguous();
        const float* dot = dots.const_data_ptr<float>();
        for (int64_t r = 0; r < count; ++r) {
          const YinyangPointCounts c =
              yinyang_pass_point(team, args, i0 + r, true, RowScore{dot + r * k, sq_norms.data()}, tops);
          block_rows += c.rows;
          block_scores += c.scores;
        }
      }
      rows += block_rows;
      scores += block_scores;
    });
  } else {
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      YinyangGroupTops tops;
      int64_t chunk_rows = 0, chunk_scores = 0;
      for (int64_t i = begin; i < end; ++i) {
        const DotScore score{args.x + i * d, cs, sq_norms.data(), d, /*t_stride=*/1, /*j_stride=*/d};
        const YinyangPointCounts c = yinyang_pass_point(team, args, i, false, score, tops);
        chunk_rows += c.rows;
        chunk_scores += c.scores;
      }
      rows += chunk_rows;
      scores += chunk_scores;
    });
  }
  int64_t* count = plan.counts.mutable_data_ptr<int64_t>();
  count[0] = rows.load();
  count[1] = scores.load();
  return {plan.distances, plan.upper, plan.counts};
}

}  // namespace
}  // namespace pydc

TORCH_LIBRARY_IMPL(pydc, CPU, m) { m.impl("kmeans_yinyang_pass", &pydc::kmeans_yinyang_pass_cpu); }
