// A BLAS syrk for the CPU Gram, handed in at run time.
//
// torch's CPU BLAS (MKL, statically linked) exports GEMM but no syrk, and a Gram as GEMM panels does ~56% of
// a full GEMM's flops at a lower rate than one GEMM. scipy exposes its BLAS to compiled code as raw
// function pointers (scipy.linalg.cython_blas, Fortran calling convention: every argument by pointer);
// pydc.ops.pca passes ssyrk/dsyrk from there through pydc._C.set_cpu_syrk. Until then, or after it is
// cleared, cpu_syrk_upper returns false and the caller uses its GEMM panels.
#pragma once

#include <ATen/core/Tensor.h>

namespace pydc {

using SyrkFloatFn = void (*)(char* uplo, char* trans, int* n, int* k, float* alpha, float* a, int* lda,
                             float* beta, float* c, int* ldc);
using SyrkDoubleFn = void (*)(char* uplo, char* trans, int* n, int* k, double* alpha, double* a, int* lda,
                              double* beta, double* c, int* ldc);

// Sets (or, with nullptr, clears) the syrk used for float32 and float64 Grams.
void set_cpu_syrk(SyrkFloatFn float_syrk, SyrkDoubleFn double_syrk);
bool has_cpu_syrk(at::ScalarType t);

// gram[i, j] += sum_r centred[r, i] * centred[r, j] for i <= j (row-major upper triangle; the strict lower
// triangle is not touched). centred: CPU (R, D) with unit column stride; gram: CPU (D, D) with unit column
// stride, same dtype (float32 or float64). Returns false, with gram untouched, when no syrk is set for
// that dtype or a size does not fit BLAS's 32-bit integers.
bool cpu_syrk_upper(const at::Tensor& centred, const at::Tensor& gram);

}  // namespace pydc
