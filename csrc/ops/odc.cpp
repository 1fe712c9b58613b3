// Schemas of the ODC memory ops and the checks both kernels share.
//
// odc_update_samples: blends a batch into its memory rows, relabels them by the nearest centroid and
//   keeps counts and fixed-point class sums up to date; duplicate indices are applied one after another in
//   batch order. Returns the number of label changes (int64, 0-dim).
// odc_class_sums: recomputes counts and fixed-point class sums from the whole bank.
// odc_centroids_from_sums: centroid_k = class_sum_k / 2^bits / count_k; classes with no member keep theirs.
#include "ops/odc.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include "common/checks.h"

namespace pydc {

namespace {

void check_bank(const char* op, const at::Tensor& feature_bank, const at::Tensor& label_bank) {
  PYDC_CHECK_DIM(op, "feature_bank", feature_bank, 2);
  TORCH_CHECK(feature_bank.scalar_type() == at::kFloat || feature_bank.scalar_type() == at::kDouble, op,
              ": expected feature_bank of dtype float32 or float64, got ", describe(feature_bank));
  TORCH_CHECK(feature_bank.is_contiguous(), op, ": expected a contiguous feature_bank (it is updated in "
              "place), got strides ", feature_bank.strides());
  PYDC_CHECK_DIM(op, "label_bank", label_bank, 1);
  PYDC_CHECK_DTYPE(op, "label_bank", label_bank, at::kLong);
  TORCH_CHECK(label_bank.size(0) == feature_bank.size(0), op, ": expected label_bank of length ",
              feature_bank.size(0), " (one label per feature_bank row), got ", describe(label_bank));
  TORCH_CHECK(label_bank.is_contiguous(), op, ": expected a contiguous label_bank");
  PYDC_CHECK_SAME_DEVICE(op, "feature_bank", feature_bank, "label_bank", label_bank);
}

void check_class_state(const char* op, const at::Tensor& feature_bank, const at::Tensor& counts,
                       const at::Tensor& class_sums, int64_t num_classes) {
  PYDC_CHECK_DIM(op, "counts", counts, 1);
  PYDC_CHECK_DTYPE(op, "counts", counts, at::kLong);
  TORCH_CHECK(counts.size(0) == num_classes && counts.is_contiguous(), op,
              ": expected contiguous counts of shape (", num_classes, ",), got ", describe(counts));
  PYDC_CHECK_DIM(op, "class_sums", class_sums, 2);
  PYDC_CHECK_DTYPE(op, "class_sums", class_sums, at::kLong);
  TORCH_CHECK(class_sums.size(0) == num_classes && class_sums.size(1) == feature_bank.size(1) &&
              class_sums.is_contiguous(), op, ": expected contiguous class_sums of shape (", num_classes,
              ", ", feature_bank.size(1), "), got ", describe(class_sums));
  PYDC_CHECK_SAME_DEVICE(op, "feature_bank", feature_bank, "counts", counts);
  PYDC_CHECK_SAME_DEVICE(op, "feature_bank", feature_bank, "class_sums", class_sums);
}

}  // namespace

at::Tensor check_odc_update_samples(const at::Tensor& feature_bank, const at::Tensor& label_bank,
                                    const at::Tensor& counts, const at::Tensor& class_sums,
                                    const at::Tensor& centroids, const at::Tensor& indices,
                                    const at::Tensor& features, double momentum) {
  constexpr const char* op = "pydc::odc_update_samples";
  check_bank(op, feature_bank, label_bank);
  PYDC_CHECK_DIM(op, "centroids", centroids, 2);
  TORCH_CHECK(centroids.size(1) == feature_bank.size(1) && centroids.size(0) > 0, op,
              ": expected centroids of shape (num_classes, ", feature_bank.size(1), "), got ",
              describe(centroids));
  TORCH_CHECK(centroids.scalar_type() == feature_bank.scalar_type(), op,
              ": expected centroids of the feature_bank's dtype ", feature_bank.scalar_type(), ", got ",
              describe(centroids));
  PYDC_CHECK_SAME_DEVICE(op, "feature_bank", feature_bank, "centroids", centroids);
  check_class_state(op, feature_bank, counts, class_sums, centroids.size(0));
  PYDC_CHECK_DIM(op, "indices", indices, 1);
  PYDC_CHECK_DTYPE(op, "indices", indices, at::kLong);
  PYDC_CHECK_DIM(op, "features", features, 2);
  TORCH_CHECK(at::isFloatingType(features.scalar_type()), op,
              ": expected floating-point features, got ", describe(features));
  TORCH_CHECK(features.size(0) == indices.size(0) && features.size(1) == feature_bank.size(1), op,
              ": expected features of shape (", indices.size(0), ", ", feature_bank.size(1),
              ") (one row per index, the bank's feature size), got ", describe(features));
  PYDC_CHECK_SAME_DEVICE(op, "feature_bank", feature_bank, "indices", indices);
  PYDC_CHECK_SAME_DEVICE(op, "feature_bank", feature_bank, "features", features);
  TORCH_CHECK(momentum >= 0.0 && momentum <= 1.0, op, ": expected momentum in [0, 1], got ", momentum);
  return features.to(feature_bank.scalar_type()).contiguous();
}

void check_odc_class_sums(const at::Tensor& feature_bank, const at::Tensor& label_bank,
                          const at::Tensor& class_sums, const at::Tensor& counts) {
  constexpr const char* op = "pydc::odc_class_sums";
  check_bank(op, feature_bank, label_bank);
  check_class_state(op, feature_bank, counts, class_sums, counts.dim() == 1 ? counts.size(0) : -1);
}

void check_odc_centroids_from_sums(const at::Tensor& class_sums, const at::Tensor& counts,
                                   const at::Tensor& centroids, int64_t bank_length) {
  constexpr const char* op = "pydc::odc_centroids_from_sums";
  PYDC_CHECK_DIM(op, "centroids", centroids, 2);
  TORCH_CHECK(centroids.scalar_type() == at::kFloat || centroids.scalar_type() == at::kDouble, op,
              ": expected centroids of dtype float32 or float64, got ", describe(centroids));
  TORCH_CHECK(centroids.is_contiguous(), op, ": expected contiguous centroids (updated in place)");
  check_class_state(op, centroids, counts, class_sums, centroids.size(0));
  TORCH_CHECK(bank_length >= 0, op, ": expected bank_length >= 0, got ", bank_length);
}

double odc_gemm_input_rounding(const at::Tensor& centroids) {
  if (centroids.scalar_type() != at::kFloat) return 0.0;
  const auto& context = at::globalContext();
  const bool reduced = context.float32MatmulPrecision() != at::Float32MatmulPrecision::HIGHEST ||
                       (centroids.is_cuda() && context.allowTF32CuBLAS());
  return reduced ? 1.0 / 256.0 : 0.0;
}

double odc_unit_roundoff(const at::Tensor& feature_bank) {
  return feature_bank.scalar_type() == at::kDouble ? std::ldexp(1.0, -53) : std::ldexp(1.0, -24);
}

}  // namespace pydc

TORCH_LIBRARY_FRAGMENT(pydc, m) {
  m.def("odc_update_samples(Tensor(a!) feature_bank, Tensor(b!) label_bank, Tensor(c!) counts, "
        "Tensor(d!) class_sums, Tensor centroids, Tensor indices, Tensor features, float momentum) -> Tensor");
  m.def("odc_class_sums(Tensor feature_bank, Tensor label_bank, Tensor(a!) class_sums, Tensor(b!) counts) -> ()");
  m.def("odc_centroids_from_sums(Tensor class_sums, Tensor counts, Tensor(a!) centroids, int bank_length) -> ()");
}
