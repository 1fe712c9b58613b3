// One point of a bounded (Yinyang) k-means pass, written once for a team of threads: one CUDA warp per point
// (ops/cuda/kmeans_kernel.cu) or one CPU thread (SerialTeam, ops/cpu/kmeans_yinyang_pass_kernel.cpp, which
// the CPU tests run), so the tests that run without a GPU exercise the control flow and the arithmetic that
// the GPU runs. The op is kmeans_yinyang_pass (semantics in ops/kmeans.cpp); it is the CUDA form of the CPU's
// kmeans_assign_bounds (refresh) and kmeans_assign_yinyang (filter), with the same labels and bounds:
//
// refresh: every centroid is scored (float32 scores from a GEMM row); the label is the exact arg-min
//   (kmeans_cpu.h's rule: float32 top-2, fixed-order float64 settle of near-ties, ties to the lowest id) and
//   every group's lower bound is refreshed from its smallest float32 score other than the winner's.
// filter: u = the fixed-order float64 distance to the labelled centroid; every group bound decays by its
//   group's drift; a group is scored only when l_g^2 - u^2 <= twice kmeans_score_error_bound (and the own
//   centroid's group always); a point with no such group keeps its label. The scored groups give the exact
//   arg-min among them (the unscored ones are provably farther) and fresh bounds; the others keep their
//   decayed bounds.
//
// filter passes also apply the centroid-separation filter (Elkan's lemma, as the CPU's Yinyang kernel does per
//   group): d(x, j) >= d(c, j) - u for the own centroid c, so a group whose members are all at least s from c
//   (separation[own][g], from a float64 Gram matrix: yinyang_separation_row) with (s - u)^2 - u^2 > twice
//   the error bound holds only centroids farther than c: it is not scored and keeps max(decayed bound, s - u).
//
// A team of T threads scores the members of a group T at a time (thread r takes members r, r + T, ...),
// each score a sequential float32 dot product (any order is inside kmeans_score_error_bound), and merges the
// group's top-2 across the team; every team thread ends each step holding the same values, and the leader
// (thread 0) writes, after a team barrier where the others may still read what it overwrites. The float64
// sums run in the 8-lane fixed order of the CPU kernels' dot_f64 and squared_distance_f64
// (cpu_kernels_impl.h) without contraction, so both devices compute the same bits.
#pragma once

#include <cstdint>

#include "common/hd.h"
#include "common/kmeans_math.h"

