// The syrk of the CPU Gram: a BLAS one handed in at run time, MKL's, or pydc's own.
//
// scipy exposes its BLAS to compiled code as raw function pointers (scipy.linalg.cython_blas, Fortran calling
// convention: every argument by pointer); pydc.ops.pca passes ssyrk/dsyrk from there through
// pydc._C.set_cpu_syrk. torch's CPU BLAS (MKL, statically linked into libtorch_cpu) has no `ssyrk_`, but exports
// MKL's own entry point of the same convention, mkl_blas_ssyrk, looked up at run time (torch_blas_symbol). pydc's
// own float32 syrk runs the tiles of its k-means GEMM over the upper triangle (cpu_kernels' syrk_upper_rows).
// pydc.ops.pca.use_cpu_syrk selects one of the three for float32 Grams (set_cpu_float_syrk) by timing them.
// Without the selected one, cpu_syrk_upper returns false and the caller uses its GEMM panels.
#pragma once

#include <ATen/core/Tensor.h>

namespace pydc {

using SyrkFloatFn = void (*)(char* uplo, char* trans, int* n, int* k, float* alpha, float* a, int* lda,
                             float* beta, float* c, int* ldc);
using SyrkDoubleFn = void (*)(char* uplo, char* trans, int* n, int* k, double* alpha, double* a, int* lda,
                              double* beta, double* c, int* ldc);

// Sets (or, with nullptr, clears) the BLAS syrk used for float32 and float64 Grams.
void set_cpu_syrk(SyrkFloatFn float_syrk, SyrkDoubleFn double_syrk);
// Whether cpu_syrk_upper takes Grams of this dtype: a BLAS syrk is set for it, or (float32) pydc's is selected,
// or MKL's is selected and found.
bool has_cpu_syrk(at::ScalarType t);

// The syrk of float32 Grams: the BLAS one set above (kBlas, the default), pydc's own (kPydc: cpu_kernels'
// syrk_upper_rows, the tiles of pydc's float32 GEMM reading x in place, the rows of the Gram split between
// torch's threads by equal work) or MKL's (kMkl: on torch's threads, as MKL's GEMMs in torch run). float64
// Grams always use the BLAS one set above.
enum class CpuSyrk : int { kBlas = 0, kPydc = 1, kMkl = 2 };
void set_cpu_float_syrk(CpuSyrk which);
CpuSyrk cpu_float_syrk();
// Whether torch's libraries hold MKL's ssyrk (kMkl can compute a Gram).
bool has_mkl_syrk();

// Fastest seconds of the float32 Gram (rows, d) of fixed values by the BLAS syrk set above, by pydc's and by
// MKL's (+inf for one that is missing), `rounds` timed runs each, in turn (after one untimed run of each); the
// selection is not touched.
struct CpuSyrkTimes {
  double blas_s;
  double pydc_s;
  double mkl_s;
};
CpuSyrkTimes time_cpu_syrks(int64_t rows, int64_t d, int64_t rounds);

// gram[i, j] += sum_r centred[r, i] * centred[r, j] for i <= j (row-major upper triangle; the strict lower
// triangle is not touched). centred: CPU (R, D) with unit column stride; gram: CPU (D, D) with unit column
// stride, same dtype (float32 or float64). Returns false, with gram untouched, when no syrk is set for
// that dtype or a size does not fit BLAS's 32-bit integers (pydc's float32 syrk has neither limit).
bool cpu_syrk_upper(const at::Tensor& centred, const at::Tensor& gram);

}  // namespace pydc
