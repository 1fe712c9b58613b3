// The run-time BLAS syrk (see blas_syrk.h).
#include "ops/cpu/blas_syrk.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "ops/cpu/blas_gemm.h"
#include "ops/cpu/cpu_kernels.h"

namespace pydc {
namespace {
std::atomic<SyrkFloatFn> g_float_syrk{nullptr};
std::atomic<SyrkDoubleFn> g_double_syrk{nullptr};
std::atomic<int> g_float_choice{static_cast<int>(CpuSyrk::kBlas)};

// MKL's float32 syrk in torch's libraries (see blas_syrk.h): the entry point of MKL's core, whose integers are
// 64-bit (torch's LP64 interface layer converts its int arguments before calling it; read as int, the lda and
// ldc that follow it in memory made a 40-column Gram fault). An int64 read as int on little-endian x86 is the
// same value, so the call below is right either way; a Gram of known values checks it once.
using MklSyrkFn = void (*)(const char* uplo, const char* trans, const int64_t* n, const int64_t* k,
                           const float* alpha, const float* a, const int64_t* lda, const float* beta, float* c,
                           const int64_t* ldc);

void call_mkl_ssyrk(MklSyrkFn syrk, int64_t n, int64_t k, const float* a, int64_t lda, float* c, int64_t ldc) {
  const char uplo = 'L', trans = 'N';
  const float alpha = 1.0f, beta = 1.0f;
  syrk(&uplo, &trans, &n, &k, &alpha, a, &lda, &beta, c, &ldc);
}

MklSyrkFn mkl_ssyrk() {
  static const MklSyrkFn checked = [] {
    const auto syrk = reinterpret_cast<MklSyrkFn>(torch_blas_symbol("mkl_blas_ssyrk"));
    if (syrk == nullptr) return syrk;
    // x: 2 rows of 3 features, row-major; its Gram's upper triangle, on top of 1 everywhere
    const float x[6] = {1, 2, 3, 4, 5, 6}, expected[9] = {18, 23, 28, 1, 30, 37, 1, 1, 46};
    float gram[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
    call_mkl_ssyrk(syrk, 3, 2, x, 3, gram, 3);
    return std::equal(gram, gram + 9, expected) ? syrk : nullptr;
  }();
  return checked;
}

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

// pydc's float32 syrk: the Gram's rows split between the threads so that each updates about as many entries of
// the upper triangle (row i has d - i): thread q of T takes rows from d (1 - sqrt(1 - q / T)) on.
void pydc_syrk_upper(const at::Tensor& centred, const at::Tensor& gram) {
  const CpuKernels& kernels = cpu_kernels();
  const int64_t rows = centred.size(0), d = centred.size(1);
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), d));
  const auto boundary = [&](int64_t q) {
    return q >= threads ? d : static_cast<int64_t>(std::llround(d * (1.0 - std::sqrt(1.0 - double(q) / threads))));
  };
  const float* x = centred.const_data_ptr<float>();
  float* g = gram.mutable_data_ptr<float>();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scratch;  // kept: a fresh 4 MiB per call would page-fault
    scratch.resize(std::max<size_t>(scratch.size(), kernels.syrk_scratch_floats(d)));
    kernels.syrk_upper_rows(x, centred.stride(0), rows, d, boundary(begin), boundary(end), g, gram.stride(0),
                            scratch.data());
  });
}
}  // namespace

void set_cpu_float_syrk(CpuSyrk which) { g_float_choice.store(static_cast<int>(which)); }

CpuSyrk cpu_float_syrk() { return static_cast<CpuSyrk>(g_float_choice.load()); }

void set_cpu_syrk(SyrkFloatFn float_syrk, SyrkDoubleFn double_syrk) {
  g_float_syrk.store(float_syrk);
  g_double_syrk.store(double_syrk);
}

bool has_mkl_syrk() { return mkl_ssyrk() != nullptr; }

