// CPU kernels of the ODC memory ops.
//
// Sample update, in four passes: (1) rows grouped by memory index (stable, so batch order is kept inside a
// group) and each group blended sequentially, groups in parallel, every intermediate row kept; (2) one GEMM
// of those rows against the centroids; (3) per row the exact argmax (candidates from the GEMM, settled in
// double); (4) labels, counts and fixed-point class sums, walked in batch order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "common/odc_math.h"
#include "ops/cpu/cpu_kernels.h"
#include "ops/odc.h"

namespace pydc {
namespace {

// Work (in element operations) below which a pass runs on the calling thread: a batch step is a fraction of
// a millisecond of work, and a parallel region costs more than it saves on a busy machine.
constexpr int64_t kSerialWork = int64_t(1) << 20;

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kSerialWork / std::max<int64_t>(1, work_per_item));
}

struct Group {
  int64_t begin, end;  // positions in `order`
};

// Pass 1: blends every batch row into its memory row, in batch order within a group of equal indices.
// applied[j] is the memory row right after batch row j; old_rows[g] is group g's row before the batch.
template <typename scalar_t>
void blend_groups(scalar_t* bank, const int64_t* indices, const scalar_t* features, const std::vector<int64_t>& order,
                  const std::vector<Group>& groups, int64_t D, double momentum, scalar_t* applied,
                  scalar_t* old_rows) {
  at::parallel_for(0, static_cast<int64_t>(groups.size()), grain_for(4 * D), [&](int64_t g0, int64_t g1) {
    std::vector<double> blended(D);
    for (int64_t g = g0; g < g1; ++g) {
      scalar_t* row = bank + indices[order[groups[g].begin]] * D;
      std::copy(row, row + D, old_rows + g * D);
      for (int64_t p = groups[g].begin; p < groups[g].end; ++p) {
        const int64_t j = order[p];
        const scalar_t* x = features + j * D;
        const double feature_denominator = odc_norm_denominator(odc_sum_squares(x, D));
        for (int64_t d = 0; d < D; ++d) {
          blended[d] = odc_blend(static_cast<double>(row[d]), static_cast<double>(x[d]) / feature_denominator,
                                 momentum);
        }
        const double denominator = odc_norm_denominator(odc_sum_squares(blended.data(), D));
        scalar_t* out = applied + j * D;
        for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(blended[d] / denominator);
        std::copy(out, out + D, row);
      }
    }
  });
}

// Largest value of a GEMM row, ignoring NaN (a per-ISA loop, cpu_kernels.h).
float row_max(const float* s, int64_t K) { return cpu_kernels().row_max_float(s, K); }
double row_max(const double* s, int64_t K) { return cpu_kernels().row_max_double(s, K); }

void add_quantized(int64_t* sum, const float* row, int64_t n, double scale) {
  cpu_kernels().add_quantized_float(sum, row, n, scale);
}
void add_quantized(int64_t* sum, const double* row, int64_t n, double scale) {
  cpu_kernels().add_quantized_double(sum, row, n, scale);
}

// Pass 3: argmax_k centroid_k . row, exact in double: candidates are the classes whose GEMM value lies
// within `tolerance` of the best GEMM value; more than one candidate -> fixed-order double dots decide.
template <typename scalar_t>
void exact_argmax(const scalar_t* similarity, const scalar_t* rows, const scalar_t* centroids, int64_t B,
                  int64_t K, int64_t D, double tolerance, int64_t* new_labels) {
  at::parallel_for(0, B, grain_for(2 * K), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const scalar_t* s = similarity + j * K;
      const scalar_t best_value = row_max(s, K);
      int64_t best = 0;  // the first class attaining the maximum (0 if the row is all NaN)
      while (best < K && !(s[best] == best_value)) ++best;
      if (best == K) best = 0;
      // best - tolerance rounded down to the GEMM's dtype: a superset of the candidates, never fewer.
      scalar_t threshold = static_cast<scalar_t>(static_cast<double>(best_value) - tolerance);
      if (static_cast<double>(threshold) > static_cast<double>(best_value) - tolerance) {
        threshold = std::nextafter(threshold, -std::numeric_limits<scalar_t>::infinity());
      }
      int64_t candidates = 0;
      for (int64_t k = 0; k < K; ++k) candidates += s[k] >= threshold;
      if (candidates > 1) {
        const scalar_t* row = rows + j * D;
        double exact_best = 0.0;
        best = -1;
        for (int64_t k = 0; k < K; ++k) {
          if (!(s[k] >= threshold)) continue;
          const double value = odc_dot(row, centroids + k * D, D);
          if (best < 0 || value > exact_best) {
            exact_best = value;
            best = k;
          }
        }
      }
      new_labels[j] = best;
    }
  });
}

