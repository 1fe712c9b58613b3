// CUDA kernels of the ODC memory ops.
//
// Sample update: the batch is sorted by memory index (stable, so a group of equal indices keeps batch order);
// one warp per group blends its rows one after another (lanes split the feature dimension, norms by a fixed
// shuffle tree), keeping every intermediate row; a GEMM (cuBLAS) scores those rows against the centroids; one
// warp per row takes the exact argmax (candidates within the GEMM's error bound settled by fixed-order double
// dots); one warp per group walks its labels and applies the net count and class-sum moves with integer
// atomics, which are exact and so deterministic. No host synchronization.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/odc_math.h"
#include "ops/odc.h"

namespace pydc {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ double warp_sum(double value) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

__device__ __forceinline__ long long warp_sum(long long value) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(kFullMask, value, offset);
  return value;
}

// Larger value wins; equal values -> lower class index (the documented tie rule).
__device__ __forceinline__ void warp_argmax(double& value, long long& index) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const double other_value = __shfl_xor_sync(kFullMask, value, offset);
    const long long other_index = __shfl_xor_sync(kFullMask, index, offset);
    if (other_index >= 0 && (index < 0 || other_value > value || (other_value == value && other_index < index))) {
      value = other_value;
      index = other_index;
    }
  }
}

__device__ __forceinline__ void atomic_add_int64(int64_t* address, int64_t value) {
  atomicAdd(reinterpret_cast<unsigned long long*>(address), static_cast<unsigned long long>(value));
}

__device__ __forceinline__ bool is_group_start(const int64_t* sorted, int64_t p) {
  return p == 0 || sorted[p] != sorted[p - 1];
}

