// Argument checking and output allocation of the k-means ops, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>
#include <vector>

#include "common/kmeans_yinyang_pass.h"

namespace pydc {

struct KMeansAssignPlan {
  at::Tensor x;             // (N, d) float32, contiguous
  at::Tensor centroids;     // (k, d) float32, contiguous
  at::Tensor x_sq_norms;    // (N,) float32 contiguous, or undefined: the kernel computes them
  at::Tensor labels;        // (N,) int64, output
  at::Tensor distances;     // (N,) float32, output: squared distance to the chosen centroid
};

struct KMeansUpdatePlan {
  at::Tensor x;             // (N, d) float32, contiguous
  at::Tensor labels;        // (N,) int64, contiguous
  at::Tensor sums;          // (k, d) float32, output, zero-filled
  at::Tensor counts;        // (k,) int64, output, zero-filled
  at::Tensor clusters;      // (k,) bool, contiguous: the clusters whose sums to compute; undefined: all
  int64_t k;
};

// Checks the arguments shared by the bounded-assignment ops (x (N, d) and centroids (k, d) float32, centroid
// ids (k,) int64, group offsets (G + 1,) int64 from 0 to k, non-decreasing, x_sq_norms (N,) float32) and
// returns the number of groups G. Reads group_offsets on the host (a copy for CUDA tensors).
int64_t check_grouped_centroids(const char* op, const at::Tensor& x, const at::Tensor& centroids,
                                const at::Tensor& ids, const at::Tensor& offsets, const at::Tensor& x_sq_norms);

// kmeans_yinyang_pass's checked arguments (ops/kmeans.cpp), with host copies of the small index tensors.
struct YinyangPassPlan {
  at::Tensor x, centroids, x_sq_norms, group_drift;  // contiguous
  at::Tensor labels, group_lower;                    // the caller's (a!) and (b!) tensors, contiguous
  at::Tensor distances, upper, counts;               // outputs: (N,) float64, (N,) float64, (2,) int64
  std::vector<int64_t> ids, offsets, position_of, group_of;  // host: (k,), (G + 1,), (k,), (k,)
  int64_t groups = 0;
};

// The pass's arguments (common/kmeans_yinyang_pass.h) from a plan, with the index arrays, the centroids' squared
// norms and the largest float64 squared norm on the kernel's device (the CPU's: the plan's host vectors).
YinyangPassArgs yinyang_pass_args(const YinyangPassPlan& plan, const int64_t* ids, const int64_t* position_of,
                                  const int64_t* offsets, const int64_t* group_of, const float* sq_norms,
                                  const double* sq_norms_f64, double max_sq);

YinyangPassPlan plan_kmeans_yinyang_pass(const at::Tensor& x, const at::Tensor& centroids, const at::Tensor& ids,
                                         const at::Tensor& offsets, const at::Tensor& x_sq_norms,
                                         const at::Tensor& group_drift, const at::Tensor& labels,
                                         const at::Tensor& group_lower);

// Validates x/centroids/x_sq_norms (TORCH_CHECK with expected vs got) and allocates labels and distances.
KMeansAssignPlan plan_kmeans_assign(const at::Tensor& x, const at::Tensor& centroids,
                                    const std::optional<at::Tensor>& x_sq_norms);

// Validates x/labels/k/clusters and allocates zeroed sums and counts. Label values are checked by the kernels.
KMeansUpdatePlan plan_kmeans_update(const at::Tensor& x, const at::Tensor& labels, int64_t k,
                                    const std::optional<at::Tensor>& clusters);

}  // namespace pydc
