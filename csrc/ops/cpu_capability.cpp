// Run-time choice of the CPU loops' ISA level (see cpu/cpu_kernels.h), and the ops that report and set it:
//   pydc::cpu_capability() -> str            "default", "avx2" or "avx512": the level in use
//   pydc::cpu_supported_capability() -> str  the highest level this CPU supports
//   pydc::set_cpu_capability(str level) -> () uses `level` from now on (for tests and benchmarks; an error
//                                            when the CPU lacks it)
//   pydc::cpu_vector_width() -> int          floats per vector register in the loops of the level in use
//   pydc::cpu_parallel_threads() -> int      how many threads one at::parallel_for of this library runs on
//                                            (torch.get_num_threads() when the library was built with OpenMP,
//                                            1 when it was not: then every pydc CPU loop is serial)
// The level in use is the highest one the CPU supports, capped by the environment variable
// PYDC_CPU_CAPABILITY (default / avx2 / avx512), read once when the library loads, as ATen reads
// ATEN_CPU_CAPABILITY. An unknown value is reported (TORCH_WARN) and ignored.
#include <c10/util/Exception.h>
#include <c10/util/Logging.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "ops/cpu/cpu_kernels.h"

namespace pydc {
namespace {

constexpr const char* kLevelNames[] = {"default", "avx2", "avx512"};

bool parse_level(const std::string& text, CpuCapability* level) {
  for (int i = 0; i < 3; ++i) {
    if (text == kLevelNames[i]) {
      *level = static_cast<CpuCapability>(i);
      return true;
    }
  }
  return false;
}

CpuCapability detect() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  // __builtin_cpu_supports checks cpuid and that the OS saves the wider registers (xgetbv).
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma")) {
    return CpuCapability::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuCapability::kAvx2;
#endif
  return CpuCapability::kDefault;
}

CpuCapability initial_level() {
  const CpuCapability supported = cpu_supported_capability();
  const char* cap = std::getenv("PYDC_CPU_CAPABILITY");
  if (cap == nullptr || cap[0] == '\0') return supported;
  CpuCapability requested;
  if (!parse_level(cap, &requested)) {
    TORCH_WARN("pydc: ignoring PYDC_CPU_CAPABILITY=", cap, ": expected one of default, avx2, avx512");
    return supported;
  }
  return static_cast<int>(requested) < static_cast<int>(supported) ? requested : supported;
}

std::atomic<int>& level_in_use() {
  static std::atomic<int> level{static_cast<int>(initial_level())};
  return level;
}

std::string capability_op() { return cpu_capability_name(cpu_capability()); }
std::string supported_capability_op() { return cpu_capability_name(cpu_supported_capability()); }
int64_t vector_width_op() { return cpu_kernels().vector_floats; }

int64_t parallel_threads_op() {
  // One chunk per thread at most: at::parallel_for splits [0, n) into at most get_num_threads() ranges.
  const int64_t n = 4 * std::max(1, at::get_num_threads());
  std::mutex mutex;
  std::set<std::thread::id> seen;
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> lock(mutex);
    seen.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(seen.size());
}

void set_capability_op(const std::string& name) {
  CpuCapability level;
  TORCH_CHECK(parse_level(name, &level), "pydc::set_cpu_capability: expected one of 'default', 'avx2', "
              "'avx512', got '", name, "'");
  set_cpu_capability(level);
}

}  // namespace

CpuCapability cpu_supported_capability() {
  static const CpuCapability supported = detect();
  return supported;
}

CpuCapability cpu_capability() { return static_cast<CpuCapability>(level_in_use().load()); }

void set_cpu_capability(CpuCapability level) {
  const CpuCapability supported = cpu_supported_capability();
  TORCH_CHECK(static_cast<int>(level) <= static_cast<int>(supported), "pydc::set_cpu_capability: this CPU "
              "supports up to '", cpu_capability_name(supported), "', got a request for '",
              cpu_capability_name(level), "'");
  level_in_use().store(static_cast<int>(level));
}

const char* cpu_capability_name(CpuCapability level) { return kLevelNames[static_cast<int>(level)]; }

const CpuKernels& cpu_kernels() {
  switch (cpu_capability()) {
    case CpuCapability::kAvx512:
      return cpu_avx512::kKernels;
    case CpuCapability::kAvx2:
      return cpu_avx2::kKernels;
    default:
      return cpu_default::kKernels;
  }
}

}  // namespace pydc

TORCH_LIBRARY_FRAGMENT(pydc, m) {
  m.def("cpu_capability() -> str", &pydc::capability_op);
  m.def("cpu_supported_capability() -> str", &pydc::supported_capability_op);
  m.def("set_cpu_capability(str level) -> ()", &pydc::set_capability_op);
  m.def("cpu_vector_width() -> int", &pydc::vector_width_op);
  m.def("cpu_parallel_threads() -> int", &pydc::parallel_threads_op);
}