bool has_cpu_syrk(at::ScalarType t) {
  if (t == at::kFloat) {
    switch (cpu_float_syrk()) {
      case CpuSyrk::kPydc: return true;
      case CpuSyrk::kMkl: return has_mkl_syrk();
      default: return g_float_syrk.load() != nullptr;
    }
  }
  return t == at::kDouble && g_double_syrk.load() != nullptr;
}

namespace {
// cpu_syrk_upper with `which` as the float32 syrk (the timing below runs both without changing the selection).
bool syrk_upper_with(CpuSyrk which, const at::Tensor& centred, const at::Tensor& gram) {
  const at::ScalarType t = centred.scalar_type();
  if (gram.scalar_type() != t || !centred.device().is_cpu() || !gram.device().is_cpu()) return false;
  if (centred.stride(1) != 1 || gram.stride(1) != 1 || centred.size(1) != gram.size(0)) return false;
  const int64_t d = centred.size(1);
  if (t == at::kFloat && which == CpuSyrk::kPydc) {
    if (centred.size(0) > 0 && d > 0) pydc_syrk_upper(centred, gram);
    return true;
  }
  // lda/ldc >= n as BLAS requires; then both fitting in an int covers n too
  if (centred.stride(0) < d || gram.stride(0) < d || !fits_blas_int(centred.stride(0)) ||
      !fits_blas_int(gram.stride(0)) || !fits_blas_int(centred.size(0))) {
    return false;
  }
  if (centred.size(0) == 0 || d == 0) return true;
  if (t == at::kFloat && which == CpuSyrk::kMkl) {
    const MklSyrkFn syrk = mkl_ssyrk();
    if (syrk == nullptr) return false;
    call_mkl_ssyrk(syrk, d, centred.size(0), centred.const_data_ptr<float>(), centred.stride(0),
                   gram.mutable_data_ptr<float>(), gram.stride(0));
    return true;
  }
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
}  // namespace

bool cpu_syrk_upper(const at::Tensor& centred, const at::Tensor& gram) {
  return syrk_upper_with(cpu_float_syrk(), centred, gram);
}

CpuSyrkTimes time_cpu_syrks(int64_t rows, int64_t d, int64_t rounds) {
  TORCH_CHECK(rows > 0 && d > 0 && rounds > 0, "pydc: time_cpu_syrks expects positive rows, d and rounds, got ",
              rows, ", ", d, ", ", rounds);
  // fixed values (not torch's generator, whose state belongs to the caller), away from denormals
  std::vector<float> x_data(rows * d), gram_data(d * d, 0.0f);
  for (size_t i = 0; i < x_data.size(); ++i) x_data[i] = (static_cast<float>(i % 7) - 3.0f) * 0.125f;
  const auto options = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor x = at::from_blob(x_data.data(), {rows, d}, options);
  const at::Tensor gram = at::from_blob(gram_data.data(), {d, d}, options);
  const auto seconds = [&](CpuSyrk which) {
    const auto start = std::chrono::steady_clock::now();
    syrk_upper_with(which, x, gram);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  const bool blas = g_float_syrk.load() != nullptr, mkl = has_mkl_syrk();  // a missing one stays at +inf
  constexpr double kInf = std::numeric_limits<double>::infinity();
  CpuSyrkTimes best{kInf, kInf, kInf};
  for (int64_t round = -1; round < rounds; ++round) {  // round -1: untimed (first touch, BLAS threads starting)
    const double blas_s = blas ? seconds(CpuSyrk::kBlas) : kInf;
    const double pydc_s = seconds(CpuSyrk::kPydc);
    const double mkl_s = mkl ? seconds(CpuSyrk::kMkl) : kInf;
    if (round >= 0) {
      best = {std::min(best.blas_s, blas_s), std::min(best.pydc_s, pydc_s), std::min(best.mkl_s, mkl_s)};
    }
  }
  return best;
}

}  // namespace pydc