template <typename scalar_t>
int64_t update_samples_impl(at::Tensor& feature_bank, at::Tensor& label_bank, at::Tensor& counts,
                            at::Tensor& class_sums, const at::Tensor& centroids_in, const at::Tensor& indices_in,
                            const at::Tensor& features, double momentum) {
  const int64_t N = feature_bank.size(0), D = feature_bank.size(1), B = indices_in.size(0);
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor centroids = centroids_in.contiguous();
  const int64_t K = centroids.size(0);
  const int64_t* index = indices.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < B; ++j) {
    TORCH_CHECK(index[j] >= 0 && index[j] < N, "pydc::odc_update_samples: index ", index[j], " at batch position ",
                j, " is outside the memory of ", N, " rows");
    const int64_t label = label_bank.const_data_ptr<int64_t>()[index[j]];
    TORCH_CHECK(label >= 0 && label < K, "pydc::odc_update_samples: label_bank[", index[j], "] = ", label,
                " is not a class in [0, ", K, ")");
  }
  std::vector<int64_t> order(B);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return index[a] < index[b]; });
  std::vector<Group> groups;
  for (int64_t p = 0; p < B; ++p) {
    if (p == 0 || index[order[p]] != index[order[p - 1]]) groups.push_back({p, p + 1});
    else groups.back().end = p + 1;
  }
  const int64_t G = static_cast<int64_t>(groups.size());

  at::Tensor applied = at::empty({B, D}, feature_bank.options());
  at::Tensor old_rows = at::empty({G, D}, feature_bank.options());
  blend_groups<scalar_t>(feature_bank.mutable_data_ptr<scalar_t>(), index, features.const_data_ptr<scalar_t>(),
                         order, groups, D, momentum, applied.mutable_data_ptr<scalar_t>(),
                         old_rows.mutable_data_ptr<scalar_t>());

  const at::Tensor similarity = at::mm(applied, centroids.t()).contiguous();
  const scalar_t* centroid = centroids.const_data_ptr<scalar_t>();
  double max_square_norm = 0.0;
  for (int64_t k = 0; k < K; ++k) max_square_norm = std::max(max_square_norm, odc_sum_squares(centroid + k * D, D));
  const double max_centroid_norm = std::sqrt(max_square_norm);
  const double tolerance = odc_candidate_tolerance(D, odc_unit_roundoff(feature_bank),
                                                   odc_gemm_input_rounding(centroids), max_centroid_norm);
  std::vector<int64_t> new_labels(B);
  exact_argmax<scalar_t>(similarity.const_data_ptr<scalar_t>(), applied.const_data_ptr<scalar_t>(),
                         centroids.const_data_ptr<scalar_t>(), B, K, D, tolerance, new_labels.data());

  // Pass 4: per group, the label walks through its members' new labels in batch order; every step that
  // differs from the current label is one change. Counts and sums only see the net move.
  int64_t* labels = label_bank.mutable_data_ptr<int64_t>();
  int64_t* count = counts.mutable_data_ptr<int64_t>();
  std::vector<int64_t> old_label(G), final_label(G);
  int64_t changes = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t i = index[order[groups[g].begin]];
    int64_t current = labels[i];
    old_label[g] = current;
    for (int64_t p = groups[g].begin; p < groups[g].end; ++p) {
      const int64_t next = new_labels[order[p]];
      changes += next != current;
      current = next;
    }
    final_label[g] = current;
    labels[i] = current;
    count[old_label[g]] -= 1;
    count[current] += 1;
  }

  // Class sums: columns in parallel, so that no two threads touch the same sum.
  const double scale = std::ldexp(1.0, odc_fixed_bits(N));
  int64_t* sums = class_sums.mutable_data_ptr<int64_t>();
  const scalar_t* bank = feature_bank.const_data_ptr<scalar_t>();
  const scalar_t* before = old_rows.const_data_ptr<scalar_t>();
  at::parallel_for(0, D, std::max<int64_t>(16, grain_for(2 * G)), [&](int64_t d0, int64_t d1) {
    for (int64_t g = 0; g < G; ++g) {
      const scalar_t* after = bank + index[order[groups[g].begin]] * D;
      int64_t* from = sums + old_label[g] * D;
      int64_t* to = sums + final_label[g] * D;
      for (int64_t d = d0; d < d1; ++d) {
        from[d] -= odc_quantize(static_cast<double>(before[g * D + d]), scale);
        to[d] += odc_quantize(static_cast<double>(after[d]), scale);
      }
    }
  });
  return changes;
}

