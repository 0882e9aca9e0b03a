#pragma once
#include <cstdint>

#include "dtype.h"

namespace plm::cpu {

// GeM over x (B, C, H*W) with element strides (sb, sc, shw): y = mean(max(x, eps)^p)^(1/p).
// float16/bfloat16/float32 accumulate in float32 through the ISA kernels when either the
// spatial axis (shw == 1) or the channel axis (sc == 1) is contiguous; float64 (any strides)
// is computed in double.
struct GemArgs {
  const void* x;
  DType dtype;
  int64_t B, C, HW;
  int64_t sb, sc, shw;
  double p, eps;
  int threads;  // <= 0: get_num_threads()
};

// y: B*C contiguous, float32 (float64 when x is float64).
void gem_forward(const GemArgs& a, void* y);

// gy, y: B*C contiguous in y's dtype; dx: x's dtype and strides. Returns dL/dp when want_dp.
double gem_backward(const GemArgs& a, const void* gy, const void* y, void* dx, bool want_dp);

}  // namespace plm::cpu
