// CPU kernel of the fused Sobel stem: one pass per image band, three grey rows kept in a small ring, so
// the input is read once and only the output is written. Rows run in parallel (at::parallel_for); the
// inner loops are plain unit-stride loops that the compiler vectorizes; for uint8 -> float32 (training)
// they are explicit vectors compiled per ISA level and picked at run time (cpu_kernels.h): bytes widened
// by intrinsics, the filters split into their separable halves with sobel_3x3's exact operations, the
// NCHW planes written with streaming stores. Bands of 32 rows: each recomputes two halo grey rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/sobel_math.h"
#include "ops/cpu/cpu_kernels.h"
#include "ops/sobel_normalize.h"

namespace pydc {
namespace {

constexpr int64_t kSobelBandRows = 32;  // rows per work item (each recomputes two halo grey rows)

// Grey values of input row y (0 outside the image), written to grey[1 .. W]; grey[0] and grey[W+1]
// are the zero padding columns.
template <typename scalar_t, typename acc_t, bool kChannelsLast>
void grey_row(const scalar_t* image, int64_t H, int64_t W, int64_t y, const GreyCoefs<acc_t>& coefs,
              acc_t* grey) {
  grey[0] = acc_t(0);
  grey[W + 1] = acc_t(0);
  acc_t* out = grey + 1;
  if (y < 0 || y >= H) {
    for (int64_t x = 0; x < W; ++x) out[x] = acc_t(0);
    return;
  }
  if (kChannelsLast) {
    const scalar_t* row = image + y * W * 3;
    for (int64_t x = 0; x < W; ++x) {
      out[x] = grey_value<acc_t>(coefs, static_cast<acc_t>(row[3 * x]), static_cast<acc_t>(row[3 * x + 1]),
                                 static_cast<acc_t>(row[3 * x + 2]));
    }
  } else {
    const int64_t plane = H * W;
    const scalar_t* r = image + y * W;
    const scalar_t* g = r + plane;
    const scalar_t* b = g + plane;
    for (int64_t x = 0; x < W; ++x) {
      out[x] = grey_value<acc_t>(coefs, static_cast<acc_t>(r[x]), static_cast<acc_t>(g[x]),
                                 static_cast<acc_t>(b[x]));
    }
  }
}

template <typename scalar_t, typename out_t, typename acc_t, bool kChannelsLast>
void sobel_cpu_impl(const SobelPlan& plan) {
  const int64_t B = plan.input.size(0), H = plan.input.size(2), W = plan.input.size(3);
  const auto coefs = make_grey_coefs<acc_t>(plan.mean, plan.std, plan.scale);
  const scalar_t* in = plan.input.const_data_ptr<scalar_t>();
  out_t* out = plan.output.mutable_data_ptr<out_t>();
  const int64_t image_stride = 3 * H * W, out_image_stride = 2 * H * W;

  // Work items are bands of rows, so that each band recomputes only two halo grey rows.
  const int64_t band = kSobelBandRows;
  const int64_t bands_per_image = (H + band - 1) / band;
  at::parallel_for(0, B * bands_per_image, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> ring(3 * (W + 2));
    std::vector<acc_t> gx_row(W), gy_row(W);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / bands_per_image;
      const int64_t y0 = (item % bands_per_image) * band;
      const int64_t y1 = std::min(H, y0 + band);
      const scalar_t* image = in + n * image_stride;
      out_t* result = out + n * out_image_stride;
      acc_t* rows[3] = {ring.data(), ring.data() + (W + 2), ring.data() + 2 * (W + 2)};
      grey_row<scalar_t, acc_t, kChannelsLast>(image, H, W, y0 - 1, coefs, rows[0]);
      grey_row<scalar_t, acc_t, kChannelsLast>(image, H, W, y0, coefs, rows[1]);
      for (int64_t y = y0; y < y1; ++y) {
        grey_row<scalar_t, acc_t, kChannelsLast>(image, H, W, y + 1, coefs, rows[2]);
        const acc_t* t = rows[0];
        const acc_t* m = rows[1];
        const acc_t* b = rows[2];
        acc_t* gxr = gx_row.data();
        acc_t* gyr = gy_row.data();
        for (int64_t x = 0; x < W; ++x) {
          sobel_3x3<acc_t>(t[x], t[x + 1], t[x + 2], m[x], m[x + 2], b[x], b[x + 1], b[x + 2], gxr + x,
                           gyr + x);
        }
        if (kChannelsLast) {
          out_t* o = result + y * W * 2;
          for (int64_t x = 0; x < W; ++x) {
            o[2 * x] = static_cast<out_t>(gxr[x]);
            o[2 * x + 1] = static_cast<out_t>(gyr[x]);
          }
        } else {
          out_t* ox = result + y * W;
          out_t* oy = ox + H * W;
          for (int64_t x = 0; x < W; ++x) ox[x] = static_cast<out_t>(gxr[x]);
          for (int64_t x = 0; x < W; ++x) oy[x] = static_cast<out_t>(gyr[x]);
        }
        acc_t* recycled = rows[0];
        rows[0] = rows[1];
        rows[1] = rows[2];
        rows[2] = recycled;
      }
    }
  });
}

