// CPU kernel of one assignment pass of bounded k-means with one lower bound per (point, centroid) (Elkan,
// ICML 2003), pydc/cluster/kmeans_elkan.py:
//
// kmeans_assign_elkan(x, centroids, x_sq_norms, drift_offsets, max_drift, dense_fraction,
//                     labels(a!), anchors(b!), second(c!)) -> (distances, counts)
//   drift_offsets (k,) float64: every centroid's cumulative drift D_j (an upper bound on the sum of its moves
//   since the first pass, rounded up, non-decreasing); max_drift: an upper bound on the largest move of any
//   centroid since the last pass. labels (N,) int64: the labels of the last pass; anchors (N, k) float32:
//   anchors[i, j] - D_j <= d(x_i, c_j) for every pair (kmeans_math.h, elkan_anchor); second (N,) float64: a
//   lower bound on the distance from x_i to every centroid but its own, as of the last pass. When a sample of
//   the points shows more than dense_fraction of all pairs to score (0: always; the first pass, where labels,
//   anchors and second are outputs only), the pass scores every pair by BLAS GEMM (the dense pass) and sets
//   every anchor. On return labels are the labels kmeans_assign would give for `centroids` and the bounds
//   hold for them; distances (N,) float64: squared distance of every point to its new centroid; counts (3,)
//   int64 = (points whose scores were computed, point-centroid scores computed, 1 for a dense pass).
//
// Per point: the exact (fixed-order float64) distance u to its labelled centroid and the threshold
// t = sqrt(u^2 + 2 e) (e = kmeans_score_error_bound): a centroid whose lower bound exceeds t is farther than
// the own centroid by more than the margin that makes a float32 decision exact (as in kmeans_assign's
// settle rule and the Yinyang filter). The point-level filter (Hamerly): when `second`, decayed by max_drift,
// exceeds t, the label stays and nothing is scored. Otherwise its row of anchors is scanned (elkan_candidates):
// the centroids whose bound is at most t, and whose separation from the own centroid does not prove them
// farther (d(x, j) >= d(c, j) - u; a float64 Gram matrix per pass, k <= 4096, only when some point can use
// it), are scored in float32 (gathered_scores; the own centroid always is, its bound being at most u). Every
// other centroid is provably farther than the own one, so the exact arg-min is among the scored ones: the
// float32 top-2 and a float64 settle of near-ties among the scored centroids give kmeans_assign's label. The
// scored pairs' anchors are refreshed from their scores; `second` becomes the smallest bound left. The points
// are visited in index order, so the N x k anchors stream through the cache in memory order: visited in label
// order (so that consecutive points would score mostly the same centroids), the sparse passes of a capped
// unstructured run took 0.50 s against 0.35 s (AMD EPYC Zen 4, AVX2, 2 threads; 0.067 against 0.044 s for one
// scoring 0.3% of the pairs), the scan stalling on rows of anchors 4 KiB long met in no order the hardware
// prefetcher follows (software prefetches 1 to 16 points ahead did not help).
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
#include "ops/cpu/blas_gemm.h"
#include "ops/cpu/cpu_kernels.h"
#include "ops/cpu/kmeans_cpu.h"

namespace pydc {
namespace {

constexpr const char* kElkan = "pydc::kmeans_assign_elkan";
constexpr double kRoundUp = 1.0 + 1e-12;  // a float64 square root of a float64 sum: error far below 1e-12
constexpr int64_t kMaxSeparationBytes = int64_t{64} << 20;       // k x k float32: the filter is off above k = 4096
constexpr int64_t kSampleRows = 2048;                            // points scanned to choose a dense pass
constexpr int64_t kCandidatePadding = 16;  // elkan_candidates writes up to 16 entries past its count
constexpr int kBatch = 64;                 // points scored together (a bit each in a uint64_t)

float round_up_to_float(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) < v) f = std::nextafter(f, kKMeansInf);
  return f;
}

float round_down_to_float(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) > v) f = std::nextafter(f, -kKMeansInf);
  return f;
}

