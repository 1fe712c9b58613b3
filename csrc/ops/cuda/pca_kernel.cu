// CUDA row passes of the PCA-whitening ops; the GEMMs in between are cuBLAS (ops/pca.cpp through at::mm, and
// the float32 Gram here).
// center_rows: one block per row (grid-stride over rows), __syncthreads_or to learn whether any value of
// the row is NaN/Inf. normalize_rows: one warp per row, shuffle reduction of the squared norm.
// gram_3xtf32: the float32 Gram at tensor-core rate with float32 accuracy, whatever torch's TF32 flag says.
// Each centred value is split as hi + lo, both TF32 (pca_tf32_round), and gram += hi^T hi + hi^T lo + lo^T hi
// by three TF32 GEMMs on upper-triangle row panels. Why that is float32-accurate: c = hi + lo + r with
// |r| <= 2^-22 |c| (lo is c - hi, exact in float32, rounded to TF32), so each product c_i c_j is formed with
// a relative error <= 3 * 2^-22 (the dropped lo_i lo_j and the two r terms) = 12 float32 units, and the
// inputs reach the tensor cores already in TF32, so cuBLAS converts nothing. The GEMM's float32 accumulation
// over a chunk's n rows has the bound n * 2^-24 (Higham's gamma_n) for any fp32 GEMM; the split's 12 units
// add 12 / n to it: 0.07% at the chunk's 16384 rows, i.e. float32 accuracy. Flops at D = 4096 with panels of
// 512: 3 x (1 + 512/4096) x N D^2 = 7.2e13 for N = 1.28M, ~0.18 s at ~400 TF32 TFLOP/s (H100/H200 dense
// peak ~495), against ~0.7 s for one plain float32 GEMM of both triangles (4.3e13 at ~60 TFLOP/s).
// PYDC_PCA_CUDA_GRAM=fp32 turns it off (one plain float32 GEMM, torch's precision setting).
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "common/pca_math.h"
#include "ops/pca.h"

namespace pydc {
namespace {

constexpr int kMaxCenterThreads = 256;
constexpr int kWarpsPerBlock = 8;
constexpr int64_t kMaxBlocks = 65535;

template <typename in_t, typename out_t>
__global__ void center_rows_kernel(const in_t* __restrict__ in, int64_t row_stride,
                                   const double* __restrict__ shift, out_t* __restrict__ out, int64_t n,
                                   int64_t d, unsigned long long* __restrict__ nonfinite_rows) {
  for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {  // uniform per block: __syncthreads_or is safe
    const in_t* src = in + r * row_stride;
    out_t* dst = out + r * d;
    double poison = 0.0;  // 0 over finite values, NaN after a NaN/Inf
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      const double v = pca_center(pca_load(src[j]), shift[j]);
      poison += v - v;
      dst[j] = pca_store<out_t>(v);
    }
    if (__syncthreads_or(!pca_is_finite(poison))) {
      for (int64_t j = threadIdx.x; j < d; j += blockDim.x) dst[j] = pca_store<out_t>(0.0);
      if (threadIdx.x == 0) atomicAdd(nonfinite_rows, 1ULL);
    }
  }
}

void center_rows_cuda(const at::Tensor& rows, const at::Tensor& shift, const at::Tensor& centred,
                      const at::Tensor& nonfinite_rows, const at::Tensor& column_sums) {
  const int64_t n = rows.size(0), d = rows.size(1);
  if (n == 0) return;
  const at::Tensor shift_dense = shift.contiguous();
  const int threads = static_cast<int>(std::min<int64_t>(kMaxCenterThreads, (d + 31) / 32 * 32));
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(n, kMaxBlocks));
  auto stream = at::cuda::getCurrentCUDAStream();
  static_assert(sizeof(unsigned long long) == sizeof(int64_t), "the row counter is int64");
  auto* counter = reinterpret_cast<unsigned long long*>(nonfinite_rows.mutable_data_ptr<int64_t>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "pca_center_rows_cuda", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, centred.scalar_type(), "pca_center_rows_cuda_out",
                                    [&] {
      center_rows_kernel<in_t, scalar_t><<<blocks, threads, 0, stream>>>(
          rows.const_data_ptr<in_t>(), rows.stride(0), shift_dense.const_data_ptr<double>(),
          centred.mutable_data_ptr<scalar_t>(), n, d, counter);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  // A separate reduction of the centred chunk (cached in L2 for modest chunks): cheap beside the Gram.
  if (column_sums.defined()) {
    const int64_t rows_dim[] = {0};
    column_sums.add_(centred.sum(at::IntArrayRef(rows_dim), /*keepdim=*/false, at::kDouble));
  }
}

template <typename in_t>
__device__ __forceinline__ in_t warp_sum(in_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// `in` may alias `out` (float32): each lane reads its values of the row before it writes them.
template <typename in_t>
__global__ void normalize_rows_kernel(const in_t* in, float* out, int64_t n, int64_t k, in_t norm_eps) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = warp; r < n; r += warps) {  // uniform per warp: the full-mask shuffles are safe
    const in_t* row = in + r * k;
    in_t sum_squares = 0;
    for (int64_t j = lane; j < k; j += 32) sum_squares += row[j] * row[j];
    const in_t scale = pca_inverse_norm<in_t>(warp_sum(sum_squares), norm_eps);
    float* dst = out + r * k;
    for (int64_t j = lane; j < k; j += 32) dst[j] = static_cast<float>(row[j] * scale);
  }
}

void normalize_rows_cuda(const at::Tensor& projected, const at::Tensor& out, double norm_eps) {
  const int64_t n = projected.size(0), k = projected.size(1);
  if (n == 0 || k == 0) return;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((n + kWarpsPerBlock - 1) / kWarpsPerBlock,
                                                                  kMaxBlocks));
  auto stream = at::cuda::getCurrentCUDAStream();
  if (projected.scalar_type() == at::kDouble) {
    normalize_rows_kernel<double><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
        projected.const_data_ptr<double>(), out.mutable_data_ptr<float>(), n, k, norm_eps);
  } else {
    normalize_rows_kernel<float><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(
        projected.const_data_ptr<float>(), out.mutable_data_ptr<float>(), n, k, static_cast<float>(norm_eps));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

constexpr int64_t kGramPanel = 512;

// centred becomes its TF32 high part, lo its TF32 low part (see the file comment).
__global__ void split_tf32_kernel(float* __restrict__ centred, float* __restrict__ lo, int64_t total) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float value = centred[e];
    const float hi = pca_tf32_round(value);
    centred[e] = hi;
    lo[e] = pca_tf32_round(value - hi);
  }
}

