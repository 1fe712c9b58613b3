// CPU kernels of the k-means ops.
//
// kmeans_assign never forms the N x k distance matrix. It works as faiss's exhaustive L2 search does: points
// are taken in blocks, each block is multiplied by a block of centroids with BLAS (torch's or scipy's, as
// blas_gemm.h selected) and the scores ||c||^2 - 2 x.c are folded into a running best and second best. Each
// thread of at::parallel_for takes its own blocks of kPerThreadGemmRows points and runs their GEMMs on itself
// (cpu_gemm_abt_per_thread), so a block's 1 MiB of scores is folded while still in that core's cache: no
// barrier between BLAS threads and fold threads, no round trip of a shared buffer through memory. The fold is
// one of the per-ISA loops (cpu_kernels.h). A row whose best and second best are too close for float32 to
// order them is settled in float64 (kmeans_cpu.h): the labels are the exact arg-min whatever the BLAS.
//
// kmeans_update sorts points by label with a counting sort and sums every cluster's rows in increasing
// point order in float64: the result does not depend on the number of threads (always deterministic).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/kmeans_math.h"
#include "ops/cpu/blas_gemm.h"
#include "ops/cpu/cpu_kernels.h"
#include "ops/cpu/kmeans_cpu.h"
#include "ops/kmeans.h"

