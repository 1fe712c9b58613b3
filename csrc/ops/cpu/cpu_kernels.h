// The CPU inner loops that are compiled once per ISA level and picked at run time (ATen's CPU_CAPABILITY
// model). The op kernels (kmeans_kernel.cpp, pca_kernel.cpp, ...) keep their threading and tensor handling
// and call these loops through cpu_kernels(), which returns the table of the level in use.
//
// cpu_kernels_impl.h holds the loops; cpu_kernels_default.cpp, cpu_kernels_avx2.cpp and
// cpu_kernels_avx512.cpp each compile it for one level (a `#pragma GCC target` over the whole translation
// unit, so no build-system flags are needed). Only raw pointers cross this interface: the per-level
// translation units include no ATen header, so no inline function or template of ATen is ever emitted with
// AVX2/AVX-512 code that another translation unit could pick at link time.
//
// Every loop but block_scores8 computes each output with the same operations in the same order at every level
// (independent lanes instead of reassociated reductions, no FMA contraction in ISO C++ mode), so results are
// bitwise the same whichever level runs; the levels differ in speed only. block_scores8 fuses multiply-adds
// where the level has FMA (see there).
#pragma once

#include <cstdint>

namespace pydc {

enum class CpuCapability : int { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

// Rows of W + 2 floats sobel_band_u8 needs as scratch: 3 grey rows, their 3 horizontal sums, one row of
// column sums, and gx / gy of one row before a channels-last output interleaves them.
constexpr int64_t kSobelScratchRows = 9;

// kmeans_assign_delta keeps, per point, a top list of its best scores ||c_j||^2 - 2 x . c_j under the kept
// products (kmeans_delta_kernel.cpp), so that a moved pass reads only the runs of the centroids whose scores
// changed. A point's list is kDeltaTopRows floats `stride` apart: rows 0 .. kDeltaTopSlots - 1 its listed
// scores in ascending order (+inf: an empty slot), the next kDeltaTopSlots rows their centroids' indices as
// floats (-1: empty), the last row the floor tau: every score not listed is >= tau (NaN: the list is not valid).
// Every listed score is <= tau, so the smallest listed score is the point's best and min(second listed, tau) a
// lower bound on its second best.
constexpr int kDeltaTopSlots = 4;
constexpr int kDeltaTopRows = 2 * kDeltaTopSlots + 1;

// Folds score v of centroid j into a point's top list: listed when it is below both the last listed score and
// tau (the last one then leaves the list, tau taking its score if lower), else tau = min(tau, v). NaN scores
// never enter (as in kmeans_assign's fold), nor does anything into a list whose tau is NaN.
inline void delta_tops_fold(float* tops, int64_t stride, float v, int32_t j) {
  float* score = tops;
  float* index = tops + kDeltaTopSlots * stride;
  float* tau = tops + 2 * kDeltaTopSlots * stride;
  const float last = score[(kDeltaTopSlots - 1) * stride];
  if (!(v < last && v < *tau)) {
    if (v < *tau) *tau = v;
    return;
  }
  if (last < *tau) *tau = last;
  int s = kDeltaTopSlots - 1;
  for (; s > 0 && v < score[(s - 1) * stride]; --s) {
    score[s * stride] = score[(s - 1) * stride];
    index[s * stride] = index[(s - 1) * stride];
  }
  score[s * stride] = v;
  index[s * stride] = static_cast<float>(j);
}

// Empties a point's top list (tau = +inf, the start of a fold over every centroid).
inline void delta_tops_clear(float* tops, int64_t stride) {
  for (int s = 0; s < kDeltaTopSlots; ++s) {
    tops[s * stride] = __builtin_inff();
    tops[(kDeltaTopSlots + s) * stride] = -1.0f;
  }
  tops[2 * kDeltaTopSlots * stride] = __builtin_inff();
}

// Takes the centroids flagged in `touched` (k of them: their scores changed) out of a point's list, keeping the
// order of the rest; a list naming no centroid in [0, k) where it lists a score is marked not valid (tau = NaN).
inline void delta_tops_remove(float* tops, int64_t stride, const uint8_t* touched, int64_t k) {
  float* score = tops;
  float* index = tops + kDeltaTopSlots * stride;
  int kept = 0;
  for (int s = 0; s < kDeltaTopSlots; ++s) {
    const float j = index[s * stride];
    if (!(score[s * stride] < __builtin_inff())) break;  // the empty tail
    if (!(j >= 0.0f && j < static_cast<float>(k))) {
      tops[2 * kDeltaTopSlots * stride] = __builtin_nanf("");
      return;
    }
    if (touched[static_cast<int64_t>(j)]) continue;
    score[kept * stride] = score[s * stride];
    index[kept * stride] = j;
    ++kept;
  }
  for (; kept < kDeltaTopSlots; ++kept) {
    score[kept * stride] = __builtin_inff();
    index[kept * stride] = -1.0f;
  }
}

struct CpuKernels {
  const char* name;
  // floats per vector register in the loops of this level (4, 8, 16): what the level's unit was compiled for
  int vector_floats;

