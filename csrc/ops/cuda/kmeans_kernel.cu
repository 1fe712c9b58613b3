// CUDA kernels of the k-means ops.
//
// kmeans_assign: points are taken in chunks whose dot products with (a block of) the centroids fit a
// workspace of half the device's L2 cache (25 MB on an H100, 50 MB L2): cuBLAS fills the workspace
// (x_chunk . c^T) and one warp per point scans its row for the kCandidates best scores ||c||^2 - 2 x.c,
// keeping them across centroid blocks. The scan reads what the GEMM has just written while it is still in
// L2, so the N x k dot products never travel through HBM (a 512 MiB workspace sent ~100 GB per iteration
// there at N = 1.28M, k = 10^4). With
// allow_tf32 the product runs on TF32 tensor cores (10-bit mantissa inputs), which only ranks the
// candidates: a last pass re-scores the kCandidates best of every point in fp32 from x and the centroids
// and picks the winner (lowest index on ties), so labels and distances are fp32 results unless the true
// nearest centroid fell outside the TF32 top kCandidates. allow_tf32=False runs the product in fp32 whatever
// torch's global TF32 flag says: torch's getCurrentCUDABlasHandle() puts the shared handle in
// CUBLAS_TF32_TENSOR_OP_MATH when that flag is on ("allow accelerating single precision routines using TF32
// tensor cores", cublas_api.h), which lets a CUBLAS_COMPUTE_32F GEMM run in TF32; under at::NoTF32Guard
// it sets CUBLAS_DEFAULT_MATH instead.
//
// kmeans_update: the atomic mode adds every point's row into its cluster's sum with atomicAdd (fast, order
// of float additions not fixed). The deterministic mode sorts the points by label (stable) and one block
// per cluster sums its members' rows in a fixed order in float64: bitwise reproducible run to run.
// Labels outside [0, k) are skipped on the GPU (checking them would need a device-to-host sync).
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/isnan.h>
#include <ATen/ops/max.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/where.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/sub.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <vector>

#include "common/kmeans_math.h"
#include "common/kmeans_yinyang_pass.h"
#include "ops/kmeans.h"

namespace pydc {
namespace {

constexpr int kCandidates = 4;                          // TF32 candidates re-scored in fp32 per point
constexpr int64_t kMinWorkspaceFloats = int64_t(1) << 20;  // 4 MiB: floor for devices with a small L2
constexpr int64_t kMaxCentroidBlock = int64_t(1) << 16; // centroids per cuBLAS call
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Tests shrink the workspace and the centroid block through these variables, to run the multi-chunk and
// multi-block paths on small inputs.
int64_t env_or(const char* name, int64_t fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr) return fallback;
  const long long parsed = std::atoll(value);
  return parsed > 0 ? static_cast<int64_t>(parsed) : fallback;
}

int64_t blocks_for(int64_t items, int64_t per_block) {
  return std::max<int64_t>(1, std::min<int64_t>((items + per_block - 1) / per_block, int64_t(1) << 20));
}

__device__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(kFullMask, v, offset);
  return __shfl_sync(kFullMask, v, 0);
}

// Squared norm of every row, one warp per row (lanes stride the features, then a fixed-order tree).
__global__ void __launch_bounds__(kThreads)
squared_norms_kernel(const float* __restrict__ rows, int64_t n, int64_t d, float* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5); r < n; r += warps) {
    const float* row = rows + r * d;
    float sum = 0.0f;
    for (int64_t t = lane; t < d; t += 32) sum += row[t] * row[t];
    sum = warp_sum(sum);
    if (lane == 0) out[r] = sum;
  }
}

