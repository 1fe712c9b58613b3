// CUDA kernel of the fused Sobel stem: one pass over the input. A block owns a 64 x 16 output tile; it
// turns the (16 + 2) x (64 + 2) input pixels under it (tile plus halo) into grey values in shared memory,
// four pixels per load where rows are aligned, then each thread writes four Gx and four Gy values with
// vector stores. No intermediate tensor is written to global memory.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "common/sobel_math.h"
#include "ops/sobel_normalize.h"

namespace pydc {
namespace {

constexpr int kTileW = 64;
constexpr int kTileH = 16;
constexpr int kVec = 4;                       // pixels per vector load/store
constexpr int kThreadsX = kTileW / kVec;      // 16
constexpr int kThreads = kThreadsX * kTileH;  // 256

template <typename T>
struct alignas(kVec * sizeof(T)) Vec4 {
  T v[kVec];
};

template <typename T>
bool aligned_for_vec(const void* ptr) {
  return reinterpret_cast<std::uintptr_t>(ptr) % (kVec * sizeof(T)) == 0;
}

template <typename scalar_t, typename out_t, typename acc_t, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
sobel_normalize_kernel(const scalar_t* __restrict__ in, out_t* __restrict__ out, int64_t B, int H, int W,
                       GreyCoefs<acc_t> coefs, bool vec_in, bool vec_out) {
  __shared__ acc_t tile[kTileH + 2][kTileW + 2];
  const int tid = threadIdx.x;
  const int x0 = blockIdx.x * kTileW;
  const int y0 = blockIdx.y * kTileH;
  const int64_t plane = static_cast<int64_t>(H) * W;

  for (int64_t n = blockIdx.z; n < B; n += gridDim.z) {
    const scalar_t* image = in + n * 3 * plane;
    out_t* result = out + n * 2 * plane;

    // Interior columns x0 .. x0 + 63 of rows y0 - 1 .. y0 + 16, in groups of four pixels.
    for (int item = tid; item < (kTileH + 2) * kThreadsX; item += kThreads) {
      const int ry = item / kThreadsX;
      const int cx = (item % kThreadsX) * kVec;
      const int y = y0 - 1 + ry;
      const int x = x0 + cx;
      acc_t grey[kVec];
      if (y < 0 || y >= H) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) grey[j] = acc_t(0);
      } else if (!kChannelsLast && vec_in && x + kVec <= W) {
        const int64_t offset = static_cast<int64_t>(y) * W + x;
        const Vec4<scalar_t> r = *reinterpret_cast<const Vec4<scalar_t>*>(image + offset);
        const Vec4<scalar_t> g = *reinterpret_cast<const Vec4<scalar_t>*>(image + plane + offset);
        const Vec4<scalar_t> b = *reinterpret_cast<const Vec4<scalar_t>*>(image + 2 * plane + offset);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          grey[j] = grey_value<acc_t>(coefs, static_cast<acc_t>(r.v[j]), static_cast<acc_t>(g.v[j]),
                                      static_cast<acc_t>(b.v[j]));
        }
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const int xj = x + j;
          if (xj >= W) {
            grey[j] = acc_t(0);
          } else if (kChannelsLast) {
            const scalar_t* px = image + (static_cast<int64_t>(y) * W + xj) * 3;
            grey[j] = grey_value<acc_t>(coefs, static_cast<acc_t>(px[0]), static_cast<acc_t>(px[1]),
                                        static_cast<acc_t>(px[2]));
          } else {
            const int64_t offset = static_cast<int64_t>(y) * W + xj;
            grey[j] = grey_value<acc_t>(coefs, static_cast<acc_t>(image[offset]),
                                        static_cast<acc_t>(image[plane + offset]),
                                        static_cast<acc_t>(image[2 * plane + offset]));
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) tile[ry][cx + 1 + j] = grey[j];
    }
    // Halo columns x0 - 1 and x0 + 64.
    if (tid < 2 * (kTileH + 2)) {
      const int ry = tid >> 1;
      const int cx = (tid & 1) ? kTileW + 1 : 0;
      const int y = y0 - 1 + ry;
      const int x = x0 - 1 + cx;
      acc_t grey = acc_t(0);
      if (y >= 0 && y < H && x >= 0 && x < W) {
        const int64_t offset = static_cast<int64_t>(y) * W + x;
        if (kChannelsLast) {
          const scalar_t* px = image + offset * 3;
          grey = grey_value<acc_t>(coefs, static_cast<acc_t>(px[0]), static_cast<acc_t>(px[1]),
                                   static_cast<acc_t>(px[2]));
        } else {
          grey = grey_value<acc_t>(coefs, static_cast<acc_t>(image[offset]),
                                   static_cast<acc_t>(image[plane + offset]),
                                   static_cast<acc_t>(image[2 * plane + offset]));
        }
      }
      tile[ry][cx] = grey;
    }
    __syncthreads();

