// PCA-whitening ops: the streaming moment update and the fused centre + project + L2-normalize transform.
//
// Both ops are device-generic drivers around two device-specific row passes (centre rows, normalize rows);
// the heavy products go through at::mm, i.e. the device's BLAS (MKL/OpenBLAS on the CPU, cuBLAS on CUDA).
// Each kernel file hands its row passes and tuning to the driver in a PcaDeviceOps.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace pydc {

struct PcaDeviceOps {
  // Writes centred = (rows - shift) in centred's dtype, rows holding NaN/Inf as zeros, adds the number
  // of such rows to nonfinite_rows (int64, one element) and, when column_sums is defined, the column sums
  // of centred to column_sums (float64, contiguous (D)). rows: (R, D) with unit column stride; shift:
  // float64 (D); centred: contiguous (R, D).
  void (*center_rows)(const at::Tensor& rows, const at::Tensor& shift, const at::Tensor& centred,
                      const at::Tensor& nonfinite_rows, const at::Tensor& column_sums);
  // out[i] = projected[i] / (||projected[i]|| + norm_eps); projected: contiguous (R, K) float32/float64,
  // out: contiguous (R, K) float32, possibly the same memory as projected.
  void (*normalize_rows)(const at::Tensor& projected, const at::Tensor& out, double norm_eps);
  int64_t chunk_elements;  // centred values held at once (rows per chunk = chunk_elements / D) ...
  int64_t max_chunk_rows;  // ... but at most this many rows: float32 GEMMs over longer sums lose digits
  bool low_precision_gemm;  // float16/bfloat16 batches multiply in their own dtype into float32 products
  int64_t gram_panel;       // > 0: Gram as row panels this tall, upper triangle only (see add_gram)
  // Optional (nullptr: none). Adds centred^T centred into the upper triangle of a gram of centred's dtype
  // (BLAS syrk) and returns true, or returns false, touching nothing, when it cannot (add_gram then uses GEMMs).
  bool (*syrk_upper)(const at::Tensor& centred, const at::Tensor& gram);
  // Optional (nullptr: at::empty per call). A contiguous (rows, d) scratch tensor of `options`; the CPU keeps
  // one per thread and dtype across calls (a fresh 32 MB block costs ~9 ms of page faults per call there).
  at::Tensor (*scratch)(int64_t rows, int64_t d, const at::TensorOptions& options);
  // Optional (nullptr: at::mm_out). Writes out = centred @ projection^T (centred (R, D) contiguous, projection
  // (K, D), out (R, K) rows of unit stride) and returns true, or returns false, touching nothing, when it cannot
  // (pca_transform then uses at::mm_out).
  bool (*project)(const at::Tensor& centred, const at::Tensor& projection, const at::Tensor& out);
};

// Checks the arguments of pydc::pca_accumulate (TORCH_CHECK, expected vs got), then adds
// sum(batch - shift) to `sum` and (batch - shift)^T (batch - shift) to the upper triangle of `gram` (the
// lower one may or may not be updated) over the finite rows.
void pca_accumulate_impl(const at::Tensor& batch, const at::Tensor& shift, const at::Tensor& sum,
                         const at::Tensor& gram, const at::Tensor& nonfinite_rows, const PcaDeviceOps& ops);

// Checks the arguments of pydc::pca_transform, then returns the (N, K) float32 rows
// L2normalize((x - mean) @ projection^T) and the number of input rows holding NaN/Inf (int64, 0-d).
std::tuple<at::Tensor, at::Tensor> pca_transform_impl(const at::Tensor& x, const at::Tensor& mean,
                                                      const at::Tensor& projection, double norm_eps,
                                                      const PcaDeviceOps& ops);

}  // namespace pydc
