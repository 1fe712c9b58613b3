// Entry checks shared by every op: each failure names what was expected and what was given.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

namespace pydc {

inline std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << t.scalar_type() << " tensor of shape " << t.sizes() << " on " << t.device();
  return s.str();
}

#define PYDC_CHECK_DIM(op, name, t, n)                                               \
  TORCH_CHECK((t).dim() == (n), op, ": expected ", name, " to be a ", n,            \
              "-D tensor, got a ", (t).dim(), "-D ", ::pydc::describe(t))

#define PYDC_CHECK_SAME_DEVICE(op, name_a, a, name_b, b)                              \
  TORCH_CHECK((a).device() == (b).device(), op, ": expected ", name_a, " and ", name_b, \
              " on the same device, got ", name_a, " on ", (a).device(), " and ",     \
              name_b, " on ", (b).device())

#define PYDC_CHECK_DTYPE(op, name, t, dtype)                                          \
  TORCH_CHECK((t).scalar_type() == (dtype), op, ": expected ", name, " of dtype ",      \
              dtype, ", got ", ::pydc::describe(t))

}  // namespace pydc
