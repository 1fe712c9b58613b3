// CPU kernels of kmeans_assign_bf16 and kmeans_assign_bounds_bf16: kmeans_assign's labels (and, for the second,
// kmeans_assign_bounds's Yinyang bounds) from a bfloat16 GEMM that only screens the centroids.
//
// kmeans_assign_bf16(x, x_bf16, centroids, x_sq_norms) -> (labels, distances)
//   The labels kmeans_assign(x, centroids) returns, exactly, and the squared distances (float32, from the
//   winner's float64 score). x_bf16 is x rounded to bfloat16 by the caller (once per k-means run); the centroids
//   are rounded here. Each thread multiplies its own blocks of 256 points by all centroids with MKL's
//   cblas_gemm_bf16bf16f32 (bfloat16 inputs, float32 products and sums; on AMX tiles where the CPU has them, 5x
//   the float32 GEMM's rate on an Intel Xeon) or, on CPUs with AVX512-BF16 and no AMX, pydc's own
//   (gemm_bf16_avx512.cpp; bf16_gemm() in blas_gemm.h says which), folds each row of approximate scores
//   ||c_j||^2 - 2 a_ij to its best two (the kmeans_assign fold) and settles it in float64 among the centroids
//   whose approximate score is within twice the row's error bound E_i of the best (kmeans_settle_near_best).
//
// Exactness. With x~ = bf16(x), c~ = bf16(c), x . c - x~ . c~ = (x - x~) . c + x~ . (c - c~), so a GEMM result a
// of x~ . c~ (float32 products of bfloat16 values are exact; d float32 additions in any order: gamma_d) obeys
//     |a - x . c| <= ||x - x~|| ||c|| + ||x~|| ||c - c~|| + gamma_d ||x~|| ||c~|| + denormal flushes,
// where the norms of the rounding errors are measured (float64, per point and per centroid), not assumed.
// AMX and AVX512-BF16 treat bfloat16 denormals as 0 and flush denormal results: each such event moves a sum by
// less than 2^-126 max(1, |other factor|), bounded by 2^-126 (sqrt(d) (||x~|| + ||c~||) + 2 d). With the float32
// rounding of ||c||^2 (gamma_d) and of the score's subtraction (u), E_i bounds |score~ - exact score| for every
// centroid of row i (the largest centroid's norms, 1% slack). Any centroid whose approximate score exceeds the
// best by more than 2 E_i is then exactly farther than the approximate winner by at least 2% of E_i, far above
// float64 rounding, so the fixed-order float64 arg-min over the remaining candidates (ties to the lowest index)
// is kmeans_settle_row's winner, which is kmeans_assign's label (kmeans_cpu.h). Non-finite points or centroids,
// and norms whose float32 scores could overflow (||c||^2 or ||x|| ||c|| >= 1e37), are refused: kmeans_assign's
// float32 scores are not a ranking there.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/checks.h"
#include "common/kmeans_math.h"
#include "ops/cpu/cpu_kernels.h"
#include "ops/cpu/kmeans_cpu.h"

