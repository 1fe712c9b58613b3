// The bodies of the per-ISA CPU loops (see cpu_kernels.h). Included once by each of
// cpu_kernels_{default,avx2,avx512}.cpp inside `namespace pydc::PYDC_CPU_NS`, after cpu_kernels_prelude.h
// and after the `#pragma GCC target` of that level. No include here: every header is in the prelude, so
// its inline functions are compiled for the baseline and only inlined into the code below.
//
// Loops are written so that GCC vectorizes them at every width and each result is computed the same way
// at every level: reductions run in kLanes independent lanes merged in a fixed order.
//
// PYDC_CPU_LEVEL (0 default, 1 AVX2 + FMA, 2 AVX-512), defined by the including unit, picks register widths
// and intrinsics: g++ (12) does not define __AVX2__, __FMA__ or __AVX512F__ under `#pragma GCC target`, so
// those macros cannot tell the levels apart here.
#if !defined(PYDC_CPU_LEVEL) || !defined(__x86_64__)
#undef PYDC_CPU_LEVEL
#define PYDC_CPU_LEVEL 0
#endif

constexpr int kLanes = 16;
typedef float float_lanes __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t int_lanes __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline void fold_candidate(float score, int64_t index, float* best_score, int64_t* best_index,
                           float* second_score) {
  if (kmeans_prefer(score, index, *best_score, *best_index)) {
    // the old best becomes a runner-up
    if (*best_score < *second_score) *second_score = *best_score;
    *best_score = score;
    *best_index = index;
  } else if (score < *second_score) {
    *second_score = score;
  }
}

// fold_row_top2 keeps kLanes running (best, index, second) lanes, lane l seeing centroids j = l mod kLanes, and
// holds them as kLanes / kFoldWidth vectors of the level's register width. Written as one 16-lane vector, the
// comparisons of a vector wider than the registers were compiled to one scalar compare and branch per lane at
// AVX2 and below (~4 ns per score at AVX2, against ~0.4 at AVX-512, where 16 lanes are one register). The
// lanes, and so the result, are the same at every level.
#if PYDC_CPU_LEVEL >= 2
constexpr int kFoldWidth = 16;
#elif PYDC_CPU_LEVEL >= 1
constexpr int kFoldWidth = 8;
#else
constexpr int kFoldWidth = 4;
#endif
constexpr int kFoldParts = kLanes / kFoldWidth;
typedef float fold_floats __attribute__((vector_size(kFoldWidth * sizeof(float))));
typedef int32_t fold_ints __attribute__((vector_size(kFoldWidth * sizeof(int32_t))));

void fold_row_top2(const float* dot, const float* centroid_sq_norms, int64_t n, int64_t j0, float* best_score,
                   int64_t* best_index, float* second_score) {
  int64_t j = 0;
  if (n >= kLanes) {
    fold_floats lane_best[kFoldParts], lane_second[kFoldParts], two;
    fold_ints lane_index[kFoldParts], index[kFoldParts];
    for (int m = 0; m < kFoldWidth; ++m) two[m] = 2.f;
    for (int p = 0; p < kFoldParts; ++p) {
      for (int m = 0; m < kFoldWidth; ++m) {
        lane_best[p][m] = kKMeansInf;
        lane_second[p][m] = kKMeansInf;
        lane_index[p][m] = 0;
        index[p][m] = p * kFoldWidth + m;
      }
    }
    for (; j + kLanes <= n; j += kLanes) {
      for (int p = 0; p < kFoldParts; ++p) {
        fold_floats d, c;
        std::memcpy(&d, dot + j + p * kFoldWidth, sizeof(d));
        std::memcpy(&c, centroid_sq_norms + j + p * kFoldWidth, sizeof(c));
        const fold_floats score = c - two * d;
        const fold_ints better = score < lane_best[p];  // strict: a lane keeps its first (lowest) index
        const fold_floats runner_up = score < lane_second[p] ? score : lane_second[p];
        lane_second[p] = better ? lane_best[p] : runner_up;
        lane_best[p] = better ? score : lane_best[p];
        lane_index[p] = better ? index[p] : lane_index[p];
        index[p] += kLanes;
      }
    }
    for (int l = 0; l < kLanes; ++l) {
      const int p = l / kFoldWidth, m = l % kFoldWidth;
      fold_candidate(lane_best[p][m], j0 + lane_index[p][m], best_score, best_index, second_score);
      if (lane_second[p][m] < *second_score) *second_score = lane_second[p][m];
    }
  }
  for (; j < n; ++j) {
    fold_candidate(kmeans_score(centroid_sq_norms[j], dot[j]), j0 + j, best_score, best_index, second_score);
  }
}

// The smallest of 4 or 8 lanes, by halving (the lanes here are never NaN: running minima that start at +inf
// and take a value only when it is `<`). A chain of scalar minima per group was 10% of the time of
// kmeans_assign_bounds at AVX-512 (63 groups of 16 a row), the GEMM 37%.
typedef float four_lanes __attribute__((vector_size(4 * sizeof(float))));
typedef float eight_lanes __attribute__((vector_size(8 * sizeof(float))));

inline float min_four_lanes(const four_lanes& v) {
  const float low = v[1] < v[0] ? v[1] : v[0];
  const float high = v[3] < v[2] ? v[3] : v[2];
  return high < low ? high : low;
}

inline float min_eight_lanes(const eight_lanes& v) {
  const four_lanes low = __builtin_shufflevector(v, v, 0, 1, 2, 3);
  const four_lanes high = __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return min_four_lanes(high < low ? high : low);
}

// The smallest lane of a vector of the level's fold width (16, 8 or 4 lanes).
inline float min_fold_lanes(const fold_floats& v) {
#if PYDC_CPU_LEVEL >= 2
  const eight_lanes low = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const eight_lanes high = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  return min_eight_lanes(high < low ? high : low);
#elif PYDC_CPU_LEVEL >= 1
  return min_eight_lanes(v);
#else
  return min_four_lanes(v);
#endif
}

// The smallest score over centroids [begin, end) (+inf when empty): kFoldWidth running minima, then their
// minimum and the strict `<` over the tail, so NaN scores never win and the minimum is the scalar one.
inline float min_score_run(const float* dot, const float* centroid_sq_norms, int64_t begin, int64_t end) {
  float best = kKMeansInf;
  int64_t j = begin;
  if (end - begin >= kFoldWidth) {
    fold_floats lane_best, two;
    for (int m = 0; m < kFoldWidth; ++m) {
      lane_best[m] = kKMeansInf;
      two[m] = 2.f;
    }
    for (; j + kFoldWidth <= end; j += kFoldWidth) {
      fold_floats d, c;
      std::memcpy(&d, dot + j, sizeof(d));
      std::memcpy(&c, centroid_sq_norms + j, sizeof(c));
      const fold_floats score = c - two * d;
      lane_best = score < lane_best ? score : lane_best;
    }
    best = min_fold_lanes(lane_best);
  }
  for (; j < end; ++j) {
    const float score = kmeans_score(centroid_sq_norms[j], dot[j]);
    best = score < best ? score : best;
  }
  return best;
}

void group_min_scores(const float* dot, const float* centroid_sq_norms, const int64_t* offsets, int64_t groups,
                      int64_t excluded, float* group_min) {
  // Each group's run of scores in vectors of the register width (~16 centroids a group: one or two vectors
  // at AVX-512; scalar code here cost half the GEMM's time in kmeans_assign_bounds); the excluded centroid
  // splits its group's run in two.
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t begin = offsets[g], end = offsets[g + 1];
    if (excluded >= begin && excluded < end) {
      const float left = min_score_run(dot, centroid_sq_norms, begin, excluded);
      const float right = min_score_run(dot, centroid_sq_norms, excluded + 1, end);
      group_min[g] = right < left ? right : left;
    } else {
      group_min[g] = min_score_run(dot, centroid_sq_norms, begin, end);
    }
  }
}

typedef float float_block __attribute__((vector_size(8 * sizeof(float))));

// A block of 8 centroid lanes as kParts vectors of the level's width: one 8-float register at AVX2 and AVX-512,
// two 4-float ones at the baseline, whose 16 SSE registers cannot hold 8-float generic vectors (g++ lowered
// them through the stack: the tile ran ~20x slower there).
#if PYDC_CPU_LEVEL >= 1
constexpr int kPartWidth = 8;
#else
constexpr int kPartWidth = 4;
#endif
constexpr int kParts = 8 / kPartWidth;
typedef float block_part __attribute__((vector_size(kPartWidth * sizeof(float))));

// An initializer list, not a loop over lanes: g++ turns the loop into one insert per lane (the tile's hot
// loop broadcasts a point's value every step; the loop form doubled the bounded k-means's time at AVX-512).
inline block_part splat_part(float v) {
#if PYDC_CPU_LEVEL >= 1
  return block_part{v, v, v, v, v, v, v, v};
#else
  return block_part{v, v, v, v};
#endif
}

