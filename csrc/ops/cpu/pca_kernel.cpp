// CPU row passes of the PCA-whitening ops (centre rows, normalize rows), multithreaded over rows with
// at::parallel_for; the GEMMs in between are MKL/OpenBLAS through at::mm (see ops/pca.cpp). The float32 row
// loops (the hot path at D = 2048) are per-ISA loops (cpu_kernels.h), picked at run time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <mutex>
#include <type_traits>
#include <vector>

#include "common/pca_math.h"
#include "ops/cpu/blas_gemm.h"
#include "ops/cpu/blas_syrk.h"
#include "ops/cpu/cpu_kernels.h"
#include "ops/pca.h"

namespace pydc {
namespace {

// Centres one row into dst and returns true when all its values are finite.
template <typename in_t, typename out_t>
bool center_row(const in_t* src, const double* shift, const float* shift_hi, const float* shift_lo, out_t* dst,
                int64_t d) {
  // float32 arithmetic (pca_center_split) where neither side is float64, float64 otherwise. The poison sum
  // stays 0 over finite values and becomes NaN at the first NaN/Inf, in a loop that vectorizes.
  if constexpr (std::is_same_v<in_t, float> && std::is_same_v<out_t, float>) {
    return cpu_kernels().center_row_float(src, shift_hi, shift_lo, dst, d);
  } else if constexpr (std::is_same_v<in_t, double> || std::is_same_v<out_t, double>) {
    double poison = 0.0;
    for (int64_t j = 0; j < d; ++j) {
      const double v = pca_center(pca_load(src[j]), shift[j]);
      poison += v - v;
      dst[j] = pca_store<out_t>(v);
    }
    return pca_is_finite(poison);
  } else {
    float poison = 0.0f;
    for (int64_t j = 0; j < d; ++j) {
      const float v = pca_center_split(static_cast<float>(src[j]), shift_hi[j], shift_lo[j]);
      poison += v - v;
      dst[j] = static_cast<out_t>(v);
    }
    return pca_is_finite(poison);
  }
}

template <typename in_t, typename out_t>
void center_rows_typed(const at::Tensor& rows, const at::Tensor& shift, const at::Tensor& centred,
                       const at::Tensor& nonfinite_rows, const at::Tensor& column_sums) {
  const int64_t n = rows.size(0), d = rows.size(1), row_stride = rows.stride(0);
  const in_t* in = rows.const_data_ptr<in_t>();
  const at::Tensor shift_dense = shift.contiguous();
  const double* shift_values = shift_dense.const_data_ptr<double>();
  std::vector<float> shift_hi(d), shift_lo(d);
  for (int64_t j = 0; j < d; ++j) {
    shift_hi[j] = static_cast<float>(shift_values[j]);
    shift_lo[j] = static_cast<float>(shift_values[j] - static_cast<double>(shift_hi[j]));
  }
  out_t* out = centred.mutable_data_ptr<out_t>();
  double* sums = column_sums.defined() ? column_sums.mutable_data_ptr<double>() : nullptr;
  const CpuKernels& kernels = cpu_kernels();
  std::atomic<int64_t> bad_rows{0};
  std::mutex sums_mutex;
  const int64_t grain = std::max<int64_t>(1, 32768 / d);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    int64_t local_bad = 0;
    // Column sums of this thread's rows in float64, merged once at the end.
    std::vector<double> local_sums(sums != nullptr ? d : 0, 0.0);
    for (int64_t r = begin; r < end; ++r) {
      out_t* dst = out + r * d;
      if (!center_row(in + r * row_stride, shift_values, shift_hi.data(), shift_lo.data(), dst, d)) {
        for (int64_t j = 0; j < d; ++j) dst[j] = pca_store<out_t>(0.0);
        ++local_bad;
      } else if (sums != nullptr) {
        // The rounded values the GEMM sees, so that sum and gram describe the same numbers.
        if constexpr (std::is_same_v<out_t, float>) {
          kernels.add_row_float(dst, local_sums.data(), d);
        } else {
          for (int64_t j = 0; j < d; ++j) local_sums[j] += pca_load(dst[j]);
        }
      }
    }
    bad_rows += local_bad;
    if (sums != nullptr) {
      const std::lock_guard<std::mutex> lock(sums_mutex);
      for (int64_t j = 0; j < d; ++j) sums[j] += local_sums[j];
    }
  });
  nonfinite_rows.mutable_data_ptr<int64_t>()[0] += bad_rows.load();
}

void center_rows_cpu(const at::Tensor& rows, const at::Tensor& shift, const at::Tensor& centred,
                     const at::Tensor& nonfinite_rows, const at::Tensor& column_sums) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "pca_center_rows_cpu", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, centred.scalar_type(), "pca_center_rows_cpu_out",
                                    [&] { center_rows_typed<in_t, scalar_t>(rows, shift, centred, nonfinite_rows, column_sums); });
  });
}

