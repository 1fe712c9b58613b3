// CPU kernel of one assignment pass of k-means by updated dot products (pydc/cluster/kmeans_delta.py):
//
// kmeans_assign_delta(x, centroids, x_sq_norms, dense_changes, labels(a!), dots(b!), column_error(c!),
//                     basis_labels(d!), basis_centroids(e!), tops(f!), packed_x(g!)?) -> (distances, counts)
//   The state, kept between passes: dots (k N,) float32, the products p[j, i] in blocks of kLayoutRows = 1024
//   points (the last one ragged): block b (points 1024 b .. 1024 b + rows_b - 1) holds its k runs of rows_b
//   products centroid after centroid, so p[j, i] = dots[1024 b k + j rows_b + r] for i = 1024 b + r
//   (pydc.cluster.kmeans_delta.products_by_centroid gives the k x N matrix), with |p[j, i] - x_i . b_j| <=
//   ||x_i|| column_error[j] in exact arithmetic, b = basis_centroids (k, d) float32, the centroids of the last
//   pass; basis_labels (N,) int64: the labels whose cluster means b are; labels (N,) int64: the labels of the
//   last pass, whose cluster means `centroids` are when the caller ran a Lloyd update in between (anything else
//   only costs time, below). A pass is dense when dense_changes < 0 (the first one: the state is output only),
//   or when more than dense_changes * k labels differ between basis_labels and labels: every pair is scored by
//   BLAS GEMM (one single-threaded GEMM per 256 points and thread, folded from the thread's buffer, then
//   streamed out to its block of dots). Otherwise (a delta pass) the m points that changed label are gathered into
//   Y (m, d), every block of points is multiplied by Y^T in one single-threaded GEMM (N x m x d multiply-adds
//   instead of N x k x d), and each point's products are moved from b to the new centroids while they are folded
//   (update_fold_columns_top2, cpu_kernels.h): a centroid j that gained the points P_j and lost Q_j is, up to
//   its float32 rounding, (n_j b_j + sum P_j - sum Q_j) / n'_j (n, n': cluster sizes under basis_labels and
//   labels), so
//       p[j, i] <- p[j, i] * (n_j / n'_j) + (sum_{y in P_j} x_i . y - sum_{y in Q_j} x_i . y) / n'_j.
//   tops (kDeltaTopRows, N) float32: each point's top list under the kept products (cpu_kernels.h: its
//   kDeltaTopSlots best scores, their centroids and a floor under the others), set by a dense pass; a moved pass
//   takes the centroids it touches (those that gained or lost points, or whose centroid changed at all) out of
//   every list and folds only their runs back in, so the runs of the other centroids are not read (late in an
//   unstructured run 10-35% of the centroids are touched). A list with a NaN floor is not valid: it is folded
//   again from the point's products (a whole piece's runs at once when more than kRefoldRows of its points
//   need it). The lists follow the products: a caller who changes dots between passes fills tops with NaN.
//   packed_x (optional, float32, contiguous, 0 or at least packed_points_floats(N, d) elements: N rounded up to
//   kMaxGemmPanel times d, plus kPackedHeader): x in the panels of pydc's GEMM, kept between passes where that
//   GEMM is selected. A dense pass packs its points there (it packs them anyway) and marks the layout (the
//   level's panel rows, N and d) in the header behind the panels; a moved pass whose level, N and d match it
//   multiplies the points from there instead of packing all N of them again (100 MB at 100k x 256, ~3 ms of a
//   20-170 ms pass, capped at AVX2 on AMD EPYC Zen 4, 2 threads). Its contents are the op's own, like dots'.
//   On return labels are the labels kmeans_assign would give for `centroids` (bitwise), basis_labels the labels
//   it was given, basis_centroids = centroids and dots, column_error, tops their state; distances (N,) float64: the
//   squared distance of every point to its new centroid (float32 arithmetic, as kmeans_assign's); counts (3,)
//   int64 = (rows settled in float64, dot products computed: N x m, or N x k for a dense pass, 1 when dense).
//
// Exactness. column_error[j] bounds, per unit of ||x||, how far p[j, :] may be from the exact products with
// the new centroid c'_j: the previous bound scaled by n_j / n'_j; gamma_d ||x|| ||y|| for every GEMM product
// x . y (Higham); 3 u times the largest magnitude the value takes (the factor n_j / n'_j, the scaling and the
// final sum each round once: the added products are summed apart first, so their own roundings, 3 u each for
// 1 / n'_j, the product and the running sum, scale only with their far smaller sum of magnitudes); and
// ||c'_j - (n_j b_j + sum P_j - sum Q_j) / n'_j||, the residual of the update formula measured in float64 for
// every centroid (the centroids' own float32 rounding; a column nothing moved into or out of keeps its dots, and
// its residual is ||c'_j - b_j||, 0 after a Lloyd update). Every term is rounded up (1% slack), so each float32
// score ||c'_j||^2 - 2 dots[j, i] errs by at most kmeans_score_error_bound + 2 ||x_i|| max_j column_error[j],
// and a row whose best two scores are further apart than twice that keeps its float32 winner (its best listed
// score, the second best being at least min(second listed score, floor)); any other row is settled in float64
// among the centroids within that margin of its best (kmeans_settle_near_best), as kmeans_assign settles its
// near-ties. So the labels are kmeans_assign's. When the bound grows past
// kMaxErrorGrowth times the GEMM's own (an empty-cluster split, a spherical renormalisation, or centroids that
// are not the means of `labels`), the pass is dense instead, which resets it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/kmeans_math.h"
#include "ops/cpu/blas_gemm.h"
#include "ops/cpu/cpu_kernels.h"
#include "ops/cpu/kmeans_cpu.h"