// The batch's indices, sorted, lie in [0, N) iff the first and the last do. Checked on the device by every
// kernel that writes the memory, so that an out-of-range batch changes nothing and costs no host sync; the
// op then returns -1 changes, which callers turn into an error.
__device__ __forceinline__ bool batch_in_range(const int64_t* sorted, int64_t B, int64_t N) {
  return sorted[0] >= 0 && sorted[B - 1] < N;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
blend_groups_kernel(scalar_t* __restrict__ bank, const int64_t* __restrict__ sorted, const int64_t* __restrict__ order,
                    const scalar_t* __restrict__ features, scalar_t* __restrict__ applied,
                    scalar_t* __restrict__ old_rows, int64_t N, int64_t B, int64_t D, double momentum) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (p >= B || !is_group_start(sorted, p) || !batch_in_range(sorted, B, N)) return;  // whole warps leave together
  const int64_t i = sorted[p];
  scalar_t* row = bank + i * D;
  for (int64_t d = lane; d < D; d += kWarp) old_rows[p * D + d] = row[d];
  for (int64_t q = p; q < B && sorted[q] == i; ++q) {
    const int64_t j = order[q];
    const scalar_t* x = features + j * D;
    double partial = 0.0;
    for (int64_t d = lane; d < D; d += kWarp) partial += static_cast<double>(x[d]) * static_cast<double>(x[d]);
    const double feature_denominator = odc_norm_denominator(warp_sum(partial));
    partial = 0.0;
    for (int64_t d = lane; d < D; d += kWarp) {
      const double v = odc_blend(static_cast<double>(row[d]), static_cast<double>(x[d]) / feature_denominator,
                                 momentum);
      partial += v * v;
    }
    const double denominator = odc_norm_denominator(warp_sum(partial));
    for (int64_t d = lane; d < D; d += kWarp) {  // each lane rewrites only the elements it read
      const double v = odc_blend(static_cast<double>(row[d]), static_cast<double>(x[d]) / feature_denominator,
                                 momentum);
      const scalar_t out = static_cast<scalar_t>(v / denominator);
      applied[j * D + d] = out;
      row[d] = out;
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
exact_argmax_kernel(const scalar_t* __restrict__ similarity, const scalar_t* __restrict__ rows,
                    const scalar_t* __restrict__ centroids, const double* __restrict__ max_centroid_norm,
                    int64_t* __restrict__ new_labels, int64_t B, int64_t K, int64_t D, double unit_roundoff,
                    double input_rounding) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (j >= B) return;
  const scalar_t* s = similarity + j * K;
  double best = 0.0;
  long long best_index = -1;
  for (int64_t k = lane; k < K; k += kWarp) {
    const double value = static_cast<double>(s[k]);
    if (best_index < 0 || value > best) {
      best = value;
      best_index = k;
    }
  }
  warp_argmax(best, best_index);
  const double threshold = best - odc_candidate_tolerance(D, unit_roundoff, input_rounding, *max_centroid_norm);
  long long candidates = 0;
  for (int64_t k = lane; k < K; k += kWarp) candidates += static_cast<double>(s[k]) >= threshold;
  if (warp_sum(candidates) > 1) {
    const scalar_t* row = rows + j * D;
    double exact = 0.0;
    long long exact_index = -1;
    for (int64_t k = lane; k < K; k += kWarp) {
      if (static_cast<double>(s[k]) < threshold) continue;
      const double value = odc_dot(row, centroids + k * D, D);
      if (exact_index < 0 || value > exact) {
        exact = value;
        exact_index = k;
      }
    }
    warp_argmax(exact, exact_index);
    best_index = exact_index;
  }
  if (lane == 0) new_labels[j] = best_index;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
relabel_kernel(const scalar_t* __restrict__ bank, int64_t* __restrict__ labels, int64_t* __restrict__ counts,
               int64_t* __restrict__ class_sums, const int64_t* __restrict__ sorted,
               const int64_t* __restrict__ order, const int64_t* __restrict__ new_labels,
               const scalar_t* __restrict__ old_rows, int64_t* __restrict__ changes, int64_t N, int64_t B, int64_t K,
               int64_t D, double scale) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (!batch_in_range(sorted, B, N)) {
    if (p == 0 && lane == 0) *changes = -1;
    return;
  }
  if (p >= B || !is_group_start(sorted, p)) return;
  const int64_t i = sorted[p];
  long long old_label = 0, final_label = 0;
  if (lane == 0) {
    old_label = labels[i];
    CUDA_KERNEL_ASSERT(old_label >= 0 && old_label < K);
    long long current = old_label, steps = 0;
    for (int64_t q = p; q < B && sorted[q] == i; ++q) {
      const long long next = new_labels[order[q]];
      steps += next != current;
      current = next;
    }
    final_label = current;
    labels[i] = current;
    if (steps) atomic_add_int64(changes, steps);
    if (current != old_label) {
      atomic_add_int64(counts + old_label, -1);
      atomic_add_int64(counts + current, 1);
    }
  }
  old_label = __shfl_sync(kFullMask, old_label, 0);
  final_label = __shfl_sync(kFullMask, final_label, 0);
  const scalar_t* after = bank + i * D;
  for (int64_t d = lane; d < D; d += kWarp) {
    const int64_t before = odc_quantize(static_cast<double>(old_rows[p * D + d]), scale);
    const int64_t now = odc_quantize(static_cast<double>(after[d]), scale);
    if (old_label == final_label) {
      atomic_add_int64(class_sums + old_label * D + d, now - before);
    } else {
      atomic_add_int64(class_sums + old_label * D + d, -before);
      atomic_add_int64(class_sums + final_label * D + d, now);
    }
  }
}

unsigned blocks_for_warps(int64_t warps) {
  return static_cast<unsigned>((warps + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

at::Tensor odc_update_samples_cuda(at::Tensor feature_bank, at::Tensor label_bank, at::Tensor counts,
                                   at::Tensor class_sums, const at::Tensor& centroids_in, const at::Tensor& indices,
                                   const at::Tensor& features_in, double momentum) {
  const c10::cuda::CUDAGuard guard(feature_bank.device());
  const at::Tensor features = check_odc_update_samples(feature_bank, label_bank, counts, class_sums, centroids_in,
                                                       indices, features_in, momentum);
  at::Tensor changes = at::zeros({}, label_bank.options());
  const int64_t N = feature_bank.size(0), D = feature_bank.size(1), B = indices.size(0);
  if (B == 0) return changes;
  TORCH_CHECK(B <= int64_t(INT32_MAX) * kWarpsPerBlock / 2, "pydc::odc_update_samples: batch of ", B,
              " rows is too large for one launch");
  const at::Tensor centroids = centroids_in.contiguous();
  const int64_t K = centroids.size(0);
  auto sorted_pair = at::sort(indices, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor sorted = std::get<0>(sorted_pair).contiguous();
  const at::Tensor order = std::get<1>(sorted_pair).contiguous();
  at::Tensor applied = at::empty({B, D}, feature_bank.options());
  at::Tensor old_rows = at::empty({B, D}, feature_bank.options());
  at::Tensor new_labels = at::empty({B}, label_bank.options());
  const at::Tensor max_norm = at::linalg_vector_norm(centroids, 2, at::IntArrayRef{1}, false, at::kDouble).max();
  const double scale = std::ldexp(1.0, odc_fixed_bits(N));
  const double unit_roundoff = odc_unit_roundoff(feature_bank);
  const double input_rounding = odc_gemm_input_rounding(centroids);
  const unsigned blocks = blocks_for_warps(B);
  auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(feature_bank.scalar_type(), "odc_update_samples_cuda", [&] {
    blend_groups_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        feature_bank.mutable_data_ptr<scalar_t>(), sorted.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(),
        features.const_data_ptr<scalar_t>(), applied.mutable_data_ptr<scalar_t>(),
        old_rows.mutable_data_ptr<scalar_t>(), N, B, D, momentum);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor similarity = at::mm(applied, centroids.t()).contiguous();
    exact_argmax_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        similarity.const_data_ptr<scalar_t>(), applied.const_data_ptr<scalar_t>(),
        centroids.const_data_ptr<scalar_t>(), max_norm.const_data_ptr<double>(),
        new_labels.mutable_data_ptr<int64_t>(), B, K, D, unit_roundoff, input_rounding);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    relabel_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        feature_bank.const_data_ptr<scalar_t>(), label_bank.mutable_data_ptr<int64_t>(),
        counts.mutable_data_ptr<int64_t>(), class_sums.mutable_data_ptr<int64_t>(), sorted.const_data_ptr<int64_t>(),
        order.const_data_ptr<int64_t>(), new_labels.const_data_ptr<int64_t>(), old_rows.const_data_ptr<scalar_t>(),
        changes.mutable_data_ptr<int64_t>(), N, B, K, D, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return changes;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
class_sums_kernel(const scalar_t* __restrict__ bank, const int64_t* __restrict__ labels,
                  int64_t* __restrict__ class_sums, int64_t* __restrict__ counts, int64_t N, int64_t K, int64_t D,
                  double scale) {
  const int64_t total = N * D;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = e / D, d = e - n * D;
    const int64_t label = labels[n];
    CUDA_KERNEL_ASSERT(label >= 0 && label < K);
    atomic_add_int64(class_sums + label * D + d, odc_quantize(static_cast<double>(bank[e]), scale));
    if (d == 0) atomic_add_int64(counts + label, 1);
  }
}

void odc_class_sums_cuda(const at::Tensor& feature_bank, const at::Tensor& label_bank, at::Tensor class_sums,
                         at::Tensor counts) {
  const c10::cuda::CUDAGuard guard(feature_bank.device());
  check_odc_class_sums(feature_bank, label_bank, class_sums, counts);
  class_sums.zero_();
  counts.zero_();
  const int64_t N = feature_bank.size(0), D = feature_bank.size(1), K = counts.size(0);
  if (N * D == 0) return;
  const double scale = std::ldexp(1.0, odc_fixed_bits(N));
  const int64_t wanted = (N * D + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(wanted, 65535 * 8));
  AT_DISPATCH_FLOATING_TYPES(feature_bank.scalar_type(), "odc_class_sums_cuda", [&] {
    class_sums_kernel<scalar_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        feature_bank.const_data_ptr<scalar_t>(), label_bank.const_data_ptr<int64_t>(),
        class_sums.mutable_data_ptr<int64_t>(), counts.mutable_data_ptr<int64_t>(), N, K, D, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
centroids_kernel(const int64_t* __restrict__ class_sums, const int64_t* __restrict__ counts,
                 scalar_t* __restrict__ centroids, int64_t K, int64_t D, double inv_scale) {
  const int64_t total = K * D;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t count = counts[e / D];
    if (count > 0) centroids[e] = static_cast<scalar_t>(odc_mean_from_sum(class_sums[e], count, inv_scale));
  }
}

void odc_centroids_from_sums_cuda(const at::Tensor& class_sums, const at::Tensor& counts, at::Tensor centroids,
                                  int64_t bank_length) {
  const c10::cuda::CUDAGuard guard(centroids.device());
  check_odc_centroids_from_sums(class_sums, counts, centroids, bank_length);
  const int64_t K = centroids.size(0), D = centroids.size(1);
  if (K * D == 0) return;
  const double inv_scale = std::ldexp(1.0, -odc_fixed_bits(bank_length));
  const int64_t wanted = (K * D + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(wanted, 65535 * 8));
  AT_DISPATCH_FLOATING_TYPES(centroids.scalar_type(), "odc_centroids_from_sums_cuda", [&] {
    centroids_kernel<scalar_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        class_sums.const_data_ptr<int64_t>(), counts.const_data_ptr<int64_t>(), centroids.mutable_data_ptr<scalar_t>(),
        K, D, inv_scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace pydc

TORCH_LIBRARY_IMPL(pydc, CUDA, m) {
  m.impl("odc_update_samples", &pydc::odc_update_samples_cuda);
  m.impl("odc_class_sums", &pydc::odc_class_sums_cuda);
  m.impl("odc_centroids_from_sums", &pydc::odc_centroids_from_sums_cuda);
}
