// Schemas of the k-means ops and the checks both kernels share.
//
// kmeans_assign: nearest centroid of every point and its squared distance, without an N x k matrix.
// kmeans_assign_bounds, kmeans_label_distances, kmeans_assign_yinyang, kmeans_assign_elkan, kmeans_assign_delta:
// the steps of bounded k-means (CPU only).
// kmeans_update: per-cluster sums of the points (of the flagged clusters only, given `clusters`) and per-cluster
// counts (the centroid update is sums/counts).
#include "ops/kmeans.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"

namespace pydc {

namespace {
constexpr const char* kAssign = "pydc::kmeans_assign";
constexpr const char* kUpdate = "pydc::kmeans_update";
}  // namespace

KMeansAssignPlan plan_kmeans_assign(const at::Tensor& x, const at::Tensor& centroids,
                                    const std::optional<at::Tensor>& x_sq_norms) {
  PYDC_CHECK_DIM(kAssign, "x", x, 2);
  PYDC_CHECK_DIM(kAssign, "centroids", centroids, 2);
  PYDC_CHECK_DTYPE(kAssign, "x", x, at::kFloat);
  PYDC_CHECK_DTYPE(kAssign, "centroids", centroids, at::kFloat);
  PYDC_CHECK_SAME_DEVICE(kAssign, "x", x, "centroids", centroids);
  TORCH_CHECK(centroids.size(1) == x.size(1), kAssign, ": expected centroids of shape (k, ", x.size(1),
              ") to match x of shape ", x.sizes(), ", got centroids of shape ", centroids.sizes());
  TORCH_CHECK(x.size(1) >= 1, kAssign, ": expected points with at least one feature, got x of shape ",
              x.sizes());
  TORCH_CHECK(centroids.size(0) >= 1, kAssign, ": expected at least one centroid, got centroids of shape ",
              centroids.sizes());
  TORCH_CHECK(centroids.size(0) < (int64_t(1) << 31), kAssign, ": expected fewer than 2^31 centroids, got ",
              centroids.size(0));
  KMeansAssignPlan plan;
  plan.x = x.contiguous();
  plan.centroids = centroids.contiguous();
  if (x_sq_norms.has_value() && x_sq_norms->defined()) {
    const at::Tensor& norms = *x_sq_norms;
    PYDC_CHECK_DIM(kAssign, "x_sq_norms", norms, 1);
    PYDC_CHECK_DTYPE(kAssign, "x_sq_norms", norms, at::kFloat);
    PYDC_CHECK_SAME_DEVICE(kAssign, "x", x, "x_sq_norms", norms);
    TORCH_CHECK(norms.size(0) == x.size(0), kAssign, ": expected x_sq_norms of shape (", x.size(0),
                ",) (one squared norm per row of x), got ", describe(norms));
    plan.x_sq_norms = norms.contiguous();
  }
  plan.labels = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  plan.distances = at::empty({x.size(0)}, x.options());
  return plan;
}

KMeansUpdatePlan plan_kmeans_update(const at::Tensor& x, const at::Tensor& labels, int64_t k,
                                    const std::optional<at::Tensor>& clusters) {
  PYDC_CHECK_DIM(kUpdate, "x", x, 2);
  PYDC_CHECK_DIM(kUpdate, "labels", labels, 1);
  PYDC_CHECK_DTYPE(kUpdate, "x", x, at::kFloat);
  PYDC_CHECK_DTYPE(kUpdate, "labels", labels, at::kLong);
  PYDC_CHECK_SAME_DEVICE(kUpdate, "x", x, "labels", labels);
  TORCH_CHECK(labels.size(0) == x.size(0), kUpdate, ": expected one label per row of x, i.e. labels of "
              "shape (", x.size(0), ",), got ", describe(labels));
  TORCH_CHECK(x.size(1) >= 1, kUpdate, ": expected points with at least one feature, got x of shape ",
              x.sizes());
  TORCH_CHECK(k >= 1, kUpdate, ": expected k >= 1 clusters, got k = ", k);
  KMeansUpdatePlan plan;
  plan.x = x.contiguous();
  plan.labels = labels.contiguous();
  plan.k = k;
  plan.sums = at::zeros({k, x.size(1)}, x.options());
  plan.counts = at::zeros({k}, labels.options());
  if (clusters.has_value() && clusters->defined()) {
    PYDC_CHECK_DTYPE(kUpdate, "clusters", *clusters, at::kBool);
    PYDC_CHECK_SAME_DEVICE(kUpdate, "x", x, "clusters", *clusters);
    TORCH_CHECK(clusters->dim() == 1 && clusters->size(0) == k, kUpdate, ": expected clusters of shape (", k,
                ",) (one flag per cluster), got ", describe(*clusters));
    plan.clusters = clusters->contiguous();
  }
  return plan;
}

}  // namespace pydc