// One warp per point row of the dot-product chunk: the kCandidates best scores of centroids j0 .. j0 + cols,
// merged with the candidates of earlier centroid blocks when j0 > 0.
__global__ void __launch_bounds__(kThreads)
candidates_kernel(const float* __restrict__ dots, int64_t rows, int64_t cols, const float* __restrict__ centroid_sq_norms,
                  int64_t j0, float* __restrict__ cand_score, int64_t* __restrict__ cand_index) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5); r < rows; r += warps) {
    KMeansTopK<kCandidates> best;
    best.reset();
    const float* row = dots + r * cols;
    for (int64_t j = lane; j < cols; j += 32) best.insert(kmeans_score(centroid_sq_norms[j], row[j]), j0 + j);
    if (j0 > 0 && lane == 0) {
      for (int c = 0; c < kCandidates; ++c) best.insert(cand_score[r * kCandidates + c], cand_index[r * kCandidates + c]);
    }
    // Butterfly merge: every lane ends with the best kCandidates of the whole warp (a total order, so the
    // result does not depend on the merge order).
    for (int offset = 16; offset > 0; offset >>= 1) {
      float other_score[kCandidates];
      int64_t other_index[kCandidates];
#pragma unroll
      for (int c = 0; c < kCandidates; ++c) {
        other_score[c] = __shfl_xor_sync(kFullMask, best.score[c], offset);
        other_index[c] = __shfl_xor_sync(kFullMask, best.index[c], offset);
      }
#pragma unroll
      for (int c = 0; c < kCandidates; ++c) best.insert(other_score[c], other_index[c]);
    }
    if (lane == 0) {
#pragma unroll
      for (int c = 0; c < kCandidates; ++c) {
        cand_score[r * kCandidates + c] = best.score[c];
        cand_index[r * kCandidates + c] = best.index[c];
      }
    }
  }
}

// One warp per point: fp32 scores of its candidates from x and the centroids, the best one wins.
__global__ void __launch_bounds__(kThreads)
rescore_kernel(const float* __restrict__ x, const float* __restrict__ centroids, int64_t n, int64_t d,
               const float* __restrict__ point_sq_norms, const float* __restrict__ centroid_sq_norms,
               const int64_t* __restrict__ cand_index, int64_t* __restrict__ labels, float* __restrict__ distances) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5); r < n; r += warps) {
    const float* point = x + r * d;
    float best_score = kKMeansInf;
    int64_t best_index = 0;
    for (int c = 0; c < kCandidates; ++c) {
      const int64_t j = cand_index[r * kCandidates + c];
      const float* centroid = centroids + j * d;
      float dot = 0.0f;
      for (int64_t t = lane; t < d; t += 32) dot += point[t] * centroid[t];
      dot = warp_sum(dot);
      const float score = kmeans_score(centroid_sq_norms[j], dot);
      if (kmeans_prefer(score, j, best_score, best_index)) {
        best_score = score;
        best_index = j;
      }
    }
    if (lane == 0) {
      labels[r] = best_index;
      distances[r] = kmeans_distance(point_sq_norms[r], best_score);
    }
  }
}

at::Tensor squared_norms(const at::Tensor& rows, cudaStream_t stream) {
  at::Tensor norms = at::empty({rows.size(0)}, rows.options());
  if (rows.size(0) == 0) return norms;
  squared_norms_kernel<<<blocks_for(rows.size(0), kWarpsPerBlock), kThreads, 0, stream>>>(
      rows.const_data_ptr<float>(), rows.size(0), rows.size(1), norms.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return norms;
}

// dots (rows x cols, row-major) = points (rows x d) . centroids (cols x d)^T. cuBLAS is column-major: the
// row-major dots are the column-major cols x rows matrix centroids . points^T.
// Dot products per workspace: half the L2 cache, so that the GEMM's output is still there when the
// candidates kernel reads it (the other half holds the centroid block and the chunk of points).
int64_t workspace_floats() {
  const int64_t l2_bytes = at::cuda::getCurrentDeviceProperties()->l2CacheSize;
  return std::max<int64_t>(kMinWorkspaceFloats, l2_bytes / 2 / static_cast<int64_t>(sizeof(float)));
}

void chunk_dots(const float* points, const float* centroids, float* dots, int64_t rows, int64_t cols, int64_t d,
                bool allow_tf32) {
  // The guard must be alive when the handle is fetched: that is when torch sets the handle's math mode.
  std::optional<at::NoTF32Guard> full_fp32;
  if (!allow_tf32) full_fp32.emplace();
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // bound to the current stream
  const float alpha = 1.0f, beta = 0.0f;
  const cublasComputeType_t compute = allow_tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(cols), static_cast<int>(rows),
                                    static_cast<int>(d), &alpha, centroids, CUDA_R_32F, static_cast<int>(d), points,
                                    CUDA_R_32F, static_cast<int>(d), &beta, dots, CUDA_R_32F, static_cast<int>(cols),
                                    compute, CUBLAS_GEMM_DEFAULT));
}