// acc + x * c, fused where the level has FMA: the one loop here that is not bitwise equal across levels
// (block_scores8's scores differ by float32 rounding between the default level and AVX2/AVX-512; what uses
// them, the exact labels of bounded k-means, does not). Unfused, it runs at ~0.7x the speed of the BLAS
// GEMM; fused, like it.
inline void multiply_add(block_part& acc, const block_part& x, const block_part& c) {
#if PYDC_CPU_LEVEL >= 1
  acc = reinterpret_cast<block_part>(
      _mm256_fmadd_ps(reinterpret_cast<__m256>(x), reinterpret_cast<__m256>(c), reinterpret_cast<__m256>(acc)));
#else
  acc += x * c;
#endif
}

// kRows points times kBlocks blocks at a time: every load of a centroid row serves kRows points, every
// broadcast point value kBlocks blocks. Each (point, centroid) sum is one chain in feature order (the same
// rounding for every tiling; kRows * kBlocks chains hide the add latency).
template <int kRows, int kBlocks>
inline void block_scores_tile(const float* const* rows, const float* block, const float* block_sq_norms, int64_t d,
                              float* const* scores) {
  block_part acc[kRows][kBlocks][kParts];
  for (int r = 0; r < kRows; ++r) {
    for (int b = 0; b < kBlocks; ++b) {
      for (int p = 0; p < kParts; ++p) acc[r][b][p] = splat_part(0.0f);
    }
  }
  for (int64_t t = 0; t < d; ++t) {
    block_part c[kBlocks][kParts];
    for (int b = 0; b < kBlocks; ++b) {
      for (int p = 0; p < kParts; ++p) {
        std::memcpy(&c[b][p], block + (t * kBlocks + b) * 8 + p * kPartWidth, sizeof(block_part));
      }
    }
    for (int r = 0; r < kRows; ++r) {
      const block_part x = splat_part(rows[r][t]);
      for (int b = 0; b < kBlocks; ++b) {
        for (int p = 0; p < kParts; ++p) multiply_add(acc[r][b][p], x, c[b][p]);
      }
    }
  }
  const block_part two = splat_part(2.0f);
  for (int b = 0; b < kBlocks; ++b) {
    for (int p = 0; p < kParts; ++p) {
      block_part norms;
      std::memcpy(&norms, block_sq_norms + 8 * b + p * kPartWidth, sizeof(norms));
      for (int r = 0; r < kRows; ++r) {
        const block_part score = norms - two * acc[r][b][p];  // kmeans_score per lane
        std::memcpy(scores[r] + 8 * b + p * kPartWidth, &score, sizeof(score));
      }
    }
  }
}

// Rows per tile: kTileRows x kBlocks accumulators of 8 floats, the blocks and a broadcast value must fit the
// level's vector registers (32 zmm-capable at AVX-512, 16 ymm at AVX2, 16 xmm at the baseline, where a block
// takes two).
#if PYDC_CPU_LEVEL >= 2
constexpr int kTileRows = 8;
#elif PYDC_CPU_LEVEL >= 1
constexpr int kTileRows = 6;
#else
constexpr int kTileRows = 2;
#endif

#if PYDC_CPU_LEVEL >= 2
// A pair of blocks at AVX-512: the 16 centroids of the pair at feature t are contiguous (the pair's layout), so
// one 16-lane multiply-add per point and feature. 8-lane ones at this level ran at half the BLAS GEMM's rate on
// Intel cores, whose 512-bit units do twice the work of their 256-bit ones in the same cycle (on AMD Zen 4 the
// two widths cost the same). Lane by lane the same fused chain in feature order as the 8-lane tile, so the
// scores are bitwise those of the AVX2 level.
template <int kRows>
inline void pair_scores_tile16(const float* const* rows, const float* pair, const float* pair_sq_norms, int64_t d,
                               float* const* scores) {
  __m512 acc[kRows];
  for (int r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t t = 0; t < d; ++t) {
    const __m512 c = _mm512_loadu_ps(pair + t * 16);
    for (int r = 0; r < kRows; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(rows[r][t]), c, acc[r]);
  }
  const __m512 norms = _mm512_loadu_ps(pair_sq_norms);
  const __m512 two = _mm512_set1_ps(2.0f);
  for (int r = 0; r < kRows; ++r) {
    _mm512_storeu_ps(scores[r], _mm512_sub_ps(norms, _mm512_mul_ps(two, acc[r])));  // kmeans_score per lane
  }
}

// Rows per 16-lane tile: 12 accumulators, the pair and a broadcast value in 32 zmm registers, with loads to spare.
constexpr int kPairTileRows = 12;

template <int... kRest>
inline void pair_scores_rest(std::integer_sequence<int, kRest...>, int rest, const float* const* rows,
                             const float* pair, const float* pair_sq_norms, int64_t d, float* const* scores) {
  ((rest == kRest + 1 ? pair_scores_tile16<kRest + 1>(rows, pair, pair_sq_norms, d, scores) : void()), ...);
}

inline void pair_scores_rows16(const float* const* rows, int64_t n_rows, const float* pair,
                               const float* pair_sq_norms, int64_t d, float* const* scores) {
  int64_t r = 0;
  for (; r + kPairTileRows <= n_rows; r += kPairTileRows) {
    pair_scores_tile16<kPairTileRows>(rows + r, pair, pair_sq_norms, d, scores + r);
  }
  pair_scores_rest(std::make_integer_sequence<int, kPairTileRows - 1>{}, static_cast<int>(n_rows - r), rows + r,
                   pair, pair_sq_norms, d, scores + r);
}
#endif

template <int kBlocks>
void block_scores_rows(const float* const* rows, int64_t n_rows, const float* block, const float* block_sq_norms,
                       int64_t d, float* const* scores) {
#if PYDC_CPU_LEVEL >= 2
  if constexpr (kBlocks == 2) {
    pair_scores_rows16(rows, n_rows, block, block_sq_norms, d, scores);
    return;
  }
#endif
  int64_t r = 0;
  for (; r + kTileRows <= n_rows; r += kTileRows) {
    block_scores_tile<kTileRows, kBlocks>(rows + r, block, block_sq_norms, d, scores + r);
  }
  switch (n_rows - r) {  // the rest in one call: a single-row chain waits on every add
    case 7: block_scores_tile<7, kBlocks>(rows + r, block, block_sq_norms, d, scores + r); break;
    case 6: block_scores_tile<6, kBlocks>(rows + r, block, block_sq_norms, d, scores + r); break;
    case 5: block_scores_tile<5, kBlocks>(rows + r, block, block_sq_norms, d, scores + r); break;
    case 4: block_scores_tile<4, kBlocks>(rows + r, block, block_sq_norms, d, scores + r); break;
    case 3: block_scores_tile<3, kBlocks>(rows + r, block, block_sq_norms, d, scores + r); break;
    case 2: block_scores_tile<2, kBlocks>(rows + r, block, block_sq_norms, d, scores + r); break;
    case 1: block_scores_tile<1, kBlocks>(rows + r, block, block_sq_norms, d, scores + r); break;
    default: break;
  }
}

void block_scores8(const float* const* rows, int64_t n_rows, const float* blocks, int64_t n_blocks,
                   const float* block_sq_norms, int64_t d, float* const* scores) {
  if (n_blocks == 2) {
    block_scores_rows<2>(rows, n_rows, blocks, block_sq_norms, d, scores);
  } else {
    block_scores_rows<1>(rows, n_rows, blocks, block_sq_norms, d, scores);
  }
}

void group_block_minima(const float* scores, const int64_t* group_block, const uint8_t* need, int64_t groups,
                        float* group_min) {
  for (int64_t g = 0; g < groups; ++g) {
    if (!need[g]) continue;
    float_block lane_min = {kKMeansInf, kKMeansInf, kKMeansInf, kKMeansInf,
                            kKMeansInf, kKMeansInf, kKMeansInf, kKMeansInf};
    for (int64_t b = group_block[g]; b < group_block[g + 1]; ++b) {
      float_block s;
      std::memcpy(&s, scores + 8 * b, sizeof(s));
      lane_min = s < lane_min ? s : lane_min;
    }
    group_min[g] = min_eight_lanes(lane_min);
  }
}

// acc + a * b on vectors of the level's register width, fused where the level has FMA.
inline fold_floats fused_multiply_add(const fold_floats& acc, const fold_floats& a, const fold_floats& b) {
#if PYDC_CPU_LEVEL >= 2
  return reinterpret_cast<fold_floats>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b),
                                                       reinterpret_cast<__m512>(acc)));
#elif PYDC_CPU_LEVEL >= 1
  return reinterpret_cast<fold_floats>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b),
                                                       reinterpret_cast<__m256>(acc)));
#else
  return acc + a * b;
#endif
}

inline bool vector_any(const fold_ints& v) {
  int32_t any = 0;
  for (int m = 0; m < kFoldWidth; ++m) any |= v[m];
  return any != 0;
}

