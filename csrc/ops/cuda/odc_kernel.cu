// CUDA kernels of the ODC memory ops.
//
// Sample update: the batch is sorted by memory index (stable, so a group of equal indices keeps batch order);
// a validation pass sets status bits when an index or an indexed row's label is out of range, and every later
// kernel reads them, so that a refused batch changes nothing, costs no host sync and leaves no sticky device
// assert (the op returns -(bits), which pydc.ops.odc turns into an error). One warp per group blends its rows
// one after another (lanes split the feature dimension, norms by a fixed shuffle tree), keeping every
// intermediate row; a GEMM (cuBLAS; TF32 tensor cores for float32, since the exact re-check below settles
// every label whatever the GEMM's precision) scores those rows against the centroids; one block per row takes
// the exact argmax (NaN never wins; candidates within the GEMM's error bound settled by fixed-order double
// dots); one warp per group walks its labels and applies the net count and class-sum moves with integer
// atomics, which are exact and so deterministic. The largest centroid norm (part of the error bound) is kept
// per centroids tensor and recomputed only when that tensor's version counter moves.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <optional>

#include "common/odc_math.h"
#include "ops/odc.h"

namespace pydc {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr unsigned kFullMask = 0xffffffffu;
// cuBLAS's FAST_TF32 conversion keeps 10 mantissa bits; 2^-10 bounds it whether it rounds or truncates.
constexpr double kTf32InputRounding = 1.0 / 1024.0;

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

// Every lane ends with the warp's best (value, index) under odc_argmax_prefer (index < 0: none).
__device__ __forceinline__ void warp_argmax(double& value, long long& index) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const double other_value = __shfl_xor_sync(kFullMask, value, offset);
    const long long other_index = __shfl_xor_sync(kFullMask, index, offset);
    if (other_index >= 0 && odc_argmax_prefer(other_value, other_index, value, index)) {
      value = other_value;
      index = other_index;
    }
  }
}

// Block-wide versions for blockDim.x == kThreads: every thread returns with the block's result. The shared
// arrays are reused by the next call, hence the closing barrier.
__device__ void block_argmax(double& value, long long& index, double* shared_value, long long* shared_index) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  warp_argmax(value, index);
  if (lane == 0) {
    shared_value[warp] = value;
    shared_index[warp] = index;
  }
  __syncthreads();
  value = lane < kWarpsPerBlock ? shared_value[lane] : 0.0;
  index = lane < kWarpsPerBlock ? shared_index[lane] : -1;
  warp_argmax(value, index);  // every warp reduces the same eight values: no second barrier round
  __syncthreads();
}

__device__ long long block_sum(long long value, long long* shared) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  value = warp_sum(value);
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  value = warp_sum(lane < kWarpsPerBlock ? shared[lane] : 0LL);
  __syncthreads();
  return value;
}

__device__ __forceinline__ void atomic_add_int64(int64_t* address, int64_t value) {
  atomicAdd(reinterpret_cast<unsigned long long*>(address), static_cast<unsigned long long>(value));
}

__device__ __forceinline__ bool is_group_start(const int64_t* sorted, int64_t p) {
  return p == 0 || sorted[p] != sorted[p - 1];
}

// Pass 0: status bits of the batch (kOdcIndexOutOfRange, kOdcLabelOutOfRange) into *status, read by every
// later kernel of the step (same stream, so they see it).
__global__ void __launch_bounds__(kThreads)
validate_batch_kernel(const int64_t* __restrict__ sorted, const int64_t* __restrict__ labels, int64_t N, int64_t B,
                      int64_t K, unsigned long long* __restrict__ status) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= B) return;
  const unsigned long long bits = odc_position_status(sorted[p], N, labels, K);
  if (bits) atomicOr(status, bits);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
blend_groups_kernel(scalar_t* __restrict__ bank, const int64_t* __restrict__ sorted, const int64_t* __restrict__ order,
                    const scalar_t* __restrict__ features, scalar_t* __restrict__ applied,
                    scalar_t* __restrict__ old_rows, const unsigned long long* __restrict__ status, int64_t B,
                    int64_t D, double momentum) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (p >= B) return;
  if (*status) {  // refused: the bank stays as it is; zero rows keep the GEMM off uninitialised memory
    for (int64_t d = lane; d < D; d += kWarp) applied[p * D + d] = scalar_t(0);
    return;
  }
  if (!is_group_start(sorted, p)) return;  // whole warps leave together
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