// separation[p * k + j] <= d(c_p, c_j) (0 on the diagonal, so the own centroid is never skipped).
std::vector<float> pair_separation(const at::Tensor& centroids) {
  const int64_t k = centroids.size(0), d = centroids.size(1);
  std::vector<float> separation(k * k);
  kmeans_centroid_gram_rows(centroids, [&](int64_t p, const double* norm, const double* dot_row) {
    float* row = separation.data() + p * k;
    for (int64_t j = 0; j < k; ++j) row[j] = j == p ? 0.0f : centroid_separation_bound(norm[p], norm[j], dot_row[j], d);
  });
  return separation;
}

// What one point's filter needs: the exact distance to its own centroid and the thresholds derived from it.
struct PointBounds {
  double own_sq;     // fixed-order float64 squared distance to the own centroid
  double upper;      // >= the exact distance to it
  double error;      // kmeans_score_error_bound of the point
  double threshold;  // sqrt(upper^2 + 2 error), rounded up: a centroid farther than this cannot win
};

PointBounds point_bounds(double own_sq, float point_sq, double max_centroid_norm, int64_t d) {
  PointBounds b;
  b.own_sq = own_sq;
  b.upper = std::sqrt(own_sq) * kRoundUp;
  b.error = kmeans_score_error_bound(point_sq, max_centroid_norm, d);
  b.threshold = std::sqrt(b.upper * b.upper + 2.0 * b.error) * kRoundUp;
  return b;
}

// float32 base of elkan_lower_bound: ||x||^2 (its float32 rounding taken off) minus the score's error bound.
float lower_bound_base(float point_sq, double error, int64_t d) {
  return round_down_to_float(static_cast<double>(point_sq) * (1.0 - kmeans_norm_rounding(d)) - error);
}

struct Centroids {
  const float* values;
  const float* sq_norms;          // float32 kmeans_squared_norm
  const KMeansCentroidInfo* info;
  const float* offset_up;         // D_j rounded up / down to float32
  const float* offset_down;
  const float* separation;        // k x k or nullptr
  int64_t k;
  int64_t d;
};

// The candidates of one point of a sparse pass (the centroids its bounds do not prove farther than its own,
// ascending; the own one always among them) and the smallest bound of the others.
int64_t point_candidates(const PointBounds& b, const Centroids& c, int64_t own, const float* anchors_row,
                         int32_t* candidates, float* unscored_min) {
  return cpu_kernels().elkan_candidates(anchors_row, c.offset_up, c.separation ? c.separation + own * c.k : nullptr,
                                        c.k, round_up_to_float(b.threshold),
                                        round_up_to_float((b.threshold + b.upper) * kRoundUp),
                                        round_up_to_float(b.upper), candidates, unscored_min);
}

// The rest of one point of a sparse pass once its candidates are scored: the label kmeans_assign would give
// (top-2, float64 settle of near-ties among the candidates), its distance, its refreshed anchors; returns
// the new `second` (the smallest bound to a centroid other than the new label).
double finish_point(const float* x, float point_sq, const PointBounds& b, const Centroids& c, float* anchors_row,
                    const int32_t* candidates, const float* scores, int64_t n, float unscored_min, int64_t* label,
                    double* distance) {
  float best = kKMeansInf, second = kKMeansInf;
  int64_t position = 0;
  for (int64_t q = 0; q < n; ++q) {
    const float s = scores[q];
    if (kmeans_prefer(s, candidates[q], best, position)) {
      if (best < second) second = best;
      best = s;
      position = candidates[q];
    } else if (s < second) {
      second = s;
    }
  }
  float score = best;
  if (kmeans_needs_settle(best, second, point_sq, c.info->max_norm, c.d)) {
    double exact;
    position = kmeans_settle_near_best(x, c.values, c.info->sq_norms_f64.data(), nullptr, c.d, best, 2.0 * b.error,
                                       &exact, [&](auto fn) {
                                         for (int64_t q = 0; q < n; ++q) fn(candidates[q], scores[q]);
                                       });
    score = static_cast<float>(exact);
  }
  // no finite score at all (a NaN point): label 0, as kmeans_assign gives
  *label = std::isfinite(best) ? position : 0;
  *distance = kmeans_distance(point_sq, score);
  const float base = lower_bound_base(point_sq, b.error, c.d);
  float smallest = unscored_min;
  for (int64_t q = 0; q < n; ++q) {
    const int64_t j = candidates[q];
    if (j == *label) continue;
    const float lower = elkan_lower_bound(base, scores[q]);
    anchors_row[j] = elkan_anchor(lower, c.offset_down[j]);
    smallest = lower < smallest ? lower : smallest;
  }
  return smallest;
}