// The sum of a vector's lanes by pairwise halving (a fixed tree: a serial chain of scalar adds cost as much as
// the dot product itself).
inline float sum_fold_lanes(const fold_floats& v) {
  typedef float four_floats __attribute__((vector_size(4 * sizeof(float))));
#if PYDC_CPU_LEVEL >= 2
  typedef float eight_floats __attribute__((vector_size(8 * sizeof(float))));
  const eight_floats half = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                            __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const four_floats quarter = __builtin_shufflevector(half, half, 0, 1, 2, 3) +
                              __builtin_shufflevector(half, half, 4, 5, 6, 7);
#elif PYDC_CPU_LEVEL >= 1
  const four_floats quarter = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
#else
  const four_floats quarter = v;
#endif
  return (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]);
}

// kRows dot products with one centroid at once: each step of the centroid is loaded once for all of them. Each
// row keeps kChains independent accumulators (steps taken in turn), so that even one or two rows are not held
// to one multiply-add per latency: Elkan's sparse passes score ~3 rows per centroid, and with one chain a row
// their dots ran ~4x slower per pair than the GEMM. The steps left over when d is not a multiple of kChains
// steps go to the first chain, the tail of d (d % kFoldWidth) is scalar.
template <int kRows>
inline void rows_dot_centroid(const float* centroid, const float* const* rows, int64_t d, float* dots) {
  constexpr int kChains = kRows >= 4 ? 2 : 4;
  fold_floats acc[kRows][kChains];
  for (int q = 0; q < kRows; ++q) {
    for (int h = 0; h < kChains; ++h) {
      for (int m = 0; m < kFoldWidth; ++m) acc[q][h][m] = 0.0f;
    }
  }
  int64_t t = 0;
  for (; t + kChains * kFoldWidth <= d; t += kChains * kFoldWidth) {
    for (int h = 0; h < kChains; ++h) {
      fold_floats cv;
      std::memcpy(&cv, centroid + t + h * kFoldWidth, sizeof(cv));
      for (int q = 0; q < kRows; ++q) {
        fold_floats xv;
        std::memcpy(&xv, rows[q] + t + h * kFoldWidth, sizeof(xv));
        acc[q][h] = fused_multiply_add(acc[q][h], xv, cv);
      }
    }
  }
  for (; t + kFoldWidth <= d; t += kFoldWidth) {
    fold_floats cv;
    std::memcpy(&cv, centroid + t, sizeof(cv));
    for (int q = 0; q < kRows; ++q) {
      fold_floats xv;
      std::memcpy(&xv, rows[q] + t, sizeof(xv));
      acc[q][0] = fused_multiply_add(acc[q][0], xv, cv);
    }
  }
  for (int q = 0; q < kRows; ++q) {
    fold_floats total = acc[q][0];
    for (int h = 1; h < kChains; ++h) total += acc[q][h];
    float sum = sum_fold_lanes(total);
    for (int64_t u = t; u < d; ++u) sum += rows[q][u] * centroid[u];
    dots[q] = sum;
  }
}

void centroid_dots(const float* centroid, const float* const* rows, int64_t n_rows, int64_t d, float* dots) {
  int64_t q = 0;
  for (; q + 4 <= n_rows; q += 4) rows_dot_centroid<4>(centroid, rows + q, d, dots + q);
  switch (n_rows - q) {
    case 3: rows_dot_centroid<3>(centroid, rows + q, d, dots + q); break;
    case 2: rows_dot_centroid<2>(centroid, rows + q, d, dots + q); break;
    case 1: rows_dot_centroid<1>(centroid, rows + q, d, dots + q); break;
    default: break;
  }
}

#if PYDC_CPU_LEVEL == 1
// For every 8-bit lane mask, the positions of its set lanes in increasing order, one per nibble from the lowest.
struct CompressNibbles {
  uint32_t packed[256];
  constexpr CompressNibbles() : packed() {
    for (int bits = 0; bits < 256; ++bits) {
      uint32_t value = 0;
      int slot = 0;
      for (int m = 0; m < 8; ++m) {
        if (bits & (1 << m)) value |= static_cast<uint32_t>(m) << (4 * slot++);
      }
      packed[bits] = value;
    }
  }
};
inline constexpr CompressNibbles kCompressNibbles{};
#endif

// Appends j0 + m for every lane m whose mask is set to out[count..], returns the new count. Writes up to
// kFoldWidth entries past the count (the buffer holds k + kFoldWidth).
inline int64_t compress_indices(const fold_ints& mask, int32_t j0, int32_t* out, int64_t count) {
#if PYDC_CPU_LEVEL >= 2
  const __mmask16 bits = _mm512_movepi32_mask(reinterpret_cast<__m512i>(mask));
  const __m512i index = _mm512_add_epi32(_mm512_set1_epi32(j0),
                                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  _mm512_storeu_si512(out + count, _mm512_maskz_compress_epi32(bits, index));
  return count + __builtin_popcount(bits);
#elif PYDC_CPU_LEVEL >= 1
  // AVX2 has no compress: the set lanes' positions, packed as nibbles per 8-bit mask, are unpacked into a
  // permutation that moves those lanes' indices to the front (one table load instead of a store per lane).
  const int bits = _mm256_movemask_ps(reinterpret_cast<__m256>(mask));
  const __m256i nibbles = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(kCompressNibbles.packed[bits])),
                                            _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
  const __m256i order = _mm256_and_si256(nibbles, _mm256_set1_epi32(0xF));
  const __m256i index = _mm256_add_epi32(_mm256_set1_epi32(j0), order);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + count), index);
  return count + __builtin_popcount(static_cast<unsigned>(bits));
#else
  for (int m = 0; m < kFoldWidth; ++m) {
    out[count] = j0 + m;
    count += mask[m] & 1;
  }
  return count;
#endif
}

template <bool kSeparation>
inline int64_t elkan_scan(const float* anchors, const float* offset_up, const float* separation, int64_t k,
                          float threshold, float separation_threshold, float upper, int32_t* candidates,
                          float* unscored_min) {
  int64_t count = 0, j = 0;
  float smallest = kKMeansInf;
  if (k >= kFoldWidth) {
    fold_floats lane_min, shrink, limit, separation_limit, up, inf;
    for (int m = 0; m < kFoldWidth; ++m) {
      lane_min[m] = kKMeansInf;
      inf[m] = kKMeansInf;
      shrink[m] = kElkanShrink;
      limit[m] = threshold;
      separation_limit[m] = separation_threshold;
      up[m] = upper;
    }
    for (; j + kFoldWidth <= k; j += kFoldWidth) {
      fold_floats a, o;
      std::memcpy(&a, anchors + j, sizeof(a));
      std::memcpy(&o, offset_up + j, sizeof(o));
      fold_floats bound = (a - o) * shrink;  // elkan_bound per lane
      fold_ints need = !(bound > limit);
      if (kSeparation) {
        fold_floats sv;
        std::memcpy(&sv, separation + j, sizeof(sv));
        const fold_ints separated = sv > separation_limit;
        const fold_floats beyond = (sv - up) * shrink;
        bound = (separated & (beyond > bound)) ? beyond : bound;
        need = need & ~separated;
      }
      const fold_floats value = need ? inf : bound;
      lane_min = value < lane_min ? value : lane_min;
      count = compress_indices(need, static_cast<int32_t>(j), candidates, count);
    }
    for (int m = 0; m < kFoldWidth; ++m) smallest = lane_min[m] < smallest ? lane_min[m] : smallest;
  }
  for (; j < k; ++j) {
    float bound = elkan_bound(anchors[j], offset_up[j]);
    bool need = !(bound > threshold);
    if (kSeparation && separation[j] > separation_threshold) {
      need = false;
      const float beyond = (separation[j] - upper) * kElkanShrink;
      bound = beyond > bound ? beyond : bound;
    }
    if (need) {
      candidates[count++] = static_cast<int32_t>(j);
    } else {
      smallest = bound < smallest ? bound : smallest;
    }
  }
  *unscored_min = smallest;
  return count;
}

int64_t elkan_candidates(const float* anchors, const float* offset_up, const float* separation, int64_t k,
                         float threshold, float separation_threshold, float upper, int32_t* candidates,
                         float* unscored_min) {
  return separation != nullptr
             ? elkan_scan<true>(anchors, offset_up, separation, k, threshold, separation_threshold, upper, candidates,
                                unscored_min)
             : elkan_scan<false>(anchors, offset_up, nullptr, k, threshold, separation_threshold, upper, candidates,
                                 unscored_min);
}

// Lane-wise square root (correctly rounded, so each lane equals sqrtf of it).
inline fold_floats vector_sqrt(const fold_floats& v) {
#if PYDC_CPU_LEVEL >= 2
  const __m512 x = reinterpret_cast<__m512>(v);  // the masked form: the plain one trips -Wmaybe-uninitialized
  return reinterpret_cast<fold_floats>(_mm512_mask_sqrt_ps(x, static_cast<__mmask16>(0xFFFF), x));
#elif PYDC_CPU_LEVEL >= 1
  return reinterpret_cast<fold_floats>(_mm256_sqrt_ps(reinterpret_cast<__m256>(v)));
#elif defined(__x86_64__)
  return reinterpret_cast<fold_floats>(_mm_sqrt_ps(reinterpret_cast<__m128>(v)));
#else
  fold_floats r;
  for (int m = 0; m < kFoldWidth; ++m) r[m] = std::sqrt(v[m]);
  return r;
#endif
}

