// CPU kernel of one bounded (Yinyang) assignment pass after the first, pydc/cluster/kmeans_bounded.py:
//
// kmeans_assign_yinyang(x, centroids, centroid_ids, group_offsets, x_sq_norms, group_drift,
//                       labels(a!), group_lower(b!)) -> (distances, counts)
//   centroids are stored sorted by group as in kmeans_assign_bounds (ops/cpu/kmeans_bounded_kernel.cpp);
//   labels (N,) int64 hold every point's label under the previous centroids (original indices) and
//   group_lower (N, G) float64 the bounds kmeans_assign_bounds or this op left for them. group_drift (G,)
//   float64 bounds how far any centroid of each group moved since (rounded up). On return labels are the
//   labels kmeans_assign would give for `centroids`, group_lower holds valid bounds for them, distances (N,)
//   float64 the squared distance of every point to its new centroid, counts (2,) int64 = (points whose
//   scores were computed, centroid scores computed).
//
// Per point: the exact (fixed-order float64) distance u to its labelled centroid; every group bound
// decays by its group's drift. The global filter: when every group bound l_g satisfies l_g^2 - u^2 > twice
// kmeans_score_error_bound, no centroid can be as near as the own one and the point is done (as in
// kmeans_assign's settle rule, the margin keeps the decision exact). Otherwise the local filter: only the
// groups that fail that test, and the own centroid's group, are scored (float32, block_scores8), in
// blocks of 8 centroids transposed once per call, points gathered per group so that a block stays in L1
// while every point that needs it is scored. Every centroid outside those groups is provably farther than
// the own one, so the exact arg-min is among the scored ones: the float32 top-2 and the float64 settle of
// near-ties (kmeans_cpu.h) give exactly kmeans_assign's label. The scored groups' bounds are refreshed
// from their float32 scores as kmeans_assign_bounds does; the others keep their decayed bounds, valid
// because neither the old nor the new label lies in them.
//
// The centroid-separation filter (Elkan's lemma, Elkan ICML 2003): for the own centroid c, any centroid j
// and the point x, d(x, j) >= d(c, j) - d(x, c) (triangle inequality). Once per call the distance from
// every centroid to the nearest other member of every block of 8 (and of every group) is bounded from below
// (CentroidSeparation, from a float64 Gram matrix); a group or a block whose separation s from the own
// centroid gives (s - u)^2 - u^2 > twice kmeans_score_error_bound (the margin of the group test) holds only
// centroids farther than the own one and is not scored. A group dropped so keeps the larger of its decayed
// bound and s - u (both valid for all its members); a block skipped inside a scored group is +inf in the
// row's scores (never best nor runner-up: provably farther) and the group's refreshed bound is the smaller
// of its scored members' bound and s - u of the skipped blocks. The own centroid's block is always scored.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "common/checks.h"
#include "common/kmeans_math.h"
#include "common/kmeans_yinyang_pass.h"
#include "ops/cpu/cpu_kernels.h"
#include "ops/cpu/kmeans_cpu.h"

