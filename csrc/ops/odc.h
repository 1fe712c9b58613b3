// Argument checking of the ODC memory ops, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/odc_math.h"

namespace pydc {

// Checks the memory tensors and the batch of odc_update_samples (TORCH_CHECK, expected vs got) and returns
// the batch features in the bank's dtype, contiguous.
at::Tensor check_odc_update_samples(const at::Tensor& feature_bank, const at::Tensor& label_bank,
                                    const at::Tensor& counts, const at::Tensor& class_sums,
                                    const at::Tensor& centroids, const at::Tensor& indices,
                                    const at::Tensor& features, double momentum);

void check_odc_class_sums(const at::Tensor& feature_bank, const at::Tensor& label_bank,
                          const at::Tensor& class_sums, const at::Tensor& counts);

void check_odc_centroids_from_sums(const at::Tensor& class_sums, const at::Tensor& counts,
                                   const at::Tensor& centroids, int64_t bank_length);

// Relative rounding of the GEMM's inputs: 0 in full float32/float64, 2^-8 when torch may run float32
// matmuls in TF32 or BF16 (torch.set_float32_matmul_precision, allow_tf32).
double odc_gemm_input_rounding(const at::Tensor& centroids);

// Unit roundoff of the bank's dtype (2^-24 float32, 2^-53 float64).
double odc_unit_roundoff(const at::Tensor& feature_bank);

}  // namespace pydc