// A vector of the level's width with every lane `value`: one broadcast (a loop setting the lanes one by one
// compiles to a masked broadcast per lane at AVX-512).
inline fold_floats splat(float value) {
#if PYDC_CPU_LEVEL >= 2
  return reinterpret_cast<fold_floats>(_mm512_set1_ps(value));
#elif PYDC_CPU_LEVEL >= 1
  return reinterpret_cast<fold_floats>(_mm256_set1_ps(value));
#elif defined(__x86_64__)
  return reinterpret_cast<fold_floats>(_mm_set1_ps(value));
#else
  fold_floats v;
  for (int m = 0; m < kFoldWidth; ++m) v[m] = value;
  return v;
#endif
}

// The runs are separate 4 KiB streams 4 * stride bytes apart, each cold when its turn comes: the run
// kFoldPrefetchRuns ahead is prefetched a cache line per step of this one. The moved passes of an unstructured
// 100k x 256, k = 1000 run (AMD EPYC Zen 4, 2 threads, separate processes, 3 runs each): 1.14-1.27 s ->
// 1.01-1.09 s at avx512, 1.20-1.26 s -> 1.01-1.06 s at avx2; 1, 4 and 8 runs ahead were no different.
constexpr int64_t kFoldPrefetchRuns = 2;
constexpr int64_t kLineFloats = 16;

// The lanes of a comparison's result that are set, one bit per lane from the lowest.
inline uint32_t set_lanes(const fold_ints& mask) {
#if PYDC_CPU_LEVEL >= 2
  return _mm512_movepi32_mask(reinterpret_cast<__m512i>(mask));
#elif PYDC_CPU_LEVEL >= 1
  return static_cast<uint32_t>(_mm256_movemask_ps(reinterpret_cast<__m256>(mask)));
#else
  uint32_t bits = 0;
  for (int m = 0; m < kFoldWidth; ++m) bits |= static_cast<uint32_t>(mask[m] & 1) << m;
  return bits;
#endif
}

// Top lists from scratch for `count` points (the lanes) from every centroid's run, read once: the
// kDeltaTopSlots + 1 smallest scores per point of the whole vectors, sorted, in `sorted` (their centroids in the
// next kDeltaTopSlots + 1 rows, count floats a row), then the first kDeltaTopSlots listed and the last one the
// floor; the few points past the last vector go through delta_tops_fold. A run's scores are
// compared with each point's current last (the screen); only a vector of points where some score is below it goes
// through the insertion network, which places a score in every lane at once.
void fold_columns_tops(const float* dot, int64_t stride, const float* centroid_sq_norms, int64_t k, int64_t count,
                       float* tops, int64_t tops_stride, float* sorted) {
  constexpr int kSorted = kDeltaTopSlots + 1;
  static_assert(kSorted == 5, "fold_columns_tops' insertion network is written out for 5 slots");
  float* index = sorted + kSorted * count;
  for (int c = 0; c < kSorted; ++c) {
    for (int64_t r = 0; r < count; ++r) {
      sorted[c * count + r] = kKMeansInf;
      index[c * count + r] = -1.0f;
    }
  }
  const int64_t vectors_end = count / kFoldWidth * kFoldWidth;
  const fold_floats two = splat(2.0f);
  for (int64_t j = 0; j < k; ++j) {
    const float* run = dot + j * stride;
    const float* ahead = j + kFoldPrefetchRuns < k ? dot + (j + kFoldPrefetchRuns) * stride : nullptr;
    const fold_floats norm = splat(centroid_sq_norms[j]);
    const fold_floats id = splat(static_cast<float>(j));
    for (int64_t r = 0; r < vectors_end; r += kFoldWidth) {
      if (ahead != nullptr && r % kLineFloats == 0) __builtin_prefetch(ahead + r, 0, 0);
      fold_floats d, last;
      std::memcpy(&d, run + r, sizeof(d));
      std::memcpy(&last, sorted + (kSorted - 1) * count + r, sizeof(last));
      const fold_floats score = norm - two * d;
      if (set_lanes(score < last) == 0) continue;
      // slot c takes slot c - 1's entry where the score goes before that one, the score where it goes at c
      // (named registers: arrays of vectors were kept on the stack, in halves)
      float* const v = sorted + r;
      float* const w = index + r;
      fold_floats v0, v1, v2, v3, v4, n0, n1, n2, n3, n4;
      std::memcpy(&v0, v, sizeof(v0));
      std::memcpy(&v1, v + count, sizeof(v1));
      std::memcpy(&v2, v + 2 * count, sizeof(v2));
      std::memcpy(&v3, v + 3 * count, sizeof(v3));
      v4 = last;
      std::memcpy(&n0, w, sizeof(n0));
      std::memcpy(&n1, w + count, sizeof(n1));
      std::memcpy(&n2, w + 2 * count, sizeof(n2));
      std::memcpy(&n3, w + 3 * count, sizeof(n3));
      std::memcpy(&n4, w + 4 * count, sizeof(n4));
      const fold_ints b0 = score < v0, b1 = score < v1, b2 = score < v2, b3 = score < v3, b4 = score < v4;
      const fold_floats o4 = b3 ? v3 : (b4 ? score : v4), m4 = b3 ? n3 : (b4 ? id : n4);
      const fold_floats o3 = b2 ? v2 : (b3 ? score : v3), m3 = b2 ? n2 : (b3 ? id : n3);
      const fold_floats o2 = b1 ? v1 : (b2 ? score : v2), m2 = b1 ? n1 : (b2 ? id : n2);
      const fold_floats o1 = b0 ? v0 : (b1 ? score : v1), m1 = b0 ? n0 : (b1 ? id : n1);
      const fold_floats o0 = b0 ? score : v0, m0 = b0 ? id : n0;
      std::memcpy(v, &o0, sizeof(o0));
      std::memcpy(v + count, &o1, sizeof(o1));
      std::memcpy(v + 2 * count, &o2, sizeof(o2));
      std::memcpy(v + 3 * count, &o3, sizeof(o3));
      std::memcpy(v + 4 * count, &o4, sizeof(o4));
      std::memcpy(w, &m0, sizeof(m0));
      std::memcpy(w + count, &m1, sizeof(m1));
      std::memcpy(w + 2 * count, &m2, sizeof(m2));
      std::memcpy(w + 3 * count, &m3, sizeof(m3));
      std::memcpy(w + 4 * count, &m4, sizeof(m4));
    }
  }
  for (int64_t r = 0; r < vectors_end; ++r) {
    for (int c = 0; c < kDeltaTopSlots; ++c) {
      tops[c * tops_stride + r] = sorted[c * count + r];
      tops[(kDeltaTopSlots + c) * tops_stride + r] = index[c * count + r];
    }
    tops[2 * kDeltaTopSlots * tops_stride + r] = sorted[kDeltaTopSlots * count + r];
  }
  // the points past the last vector: folded one by one into their lists (the same lists: delta_tops_fold keeps
  // the kDeltaTopSlots smallest in centroid order for ties and the next smallest as the floor)
  for (int64_t r = vectors_end; r < count; ++r) {
    delta_tops_clear(tops + r, tops_stride);
    for (int64_t j = 0; j < k; ++j) {
      delta_tops_fold(tops + r, tops_stride, kmeans_score(centroid_sq_norms[j], dot[j * stride + r]),
                      static_cast<int32_t>(j));
    }
  }
}

