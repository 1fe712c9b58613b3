// The per-ISA CPU loops (cpu_kernels_impl.h) compiled for the x86-64 baseline (SSE2), the flags the extension is built with.
// No FMA contraction (GCC contracts a * b + c by default in C++ whenever FMA is enabled): every level then
// rounds every operation the same way, so the levels' results are bitwise equal.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#include "ops/cpu/cpu_kernels_prelude.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options

#endif

namespace pydc {
namespace cpu_default {
#define PYDC_CPU_NAME "default"
#define PYDC_CPU_LEVEL 0
#include "ops/cpu/cpu_kernels_impl.h"
#undef PYDC_CPU_NAME
#undef PYDC_CPU_LEVEL
}  // namespace cpu_default
}  // namespace pydc

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC pop_options
#endif
