// CPU kernels of the k-means ops.
//
// kmeans_assign works as faiss's exhaustive L2 search does: points are taken in blocks, each block is
// multiplied by a block of centroids with BLAS (at::mm into a bounded buffer) and the
// arg-min of ||c||^2 - 2 x.c over that buffer is folded into a running best, so the N x k distance matrix
// never exists. The BLAS call uses its own threads; the arg-min runs over rows with at::parallel_for.
// (Calling BLAS from inside at::parallel_for instead nests OpenMP regions, whose spinning workers cost
// several times the useful CPU time on a loaded machine.) The arg-min scans 16 lanes at a time with GCC
// vector types, compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (target_clones).
//
// kmeans_update sorts points by label with a counting sort and sums every cluster's rows in increasing
// point order in float64: the result does not depend on the number of threads (always deterministic).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/kmeans_math.h"
#include "ops/kmeans.h"

namespace pydc {
namespace {

// Rows of x and centroids per BLAS call: the buffer is at most 8192 x 1024 floats (32 MiB). Fewer, larger
// calls matter on a busy machine: every switch between the BLAS threads and the arg-min threads is a
// barrier where OpenMP workers spin (measured on a loaded 2-core machine: 1024-row blocks cost twice the
// CPU time of 8192-row blocks).
constexpr int64_t kPointBlock = 8192;
constexpr int64_t kCentroidBlock = 1024;
constexpr int kLanes = 16;

typedef float float_lanes __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t int_lanes __attribute__((vector_size(kLanes * sizeof(int32_t))));

// Best (score, index) of one row of dot products against centroids j0 .. j0 + n - 1, folded into
// (*best_score, *best_index). Same scores, same tie rule as kmeans_score / kmeans_prefer: within a lane
// the strict `<` keeps the first (lowest) index, and the lanes are merged with kmeans_prefer.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void fold_row_argmin(const float* dot, const float* centroid_sq_norms, int64_t n, int64_t j0,
                     float* best_score, int64_t* best_index) {
  int64_t j = 0;
  if (n >= kLanes) {
    float_lanes lane_best;
    int_lanes lane_index, index;
    for (int l = 0; l < kLanes; ++l) {
      lane_best[l] = kKMeansInf;
      lane_index[l] = 0;
      index[l] = l;
    }
    const float_lanes two = {2.f, 2.f, 2.f, 2.f, 2.f, 2.f, 2.f, 2.f, 2.f, 2.f, 2.f, 2.f, 2.f, 2.f, 2.f, 2.f};
    for (; j + kLanes <= n; j += kLanes) {
      float_lanes d, c;
      std::memcpy(&d, dot + j, sizeof(d));
      std::memcpy(&c, centroid_sq_norms + j, sizeof(c));
      const float_lanes score = c - two * d;
      const int_lanes better = score < lane_best;
      lane_best = better ? score : lane_best;
      lane_index = better ? index : lane_index;
      index += kLanes;
    }
    for (int l = 0; l < kLanes; ++l) {
      const int64_t candidate = j0 + lane_index[l];
      if (kmeans_prefer(lane_best[l], candidate, *best_score, *best_index)) {
        *best_score = lane_best[l];
        *best_index = candidate;
      }
    }
  }
  for (; j < n; ++j) {
    const float score = kmeans_score(centroid_sq_norms[j], dot[j]);
    if (kmeans_prefer(score, j0 + j, *best_score, *best_index)) {
      *best_score = score;
      *best_index = j0 + j;
    }
  }
}

at::Tensor squared_norms(const at::Tensor& rows) {
  const int64_t n = rows.size(0), d = rows.size(1);
  at::Tensor norms = at::empty({n}, rows.options());
  const float* data = rows.const_data_ptr<float>();
  float* out = norms.mutable_data_ptr<float>();
  at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = kmeans_squared_norm(data + i * d, d);
  });
  return norms;
}