namespace pydc {
namespace {

constexpr const char* kDelta = "pydc::kmeans_assign_delta";
constexpr double kUnitRoundoff = 5.9604644775390625e-08;  // 2^-24
constexpr double kSlack = 1.01;
constexpr double kRoundUp = 1.0 + 1e-12;  // float64 norms and sums of float32 data: relative error far below 1e-12
// A delta pass only while max_j column_error[j] <= kMaxErrorGrowth * gamma_{d+2} (max ||x|| + max ||c||): the
// settle margin then stays within a small multiple of kmeans_assign's.
constexpr double kMaxErrorGrowth = 8.0;
// Points per block of the products' layout: a pass over one block reads (and, where moved, writes) one contiguous
// k x 1024 region, 4 KiB runs back to back. Runs of one centroid over all N points, 4 KiB of each block's 400 KB
// apart at N = 100k, k = 1000, made a pass with nothing moved take 21 ms on 2 threads against 16 ms now (AMD EPYC
// Zen 4, avx512; 7.4 ms to sum the 400 MB in order): every run started a new stream. 256 points per block made
// the passes ~15% slower (more, shorter runs).
constexpr int64_t kLayoutRows = 1024;
constexpr int64_t kDenseRows = 256;  // points per GEMM of a dense pass
// A moved pass folds every run of a piece into fresh top lists when more than this many of its points have no
// valid list; fewer are folded again one by one from their rows (k products kLayoutRows floats apart each).
constexpr int64_t kRefoldRows = 8;
// Floats after packed_x's panels: the layout they were packed in (panel rows, N, d as int64) once valid.
constexpr int64_t kPackedHeader = 8;

int64_t packed_points_floats(int64_t n, int64_t d) {
  return (n + kMaxGemmPanel - 1) / kMaxGemmPanel * kMaxGemmPanel * d + kPackedHeader;
}

struct PackedLayout {
  int64_t panel, n, d;
};

void write_packed_header(float* header, const PackedLayout& layout) { std::memcpy(header, &layout, sizeof(layout)); }

bool packed_header_matches(const float* header, const PackedLayout& layout) {
  PackedLayout kept;
  std::memcpy(&kept, header, sizeof(kept));
  return kept.panel == layout.panel && kept.n == layout.n && kept.d == layout.d;
}

// An upper bound on ||v|| from a float32 ||v||^2 summed in any order (kmeans_norm_rounding).
double norm_up(float sq_norm, int64_t d) {
  const double sq = std::max(0.0, static_cast<double>(sq_norm));
  return std::sqrt(sq / (1.0 - kmeans_norm_rounding(d))) * kRoundUp;
}

struct Update {
  std::vector<int64_t> changed;     // points whose label changed, ascending
  std::vector<int32_t> into, from;  // their new and old labels
  std::vector<int64_t> columns;     // centroids that gained or lost a point, ascending
  std::vector<float> column_scale;  // n_j / n'_j of each of them (0 when n'_j = 0)
  std::vector<float> gain;          // 1 / n'_j per centroid (0 when n'_j = 0)
};

// The changed points, the scale factors of their centroids and every column's new error bound; false when the
// bound grew past kMaxErrorGrowth (the pass must be dense).
bool plan_update(const at::Tensor& x, const float* pn, const at::Tensor& centroids, double max_centroid_norm,
                 const at::Tensor& basis, const int64_t* label, const int64_t* basis_label, double* column_error,
                 Update* u) {
  const int64_t n = x.size(0), k = centroids.size(0), d = x.size(1);
  const float* xs = x.const_data_ptr<float>();
  std::vector<int64_t> before(k, 0), after(k, 0), added(k, 0);
  std::vector<double> moved_norms(k, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    ++before[basis_label[i]];
    ++after[label[i]];
    if (label[i] != basis_label[i]) {
      u->changed.push_back(i);
      u->into.push_back(static_cast<int32_t>(label[i]));
      u->from.push_back(static_cast<int32_t>(basis_label[i]));
    }
  }
  // sum P_j - sum Q_j in float64, for the residuals
  at::Tensor delta = at::zeros({k, d}, x.options().dtype(at::kDouble));
  double* dl = delta.mutable_data_ptr<double>();
  for (const int64_t i : u->changed) {
    const float* y = xs + i * d;
    double* in = dl + label[i] * d;
    double* out = dl + basis_label[i] * d;
    for (int64_t t = 0; t < d; ++t) {
      in[t] += y[t];
      out[t] -= y[t];
    }
    const double y_norm = norm_up(pn[i], d);
    moved_norms[label[i]] += y_norm;
    moved_norms[basis_label[i]] += y_norm;
    ++added[label[i]];
    ++added[basis_label[i]];
  }
  const float* c = centroids.const_data_ptr<float>();
  const float* b = basis.const_data_ptr<float>();
  const double gamma = kmeans_gamma(d);
  u->gain.assign(k, 0.0f);
  std::vector<double> error(k);
  at::parallel_for(0, k, 64, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const double ratio = after[j] > 0 ? static_cast<double>(before[j]) / static_cast<double>(after[j]) : 0.0;
      const double inverse = after[j] > 0 ? 1.0 / static_cast<double>(after[j]) : 0.0;
      double residual = 0.0, basis_sq = 0.0;
      for (int64_t t = 0; t < d; ++t) {
        const double bt = b[j * d + t];
        const double expected = added[j] > 0 ? (static_cast<double>(before[j]) * bt + dl[j * d + t]) * inverse : bt;
        const double r = static_cast<double>(c[j * d + t]) - expected;
        residual += r * r;
        basis_sq += bt * bt;
      }
      double e = std::sqrt(residual) * kRoundUp;
      if (added[j] > 0) {
        const double old_error = column_error[j];
        const double magnitude = ratio * (std::sqrt(basis_sq) * kRoundUp + old_error) +
                                 inverse * (1.0 + gamma) * moved_norms[j];
        // the factor n_j / n'_j, the scaling and the final sum round once each, at most the whole magnitude;
        // each added product rounds three times (1 / n'_j, the product, the running sum), at most their sum
        const double added_magnitude = inverse * (1.0 + gamma) * moved_norms[j];
        const double rounding = kSlack * kUnitRoundoff * (3.0 * magnitude + 3.0 * added[j] * added_magnitude) +
                                1e-12 * magnitude;
        e += ratio * old_error + inverse * gamma * moved_norms[j] + rounding;
      } else {
        e += column_error[j];
      }
      error[j] = e * kRoundUp;
    }
  });
  double max_error = 0.0;
  for (int64_t j = 0; j < k; ++j) {
    if (!(error[j] <= max_error)) max_error = std::isnan(error[j]) ? HUGE_VAL : error[j];
  }
  float max_sq = 0.0f;  // norm_up grows with the squared norm: one root for the largest
  for (int64_t i = 0; i < n; ++i) max_sq = pn[i] > max_sq ? pn[i] : max_sq;
  const double max_point = norm_up(max_sq, d);
  if (!(max_error <= kMaxErrorGrowth * kmeans_gamma(d + 2) * (max_point + max_centroid_norm))) return false;
  std::copy(error.begin(), error.end(), column_error);
  for (int64_t j = 0; j < k; ++j) {
    if (added[j] == 0) continue;
    u->columns.push_back(j);
    u->column_scale.push_back(static_cast<float>(after[j] > 0 ? static_cast<double>(before[j]) / after[j] : 0.0));
    u->gain[j] = static_cast<float>(after[j] > 0 ? 1.0 / static_cast<double>(after[j]) : 0.0);
  }
  return true;
}

