// CPU kernels of the ops behind bounded (Yinyang) k-means, pydc/cluster/kmeans_bounded.py:
//
// kmeans_assign_bounds(x, centroids, centroid_ids, group_offsets, x_sq_norms)
//     -> (labels, distances, upper, group_lower)
//   The labels and distances kmeans_assign would return (same arithmetic, kmeans_cpu.h), for centroids
//   stored sorted by group (group g = rows group_offsets[g] .. group_offsets[g + 1] - 1; centroid_ids[j] is
//   the original index of row j, returned as the label and used for ties), plus float64 bounds for the
//   next iterations: upper >= the exact distance to the chosen centroid, group_lower[:, g] <= the exact
//   distance to every other centroid of group g. Both include kmeans_score_error_bound and the rounding of
//   the squared norm x_sq_norms, so they hold for the exact distances, not for the float32 ones.
// kmeans_label_distances(x, centroids, labels) -> (N,) float64
//   Fixed-order float64 squared distance of every point to its labelled centroid.
//
// The whole row of scores of a block of points is kept (one GEMM of up to 4M floats), since the group
// minima need every score of the row after its label is known.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/checks.h"
#include "common/kmeans_math.h"
#include "ops/cpu/blas_gemm.h"
#include "ops/cpu/cpu_kernels.h"
#include "ops/cpu/kmeans_cpu.h"