std::tuple<at::Tensor, at::Tensor> kmeans_assign_cpu(const at::Tensor& x, const at::Tensor& centroids,
                                                     const std::optional<at::Tensor>& x_sq_norms,
                                                     bool /*allow_tf32: the CPU always computes in fp32*/) {
  KMeansAssignPlan plan = plan_kmeans_assign(x, centroids, x_sq_norms);
  const int64_t n = plan.x.size(0), k = plan.centroids.size(0);
  if (n == 0) return {plan.labels, plan.distances};
  const at::Tensor point_norms = plan.x_sq_norms.defined() ? plan.x_sq_norms : squared_norms(plan.x);
  const at::Tensor centroid_norms = squared_norms(plan.centroids);
  const float* pn = point_norms.const_data_ptr<float>();
  const float* cn = centroid_norms.const_data_ptr<float>();
  int64_t* labels = plan.labels.mutable_data_ptr<int64_t>();
  float* distances = plan.distances.mutable_data_ptr<float>();
  const int64_t buffer_cols = std::min(k, kCentroidBlock);
  at::Tensor buffer = at::empty({std::min(n, kPointBlock), buffer_cols}, plan.x.options());
  std::vector<float> best_score(kPointBlock);

  for (int64_t i0 = 0; i0 < n; i0 += kPointBlock) {
    const int64_t rows = std::min(kPointBlock, n - i0);
    const at::Tensor points = plan.x.narrow(0, i0, rows);
    std::fill(best_score.begin(), best_score.end(), kKMeansInf);
    std::fill(labels + i0, labels + i0 + rows, int64_t(0));
    for (int64_t j0 = 0; j0 < k; j0 += kCentroidBlock) {
      const int64_t cols = std::min(kCentroidBlock, k - j0);
      at::Tensor dots = buffer.narrow(0, 0, rows).narrow(1, 0, cols);
      at::mm_out(dots, points, plan.centroids.narrow(0, j0, cols).t());  // BLAS, multithreaded
      const float* dot_rows = dots.const_data_ptr<float>();
      const int64_t stride = dots.stride(0);
      at::parallel_for(0, rows, 16, [&](int64_t r_begin, int64_t r_end) {
        for (int64_t r = r_begin; r < r_end; ++r) {
          fold_row_argmin(dot_rows + r * stride, cn + j0, cols, j0, &best_score[r], &labels[i0 + r]);
        }
      });
    }
    for (int64_t r = 0; r < rows; ++r) distances[i0 + r] = kmeans_distance(pn[i0 + r], best_score[r]);
  }
  return {plan.labels, plan.distances};
}

std::tuple<at::Tensor, at::Tensor> kmeans_update_cpu(const at::Tensor& x, const at::Tensor& labels_in,
                                                     int64_t k, bool /*deterministic: always on the CPU*/) {
  KMeansUpdatePlan plan = plan_kmeans_update(x, labels_in, k);
  const int64_t n = plan.x.size(0), d = plan.x.size(1);
  const int64_t* labels = plan.labels.const_data_ptr<int64_t>();
  int64_t* counts = plan.counts.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t label = labels[i];
    TORCH_CHECK(label >= 0 && label < k, "pydc::kmeans_update: expected labels in [0, k) = [0, ", k,
                "), got labels[", i, "] = ", label);
    ++counts[label];
  }
  // Counting sort: members of cluster c are order[offsets[c] .. offsets[c + 1]), in increasing point index.
  std::vector<int64_t> offsets(k + 1, 0);
  for (int64_t c = 0; c < k; ++c) offsets[c + 1] = offsets[c] + counts[c];
  std::vector<int64_t> order(n);
  {
    std::vector<int64_t> cursor(offsets.begin(), offsets.end() - 1);
    for (int64_t i = 0; i < n; ++i) order[cursor[labels[i]]++] = i;
  }
  const float* points = plan.x.const_data_ptr<float>();
  float* sums = plan.sums.mutable_data_ptr<float>();
  at::parallel_for(0, k, 16, [&](int64_t c_begin, int64_t c_end) {
    std::vector<double> accumulator(d);
    for (int64_t c = c_begin; c < c_end; ++c) {
      if (offsets[c] == offsets[c + 1]) continue;
      std::fill(accumulator.begin(), accumulator.end(), 0.0);
      for (int64_t m = offsets[c]; m < offsets[c + 1]; ++m) {
        const float* row = points + order[m] * d;
        for (int64_t t = 0; t < d; ++t) accumulator[t] += static_cast<double>(row[t]);
      }
      for (int64_t t = 0; t < d; ++t) sums[c * d + t] = static_cast<float>(accumulator[t]);
    }
  });
  return {plan.sums, plan.counts};
}

}  // namespace
}  // namespace pydc

TORCH_LIBRARY_IMPL(pydc, CPU, m) {
  m.impl("kmeans_assign", &pydc::kmeans_assign_cpu);
  m.impl("kmeans_update", &pydc::kmeans_update_cpu);
}
