// Every header the per-ISA loops (cpu_kernels_impl.h) use, included before the `#pragma GCC target` of each
// cpu_kernels_<level>.cpp, so that their inline functions are compiled for the baseline (GCC inlines them
// into the wider code; a copy emitted out of line is baseline code, safe for any other caller).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>  // FMA in block_scores8 where the level has it
#endif

#include "common/kmeans_math.h"
#include "common/odc_math.h"
#include "common/pca_math.h"
#include "common/sobel_math.h"
#include "ops/cpu/cpu_kernels.h"
