// pybind11 module `pydc._C`: importing it loads the op library (static registration) and exposes the
// non-op helpers. Build metadata comes from macros that setup.py defines.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "ops/cpu/blas_gemm.h"
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

// A cython_blas capsule's signature string with scipy's scalar typedefs ("__pyx_t_5scipy_6linalg_11cython_blas_s")
// written as the plain C types they stand for, e.g. "void (char *, char *, int *, int *, float *, ...)".
std::string plain_blas_signature(const char* name) {
  std::string signature(name == nullptr ? "" : name);
  const std::pair<const char*, const char*> typedefs[] = {{"cython_blas_s", "float"}, {"cython_blas_d", "double"}};
  for (const auto& [tail, plain] : typedefs) {
    for (size_t end = signature.find(tail); end != std::string::npos; end = signature.find(tail)) {
      const size_t begin = signature.find_last_of("(, ", end) + 1;  // start of the typedef's identifier
      signature.replace(begin, end + std::strlen(tail) - begin, plain);
    }
  }
  return signature;
}

std::string syrk_signature(const std::string& type) {
  const std::string p = type + " *";
  return "void (char *, char *, int *, int *, " + p + ", " + p + ", int *, " + p + ", " + p + ", int *)";
}

const std::string kSgemmSignature =
    "void (char *, char *, int *, int *, int *, float *, float *, int *, float *, int *, float *, float *, int *)";

// The function pointer in a scipy.linalg.cython_blas capsule, after checking from the capsule's signature
// string that it is `what` (e.g. "ssyrk"), whose signature is `expected`; None gives nullptr.
void* blas_capsule_pointer(const pybind11::object& capsule, const std::string& expected, const char* what,
                           const char* setter) {
  if (capsule.is_none()) return nullptr;
  if (!PyCapsule_CheckExact(capsule.ptr())) {
    throw pybind11::type_error(std::string("pydc._C.") + setter + ": expected " + what +
                               " to be a scipy.linalg.cython_blas capsule or None");
  }
  const char* name = PyCapsule_GetName(capsule.ptr());
  if (plain_blas_signature(name) != expected) {
    throw pybind11::value_error(std::string("pydc._C.") + setter + ": " + what + " has signature '" +
                                (name ? name : "") + "', expected scipy.linalg.cython_blas.__pyx_capi__['" + what +
                                "'], '" + expected + "'");
  }
  void* pointer = PyCapsule_GetPointer(capsule.ptr(), name);
  if (pointer == nullptr) throw pybind11::error_already_set();
  return pointer;
}

void set_cpu_syrk(const pybind11::object& ssyrk, const pybind11::object& dsyrk) {
  void* float_syrk = blas_capsule_pointer(ssyrk, syrk_signature("float"), "ssyrk", "set_cpu_syrk");
  void* double_syrk = blas_capsule_pointer(dsyrk, syrk_signature("double"), "dsyrk", "set_cpu_syrk");
  pydc::set_cpu_syrk(reinterpret_cast<pydc::SyrkFloatFn>(float_syrk), reinterpret_cast<pydc::SyrkDoubleFn>(double_syrk));
}

void set_cpu_sgemm(const pybind11::object& sgemm) {
  pydc::set_cpu_sgemm(reinterpret_cast<pydc::SgemmFn>(blas_capsule_pointer(sgemm, kSgemmSignature, "sgemm",
                                                                           "set_cpu_sgemm")));
}

// The index of `name` among names[first, last); a ValueError naming `what` and `expected` otherwise.
int choice_index(const std::string& name, const char* const* names, int first, int last, const char* what,
                 const char* expected) {
  for (int i = first; i < last; ++i) {
    if (name == names[i]) return i;
  }
  throw pybind11::value_error(std::string("pydc._C.") + what + ": expected " + expected + ", got '" + name + "'");
}

const char* const kCpuGemmNames[] = {"torch", "scipy", "pydc"};

void set_cpu_gemm(const std::string& name) {
  const int i = choice_index(name, kCpuGemmNames, 0, 3, "set_cpu_gemm", "'torch', 'scipy' or 'pydc'");
  pydc::set_cpu_gemm(static_cast<pydc::CpuGemm>(i));
}

const char* const kBf16GemmNames[] = {"none", "auto", "mkl", "pydc"};

void set_bf16_gemm(const std::string& name) {
  const int i = choice_index(name, kBf16GemmNames, 1, 4, "set_bf16_gemm", "'auto', 'mkl' or 'pydc'");
  pydc::set_bf16_gemm(static_cast<pydc::Bf16Gemm>(i));
}