double decayed(double second, double max_drift) { return std::nextafter(second - max_drift, -HUGE_VAL); }

// The fraction of all point-centroid pairs a sparse pass would score, from kSampleRows evenly spaced points.
double sampled_fraction(const at::Tensor& x, const float* pn, const Centroids& c, const int64_t* label,
                        const float* anchors, const double* second, const double* own_sq, double max_drift) {
  const int64_t n = x.size(0), k = c.k, d = c.d;
  const int64_t samples = std::min(n, kSampleRows);
  std::atomic<int64_t> total{0};
  at::parallel_for(0, samples, 64, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> candidates(k + kCandidatePadding);
    int64_t count = 0;
    for (int64_t s = begin; s < end; ++s) {
      const int64_t i = s * n / samples;
      const PointBounds b = point_bounds(own_sq[i], pn[i], c.info->max_norm, d);
      if (decayed(second[i], max_drift) > b.threshold) continue;
      float unscored_min;
      count += point_candidates(b, c, label[i], anchors + i * k, candidates.data(), &unscored_min);
    }
    total += count;
  });
  return static_cast<double>(total.load()) / (static_cast<double>(samples) * static_cast<double>(k));
}

// Every pair scored by BLAS GEMM, as kmeans_assign does, and every bound set from the scores.
void dense_pass(const at::Tensor& x, const at::Tensor& centroids, const float* pn, const Centroids& c,
                int64_t* label, float* anchors, double* second, double* distance_out) {
  const int64_t k = c.k, d = c.d;
  const CpuKernels& kernels = cpu_kernels();
  kmeans_full_rows(x, centroids, *c.info, pn, nullptr, [&](int64_t i, const float* dot, int64_t position, float best,
                                                          float score) {
    label[i] = std::isfinite(best) ? position : 0;
    distance_out[i] = kmeans_distance(pn[i], score);
    const float base = lower_bound_base(pn[i], kmeans_score_error_bound(pn[i], c.info->max_norm, d), d);
    float* row = anchors + i * k;
    const int64_t w = label[i];
    const float left = kernels.elkan_anchor_row(dot, c.sq_norms, c.offset_down, base, 0, w, row);
    const float right = kernels.elkan_anchor_row(dot, c.sq_norms, c.offset_down, base, w + 1, k, row);
    kernels.elkan_anchor_row(dot, c.sq_norms, c.offset_down, base, w, w + 1, row);  // valid, not in second
    second[i] = std::min(left, right);
  });
}