// A pass's unit of work: rows points of layout block `block` from its row r0 on. A layout block is one piece,
// or a few when there are fewer blocks than torch's threads (small n), each of at least 16 rows.
struct Piece {
  int64_t block, r0, rows;
};

std::vector<Piece> layout_pieces(int64_t n) {
  const int64_t blocks = (n + kLayoutRows - 1) / kLayoutRows;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t splits = std::clamp<int64_t>((threads + blocks - 1) / blocks, 1, kLayoutRows / 16);
  std::vector<Piece> pieces;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t rows = std::min(kLayoutRows, n - b * kLayoutRows);
    const int64_t part = std::max<int64_t>(16, (rows + splits - 1) / splits);
    for (int64_t r0 = 0; r0 < rows; r0 += part) pieces.push_back({b, r0, std::min(part, rows - r0)});
  }
  return pieces;
}

// What every block of a pass reads: the inputs, the state and the outputs, as raw pointers.
struct Pass {
  const float* xs;
  const float* pn;
  const float* cs;
  const float* cn;             // float32 ||c_j||^2 (kmeans_centroid_info)
  const KMeansCentroidInfo* info;
  float* dots;                 // the products in layout blocks (runs(piece))
  int64_t* label;
  double* distance_out;
  int64_t n, k, d;
  double max_error;            // max_j column_error[j]; 0 for a dense pass (the GEMM's error is in the margin)