// Most scores fall at or above their point's floor tau and change nothing; the few below it go through
// delta_tops_fold, one point at a time.
void update_fold_column_tops(float* dot, int64_t stride, const float* centroid_sq_norms, const int32_t* columns,
                             int64_t n_columns, int64_t count, const float* scale, const int64_t* start,
                             const int32_t* row, const float* gain, const float* products, float* tops,
                             int64_t tops_stride) {
  const int64_t vectors_end = count / kFoldWidth * kFoldWidth;
  const fold_floats two = splat(2.0f);
  const float* tau = tops + 2 * kDeltaTopSlots * tops_stride;
  for (int64_t c = 0; c < n_columns; ++c) {
    const int64_t j = columns[c];
    float* run = dot + j * stride;
    const float* ahead = c + kFoldPrefetchRuns < n_columns ? dot + columns[c + kFoldPrefetchRuns] * stride : nullptr;
    const fold_floats norm = splat(centroid_sq_norms[j]);
    const bool moved = scale != nullptr && (scale[j] != 1.0f || start[j + 1] > start[j]);
    const int64_t q0 = moved ? start[j] : 0, q1 = moved ? start[j + 1] : 0;
    const fold_floats s = splat(moved ? scale[j] : 1.0f);
    for (int64_t r = 0; r < vectors_end; r += kFoldWidth) {
      if (ahead != nullptr && r % kLineFloats == 0) __builtin_prefetch(ahead + r, 1, 0);
      fold_floats d;
      std::memcpy(&d, run + r, sizeof(d));
      if (moved) {
        fold_floats added = splat(0.0f);
        for (int64_t q = q0; q < q1; ++q) {
          fold_floats p;
          std::memcpy(&p, products + row[q] * count + r, sizeof(p));
          added = added + splat(gain[q]) * p;
        }
        d = d * s + added;
        std::memcpy(run + r, &d, sizeof(d));
      }
      const fold_floats score = norm - two * d;
      fold_floats floor;
      std::memcpy(&floor, tau + r, sizeof(floor));
      for (uint32_t bits = set_lanes(score < floor); bits != 0; bits &= bits - 1) {
        const int m = __builtin_ctz(bits);
        delta_tops_fold(tops + r + m, tops_stride, score[m], static_cast<int32_t>(j));
      }
    }
    for (int64_t r = vectors_end; r < count; ++r) {
      float d = run[r];
      if (moved) {
        float added = 0.0f;
        for (int64_t q = q0; q < q1; ++q) added = added + gain[q] * products[row[q] * count + r];
        d = d * scale[j] + added;
        run[r] = d;
      }
      delta_tops_fold(tops + r, tops_stride, kmeans_score(centroid_sq_norms[j], d), static_cast<int32_t>(j));
    }
  }
}

float elkan_anchor_row(const float* dot, const float* centroid_sq_norms, const float* offset_down, float base,
                       int64_t begin, int64_t end, float* anchors) {
  // elkan_lower_bound and elkan_anchor (kmeans_math.h) lane by lane: the same operations, so the same values.
  float smallest = kKMeansInf;
  int64_t j = begin;
  if (end - begin >= kFoldWidth) {
    const fold_floats base_v = splat(base), two = splat(2.0f), slack = splat(0x1p-22f), shrink = splat(kElkanShrink);
    const fold_floats zero = splat(0.0f);
    fold_floats lane_min = splat(kKMeansInf);
    for (; j + kFoldWidth <= end; j += kFoldWidth) {
      fold_floats dv, cv, ov;
      std::memcpy(&dv, dot + j, sizeof(dv));
      std::memcpy(&cv, centroid_sq_norms + j, sizeof(cv));
      std::memcpy(&ov, offset_down + j, sizeof(ov));
      const fold_floats score = cv - two * dv;
      const fold_floats abs_base = base_v < zero ? -base_v : base_v;
      const fold_floats abs_score = score < zero ? -score : score;
      const fold_floats sq = (base_v + score) - slack * (abs_base + abs_score);
      const fold_floats lower = vector_sqrt(sq > zero ? sq : zero) * shrink;
      lane_min = lower < lane_min ? lower : lane_min;
      const fold_floats anchor = (lower + ov) * shrink;
      std::memcpy(anchors + j, &anchor, sizeof(anchor));
    }
    for (int m = 0; m < kFoldWidth; ++m) smallest = lane_min[m] < smallest ? lane_min[m] : smallest;
  }
  for (; j < end; ++j) {
    const float lower = elkan_lower_bound(base, kmeans_score(centroid_sq_norms[j], dot[j]));
    anchors[j] = elkan_anchor(lower, offset_down[j]);
    smallest = lower < smallest ? lower : smallest;
  }
  return smallest;
}

bool decay_group_bounds(double* lower, const double* drift, int64_t groups, double upper_sq, double margin,
                        uint8_t* need) {
  int any = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const double decayed = lower[g] - drift[g];
    const double l = 0.0 < decayed ? decayed : 0.0;
    lower[g] = l;
    const int needed = !(l * l - upper_sq > margin);
    need[g] = static_cast<uint8_t>(needed);
    any |= needed;
  }
  return any != 0;
}

inline double sum_lanes8(const double* lane) {
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

double dot_f64(const float* a, const float* b, int64_t d) {
  double lane[8] = {};
  int64_t t = 0;
  for (; t + 8 <= d; t += 8) {
    for (int l = 0; l < 8; ++l) lane[l] += static_cast<double>(a[t + l]) * static_cast<double>(b[t + l]);
  }
  for (int l = 0; t < d; ++t, ++l) lane[l] += static_cast<double>(a[t]) * static_cast<double>(b[t]);
  return sum_lanes8(lane);
}

void bf16_rounding_sq_norms(const float* a, const uint16_t* b, int64_t d, double* out) {
  double norm_lane[8] = {}, error_lane[8] = {};
  for (int64_t t0 = 0; t0 < d; t0 += 8) {
    const int64_t width = std::min<int64_t>(8, d - t0);
    for (int l = 0; l < width; ++l) {
      const uint32_t bits = static_cast<uint32_t>(b[t0 + l]) << 16;  // a bfloat16 is a float32's top half
      float value;
      std::memcpy(&value, &bits, sizeof(value));
      const double bt = static_cast<double>(value);
      const double et = static_cast<double>(a[t0 + l]) - bt;
      norm_lane[l] += bt * bt;
      error_lane[l] += et * et;
    }
  }
  out[0] = sum_lanes8(norm_lane);
  out[1] = sum_lanes8(error_lane);
}

double squared_distance_f64(const float* a, const float* b, int64_t d) {
  double lane[8] = {};
  int64_t t = 0;
  for (; t + 8 <= d; t += 8) {
    for (int l = 0; l < 8; ++l) {
      const double diff = static_cast<double>(a[t + l]) - static_cast<double>(b[t + l]);
      lane[l] += diff * diff;
    }
  }
  for (int l = 0; t < d; ++t, ++l) {
    const double diff = static_cast<double>(a[t]) - static_cast<double>(b[t]);
    lane[l] += diff * diff;
  }
  return sum_lanes8(lane);
}

void accumulate_row(double* accumulator, const float* row, int64_t d) {
  for (int64_t t = 0; t < d; ++t) accumulator[t] += static_cast<double>(row[t]);
}

// A single running poison sum would be a serial chain of float adds the compiler may not reorder (scalar
// code); kLanes separate sums vectorize.
bool center_row_float(const float* src, const float* shift_hi, const float* shift_lo, float* dst, int64_t d) {
  float poison[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) {
      const float v = pca_center_split(src[j + lane], shift_hi[j + lane], shift_lo[j + lane]);
      poison[lane] += v - v;
      dst[j + lane] = v;
    }
  }
  float total = 0.0f;
  for (; j < d; ++j) {
    const float v = pca_center_split(src[j], shift_hi[j], shift_lo[j]);
    total += v - v;
    dst[j] = v;
  }
  for (int lane = 0; lane < kLanes; ++lane) total += poison[lane];
  return pca_is_finite(total);
}

void add_row_float(const float* row, double* sums, int64_t d) {
  for (int64_t j = 0; j < d; ++j) sums[j] += static_cast<double>(row[j]);
}

template <typename in_t>
void normalize_row(const in_t* row, float* dst, int64_t k, double norm_eps) {
  double partial[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= k; j += kLanes) {
    for (int lane = 0; lane < kLanes; ++lane) {
      const double v = static_cast<double>(row[j + lane]);
      partial[lane] += v * v;
    }
  }
  double sum_squares = 0.0;
  for (; j < k; ++j) sum_squares += static_cast<double>(row[j]) * static_cast<double>(row[j]);
  for (int lane = 0; lane < kLanes; ++lane) sum_squares += partial[lane];
  const double scale = pca_inverse_norm<double>(sum_squares, norm_eps);
  for (j = 0; j < k; ++j) dst[j] = static_cast<float>(static_cast<double>(row[j]) * scale);
}

void normalize_row_float(const float* row, float* dst, int64_t k, double norm_eps) {
  normalize_row<float>(row, dst, k, norm_eps);
}

void normalize_row_double(const double* row, float* dst, int64_t k, double norm_eps) {
  normalize_row<double>(row, dst, k, norm_eps);
}

// The Sobel band works in vectors of the level's register width (fold_floats): the bytes of kFoldWidth pixels
// widened straight to floats, then grey_value's and sobel_3x3's arithmetic lane by lane, in their order
// (mul, add; no FMA: fp-contract is off), so every level computes the same bits as the scalar tails.
// Widening by intrinsics: g++ 12 compiles __builtin_convertvector of a byte vector to one scalar conversion per lane.
inline fold_floats load_bytes_as_floats(const uint8_t* p) {
#if PYDC_CPU_LEVEL >= 2
  // the masked forms: the plain ones trip -Wmaybe-uninitialized (as in vector_sqrt)
  const __mmask16 all = static_cast<__mmask16>(0xFFFF);
  return reinterpret_cast<fold_floats>(_mm512_maskz_cvtepi32_ps(
      all, _mm512_maskz_cvtepu8_epi32(all, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))));
