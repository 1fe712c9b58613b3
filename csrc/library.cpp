// The `pydc` operator library. Each op family adds its schema with TORCH_LIBRARY_FRAGMENT in
// csrc/ops/<op>.cpp and its kernels with TORCH_LIBRARY_IMPL in csrc/ops/{cpu,cuda}/.
#include <torch/library.h>

TORCH_LIBRARY(pydc, m) {}
