// The per-ISA CPU loops (cpu_kernels_impl.h) compiled for AVX2 + FMA (Haswell and later, AMD Zen).
// No FMA contraction (GCC contracts a * b + c by default in C++ whenever FMA is enabled): every level then
// rounds every operation the same way, so the levels' results are bitwise equal.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#include "ops/cpu/cpu_kernels_prelude.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace pydc {
namespace cpu_avx2 {
#define PYDC_CPU_NAME "avx2"
#define PYDC_CPU_LEVEL 1
#include "ops/cpu/cpu_kernels_impl.h"
#undef PYDC_CPU_NAME
#undef PYDC_CPU_LEVEL
}  // namespace cpu_avx2
}  // namespace pydc

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC pop_options
#endif