namespace pydc {
namespace {

constexpr const char* kBounds = "pydc::kmeans_assign_bounds";
constexpr const char* kLabelDistances = "pydc::kmeans_label_distances";

void check_points_and_centroids(const char* op, const at::Tensor& x, const at::Tensor& centroids) {
  PYDC_CHECK_DIM(op, "x", x, 2);
  PYDC_CHECK_DIM(op, "centroids", centroids, 2);
  PYDC_CHECK_DTYPE(op, "x", x, at::kFloat);
  PYDC_CHECK_DTYPE(op, "centroids", centroids, at::kFloat);
  TORCH_CHECK(x.size(1) >= 1 && centroids.size(1) == x.size(1), op, ": expected x (N, d) and centroids (k, d) "
              "with the same d >= 1, got x of shape ", x.sizes(), " and centroids of shape ", centroids.sizes());
  TORCH_CHECK(centroids.size(0) >= 1, op, ": expected at least one centroid, got ", describe(centroids));
}

}  // namespace

int64_t check_grouped_centroids(const char* op, const at::Tensor& x, const at::Tensor& centroids,
                                const at::Tensor& ids, const at::Tensor& offsets_in, const at::Tensor& norms) {
  check_points_and_centroids(op, x, centroids);
  const int64_t n = x.size(0), k = centroids.size(0);
  PYDC_CHECK_DTYPE(op, "centroid_ids", ids, at::kLong);
  PYDC_CHECK_DTYPE(op, "group_offsets", offsets_in, at::kLong);
  PYDC_CHECK_DTYPE(op, "x_sq_norms", norms, at::kFloat);
  TORCH_CHECK(ids.dim() == 1 && ids.size(0) == k, op, ": expected centroid_ids of shape (", k, ",), got ",
              describe(ids));
  TORCH_CHECK(norms.dim() == 1 && norms.size(0) == n, op, ": expected x_sq_norms of shape (", n, ",), got ",
              describe(norms));
  TORCH_CHECK(offsets_in.dim() == 1 && offsets_in.size(0) >= 2, op, ": expected group_offsets of shape "
              "(groups + 1,) with at least one group, got ", describe(offsets_in));
  const at::Tensor offsets_t = offsets_in.to(at::kCPU).contiguous();  // G + 1 values, also of CUDA tensors
  const int64_t groups = offsets_t.size(0) - 1;
  const int64_t* offsets = offsets_t.const_data_ptr<int64_t>();
  TORCH_CHECK(offsets[0] == 0 && offsets[groups] == k, op, ": expected group_offsets from 0 to k = ", k, ", got ",
              offsets[0], " to ", offsets[groups]);
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK(offsets[g] <= offsets[g + 1], op, ": expected non-decreasing group_offsets, got ", offsets[g],
                " then ", offsets[g + 1]);
  }
  return groups;
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kmeans_assign_bounds_cpu(
    const at::Tensor& x_in, const at::Tensor& centroids_in, const at::Tensor& ids_in, const at::Tensor& offsets_in,
    const at::Tensor& norms_in) {
  const int64_t groups = check_grouped_centroids(kBounds, x_in, centroids_in, ids_in, offsets_in, norms_in);
  const int64_t n = x_in.size(0), d = x_in.size(1);
  const at::Tensor offsets_t = offsets_in.contiguous();
  const int64_t* offsets = offsets_t.const_data_ptr<int64_t>();
  const at::Tensor x = x_in.contiguous(), centroids = centroids_in.contiguous();
  const at::Tensor ids_t = ids_in.contiguous(), norms = norms_in.contiguous();
  at::Tensor labels = at::empty({n}, x.options().dtype(at::kLong));
  at::Tensor distances = at::empty({n}, x.options());
  at::Tensor upper = at::empty({n}, x.options().dtype(at::kDouble));
  at::Tensor group_lower = at::empty({n, groups}, x.options().dtype(at::kDouble));
  if (n == 0) return {labels, distances, upper, group_lower};

  const KMeansCentroidInfo info = kmeans_centroid_info(centroids);
  const float* cn = info.sq_norms.const_data_ptr<float>();
  const int64_t* ids = ids_t.const_data_ptr<int64_t>();
  const float* pn = norms.const_data_ptr<float>();
  int64_t* label_out = labels.mutable_data_ptr<int64_t>();
  float* distance_out = distances.mutable_data_ptr<float>();
  double* upper_out = upper.mutable_data_ptr<double>();
  double* lower_out = group_lower.mutable_data_ptr<double>();
  const CpuKernels& kernels = cpu_kernels();
  const double norm_rounding = kmeans_norm_rounding(d);

  kmeans_full_rows(x, centroids, info, pn, ids, [&](int64_t i, const float* dot, int64_t position, float best,
                                                     float score) {
    thread_local std::vector<float> group_min;
    group_min.resize(groups);
    label_out[i] = std::isfinite(best) ? ids[position] : 0;  // no finite score (a NaN point): 0, as kmeans_assign
    distance_out[i] = kmeans_distance(pn[i], score);
    const double error = kmeans_score_error_bound(pn[i], info.max_norm, d);
    const double point_sq = static_cast<double>(pn[i]);
    // The chosen centroid's exact score is at most the float32 best + error (or, settled, within float64
    // rounding of a score at most that): 2 * error covers both.
    const double upper_sq = point_sq * (1.0 + norm_rounding) + static_cast<double>(best) + 2.0 * error;
    upper_out[i] = std::sqrt(std::max(0.0, upper_sq));
    kernels.group_min_scores(dot, cn, offsets, groups, position, group_min.data());
    double* lower_row = lower_out + i * groups;
    // NaN (a NaN row) gives 0: such a row is recomputed every iteration, like in plain Lloyd.
    for (int64_t g = 0; g < groups; ++g) {
      lower_row[g] = kmeans_group_lower_bound(point_sq, norm_rounding, group_min[g], error);
    }
    if (!std::isfinite(upper_out[i])) upper_out[i] = kKMeansInf;
  });
  return {labels, distances, upper, group_lower};
}

at::Tensor kmeans_label_distances_cpu(const at::Tensor& x_in, const at::Tensor& centroids_in,
                                      const at::Tensor& labels_in) {
  check_points_and_centroids(kLabelDistances, x_in, centroids_in);
  PYDC_CHECK_DTYPE(kLabelDistances, "labels", labels_in, at::kLong);
  const int64_t n = x_in.size(0), k = centroids_in.size(0), d = x_in.size(1);
  TORCH_CHECK(labels_in.dim() == 1 && labels_in.size(0) == n, kLabelDistances, ": expected labels of shape (",
              n, ",), got ", describe(labels_in));
  const at::Tensor x = x_in.contiguous(), centroids = centroids_in.contiguous(), labels = labels_in.contiguous();
  at::Tensor out = at::empty({n}, x.options().dtype(at::kDouble));
  const float* xs = x.const_data_ptr<float>();
  const float* cs = centroids.const_data_ptr<float>();
  const int64_t* label = labels.const_data_ptr<int64_t>();
  double* result = out.mutable_data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(label[i] >= 0 && label[i] < k, kLabelDistances, ": expected labels in [0, ", k, "), got labels[",
                i, "] = ", label[i]);
  }
  const CpuKernels& kernels = cpu_kernels();
  at::parallel_for(0, n, std::max<int64_t>(1, 65536 / d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) result[i] = kernels.squared_distance_f64(xs + i * d, cs + label[i] * d, d);
  });
  return out;
}

}  // namespace
}  // namespace pydc

TORCH_LIBRARY_IMPL(pydc, CPU, m) {
  m.impl("kmeans_assign_bounds", &pydc::kmeans_assign_bounds_cpu);
  m.impl("kmeans_label_distances", &pydc::kmeans_label_distances_cpu);
}