  // --- k-means (kmeans_kernel.cpp, kmeans_bounded_kernel.cpp) ---
  // Folds the scores ||c_j||^2 - 2 dot[j] of centroids j0 .. j0 + n - 1 into a running (best score, its
  // index, second-best score) under kmeans_prefer; NaN scores never enter.
  void (*fold_row_top2)(const float* dot, const float* centroid_sq_norms, int64_t n, int64_t j0,
                        float* best_score, int64_t* best_index, float* second_score);
  // Top lists of `count` points from scratch (kmeans_assign_delta's dense pass) from their products stored by
  // centroid: dot[j * stride + r] is point r's product with centroid j (j < k); point r's list goes to tops + r
  // (rows tops_stride apart): its kDeltaTopSlots smallest scores ||c_j||^2 - 2 dot in ascending order (ties in
  // centroid order, NaN never listed), their centroids, and the next smallest score as the floor (+inf when
  // there is none). sorted: scratch of 2 (kDeltaTopSlots + 1) count floats.
  void (*fold_columns_tops)(const float* dot, int64_t stride, const float* centroid_sq_norms, int64_t k,
                            int64_t count, float* tops, int64_t tops_stride, float* sorted);
  // The moved pass of kmeans_assign_delta for `count` points (kmeans_delta_kernel.cpp): for each centroid j of
  // columns[0 .. n_columns - 1] (ascending), its products dot[j * stride + r] are first moved, when scale is not
  // null and scale[j] != 1 or start[j + 1] > start[j]: dot = dot * scale[j] + a, a being the float32 sum of
  // gain[q] * products[row[q] * count + r] over q from start[j] to start[j + 1] - 1, in that order (every product
  // and sum rounded to float32, no fused multiply-add), and stored; then each point's score ||c_j||^2 - 2 dot is
  // folded into its top list (point r's list at tops + r, rows tops_stride apart; delta_tops_fold's rule).
  void (*update_fold_column_tops)(float* dot, int64_t stride, const float* centroid_sq_norms, const int32_t* columns,
                                  int64_t n_columns, int64_t count, const float* scale, const int64_t* start,
                                  const int32_t* row, const float* gain, const float* products, float* tops,
                                  int64_t tops_stride);
  // dst[j * dst_stride + r] = src[j * src_stride + r] for j < runs and r < count, with streaming stores where
  // dst is aligned to the vector (memory written once and not read soon), fenced before return.
  void (*copy_runs_streaming)(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t runs,
                              int64_t count);
  // Smallest score ||c_j||^2 - 2 dot[j] over j in [offsets[g], offsets[g + 1]) except j == excluded, for
  // each of `groups` groups, into group_min[g] (+inf for a group with no other member).
  void (*group_min_scores)(const float* dot, const float* centroid_sq_norms, const int64_t* offsets,
                           int64_t groups, int64_t excluded, float* group_min);
  // Scores of n_rows points against n_blocks (1 or 2) consecutive transposed blocks of 8 centroids, a pair
  // interleaved by feature (block b's feature t of centroid l at blocks[(t * n_blocks + b) * 8 + l], so a
  // pair's 16 centroids at feature t are contiguous; block_sq_norms: their ||c||^2, 8 per block):
  // scores[r][8 b + l] = block_sq_norms[8 b + l] - 2 * x_r . c_{b,l}, each dot summed in feature order in
  // float32, the same for any n_rows / n_blocks; fused multiply-adds at AVX2 and AVX-512, so unlike every
  // other loop here the scores differ by float32 rounding from the default level's. The local filter of bounded
  // k-means scores a point only against the groups its bounds do not settle with this.
  void (*block_scores8)(const float* const* rows, int64_t n_rows, const float* blocks, int64_t n_blocks,
                        const float* block_sq_norms, int64_t d, float* const* scores);
  // The smallest score of every group g with need[g] != 0 into group_min[g] (others untouched), from a row
  // of block scores (block b = scores[8 b .. 8 b + 7], padding +inf; group g = blocks group_block[g] ..
  // group_block[g + 1] - 1). NaN scores never win.
  void (*group_block_minima)(const float* scores, const int64_t* group_block, const uint8_t* need, int64_t groups,
                             float* group_min);
  // Decays a point's group lower bounds by the group drifts (lower[g] = max(0, lower[g] - drift[g])) and sets
  // need[g] = 1 where the bound does not prove the group farther than the own centroid (lower[g]^2 - upper_sq
  // > margin fails), 0 elsewhere; returns whether any group is needed.
  bool (*decay_group_bounds)(double* lower, const double* drift, int64_t groups, double upper_sq, double margin,
                             uint8_t* need);
  // --- bounded k-means with per-pair bounds (kmeans_elkan_kernel.cpp; anchors: kmeans_math.h) ---
  // dots[r] = rows[r] . centroid for r < n_rows, in float32 (fused multiply-adds where the level has FMA, so
  // the dots differ by float32 rounding between levels, like block_scores8's): the pairs a bounded pass
  // scores, one centroid at a time for the points of a batch that need it.
  void (*centroid_dots)(const float* centroid, const float* const* rows, int64_t n_rows, int64_t d, float* dots);
  // The centroids j whose bound elkan_bound(anchors[j], offset_up[j]) is not above `threshold` and, when
  // `separation` is not null, whose separation[j] (a lower bound on d(c_own, c_j)) is not above
  // `separation_threshold`: their indices into candidates (ascending; the buffer must hold k + 16 entries, the
  // loop writes up to 16 past the count), their count returned. *unscored_min
  // gets the smallest lower bound of the others: the bound, or (separation[j] - upper) rounded down where
  // that is larger (+inf when every centroid is a candidate).
  int64_t (*elkan_candidates)(const float* anchors, const float* offset_up, const float* separation, int64_t k,
                              float threshold, float separation_threshold, float upper, int32_t* candidates,
                              float* unscored_min);
  // anchors[j] = elkan_anchor(elkan_lower_bound(base, kmeans_score(centroid_sq_norms[j], dot[j])),
  // offset_down[j]) for j in [begin, end); returns the smallest of those lower bounds (+inf when empty).
  float (*elkan_anchor_row)(const float* dot, const float* centroid_sq_norms, const float* offset_down, float base,
                            int64_t begin, int64_t end, float* anchors);
  // Fixed-order float64 dot product of two float32 rows (8 lanes, then a fixed pairwise sum).
  double (*dot_f64)(const float* a, const float* b, int64_t d);
  // Fixed-order float64 squared distance ||a - b||^2 of two float32 rows.
  double (*squared_distance_f64)(const float* a, const float* b, int64_t d);
  // The float64 squared norms of a float32 row's bfloat16 rounding (bits, d of them) and of the rounding's
  // error: out[0] = ||b||^2, out[1] = ||a - b||^2 (kmeans_assign_bf16's error bound).
  void (*bf16_rounding_sq_norms)(const float* a, const uint16_t* b, int64_t d, double* out);
  // accumulator[t] += row[t] in float64.
  void (*accumulate_row)(double* accumulator, const float* row, int64_t d);