namespace pydc {

namespace {

constexpr const char* kBf16 = "pydc::kmeans_assign_bf16";
constexpr const char* kBoundsBf16 = "pydc::kmeans_assign_bounds_bf16";
constexpr double kUnitRoundoff = 5.9604644775390625e-08;  // 2^-24
constexpr double kSlack = 1.01;
constexpr double kRoundUp = 1.0 + 1e-12;  // float64 norms of float32 data: relative error far below 1e-12
constexpr double kFlushed = 1.1754943508222875e-38;  // 2^-126, the smallest normal float32 and bfloat16
constexpr double kScoreLimit = 1e37;  // ||c||^2 and ||x|| ||c|| below this: float32 scores stay finite (max ~3.4e38)

// MKL's bfloat16 GEMM (cblas_gemm_bf16bf16f32), looked up in the libtorch_cpu that torch's MKL is linked
// into; null where torch was built without MKL (no such BLAS on that machine).
using GemmBf16Fn = void (*)(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // CBLAS_LAYOUT, CBLAS_TRANSPOSE

GemmBf16Fn mkl_gemm_bf16() {
  static const GemmBf16Fn fn = reinterpret_cast<GemmBf16Fn>(torch_blas_symbol("cblas_gemm_bf16bf16f32"));
  return fn;
}

// ||b||, ||a - b|| of a float32 row a and its bfloat16 rounding b, in float64, rounded up.
void rounding_norms(const CpuKernels& kernels, const float* a, const at::BFloat16* b, int64_t d, double* norm_b,
                    double* error) {
  double sq[2];
  kernels.bf16_rounding_sq_norms(a, reinterpret_cast<const uint16_t*>(b), d, sq);
  *norm_b = std::sqrt(sq[0]) * kRoundUp;
  *error = std::sqrt(sq[1]) * kRoundUp;
}

// What every screened pass needs: the inputs, the centroids rounded to bfloat16 and the largest of their norms.
struct Screen {
  at::Tensor x, xb, centroids, norms, cb;
  at::Tensor packed;  // cb packed for pydc's GEMM (pack_bf16_panels), when it runs; undefined for MKL's
  KMeansCentroidInfo info;
  double max_c = 0.0, max_cb = 0.0, max_ce = 0.0;  // largest ||c||, ||c~||, ||c - c~||
  GemmBf16Fn gemm = nullptr;  // MKL's, when it runs
};

std::atomic<int> g_bf16_gemm{static_cast<int>(Bf16Gemm::kAuto)};

Screen prepare_screen(const char* op, const at::Tensor& x, const at::Tensor& x_bf16, const at::Tensor& centroids,
                      const at::Tensor& norms) {
  check_points_and_centroids(op, x, centroids, norms);
  PYDC_CHECK_DTYPE(op, "x_bf16", x_bf16, at::kBFloat16);
  TORCH_CHECK(x_bf16.sizes() == x.sizes(), op, ": expected x_bf16 of the shape of x ", x.sizes(), ", got ",
              describe(x_bf16));
  Screen screen;
  const Bf16Gemm which = bf16_gemm();
  TORCH_CHECK(which != Bf16Gemm::kNone, op, ": needs MKL's cblas_gemm_bf16bf16f32 (torch built with MKL) or a "
              "CPU with AVX512-BF16; use kmeans_assign");
  if (which == Bf16Gemm::kMkl) screen.gemm = mkl_gemm_bf16();
  const int64_t k = centroids.size(0), d = x.size(1);
  TORCH_CHECK(d <= std::numeric_limits<int>::max() && k <= std::numeric_limits<int>::max(), op,
              ": expected d and k below 2^31 (the BLAS's int sizes), got d = ", d, ", k = ", k);
  screen.x = x.contiguous();
  screen.xb = x_bf16.contiguous();
  screen.centroids = centroids.contiguous();
  screen.norms = norms.contiguous();
  screen.cb = screen.centroids.to(at::kBFloat16);
  if (which == Bf16Gemm::kPydc) {
    screen.packed = at::empty({bf16_packed_size(k, d)}, screen.x.options().dtype(at::kInt));
    pack_bf16_panels(reinterpret_cast<const uint16_t*>(screen.cb.const_data_ptr<at::BFloat16>()), k, d,
                     reinterpret_cast<uint32_t*>(screen.packed.mutable_data_ptr<int32_t>()));
  }
  screen.info = kmeans_centroid_info(screen.centroids);
  const float* cs = screen.centroids.const_data_ptr<float>();
  const at::BFloat16* cbs = screen.cb.const_data_ptr<at::BFloat16>();
  for (int64_t j = 0; j < k; ++j) {
    double norm_b, error;
    rounding_norms(cpu_kernels(), cs + j * d, cbs + j * d, d, &norm_b, &error);
    const double norm = std::sqrt(screen.info.sq_norms_f64[j]) * kRoundUp;
    TORCH_CHECK(std::isfinite(norm) && std::isfinite(norm_b), op, ": expected finite centroids, got centroid ", j,
                " with norm ", norm, " (use kmeans_assign)");
    screen.max_c = std::max(screen.max_c, norm);
    screen.max_cb = std::max(screen.max_cb, norm_b);
    screen.max_ce = std::max(screen.max_ce, error);
  }
  TORCH_CHECK(screen.max_c * screen.max_c < kScoreLimit, op, ": expected centroids whose float32 scores cannot "
              "overflow, got a centroid norm of ", screen.max_c, " (use kmeans_assign)");
  return screen;
}

// Calls row_fn(i, row, position, exact, score_error) for every point, on the thread that screened it: its
// approximate products a_ij (k floats, kmeans_score(cn[j], row[j]) within score_error of the exact score), the
// winner's position (ties by ids[j], or by position for nullptr) and its float64 score.
template <typename RowFn>
void for_screened_rows(const char* op, const Screen& s, const int64_t* ids, RowFn row_fn) {
  const int64_t n = s.x.size(0), k = s.centroids.size(0), d = s.x.size(1);
  const double gamma = kmeans_gamma(d);
  const double sqrt_d = std::sqrt(static_cast<double>(d));
  const float* xs = s.x.const_data_ptr<float>();
  const float* cs = s.centroids.const_data_ptr<float>();
  const at::BFloat16* xbs = s.xb.const_data_ptr<at::BFloat16>();
  const at::BFloat16* cbs = s.cb.const_data_ptr<at::BFloat16>();
  const float* cn = s.info.sq_norms.const_data_ptr<float>();
  const CpuKernels& kernels = cpu_kernels();
  std::atomic<int64_t> bad_row{-1};
  const int64_t block = kmeans_thread_block_rows(n);
  at::parallel_for(0, (n + block - 1) / block, 1, [&](int64_t b_begin, int64_t b_end) {
    std::vector<float> buffer(block * k);
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t i0 = b * block, rows = std::min(block, n - i0);
      const uint16_t* block_bits = reinterpret_cast<const uint16_t*>(xbs + i0 * d);
      if (s.gemm != nullptr) {
        s.gemm(kRowMajor, kNoTrans, kTrans, static_cast<int>(rows), static_cast<int>(k), static_cast<int>(d), 1.0f,
               block_bits, static_cast<int>(d), reinterpret_cast<const uint16_t*>(cbs), static_cast<int>(d), 0.0f,
               buffer.data(), static_cast<int>(k));
      } else {
        gemm_bf16_packed(block_bits, d, rows, reinterpret_cast<const uint32_t*>(s.packed.const_data_ptr<int32_t>()),
                         k, d, buffer.data(), k);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        double norm_xb, error_x;
        rounding_norms(kernels, xs + i * d, xbs + i * d, d, &norm_xb, &error_x);
        // |a - x . c| for every centroid, then the score's: 2 |a - x . c| + the rounding of ||c||^2 (gamma_d)
        // and of ||c||^2 - 2 a (u, on at most ||c||^2 + 2 |a|)
        const double dot_error = error_x * s.max_c + norm_xb * s.max_ce + gamma * norm_xb * s.max_cb +
                                 kFlushed * (sqrt_d * (norm_xb + s.max_cb) + 2.0 * static_cast<double>(d));
        const double score_error =
            kSlack * (2.0 * dot_error + gamma * s.max_c * s.max_c +
                      kUnitRoundoff * (s.max_c * s.max_c + 2.0 * (1.0 + gamma) * norm_xb * s.max_cb)) * kRoundUp;
        if (!std::isfinite(score_error) || !(norm_xb * s.max_cb < kScoreLimit)) {
          bad_row.store(i);
          continue;
        }
        const float* row = buffer.data() + r * k;
        float best = kKMeansInf, second = kKMeansInf;
        int64_t position = 0;
        kernels.fold_row_top2(row, cn, k, 0, &best, &position, &second);
        double exact;
        const double margin = 2.0 * score_error;
        if (static_cast<double>(second) - static_cast<double>(best) > margin) {
          // one candidate: the winner, whose float64 score gives the distance
          exact = s.info.sq_norms_f64[position] - 2.0 * kernels.dot_f64(xs + i * d, cs + position * d, d);
        } else {
          position = kmeans_settle_near_best(xs + i * d, cs, s.info.sq_norms_f64.data(), ids, d, best, margin,
                                             &exact, [&](auto fn) {
                                               for (int64_t j = 0; j < k; ++j) fn(j, kmeans_score(cn[j], row[j]));
                                             });
        }
        row_fn(i, row, position, exact, score_error);
      }
    }
  });
  TORCH_CHECK(bad_row.load() < 0, op, ": expected finite points whose float32 scores cannot overflow, got row ",
              bad_row.load(), " (use kmeans_assign)");
}

std::tuple<at::Tensor, at::Tensor> kmeans_assign_bf16_cpu(const at::Tensor& x, const at::Tensor& x_bf16,
                                                         const at::Tensor& centroids, const at::Tensor& norms) {
  const Screen screen = prepare_screen(kBf16, x, x_bf16, centroids, norms);
  const int64_t n = x.size(0);
  at::Tensor labels = at::empty({n}, screen.x.options().dtype(at::kLong));
  at::Tensor distances = at::empty({n}, screen.x.options());
  int64_t* label = labels.mutable_data_ptr<int64_t>();
  float* distance = distances.mutable_data_ptr<float>();
  const float* pn = screen.norms.const_data_ptr<float>();
  for_screened_rows(kBf16, screen, nullptr, [&](int64_t i, const float*, int64_t position, double exact, double) {
    label[i] = position;
    distance[i] = kmeans_distance(pn[i], static_cast<float>(exact));
  });
  return {labels, distances};
}

// kmeans_assign_bounds (kmeans_bounded_kernel.cpp) with the screen: the same labels and distances, upper from the
// winner's float64 score, group_lower from each group's smallest approximate score less the row's error bound
// (every exact score of the group is at least that).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kmeans_assign_bounds_bf16_cpu(
    const at::Tensor& x, const at::Tensor& x_bf16, const at::Tensor& centroids, const at::Tensor& ids_in,
    const at::Tensor& offsets_in, const at::Tensor& norms) {
  const int64_t groups = check_grouped_centroids(kBoundsBf16, x, centroids, ids_in, offsets_in, norms);
  const Screen screen = prepare_screen(kBoundsBf16, x, x_bf16, centroids, norms);
  const int64_t n = x.size(0), d = x.size(1);
  const at::Tensor ids_t = ids_in.contiguous(), offsets_t = offsets_in.contiguous();
  const int64_t* ids = ids_t.const_data_ptr<int64_t>();
  const int64_t* offsets = offsets_t.const_data_ptr<int64_t>();
  at::Tensor labels = at::empty({n}, screen.x.options().dtype(at::kLong));
  at::Tensor distances = at::empty({n}, screen.x.options());
  at::Tensor upper = at::empty({n}, screen.x.options().dtype(at::kDouble));
  at::Tensor group_lower = at::empty({n, groups}, screen.x.options().dtype(at::kDouble));
  int64_t* label = labels.mutable_data_ptr<int64_t>();
  float* distance = distances.mutable_data_ptr<float>();
  double* upper_out = upper.mutable_data_ptr<double>();
  double* lower_out = group_lower.mutable_data_ptr<double>();
  const float* pn = screen.norms.const_data_ptr<float>();
  const float* cn = screen.info.sq_norms.const_data_ptr<float>();
  const CpuKernels& kernels = cpu_kernels();
  const double norm_rounding = kmeans_norm_rounding(d);
  for_screened_rows(kBoundsBf16, screen, ids, [&](int64_t i, const float* row, int64_t position, double exact,
                                                   double score_error) {
    thread_local std::vector<float> group_min;
    group_min.resize(groups);
    label[i] = ids[position];
    distance[i] = kmeans_distance(pn[i], static_cast<float>(exact));
    const double point_sq = static_cast<double>(pn[i]);
    // the float64 score errs by far less than 1e-12 of ||x||^2 + ||c||^2
    const double upper_sq = point_sq * (1.0 + norm_rounding) + exact +
                            1e-12 * (point_sq + screen.max_c * screen.max_c);
    upper_out[i] = std::sqrt(std::max(0.0, upper_sq));
    kernels.group_min_scores(row, cn, offsets, groups, position, group_min.data());
    double* lower_row = lower_out + i * groups;
    for (int64_t g = 0; g < groups; ++g) {
      lower_row[g] = kmeans_group_lower_bound(point_sq, norm_rounding, group_min[g], score_error);
    }
  });
  return {labels, distances, upper, group_lower};
}

}  // namespace

