// Schemas of the PCA-whitening ops and their device-generic drivers (argument checks, chunking, GEMMs).
#include "ops/pca.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"

namespace pydc {

namespace {
constexpr const char* kAccumulate = "pydc::pca_accumulate";
constexpr const char* kTransform = "pydc::pca_transform";

bool is_feature_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_features(const char* op, const char* name, const at::Tensor& x) {
  PYDC_CHECK_DIM(op, name, x, 2);
  TORCH_CHECK(is_feature_dtype(x.scalar_type()), op, ": expected ", name,
              " of dtype float32, float16, bfloat16 or float64, got ", describe(x));
  TORCH_CHECK(x.size(1) > 0, op, ": expected ", name, " with at least one feature column, got ", describe(x));
}

void check_vector(const char* op, const char* name, const at::Tensor& v, const at::Tensor& x) {
  PYDC_CHECK_DTYPE(op, name, v, at::kDouble);
  PYDC_CHECK_DIM(op, name, v, 1);
  TORCH_CHECK(v.size(0) == x.size(1), op, ": expected ", name, " of shape (", x.size(1),
              ",) to match the feature dimension, got ", describe(v));
  PYDC_CHECK_SAME_DEVICE(op, name, v, "the features", x);
}

void check_counter(const char* op, const at::Tensor& counter, const at::Tensor& x) {
  PYDC_CHECK_DTYPE(op, "nonfinite_rows", counter, at::kLong);
  TORCH_CHECK(counter.numel() == 1 && counter.is_contiguous(), op,
              ": expected nonfinite_rows to be a contiguous int64 tensor with one element, got ",
              describe(counter));
  PYDC_CHECK_SAME_DEVICE(op, "nonfinite_rows", counter, "the features", x);
}

int64_t rows_per_chunk(int64_t rows, int64_t d, const PcaDeviceOps& ops) {
  return std::max<int64_t>(1, std::min({rows, ops.chunk_elements / d, ops.max_chunk_rows}));
}

at::Tensor chunk_buffer(int64_t rows, int64_t d, const at::TensorOptions& options, const PcaDeviceOps& ops) {
  return ops.scratch != nullptr ? ops.scratch(rows, d, options) : at::empty({rows, d}, options);
}

// A chunk of rows with unit column stride (a copy only when the caller's rows are not laid out that way).
at::Tensor rows_with_unit_stride(const at::Tensor& rows) {
  return rows.stride(1) == 1 ? rows : rows.contiguous();
}

// gram += centred^T centred on and above the diagonal. Where the device has a syrk for it (ops.syrk_upper:
// the CPU's, for a gram of the product type) that does it, half the flops at full GEMM speed. Otherwise,
// with ops.gram_panel > 0, the product is computed as
// row panels gram[i:i+p, i:] += centred[:, i:i+p]^T centred[:, i:], which skips most of the lower triangle
// (about half the flops; BLAS syrk's trick); otherwise as one GEMM that fills both triangles. A gram of
// the GEMM's own product type is updated in place by the GEMM (beta = 1); a float64 gram of float32
// products takes each product through a temporary.
void add_gram(const at::Tensor& centred, const at::Tensor& gram, const PcaDeviceOps& ops) {
  const int64_t d = centred.size(1);
  const at::ScalarType product_type = centred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool narrow_inputs = centred.scalar_type() != product_type;  // float16/bfloat16 on tensor cores
  const bool in_place = !narrow_inputs && gram.scalar_type() == product_type;
  if (in_place && ops.syrk_upper != nullptr && ops.syrk_upper(centred, gram)) return;
  const int64_t panel = ops.gram_panel > 0 ? ops.gram_panel : d;
  for (int64_t i0 = 0; i0 < d; i0 += panel) {
    const int64_t rows = std::min(panel, d - i0);
    const int64_t first_column = ops.gram_panel > 0 ? i0 : 0;
    const at::Tensor left = centred.narrow(1, i0, rows).t();
    const at::Tensor right = centred.narrow(1, first_column, d - first_column);
    at::Tensor target = gram.narrow(0, i0, rows).narrow(1, first_column, d - first_column);
    if (in_place) {
      target.addmm_(left, right);
    } else {
      target.add_(narrow_inputs ? at::mm(left, right, product_type) : at::mm(left, right));
    }
  }
}
}  // namespace

void pca_accumulate_impl(const at::Tensor& batch, const at::Tensor& shift, const at::Tensor& sum,
                         const at::Tensor& gram, const at::Tensor& nonfinite_rows, const PcaDeviceOps& ops) {
  check_features(kAccumulate, "batch", batch);
  check_vector(kAccumulate, "shift", shift, batch);
  check_vector(kAccumulate, "sum", sum, batch);
  TORCH_CHECK(sum.is_contiguous(), kAccumulate, ": expected a contiguous sum, got strides ", sum.strides());
  const int64_t d = batch.size(1);
  const bool float32_gram = gram.scalar_type() == at::kFloat && batch.scalar_type() != at::kDouble;
  TORCH_CHECK(gram.scalar_type() == at::kDouble || float32_gram, kAccumulate,
              ": expected gram of dtype float64 (or float32 for a float32/float16/bfloat16 batch), got ",
              describe(gram), " for a ", batch.scalar_type(), " batch");
  TORCH_CHECK(gram.dim() == 2 && gram.size(0) == d && gram.size(1) == d, kAccumulate,
              ": expected gram of shape (", d, ", ", d, ") to match the feature dimension, got ", describe(gram));
  PYDC_CHECK_SAME_DEVICE(kAccumulate, "gram", gram, "the features", batch);
  check_counter(kAccumulate, nonfinite_rows, batch);
  const int64_t n = batch.size(0);
  if (n == 0) return;

  // float64 features are multiplied in float64; float16/bfloat16 ones in their own dtype where the device
  // multiplies them natively (tensor cores, float32 products), otherwise in float32. Each chunk is centred
  // first, so its products are of small, well-scaled values.
  const at::ScalarType in_type = batch.scalar_type();
  const bool low = (in_type == at::kHalf || in_type == at::kBFloat16) && ops.low_precision_gemm;
  const at::ScalarType gemm_type = in_type == at::kDouble ? at::kDouble : (low ? in_type : at::kFloat);
  const int64_t chunk_rows = rows_per_chunk(n, d, ops);
  const at::Tensor buffer = chunk_buffer(chunk_rows, d, batch.options().dtype(gemm_type), ops);
  for (int64_t start = 0; start < n; start += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, n - start);
    const at::Tensor centred = buffer.narrow(0, 0, rows);
    ops.center_rows(rows_with_unit_stride(batch.narrow(0, start, rows)), shift, centred, nonfinite_rows, sum);
    add_gram(centred, gram, ops);
  }
}