std::tuple<at::Tensor, at::Tensor> kmeans_assign_cuda(const at::Tensor& x, const at::Tensor& centroids,
                                                      const std::optional<at::Tensor>& x_sq_norms, bool allow_tf32) {
  const c10::cuda::CUDAGuard guard(x.device());
  KMeansAssignPlan plan = plan_kmeans_assign(x, centroids, x_sq_norms);
  const int64_t n = plan.x.size(0), k = plan.centroids.size(0), d = plan.x.size(1);
  if (n == 0) return {plan.labels, plan.distances};
  TORCH_CHECK(d < (int64_t(1) << 31), "pydc::kmeans_assign: expected fewer than 2^31 features on CUDA, got ", d);
  auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor point_norms = plan.x_sq_norms.defined() ? plan.x_sq_norms : squared_norms(plan.x, stream);
  const at::Tensor centroid_norms = squared_norms(plan.centroids, stream);

  const int64_t block_cols = std::min(k, env_or("PYDC_KMEANS_CUDA_BLOCK_COLS", kMaxCentroidBlock));
  const int64_t chunk_rows =
      std::max<int64_t>(1, std::min(n, env_or("PYDC_KMEANS_CUDA_WORKSPACE_FLOATS", workspace_floats()) / block_cols));
  at::Tensor workspace = at::empty({chunk_rows, block_cols}, plan.x.options());
  at::Tensor cand_score = at::empty({n, kCandidates}, plan.x.options());
  at::Tensor cand_index = at::empty({n, kCandidates}, plan.labels.options());
  const float* xs = plan.x.const_data_ptr<float>();
  const float* cs = plan.centroids.const_data_ptr<float>();
  const float* cn = centroid_norms.const_data_ptr<float>();
  float* dots = workspace.mutable_data_ptr<float>();
  float* scores = cand_score.mutable_data_ptr<float>();
  int64_t* indices = cand_index.mutable_data_ptr<int64_t>();

  for (int64_t i0 = 0; i0 < n; i0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, n - i0);
    for (int64_t j0 = 0; j0 < k; j0 += block_cols) {
      const int64_t cols = std::min(block_cols, k - j0);
      chunk_dots(xs + i0 * d, cs + j0 * d, dots, rows, cols, d, allow_tf32);
      candidates_kernel<<<blocks_for(rows, kWarpsPerBlock), kThreads, 0, stream>>>(
          dots, rows, cols, cn + j0, j0, scores + i0 * kCandidates, indices + i0 * kCandidates);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  rescore_kernel<<<blocks_for(n, kWarpsPerBlock), kThreads, 0, stream>>>(
      xs, cs, n, d, point_norms.const_data_ptr<float>(), cn, indices, plan.labels.mutable_data_ptr<int64_t>(),
      plan.distances.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {plan.labels, plan.distances};
}

// Atomic mode: one thread per element of x; the first feature's thread also counts the point.
__global__ void update_atomic_kernel(const float* __restrict__ x, const int64_t* __restrict__ labels, int64_t n,
                                     int64_t d, int64_t k, float* __restrict__ sums,
                                     unsigned long long* __restrict__ counts) {
  const int64_t total = n * d;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t i = e / d;
    const int64_t t = e - i * d;
    const int64_t label = labels[i];
    if (label < 0 || label >= k) continue;
    atomicAdd(sums + label * d + t, x[e]);
    if (t == 0) atomicAdd(counts + label, 1ull);
  }
}

// Deterministic mode: one block per cluster; threadIdx.x walks 32 features, threadIdx.y takes every 8th
// member (in sorted order), and the 8 partial float64 sums are added in a fixed order.
constexpr int kMemberLanes = 8;

__global__ void __launch_bounds__(32 * kMemberLanes)
update_sorted_kernel(const float* __restrict__ x, const int64_t* __restrict__ order, const int64_t* __restrict__ starts,
                     const int64_t* __restrict__ ends, int64_t k, int64_t d, float* __restrict__ sums) {
  __shared__ double partial[kMemberLanes][32];
  for (int64_t c = blockIdx.x; c < k; c += gridDim.x) {
    const int64_t begin = starts[c], end = ends[c];
    if (begin >= end) continue;  // uniform across the block: no thread reaches the barriers below
    for (int64_t t0 = 0; t0 < d; t0 += 32) {
      const int64_t t = t0 + threadIdx.x;
      double acc = 0.0;
      if (t < d) {
        for (int64_t m = begin + threadIdx.y; m < end; m += kMemberLanes) acc += static_cast<double>(x[order[m] * d + t]);
      }
      partial[threadIdx.y][threadIdx.x] = acc;
      __syncthreads();
      if (threadIdx.y == 0 && t < d) {
        double total = 0.0;
        for (int y = 0; y < kMemberLanes; ++y) total += partial[y][threadIdx.x];
        sums[c * d + t] = static_cast<float>(total);
      }
      __syncthreads();
    }
  }
}

std::tuple<at::Tensor, at::Tensor> kmeans_update_cuda(const at::Tensor& x, const at::Tensor& labels, int64_t k,
                                                      bool deterministic, const std::optional<at::Tensor>& clusters) {
  const c10::cuda::CUDAGuard guard(x.device());
  KMeansUpdatePlan plan = plan_kmeans_update(x, labels, k, clusters);
  // every cluster is summed; the ones not flagged are zeroed after (the CPU kernel skips them)
  const auto unflagged_to_zero = [&] {
    if (plan.clusters.defined()) plan.sums.masked_fill_(plan.clusters.logical_not().unsqueeze(1), 0.0);
  };
  const int64_t n = plan.x.size(0), d = plan.x.size(1);
  if (n == 0) return {plan.sums, plan.counts};
  auto stream = at::cuda::getCurrentCUDAStream();
  if (!deterministic) {
    static_assert(sizeof(unsigned long long) == sizeof(int64_t), "counts are 64-bit");
    update_atomic_kernel<<<blocks_for(n * d, 256), 256, 0, stream>>>(
        plan.x.const_data_ptr<float>(), plan.labels.const_data_ptr<int64_t>(), n, d, k,
        plan.sums.mutable_data_ptr<float>(), reinterpret_cast<unsigned long long*>(plan.counts.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    unflagged_to_zero();
    return {plan.sums, plan.counts};
  }
  const auto sorted = at::sort(plan.labels, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor& sorted_labels = std::get<0>(sorted);
  const at::Tensor order = std::get<1>(sorted).contiguous();
  const at::Tensor cluster_ids = at::arange(k, plan.labels.options());
  const at::Tensor starts = at::searchsorted(sorted_labels, cluster_ids, /*out_int32=*/false, /*right=*/false);
  const at::Tensor ends = at::searchsorted(sorted_labels, cluster_ids, /*out_int32=*/false, /*right=*/true);
  plan.counts.copy_(at::sub(ends, starts));
  const dim3 block(32, kMemberLanes);
  const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(k, 65535));
  update_sorted_kernel<<<grid, block, 0, stream>>>(plan.x.const_data_ptr<float>(), order.const_data_ptr<int64_t>(),
                                                    starts.const_data_ptr<int64_t>(), ends.const_data_ptr<int64_t>(), k,
                                                    d, plan.sums.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  unflagged_to_zero();
  return {plan.sums, plan.counts};
}

// --- kmeans_yinyang_pass: one warp per point runs common/kmeans_yinyang_pass.h ---

// The warp as a team (kmeans_yinyang_pass.h): butterfly merges leave every lane with the same result (the
// merges are total orders: score, then index).
struct WarpTeam {
  int lane;
  __host__ __device__ int rank() const { return lane; }
  __host__ __device__ int size() const { return 32; }
  __host__ __device__ bool leader() const { return lane == 0; }
  __host__ __device__ void sync() const {
#if defined(__CUDA_ARCH__)
    __syncwarp();
#endif
  }
  __host__ __device__ void merge(KMeansTopK<2>& top) const {
#if defined(__CUDA_ARCH__)
    for (int offset = 16; offset > 0; offset >>= 1) {
      const float s0 = __shfl_xor_sync(kFullMask, top.score[0], offset);
      const float s1 = __shfl_xor_sync(kFullMask, top.score[1], offset);
      const int64_t j0 = __shfl_xor_sync(kFullMask, top.index[0], offset);
      const int64_t j1 = __shfl_xor_sync(kFullMask, top.index[1], offset);
      top.insert(s0, j0);
      top.insert(s1, j1);
    }
#endif
  }
  __host__ __device__ void merge_settle(double& score, int64_t& position, int64_t& id) const {
#if defined(__CUDA_ARCH__)
    for (int offset = 16; offset > 0; offset >>= 1) {
      const double other = __shfl_xor_sync(kFullMask, score, offset);
      const int64_t other_position = __shfl_xor_sync(kFullMask, position, offset);
      const int64_t other_id = __shfl_xor_sync(kFullMask, id, offset);
      if (other < score || (other == score && other_id < id)) {
        score = other;
        position = other_position;
        id = other_id;
      }
    }
#endif
  }
};

// One thread per centroid: its float32 and fixed-order float64 squared norms (the float64 ones are the CPU's
// bits: kmeans_dot_f64).
__global__ void yinyang_norms_kernel(const float* __restrict__ centroids, int64_t k, int64_t d,
                                     float* __restrict__ sq_norms, double* __restrict__ sq_norms_f64) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < k; j += stride) {
    sq_norms[j] = kmeans_squared_norm(centroids + j * d, d);
    sq_norms_f64[j] = kmeans_dot_f64(centroids + j * d, centroids + j * d, d);
  }
}

// Rows p0 .. p0 + rows of the separation table (k x G) from the same rows of the centroids' float64 Gram matrix.
__global__ void yinyang_separation_kernel(int64_t p0, int64_t rows, const double* __restrict__ sq_norms_f64,
                                          const double* __restrict__ gram, const int64_t* __restrict__ group_of,
                                          int64_t k, int64_t d, int64_t groups, float* __restrict__ separation) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += stride) {
    yinyang_separation_row(p0 + r, sq_norms_f64, gram + r * k, group_of, k, d, groups,
                           separation + (p0 + r) * groups);
  }
}