namespace pydc {
namespace {

constexpr const char* kYinyang = "pydc::kmeans_assign_yinyang";
constexpr int64_t kBlockWidth = 8;   // centroids per transposed block (block_scores8)
constexpr int64_t kChunkRows = 128;  // points scored together: chunk x padded k floats of scores (~600 KB)
constexpr double kRoundUp = 1.0 + 1e-12;  // a float64 square root of a float64 sum: error far below 1e-12
constexpr int64_t kMaxSeparationBytes = int64_t{256} << 20;  // above, the separation filter is off (k > ~22k)

// The centroids of every group in blocks of kBlockWidth, transposed (feature-major), padded with zero
// centroids whose norm is +inf (their scores never win). A group's blocks are scored in pairs from its first
// (block_scores8 with n_blocks 2; an odd group's last block alone), and a pair is stored interleaved by feature:
// d x 16 floats, feature t of both blocks together (cpu_kernels.h).
struct TransposedBlocks {
  std::vector<float> values;         // blocks x d x 8 in all: a pair's 2 x d x 8 as d x (2 x 8)
  std::vector<float> sq_norms;       // blocks x 8
  std::vector<int64_t> first;        // sorted position of each block's lane 0
  std::vector<int64_t> width;        // real centroids in each block
  std::vector<int64_t> group_block;  // blocks of group g: group_block[g] .. group_block[g + 1] - 1
};

TransposedBlocks transpose_blocks(const float* centroids, const float* sq_norms, const int64_t* offsets,
                                  int64_t groups, int64_t d) {
  TransposedBlocks blocks;
  blocks.group_block.push_back(0);
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t j = offsets[g]; j < offsets[g + 1]; j += kBlockWidth) {
      blocks.first.push_back(j);
      blocks.width.push_back(std::min(kBlockWidth, offsets[g + 1] - j));
    }
    blocks.group_block.push_back(static_cast<int64_t>(blocks.first.size()));
  }
  const int64_t count = static_cast<int64_t>(blocks.first.size());
  std::vector<int64_t> group_of_block(count);
  for (int64_t g = 0; g < groups; ++g) {
    std::fill(group_of_block.begin() + blocks.group_block[g], group_of_block.begin() + blocks.group_block[g + 1], g);
  }
  blocks.values.assign(count * d * kBlockWidth, 0.0f);
  blocks.sq_norms.assign(count * kBlockWidth, kKMeansInf);
  at::parallel_for(0, count, 16, [&](int64_t b_begin, int64_t b_end) {
    for (int64_t b = b_begin; b < b_end; ++b) {
      // the pair holding b (pairs start at every other block from the group's first) and b's place in it
      const int64_t g = group_of_block[b], in_pair = (b - blocks.group_block[g]) % 2;
      const int64_t pair_start = b - in_pair;
      const int64_t pair_blocks = std::min<int64_t>(2, blocks.group_block[g + 1] - pair_start);
      float* out = blocks.values.data() + pair_start * d * kBlockWidth + in_pair * kBlockWidth;
      for (int64_t l = 0; l < blocks.width[b]; ++l) {
        const float* c = centroids + (blocks.first[b] + l) * d;
        for (int64_t t = 0; t < d; ++t) out[t * pair_blocks * kBlockWidth + l] = c[t];
        blocks.sq_norms[b * kBlockWidth + l] = sq_norms[blocks.first[b] + l];
      }
    }
  });
  return blocks;
}

// Calls fn(sorted position, column in a row of block scores) for every centroid of group g.
template <typename Fn>
void for_each_member(const TransposedBlocks& blocks, int64_t g, Fn fn) {
  for (int64_t b = blocks.group_block[g]; b < blocks.group_block[g + 1]; ++b) {
    for (int64_t l = 0; l < blocks.width[b]; ++l) fn(blocks.first[b] + l, b * kBlockWidth + l);
  }
}

// Lower bounds on the distance from each centroid p (sorted position) to the nearest OTHER member of each
// block (block_min[p * blocks + b]) and of each group (group_min[p * groups + g]), +inf where there is none.
// The squared distance ||c_p||^2 + ||c_j||^2 - 2 c_p.c_j comes from a float64 Gram matrix of the float32
// centroids, bounded from below by centroid_separation_bound (kmeans_cpu.h).
struct CentroidSeparation {
  bool enabled = false;
  std::vector<float> block_min;
  std::vector<float> group_min;
  // per centroid: the largest finite block_min (0 if none); a point that this cannot skip can skip no
  // group or block, so most points of unstructured data pay one test instead of one per group and block
  std::vector<float> largest;
};