  // The first product of a piece, p[0, 1024 block + r0]; p[j, i + r] is j * stride + r further on.
  float* runs(const Piece& piece) const { return dots + piece.block * kLayoutRows * k + piece.r0; }
  int64_t stride(const Piece& piece) const { return std::min(kLayoutRows, n - piece.block * kLayoutRows); }
  int64_t first_point(const Piece& piece) const { return piece.block * kLayoutRows + piece.r0; }
};

// Calls piece_fn(piece, scratch) for the pieces of the layout on torch's threads (one BLAS thread each; scratch:
// scratch_floats floats of the thread's own), which returns the number of rows it settled; returns their sum.
template <typename PieceFn>
int64_t for_pieces(const Pass& p, int64_t scratch_floats, PieceFn piece_fn) {
  const std::vector<Piece> pieces = layout_pieces(p.n);
  std::atomic<int64_t> settled{0};
  PerThreadCpuGemm one_thread_each;
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t q_begin, int64_t q_end) {
    std::vector<float> scratch(scratch_floats);
    int64_t here = 0;
    for (int64_t q = q_begin; q < q_end; ++q) here += piece_fn(pieces[q], scratch.data());
    settled += here;
  });
  return settled.load();
}

// A point's label and distance from its top list (kDeltaTopRows floats of `tops`, n apart): the best listed
// score wins, provably (kmeans_assign's rule) when min(second listed, tau) is further from it than the margin;
// otherwise, or when the list is empty or not valid, the point's whole row of products is read: the list is
// folded again from every product (when not valid or empty) and near-ties are settled in float64 among the
// centroids within the margin of the best (kmeans_settle_near_best), as kmeans_assign settles its own. Returns
// whether the row was settled.
bool finish_from_tops(const Pass& p, const Piece& piece, int64_t r, float* tops) {
  const int64_t i = p.first_point(piece) + r, stride = p.stride(piece), n = p.n;
  const float* column = p.runs(piece) + r;  // point i's products, k of them, stride apart
  const auto listed_best = [&] {
    const float j = tops[kDeltaTopSlots * n];
    return tops[0] < kKMeansInf && j >= 0.0f && j < static_cast<float>(p.k);
  };
  if (std::isnan(tops[2 * kDeltaTopSlots * n]) || !listed_best()) {
    delta_tops_clear(tops, n);
    for (int64_t j = 0; j < p.k; ++j) {
      delta_tops_fold(tops, n, kmeans_score(p.cn[j], column[j * stride]), static_cast<int32_t>(j));
    }
  }
  const bool any = listed_best();  // only NaN or infinite scores: label 0, as kmeans_assign's fold gives
  float score = any ? tops[0] : kKMeansInf;
  int64_t position = any ? static_cast<int64_t>(tops[kDeltaTopSlots * n]) : 0;
  const float second = std::min(tops[n], tops[2 * kDeltaTopSlots * n]);
  const double margin = 2.0 * (kmeans_score_error_bound(p.pn[i], p.info->max_norm, p.d) +
                               2.0 * norm_up(p.pn[i], p.d) * p.max_error);
  bool settled = false;
  if (!(static_cast<double>(second) - static_cast<double>(score) > margin)) {
    double exact;
    const auto visit = [&](auto fn) {
      for (int64_t j = 0; j < p.k; ++j) fn(j, kmeans_score(p.cn[j], column[j * stride]));
    };
    position = kmeans_settle_near_best(p.xs + i * p.d, p.cs, p.info->sq_norms_f64.data(), nullptr, p.d, score,
                                       margin, &exact, visit);
    score = static_cast<float>(exact);
    settled = true;
  }
  p.label[i] = position;
  p.distance_out[i] = kmeans_distance(p.pn[i], score);
  return settled;
}