// One block per row (grid-stride): 256 threads scan the K GEMM values, so B = 512 rows fill 512 blocks (every
// SM of an H100 busy) instead of 64, and the candidates' double dots are spread over 256 threads.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
exact_argmax_kernel(const scalar_t* __restrict__ similarity, const scalar_t* __restrict__ rows,
                    const scalar_t* __restrict__ centroids, const double* __restrict__ max_centroid_norm,
                    const unsigned long long* __restrict__ status, int64_t* __restrict__ new_labels, int64_t B,
                    int64_t K, int64_t D, double unit_roundoff, double input_rounding) {
  __shared__ double shared_value[kWarpsPerBlock];
  __shared__ long long shared_index[kWarpsPerBlock];
  if (*status) return;  // uniform: no thread reaches a barrier
  const double tolerance = odc_candidate_tolerance(D, unit_roundoff, input_rounding, *max_centroid_norm);
  for (int64_t j = blockIdx.x; j < B; j += gridDim.x) {  // uniform per block: the barriers are safe
    const scalar_t* s = similarity + j * K;
    double best = 0.0;
    long long best_index = -1;
    for (int64_t k = threadIdx.x; k < K; k += kThreads) {
      const double value = static_cast<double>(s[k]);
      if (odc_argmax_prefer(value, k, best, best_index)) {
        best = value;
        best_index = k;
      }
    }
    block_argmax(best, best_index, shared_value, shared_index);
    if (best_index >= 0) {  // else every value is NaN: class 0, as on the CPU
      const double threshold = best - tolerance;
      long long candidates = 0;
      for (int64_t k = threadIdx.x; k < K; k += kThreads) candidates += static_cast<double>(s[k]) >= threshold;
      if (block_sum(candidates, shared_index) > 1) {
        const scalar_t* row = rows + j * D;
        double exact = 0.0;
        long long exact_index = -1;
        for (int64_t k = threadIdx.x; k < K; k += kThreads) {
          if (!(static_cast<double>(s[k]) >= threshold)) continue;
          const double value = odc_dot(row, centroids + k * D, D);
          if (odc_argmax_prefer(value, k, exact, exact_index)) {
            exact = value;
            exact_index = k;
          }
        }
        block_argmax(exact, exact_index, shared_value, shared_index);
        if (exact_index >= 0) best_index = exact_index;
      }
    }
    if (threadIdx.x == 0) new_labels[j] = best_index >= 0 ? best_index : 0;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
relabel_kernel(const scalar_t* __restrict__ bank, int64_t* __restrict__ labels, int64_t* __restrict__ counts,
               int64_t* __restrict__ class_sums, const int64_t* __restrict__ sorted,
               const int64_t* __restrict__ order, const int64_t* __restrict__ new_labels,
               const scalar_t* __restrict__ old_rows, const unsigned long long* __restrict__ status,
               int64_t* __restrict__ changes, int64_t B, int64_t D, double scale) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  const unsigned long long refused = *status;
  if (refused) {
    if (p == 0 && lane == 0) *changes = -static_cast<int64_t>(refused);
    return;
  }
  if (p >= B || !is_group_start(sorted, p)) return;
  const int64_t i = sorted[p];
  long long old_label = 0, final_label = 0;
  if (lane == 0) {
    old_label = labels[i];  // in [0, K): validate_batch_kernel checked it
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

// similarity (B x K, row-major) = rows (B x D) . centroids (K x D)^T. float32 on TF32 tensor cores whatever
// torch's global flags say (the compute type is explicit); float64 through at::mm (no reduced precision).
void similarity_gemm(const at::Tensor& rows, const at::Tensor& centroids, at::Tensor& similarity) {
  if (rows.scalar_type() != at::kFloat) {
    at::mm_out(similarity, rows, centroids.t());
    return;
  }
  const int64_t B = rows.size(0), K = centroids.size(0), D = rows.size(1);
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // bound to the current stream
  const float alpha = 1.0f, beta = 0.0f;
  // cuBLAS is column-major: the row-major B x K result is the column-major K x B matrix centroids . rows^T.
  TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(K), static_cast<int>(B),
                                    static_cast<int>(D), &alpha, centroids.const_data_ptr<float>(), CUDA_R_32F,
                                    static_cast<int>(D), rows.const_data_ptr<float>(), CUDA_R_32F, static_cast<int>(D),
                                    &beta, similarity.mutable_data_ptr<float>(), CUDA_R_32F, static_cast<int>(K),
                                    CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT));
}

// The largest centroid norm (float64, on the device), recomputed only when `centroids` is another tensor or
// its version counter moved (every in-place write through torch bumps it; odc_centroids_from_sums_cuda bumps
// it itself, since a custom op's write does not: tests/test_cuda_review*.py check both). The weak reference keeps the TensorImpl's address from
// being reused by another tensor while it is cached, so identity is exact. Inference tensors have no version
// counter: recomputed on every call.
class CentroidNormCache {
 public:
  at::Tensor get(const at::Tensor& centroids) {
    if (centroids.is_inference()) return compute(centroids);
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t version = static_cast<int64_t>(centroids._version());
    const bool same_tensor = impl_.has_value() && impl_->lock().get() == centroids.unsafeGetTensorImpl();
    if (!(same_tensor && version_ == version && data_ == centroids.const_data_ptr())) {
      value_ = compute(centroids);
      impl_.emplace(centroids.getIntrusivePtr());
      version_ = version;
      data_ = centroids.const_data_ptr();
    }
    return value_;
  }

 private:
  // NaN centroids are left out: their GEMM values are NaN, which never become candidates.
  static at::Tensor compute(const at::Tensor& centroids) {
    const at::Tensor norms = at::linalg_vector_norm(centroids, 2, at::IntArrayRef{1}, false, at::kDouble);
    return at::nan_to_num(norms, 0.0).max();
  }

  std::mutex mutex_;
  std::optional<c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>> impl_;
  int64_t version_ = -1;
  const void* data_ = nullptr;
  at::Tensor value_;
};

at::Tensor odc_update_samples_cuda(at::Tensor feature_bank, at::Tensor label_bank, at::Tensor counts,
                                   at::Tensor class_sums, const at::Tensor& centroids_in, const at::Tensor& indices,
                                   const at::Tensor& features_in, double momentum) {
  const c10::cuda::CUDAGuard guard(feature_bank.device());
  const at::Tensor features = check_odc_update_samples(feature_bank, label_bank, counts, class_sums, centroids_in,
                                                       indices, features_in, momentum);
  // counters[0]: the changes (returned), counters[1]: the batch's status bits.
  at::Tensor counters = at::zeros({2}, label_bank.options());
  at::Tensor changes = counters.select(0, 0);
  const int64_t N = feature_bank.size(0), D = feature_bank.size(1), B = indices.size(0);
  if (B == 0) return changes;
  const at::Tensor centroids = centroids_in.contiguous();
  const int64_t K = centroids.size(0);
  TORCH_CHECK(B <= int64_t(INT32_MAX) / 2 && K <= INT32_MAX && D <= INT32_MAX, "pydc::odc_update_samples: ",
              "a batch of ", B, " rows against ", K, " centroids of ", D, " values is too large for one launch");
  static CentroidNormCache norm_cache;
  const at::Tensor max_norm = norm_cache.get(centroids);
  auto sorted_pair = at::sort(indices, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor sorted = std::get<0>(sorted_pair).contiguous();
  const at::Tensor order = std::get<1>(sorted_pair).contiguous();
  at::Tensor applied = at::empty({B, D}, feature_bank.options());
  at::Tensor old_rows = at::empty({B, D}, feature_bank.options());
  at::Tensor similarity = at::empty({B, K}, feature_bank.options());
  at::Tensor new_labels = at::empty({B}, label_bank.options());
  const double scale = std::ldexp(1.0, odc_fixed_bits(N));
  const double unit_roundoff = odc_unit_roundoff(feature_bank);
  const double input_rounding = feature_bank.scalar_type() == at::kFloat ? kTf32InputRounding : 0.0;
  auto* status = reinterpret_cast<unsigned long long*>(counters.mutable_data_ptr<int64_t>() + 1);
  static_assert(sizeof(unsigned long long) == sizeof(int64_t), "the status word is an int64 slot");
  auto stream = at::cuda::getCurrentCUDAStream();

  validate_batch_kernel<<<static_cast<unsigned>((B + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      sorted.const_data_ptr<int64_t>(), label_bank.const_data_ptr<int64_t>(), N, B, K, status);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  AT_DISPATCH_FLOATING_TYPES(feature_bank.scalar_type(), "odc_update_samples_cuda", [&] {
    blend_groups_kernel<scalar_t><<<blocks_for_warps(B), kThreads, 0, stream>>>(
        feature_bank.mutable_data_ptr<scalar_t>(), sorted.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(),
        features.const_data_ptr<scalar_t>(), applied.mutable_data_ptr<scalar_t>(),
        old_rows.mutable_data_ptr<scalar_t>(), status, B, D, momentum);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    similarity_gemm(applied, centroids, similarity);
    exact_argmax_kernel<scalar_t><<<static_cast<unsigned>(std::min<int64_t>(B, int64_t(1) << 20)), kThreads, 0,
                                    stream>>>(
        similarity.const_data_ptr<scalar_t>(), applied.const_data_ptr<scalar_t>(),
        centroids.const_data_ptr<scalar_t>(), max_norm.const_data_ptr<double>(), status,
        new_labels.mutable_data_ptr<int64_t>(), B, K, D, unit_roundoff, input_rounding);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    relabel_kernel<scalar_t><<<blocks_for_warps(B), kThreads, 0, stream>>>(
        feature_bank.const_data_ptr<scalar_t>(), label_bank.mutable_data_ptr<int64_t>(),
        counts.mutable_data_ptr<int64_t>(), class_sums.mutable_data_ptr<int64_t>(), sorted.const_data_ptr<int64_t>(),
        order.const_data_ptr<int64_t>(), new_labels.const_data_ptr<int64_t>(), old_rows.const_data_ptr<scalar_t>(),
        status, counters.mutable_data_ptr<int64_t>(), B, D, scale);
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
    if (label < 0 || label >= K) continue;  // never reached: the op refuses such banks first
    atomic_add_int64(class_sums + label * D + d, odc_quantize(static_cast<double>(bank[e]), scale));
    if (d == 0) atomic_add_int64(counts + label, 1);
  }
}

// A whole-bank recount (initialisation, resume) costs a pass over N x D values, so one host sync to refuse an
// out-of-range label before anything changes is cheap here, and it raises the CPU kernel's error.
void refuse_bad_labels(const at::Tensor& label_bank, int64_t K) {
  const at::Tensor bad = at::logical_or(label_bank.lt(0), label_bank.ge(K));
  if (!bad.any().item<bool>()) return;
  const int64_t n = at::nonzero(bad)[0][0].item<int64_t>();
  TORCH_CHECK(false, "pydc::odc_class_sums: label_bank[", n, "] = ", label_bank[n].item<int64_t>(),
              " is not a class in [0, ", K, ")");
}

void odc_class_sums_cuda(const at::Tensor& feature_bank, const at::Tensor& label_bank, at::Tensor class_sums,
                         at::Tensor counts) {
  const c10::cuda::CUDAGuard guard(feature_bank.device());
  check_odc_class_sums(feature_bank, label_bank, class_sums, counts);
  refuse_bad_labels(label_bank, counts.size(0));
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
  // A custom op's in-place write does not move the version counter by itself; CentroidNormCache needs it to.
  if (!centroids.is_inference()) centroids.unsafeGetTensorImpl()->bump_version();
}

}  // namespace
}  // namespace pydc

TORCH_LIBRARY_IMPL(pydc, CUDA, m) {
  m.impl("odc_update_samples", &pydc::odc_update_samples_cuda);
  m.impl("odc_class_sums", &pydc::odc_class_sums_cuda);
  m.impl("odc_centroids_from_sums", &pydc::odc_centroids_from_sums_cuda);
}