  // --- PCA row passes (pca_kernel.cpp) ---
  // dst = (src - shift_hi) - shift_lo; returns true when every value is finite.
  bool (*center_row_float)(const float* src, const float* shift_hi, const float* shift_lo, float* dst,
                           int64_t d);
  // sums[j] += row[j] in float64.
  void (*add_row_float)(const float* row, double* sums, int64_t d);
  // dst = row * 1 / (||row|| + norm_eps) (norm in float64); dst may alias row.
  void (*normalize_row_float)(const float* row, float* dst, int64_t k, double norm_eps);
  void (*normalize_row_double)(const double* row, float* dst, int64_t k, double norm_eps);

  // --- Sobel stem (sobel_normalize_kernel.cpp), uint8 -> float32, the hot case ---
  // Output rows y0 .. y1 - 1 of one image (3 x H x W planes, or H x W x 3 when channels_last) into
  // `result` (2 x H x W, or H x W x 2). coefs = {a0, a1, a2, bias} of grey_value; scratch holds
  // kSobelScratchRows (W + 2) floats. The NCHW planes are written with streaming stores, fenced before return.
  void (*sobel_band_u8)(const uint8_t* image, int64_t H, int64_t W, int64_t y0, int64_t y1,
                        const float* coefs, bool channels_last, float* result, float* scratch);

