// Schema of the fused Sobel stem and the checks both kernels share.
#include "ops/sobel_normalize.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "common/checks.h"

namespace pydc {

namespace {
constexpr const char* kOp = "pydc::sobel_normalize";

bool is_supported_input(at::ScalarType t) {
  return t == at::kByte || t == at::kFloat || t == at::kHalf || t == at::kBFloat16 ||
         t == at::kDouble;
}

bool is_supported_output(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_stats(const char* name, c10::ArrayRef<double> v, bool is_std) {
  TORCH_CHECK(v.size() == 3, kOp, ": expected ", name, " to hold 3 values (one per RGB channel), got ",
              v.size());
  for (size_t c = 0; c < 3; ++c) {
    TORCH_CHECK(std::isfinite(v[c]), kOp, ": ", name, "[", c, "] must be finite, got ", v[c]);
    if (is_std) {
      TORCH_CHECK(v[c] != 0.0, kOp, ": std[", c, "] is 0; a zero std divides by zero, expected a "
                  "non-zero value such as torchvision's (0.229, 0.224, 0.225)");
    }
  }
}
}  // namespace

SobelPlan plan_sobel_normalize(const at::Tensor& images, c10::ArrayRef<double> mean,
                               c10::ArrayRef<double> std, std::optional<at::ScalarType> out_dtype) {
  PYDC_CHECK_DIM(kOp, "images", images, 4);
  TORCH_CHECK(images.size(1) == 3, kOp, ": expected images of shape (B, 3, H, W) with 3 RGB channels, "
              "got ", describe(images), "; convert grey or RGBA images to RGB first");
  TORCH_CHECK(is_supported_input(images.scalar_type()), kOp,
              ": expected images of dtype uint8, float32, float16, bfloat16 or float64, got ",
              describe(images));
  const at::ScalarType out_type = out_dtype.value_or(at::kFloat);
  TORCH_CHECK(is_supported_output(out_type), kOp,
              ": expected out_dtype float32, float16, bfloat16 or float64, got ", out_type);
  check_stats("mean", mean, false);
  check_stats("std", std, true);

  SobelPlan plan;
  // Channels-last input stays channels-last (no copy) and so does the output; anything else that is not
  // dense NCHW is made contiguous first.
  plan.channels_last = images.dim() == 4 && images.size(1) > 1 &&
                       images.is_contiguous(at::MemoryFormat::ChannelsLast) && !images.is_contiguous();
  plan.input = plan.channels_last ? images : images.contiguous();
  const auto format = plan.channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  plan.output = at::empty({images.size(0), 2, images.size(2), images.size(3)},
                          images.options().dtype(out_type), format);
  for (int c = 0; c < 3; ++c) {
    plan.mean[c] = mean[c];
    plan.std[c] = std[c];
  }
  plan.scale = images.scalar_type() == at::kByte ? 1.0 / 255.0 : 1.0;
  return plan;
}

}  // namespace pydc

TORCH_LIBRARY_FRAGMENT(pydc, m) {
  m.def("sobel_normalize(Tensor images, float[] mean, float[] std, ScalarType? out_dtype=None) -> Tensor");
}
