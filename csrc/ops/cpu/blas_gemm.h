// The BLAS that computes the CPU k-means score GEMMs, chosen at run time.
//
// torch's CPU BLAS (MKL, statically linked) is not the fastest sgemm on every CPU: capped at AVX2 on an AMD
// EPYC, MKL's AVX2 path runs the k-means blocks at about half the rate of OpenBLAS's Haswell kernel (the one
// faiss-cpu and scipy bundle). scipy exposes its OpenBLAS to compiled code as raw function pointers
// (scipy.linalg.cython_blas, Fortran calling convention), like the syrk of blas_syrk.h; pydc.ops.cpu_gemm
// passes sgemm from there through pydc._C.set_cpu_sgemm and selects one GEMM per process, torch's, scipy's or
// pydc's own (cpu_kernels' gemm_abt_packed): by the environment (PYDC_CPU_GEMM=torch|scipy|pydc) or by timing
// each on one block (time_cpu_gemms). Until then kTorch is used.
//
// The k-means labels do not depend on the choice: the GEMM only ranks centroids, and rows whose float32 ranking
// is not provably exact are settled in float64 (kmeans_cpu.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdlib>
#include <memory>
#include <vector>

namespace pydc {

using SgemmFn = void (*)(char* transa, char* transb, int* m, int* n, int* k, float* alpha, float* a, int* lda,
                         float* b, int* ldb, float* beta, float* c, int* ldc);

enum class CpuGemm : int { kTorch = 0, kScipy = 1, kPydc = 2 };

// Sets (or, with nullptr, clears) the run-time sgemm, and looks up the thread-count setter of the OpenBLAS
// that holds it (so that a PerThreadCpuGemm can hold it to one thread). Clearing it while scipy's is selected
// selects kTorch.
void set_cpu_sgemm(SgemmFn sgemm);
bool has_cpu_sgemm();
// Whether the run-time BLAS's thread count can be set (OpenBLAS's setter was found next to the sgemm).
bool cpu_sgemm_threads_settable();

// Selects the BLAS of cpu_gemm_abt_per_thread; kScipy needs a run-time sgemm (TORCH_CHECK).
void set_cpu_gemm(CpuGemm which);
CpuGemm cpu_gemm();

// Rows of points per thread-local GEMM in the k-means kernels: 256 x 1024 float32 scores (1 MiB) stay in the
// core's cache until they are folded. Measured on Zen 4 (issue 12): one 4096-row GEMM on both threads and then
// a parallel fold of its 16 MiB took 1.1-1.5x faiss's search; 256 rows per thread, folded at once, 0.8-1.0x.
constexpr int64_t kPerThreadGemmRows = 256;

// out = a @ b^T in float32 with the selected BLAS, on the calling thread only. a: (m, d), b: (n, d), out: (m, n),
// all CPU float32 with unit column stride, out not overlapping a or b. For one call per thread from inside
// at::parallel_for: torch's BLAS runs a nested OpenMP region on one thread; scipy's OpenBLAS keeps one global
// thread count, which a PerThreadCpuGemm held around the parallel region sets to 1 (and gives back after).
void cpu_gemm_abt_per_thread(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

struct CpuKernels;

// The right-hand side b (n, d) of many cpu_gemm_abt_per_thread calls, such as the centroids of a k-means pass:
// packed once into pydc's panels when pydc's GEMM is selected (packing the 1 MiB of 1000 x 256 centroids on every
// 256-row call was 4% of a capped unstructured run's samples), packed once by MKL (cblas_sgemm_pack, found at run
// time in torch's libraries) when torch's GEMM is selected, torch has MKL and b holds at least 2^14 floats, b
// itself otherwise. Construct it before the parallel region; b must outlive it and not change. Not copyable (MKL's
// packed form may not move). Both packed forms are the op's own scratch, outside torch's allocator (as the
// kernels' other per-pass buffers: the memory accounting of pydc.cluster.sharded_memory leaves them out).
class CpuGemmRhs {
 public:
  // block_rows > 0: MKL packs b in blocks of that many rows, for products with one block at a time (0: b whole);
  // a product with other rows of b runs unpacked.
  explicit CpuGemmRhs(const at::Tensor& b, CpuGemm which = cpu_gemm(), int64_t block_rows = 0);
  CpuGemmRhs(const CpuGemmRhs&) = delete;
  CpuGemmRhs& operator=(const CpuGemmRhs&) = delete;
  // out = a @ b[j0 : j0 + out.size(1)]^T (rows j0 .. of b), on the calling thread, like cpu_gemm_abt_per_thread.
  void multiply(const at::Tensor& out, const at::Tensor& a, int64_t j0 = 0) const;

 private:
  struct FreeBytes {
    void operator()(void* p) const { std::free(p); }
  };
  at::Tensor b_;
  CpuGemm which_;
  const CpuKernels* kernels_ = nullptr;  // the level that packed (pydc's GEMM only)
  int64_t panel_ = 0;                    // rows of b per packed panel
  std::vector<float> packed_;
  int64_t mkl_block_ = 0;               // rows of b per MKL-packed block
  std::vector<std::unique_ptr<void, FreeBytes>> mkl_packed_;  // MKL's packed blocks of b (64-byte aligned), or none
};

// Whether torch's BLAS is MKL with its packed sgemm API (cblas_sgemm_pack_get_size, cblas_sgemm_pack,
// cblas_sgemm_compute) found in torch's libraries.
bool has_mkl_packed_sgemm();

// The address of `name` in the libtorch_cpu that torch's MKL is statically linked into (else anywhere in the
// process), nullptr where it is not found (a torch without MKL) or the platform has no dlsym.
void* torch_blas_symbol(const char* name);

// Whether v fits the BLAS's 32-bit int sizes and strides (0 <= v <= INT_MAX).
bool fits_blas_int(int64_t v);

// Rows packed once for many products with pydc's own GEMM (the points of kmeans_assign_delta's passes): panels of
// cpu_gemm_panel() rows (the level's: 8, 16 or 32; kMaxGemmPanel at most), feature after feature, zeros past the
// last row. pack_rows_into packs b (rows, d; unit column stride) into gemm_packed_floats(rows, d) floats at
// `packed`; cpu_gemm_abt_prepacked is out (m, cols) = a (m, d) times the cols rows packed from `packed` on, on
// the calling thread, by the tiles of the level that packed them (the caller checks that it is this one): the
// same sums in the same order as cpu_gemm_abt_per_thread with pydc's GEMM selected.
constexpr int64_t kMaxGemmPanel = 32;
int64_t cpu_gemm_panel();
void pack_rows_into(const at::Tensor& b, float* packed);
void cpu_gemm_abt_prepacked(const at::Tensor& out, const at::Tensor& a, const float* packed);

// cpu_gemm_abt_per_thread on raw float32 rows (out m x n, a m x d, b n x d; each ld >= its row's length).
void cpu_gemm_abt_raw(float* out, int64_t ldo, const float* a, int64_t lda, const float* b, int64_t ldb, int64_t m,
                      int64_t n, int64_t d);

class PerThreadCpuGemm {
 public:
  explicit PerThreadCpuGemm(CpuGemm which = cpu_gemm());
  ~PerThreadCpuGemm();
  PerThreadCpuGemm(const PerThreadCpuGemm&) = delete;
  PerThreadCpuGemm& operator=(const PerThreadCpuGemm&) = delete;

 private:
  int restore_threads_ = 0;  // 0: nothing to give back
};

// Seconds of one (rows, depth) x (cols, depth)^T block GEMM of fixed values by torch's BLAS, the run-time sgemm
// (when one is set) and pydc's, run as the kernels run it (cols packed once for pydc's): the fastest of `rounds`
// timed runs of each, alternating (after one untimed run of each), so that a load on the machine weighs on all
// alike.
struct CpuGemmTimes {
  double torch_s;
  double scipy_s;  // +inf without a run-time sgemm
  double pydc_s;
};
CpuGemmTimes time_cpu_gemms(int64_t rows, int64_t cols, int64_t depth, int64_t rounds);

// The bfloat16 GEMM of kmeans_assign_bf16 (kmeans_bf16_kernel.cpp): MKL's cblas_gemm_bf16bf16f32 (found at run
// time in torch's libraries) or pydc's own AVX512-BF16 kernel (gemm_bf16_avx512.cpp). kAuto takes pydc's at the
// avx512 level on a CPU with AVX512-BF16 and without AMX-BF16 (where MKL's runs on AMX tiles), MKL's elsewhere.
enum class Bf16Gemm : int { kNone = 0, kAuto = 1, kMkl = 2, kPydc = 3 };
// Selects the GEMM (TORCH_CHECKs that a forced one can run here).
void set_bf16_gemm(Bf16Gemm which);
// The GEMM a screened pass uses now (kAuto resolved; kNone where neither can run).
Bf16Gemm bf16_gemm();
// Whether kmeans_assign_bf16 can run here: bf16_gemm() is not kNone.
bool has_bf16_gemm();

// pydc's own bfloat16 GEMM (gemm_bf16_avx512.cpp). c (rows x k, row stride ldc) = a (rows x d, bfloat16 bits,
// row stride lda) . b^T, b (k x d) packed by pack_bf16_panels into bf16_packed_size(k, d) uint32. Needs
// cpu_has_avx512_bf16() (TORCH_CHECK); single-threaded, for one call per thread.
bool cpu_has_avx512_bf16();
bool cpu_has_amx_bf16();
int64_t bf16_packed_size(int64_t k, int64_t d);
void pack_bf16_panels(const uint16_t* b, int64_t k, int64_t d, uint32_t* packed);
void gemm_bf16_packed(const uint16_t* a, int64_t lda, int64_t rows, const uint32_t* packed, int64_t k, int64_t d,
                      float* c, int64_t ldc);

}  // namespace pydc