at::Tensor odc_update_samples_cpu(at::Tensor feature_bank, at::Tensor label_bank, at::Tensor counts,
                                  at::Tensor class_sums, const at::Tensor& centroids, const at::Tensor& indices,
                                  const at::Tensor& features_in, double momentum) {
  const at::Tensor features = check_odc_update_samples(feature_bank, label_bank, counts, class_sums, centroids,
                                                       indices, features_in, momentum);
  int64_t changes = 0;
  if (indices.size(0) > 0) {
    AT_DISPATCH_FLOATING_TYPES(feature_bank.scalar_type(), "odc_update_samples_cpu", [&] {
      changes = update_samples_impl<scalar_t>(feature_bank, label_bank, counts, class_sums, centroids, indices,
                                              features, momentum);
    });
  }
  return at::scalar_tensor(changes, label_bank.options());
}

template <typename scalar_t>
void class_sums_impl(const at::Tensor& feature_bank, const at::Tensor& label_bank, at::Tensor& class_sums,
                     at::Tensor& counts) {
  const int64_t N = feature_bank.size(0), D = feature_bank.size(1), K = counts.size(0);
  const int64_t* labels = label_bank.const_data_ptr<int64_t>();
  int64_t* count = counts.mutable_data_ptr<int64_t>();
  std::fill(count, count + K, 0);
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(labels[n] >= 0 && labels[n] < K, "pydc::odc_class_sums: label_bank[", n, "] = ", labels[n],
                " is not a class in [0, ", K, ")");
    count[labels[n]] += 1;
  }
  const double scale = std::ldexp(1.0, odc_fixed_bits(N));
  const scalar_t* bank = feature_bank.const_data_ptr<scalar_t>();
  int64_t* sums = class_sums.mutable_data_ptr<int64_t>();
  // Columns in parallel: each thread streams every row but adds only its own columns, so no sum is shared.
  at::parallel_for(0, D, 16, [&](int64_t d0, int64_t d1) {
    for (int64_t k = 0; k < K; ++k) std::fill(sums + k * D + d0, sums + k * D + d1, 0);
    for (int64_t n = 0; n < N; ++n) {
      const scalar_t* row = bank + n * D;
      int64_t* sum = sums + labels[n] * D;
      add_quantized(sum + d0, row + d0, d1 - d0, scale);
    }
  });
}

void odc_class_sums_cpu(const at::Tensor& feature_bank, const at::Tensor& label_bank, at::Tensor class_sums,
                        at::Tensor counts) {
  check_odc_class_sums(feature_bank, label_bank, class_sums, counts);
  AT_DISPATCH_FLOATING_TYPES(feature_bank.scalar_type(), "odc_class_sums_cpu", [&] {
    class_sums_impl<scalar_t>(feature_bank, label_bank, class_sums, counts);
  });
}

void odc_centroids_from_sums_cpu(const at::Tensor& class_sums, const at::Tensor& counts, at::Tensor centroids,
                                 int64_t bank_length) {
  check_odc_centroids_from_sums(class_sums, counts, centroids, bank_length);
  const int64_t K = centroids.size(0), D = centroids.size(1);
  const double inv_scale = std::ldexp(1.0, -odc_fixed_bits(bank_length));
  const int64_t* sums = class_sums.const_data_ptr<int64_t>();
  const int64_t* count = counts.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(centroids.scalar_type(), "odc_centroids_from_sums_cpu", [&] {
    scalar_t* out = centroids.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, K, 64, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        if (count[k] <= 0) continue;  // a class with no member keeps its centroid
        for (int64_t d = 0; d < D; ++d) {
          out[k * D + d] = static_cast<scalar_t>(odc_mean_from_sum(sums[k * D + d], count[k], inv_scale));
        }
      }
    });
  });
}

}  // namespace
}  // namespace pydc

TORCH_LIBRARY_IMPL(pydc, CPU, m) {
  m.impl("odc_update_samples", &pydc::odc_update_samples_cpu);
  m.impl("odc_class_sums", &pydc::odc_class_sums_cpu);
  m.impl("odc_centroids_from_sums", &pydc::odc_centroids_from_sums_cpu);
}