CentroidSeparation centroid_separation(const at::Tensor& centroids, const TransposedBlocks& blocks,
                                       const std::vector<int64_t>& group_of, int64_t groups) {
  CentroidSeparation separation;
  const int64_t k = centroids.size(0), d = centroids.size(1);
  const int64_t n_blocks = static_cast<int64_t>(blocks.first.size());
  if (static_cast<double>(k) * static_cast<double>(n_blocks + groups) * sizeof(float) > kMaxSeparationBytes) {
    return separation;
  }
  separation.enabled = true;
  separation.block_min.assign(k * n_blocks, kKMeansInf);
  separation.group_min.assign(k * groups, kKMeansInf);
  separation.largest.assign(k, 0.0f);
  std::vector<int64_t> block_of(k);
  for (int64_t b = 0; b < n_blocks; ++b) {
    std::fill(block_of.begin() + blocks.first[b], block_of.begin() + blocks.first[b] + blocks.width[b], b);
  }
  kmeans_centroid_gram_rows(centroids, [&](int64_t p, const double* norm, const double* dot_row) {
    float* block_row = separation.block_min.data() + p * n_blocks;
    float* group_row = separation.group_min.data() + p * groups;
    for (int64_t j = 0; j < k; ++j) {
      if (j == p) continue;
      const float lower = centroid_separation_bound(norm[p], norm[j], dot_row[j], d);  // NaN: 0, never skips
      float& b = block_row[block_of[j]];
      b = std::min(b, lower);
      float& g = group_row[group_of[j]];
      g = std::min(g, lower);
    }
    float largest = 0.0f;
    for (int64_t b = 0; b < n_blocks; ++b) {
      largest = std::isfinite(block_row[b]) ? std::max(largest, block_row[b]) : largest;
    }
    separation.largest[p] = largest;
  });
  return separation;
}

// kmeans_settle_near_best (kmeans_cpu.h) over the needed groups' scored centroids of a row of block scores.
int64_t settle_among_scored(const float* x, const float* centroids, const double* sq_norms_f64, const int64_t* ids,
                            int64_t d, const TransposedBlocks& blocks, const float* row_scores, const uint8_t* need,
                            int64_t groups, float best_score, double margin, double* score) {
  return kmeans_settle_near_best(x, centroids, sq_norms_f64, ids, d, best_score, margin, score, [&](auto fn) {
    for (int64_t g = 0; g < groups; ++g) {
      if (!need[g]) continue;
      for_each_member(blocks, g, [&](int64_t j, int64_t column) { fn(j, row_scores[column]); });
    }
  });
}

