// Per-pixel arithmetic of the fused Sobel stem, shared by the CPU and CUDA kernels.
//
// DeepCluster's stem: Normalize(mean, std) per channel, grey = mean of the three normalized channels,
// then 3x3 cross-correlations with Gx = [[1,0,-1],[2,0,-2],[1,0,-1]] and Gy = [[1,2,1],[0,0,0],
// [-1,-2,-1]] and zero padding of 1 *in normalized space* (a pixel outside the image has grey 0).
// The normalize + grey step is affine, so it folds into grey = a0*r + a1*g + a2*b + bias with
// a_c = scale / (3 std_c) and bias = -sum_c mean_c / (3 std_c), where scale is 1/255 for uint8 input.
#pragma once

#include "common/hd.h"

namespace pydc {

template <typename acc_t>
struct GreyCoefs {
  acc_t a0, a1, a2, bias;
};

template <typename acc_t>
inline GreyCoefs<acc_t> make_grey_coefs(const double mean[3], const double std[3], double scale) {
  GreyCoefs<acc_t> c;
  c.a0 = static_cast<acc_t>(scale / (3.0 * std[0]));
  c.a1 = static_cast<acc_t>(scale / (3.0 * std[1]));
  c.a2 = static_cast<acc_t>(scale / (3.0 * std[2]));
  c.bias = static_cast<acc_t>(-(mean[0] / std[0] + mean[1] / std[1] + mean[2] / std[2]) / 3.0);
  return c;
}

template <typename acc_t>
PYDC_HD acc_t grey_value(const GreyCoefs<acc_t>& c, acc_t r, acc_t g, acc_t b) {
  return c.a0 * r + c.a1 * g + c.a2 * b + c.bias;
}

// The 3x3 neighbourhood of grey values: t = top row, m = middle row, b = bottom row; l/c/r = column.
template <typename acc_t>
PYDC_HD void sobel_3x3(acc_t tl, acc_t tc, acc_t tr, acc_t ml, acc_t mr, acc_t bl, acc_t bc, acc_t br,
                       acc_t* gx, acc_t* gy) {
  *gx = (tl + acc_t(2) * ml + bl) - (tr + acc_t(2) * mr + br);
  *gy = (tl + acc_t(2) * tc + tr) - (bl + acc_t(2) * bc + br);
}

}  // namespace pydc