std::tuple<at::Tensor, at::Tensor> kmeans_assign_elkan_cpu(const at::Tensor& x_in, const at::Tensor& centroids_in,
                                                          const at::Tensor& norms_in, const at::Tensor& offsets_in,
                                                          double max_drift, double dense_fraction,
                                                          const at::Tensor& labels, const at::Tensor& anchors,
                                                          const at::Tensor& second) {
  check_points_and_centroids(kElkan, x_in, centroids_in, norms_in);
  PYDC_CHECK_DTYPE(kElkan, "drift_offsets", offsets_in, at::kDouble);
  PYDC_CHECK_DTYPE(kElkan, "labels", labels, at::kLong);
  PYDC_CHECK_DTYPE(kElkan, "anchors", anchors, at::kFloat);
  PYDC_CHECK_DTYPE(kElkan, "second", second, at::kDouble);
  const int64_t n = x_in.size(0), k = centroids_in.size(0), d = x_in.size(1);
  TORCH_CHECK(offsets_in.dim() == 1 && offsets_in.size(0) == k, kElkan, ": expected drift_offsets of shape (", k,
              ",), got ", describe(offsets_in));
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n && labels.is_contiguous(), kElkan,
              ": expected contiguous labels of shape (", n, ",), got ", describe(labels));
  TORCH_CHECK(anchors.dim() == 2 && anchors.size(0) == n && anchors.size(1) == k && anchors.is_contiguous(), kElkan,
              ": expected contiguous anchors of shape (", n, ", ", k, "), got ", describe(anchors));
  TORCH_CHECK(second.dim() == 1 && second.size(0) == n && second.is_contiguous(), kElkan,
              ": expected contiguous second of shape (", n, ",), got ", describe(second));
  TORCH_CHECK(max_drift >= 0.0 && dense_fraction >= 0.0, kElkan, ": expected max_drift >= 0 and dense_fraction "
              ">= 0, got ", max_drift, " and ", dense_fraction);
  const at::Tensor x = x_in.contiguous(), centroids = centroids_in.contiguous(), norms = norms_in.contiguous();
  const at::Tensor offsets_t = offsets_in.contiguous();
  at::Tensor distances = at::empty({n}, x.options().dtype(at::kDouble));
  at::Tensor counts = at::zeros({3}, x.options().dtype(at::kLong));
  if (n == 0) return {distances, counts};

  const double* offset = offsets_t.const_data_ptr<double>();
  std::vector<float> offset_up(k), offset_down(k);
  for (int64_t j = 0; j < k; ++j) {
    TORCH_CHECK(offset[j] >= 0.0, kElkan, ": expected drift_offsets >= 0, got drift_offsets[", j, "] = ", offset[j]);
    offset_up[j] = round_up_to_float(offset[j]);
    offset_down[j] = std::max(0.0f, round_down_to_float(offset[j]));
  }
  const KMeansCentroidInfo info = kmeans_centroid_info(centroids);
  Centroids c{centroids.const_data_ptr<float>(), info.sq_norms.const_data_ptr<float>(), &info, offset_up.data(),
              offset_down.data(), nullptr, k, d};
  const float* xs = x.const_data_ptr<float>();
  const float* pn = norms.const_data_ptr<float>();
  int64_t* label = labels.mutable_data_ptr<int64_t>();
  float* anchor = anchors.mutable_data_ptr<float>();
  double* second_of = second.mutable_data_ptr<double>();
  double* distance_out = distances.mutable_data_ptr<double>();
  int64_t* count = counts.mutable_data_ptr<int64_t>();
  const CpuKernels& kernels = cpu_kernels();

  if (dense_fraction > 0.0) {
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(label[i] >= 0 && label[i] < k, kElkan, ": expected labels in [0, ", k, "), got labels[", i,
                  "] = ", label[i]);
    }
  }
  // Every point's exact distance to its own centroid; the separation filter when some point's own centroid is
  // far enough from another centroid for it to skip anything (||c|| + max ||c_j|| bounds every separation;
  // never so on unstructured data, where the k x k Gram matrix is then not computed).
  std::vector<double> own_sq;
  std::vector<float> separation;
  if (dense_fraction > 0.0) {
    own_sq.resize(n);
    std::atomic<int64_t> may_separate{0};
    at::parallel_for(0, n, 1024, [&](int64_t begin, int64_t end) {
      int64_t any = 0;
      for (int64_t i = begin; i < end; ++i) {
        own_sq[i] = kernels.squared_distance_f64(xs + i * d, c.values + label[i] * d, d);
        const PointBounds b = point_bounds(own_sq[i], pn[i], info.max_norm, d);
        any |= (std::sqrt(info.sq_norms_f64[label[i]]) + info.max_norm) * kRoundUp > b.threshold + b.upper;
      }
      may_separate += any;
    });
    if (may_separate.load() > 0 &&
        static_cast<double>(k) * static_cast<double>(k) * sizeof(float) <= kMaxSeparationBytes) {
      separation = pair_separation(centroids);
      c.separation = separation.data();
    }
  }
  if (dense_fraction <= 0.0 ||
      sampled_fraction(x, pn, c, label, anchor, second_of, own_sq.data(), max_drift) > dense_fraction) {
    dense_pass(x, centroids, pn, c, label, anchor, second_of, distance_out);
    count[0] = n;
    count[1] = n * k;
    count[2] = 1;
    return {distances, counts};
  }

  // Batches of up to kBatch points that fail the point-level filter: each scans its row for candidates, then
  // every centroid that some of them need is scored against those points at once (centroid_dots: the
  // centroid is read once per batch, not once per point), in ascending order, so that each point's scores
  // line up with its ascending candidates.
  std::atomic<int64_t> rows_computed{0}, scores_computed{0};
  const float* cs = c.values;
  at::parallel_for(0, n, 4 * kBatch, [&](int64_t begin, int64_t end) {
    const int64_t stride = k + kCandidatePadding;
    std::vector<int32_t> candidates(kBatch * stride);
    std::vector<float> scores(kBatch * k);
    std::vector<uint64_t> wanted(k, 0);  // bit p: batch point p needs centroid j
    int64_t point[kBatch], count_of[kBatch], cursor[kBatch];
    PointBounds bounds[kBatch];
    float unscored[kBatch], dots[kBatch];
    const float* rows[kBatch];
    int slot[kBatch];
    int64_t rows_done = 0, scored_total = 0;
    for (int64_t s = begin; s < end;) {
      int m = 0;
      int64_t lowest = k, highest = -1;
      for (; s < end && m < kBatch; ++s) {
        const int64_t i = s;
        const PointBounds b = point_bounds(own_sq[i], pn[i], info.max_norm, d);
        second_of[i] = decayed(second_of[i], max_drift);
        distance_out[i] = b.own_sq;
        if (second_of[i] > b.threshold) continue;  // the point-level filter: the label stays
        int32_t* cand = candidates.data() + m * stride;
        const int64_t count = point_candidates(b, c, label[i], anchor + i * k, cand, &unscored[m]);
        for (int64_t q = 0; q < count; ++q) wanted[cand[q]] |= uint64_t{1} << m;
        if (count > 0) {
          lowest = std::min<int64_t>(lowest, cand[0]);
          highest = std::max<int64_t>(highest, cand[count - 1]);
        }
        point[m] = i;
        count_of[m] = count;
        cursor[m] = 0;
        bounds[m] = b;
        ++m;
      }
      for (int64_t j = lowest; j <= highest; ++j) {
        uint64_t bits = wanted[j];
        if (bits == 0) continue;
        wanted[j] = 0;
        int r = 0;
        for (; bits != 0; bits &= bits - 1) {
          const int p = __builtin_ctzll(bits);
          rows[r] = xs + point[p] * d;
          slot[r++] = p;
        }
        kernels.centroid_dots(cs + j * d, rows, r, d, dots);
        for (int u = 0; u < r; ++u) {
          const int p = slot[u];
          scores[p * k + cursor[p]++] = kmeans_score(c.sq_norms[j], dots[u]);
        }
      }
      for (int p = 0; p < m; ++p) {
        const int64_t i = point[p];
        second_of[i] = finish_point(xs + i * d, pn[i], bounds[p], c, anchor + i * k, candidates.data() + p * stride,
                                    scores.data() + p * k, count_of[p], unscored[p], label + i, distance_out + i);
        scored_total += count_of[p];
      }
      rows_done += m;
    }
    rows_computed += rows_done;
    scores_computed += scored_total;
  });
  count[0] = rows_computed.load();
  count[1] = scores_computed.load();
  return {distances, counts};
}

}  // namespace
}  // namespace pydc

TORCH_LIBRARY_IMPL(pydc, CPU, m) { m.impl("kmeans_assign_elkan", &pydc::kmeans_assign_elkan_cpu); }
