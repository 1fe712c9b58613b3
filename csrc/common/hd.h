// PYDC_HD marks the arithmetic that CPU and CUDA kernels share: __host__ __device__ under nvcc, plain
// inline in the C++ compiler.
#pragma once

#if defined(__CUDACC__)
#define PYDC_HD __host__ __device__ __forceinline__
#else
#define PYDC_HD inline
#endif