  // --- ODC (odc_kernel.cpp) ---
  // Largest value of a row, ignoring NaN (-inf for an all-NaN row).
  float (*row_max_float)(const float* s, int64_t n);
  double (*row_max_double)(const double* s, int64_t n);
  // sum[d] += odc_quantize(row[d], scale) for d in [0, n).
  void (*add_quantized_float)(int64_t* sum, const float* row, int64_t n, double scale);
  void (*add_quantized_double)(int64_t* sum, const double* row, int64_t n, double scale);

  // --- float32 GEMM of the CPU k-means passes (blas_gemm.cpp, CpuGemm::kPydc) ---
  // Floats pack_gemm_panels writes for n rows of d features (this level's panel width).
  int64_t (*gemm_packed_floats)(int64_t n, int64_t d);
  // Packs b (n rows of d floats, ldb apart) into panels of this level's width for gemm_abt_packed.
  void (*pack_gemm_panels)(const float* b, int64_t ldb, int64_t n, int64_t d, float* packed);
  // out[r * ldo + c] = a[r] . b[c] for r < m, c < n, from b packed by this level's pack_gemm_panels; each dot
  // summed in feature order in float32 (fused multiply-adds at AVX2 and AVX-512).
  void (*gemm_abt_packed)(const float* a, int64_t lda, int64_t m, const float* packed, int64_t n, int64_t d,
                          float* out, int64_t ldo);

  // --- float32 Gram of the CPU PCA (blas_syrk.cpp's pydc syrk) ---
  // gram[i][j] += sum_t x[t][i] x[t][j] for rows i in [row_begin, row_end), j >= i (x: rows x d, ldx apart;
  // gram d x d, ldg apart; left of the diagonal untouched), in blocks of rows summed in float32 (fused
  // multiply-adds at AVX2 and AVX-512) and added in; scratch: syrk_scratch_floats(d) floats.
  void (*syrk_upper_rows)(const float* x, int64_t ldx, int64_t rows, int64_t d, int64_t row_begin, int64_t row_end,
                          float* gram, int64_t ldg, float* scratch);
  int64_t (*syrk_scratch_floats)(int64_t d);
};

namespace cpu_default { extern const CpuKernels kKernels; }
namespace cpu_avx2 { extern const CpuKernels kKernels; }
namespace cpu_avx512 { extern const CpuKernels kKernels; }

// Highest level this CPU and OS support (cpuid + xgetbv, via __builtin_cpu_supports).
CpuCapability cpu_supported_capability();
// Level in use: the supported one, capped by PYDC_CPU_CAPABILITY (default / avx2 / avx512) read once at
// load, or as set by set_cpu_capability.
CpuCapability cpu_capability();
// Uses `level` from now on; throws (TORCH_CHECK) when the CPU does not support it.
void set_cpu_capability(CpuCapability level);
const char* cpu_capability_name(CpuCapability level);
// The table of the level in use.
const CpuKernels& cpu_kernels();

}  // namespace pydc