#elif PYDC_CPU_LEVEL >= 1
  return reinterpret_cast<fold_floats>(
      _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
#elif defined(__x86_64__)
  int32_t four;
  std::memcpy(&four, p, sizeof(four));
  const __m128i zero = _mm_setzero_si128();
  const __m128i words = _mm_unpacklo_epi8(_mm_cvtsi32_si128(four), zero);
  return reinterpret_cast<fold_floats>(_mm_cvtepi32_ps(_mm_unpacklo_epi16(words, zero)));
#else
  fold_floats v;
  for (int m = 0; m < kFoldWidth; ++m) v[m] = static_cast<float>(p[m]);
  return v;
#endif
}

inline fold_floats load_floats(const float* p) {
  fold_floats v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store_floats(float* p, fold_floats v) { std::memcpy(p, &v, sizeof(v)); }

// Grey values of input row y (0 outside the image) into grey[1 .. W]; grey[0] and grey[W + 1] are the zero
// padding columns.
void sobel_grey_row_u8(const uint8_t* image, int64_t H, int64_t W, int64_t y, const GreyCoefs<float>& coefs,
                       bool channels_last, float* grey) {
  grey[0] = 0.0f;
  grey[W + 1] = 0.0f;
  float* out = grey + 1;
  if (y < 0 || y >= H) {
    for (int64_t x = 0; x < W; ++x) out[x] = 0.0f;
  } else if (channels_last) {
    const uint8_t* row = image + y * W * 3;
    for (int64_t x = 0; x < W; ++x) {
      out[x] = grey_value<float>(coefs, static_cast<float>(row[3 * x]), static_cast<float>(row[3 * x + 1]),
                                 static_cast<float>(row[3 * x + 2]));
    }
  } else {
    const uint8_t* r = image + y * W;
    const uint8_t* g = r + H * W;
    const uint8_t* b = g + H * W;
    const fold_floats a0 = splat(coefs.a0), a1 = splat(coefs.a1), a2 = splat(coefs.a2), bias = splat(coefs.bias);
    int64_t x = 0;
    for (; x + kFoldWidth <= W; x += kFoldWidth) {
      store_floats(out + x, a0 * load_bytes_as_floats(r + x) + a1 * load_bytes_as_floats(g + x) +
                                a2 * load_bytes_as_floats(b + x) + bias);
    }
    for (; x < W; ++x) {
      out[x] = grey_value<float>(coefs, static_cast<float>(r[x]), static_cast<float>(g[x]), static_cast<float>(b[x]));
    }
  }
}

// A store that bypasses the caches where the level has one and p is aligned to the vector (the Sobel planes are
// written once and are larger than the caches: a plain store first reads each line it writes). The caller
// issues sobel_stores_done() before the written memory is read.
inline void store_floats_streaming(float* p, fold_floats v) {
#if PYDC_CPU_LEVEL >= 2
  if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) return _mm512_stream_ps(p, reinterpret_cast<__m512>(v));
#elif PYDC_CPU_LEVEL >= 1
  if ((reinterpret_cast<uintptr_t>(p) & 31) == 0) return _mm256_stream_ps(p, reinterpret_cast<__m256>(v));
#elif defined(__x86_64__)
  if ((reinterpret_cast<uintptr_t>(p) & 15) == 0) return _mm_stream_ps(p, reinterpret_cast<__m128>(v));
#endif
  store_floats(p, v);
}

inline void sobel_stores_done() {
#if defined(__x86_64__)
  _mm_sfence();  // orders the streaming stores before whatever this thread does next (the end of the loop)
#endif
}

// dst[j * dst_stride + r] = src[j * src_stride + r] for j < runs, r < count, with streaming stores where dst is
// aligned (the k x N products of kmeans_delta_kernel.cpp's dense passes: written once per pass, far larger than
// the caches, so a plain store would first read every line), fenced before return.
void copy_runs_streaming(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t runs,
                         int64_t count) {
  for (int64_t j = 0; j < runs; ++j) {
    const float* from = src + j * src_stride;
    float* to = dst + j * dst_stride;
    int64_t r = 0;
    for (; r < count && (reinterpret_cast<uintptr_t>(to + r) & (sizeof(fold_floats) - 1)) != 0; ++r) to[r] = from[r];
    for (; r + kFoldWidth <= count; r += kFoldWidth) {
      fold_floats v;
      std::memcpy(&v, from + r, sizeof(v));
      store_floats_streaming(to + r, v);
    }
    for (; r < count; ++r) to[r] = from[r];
  }
  sobel_stores_done();
}

// The Sobel filters are separable, and sobel_3x3's expressions split exactly (same operations, same order) into
//   gx = v[x] - v[x+2],  v = (t + 2 m) + b  per column of the three grey rows,
//   gy = h_t[x] - h_b[x], h = (g[x] + 2 g[x+1]) + g[x+2]  per grey row (computed once, used by two output rows),
// so the band computes 8 float operations per pixel instead of 12, with the same bits. Both smoothings are
// out[x] = (a[x] + 2 b[x]) + c[x]: v over three rows, h over one row at three offsets.
inline void sobel_smooth(const float* a, const float* b, const float* c, int64_t n, float* out) {
  const fold_floats two = splat(2.0f);
  int64_t x = 0;
  for (; x + kFoldWidth <= n; x += kFoldWidth) {
    store_floats(out + x, load_floats(a + x) + two * load_floats(b + x) + load_floats(c + x));
  }
  for (; x < n; ++x) out[x] = a[x] + 2.0f * b[x] + c[x];
}

inline void sobel_smooth_row(const float* g, int64_t W, float* h) {  // g: a padded grey row (W + 2 values)
  sobel_smooth(g, g + 1, g + 2, W, h);
}

// gx[x] = v[x] - v[x + 2] and gy[x] = top[x] - bottom[x] for x in [0, W).
template <bool kStreaming>
inline void sobel_differences(const float* v, const float* top, const float* bottom, int64_t W, float* gx,
                              float* gy) {
  int64_t x = 0;
  for (; x + kFoldWidth <= W; x += kFoldWidth) {
    const fold_floats vx = load_floats(v + x) - load_floats(v + x + 2);
    const fold_floats vy = load_floats(top + x) - load_floats(bottom + x);
    if (kStreaming) {
      store_floats_streaming(gx + x, vx);
      store_floats_streaming(gy + x, vy);
    } else {
      store_floats(gx + x, vx);
      store_floats(gy + x, vy);
    }
  }
  for (; x < W; ++x) {
    gx[x] = v[x] - v[x + 2];
    gy[x] = top[x] - bottom[x];
  }
}

// scratch: kSobelScratchRows * (W + 2) floats (cpu_kernels.h)
void sobel_band_u8(const uint8_t* image, int64_t H, int64_t W, int64_t y0, int64_t y1, const float* coef_values,
                   bool channels_last, float* result, float* scratch) {
  const GreyCoefs<float> coefs{coef_values[0], coef_values[1], coef_values[2], coef_values[3]};
  const int64_t pitch = W + 2;
  float* grey[3] = {scratch, scratch + pitch, scratch + 2 * pitch};        // rows y - 1, y, y + 1 (padded)
  float* smooth[3] = {scratch + 3 * pitch, scratch + 4 * pitch, scratch + 5 * pitch};  // their h rows
  float* v = scratch + 6 * pitch;
  float* gx_row = scratch + 7 * pitch;  // channels-last only: gx and gy before interleaving
  float* gy_row = gx_row + W;
  for (int r = 0; r < 2; ++r) {
    sobel_grey_row_u8(image, H, W, y0 - 1 + r, coefs, channels_last, grey[r]);
    sobel_smooth_row(grey[r], W, smooth[r]);
  }
  for (int64_t y = y0; y < y1; ++y) {
    sobel_grey_row_u8(image, H, W, y + 1, coefs, channels_last, grey[2]);
    sobel_smooth_row(grey[2], W, smooth[2]);
    sobel_smooth(grey[0], grey[1], grey[2], W + 2, v);
    if (channels_last) {
      sobel_differences<false>(v, smooth[0], smooth[2], W, gx_row, gy_row);
      float* o = result + y * W * 2;
      for (int64_t x = 0; x < W; ++x) {
        o[2 * x] = gx_row[x];
        o[2 * x + 1] = gy_row[x];
      }
    } else {  // straight into the two output planes
      sobel_differences<true>(v, smooth[0], smooth[2], W, result + y * W, result + H * W + y * W);
    }
    float* recycled = grey[0];
    grey[0] = grey[1];
    grey[1] = grey[2];
    grey[2] = recycled;
    recycled = smooth[0];
    smooth[0] = smooth[1];
    smooth[1] = smooth[2];
    smooth[2] = recycled;
  }
  sobel_stores_done();
}

