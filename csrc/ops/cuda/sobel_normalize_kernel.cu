// CUDA kernel of the fused Sobel stem: one pass over the input. A block owns a 32 x 32 output tile (a 224 x 224
// image is exactly 7 x 7 tiles: no half-empty tile, which a 64-wide tile left at W = 224); it turns the
// (32 + 2) x (32 + 2) input pixels under it (tile plus halo) into grey values in shared memory, four pixels per
// load where rows are aligned, then each thread writes four Gx and four Gy values with vector stores. Every
// thread issues all its global loads (interior groups and halo pixels alike) before it stores any grey value,
// so the halo's loads overlap the interior's instead of following them. Shared rows are kSharedStride = 37
// floats apart: a warp covers 4 tile rows x 8 threads, and with 37 = 5 (mod 32) the lanes' words
// 5 * row + 4 * thread (+ a common offset) fall in 32 distinct banks for the grey stores, the halo stores and
// every one of the nine stencil reads (a stride of 34 or 66 gave 2-way conflicts). Tiles stride over the grid
// in y and images stride in z, so any height passes the entry check's limit, not only ceil(H/32) <= 65535.
// No intermediate tensor is written to global memory.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common/sobel_math.h"
#include "ops/sobel_normalize.h"

namespace pydc {
namespace {

constexpr int kTileW = 32;
constexpr int kTileH = 32;
constexpr int kVec = 4;                                  // pixels per vector load/store
constexpr int kThreadsX = kTileW / kVec;                 // 8
constexpr int kThreads = kThreadsX * kTileH;             // 256
constexpr int kSharedRows = kTileH + 2;                  // 34
constexpr int kSharedStride = kTileW + 5;                // 37 = 5 (mod 32): conflict-free, see above
constexpr int kInteriorItems = kSharedRows * kThreadsX;  // 272 groups of four pixels
constexpr int kItems = kInteriorItems + 2 * kSharedRows; // + 68 halo pixels
constexpr int kMaxGridY = 65535;
static_assert(kItems <= 2 * kThreads, "every thread loads at most two items");

template <typename T>
struct alignas(kVec * sizeof(T)) Vec4 {
  T v[kVec];
};

template <typename T>
bool aligned_for_vec(const void* ptr) {
  return reinterpret_cast<std::uintptr_t>(ptr) % (kVec * sizeof(T)) == 0;
}

template <typename scalar_t, typename acc_t, bool kChannelsLast>
__device__ __forceinline__ acc_t grey_at(const scalar_t* image, int64_t plane, int64_t offset,
                                         const GreyCoefs<acc_t>& coefs) {
  if (kChannelsLast) {
    const scalar_t* px = image + offset * 3;
    return grey_value<acc_t>(coefs, static_cast<acc_t>(px[0]), static_cast<acc_t>(px[1]), static_cast<acc_t>(px[2]));
  }
  return grey_value<acc_t>(coefs, static_cast<acc_t>(image[offset]), static_cast<acc_t>(image[plane + offset]),
                           static_cast<acc_t>(image[2 * plane + offset]));
}

// Item < kInteriorItems: four interior pixels (shared row ry, columns 1 + cx .. 4 + cx); else one halo pixel
// (column 0 or kTileW + 1 of shared row ry) in grey[0]. Pixels outside the image are grey 0 (zero padding).
template <typename scalar_t, typename acc_t, bool kChannelsLast>
__device__ __forceinline__ void load_item(int item, const scalar_t* image, int64_t plane, int H, int W, int x0,
                                          int y0, const GreyCoefs<acc_t>& coefs, bool vec_in, acc_t grey[kVec]) {
#pragma unroll
  for (int j = 0; j < kVec; ++j) grey[j] = acc_t(0);
  if (item < kInteriorItems) {
    const int y = y0 - 1 + item / kThreadsX;
    const int x = x0 + (item % kThreadsX) * kVec;
    if (y < 0 || y >= H) return;
    const int64_t offset = static_cast<int64_t>(y) * W + x;
    if (!kChannelsLast && vec_in && x + kVec <= W) {
      const Vec4<scalar_t> r = *reinterpret_cast<const Vec4<scalar_t>*>(image + offset);
      const Vec4<scalar_t> g = *reinterpret_cast<const Vec4<scalar_t>*>(image + plane + offset);
      const Vec4<scalar_t> b = *reinterpret_cast<const Vec4<scalar_t>*>(image + 2 * plane + offset);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        grey[j] = grey_value<acc_t>(coefs, static_cast<acc_t>(r.v[j]), static_cast<acc_t>(g.v[j]),
                                    static_cast<acc_t>(b.v[j]));
      }
      return;
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (x + j < W) grey[j] = grey_at<scalar_t, acc_t, kChannelsLast>(image, plane, offset + j, coefs);
    }
    return;
  }
  const int halo = item - kInteriorItems;
  const int y = y0 - 1 + halo / 2;
  const int x = (halo & 1) ? x0 + kTileW : x0 - 1;
  if (y >= 0 && y < H && x >= 0 && x < W) {
    grey[0] = grey_at<scalar_t, acc_t, kChannelsLast>(image, plane, static_cast<int64_t>(y) * W + x, coefs);
  }
}

template <typename acc_t>
__device__ __forceinline__ void store_item(int item, const acc_t grey[kVec], acc_t* tile) {
  if (item < kInteriorItems) {
    acc_t* dst = tile + (item / kThreadsX) * kSharedStride + 1 + (item % kThreadsX) * kVec;
#pragma unroll
    for (int j = 0; j < kVec; ++j) dst[j] = grey[j];
    return;
  }
  const int halo = item - kInteriorItems;
  tile[(halo / 2) * kSharedStride + ((halo & 1) ? kTileW + 1 : 0)] = grey[0];
}

template <typename scalar_t, typename out_t, typename acc_t, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads)
sobel_normalize_kernel(const scalar_t* __restrict__ in, out_t* __restrict__ out, int64_t B, int H, int W,
                       GreyCoefs<acc_t> coefs, bool vec_in, bool vec_out) {
  __shared__ acc_t tile[kSharedRows * kSharedStride];
  const int tid = threadIdx.x;
  const int x0 = blockIdx.x * kTileW;
  const int tiles_y = (H + kTileH - 1) / kTileH;
  const int64_t plane = static_cast<int64_t>(H) * W;
  const int item_a = tid, item_b = tid + kThreads;

  for (int64_t n = blockIdx.z; n < B; n += gridDim.z) {     // uniform per block: the barriers are safe
    for (int tile_y = blockIdx.y; tile_y < tiles_y; tile_y += gridDim.y) {
      const int y0 = tile_y * kTileH;
      const scalar_t* image = in + n * 3 * plane;
      out_t* result = out + n * 2 * plane;
      acc_t grey_a[kVec], grey_b[kVec];
      load_item<scalar_t, acc_t, kChannelsLast>(item_a, image, plane, H, W, x0, y0, coefs, vec_in, grey_a);
      if (item_b < kItems) {
        load_item<scalar_t, acc_t, kChannelsLast>(item_b, image, plane, H, W, x0, y0, coefs, vec_in, grey_b);
      }
      store_item<acc_t>(item_a, grey_a, tile);
      if (item_b < kItems) store_item<acc_t>(item_b, grey_b, tile);
      __syncthreads();

      const int ty = tid / kThreadsX;
      const int cx = (tid % kThreadsX) * kVec;
      const int y = y0 + ty;
      const int x = x0 + cx;
      if (y < H && x < W) {
        const acc_t* top = tile + ty * kSharedStride + cx;  // column cx is the left neighbour of pixel x
        const acc_t* mid = top + kSharedStride;
        const acc_t* bot = mid + kSharedStride;
        acc_t gx[kVec], gy[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          sobel_3x3<acc_t>(top[j], top[j + 1], top[j + 2], mid[j], mid[j + 2], bot[j], bot[j + 1], bot[j + 2], &gx[j],
                           &gy[j]);
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
      __syncthreads();  // the tile is reused for the next tile or image of this block
    }
  }
}

// Launch geometry, shared with the checks: x tiles in gridDim.x (W < 2^30 gives < 2^25 tiles), y tiles
// strided over at most 65535 blocks, images over at most 65535.
dim3 sobel_grid(int64_t B, int H, int W) {
  const int64_t tiles_y = (static_cast<int64_t>(H) + kTileH - 1) / kTileH;
  return dim3(static_cast<unsigned>((W + kTileW - 1) / kTileW),
              static_cast<unsigned>(std::min<int64_t>(tiles_y, kMaxGridY)),
              static_cast<unsigned>(std::min<int64_t>(B, 65535)));
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
  const dim3 grid = sobel_grid(B, H, W);
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