// Refresh: dots holds rows row0 .. row0 + rows of x . c^T (rows x k, fp32 GEMM). Filter (dots == nullptr):
// each lane scores its centroids from the transposed centroids (d x k: lanes read consecutive addresses).
__global__ void __launch_bounds__(kThreads)
yinyang_pass_kernel(YinyangPassArgs args, int64_t row0, int64_t rows, const float* __restrict__ dots,
                    const float* __restrict__ centroids_t, unsigned long long* __restrict__ counts) {
  const WarpTeam team{static_cast<int>(threadIdx.x & 31)};
  __shared__ YinyangGroupTops warp_tops[kWarpsPerBlock];  // the leader's, one per warp (768 bytes each)
  YinyangGroupTops& tops = warp_tops[threadIdx.x >> 5];
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  unsigned long long scored_rows = 0, scores = 0;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5); r < rows; r += warps) {
    const int64_t i = row0 + r;
    YinyangPointCounts c;
    if (dots != nullptr) {
      c = yinyang_pass_point(team, args, i, true, RowScore{dots + r * args.k, args.sq_norms}, tops);
    } else {
      const DotScore score{args.x + i * args.d, centroids_t, args.sq_norms, args.d, /*t_stride=*/args.k,
                           /*j_stride=*/1};
      c = yinyang_pass_point(team, args, i, false, score, tops);
    }
    scored_rows += static_cast<unsigned long long>(c.rows);
    scores += static_cast<unsigned long long>(c.scores);
  }
  if (team.leader() && scored_rows > 0) {
    atomicAdd(counts, scored_rows);
    atomicAdd(counts + 1, scores);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kmeans_yinyang_pass_cuda(
    const at::Tensor& x_in, const at::Tensor& centroids_in, const at::Tensor& ids, const at::Tensor& offsets,
    const at::Tensor& norms, const at::Tensor& drift, bool refresh, const at::Tensor& labels,
    const at::Tensor& lower) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  YinyangPassPlan plan = plan_kmeans_yinyang_pass(x_in, centroids_in, ids, offsets, norms, drift, labels, lower);
  const int64_t n = plan.x.size(0), k = plan.centroids.size(0), d = plan.x.size(1);
  if (n == 0) return {plan.distances, plan.upper, plan.counts};
  TORCH_CHECK(d < (int64_t(1) << 31), "pydc::kmeans_yinyang_pass: expected fewer than 2^31 features on CUDA, got ",
              d);
  auto stream = at::cuda::getCurrentCUDAStream();
  const auto long_options = plan.labels.options();
  const auto upload = [&](const std::vector<int64_t>& values) {
    return at::from_blob(const_cast<int64_t*>(values.data()), {static_cast<int64_t>(values.size())},
                         at::TensorOptions().dtype(at::kLong))
        .to(long_options);
  };
  const at::Tensor ids_d = upload(plan.ids), position_d = upload(plan.position_of);
  const at::Tensor offsets_d = upload(plan.offsets), group_d = upload(plan.group_of);
  at::Tensor sq_norms = at::empty({k}, plan.x.options());
  at::Tensor sq_norms_f64 = at::empty({k}, plan.x.options().dtype(at::kDouble));
  yinyang_norms_kernel<<<blocks_for(k, 256), 256, 0, stream>>>(plan.centroids.const_data_ptr<float>(), k, d,
                                                              sq_norms.mutable_data_ptr<float>(),
                                                              sq_norms_f64.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // the largest norm on the host (one sync; NaN norms skipped, as the CPU's kmeans_centroid_info does)
  const double max_sq = std::max(0.0, at::where(at::isnan(sq_norms_f64), 0.0, sq_norms_f64).max().item<double>());

  YinyangPassArgs args = yinyang_pass_args(plan, ids_d.const_data_ptr<int64_t>(), position_d.const_data_ptr<int64_t>(),
                                           offsets_d.const_data_ptr<int64_t>(), group_d.const_data_ptr<int64_t>(),
                                           sq_norms.const_data_ptr<float>(), sq_norms_f64.const_data_ptr<double>(),
                                           max_sq);
  auto* counts = reinterpret_cast<unsigned long long*>(plan.counts.mutable_data_ptr<int64_t>());

  if (!refresh) {
    // the separation table from the float64 Gram matrix (cuBLAS DGEMM), at most 32 MiB of it at a time
    at::Tensor separation = at::empty({k, plan.groups}, plan.x.options());
    const at::Tensor c64 = plan.centroids.to(at::kDouble);
    const int64_t gram_rows = std::max<int64_t>(1, std::min(k, (int64_t(1) << 22) / k));
    for (int64_t p0 = 0; p0 < k; p0 += gram_rows) {
      const int64_t rows = std::min(gram_rows, k - p0);
      const at::Tensor gram = at::mm(c64.narrow(0, p0, rows), c64.t()).contiguous();
      yinyang_separation_kernel<<<blocks_for(rows, 128), 128, 0, stream>>>(
          p0, rows, args.sq_norms_f64, gram.const_data_ptr<double>(), args.group_of, k, d, plan.groups,
          separation.mutable_data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    args.separation = separation.const_data_ptr<float>();
    const at::Tensor centroids_t = plan.centroids.t().contiguous();
    yinyang_pass_kernel<<<blocks_for(n, kWarpsPerBlock), kThreads, 0, stream>>>(
        args, 0, n, nullptr, centroids_t.const_data_ptr<float>(), counts);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {plan.distances, plan.upper, plan.counts};
  }
  // Refresh: whole rows of fp32 dot products (no TF32: the error bound is fp32's), a chunk of points at a time
  // in an L2-sized workspace, each row folded by its warp right after the GEMM wrote it.
  const int64_t chunk_rows =
      std::max<int64_t>(1, std::min(n, env_or("PYDC_KMEANS_CUDA_WORKSPACE_FLOATS", workspace_floats()) / k));
  at::Tensor workspace = at::empty({chunk_rows, k}, plan.x.options());
  for (int64_t i0 = 0; i0 < n; i0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, n - i0);
    chunk_dots(args.x + i0 * d, args.centroids, workspace.mutable_data_ptr<float>(), rows, k, d,
               /*allow_tf32=*/false);
    yinyang_pass_kernel<<<blocks_for(rows, kWarpsPerBlock), kThreads, 0, stream>>>(
        args, i0, rows, workspace.const_data_ptr<float>(), nullptr, counts);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {plan.distances, plan.upper, plan.counts};
}

}  // namespace
}  // namespace pydc

TORCH_LIBRARY_IMPL(pydc, CUDA, m) {
  m.impl("kmeans_assign", &pydc::kmeans_assign_cuda);
  m.impl("kmeans_update", &pydc::kmeans_update_cuda);
  m.impl("kmeans_yinyang_pass", &pydc::kmeans_yinyang_pass_cuda);
}