namespace pydc {

constexpr int kYinyangMaxGroups = 64;  // the group flags of a point are one 64-bit mask
constexpr double kYinyangRoundUp = 1.0 + 1e-12;  // a float64 square root of a float64 sum errs far below 1e-12

// float64 arithmetic that nvcc may not fuse (the CPU kernels are built with fp-contract=off).
PYDC_HD double f64_mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

PYDC_HD double f64_add(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

PYDC_HD double kmeans_sum_lanes8(const double* lane) {
  return f64_add(f64_add(f64_add(lane[0], lane[1]), f64_add(lane[2], lane[3])),
                 f64_add(f64_add(lane[4], lane[5]), f64_add(lane[6], lane[7])));
}

// sum_t a[t] b[t] in float64, term t added to lane t mod 8 in order, the lanes summed as a tree: the bits of
// the CPU kernels' dot_f64.
PYDC_HD double kmeans_dot_f64(const float* a, const float* b, int64_t d) {
  double lane[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  for (int64_t t = 0; t < d; ++t) {
    lane[t & 7] = f64_add(lane[t & 7], f64_mul(static_cast<double>(a[t]), static_cast<double>(b[t])));
  }
  return kmeans_sum_lanes8(lane);
}

// sum_t (a[t] - b[t])^2 in float64, in the same order: the bits of the CPU kernels' squared_distance_f64.
PYDC_HD double kmeans_squared_distance_f64(const float* a, const float* b, int64_t d) {
  double lane[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  for (int64_t t = 0; t < d; ++t) {
    const double diff = f64_add(static_cast<double>(a[t]), -static_cast<double>(b[t]));
    lane[t & 7] = f64_add(lane[t & 7], f64_mul(diff, diff));
  }
  return kmeans_sum_lanes8(lane);
}

// Row p of the separation table: for each group g, a lower bound (float32, rounded down) on the distance from
// centroid p to every other member of g (+inf for none), from the float64 squared norms (sorted positions) and
// row p of the float64 Gram matrix of the sorted centroids. A NaN pair gives 0 (never skips).
PYDC_HD void yinyang_separation_row(int64_t p, const double* sq_norms_f64, const double* gram_row,
                                    const int64_t* group_of, int64_t k, int64_t d, int64_t groups, float* out) {
  for (int64_t g = 0; g < groups; ++g) out[g] = kKMeansInf;
  for (int64_t j = 0; j < k; ++j) {
    if (j == p) continue;
    const float lower = centroid_separation_bound(sq_norms_f64[p], sq_norms_f64[j], gram_row[j], d);
    float& slot = out[group_of[j]];
    slot = lower < slot ? lower : slot;
  }
}

// A lower bound on d(x, j) for every centroid j at least `separation` from the own centroid, u >= d(x, own).
PYDC_HD double yinyang_separated_lower_bound(double separation, double upper) { return separation - upper; }

// Whether centroids at least `separation` from the own centroid are provably farther from the point than the
// own centroid (u >= its distance), with the margin of the group test (the CPU's Yinyang kernel's test too).
PYDC_HD bool yinyang_separation_skips(double separation, double upper, double margin) {
  const double lower = yinyang_separated_lower_bound(separation, upper);
  return lower > 0.0 && lower * lower - upper * upper > margin;
}

// A group's lower bound after its centroids moved by at most drift (NaN bounds decay to 0).
PYDC_HD double yinyang_decayed_bound(double lower, double drift) {
  const double decayed = lower - drift;
  return 0.0 < decayed ? decayed : 0.0;
}

// A team of one: the CPU kernel's thread.
struct SerialTeam {
  PYDC_HD int rank() const { return 0; }
  PYDC_HD int size() const { return 1; }
  PYDC_HD bool leader() const { return true; }
  PYDC_HD void sync() const {}
  PYDC_HD void merge(KMeansTopK<2>&) const {}
  PYDC_HD void merge_settle(double&, int64_t&, int64_t&) const {}
};

// What a pass reads and writes; centroids are sorted by group (group g = positions offsets[g] ..
// offsets[g + 1] - 1, ids[p] the original index of position p, position_of its inverse).
struct YinyangPassArgs {
  const float* x = nullptr;            // (N, d)
  const float* x_sq_norms = nullptr;   // (N,) float32
  const float* centroids = nullptr;    // (k, d) sorted
  const float* sq_norms = nullptr;     // (k,) float32 squared norms of the sorted centroids
  const double* sq_norms_f64 = nullptr;  // (k,) kmeans_dot_f64(c, c)
  const int64_t* ids = nullptr;        // (k,)
  const int64_t* position_of = nullptr;  // (k,)
  const int64_t* offsets = nullptr;    // (G + 1,)
  const int64_t* group_of = nullptr;   // (k,) group of each position
  const double* group_drift = nullptr;  // (G,) filter passes only
  const float* separation = nullptr;   // (k, G) filter passes: yinyang_separation_row of every position
  int64_t* labels = nullptr;           // (N,) original indices: in (filter) and out
  double* group_lower = nullptr;       // (N, G): in (filter) and out
  double* distances = nullptr;         // (N,) out: squared distance to the new label's centroid
  double* upper = nullptr;             // (N,) out: upper bound on the distance to it
  double max_norm = 0.0;               // largest centroid norm (sqrt of the largest sq_norms_f64)
  int64_t k = 0, d = 0, groups = 0;
};

// Per point: each scored group's smallest score, its position and the group's second-smallest score. Written
// and read by the team's leader only (the CUDA kernel keeps one per warp in shared memory, not 32 copies in
// local memory).
struct YinyangGroupTops {
  float min[kYinyangMaxGroups];
  float second[kYinyangMaxGroups];
  int32_t position[kYinyangMaxGroups];  // k < 2^31 (checked by the op)
};

struct YinyangPointCounts {
  int64_t rows = 0;    // 1 when any score of the point was computed
  int64_t scores = 0;  // centroid scores computed
};

// The pass for point i; score(j) is the float32 kmeans_score of position j for this point (from a GEMM row
// or a dot product of its own). Returns what it computed (every team thread returns the same).
template <typename Team, typename Score>
PYDC_HD YinyangPointCounts yinyang_pass_point(const Team& team, const YinyangPassArgs& a, int64_t i, bool refresh,
                                              const Score& score, YinyangGroupTops& tops) {
  const int64_t d = a.d, groups = a.groups;
  const float* x = a.x + i * d;
  const float point_norm = a.x_sq_norms[i];
  const double error = kmeans_score_error_bound(point_norm, a.max_norm, d);
  const double margin = 2.0 * error;
  double* lower = a.group_lower + i * groups;
  uint64_t need = groups == 64 ? ~uint64_t{0} : (uint64_t{1} << groups) - 1;
  if (!refresh) {
    const int64_t label = a.labels[i];
    // a label outside [0, k) (the CUDA kernel cannot stop on it without a sync) scores every group
    if (label >= 0 && label < a.k) {
      const int64_t own = a.position_of[label];
      const double own_sq = kmeans_squared_distance_f64(x, a.centroids + own * d, d);
      const double upper = sqrt(own_sq) * kYinyangRoundUp;
      const double upper_sq = upper * upper;
      need = 0;
      for (int64_t g = 0; g < groups; ++g) {
        const double l = yinyang_decayed_bound(lower[g], a.group_drift[g]);
        if (!(l * l - upper_sq > margin)) need |= uint64_t{1} << g;
      }
      const float* separation = a.separation != nullptr ? a.separation + own * groups : nullptr;
      uint64_t separated = 0;
      if (separation != nullptr) {
        for (int64_t g = 0; g < groups; ++g) {
          if (((need >> g) & 1) && yinyang_separation_skips(separation[g], upper, margin)) {
            separated |= uint64_t{1} << g;
          }
        }
        need &= ~separated;
      }
      team.sync();  // every thread has read the bounds (and so computes the same flags) before they change
      if (team.leader()) {
        for (int64_t g = 0; g < groups; ++g) {
          double l = yinyang_decayed_bound(lower[g], a.group_drift[g]);
          if ((separated >> g) & 1) {
            const double s = yinyang_separated_lower_bound(separation[g], upper);
            l = s > l ? s : l;
          }
          lower[g] = l;
        }
      }
      if (need == 0) {  // the global filter: the label stays
        if (team.leader()) {
          a.distances[i] = own_sq;
          a.upper[i] = upper;
        }
        return {};
      }
      need |= uint64_t{1} << a.group_of[own];
    }
  }
  // Score the needed groups: each group's top-2 (score, position), and the point's top-2 over all of them.
  KMeansTopK<2> best;
  best.reset();
  YinyangPointCounts counts;
  counts.rows = 1;
  for (int64_t g = 0; g < groups; ++g) {
    if (!((need >> g) & 1)) continue;
    KMeansTopK<2> top;
    top.reset();
    for (int64_t j = a.offsets[g] + team.rank(); j < a.offsets[g + 1]; j += team.size()) top.insert(score(j), j);
    team.merge(top);
    if (team.leader()) {
      tops.min[g] = top.score[0];
      tops.position[g] = static_cast<int32_t>(top.index[0]);
      tops.second[g] = top.score[1];
    }
    best.insert(top.score[0], top.index[0]);
    best.insert(top.score[1], top.index[1]);
    counts.scores += a.offsets[g + 1] - a.offsets[g];
  }
  int64_t position = best.index[0];
  float winner_score = best.score[0];
  if (kmeans_needs_settle(best.score[0], best.score[1], point_norm, a.max_norm, d)) {
    // the fixed-order float64 winner among the scored centroids within the margin of the float32 best (every
    // other centroid is provably farther: kmeans_settle_near_best, kmeans_cpu.h)
    double settled = kKMeansInf;
    int64_t settled_position = 0, settled_id = a.ids[0];
    for (int64_t g = 0; g < groups; ++g) {
      if (!((need >> g) & 1)) continue;
      for (int64_t j = a.offsets[g] + team.rank(); j < a.offsets[g + 1]; j += team.size()) {
        if (static_cast<double>(score(j)) - static_cast<double>(best.score[0]) > margin) continue;
        const double s = f64_add(a.sq_norms_f64[j], -2.0 * kmeans_dot_f64(x, a.centroids + j * d, d));
        const int64_t id = a.ids[j];
        if (s < settled || (s == settled && id < settled_id)) {
          settled = s;
          settled_position = j;
          settled_id = id;
        }
      }
    }
    team.merge_settle(settled, settled_position, settled_id);
    position = settled_position;
    winner_score = static_cast<float>(settled);
  }
  if (!team.leader()) return counts;
  const bool finite = fabsf(best.score[0]) <= 3.40282347e38f;
  a.labels[i] = finite ? a.ids[position] : 0;  // no finite score (a NaN point): label 0, as kmeans_assign gives
  a.distances[i] = static_cast<double>(kmeans_distance(point_norm, winner_score));
  const double point_sq = static_cast<double>(point_norm);
  const double norm_rounding = kmeans_norm_rounding(d);
  // The winner's exact score is at most the float32 best + error (or, settled, within float64 rounding of a
  // score at most that): 2 * error covers both (kmeans_assign_bounds).
  const double upper_sq = point_sq * (1.0 + norm_rounding) + static_cast<double>(best.score[0]) + margin;
  const double upper = sqrt(upper_sq > 0.0 ? upper_sq : 0.0);
  a.upper[i] = upper <= 1.7976931348623157e308 ? upper : kKMeansInf;  // NaN: +inf, scored every pass
  const int64_t winner_group = a.group_of[position];
  for (int64_t g = 0; g < groups; ++g) {
    if (!((need >> g) & 1)) continue;
    // the group's smallest score other than the winner's
    const float others = g == winner_group && tops.position[g] == position ? tops.second[g] : tops.min[g];
    lower[g] = kmeans_group_lower_bound(point_sq, norm_rounding, others, error);
  }
  return counts;
}

// Score sources: the float32 score of sorted position j for one point.
struct RowScore {  // from the point's row of a GEMM, x . c_j for every j
  const float* dots;
  const float* sq_norms;
  PYDC_HD float operator()(int64_t j) const { return kmeans_score(sq_norms[j], dots[j]); }
};

struct DotScore {  // a sequential float32 dot product; centroid j's feature t at centroids[t * t_stride + j * j_stride]
  const float* x;
  const float* centroids;
  const float* sq_norms;
  int64_t d, t_stride, j_stride;
  PYDC_HD float operator()(int64_t j) const {
    float dot = 0.0f;
    for (int64_t t = 0; t < d; ++t) dot += x[t] * centroids[t * t_stride + j * j_stride];
    return kmeans_score(sq_norms[j], dot);
  }
};

}  // namespace pydc