namespace pydc {

namespace {

// Centroids per BLAS call: a thread's buffer is at most kPerThreadGemmRows x 1024 floats (1 MiB).
constexpr int64_t kCentroidBlock = 1024;

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

}  // namespace

KMeansCentroidInfo kmeans_centroid_info(const at::Tensor& centroids) {
  KMeansCentroidInfo info;
  const int64_t k = centroids.size(0), d = centroids.size(1);
  info.sq_norms = squared_norms(centroids);
  info.sq_norms_f64.resize(k);
  const float* c = centroids.const_data_ptr<float>();
  const CpuKernels& kernels = cpu_kernels();
  double max_sq = 0.0;
  for (int64_t j = 0; j < k; ++j) {
    info.sq_norms_f64[j] = kernels.dot_f64(c + j * d, c + j * d, d);
    if (info.sq_norms_f64[j] > max_sq) max_sq = info.sq_norms_f64[j];  // NaN norms are skipped
  }
  info.max_norm = std::sqrt(max_sq);
  return info;
}

int64_t kmeans_settle_row(const float* x, const float* centroids, const double* sq_norms_f64, const int64_t* ids,
                          int64_t k, int64_t d, double* score) {
  // every centroid a candidate: an infinite margin around a float32 best of 0
  return kmeans_settle_near_best(x, centroids, sq_norms_f64, ids, d, 0.0f, HUGE_VAL, score, [&](auto fn) {
    for (int64_t j = 0; j < k; ++j) fn(j, 0.0f);
  });
}

namespace {

std::tuple<at::Tensor, at::Tensor> kmeans_assign_cpu(const at::Tensor& x, const at::Tensor& centroids,
                                                     const std::optional<at::Tensor>& x_sq_norms,
                                                     bool /*allow_tf32: the CPU always computes in fp32*/) {
  KMeansAssignPlan plan = plan_kmeans_assign(x, centroids, x_sq_norms);
  const int64_t n = plan.x.size(0), k = plan.centroids.size(0), d = plan.x.size(1);
  if (n == 0) return {plan.labels, plan.distances};
  const at::Tensor point_norms = plan.x_sq_norms.defined() ? plan.x_sq_norms : squared_norms(plan.x);
  const KMeansCentroidInfo info = kmeans_centroid_info(plan.centroids);
  const float* pn = point_norms.const_data_ptr<float>();
  const float* cn = info.sq_norms.const_data_ptr<float>();
  const float* xs = plan.x.const_data_ptr<float>();
  const float* cs = plan.centroids.const_data_ptr<float>();
  int64_t* labels = plan.labels.mutable_data_ptr<int64_t>();
  float* distances = plan.distances.mutable_data_ptr<float>();
  const CpuKernels& kernels = cpu_kernels();

  const int64_t buffer_cols = std::min(k, kCentroidBlock);
  const int64_t block = kmeans_thread_block_rows(n);
  PerThreadCpuGemm one_thread_each;
  const CpuGemmRhs rhs(plan.centroids, cpu_gemm(), kCentroidBlock);
  at::parallel_for(0, (n + block - 1) / block, 1, [&](int64_t b_begin, int64_t b_end) {
    at::Tensor buffer = at::empty({block, buffer_cols}, plan.x.options());
    std::vector<float> best_score(block), second_score(block);
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t i0 = b * block, rows = std::min(block, n - i0);
      const at::Tensor points = plan.x.narrow(0, i0, rows);
      std::fill(best_score.begin(), best_score.end(), kKMeansInf);
      std::fill(second_score.begin(), second_score.end(), kKMeansInf);
      std::fill(labels + i0, labels + i0 + rows, int64_t(0));
      const float* dot_rows = buffer.const_data_ptr<float>();
      const int64_t stride = buffer.stride(0);
      for (int64_t j0 = 0; j0 < k; j0 += kCentroidBlock) {
        const int64_t cols = std::min(kCentroidBlock, k - j0);
        at::Tensor dots = buffer.narrow(0, 0, rows).narrow(1, 0, cols);
        rhs.multiply(dots, points, j0);
        for (int64_t r = 0; r < rows; ++r) {
          kernels.fold_row_top2(dot_rows + r * stride, cn + j0, cols, j0, &best_score[r], &labels[i0 + r],
                                &second_score[r]);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        float score = best_score[r];
        if (kmeans_needs_settle(best_score[r], second_score[r], pn[i], info.max_norm, d)) {
          double exact;
          // one block of centroids: the row's dot products are still in the buffer
          labels[i] = k <= kCentroidBlock
                          ? kmeans_settle_full_row(xs + i * d, cs, info, nullptr, dot_rows + r * stride, cn, k, d,
                                                   best_score[r], pn[i], &exact)
                          : kmeans_settle_row(xs + i * d, cs, info.sq_norms_f64.data(), nullptr, k, d, &exact);
          score = static_cast<float>(exact);
        }
        distances[i] = kmeans_distance(pn[i], score);
      }
    }
  });
  return {plan.labels, plan.distances};
}

constexpr int64_t kPrefetchRows = 4;

inline void prefetch_row(const float* row, int64_t d) {
  for (int64_t t = 0; t < d; t += 16) __builtin_prefetch(row + t, 0, 3);  // a 64-byte line per 16 floats
}

std::tuple<at::Tensor, at::Tensor> kmeans_update_cpu(const at::Tensor& x, const at::Tensor& labels_in,
                                                     int64_t k, bool /*deterministic: always on the CPU*/,
                                                     const std::optional<at::Tensor>& clusters) {
  KMeansUpdatePlan plan = plan_kmeans_update(x, labels_in, k, clusters);
  const bool* wanted = plan.clusters.defined() ? plan.clusters.const_data_ptr<bool>() : nullptr;
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
  const CpuKernels& kernels = cpu_kernels();
  at::parallel_for(0, k, 16, [&](int64_t c_begin, int64_t c_end) {
    std::vector<double> accumulator(d);
    for (int64_t c = c_begin; c < c_end; ++c) {
      if (offsets[c] == offsets[c + 1] || (wanted != nullptr && !wanted[c])) continue;
      std::fill(accumulator.begin(), accumulator.end(), 0.0);
      for (int64_t m = offsets[c]; m < offsets[c + 1]; ++m) {
        // the members' rows lie anywhere in x: fetch the row kPrefetchRows members ahead while summing this
        // one (the hardware prefetcher only follows runs within a row)
        if (m + kPrefetchRows < n) prefetch_row(points + order[m + kPrefetchRows] * d, d);
        kernels.accumulate_row(accumulator.data(), points + order[m] * d, d);
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