std::tuple<at::Tensor, at::Tensor> kmeans_assign_yinyang_cpu(const at::Tensor& x_in, const at::Tensor& centroids_in,
                                                            const at::Tensor& ids_in, const at::Tensor& offsets_in,
                                                            const at::Tensor& norms_in, const at::Tensor& drift_in,
                                                            const at::Tensor& labels, const at::Tensor& lower) {
  const int64_t groups = check_grouped_centroids(kYinyang, x_in, centroids_in, ids_in, offsets_in, norms_in);
  const int64_t n = x_in.size(0), k = centroids_in.size(0), d = x_in.size(1);
  PYDC_CHECK_DTYPE(kYinyang, "group_drift", drift_in, at::kDouble);
  PYDC_CHECK_DTYPE(kYinyang, "labels", labels, at::kLong);
  PYDC_CHECK_DTYPE(kYinyang, "group_lower", lower, at::kDouble);
  TORCH_CHECK(drift_in.dim() == 1 && drift_in.size(0) == groups, kYinyang, ": expected group_drift of shape (",
              groups, ",), got ", describe(drift_in));
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n && labels.is_contiguous(), kYinyang,
              ": expected contiguous labels of shape (", n, ",), got ", describe(labels));
  TORCH_CHECK(lower.dim() == 2 && lower.size(0) == n && lower.size(1) == groups && lower.is_contiguous(), kYinyang,
              ": expected contiguous group_lower of shape (", n, ", ", groups, "), got ", describe(lower));
  const at::Tensor x = x_in.contiguous(), centroids = centroids_in.contiguous(), norms = norms_in.contiguous();
  const at::Tensor ids_t = ids_in.contiguous(), offsets_t = offsets_in.contiguous(), drift_t = drift_in.contiguous();
  const int64_t* ids = ids_t.const_data_ptr<int64_t>();
  const int64_t* offsets = offsets_t.const_data_ptr<int64_t>();
  const double* drift = drift_t.const_data_ptr<double>();
  std::vector<int64_t> position_of(k, -1), group_of(k);
  for (int64_t j = 0; j < k; ++j) {
    TORCH_CHECK(ids[j] >= 0 && ids[j] < k && position_of[ids[j]] < 0, kYinyang,
                ": expected centroid_ids to be a permutation of 0 .. k - 1, got centroid_ids[", j, "] = ", ids[j]);
    position_of[ids[j]] = j;
  }
  for (int64_t g = 0; g < groups; ++g) std::fill(group_of.begin() + offsets[g], group_of.begin() + offsets[g + 1], g);
  int64_t* label = labels.mutable_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(label[i] >= 0 && label[i] < k, kYinyang, ": expected labels in [0, ", k, "), got labels[", i,
                "] = ", label[i]);
  }
  at::Tensor distances = at::empty({n}, x.options().dtype(at::kDouble));
  at::Tensor counts = at::zeros({2}, x.options().dtype(at::kLong));
  if (n == 0) return {distances, counts};

  const KMeansCentroidInfo info = kmeans_centroid_info(centroids);
  const float* xs = x.const_data_ptr<float>();
  const float* cs = centroids.const_data_ptr<float>();
  const float* pn = norms.const_data_ptr<float>();
  double* lower_all = lower.mutable_data_ptr<double>();
  double* distance_out = distances.mutable_data_ptr<double>();
  const CpuKernels& kernels = cpu_kernels();
  const double norm_rounding = kmeans_norm_rounding(d);
  const TransposedBlocks blocks =
      transpose_blocks(cs, info.sq_norms.const_data_ptr<float>(), offsets, groups, d);
  const int64_t n_blocks = static_cast<int64_t>(blocks.first.size());
  const int64_t padded_k = n_blocks * kBlockWidth;
  // Every point's exact distance to its own centroid first: when no point's own centroid is far enough
  // from any centroid to pass the separation test (||c|| + max ||c_j|| bounds every separation; unstructured
  // data), the Gram matrix is not computed at all.
  std::vector<double> own_sq_all(n);
  std::atomic<int64_t> may_separate{0};
  at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
    int64_t count = 0;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t own = position_of[label[i]];
      own_sq_all[i] = kernels.squared_distance_f64(xs + i * d, cs + own * d, d);
      const double farthest = std::sqrt(info.sq_norms_f64[own]) + info.max_norm;
      count += yinyang_separation_skips(farthest * kRoundUp, std::sqrt(own_sq_all[i]) * kRoundUp,
                                        2.0 * kmeans_score_error_bound(pn[i], info.max_norm, d));
    }
    may_separate += count;
  });
  const CentroidSeparation separation = may_separate.load() > 0
                                            ? centroid_separation(centroids, blocks, group_of, groups)
                                            : CentroidSeparation{};
  std::vector<int64_t> block_of(k);
  for (int64_t b = 0; b < n_blocks; ++b) {
    std::fill(block_of.begin() + blocks.first[b], block_of.begin() + blocks.first[b] + blocks.width[b], b);
  }
  std::atomic<int64_t> rows_computed{0}, scores_computed{0};

  at::parallel_for(0, n, kChunkRows, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(kChunkRows * padded_k);
    std::vector<uint8_t> needed(kChunkRows * groups);
    std::vector<int64_t> active;                 // chunk rows that fail the global filter
    std::vector<int64_t> members(kChunkRows);    // active rows that need the group being scored
    std::vector<const float*> row_pointers;
    std::vector<float*> score_pointers;
    std::vector<double> error(kChunkRows), upper_of(kChunkRows);
    std::vector<int64_t> own_of(kChunkRows);
    std::vector<uint8_t> separable(kChunkRows);  // whether the separation filter can skip anything for the row
    std::vector<double> skipped_min(kChunkRows * groups);  // per row and group: separation of skipped blocks
    std::vector<float> group_min(groups);
    int64_t chunk_rows = 0, chunk_scores = 0;
    for (int64_t c0 = begin; c0 < end; c0 += kChunkRows) {
      const int64_t c1 = std::min(end, c0 + kChunkRows);
      active.clear();
      for (int64_t i = c0; i < c1; ++i) {
        const int64_t r = i - c0, own = position_of[label[i]];
        const double own_sq = own_sq_all[i];
        const double upper = std::sqrt(own_sq) * kRoundUp;
        error[r] = kmeans_score_error_bound(pn[i], info.max_norm, d);
        uint8_t* need = needed.data() + r * groups;
        distance_out[i] = own_sq;
        // NaN bounds (never stored: kmeans_group_lower_bound gives 0) would decay to 0
        double* lower_row = lower_all + i * groups;
        if (!kernels.decay_group_bounds(lower_row, drift, groups, upper * upper, 2.0 * error[r], need)) {
          continue;  // the global filter: the label stays
        }
        bool any = false;
        separable[r] = separation.enabled && yinyang_separation_skips(separation.largest[own], upper, 2.0 * error[r]);
        if (separable[r]) {
          const float* separation_row = separation.group_min.data() + own * groups;
          for (int64_t g = 0; g < groups; ++g) {
            if (need[g] && yinyang_separation_skips(separation_row[g], upper, 2.0 * error[r])) {
              need[g] = 0;
              lower_row[g] = std::max(lower_row[g], yinyang_separated_lower_bound(separation_row[g], upper));
            }
            any |= need[g] != 0;
          }
          if (!any) continue;  // the global filter with the separation bounds
        }
        need[group_of[own]] = 1;
        own_of[r] = own;
        upper_of[r] = upper;
        std::fill(skipped_min.begin() + r * groups, skipped_min.begin() + (r + 1) * groups, kKMeansInf);
        active.push_back(r);
      }
      // Score the needed groups, a group's blocks at a time for all active rows that need it.
      for (int64_t g = 0; g < groups; ++g) {
        int64_t member_count = 0;  // without a branch: whether a row needs a group is a coin toss here
        for (const int64_t r : active) {
          members[member_count] = r;
          member_count += needed[r * groups + g];
        }
        if (member_count == 0) continue;
        for (int64_t b = blocks.group_block[g]; b < blocks.group_block[g + 1]; b += 2) {
          const int64_t pair = std::min<int64_t>(2, blocks.group_block[g + 1] - b);
          row_pointers.clear();
          score_pointers.clear();
          for (int64_t m = 0; m < member_count; ++m) {
            const int64_t r = members[m];
            float* row_scores = scores.data() + r * padded_k + b * kBlockWidth;
            const int64_t own_block = block_of[own_of[r]];
            if (separable[r] && own_block != b && own_block != b + pair - 1) {
              const float* separation_row = separation.block_min.data() + own_of[r] * n_blocks + b;
              const float nearest = pair == 2 ? std::min(separation_row[0], separation_row[1]) : separation_row[0];
              if (yinyang_separation_skips(nearest, upper_of[r], 2.0 * error[r])) {  // provably farther: +inf scores
                std::fill(row_scores, row_scores + pair * kBlockWidth, kKMeansInf);
                double& skipped = skipped_min[r * groups + g];
                skipped = std::min(skipped, static_cast<double>(nearest));
                continue;
              }
            }
            row_pointers.push_back(xs + (c0 + r) * d);
            score_pointers.push_back(row_scores);
          }
          if (row_pointers.empty()) continue;
          const int64_t scored_rows = static_cast<int64_t>(row_pointers.size());
          kernels.block_scores8(row_pointers.data(), scored_rows, blocks.values.data() + b * d * kBlockWidth, pair,
                                blocks.sq_norms.data() + b * kBlockWidth, d, score_pointers.data());
          for (int64_t q = b; q < b + pair; ++q) chunk_scores += blocks.width[q] * scored_rows;
        }
      }
      // Per active row: top-2 over the scored centroids (the best group's minimum and the runner-up among
      // the other groups' minima and the best group's other members), settle near-ties, refresh the scored
      // groups' bounds.
      for (const int64_t r : active) {
        const int64_t i = c0 + r;
        const float* row_scores = scores.data() + r * padded_k;
        const uint8_t* need = needed.data() + r * groups;
        // +inf for the groups not scored, then the best group (the first of the smallest minimum) and the
        // smallest of the others' minima in three passes without a branch on `need` (a coin toss per group)
        std::fill(group_min.begin(), group_min.end(), kKMeansInf);
        kernels.group_block_minima(row_scores, blocks.group_block.data(), need, groups, group_min.data());
        float best = kKMeansInf, second = kKMeansInf;
        for (int64_t g = 0; g < groups; ++g) best = group_min[g] < best ? group_min[g] : best;
        int64_t best_group = -1;
        if (best < kKMeansInf) {
          best_group = std::find(group_min.begin(), group_min.end(), best) - group_min.begin();
          for (int64_t g = 0; g < groups; ++g) {
            second = (g != best_group && group_min[g] < second) ? group_min[g] : second;
          }
        }
        int64_t position = 0;
        if (best_group >= 0) {
          position = -1;
          for_each_member(blocks, best_group, [&](int64_t j, int64_t column) {
            const float s = row_scores[column];
            if (position < 0 && s == best) {
              position = j;
            } else if (s < second) {
              second = s;
            }
          });
        }
        float score = best;
        if (kmeans_needs_settle(best, second, pn[i], info.max_norm, d)) {
          double exact;
          position = settle_among_scored(xs + i * d, cs, info.sq_norms_f64.data(), ids, d, blocks, row_scores, need,
                                         groups, best, 2.0 * error[r], &exact);
          score = static_cast<float>(exact);
        }
        // no finite score at all (a NaN point): label 0, as kmeans_assign gives
        label[i] = std::isfinite(best) ? ids[position] : 0;
        distance_out[i] = kmeans_distance(pn[i], score);
        const double point_sq = static_cast<double>(pn[i]);
        double* lower_row = lower_all + i * groups;
        const int64_t winner_group = group_of[position];
        for (int64_t g = 0; g < groups; ++g) {
          if (!need[g]) continue;
          float others_min = group_min[g];
          if (g == winner_group) {  // every member but the winner
            others_min = kKMeansInf;
            for_each_member(blocks, g, [&](int64_t j, int64_t column) {
              const float s = row_scores[column];
              others_min = (s < others_min && j != position) ? s : others_min;
            });
          }
          lower_row[g] = std::min(kmeans_group_lower_bound(point_sq, norm_rounding, others_min, error[r]),
                                  yinyang_separated_lower_bound(skipped_min[r * groups + g], upper_of[r]));
        }
      }
      chunk_rows += static_cast<int64_t>(active.size());
    }
    rows_computed += chunk_rows;
    scores_computed += chunk_scores;
  });
  int64_t* count = counts.mutable_data_ptr<int64_t>();
  count[0] = rows_computed.load();
  count[1] = scores_computed.load();
  return {distances, counts};
}

}  // namespace
}  // namespace pydc

TORCH_LIBRARY_IMPL(pydc, CPU, m) { m.impl("kmeans_assign_yinyang", &pydc::kmeans_assign_yinyang_cpu); }
