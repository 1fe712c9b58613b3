// Argument checking and output allocation of the k-means ops, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <cstdint>

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

// Validates x/centroids/x_sq_norms (TORCH_CHECK with expected vs got) and allocates labels and distances.
KMeansAssignPlan plan_kmeans_assign(const at::Tensor& x, const at::Tensor& centroids,
                                    const std::optional<at::Tensor>& x_sq_norms);

// Validates x/labels/k/clusters and allocates zeroed sums and counts. Label values are checked by the kernels.
KMeansUpdatePlan plan_kmeans_update(const at::Tensor& x, const at::Tensor& labels, int64_t k,
                                    const std::optional<at::Tensor>& clusters);

}  // namespace pydc