// gram[i0:i0+p, i0:] += a[:, i0:i0+p]^T b[:, i0:] (row-major). cuBLAS is column-major: the row-major panel is
// the column-major (D - i0) x p block at gram + i0 * D + i0 (ld D), equal to B_cols . A_panel^T over the rows.
void add_upper_panel(cublasHandle_t handle, const float* a, const float* b, float* gram, int64_t rows, int64_t d,
                     int64_t i0, int64_t p) {
  const float alpha = 1.0f, beta = 1.0f;
  TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(d - i0), static_cast<int>(p),
                                    static_cast<int>(rows), &alpha, b + i0, CUDA_R_32F, static_cast<int>(d), a + i0,
                                    CUDA_R_32F, static_cast<int>(d), &beta, gram + i0 * d + i0, CUDA_R_32F,
                                    static_cast<int>(d), CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT));
}

bool gram_3xtf32_enabled() {
  const char* value = std::getenv("PYDC_PCA_CUDA_GRAM");
  return value == nullptr || std::strcmp(value, "fp32") != 0;
}

// The PcaDeviceOps::syrk_upper hook: upper triangle of a float32 gram += centred^T centred (float32 centred,
// which it overwrites with the high parts: the driver does not read the chunk again).
bool gram_3xtf32(const at::Tensor& centred, const at::Tensor& gram) {
  if (centred.scalar_type() != at::kFloat || gram.scalar_type() != at::kFloat || !gram.is_contiguous() ||
      !centred.is_contiguous() || !gram_3xtf32_enabled()) {
    return false;
  }
  const int64_t rows = centred.size(0), d = centred.size(1);
  if (rows == 0) return true;
  if (rows > INT32_MAX || d > INT32_MAX) return false;
  float* hi = centred.mutable_data_ptr<float>();  // the driver's scratch chunk
  at::Tensor lo = at::empty(centred.sizes(), centred.options());
  const int64_t total = rows * d;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, int64_t(1) << 20));
  auto stream = at::cuda::getCurrentCUDAStream();
  split_tf32_kernel<<<blocks, 256, 0, stream>>>(hi, lo.mutable_data_ptr<float>(), total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // bound to the current stream
  float* g = gram.mutable_data_ptr<float>();
  const float* low = lo.const_data_ptr<float>();
  for (int64_t i0 = 0; i0 < d; i0 += kGramPanel) {
    const int64_t p = std::min(kGramPanel, d - i0);
    add_upper_panel(handle, hi, hi, g, rows, d, i0, p);
    add_upper_panel(handle, hi, low, g, rows, d, i0, p);
    add_upper_panel(handle, low, hi, g, rows, d, i0, p);
  }
  return true;
}

// 2^26 centred values per chunk (256 MB in float32; 16384 rows at D = 4096), at most 16384 rows (float32
// sums over longer runs lose digits): GEMMs that large keep the tensor cores busy, while 1.28M x 4096
// features never get a second full-size copy. A float32 Gram goes through gram_3xtf32; other Grams are one
// GEMM of both triangles. float16/bfloat16 batches multiply in their own dtype on the tensor cores with
// float32 products.
const PcaDeviceOps kCudaOps{&center_rows_cuda, &normalize_rows_cuda, int64_t(1) << 26, 16384, true, 0,
                           &gram_3xtf32, nullptr, nullptr};

void pca_accumulate_cuda(const at::Tensor& batch, const at::Tensor& shift, at::Tensor& sum, at::Tensor& gram,
                         at::Tensor& nonfinite_rows) {
  const c10::cuda::CUDAGuard guard(batch.device());
  pca_accumulate_impl(batch, shift, sum, gram, nonfinite_rows, kCudaOps);
}

std::tuple<at::Tensor, at::Tensor> pca_transform_cuda(const at::Tensor& x, const at::Tensor& mean,
                                                      const at::Tensor& projection, double norm_eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  return pca_transform_impl(x, mean, projection, norm_eps, kCudaOps);
}

}  // namespace
}  // namespace pydc

TORCH_LIBRARY_IMPL(pydc, CUDA, m) {
  m.impl("pca_accumulate", &pydc::pca_accumulate_cuda);
  m.impl("pca_transform", &pydc::pca_transform_cuda);
}