TORCH_LIBRARY_FRAGMENT(pydc, m) {
  m.def("kmeans_assign(Tensor x, Tensor centroids, Tensor? x_sq_norms=None, bool allow_tf32=True) -> "
        "(Tensor labels, Tensor distances)");
  m.def("kmeans_update(Tensor x, Tensor labels, int k, bool deterministic=True, Tensor? clusters=None) -> "
        "(Tensor sums, Tensor counts)");
  // Bounded (Yinyang) k-means on the CPU: kernels and semantics in ops/cpu/kmeans_bounded_kernel.cpp.
  m.def("kmeans_assign_bounds(Tensor x, Tensor centroids, Tensor centroid_ids, Tensor group_offsets, "
        "Tensor x_sq_norms) -> (Tensor labels, Tensor distances, Tensor upper, Tensor group_lower)");
  m.def("kmeans_label_distances(Tensor x, Tensor centroids, Tensor labels) -> Tensor");
  m.def("kmeans_assign_yinyang(Tensor x, Tensor centroids, Tensor centroid_ids, Tensor group_offsets, "
        "Tensor x_sq_norms, Tensor group_drift, Tensor(a!) labels, Tensor(b!) group_lower) -> "
        "(Tensor distances, Tensor counts)");
  // Bounded k-means with one lower bound per (point, centroid) (Elkan) on the CPU: ops/cpu/kmeans_elkan_kernel.cpp.
  m.def("kmeans_assign_elkan(Tensor x, Tensor centroids, Tensor x_sq_norms, Tensor drift_offsets, float max_drift, "
        "float dense_fraction, Tensor(a!) labels, Tensor(b!) anchors, Tensor(c!) second) -> "
        "(Tensor distances, Tensor counts)");
  // k-means by updated dot products (the points that changed label) on the CPU: ops/cpu/kmeans_delta_kernel.cpp.
  m.def("kmeans_assign_delta(Tensor x, Tensor centroids, Tensor x_sq_norms, float dense_changes, Tensor(a!) labels, "
        "Tensor(b!) dots, Tensor(c!) column_error, Tensor(d!) basis_labels, Tensor(e!) basis_centroids, "
        "Tensor(f!) tops, Tensor(g!)? packed_x=None) -> (Tensor distances, Tensor counts)");
  // kmeans_assign's labels from a bfloat16 screening GEMM (MKL's), CPU only: ops/cpu/kmeans_bf16_kernel.cpp.
  m.def("kmeans_assign_bf16(Tensor x, Tensor x_bf16, Tensor centroids, Tensor x_sq_norms) -> "
        "(Tensor labels, Tensor distances)");
  m.def("kmeans_assign_bounds_bf16(Tensor x, Tensor x_bf16, Tensor centroids, Tensor centroid_ids, "
        "Tensor group_offsets, Tensor x_sq_norms) -> (Tensor labels, Tensor distances, Tensor upper, "
        "Tensor group_lower)");
}