void normalize_rows_cpu(const at::Tensor& projected, const at::Tensor& out, double norm_eps) {
  const int64_t n = projected.size(0), k = projected.size(1);
  float* result = out.mutable_data_ptr<float>();  // may alias `projected` (float32): each row is read, then written
  const CpuKernels& kernels = cpu_kernels();
  const bool is_double = projected.scalar_type() == at::kDouble;
  const void* in = projected.const_data_ptr();
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / k), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (is_double) {
        kernels.normalize_row_double(static_cast<const double*>(in) + r * k, result + r * k, k, norm_eps);
      } else {
        kernels.normalize_row_float(static_cast<const float*>(in) + r * k, result + r * k, k, norm_eps);
      }
    }
  });
}

// The chunk buffer, kept per thread and dtype between calls and grown when needed (at most 2^23 values:
// 32 MB in float32, 64 MB in float64). A fresh 32 MB at::empty per call is a fresh mmap whose first touch
// page-faults: ~9 ms per 4096 x 2048 float32 chunk on the 2-core EPYC, ~0.1 s of a 50,000-row fit.
at::Tensor cpu_scratch(int64_t rows, int64_t d, const at::TensorOptions& options) {
  thread_local at::Tensor float_buffer, double_buffer, other_buffer;
  const at::ScalarType t = options.dtype().toScalarType();
  at::Tensor& cached = t == at::kFloat ? float_buffer : (t == at::kDouble ? double_buffer : other_buffer);
  if (!cached.defined() || cached.scalar_type() != t || cached.numel() < rows * d) {
    cached = at::Tensor();  // release the old block first
    cached = at::empty({rows * d}, options);
  }
  return cached.narrow(0, 0, rows * d).view({rows, d});
}

// Chunks of up to 2^23 centred values (4096 float32 rows, 32 MB, at D = 2048) and at most 4096 rows: a
// float32 Gram summed over 50,000 rows in one GEMM drifts by ~2e-5 relative (measured at D = 6), over 4096
// rows by ~1e-6. The Gram is a syrk (blas_syrk.h: pydc's own, scipy's BLAS one or MKL's, as
// pydc.ops.pca.use_cpu_syrk chose), else row panels 256 tall over the upper triangle. Measured on the idle
// 2-core EPYC, the Gram of 49,152 x 2048 rows in 4096-row float32 chunks: full GEMM 2.13 s; panels 256 tall
// 1.40-1.47 s (56% of the flops at ~177 GFLOP/s), 128 tall 1.70 s, 512 tall 1.47 s; recursive halving down to
// 128/256-wide blocks 1.37-1.39 s; scipy's OpenBLAS ssyrk 1.11 s (Zen 4, one 4096-row chunk with its
// centring: OpenBLAS 97-111 ms, pydc's 88-95 ms).
// The float32 projection of a chunk by the k-means GEMM (blas_gemm.h: pydc's, scipy's or torch's, as
// pydc.ops.cpu_gemm chose), kPerThreadGemmRows rows per call on torch's threads, the projection packed once: torch's
// MKL ran a 4096 x 2048 x 256 chunk at ~84% of the FMA units' peak on the 2-core EPYC Zen 4 (its AVX2 code at
// either level there), pydc's GEMM runs at ~91%. float64 projections keep at::mm_out.
bool project_cpu(const at::Tensor& centred, const at::Tensor& projection, const at::Tensor& out) {
  if (centred.scalar_type() != at::kFloat || projection.scalar_type() != at::kFloat) return false;
  const at::Tensor rhs_rows = projection.contiguous();
  const CpuGemmRhs rhs(rhs_rows);
  const int64_t rows = centred.size(0);
  const int64_t blocks = (rows + kPerThreadGemmRows - 1) / kPerThreadGemmRows;
  PerThreadCpuGemm one_thread_each;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kPerThreadGemmRows, part = std::min(kPerThreadGemmRows, rows - r0);
      rhs.multiply(out.narrow(0, r0, part), centred.narrow(0, r0, part));
    }
  });
  return true;
}

const PcaDeviceOps kCpuOps{&center_rows_cpu, &normalize_rows_cpu, int64_t(1) << 23, 4096, false, 256,
                           &cpu_syrk_upper, &cpu_scratch, &project_cpu};

void pca_accumulate_cpu(const at::Tensor& batch, const at::Tensor& shift, at::Tensor& sum, at::Tensor& gram,
                        at::Tensor& nonfinite_rows) {
  pca_accumulate_impl(batch, shift, sum, gram, nonfinite_rows, kCpuOps);
}

std::tuple<at::Tensor, at::Tensor> pca_transform_cpu(const at::Tensor& x, const at::Tensor& mean,
                                                     const at::Tensor& projection, double norm_eps) {
  return pca_transform_impl(x, mean, projection, norm_eps, kCpuOps);
}

}  // namespace
}  // namespace pydc

TORCH_LIBRARY_IMPL(pydc, CPU, m) {
  m.impl("pca_accumulate", &pydc::pca_accumulate_cpu);
  m.impl("pca_transform", &pydc::pca_transform_cpu);
}
