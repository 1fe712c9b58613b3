// pydc's own bfloat16 GEMM for the k-means screen (kmeans_bf16_kernel.cpp), for CPUs with AVX512-BF16 and no
// AMX: AMD Zen 4 and later, Intel Cooper Lake. MKL's cblas_gemm_bf16bf16f32 runs on AMX tiles where the CPU has
// them (Intel Sapphire Rapids and later, 3-5x its float32 GEMM), but on a Zen 4 it took longer than the float32
// assignment it was to screen (26.5 ms against 23.4 ms for 8192 x 1024 x 256, 2 threads), while VDPBF16PS
// does 32 bfloat16 multiply-adds per 512-bit instruction there against VFMADD's 16 float32 ones.
//
// C (rows x k, float32) = A (rows x d, bfloat16, row-major) . B^T, B (k x d, bfloat16) packed once per pass into
// panels of 32 centroids (pack_bf16_panels): for pair p of features, the 32 centroids' (b[2p], b[2p+1]) as one
// uint32 each, zero beyond k and d. A 12-row x 32-column tile keeps 24 float32 accumulators in registers; per
// pair it loads the panel's two vectors and broadcasts each row's pair: 113-115 GMAC/s on one Zen 4 core for a
// 256 x 1000 x 256 block, against 117 for VDPBF16PS alone in registers and ~51 for MKL's float32 sgemm (8 x 48,
// 8 x 32 and 16 x 16 tiles measured the same within 2%). VDPBF16PS adds the two exact products
// of a lane's pair to its accumulator with float32 rounding, flushing denormal inputs and results (as AMX
// does), so the sums are d float32 additions of exact products: the error bound of kmeans_bf16_kernel.cpp
// (gamma_d and its flush term) holds for this GEMM as for MKL's.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "ops/cpu/blas_gemm.h"

// GCC on x86-64 only (its target pragmas compile the kernel into a baseline build); elsewhere the screen keeps
// MKL's GEMM, or none
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <cpuid.h>
#include <immintrin.h>
#define PYDC_HAVE_BF16_KERNEL 1
#else
#define PYDC_HAVE_BF16_KERNEL 0
#endif

namespace pydc {

namespace {

constexpr int64_t kPanel = 32;  // centroids per panel: two 16-lane vectors
constexpr int kTileRows = 12;   // 24 accumulators, 2 panel vectors and a broadcast: 27 of the 32 registers

#if PYDC_HAVE_BF16_KERNEL
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bf16,avx512bw,avx512vl,avx512dq")

// C[r, 0:cols] = sum over the pairs of A's row r . the panel's columns, for MR rows.
template <int MR>
__attribute__((always_inline)) inline void bf16_tile(const uint16_t* a, int64_t lda, const uint32_t* panel,
                                                     int64_t d, float* c, int64_t ldc, __mmask16 low,
                                                     __mmask16 high) {
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    acc0[r] = _mm512_setzero_ps();
    acc1[r] = _mm512_setzero_ps();
  }
  const int64_t full_pairs = d / 2;
  for (int64_t p = 0; p < full_pairs; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + p * kPanel);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + p * kPanel + 16);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * p, sizeof(pair));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      acc0[r] = _mm512_dpbf16_ps(acc0[r], av, b0);
      acc1[r] = _mm512_dpbf16_ps(acc1[r], av, b1);
    }
  }
  if (d % 2 != 0) {  // the last feature alone: the high half of the broadcast is 0 (the panel's is too)
    const int64_t p = full_pairs;
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + p * kPanel);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + p * kPanel + 16);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(a[r * lda + 2 * p]));
      acc0[r] = _mm512_dpbf16_ps(acc0[r], av, b0);
      acc1[r] = _mm512_dpbf16_ps(acc1[r], av, b1);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(c + r * ldc, low, acc0[r]);
    _mm512_mask_storeu_ps(c + r * ldc + 16, high, acc1[r]);
  }
}

template <int MR>
void bf16_rows(const uint16_t* a, int64_t lda, const uint32_t* panel, int64_t d, float* c, int64_t ldc,
               __mmask16 low, __mmask16 high) {
  bf16_tile<MR>(a, lda, panel, d, c, ldc, low, high);
}

