// Schemas of the k-means ops and the checks both kernels share.
//
// kmeans_assign: nearest centroid of every point and its squared distance, without an N x k matrix.
// kmeans_assign_bounds, kmeans_label_distances, kmeans_assign_yinyang, kmeans_assign_elkan, kmeans_assign_delta:
// the steps of bounded k-means (CPU only); kmeans_yinyang_pass: one bounded pass on CPU or CUDA.
// kmeans_update: per-cluster sums of the points (of the flagged clusters only, given `clusters`) and per-cluster
// counts (the centroid update is sums/counts).
#include "ops/kmeans.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <utility>

#include "common/checks.h"

namespace pydc {

namespace {
constexpr const char* kAssign = "pydc::kmeans_assign";
constexpr const char* kUpdate = "pydc::kmeans_update";
constexpr const char* kYinyangPass = "pydc::kmeans_yinyang_pass";
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

YinyangPassPlan plan_kmeans_yinyang_pass(const at::Tensor& x, const at::Tensor& centroids, const at::Tensor& ids,
                                         const at::Tensor& offsets, const at::Tensor& x_sq_norms,
                                         const at::Tensor& group_drift, const at::Tensor& labels,
                                         const at::Tensor& group_lower) {
  constexpr const char* op = kYinyangPass;
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"centroids", &centroids}, {"centroid_ids", &ids}, {"group_offsets", &offsets}, {"x_sq_norms", &x_sq_norms},
      {"group_drift", &group_drift}, {"labels", &labels}, {"group_lower", &group_lower}};
  for (const auto& [name, tensor] : others) PYDC_CHECK_SAME_DEVICE(op, "x", x, name, *tensor);
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 2 && offsets.size(0) <= 65, op, ": expected group_offsets "
              "of shape (groups + 1,) with 1 to 64 groups, got ", describe(offsets));
  // x, centroids, centroid_ids, group_offsets (from 0 to k, non-decreasing) and x_sq_norms, as the CPU's
  // bounded ops check them
  const int64_t groups = check_grouped_centroids(op, x, centroids, ids, offsets, x_sq_norms);
  const int64_t n = x.size(0), k = centroids.size(0);
  TORCH_CHECK(k < (int64_t(1) << 31), op, ": expected fewer than 2^31 centroids, got ", k);
  PYDC_CHECK_DTYPE(op, "group_drift", group_drift, at::kDouble);
  PYDC_CHECK_DTYPE(op, "labels", labels, at::kLong);
  PYDC_CHECK_DTYPE(op, "group_lower", group_lower, at::kDouble);
  TORCH_CHECK(group_drift.dim() == 1 && group_drift.size(0) == groups, op, ": expected group_drift of shape (",
              groups, ",), got ", describe(group_drift));
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n && labels.is_contiguous(), op,
              ": expected contiguous labels of shape (", n, ",), got ", describe(labels));
  TORCH_CHECK(group_lower.dim() == 2 && group_lower.size(0) == n && group_lower.size(1) == groups &&
              group_lower.is_contiguous(), op, ": expected contiguous group_lower of shape (", n, ", ", groups,
              "), got ", describe(group_lower));
  YinyangPassPlan plan;
  plan.groups = groups;
  // the index tensors are small (k + G + 1 values): read on the host, also for CUDA tensors
  const at::Tensor ids_host = ids.to(at::kCPU).contiguous(), offsets_host = offsets.to(at::kCPU).contiguous();
  plan.ids.assign(ids_host.const_data_ptr<int64_t>(), ids_host.const_data_ptr<int64_t>() + k);
  plan.offsets.assign(offsets_host.const_data_ptr<int64_t>(), offsets_host.const_data_ptr<int64_t>() + groups + 1);
  plan.group_of.resize(k);
  for (int64_t g = 0; g < groups; ++g) {
    std::fill(plan.group_of.begin() + plan.offsets[g], plan.group_of.begin() + plan.offsets[g + 1], g);
  }
  plan.position_of.assign(k, -1);
  for (int64_t j = 0; j < k; ++j) {
    const int64_t id = plan.ids[j];
    TORCH_CHECK(id >= 0 && id < k && plan.position_of[id] < 0, op, ": expected centroid_ids to be a permutation "
                "of 0 .. k - 1, got centroid_ids[", j, "] = ", id);
    plan.position_of[id] = j;
  }
  plan.x = x.contiguous();
  plan.centroids = centroids.contiguous();
  plan.x_sq_norms = x_sq_norms.contiguous();
  plan.group_drift = group_drift.contiguous();
  plan.labels = labels;
  plan.group_lower = group_lower;
  plan.distances = at::empty({n}, x.options().dtype(at::kDouble));
  plan.upper = at::empty({n}, x.options().dtype(at::kDouble));
  plan.counts = at::zeros({2}, x.options().dtype(at::kLong));
  return plan;
}

YinyangPassArgs yinyang_pass_args(const YinyangPassPlan& plan, const int64_t* ids, const int64_t* position_of,
                                  const int64_t* offsets, const int64_t* group_of, const float* sq_norms,
                                  const double* sq_norms_f64, double max_sq) {
  YinyangPassArgs args;
  args.x = plan.x.const_data_ptr<float>();
  args.x_sq_norms = plan.x_sq_norms.const_data_ptr<float>();
  args.centroids = plan.centroids.const_data_ptr<float>();
  args.sq_norms = sq_norms;
  args.sq_norms_f64 = sq_norms_f64;
  args.ids = ids;
  args.position_of = position_of;
  args.offsets = offsets;
  args.group_of = group_of;
  args.group_drift = plan.group_drift.const_data_ptr<double>();
  args.labels = plan.labels.mutable_data_ptr<int64_t>();
  args.group_lower = plan.group_lower.mutable_data_ptr<double>();
  args.distances = plan.distances.mutable_data_ptr<double>();
  args.upper = plan.upper.mutable_data_ptr<double>();
  args.max_norm = std::sqrt(max_sq);
  args.k = plan.centroids.size(0);
  args.d = plan.x.size(1);
  args.groups = plan.groups;
  return args;
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
  // One bounded (Yinyang) pass for CPU and CUDA (common/kmeans_yinyang_pass.h): refresh = score every centroid
  // (kmeans_assign_bounds' labels and bounds), else filter by the bounds (kmeans_assign_yinyang's labels and
  // bounds; the centroid-separation filter per group only). A label outside [0, k) is no error: that point is scored
  // against every group.
  m.def("kmeans_yinyang_pass(Tensor x, Tensor centroids, Tensor centroid_ids, Tensor group_offsets, "
        "Tensor x_sq_norms, Tensor group_drift, bool refresh, Tensor(a!) labels, Tensor(b!) group_lower) -> "
        "(Tensor distances, Tensor upper, Tensor counts)");
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