    const int ty = tid / kThreadsX;
    const int cx = (tid % kThreadsX) * kVec;
    const int y = y0 + ty;
    const int x = x0 + cx;
    if (y < H && x < W) {
      acc_t gx[kVec], gy[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const int c = cx + j;  // tile column of the left neighbour
        sobel_3x3<acc_t>(tile[ty][c], tile[ty][c + 1], tile[ty][c + 2], tile[ty + 1][c], tile[ty + 1][c + 2],
                         tile[ty + 2][c], tile[ty + 2][c + 1], tile[ty + 2][c + 2], &gx[j], &gy[j]);
      }
      const int64_t offset = static_cast<int64_t>(y) * W + x;
      if (kChannelsLast) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          if (x + j < W) {
            result[(offset + j) * 2] = static_cast<out_t>(gx[j]);
            result[(offset + j) * 2 + 1] = static_cast<out_t>(gy[j]);
          }
        }
      } else if (vec_out && x + kVec <= W) {
        Vec4<out_t> vx, vy;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          vx.v[j] = static_cast<out_t>(gx[j]);
          vy.v[j] = static_cast<out_t>(gy[j]);
        }
        *reinterpret_cast<Vec4<out_t>*>(result + offset) = vx;
        *reinterpret_cast<Vec4<out_t>*>(result + plane + offset) = vy;
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          if (x + j < W) {
            result[offset + j] = static_cast<out_t>(gx[j]);
            result[plane + offset + j] = static_cast<out_t>(gy[j]);
          }
        }
      }
    }
    __syncthreads();  // the tile is reused for the next image of this block
  }
}

template <typename scalar_t, typename out_t>
void launch(const SobelPlan& plan) {
  using acc_t = sobel_acc_t<scalar_t, out_t>;
  const int64_t B = plan.input.size(0);
  const int H = static_cast<int>(plan.input.size(2));
  const int W = static_cast<int>(plan.input.size(3));
  const auto coefs = make_grey_coefs<acc_t>(plan.mean, plan.std, plan.scale);
  const scalar_t* in = plan.input.const_data_ptr<scalar_t>();
  out_t* out = plan.output.mutable_data_ptr<out_t>();
  const bool vec_in = W % kVec == 0 && aligned_for_vec<scalar_t>(in);
  const bool vec_out = W % kVec == 0 && aligned_for_vec<out_t>(out);
  const dim3 grid((W + kTileW - 1) / kTileW, (H + kTileH - 1) / kTileH,
                  static_cast<unsigned>(std::min<int64_t>(B, 65535)));
  auto stream = at::cuda::getCurrentCUDAStream();
  if (plan.channels_last) {
    sobel_normalize_kernel<scalar_t, out_t, acc_t, true>
        <<<grid, kThreads, 0, stream>>>(in, out, B, H, W, coefs, vec_in, vec_out);
  } else {
    sobel_normalize_kernel<scalar_t, out_t, acc_t, false>
        <<<grid, kThreads, 0, stream>>>(in, out, B, H, W, coefs, vec_in, vec_out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor sobel_normalize_cuda(const at::Tensor& images, c10::ArrayRef<double> mean,
                                c10::ArrayRef<double> std, std::optional<at::ScalarType> out_dtype) {
  const c10::cuda::CUDAGuard guard(images.device());
  SobelPlan plan = plan_sobel_normalize(images, mean, std, out_dtype);
  if (plan.output.numel() == 0) return plan.output;
  TORCH_CHECK(plan.input.size(2) <= INT32_MAX / 2 && plan.input.size(3) <= INT32_MAX / 2,
              "pydc::sobel_normalize: image height and width must be below 2^30, got ",
              plan.input.sizes());
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, plan.input.scalar_type(),
                                  "sobel_normalize_cuda", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.output.scalar_type(),
                                    "sobel_normalize_cuda_out", [&] { launch<in_t, scalar_t>(plan); });
  });
  return plan.output;
}

}  // namespace
}  // namespace pydc

TORCH_LIBRARY_IMPL(pydc, CUDA, m) {
  m.impl("sobel_normalize", &pydc::sobel_normalize_cuda);
}