std::tuple<at::Tensor, at::Tensor> pca_transform_impl(const at::Tensor& x, const at::Tensor& mean,
                                                      const at::Tensor& projection, double norm_eps,
                                                      const PcaDeviceOps& ops) {
  check_features(kTransform, "x", x);
  check_vector(kTransform, "mean", mean, x);
  PYDC_CHECK_DIM(kTransform, "projection", projection, 2);
  TORCH_CHECK(projection.scalar_type() == at::kFloat || projection.scalar_type() == at::kDouble, kTransform,
              ": expected projection of dtype float32 or float64 (it sets the compute precision), got ",
              describe(projection));
  TORCH_CHECK(projection.size(1) == x.size(1), kTransform, ": expected projection of shape (n_components, ",
              x.size(1), ") to match the feature dimension, got ", describe(projection));
  PYDC_CHECK_SAME_DEVICE(kTransform, "projection", projection, "x", x);
  TORCH_CHECK(norm_eps >= 0.0, kTransform, ": expected norm_eps >= 0, got ", norm_eps);

  const int64_t n = x.size(0), d = x.size(1), k = projection.size(0);
  at::Tensor out = at::empty({n, k}, x.options().dtype(at::kFloat));
  at::Tensor nonfinite_rows = at::zeros({}, x.options().dtype(at::kLong));
  if (n == 0 || k == 0) return {out, nonfinite_rows};

  const at::ScalarType compute_type = projection.scalar_type();
  const at::Tensor projection_t = projection.t();  // (D, K): BLAS reads the transpose in place
  const int64_t chunk_rows = rows_per_chunk(n, d, ops);
  const at::Tensor buffer = chunk_buffer(chunk_rows, d, x.options().dtype(compute_type), ops);
  // float32: the product is written straight into the output rows and normalized there; float64 keeps
  // a chunk-sized float64 product and writes float32 rows.
  const at::Tensor wide = compute_type == at::kDouble ? at::empty({chunk_rows, k}, buffer.options())
                                                      : at::Tensor();
  for (int64_t start = 0; start < n; start += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, n - start);
    const at::Tensor centred = buffer.narrow(0, 0, rows);
    ops.center_rows(rows_with_unit_stride(x.narrow(0, start, rows)), mean, centred, nonfinite_rows, at::Tensor());
    at::Tensor out_rows = out.narrow(0, start, rows);
    at::Tensor projected = wide.defined() ? wide.narrow(0, 0, rows) : out_rows;
    if (ops.project == nullptr || !ops.project(centred, projection, projected)) {
      at::mm_out(projected, centred, projection_t);
    }
    ops.normalize_rows(projected, out_rows, norm_eps);
  }
  return {out, nonfinite_rows};
}

}  // namespace pydc

TORCH_LIBRARY_FRAGMENT(pydc, m) {
  m.def("pca_accumulate(Tensor batch, Tensor shift, Tensor(a!) sum, Tensor(b!) gram, "
        "Tensor(c!) nonfinite_rows) -> ()");
  m.def("pca_transform(Tensor x, Tensor mean, Tensor projection, float norm_eps=1e-10) -> (Tensor, Tensor)");
}