void set_bf16_gemm(Bf16Gemm which) {
  TORCH_CHECK(which != Bf16Gemm::kNone, "pydc::set_bf16_gemm: expected auto, mkl or pydc");
  TORCH_CHECK(which != Bf16Gemm::kMkl || mkl_gemm_bf16() != nullptr,
              "pydc::set_bf16_gemm: MKL's cblas_gemm_bf16bf16f32 is not in torch's libraries here");
  TORCH_CHECK(which != Bf16Gemm::kPydc || cpu_has_avx512_bf16(),
              "pydc::set_bf16_gemm: pydc's bfloat16 GEMM needs a CPU with AVX512-BF16");
  g_bf16_gemm.store(static_cast<int>(which));
}

Bf16Gemm bf16_gemm() {
  const auto which = static_cast<Bf16Gemm>(g_bf16_gemm.load());
  if (which != Bf16Gemm::kAuto) return which;
  const bool own = cpu_has_avx512_bf16() && cpu_capability() == CpuCapability::kAvx512;
  if (own && !cpu_has_amx_bf16()) return Bf16Gemm::kPydc;
  if (mkl_gemm_bf16() != nullptr) return Bf16Gemm::kMkl;
  return own ? Bf16Gemm::kPydc : Bf16Gemm::kNone;
}

bool has_bf16_gemm() { return bf16_gemm() != Bf16Gemm::kNone; }

}  // namespace pydc

TORCH_LIBRARY_IMPL(pydc, CPU, m) {
  m.impl("kmeans_assign_bf16", &pydc::kmeans_assign_bf16_cpu);
  m.impl("kmeans_assign_bounds_bf16", &pydc::kmeans_assign_bounds_bf16_cpu);
}