std::tuple<at::Tensor, at::Tensor> kmeans_assign_delta_cpu(const at::Tensor& x_in, const at::Tensor& centroids_in,
                                                          const at::Tensor& norms_in, double dense_changes,
                                                          const at::Tensor& labels, const at::Tensor& dots,
                                                          const at::Tensor& column_error,
                                                          const at::Tensor& basis_labels,
                                                          const at::Tensor& basis_centroids, const at::Tensor& tops,
                                                          const std::optional<at::Tensor>& packed_x) {
  check_points_and_centroids(kDelta, x_in, centroids_in, norms_in);
  PYDC_CHECK_DTYPE(kDelta, "labels", labels, at::kLong);
  PYDC_CHECK_DTYPE(kDelta, "dots", dots, at::kFloat);
  PYDC_CHECK_DTYPE(kDelta, "column_error", column_error, at::kDouble);
  PYDC_CHECK_DTYPE(kDelta, "basis_labels", basis_labels, at::kLong);
  PYDC_CHECK_DTYPE(kDelta, "basis_centroids", basis_centroids, at::kFloat);
  PYDC_CHECK_DTYPE(kDelta, "tops", tops, at::kFloat);
  const int64_t n = x_in.size(0), k = centroids_in.size(0), d = x_in.size(1);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n && labels.is_contiguous(), kDelta,
              ": expected contiguous labels of shape (", n, ",), got ", describe(labels));
  TORCH_CHECK(basis_labels.dim() == 1 && basis_labels.size(0) == n && basis_labels.is_contiguous(), kDelta,
              ": expected contiguous basis_labels of shape (", n, ",), got ", describe(basis_labels));
  TORCH_CHECK(dots.dim() == 1 && dots.size(0) == k * n && dots.is_contiguous(), kDelta,
              ": expected contiguous dots of shape (", k * n, ",) (k N products), got ", describe(dots));
  TORCH_CHECK(column_error.dim() == 1 && column_error.size(0) == k && column_error.is_contiguous(), kDelta,
              ": expected contiguous column_error of shape (", k, ",), got ", describe(column_error));
  TORCH_CHECK(basis_centroids.dim() == 2 && basis_centroids.size(0) == k && basis_centroids.size(1) == d &&
              basis_centroids.is_contiguous(), kDelta, ": expected contiguous basis_centroids of shape (", k, ", ",
              d, "), got ", describe(basis_centroids));
  TORCH_CHECK(tops.dim() == 2 && tops.size(0) == kDeltaTopRows && tops.size(1) == n && tops.is_contiguous(), kDelta,
              ": expected contiguous tops of shape (", kDeltaTopRows, ", ", n, "), got ", describe(tops));
  TORCH_CHECK(k < (int64_t{1} << 24), kDelta, ": expected fewer than 2^24 centroids (tops names them as floats), got ",
              k);
  TORCH_CHECK(!std::isnan(dense_changes), kDelta, ": expected a number for dense_changes, got NaN");
  const bool has_packed = packed_x.has_value() && packed_x->defined() && packed_x->numel() > 0;
  if (has_packed) {
    PYDC_CHECK_DTYPE(kDelta, "packed_x", *packed_x, at::kFloat);
    PYDC_CHECK_SAME_DEVICE(kDelta, "packed_x", *packed_x, "x", x_in);
    TORCH_CHECK(packed_x->is_contiguous() && packed_x->numel() >= packed_points_floats(n, d), kDelta,
                ": expected packed_x contiguous with 0 or at least ", packed_points_floats(n, d), " elements (N = ", n,
                " rounded up to ", kMaxGemmPanel, ", times d = ", d, ", plus ", kPackedHeader, "), got ",
                describe(*packed_x));
  }
  const at::Tensor x = x_in.contiguous(), centroids = centroids_in.contiguous(), norms = norms_in.contiguous();
  at::Tensor distances = at::empty({n}, x.options().dtype(at::kDouble));
  at::Tensor counts = at::zeros({3}, x.options().dtype(at::kLong));
  if (n == 0) return {distances, counts};

  const float* xs = x.const_data_ptr<float>();
  const float* pn = norms.const_data_ptr<float>();
  int64_t* label = labels.mutable_data_ptr<int64_t>();
  int64_t* basis_label = basis_labels.mutable_data_ptr<int64_t>();
  float* dot = dots.mutable_data_ptr<float>();
  double* error = column_error.mutable_data_ptr<double>();
  double* distance_out = distances.mutable_data_ptr<double>();
  int64_t* count = counts.mutable_data_ptr<int64_t>();
  const KMeansCentroidInfo info = kmeans_centroid_info(centroids);

  Update update;
  bool dense = dense_changes < 0.0;
  if (!dense) {
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(label[i] >= 0 && label[i] < k && basis_label[i] >= 0 && basis_label[i] < k, kDelta,
                  ": expected labels and basis_labels in [0, ", k, "), got ", label[i], " and ", basis_label[i],
                  " at point ", i);
    }
    int64_t changed = 0;
    for (int64_t i = 0; i < n; ++i) changed += label[i] != basis_label[i];
    dense = static_cast<double>(changed) > dense_changes * static_cast<double>(k) ||
            !plan_update(x, pn, centroids, info.max_norm, basis_centroids, label, basis_label, error, &update);
  }
  // the centroids that are not bitwise the last pass's: their scores change even where no product moves
  std::vector<uint8_t> touched(k, 0);
  if (!dense) {
    const float* c = centroids.const_data_ptr<float>();
    const float* b = basis_centroids.const_data_ptr<float>();
    for (int64_t j = 0; j < k; ++j) touched[j] = std::memcmp(c + j * d, b + j * d, d * sizeof(float)) != 0;
  }
  // labels become the basis of the new centroids; the pass writes the new labels
  std::memcpy(basis_label, label, n * sizeof(int64_t));
  basis_centroids.copy_(centroids);
  float* top = tops.mutable_data_ptr<float>();
  const float* cs = centroids.const_data_ptr<float>();
  Pass pass{xs, pn, cs, info.sq_norms.const_data_ptr<float>(), &info, dot, label, distance_out, n, k, d, 0.0};
  // packed: where this pass packs the points (dense) or finds them packed (moved); nullptr: each piece packs its
  // own (pydc's GEMM not selected, or pieces not starting on a panel: fewer points than threads x kLayoutRows)
  float* packed = nullptr;
  float* header = nullptr;
  const PackedLayout layout{cpu_gemm_panel(), n, d};
  if (has_packed) {
    float* data = packed_x->mutable_data_ptr<float>();
    header = data + packed_points_floats(n, d) - kPackedHeader;
    bool aligned = cpu_gemm() == CpuGemm::kPydc;
    for (const Piece& piece : layout_pieces(n)) aligned &= pass.first_point(piece) % layout.panel == 0;
    if (aligned && (dense || packed_header_matches(header, layout))) packed = data;
  }
  if (dense && header != nullptr) write_packed_header(header, {0, 0, 0});  // valid again once every piece is packed
  if (dense) {
    const float* cn = pass.cn;
    // every product by GEMM, 256 points at a time into the thread's buffer (k x 256: in its core's cache while
    // it is folded into the points' top lists), then streamed out to the block's runs of products
    const int64_t sub = std::min(kDenseRows, n);
    count[0] = for_pieces(pass, (k + 2 * (kDeltaTopSlots + 1)) * sub, [&](const Piece& piece, float* buffer) {
      const CpuKernels& kernels = cpu_kernels();
      const int64_t i0 = pass.first_point(piece);
      float* piece_tops = top + i0;
      for (int64_t r0 = 0; r0 < piece.rows; r0 += sub) {
        const int64_t part = std::min(sub, piece.rows - r0);
        const at::Tensor out = at::from_blob(buffer, {k, part}, x.options());
        if (packed != nullptr) {
          float* panels = packed + (i0 + r0) * d;
          pack_rows_into(x.narrow(0, i0 + r0, part), panels);
          cpu_gemm_abt_prepacked(out, centroids, panels);
        } else {
          cpu_gemm_abt_per_thread(out, centroids, x.narrow(0, i0 + r0, part));
        }
        kernels.fold_columns_tops(buffer, part, cn, k, part, piece_tops + r0, n, buffer + k * sub);
        kernels.copy_runs_streaming(buffer, part, pass.runs(piece) + r0, pass.stride(piece), k, part);
      }
      int64_t settled = 0;
      for (int64_t r = 0; r < piece.rows; ++r) settled += finish_from_tops(pass, piece, r, piece_tops + r);
      return settled;
    });
    if (packed != nullptr) write_packed_header(header, layout);
    const double gamma = kmeans_gamma(d);
    for (int64_t j = 0; j < k; ++j) error[j] = gamma * std::sqrt(info.sq_norms_f64[j]) * kRoundUp;
    count[1] = n * k;
    count[2] = 1;
    return {distances, counts};
  }

  // Each block of points: its products with the m changed points (one single-threaded GEMM, m x rows), then
  // one pass over the runs of the touched centroids, those that gained or lost points or moved otherwise
  // (update_fold_column_tops): a moved centroid's run scaled by n_j / n'_j, the products of the points that
  // joined it added and of those that left it taken off, and each touched run folded into the points' top
  // lists, out of which the touched centroids were taken first. The runs of the other centroids are not read:
  // their scores are those the lists already account for. A piece with more than kRefoldRows lists not valid
  // (the first moved pass after a dense one) folds every run into fresh lists instead.
  const int64_t m = static_cast<int64_t>(update.changed.size());
  at::Tensor moved = at::empty({m, d}, x.options());
  float* ys = moved.mutable_data_ptr<float>();
  std::vector<int64_t> start(k + 1, 0);
  for (int64_t t = 0; t < m; ++t) {
    std::memcpy(ys + t * d, xs + update.changed[t] * d, d * sizeof(float));
    ++start[update.into[t] + 1];
    ++start[update.from[t] + 1];
  }
  for (int64_t j = 0; j < k; ++j) start[j + 1] += start[j];
  std::vector<int32_t> row(2 * m);
  std::vector<float> gain(2 * m);
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t t = 0; t < m; ++t) {  // ascending t within every centroid
    row[fill[update.into[t]]] = static_cast<int32_t>(t);
    gain[fill[update.into[t]]++] = update.gain[update.into[t]];
    row[fill[update.from[t]]] = static_cast<int32_t>(t);
    gain[fill[update.from[t]]++] = -update.gain[update.from[t]];
  }
  std::vector<float> scale(k, 1.0f);
  for (size_t q = 0; q < update.columns.size(); ++q) scale[update.columns[q]] = update.column_scale[q];
  for (int64_t j = 0; j < k; ++j) pass.max_error = std::max(pass.max_error, error[j]);
  const float* cn = pass.cn;
  std::vector<int32_t> touched_columns;
  for (int64_t j = 0; j < k; ++j) {
    touched[j] |= static_cast<uint8_t>(scale[j] != 1.0f || start[j + 1] > start[j]);
    if (touched[j]) touched_columns.push_back(static_cast<int32_t>(j));
  }
  const int64_t product_floats = (m + 2 * (kDeltaTopSlots + 1)) * std::min(kLayoutRows, n);
  count[0] = for_pieces(pass, product_floats, [&](const Piece& piece, float* products) {
    const int64_t i0 = pass.first_point(piece), rows = piece.rows;
    float* piece_tops = top + i0;
    int64_t refold = 0;
    for (int64_t r = 0; r < rows; ++r) refold += std::isnan(piece_tops[2 * kDeltaTopSlots * n + r]);
    if (refold <= kRefoldRows) {
      for (int64_t r = 0; r < rows; ++r) delta_tops_remove(piece_tops + r, n, touched.data(), k);
    }
    if (m > 0 && packed != nullptr) {
      cpu_gemm_abt_prepacked(at::from_blob(products, {m, rows}, x.options()), moved, packed + i0 * d);
    } else if (m > 0) {
      cpu_gemm_abt_per_thread(at::from_blob(products, {m, rows}, x.options()), moved, x.narrow(0, i0, rows));
    }
    const CpuKernels& kernels = cpu_kernels();
    kernels.update_fold_column_tops(pass.runs(piece), pass.stride(piece), cn, touched_columns.data(),
                                    static_cast<int64_t>(touched_columns.size()), rows, scale.data(), start.data(),
                                    row.data(), gain.data(), products, piece_tops, n);
    if (refold > kRefoldRows) {  // the moved products are in place: every run folded into fresh lists
      kernels.fold_columns_tops(pass.runs(piece), pass.stride(piece), cn, k, rows, piece_tops, n,
                                products + m * rows);
    }
    int64_t settled = 0;
    for (int64_t r = 0; r < rows; ++r) settled += finish_from_tops(pass, piece, r, piece_tops + r);
    return settled;
  });
  count[1] = n * m;
  return {distances, counts};
}

}  // namespace
}  // namespace pydc

TORCH_LIBRARY_IMPL(pydc, CPU, m) { m.impl("kmeans_assign_delta", &pydc::kmeans_assign_delta_cpu); }
