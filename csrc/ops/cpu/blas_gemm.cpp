// The run-time BLAS of the CPU k-means GEMMs (see blas_gemm.h).
#include "ops/cpu/blas_gemm.h"
#include "ops/cpu/cpu_kernels.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#define PYDC_HAVE_DLADDR 1
#endif

namespace pydc {

void* torch_blas_symbol(const char* name) {
#ifdef PYDC_HAVE_DLADDR
  void* handle = dlopen("libtorch_cpu.so", RTLD_NOW | RTLD_NOLOAD);
  void* symbol = handle != nullptr ? dlsym(handle, name) : nullptr;
  if (handle != nullptr) dlclose(handle);  // drops only the reference taken here: torch keeps it loaded
  return symbol != nullptr ? symbol : dlsym(RTLD_DEFAULT, name);
#else
  (void)name;
  return nullptr;
#endif
}

bool fits_blas_int(int64_t v) { return v >= 0 && v <= std::numeric_limits<int>::max(); }

namespace {
using SetThreadsFn = void (*)(int);
using GetThreadsFn = int (*)();

std::atomic<SgemmFn> g_sgemm{nullptr};
std::atomic<SetThreadsFn> g_set_threads{nullptr};
std::atomic<GetThreadsFn> g_get_threads{nullptr};
std::atomic<int> g_choice{static_cast<int>(CpuGemm::kTorch)};

// scipy's cython_blas functions live in cython_blas.so, which links the OpenBLAS that does the work. dlsym on
// a handle searches the object and its dependencies, so the thread-count functions are found from the sgemm's
// own library, whatever its path. scipy-openblas wheels prefix OpenBLAS's symbols with "scipy_"; older scipy
// wheels did not.
template <typename Fn>
Fn find_next_to(void* address, const char* const* names) {
#ifdef PYDC_HAVE_DLADDR
  Dl_info where;
  if (address == nullptr || dladdr(address, &where) == 0 || where.dli_fname == nullptr) return nullptr;
  void* handle = dlopen(where.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
  if (handle == nullptr) return nullptr;
  Fn found = nullptr;
  for (const char* const* name = names; *name != nullptr && found == nullptr; ++name) {
    found = reinterpret_cast<Fn>(dlsym(handle, *name));
  }
  dlclose(handle);  // only drops the reference taken above: the library stays loaded while scipy is
  return found;
#else
  (void)address;
  (void)names;
  return nullptr;
#endif
}

// A float32 matrix BLAS can read as column-major with a leading dimension: rows of unit column stride, each at
// least a row's length from the next (BLAS needs ld >= the row length), every number an int.
bool blas_matrix(const at::Tensor& t) {
  const int64_t rows = t.size(0), row_length = t.size(1);
  return t.scalar_type() == at::kFloat && (row_length <= 1 || t.stride(1) == 1) &&
         (rows <= 1 || t.stride(0) >= row_length) && fits_blas_int(rows) && fits_blas_int(row_length) &&
         fits_blas_int(t.stride(0));
}

// The leading dimension BLAS is given for a row-major matrix t: its row stride, which BLAS requires to be at least
// the row's length (and 1) even where t has one row or none (its stride then arbitrary).
int blas_ld(const at::Tensor& t) {
  const int64_t length = std::max<int64_t>(t.size(1), 1);
  return static_cast<int>(std::max<int64_t>(t.size(0) > 1 ? t.stride(0) : length, length));
}

// Row-major a (m, d) is the column-major d x m matrix A with lda = stride(0); likewise b (n, d) and out (m, n)
// (column-major n x m). out^T = b a^T is then sgemm(transa = "T", transb = "N") of B (d x n) and A (d x m).
void sgemm_abt(SgemmFn sgemm, const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  char transa = 'T', transb = 'N';
  int m = static_cast<int>(b.size(0)), n = static_cast<int>(a.size(0)), k = static_cast<int>(a.size(1));
  int lda = blas_ld(b), ldb = blas_ld(a), ldc = blas_ld(out);
  float alpha = 1.0f, beta = 0.0f;
  sgemm(&transa, &transb, &m, &n, &k, &alpha, const_cast<float*>(b.const_data_ptr<float>()), &lda,
        const_cast<float*>(a.const_data_ptr<float>()), &ldb, &beta, out.mutable_data_ptr<float>(), &ldc);
}

// A float32 matrix pydc's GEMM reads: rows of unit column stride.
bool unit_rows(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat && (t.size(1) <= 1 || t.stride(1) == 1);
}

// b (n, d) in `kernels`' panels, into *packed (resized).
void pack_rhs(const CpuKernels& kernels, const at::Tensor& b, std::vector<float>* packed) {
  const int64_t n = b.size(0), d = b.size(1);
  packed->resize(static_cast<size_t>(kernels.gemm_packed_floats(n, d)));
  kernels.pack_gemm_panels(b.const_data_ptr<float>(), b.stride(0), n, d, packed->data());
}

// out (m, cols) = a (m, d) times the cols packed rows from `packed` on, by `kernels`' tiles.
void multiply_packed(const CpuKernels& kernels, const float* packed, const at::Tensor& out, const at::Tensor& a) {
  kernels.gemm_abt_packed(a.const_data_ptr<float>(), a.stride(0), a.size(0), packed, out.size(1), a.size(1),
                          out.mutable_data_ptr<float>(), out.stride(0));
}

// pydc's own for one call: b packed into the calling thread's buffer, then the tiles.
void pydc_gemm_abt(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  thread_local std::vector<float> packed;
  const CpuKernels& kernels = cpu_kernels();
  pack_rhs(kernels, b, &packed);
  multiply_packed(kernels, packed.data(), out, a);
}

// MKL's packed sgemm, looked up in the libtorch_cpu that torch's MKL is linked into (LP64: MKL_INT is int); every
// member null where torch was built without MKL. MKL_Set_Num_Threads_Local (optional) holds the packing to one
// thread, as the per-thread products that use it run ("use the same number of threads for packing and
// computing", MKL's reference).
using MklPackGetSizeFn = size_t (*)(int identifier, int m, int n, int k);
using MklPackFn = void (*)(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                           int ld, float* dest);
using MklComputeFn = void (*)(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                              const float* b, int ldb, float beta, float* c, int ldc);
using MklSetThreadsLocalFn = int (*)(int);
// MKL's packed form takes ~8 MB whatever the size (plus ~2.5x b): smaller right-hand sides, cheap to repack per
// call, are multiplied as they are.
constexpr int64_t kMklPackMinFloats = int64_t{1} << 14;
constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112, kCblasPacked = 151, kCblasBMatrix = 162;

struct MklPackedApi {
  MklPackGetSizeFn get_size = nullptr;
  MklPackFn pack = nullptr;
  MklComputeFn compute = nullptr;
  MklSetThreadsLocalFn set_threads_local = nullptr;
};

const MklPackedApi& mkl_packed_api() {
  static const MklPackedApi api = [] {
    MklPackedApi found;
    found.get_size = reinterpret_cast<MklPackGetSizeFn>(torch_blas_symbol("cblas_sgemm_pack_get_size"));
    found.pack = reinterpret_cast<MklPackFn>(torch_blas_symbol("cblas_sgemm_pack"));
    found.compute = reinterpret_cast<MklComputeFn>(torch_blas_symbol("cblas_sgemm_compute"));
    // mkl_service.h's mkl_set_num_threads_local is a macro for this; the symbol of that name takes an int*
    found.set_threads_local = reinterpret_cast<MklSetThreadsLocalFn>(torch_blas_symbol("MKL_Set_Num_Threads_Local"));
    if (found.get_size == nullptr || found.pack == nullptr || found.compute == nullptr) found = MklPackedApi{};
    return found;
  }();
  return api;
}

void gemm_abt_with(CpuGemm which, const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (out.numel() == 0) return;
  const SgemmFn sgemm = g_sgemm.load();
  if (which == CpuGemm::kPydc && a.size(1) > 0 && unit_rows(out) && unit_rows(a) && unit_rows(b)) {
    pydc_gemm_abt(out, a, b);
  } else if (which == CpuGemm::kScipy && sgemm != nullptr && a.size(1) > 0 && blas_matrix(out) && blas_matrix(a) &&
             blas_matrix(b)) {
    sgemm_abt(sgemm, out, a, b);
  } else {
    at::mm_out(const_cast<at::Tensor&>(out), a, b.t());
  }
}
}  // namespace

void set_cpu_sgemm(SgemmFn sgemm) {
  static const char* const kSetNames[] = {"scipy_openblas_set_num_threads", "openblas_set_num_threads",
                                          "scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
                                          nullptr};
  static const char* const kGetNames[] = {"scipy_openblas_get_num_threads", "openblas_get_num_threads",
                                          "scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
                                          nullptr};
  void* address = reinterpret_cast<void*>(sgemm);
  g_set_threads.store(sgemm != nullptr ? find_next_to<SetThreadsFn>(address, kSetNames) : nullptr);
  g_get_threads.store(sgemm != nullptr ? find_next_to<GetThreadsFn>(address, kGetNames) : nullptr);
  g_sgemm.store(sgemm);
  if (sgemm == nullptr && g_choice.load() == static_cast<int>(CpuGemm::kScipy)) {
    g_choice.store(static_cast<int>(CpuGemm::kTorch));
  }
}

bool has_cpu_sgemm() { return g_sgemm.load() != nullptr; }

bool cpu_sgemm_threads_settable() { return g_set_threads.load() != nullptr && g_get_threads.load() != nullptr; }

void set_cpu_gemm(CpuGemm which) {
  TORCH_CHECK(which != CpuGemm::kScipy || has_cpu_sgemm(),
              "pydc: the CPU GEMM cannot be scipy's BLAS: no run-time sgemm is set (pydc.ops.cpu_gemm.use_cpu_gemm "
              "sets scipy.linalg.cython_blas's; is scipy installed?)");
  g_choice.store(static_cast<int>(which));
}

CpuGemm cpu_gemm() { return static_cast<CpuGemm>(g_choice.load()); }

void cpu_gemm_abt_per_thread(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  gemm_abt_with(cpu_gemm(), out, a, b);
}

bool has_mkl_packed_sgemm() { return mkl_packed_api().compute != nullptr; }

CpuGemmRhs::CpuGemmRhs(const at::Tensor& b, CpuGemm which, int64_t block_rows) : b_(b), which_(which) {
  if (b.size(0) == 0 || b.size(1) == 0 || !unit_rows(b)) return;
  if (which_ == CpuGemm::kPydc) {
    kernels_ = &cpu_kernels();
    panel_ = kernels_->gemm_packed_floats(1, 1);  // one row of one feature fills one panel
    pack_rhs(*kernels_, b, &packed_);
    return;
  }
  const MklPackedApi& mkl = mkl_packed_api();
  if (which_ != CpuGemm::kTorch || mkl.compute == nullptr || !blas_matrix(b) || b.numel() < kMklPackMinFloats) return;
  const int64_t n = b.size(0);
  const int d = static_cast<int>(b.size(1));
  const int ld = blas_ld(b);
  const int rows = static_cast<int>(kPerThreadGemmRows);  // MKL asks for the products' rows; any count may use it
  mkl_block_ = block_rows > 0 ? std::min(block_rows, n) : n;
  const int previous = mkl.set_threads_local != nullptr ? mkl.set_threads_local(1) : 0;
  for (int64_t j0 = 0; j0 < n; j0 += mkl_block_) {
    const int cols = static_cast<int>(std::min(mkl_block_, n - j0));
    const size_t bytes = mkl.get_size(kCblasBMatrix, rows, cols, d);
    std::unique_ptr<void, FreeBytes> packed(bytes > 0 ? std::aligned_alloc(64, (bytes + 63) / 64 * 64) : nullptr);
    if (packed == nullptr) {  // no size or no memory for it: the products repack b per call, as without MKL's API
      mkl_packed_.clear();
      break;
    }
    mkl.pack(kCblasRowMajor, kCblasBMatrix, kCblasTrans, rows, cols, d, 1.0f, b.const_data_ptr<float>() + j0 * ld,
             ld, static_cast<float*>(packed.get()));
    mkl_packed_.push_back(std::move(packed));
  }
  if (mkl.set_threads_local != nullptr) mkl.set_threads_local(previous);
}

void CpuGemmRhs::multiply(const at::Tensor& out, const at::Tensor& a, int64_t j0) const {
  const int64_t cols = out.size(1), d = b_.size(1);
  TORCH_CHECK(j0 >= 0 && j0 + cols <= b_.size(0) && a.size(1) == d && out.size(0) == a.size(0),
              "pydc: CpuGemmRhs::multiply: expected out (m, cols) and a (m, ", d, ") with rows ", j0, " + cols of b (",
              b_.size(0), " rows)");
  if (out.numel() == 0) return;
  if (kernels_ != nullptr && j0 % panel_ == 0 && unit_rows(out) && unit_rows(a)) {
    multiply_packed(*kernels_, packed_.data() + j0 * d, out, a);
  } else if (!mkl_packed_.empty() && j0 % mkl_block_ == 0 && cols == std::min(mkl_block_, b_.size(0) - j0) &&
             blas_matrix(out) && blas_matrix(a)) {
    const int m = static_cast<int>(a.size(0)), n = static_cast<int>(cols), depth = static_cast<int>(d);
    mkl_packed_api().compute(kCblasRowMajor, kCblasNoTrans, kCblasPacked, m, n, depth, a.const_data_ptr<float>(),
                             blas_ld(a), static_cast<const float*>(mkl_packed_[j0 / mkl_block_].get()), depth, 0.0f,
                             out.mutable_data_ptr<float>(), blas_ld(out));
  } else {
    gemm_abt_with(which_, out, a, b_.narrow(0, j0, cols));
  }
}

int64_t cpu_gemm_panel() { return cpu_kernels().gemm_packed_floats(1, 1); }

void pack_rows_into(const at::Tensor& b, float* packed) {
  TORCH_CHECK(unit_rows(b) && cpu_gemm_panel() <= kMaxGemmPanel, "pydc: pack_rows_into expects float32 rows of unit "
              "column stride");
  cpu_kernels().pack_gemm_panels(b.const_data_ptr<float>(), b.stride(0), b.size(0), b.size(1), packed);
}

void cpu_gemm_abt_prepacked(const at::Tensor& out, const at::Tensor& a, const float* packed) {
  TORCH_CHECK(unit_rows(out) && unit_rows(a) && out.size(0) == a.size(0), "pydc: cpu_gemm_abt_prepacked expects "
              "float32 out (m, cols) and a (m, d) of unit column stride");
  if (out.numel() == 0) return;
  multiply_packed(cpu_kernels(), packed, out, a);
}

void cpu_gemm_abt_raw(float* out, int64_t ldo, const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m,
                      int64_t n, int64_t d) {
  const auto options = at::TensorOptions().dtype(at::kFloat);
  const auto view = [&](const float* address, int64_t rows, int64_t cols, int64_t ld) {
    return at::from_blob(const_cast<float*>(address), {rows, cols}, {ld, 1}, options);
  };
  PerThreadCpuGemm one_thread(cpu_gemm());
  const CpuGemmRhs rhs(view(b, n, d, ldb));  // as the k-means passes multiply (MKL's packed form under torch's)
  rhs.multiply(view(out, m, n, ldo), view(a, m, d, lda));
}

PerThreadCpuGemm::PerThreadCpuGemm(CpuGemm which) {
  const SetThreadsFn set = g_set_threads.load();
  const GetThreadsFn get = g_get_threads.load();
  if (which != CpuGemm::kScipy || set == nullptr || get == nullptr) return;
  const int threads = get();
  if (threads == 1) return;
  set(1);
  restore_threads_ = threads;
}

PerThreadCpuGemm::~PerThreadCpuGemm() {
  const SetThreadsFn set = g_set_threads.load();
  if (restore_threads_ > 0 && set != nullptr) set(restore_threads_);
}

CpuGemmTimes time_cpu_gemms(int64_t rows, int64_t cols, int64_t depth, int64_t rounds) {
  TORCH_CHECK(rows > 0 && cols > 0 && depth > 0 && rounds > 0,
              "pydc: time_cpu_gemms expects positive rows, cols, depth and rounds, got ", rows, ", ", cols, ", ",
              depth, ", ", rounds);
  // Fixed values (no draw from torch's generator, whose state belongs to the caller), away from denormals, in
  // buffers of our own: ~21 MB that the caller's torch memory profile (first k-means call) should not count.
  std::vector<float> a_data(rows * depth), b_data(cols * depth), out_data(rows * cols);
  for (size_t i = 0; i < a_data.size(); ++i) a_data[i] = static_cast<float>(i % 7 + 1) * 0.125f;
  for (size_t i = 0; i < b_data.size(); ++i) b_data[i] = (static_cast<float>(i % 5) - 2.0f) * 0.25f;
  const auto options = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor a = at::from_blob(a_data.data(), {rows, depth}, options);
  const at::Tensor b = at::from_blob(b_data.data(), {cols, depth}, options);
  const at::Tensor out = at::from_blob(out_data.data(), {rows, cols}, options);
  // as the kernels run it: kPerThreadGemmRows rows per GEMM, one GEMM per thread at a time
  const int64_t chunks = (rows + kPerThreadGemmRows - 1) / kPerThreadGemmRows;
  const auto seconds = [&](CpuGemm which) {
    PerThreadCpuGemm one_thread_each(which);
    const auto start = std::chrono::steady_clock::now();
    const CpuGemmRhs rhs(b, which);  // the centroids of a pass, packed once where pydc's GEMM runs
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t r0 = c * kPerThreadGemmRows, r = std::min(kPerThreadGemmRows, rows - r0);
        rhs.multiply(out.narrow(0, r0, r), a.narrow(0, r0, r));
      }
    });
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  const bool scipy = has_cpu_sgemm();  // without it scipy_s stays +inf
  seconds(CpuGemm::kTorch);  // untimed: first touch of the buffers, BLAS thread pools starting
  if (scipy) seconds(CpuGemm::kScipy);
  seconds(CpuGemm::kPydc);
  constexpr double kInf = std::numeric_limits<double>::infinity();
  CpuGemmTimes best{kInf, kInf, kInf};
  for (int64_t round = 0; round < rounds; ++round) {
    best.torch_s = std::min(best.torch_s, seconds(CpuGemm::kTorch));
    if (scipy) best.scipy_s = std::min(best.scipy_s, seconds(CpuGemm::kScipy));
    best.pydc_s = std::min(best.pydc_s, seconds(CpuGemm::kPydc));
  }
  return best;
}

}  // namespace pydc
