// The run-time BLAS syrk (see blas_syrk.h).
#include "ops/cpu/blas_syrk.h"

#include <atomic>
#include <cstdint>
#include <limits>

namespace pydc {
namespace {
std::atomic<SyrkFloatFn> g_float_syrk{nullptr};
std::atomic<SyrkDoubleFn> g_double_syrk{nullptr};

bool fits_blas_int(int64_t v) { return v >= 0 && v <= std::numeric_limits<int>::max(); }

// Row-major (R, D) `centred` is the column-major D x R matrix A with lda = stride(0), and the row-major upper
// triangle of `gram` is the column-major lower triangle of the same memory; so this is
// syrk(uplo = "L", trans = "N"): C_lower += A A^T.
template <typename scalar_t, typename Fn>
void call_syrk(Fn syrk, const at::Tensor& centred, const at::Tensor& gram) {
  char uplo = 'L', trans = 'N';
  int n = static_cast<int>(centred.size(1)), k = static_cast<int>(centred.size(0));
  int lda = static_cast<int>(centred.stride(0)), ldc = static_cast<int>(gram.stride(0));
  scalar_t alpha = 1, beta = 1;
  syrk(&uplo, &trans, &n, &k, &alpha, const_cast<scalar_t*>(centred.const_data_ptr<scalar_t>()), &lda, &beta,
       gram.mutable_data_ptr<scalar_t>(), &ldc);
}
}  // namespace

void set_cpu_syrk(SyrkFloatFn float_syrk, SyrkDoubleFn double_syrk) {
  g_float_syrk.store(float_syrk);
  g_double_syrk.store(double_syrk);
}

bool has_cpu_syrk(at::ScalarType t) {
  return t == at::kFloat ? g_float_syrk.load() != nullptr : t == at::kDouble && g_double_syrk.load() != nullptr;
}

bool cpu_syrk_upper(const at::Tensor& centred, const at::Tensor& gram) {
  const at::ScalarType t = centred.scalar_type();
  if (gram.scalar_type() != t || !centred.device().is_cpu() || !gram.device().is_cpu()) return false;
  if (centred.stride(1) != 1 || gram.stride(1) != 1 || centred.size(1) != gram.size(0)) return false;
  const int64_t d = centred.size(1);
  // lda/ldc >= n as BLAS requires; then both fitting in an int covers n too
  if (centred.stride(0) < d || gram.stride(0) < d || !fits_blas_int(centred.stride(0)) ||
      !fits_blas_int(gram.stride(0)) || !fits_blas_int(centred.size(0))) {
    return false;
  }
  if (centred.size(0) == 0 || d == 0) return true;
  if (t == at::kFloat) {
    const SyrkFloatFn syrk = g_float_syrk.load();
    if (syrk == nullptr) return false;
    call_syrk<float>(syrk, centred, gram);
    return true;
  }
  if (t == at::kDouble) {
    const SyrkDoubleFn syrk = g_double_syrk.load();
    if (syrk == nullptr) return false;
    call_syrk<double>(syrk, centred, gram);
    return true;
  }
  return false;
}

}  // namespace pydc