using RowsFn = void (*)(const uint16_t*, int64_t, const uint32_t*, int64_t, float*, int64_t, __mmask16, __mmask16);
constexpr RowsFn kRowsFns[kTileRows + 1] = {nullptr,        bf16_rows<1>,  bf16_rows<2>, bf16_rows<3>, bf16_rows<4>,
                                            bf16_rows<5>,   bf16_rows<6>,  bf16_rows<7>, bf16_rows<8>, bf16_rows<9>,
                                            bf16_rows<10>, bf16_rows<11>, bf16_rows<12>};

void gemm_bf16_avx512(const uint16_t* a, int64_t lda, int64_t rows, const uint32_t* packed, int64_t k, int64_t d,
                      float* c, int64_t ldc) {
  const int64_t pairs = (d + 1) / 2;
  for (int64_t j0 = 0; j0 < k; j0 += kPanel) {  // a panel (16 KiB at d = 256) stays in L1 over every row tile
    const uint32_t* panel = packed + (j0 / kPanel) * pairs * kPanel;
    const int64_t cols = std::min(kPanel, k - j0);
    const __mmask16 low = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
    const __mmask16 high = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1);
    int64_t r0 = 0;
    for (; r0 + kTileRows <= rows; r0 += kTileRows) {
      bf16_tile<kTileRows>(a + r0 * lda, lda, panel, d, c + r0 * ldc + j0, ldc, low, high);
    }
    if (r0 < rows) kRowsFns[rows - r0](a + r0 * lda, lda, panel, d, c + r0 * ldc + j0, ldc, low, high);
  }
}

#pragma GCC pop_options
#endif  // PYDC_HAVE_BF16_KERNEL

}  // namespace

bool cpu_has_avx512_bf16() {
#if PYDC_HAVE_BF16_KERNEL
  static const bool has = [] {
    __builtin_cpu_init();
    // avx512f from __builtin_cpu_supports (cpuid and the OS's zmm state); AVX512-BF16 is cpuid leaf 7.1 EAX[5]
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw")) return false;
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx)) return false;
    return (eax & (1u << 5)) != 0;
  }();
  return has;
#else
  return false;
#endif
}

bool cpu_has_amx_bf16() {
#if PYDC_HAVE_BF16_KERNEL
  static const bool has = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    return (edx & (1u << 22)) != 0;  // AMX-BF16
  }();
  return has;
#else
  return false;
#endif
}

int64_t bf16_packed_size(int64_t k, int64_t d) { return (k + kPanel - 1) / kPanel * ((d + 1) / 2) * kPanel; }

void pack_bf16_panels(const uint16_t* b, int64_t k, int64_t d, uint32_t* packed) {
  const int64_t pairs = (d + 1) / 2;
  for (int64_t j0 = 0; j0 < k; j0 += kPanel) {
    uint32_t* panel = packed + (j0 / kPanel) * pairs * kPanel;
    for (int64_t p = 0; p < pairs; ++p) {
      for (int64_t l = 0; l < kPanel; ++l) {
        const int64_t j = j0 + l;
        uint32_t value = 0;
        if (j < k) {
          value = b[j * d + 2 * p];
          if (2 * p + 1 < d) value |= static_cast<uint32_t>(b[j * d + 2 * p + 1]) << 16;
        }
        panel[p * kPanel + l] = value;
      }
    }
  }
}

void gemm_bf16_packed(const uint16_t* a, int64_t lda, int64_t rows, const uint32_t* packed, int64_t k, int64_t d,
                      float* c, int64_t ldc) {
#if PYDC_HAVE_BF16_KERNEL
  TORCH_CHECK(cpu_has_avx512_bf16(), "pydc: the bfloat16 GEMM needs a CPU with AVX512-BF16");
  gemm_bf16_avx512(a, lda, rows, packed, k, d, c, ldc);
#else
  TORCH_CHECK(false, "pydc: the bfloat16 GEMM needs an x86-64 build with GCC");
#endif
}

}  // namespace pydc
