// pybind11 module `pydc._C`: importing it loads the op library (static registration) and exposes the
// non-op helpers. Build metadata comes from macros that setup.py defines.
#include <pybind11/pybind11.h>

#ifndef PYDC_TORCH_VERSION
#define PYDC_TORCH_VERSION "unknown"
#endif
#ifndef PYDC_CUDA_VERSION
#define PYDC_CUDA_VERSION ""
#endif
#ifndef PYDC_CUDA_ARCHS
#define PYDC_CUDA_ARCHS ""
#endif
#ifndef PYDC_PYTHON_VERSION
#define PYDC_PYTHON_VERSION "unknown"
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch"] = PYDC_TORCH_VERSION;
  info["cuda"] = PYDC_CUDA_VERSION;
  info["cuda_archs"] = PYDC_CUDA_ARCHS;
  info["python"] = PYDC_PYTHON_VERSION;
#ifdef PYDC_WITH_CUDA
  info["with_cuda"] = true;
#else
  info["with_cuda"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pydc compiled ops (registered as torch.ops.pydc.*) and build information";
  m.def("build_info", &build_info, "Versions and CUDA archs this extension was compiled for");
}