// out (m x n, float32) = a (m x d) . b (n x d)^T, bfloat16 bits, by pydc's own bfloat16 GEMM on the calling
// thread, for its tests (pydc.ops.bf16_screen.pydc_bf16_gemm checks the tensors and passes their addresses).
void pydc_bf16_gemm(uintptr_t a, uintptr_t b, uintptr_t out, int64_t m, int64_t n, int64_t d) {
  if (m < 0 || n < 0 || d < 1) throw pybind11::value_error("pydc._C.pydc_bf16_gemm: expected m, n >= 0 and d >= 1");
  std::vector<uint32_t> packed(pydc::bf16_packed_size(n, d));
  pydc::pack_bf16_panels(reinterpret_cast<const uint16_t*>(b), n, d, packed.data());
  pydc::gemm_bf16_packed(reinterpret_cast<const uint16_t*>(a), d, m, packed.data(), n, d,
                         reinterpret_cast<float*>(out), n);
}

// out (m x n) = a (m x d) . b (n x d)^T, float32 rows ldo / lda / ldb floats apart, by the GEMM selected for the
// CPU k-means passes (pydc.ops.cpu_gemm.gemm_abt checks the tensors and passes their addresses).
void cpu_gemm_abt(uintptr_t out, int64_t ldo, uintptr_t a, int64_t lda, uintptr_t b, int64_t ldb, int64_t m,
                  int64_t n, int64_t d) {
  if (m < 0 || n < 0 || d < 0 || ldo < n || lda < d || ldb < d) {
    throw pybind11::value_error("pydc._C.cpu_gemm_abt: expected m, n, d >= 0 and each leading dimension at least "
                                "its row's length");
  }
  pybind11::gil_scoped_release release;
  pydc::cpu_gemm_abt_raw(reinterpret_cast<float*>(out), ldo, reinterpret_cast<const float*>(a), lda,
                         reinterpret_cast<const float*>(b), ldb, m, n, d);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pydc compiled ops (registered as torch.ops.pydc.*) and build information";
  m.def("build_info", &build_info, "pydc version, and the versions and CUDA archs this extension was compiled for");
  m.def("set_cpu_syrk", &set_cpu_syrk, pybind11::arg("ssyrk"), pybind11::arg("dsyrk"),
        "Sets the BLAS ssyrk/dsyrk (scipy.linalg.cython_blas capsules, or None to clear) that the CPU "
        "pca_accumulate uses for its Gram; see pydc.ops.pca.use_cpu_syrk");
  m.def("has_cpu_syrk", [] { return pydc::has_cpu_syrk(at::kFloat); },
        "Whether the CPU pca_accumulate has a float32 syrk: the selected one (a BLAS one set, MKL's or pydc's) "
        "is there");
  m.def("has_mkl_syrk", &pydc::has_mkl_syrk, "Whether torch's libraries hold MKL's ssyrk (mkl_blas_ssyrk)");
  m.def("set_cpu_float_syrk", [](const std::string& which) {
          TORCH_CHECK(which == "blas" || which == "pydc" || which == "mkl",
                      "pydc._C.set_cpu_float_syrk: expected 'blas', 'pydc' or 'mkl', got '", which, "'");
          TORCH_CHECK(which != "mkl" || pydc::has_mkl_syrk(),
                      "pydc._C.set_cpu_float_syrk: torch's libraries hold no MKL ssyrk (torch built without MKL?)");
          pydc::set_cpu_float_syrk(which == "pydc"  ? pydc::CpuSyrk::kPydc
                                   : which == "mkl" ? pydc::CpuSyrk::kMkl
                                                    : pydc::CpuSyrk::kBlas);
        }, pybind11::arg("which"),
        "Selects the float32 syrk of the CPU pca_accumulate: 'blas' (the one set_cpu_syrk set), 'pydc' (its own) "
        "or 'mkl' (MKL's in torch's libraries)");
  m.def("time_cpu_syrks", [](int64_t rows, int64_t d, int64_t rounds) {
          const pydc::CpuSyrkTimes times = pydc::time_cpu_syrks(rows, d, rounds);
          return std::make_tuple(times.blas_s, times.pydc_s, times.mkl_s);
        }, pybind11::arg("rows"), pybind11::arg("d"), pybind11::arg("rounds"),
        "(the BLAS syrk's, pydc's, MKL's) fastest seconds for the float32 Gram of a (rows, d) block, timed in "
        "turn; +inf for one that is missing");
  m.def("cpu_float_syrk", [] {
          switch (pydc::cpu_float_syrk()) {
            case pydc::CpuSyrk::kPydc: return std::string("pydc");
            case pydc::CpuSyrk::kMkl: return std::string("mkl");
            default: return std::string("blas");
          }
        },
        "The float32 syrk selected for the CPU pca_accumulate, 'blas', 'pydc' or 'mkl'");
  m.def("set_cpu_sgemm", &set_cpu_sgemm, pybind11::arg("sgemm"),
        "Sets the BLAS sgemm (a scipy.linalg.cython_blas capsule, or None to clear) that the CPU k-means GEMMs "
        "use once set_cpu_gemm('scipy') selects it; see pydc.ops.cpu_gemm");
  m.def("has_cpu_sgemm", &pydc::has_cpu_sgemm, "Whether a run-time sgemm is set");
  m.def("has_mkl_packed_sgemm", &pydc::has_mkl_packed_sgemm,
        "Whether torch's BLAS is MKL with its packed sgemm (torch's GEMM then packs the centroids once per pass)");
  m.def("has_bf16_gemm", &pydc::has_bf16_gemm,
        "Whether kmeans_assign_bf16 can run here: MKL's bfloat16 GEMM was found in torch's libraries, or the CPU "
        "has AVX512-BF16 for pydc's own");
  m.def("set_bf16_gemm", &set_bf16_gemm, pybind11::arg("name"),
        "Selects the bfloat16 GEMM of kmeans_assign_bf16: 'auto', 'mkl' (MKL's cblas_gemm_bf16bf16f32) or 'pydc' "
        "(pydc's AVX512-BF16 kernel); see pydc.ops.bf16_screen");
  m.def("bf16_gemm", [] { return std::string(kBf16GemmNames[static_cast<int>(pydc::bf16_gemm())]); },
        "The bfloat16 GEMM kmeans_assign_bf16 uses now: 'mkl', 'pydc' or 'none'");
  m.def("cpu_has_avx512_bf16", &pydc::cpu_has_avx512_bf16, "Whether the CPU has AVX512-BF16 (cpuid)");
  m.def("pydc_bf16_gemm", &pydc_bf16_gemm, pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("out"),
        pybind11::arg("m"), pybind11::arg("n"), pybind11::arg("d"),
        "out = a @ b^T by pydc's own bfloat16 GEMM (addresses of contiguous CPU tensors: a (m, d) and b (n, d) "
        "bfloat16, out (m, n) float32); use pydc.ops.bf16_screen.pydc_bf16_gemm");
  m.def("cpu_sgemm_threads_settable", &pydc::cpu_sgemm_threads_settable,
        "Whether the run-time sgemm's OpenBLAS thread count can be set (held to 1 while each thread runs its own "
        "GEMMs, given back after)");
  m.def("set_cpu_gemm", &set_cpu_gemm, pybind11::arg("name"),
        "Selects the GEMM of the CPU k-means passes: 'torch' (ATen's BLAS), 'scipy' (the run-time sgemm) or "
        "'pydc' (pydc's own, csrc/ops/cpu/cpu_kernels_impl.h)");
  m.def("cpu_gemm", [] { return std::string(kCpuGemmNames[static_cast<int>(pydc::cpu_gemm())]); },
        "The GEMM of the CPU k-means passes: 'torch', 'scipy' or 'pydc'");
  m.def("cpu_gemm_abt", &cpu_gemm_abt, pybind11::arg("out"), pybind11::arg("ldo"), pybind11::arg("a"),
        pybind11::arg("lda"), pybind11::arg("b"), pybind11::arg("ldb"), pybind11::arg("m"), pybind11::arg("n"),
        pybind11::arg("d"), "out = a @ b^T by the selected CPU k-means GEMM (addresses of float32 rows); use "
        "pydc.ops.cpu_gemm.gemm_abt");
  m.def("time_cpu_gemms", [](int64_t rows, int64_t cols, int64_t depth, int64_t rounds) {
          const pydc::CpuGemmTimes times = pydc::time_cpu_gemms(rows, cols, depth, rounds);
          return std::make_tuple(times.torch_s, times.scipy_s, times.pydc_s);
        }, pybind11::arg("rows"), pybind11::arg("cols"), pybind11::arg("depth"), pybind11::arg("rounds"),
        "(torch's, the run-time sgemm's (+inf when none is set), pydc's) fastest seconds for one (rows, depth) x "
        "(cols, depth)^T block GEMM, timed alternately");
}