template <typename scalar_t>
scalar_t row_max(const scalar_t* s, int64_t n) {
  constexpr int kMaxLanes = 8;
  scalar_t lane[kMaxLanes];
  for (int l = 0; l < kMaxLanes; ++l) lane[l] = -std::numeric_limits<scalar_t>::infinity();
  int64_t k = 0;
  for (; k + kMaxLanes <= n; k += kMaxLanes) {
    for (int l = 0; l < kMaxLanes; ++l) lane[l] = s[k + l] > lane[l] ? s[k + l] : lane[l];
  }
  for (; k < n; ++k) lane[0] = s[k] > lane[0] ? s[k] : lane[0];
  scalar_t best = lane[0];
  for (int l = 1; l < kMaxLanes; ++l) best = lane[l] > best ? lane[l] : best;
  return best;
}

float row_max_float(const float* s, int64_t n) { return row_max<float>(s, n); }
double row_max_double(const double* s, int64_t n) { return row_max<double>(s, n); }

template <typename scalar_t>
void add_quantized(int64_t* sum, const scalar_t* row, int64_t n, double scale) {
  for (int64_t d = 0; d < n; ++d) sum[d] += odc_quantize(static_cast<double>(row[d]), scale);
}

void add_quantized_float(int64_t* sum, const float* row, int64_t n, double scale) {
  add_quantized<float>(sum, row, n, scale);
}
void add_quantized_double(int64_t* sum, const double* row, int64_t n, double scale) {
  add_quantized<double>(sum, row, n, scale);
}

// --- float32 GEMM, the right-hand side packed (blas_gemm.cpp's "pydc" choice) ---
// Panels of kGemmPanel rows of b, feature-major: panel p holds b[p * kGemmPanel + c][t] at [t * kGemmPanel + c]
// (zeros past n), so a tile's kGemmRows x kGemmPanel products take two vector loads and kGemmRows broadcasts per
// feature. 6 x 16 at AVX2 (12 accumulators of 16 registers) ran a 1000 x 256 x 256 block at 55 GMAC/s on one
// AMD EPYC Zen 4 core, packing included, against 49.5 for MKL's sgemm (86% and 96% of the FMA units' peak).
constexpr int64_t kGemmPanel = 2 * kFoldWidth;
constexpr int kGemmRows = 6;

int64_t gemm_packed_floats(int64_t n, int64_t d) { return (n + kGemmPanel - 1) / kGemmPanel * kGemmPanel * d; }

#if PYDC_CPU_LEVEL >= 1
// panel[t * kGemmPanel + c] = rows[c * ldb + t] for 8 rows and 8 features: eight loads, the 8 x 8 transpose in
// registers, eight stores (a scalar pack of the delta passes' 1024-point blocks of x, 1 MiB each, took ~100 us:
// ~2.5% of a capped unstructured run).
inline void transpose_8x8_into_panel(const float* rows, int64_t ldb, float* panel) {
  __m256 r[8], u[8], v[8];
  for (int c = 0; c < 8; ++c) r[c] = _mm256_loadu_ps(rows + c * ldb);
  for (int c = 0; c < 8; c += 2) {
    u[c] = _mm256_unpacklo_ps(r[c], r[c + 1]);      // features 0 1 | 4 5 of rows c, c + 1, interleaved
    u[c + 1] = _mm256_unpackhi_ps(r[c], r[c + 1]);  // features 2 3 | 6 7
  }
  for (int c = 0; c < 8; c += 4) {
    v[c] = _mm256_shuffle_ps(u[c], u[c + 2], _MM_SHUFFLE(1, 0, 1, 0));      // feature 0 | 4 of rows c .. c + 3
    v[c + 1] = _mm256_shuffle_ps(u[c], u[c + 2], _MM_SHUFFLE(3, 2, 3, 2));  // feature 1 | 5
    v[c + 2] = _mm256_shuffle_ps(u[c + 1], u[c + 3], _MM_SHUFFLE(1, 0, 1, 0));  // feature 2 | 6
    v[c + 3] = _mm256_shuffle_ps(u[c + 1], u[c + 3], _MM_SHUFFLE(3, 2, 3, 2));  // feature 3 | 7
  }
  for (int t = 0; t < 4; ++t) {
    _mm256_storeu_ps(panel + t * kGemmPanel, _mm256_permute2f128_ps(v[t], v[t + 4], 0x20));
    _mm256_storeu_ps(panel + (t + 4) * kGemmPanel, _mm256_permute2f128_ps(v[t], v[t + 4], 0x31));
  }
}
#endif

void pack_gemm_panels(const float* b, int64_t ldb, int64_t n, int64_t d, float* packed) {
  for (int64_t j0 = 0; j0 < n; j0 += kGemmPanel) {
    float* panel = packed + j0 * d;
    const int64_t cols = std::min(kGemmPanel, n - j0);
    int64_t t0 = 0;
#if PYDC_CPU_LEVEL >= 1
    if (cols == kGemmPanel) {
      for (; t0 + 8 <= d; t0 += 8) {
        for (int64_t c = 0; c < kGemmPanel; c += 8) {
          transpose_8x8_into_panel(b + (j0 + c) * ldb + t0, ldb, panel + t0 * kGemmPanel + c);
        }
      }
    }
#endif
    for (int64_t c = 0; c < kGemmPanel; ++c) {
      const float* row = b + (j0 + c) * ldb;
      if (c < cols) {
        for (int64_t t = t0; t < d; ++t) panel[t * kGemmPanel + c] = row[t];
      } else {
        for (int64_t t = t0; t < d; ++t) panel[t * kGemmPanel + c] = 0.0f;
      }
    }
  }
}

// acc[r][h] lane l = sum over t < d of a[r * lda + t * a_step] * panel[t * panel_step + h * kFoldWidth + l], in
// feature order, with fused multiply-adds where the level has them (the products of a kRows x kGemmPanel tile).
template <int kRows>
inline void tile_products(const float* a, int64_t lda, int64_t a_step, const float* panel, int64_t panel_step,
                          int64_t d, fold_floats (&acc)[kRows][2]) {
  for (int r = 0; r < kRows; ++r) acc[r][0] = acc[r][1] = splat(0.0f);
  for (int64_t t = 0; t < d; ++t) {
    fold_floats b0, b1;
    std::memcpy(&b0, panel + t * panel_step, sizeof(b0));
    std::memcpy(&b1, panel + t * panel_step + kFoldWidth, sizeof(b1));
    for (int r = 0; r < kRows; ++r) {
      const fold_floats av = splat(a[r * lda + t * a_step]);
      acc[r][0] = fused_multiply_add(acc[r][0], av, b0);
      acc[r][1] = fused_multiply_add(acc[r][1], av, b1);
    }
  }
}

#if PYDC_CPU_LEVEL >= 1
// The full 6 x 16 tile (the bulk of every k-means GEMM) with its twelve sums in named registers, stored
// straight to `out`: kept in an array, they went through the stack before and after every tile.
inline void gemm_tile6_full(const float* a, int64_t lda, const float* panel, int64_t d, float* out, int64_t ldo) {
  fold_floats c00 = splat(0.0f), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
              c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda, *a4 = a + 4 * lda, *a5 = a + 5 * lda;
  for (int64_t t = 0; t < d; ++t) {
    fold_floats b0, b1;
    std::memcpy(&b0, panel + t * kGemmPanel, sizeof(b0));
    std::memcpy(&b1, panel + t * kGemmPanel + kFoldWidth, sizeof(b1));
    const auto row = [&](const float* ar, fold_floats& low, fold_floats& high) {
      const fold_floats v = splat(ar[t]);
      low = fused_multiply_add(low, v, b0);
      high = fused_multiply_add(high, v, b1);
    };
    row(a0, c00, c01);
    row(a1, c10, c11);
    row(a2, c20, c21);
    row(a3, c30, c31);
    row(a4, c40, c41);
    row(a5, c50, c51);
  }
  const auto store = [&](int r, const fold_floats& low, const fold_floats& high) {
    std::memcpy(out + r * ldo, &low, sizeof(low));
    std::memcpy(out + r * ldo + kFoldWidth, &high, sizeof(high));
  };
  store(0, c00, c01);
  store(1, c10, c11);
  store(2, c20, c21);
  store(3, c30, c31);
  store(4, c40, c41);
  store(5, c50, c51);
}
#endif

// out[r][c] = a[r] . panel column c for r < kRows and c < cols, summed in feature order with fused multiply-adds
// where the level has them.
template <int kRows>
inline void gemm_tile(const float* a, int64_t lda, const float* panel, int64_t d, float* out, int64_t ldo,
                      int64_t cols) {
#if PYDC_CPU_LEVEL >= 1
  if constexpr (kRows == 6) {
    if (cols == kGemmPanel) {
      gemm_tile6_full(a, lda, panel, d, out, ldo);
      return;
    }
  }
#endif
  fold_floats acc[kRows][2];
  tile_products<kRows>(a, lda, 1, panel, kGemmPanel, d, acc);
  for (int r = 0; r < kRows; ++r) {
    float* row = out + r * ldo;
    if (cols == kGemmPanel) {
      std::memcpy(row, &acc[r][0], sizeof(acc[r][0]));
      std::memcpy(row + kFoldWidth, &acc[r][1], sizeof(acc[r][1]));
    } else {
      float lanes[kGemmPanel];
      std::memcpy(lanes, &acc[r][0], sizeof(acc[r][0]));
      std::memcpy(lanes + kFoldWidth, &acc[r][1], sizeof(acc[r][1]));
      std::memcpy(row, lanes, cols * sizeof(float));
    }
  }
}

