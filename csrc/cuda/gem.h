// Fused GeM on the GPU: one read of x forward; one read of x and one write of dx backward.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "dtype.h"

namespace plm::cuda {

// x: (B, C, HW) with element strides (sb, sc, shw); shw == 1 (NCHW) or sc == 1 (channels_last).
// p is read from device memory (one float32), so a learnable p never forces a host sync.
struct GemDeviceArgs {
  const void* x;
  DType dtype;  // f32, f16, bf16
  int64_t B, C, HW;
  int64_t sb, sc, shw;
  const float* p;  // device pointer
  float eps;
  int device;
  cudaStream_t stream;
};

// y: B*C float32, contiguous, on the device.
void gem_forward(const GemDeviceArgs& a, float* y);

// gy, y: B*C float32 contiguous; dx: x's dtype and strides. terms (optional, B*C float32)
// receives gy * dy/dp per (b, c); their sum is dL/dp.
void gem_backward(const GemDeviceArgs& a, const float* gy, const float* y, void* dx, float* terms);

}  // namespace plm::cuda