// uint8 -> float32, the case of training: the band loop is a per-ISA loop (cpu_kernels.h) with the same
// arithmetic as sobel_cpu_impl<uint8_t, float, float>.
void sobel_cpu_u8_float(const SobelPlan& plan) {
  const int64_t B = plan.input.size(0), H = plan.input.size(2), W = plan.input.size(3);
  const auto coefs = make_grey_coefs<float>(plan.mean, plan.std, plan.scale);
  const float coef_values[4] = {coefs.a0, coefs.a1, coefs.a2, coefs.bias};
  const uint8_t* in = plan.input.const_data_ptr<uint8_t>();
  float* out = plan.output.mutable_data_ptr<float>();
  const CpuKernels& kernels = cpu_kernels();
  const int64_t band = kSobelBandRows;
  const int64_t bands_per_image = (H + band - 1) / band;
  at::parallel_for(0, B * bands_per_image, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(kSobelScratchRows * (W + 2));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / bands_per_image;
      const int64_t y0 = (item % bands_per_image) * band;
      kernels.sobel_band_u8(in + n * 3 * H * W, H, W, y0, std::min(H, y0 + band), coef_values, plan.channels_last,
                            out + n * 2 * H * W, scratch.data());
    }
  });
}

template <typename scalar_t, typename out_t, typename acc_t>
void sobel_cpu_layout(const SobelPlan& plan) {
  if (plan.channels_last) {
    sobel_cpu_impl<scalar_t, out_t, acc_t, true>(plan);
  } else {
    sobel_cpu_impl<scalar_t, out_t, acc_t, false>(plan);
  }
}

at::Tensor sobel_normalize_cpu(const at::Tensor& images, c10::ArrayRef<double> mean,
                               c10::ArrayRef<double> std, std::optional<at::ScalarType> out_dtype) {
  SobelPlan plan = plan_sobel_normalize(images, mean, std, out_dtype);
  if (plan.output.numel() == 0) return plan.output;
  if (plan.input.scalar_type() == at::kByte && plan.output.scalar_type() == at::kFloat) {
    sobel_cpu_u8_float(plan);
    return plan.output;
  }
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, plan.input.scalar_type(),
                                  "sobel_normalize_cpu", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.output.scalar_type(),
                                    "sobel_normalize_cpu_out", [&] {
      sobel_cpu_layout<in_t, scalar_t, sobel_acc_t<in_t, scalar_t>>(plan);
    });
  });
  return plan.output;
}

}  // namespace
}  // namespace pydc

TORCH_LIBRARY_IMPL(pydc, CPU, m) {
  m.impl("sobel_normalize", &pydc::sobel_normalize_cpu);
}