void gemm_abt_packed(const float* a, int64_t lda, int64_t m, const float* packed, int64_t n, int64_t d, float* out,
                     int64_t ldo) {
  // a group of panels (~96 KiB) stays in the core's cache while every strip of a's rows passes over it
  const int64_t panels = (n + kGemmPanel - 1) / kGemmPanel;
  const int64_t group = std::max<int64_t>(1, (96 << 10) / (kGemmPanel * std::max<int64_t>(d, 1) * sizeof(float)));
  for (int64_t g0 = 0; g0 < panels; g0 += group) {
    const int64_t g1 = std::min(panels, g0 + group);
    for (int64_t i0 = 0; i0 < m; i0 += kGemmRows) {
      const int64_t rows = std::min<int64_t>(kGemmRows, m - i0);
      for (int64_t p = g0; p < g1; ++p) {
        const int64_t cols = std::min(kGemmPanel, n - p * kGemmPanel);
        const float* panel = packed + p * kGemmPanel * d;
        const float* a_rows = a + i0 * lda;
        float* o = out + i0 * ldo + p * kGemmPanel;
        switch (rows) {
          case 6: gemm_tile<6>(a_rows, lda, panel, d, o, ldo, cols); break;
          case 5: gemm_tile<5>(a_rows, lda, panel, d, o, ldo, cols); break;
          case 4: gemm_tile<4>(a_rows, lda, panel, d, o, ldo, cols); break;
          case 3: gemm_tile<3>(a_rows, lda, panel, d, o, ldo, cols); break;
          case 2: gemm_tile<2>(a_rows, lda, panel, d, o, ldo, cols); break;
          default: gemm_tile<1>(a_rows, lda, panel, d, o, ldo, cols); break;
        }
      }
    }
  }
}

// --- float32 Gram (blas_syrk.cpp's pydc syrk) ---
// Rows of x per block: a tile's products sum kSyrkDepth terms, then are added into the Gram.
constexpr int64_t kSyrkDepth = 256;

// gram[i0 + r][j0 + c] += tile products, only where j0 + c >= i0 + r (the upper triangle) and c < cols.
// strip: rows i0 .. of the tile, feature after feature (kGemmRows floats apart). Not inlined: inlined six times
// into syrk_upper_rows at AVX2, its accumulators went to the stack on every step (0.4x the speed).
template <int kRows>
[[gnu::noinline]] void syrk_tile(const float* strip, int64_t depth, int64_t i0, const float* panel, int64_t j0,
                                  int64_t cols, float* gram, int64_t ldg) {
  fold_floats acc[kRows][2];
  tile_products<kRows>(strip, 1, kGemmRows, panel, kGemmPanel, depth, acc);
  for (int r = 0; r < kRows; ++r) {
    float* row = gram + (i0 + r) * ldg + j0;
    const int64_t first = std::max<int64_t>(0, i0 + r - j0);  // columns left of the diagonal stay untouched
    if (first == 0 && cols == kGemmPanel) {
      fold_floats g0, g1;
      std::memcpy(&g0, row, sizeof(g0));
      std::memcpy(&g1, row + kFoldWidth, sizeof(g1));
      g0 += acc[r][0];
      g1 += acc[r][1];
      std::memcpy(row, &g0, sizeof(g0));
      std::memcpy(row + kFoldWidth, &g1, sizeof(g1));
    } else {
      float lanes[kGemmPanel];
      std::memcpy(lanes, &acc[r][0], sizeof(acc[r][0]));
      std::memcpy(lanes + kFoldWidth, &acc[r][1], sizeof(acc[r][1]));
      for (int64_t c = first; c < cols; ++c) row[c] += lanes[c];
    }
  }
}

// gram[i][j] += sum over the rows t of x[t][i] x[t][j] for rows i in [row_begin, row_end) and j >= i (x: rows x d,
// ldx apart; gram: d x d, ldg apart; nothing left of the diagonal touched). Blocks of kSyrkDepth rows of x, copied
// into `scratch` (syrk_scratch_floats(d)): the columns from row_begin's panel on as panels (kGemmPanel columns,
// row after row, zeros past d) and the rows' columns as strips of kGemmRows (row after row). Read in place, the
// operands' runs lie ldx apart (8 KiB at d = 2048: one set of the L1 cache for all of them), at 0.4-0.75x the speed.
void syrk_upper_rows(const float* x, int64_t ldx, int64_t rows, int64_t d, int64_t row_begin, int64_t row_end,
                     float* gram, int64_t ldg, float* scratch) {
  if (row_begin >= row_end) return;
  const int64_t panels = (d + kGemmPanel - 1) / kGemmPanel, first_panel = row_begin / kGemmPanel;
  const int64_t group = std::max<int64_t>(1, (96 << 10) / (kGemmPanel * kSyrkDepth * sizeof(float)));
  for (int64_t t0 = 0; t0 < rows; t0 += kSyrkDepth) {
    const int64_t depth = std::min(kSyrkDepth, rows - t0);
    const float* block = x + t0 * ldx;
    float* strips = scratch + (panels - first_panel) * kGemmPanel * kSyrkDepth;
    for (int64_t i0 = row_begin; i0 < row_end; i0 += kGemmRows) {
      float* strip = strips + (i0 - row_begin) * kSyrkDepth;
      const int64_t height = std::min<int64_t>(kGemmRows, row_end - i0);
      for (int64_t t = 0; t < depth; ++t) {
        for (int64_t r = 0; r < kGemmRows; ++r) {
          strip[t * kGemmRows + r] = r < height ? block[t * ldx + i0 + r] : 0.0f;
        }
      }
    }
    for (int64_t p = first_panel; p < panels; ++p) {
      const int64_t j0 = p * kGemmPanel, cols = std::min(kGemmPanel, d - j0);
      float* panel = scratch + (p - first_panel) * kGemmPanel * kSyrkDepth;
      for (int64_t t = 0; t < depth; ++t) {
        std::memcpy(panel + t * kGemmPanel, block + t * ldx + j0, cols * sizeof(float));
        std::fill(panel + t * kGemmPanel + cols, panel + (t + 1) * kGemmPanel, 0.0f);
      }
    }
    for (int64_t g0 = first_panel; g0 < panels; g0 += group) {
      const int64_t g1 = std::min(panels, g0 + group);
      for (int64_t i0 = row_begin; i0 < row_end && i0 < g1 * kGemmPanel; i0 += kGemmRows) {
        const int64_t strip = std::min<int64_t>(kGemmRows, row_end - i0);
        for (int64_t p = std::max(g0, i0 / kGemmPanel); p < g1; ++p) {
          const int64_t j0 = p * kGemmPanel, cols = std::min(kGemmPanel, d - j0);
          const float* panel = scratch + (p - first_panel) * kGemmPanel * kSyrkDepth;
          const float* a = strips + (i0 - row_begin) * kSyrkDepth;
          switch (strip) {
            case 6: syrk_tile<6>(a, depth, i0, panel, j0, cols, gram, ldg); break;
            case 5: syrk_tile<5>(a, depth, i0, panel, j0, cols, gram, ldg); break;
            case 4: syrk_tile<4>(a, depth, i0, panel, j0, cols, gram, ldg); break;
            case 3: syrk_tile<3>(a, depth, i0, panel, j0, cols, gram, ldg); break;
            case 2: syrk_tile<2>(a, depth, i0, panel, j0, cols, gram, ldg); break;
            default: syrk_tile<1>(a, depth, i0, panel, j0, cols, gram, ldg); break;
          }
        }
      }
    }
  }
}

int64_t syrk_scratch_floats(int64_t d) {
  return ((d + kGemmPanel - 1) / kGemmPanel * kGemmPanel + (d + kGemmRows - 1) / kGemmRows * kGemmRows) * kSyrkDepth;
}

extern const CpuKernels kKernels;
const CpuKernels kKernels{
    PYDC_CPU_NAME,       kFoldWidth,           &fold_row_top2,       &fold_columns_tops,
    &update_fold_column_tops, &copy_runs_streaming, &group_min_scores,     &block_scores8,  &group_block_minima,
    &decay_group_bounds,
    &centroid_dots,      &elkan_candidates,    &elkan_anchor_row,     &dot_f64,
    &squared_distance_f64, &bf16_rounding_sq_norms, &accumulate_row,    &center_row_float,     &add_row_float,
    &normalize_row_float, &normalize_row_double, &sobel_band_u8,      &row_max_float,
    &row_max_double,     &add_quantized_float, &add_quantized_double, &gemm_packed_floats, &pack_gemm_panels,
    &gemm_abt_packed,    &syrk_upper_rows,     &syrk_scratch_floats,
};
