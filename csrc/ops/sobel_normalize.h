// Argument checking and output allocation of sobel_normalize, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <type_traits>

#include "common/sobel_math.h"

namespace pydc {

struct SobelPlan {
  at::Tensor input;               // images in a layout the kernels read (NCHW or NHWC dense)
  at::Tensor output;              // (B, 2, H, W), same memory format as `input`
  bool channels_last;             // true when both are NHWC in memory
  double mean[3];
  double std[3];
  double scale;                   // 1/255 for uint8 input, 1 otherwise
};

// Arithmetic type: double when the input or the output is float64, float otherwise.
template <typename in_t, typename out_t>
using sobel_acc_t = std::conditional_t<std::is_same_v<in_t, double> || std::is_same_v<out_t, double>,
                                       double, float>;

// Validates images/mean/std/out_dtype (TORCH_CHECK with expected vs got) and allocates the output.
SobelPlan plan_sobel_normalize(const at::Tensor& images, c10::ArrayRef<double> mean,
                               c10::ArrayRef<double> std, std::optional<at::ScalarType> out_dtype);

}  // namespace pydc
