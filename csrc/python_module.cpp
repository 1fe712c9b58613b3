// pybind11 module `pydc._C`: importing it loads the op library (static registration) and exposes the
// non-op helpers. Build metadata comes from macros that setup.py defines.
#include <pybind11/pybind11.h>

#include <cstring>
#include <string>

#include "ops/cpu/blas_syrk.h"

#ifndef PYDC_VERSION
#define PYDC_VERSION "unknown"
#endif
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
  info["pydc"] = PYDC_VERSION;
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

// True when a cython_blas capsule signature is that of ?syrk for `scalar` ("s" or "d"):
// "void (char *, char *, int *, int *, S *, S *, int *, S *, S *, int *)" with S the scalar's typedef
// (scipy names it "__pyx_t_5scipy_6linalg_11cython_blas_s") or the plain C type.
bool is_syrk_signature(const char* name, const std::string& scalar) {
  static const std::string prefix = "void (char *, char *, int *, int *, ";
  if (name == nullptr) return false;
  const std::string signature(name);
  if (signature.compare(0, prefix.size(), prefix) != 0) return false;
  const std::string first_scalar = signature.substr(prefix.size(), signature.find(',', prefix.size()) - prefix.size());
  const std::string plain = scalar == "s" ? "float *" : "double *";
  const std::string typedef_suffix = "cython_blas_" + scalar + " *";
  return first_scalar == plain ||
         (first_scalar.size() >= typedef_suffix.size() &&
          first_scalar.compare(first_scalar.size() - typedef_suffix.size(), typedef_suffix.size(), typedef_suffix) == 0);
}

// The function pointer in a scipy.linalg.cython_blas capsule, after checking from the capsule's signature
// string that it is ?syrk for `scalar`; None gives nullptr.
void* blas_capsule_pointer(const pybind11::object& capsule, const char* scalar, const char* what) {
  if (capsule.is_none()) return nullptr;
  if (!PyCapsule_CheckExact(capsule.ptr())) {
    throw pybind11::type_error(std::string("pydc._C.set_cpu_syrk: expected ") + what +
                               " to be a scipy.linalg.cython_blas capsule or None");
  }
  const char* name = PyCapsule_GetName(capsule.ptr());
  if (!is_syrk_signature(name, scalar)) {
    throw pybind11::value_error(std::string("pydc._C.set_cpu_syrk: ") + what + " has signature '" +
                                (name ? name : "") + "', expected scipy.linalg.cython_blas.__pyx_capi__['" +
                                scalar + "syrk']");
  }
  void* pointer = PyCapsule_GetPointer(capsule.ptr(), name);
  if (pointer == nullptr) throw pybind11::error_already_set();
  return pointer;
}

void set_cpu_syrk(const pybind11::object& ssyrk, const pybind11::object& dsyrk) {
  pydc::set_cpu_syrk(reinterpret_cast<pydc::SyrkFloatFn>(blas_capsule_pointer(ssyrk, "s", "ssyrk")),
                     reinterpret_cast<pydc::SyrkDoubleFn>(blas_capsule_pointer(dsyrk, "d", "dsyrk")));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pydc compiled ops (registered as torch.ops.pydc.*) and build information";
  m.def("build_info", &build_info, "pydc version, and the versions and CUDA archs this extension was compiled for");
  m.def("set_cpu_syrk", &set_cpu_syrk, pybind11::arg("ssyrk"), pybind11::arg("dsyrk"),
        "Sets the BLAS ssyrk/dsyrk (scipy.linalg.cython_blas capsules, or None to clear) that the CPU "
        "pca_accumulate uses for its Gram; see pydc.ops.pca.use_cpu_syrk");
  m.def("has_cpu_syrk", [] { return pydc::has_cpu_syrk(at::kFloat); },
        "Whether a float32 BLAS syrk is set for the CPU pca_accumulate");
}
