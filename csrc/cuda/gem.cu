// GPU GeM entry points: launches on the caller's stream (kernels in gem_kernels.cuh).
#include <cuda_runtime.h>

#include "cuda/check.h"
#include "cuda/gem.h"
#include "cuda/gem_kernels.cuh"
#include "cuda/launcher.h"

namespace plm::cuda {

namespace {

gem_kernels::GemShape shape_of(const GemDeviceArgs& a) {
  return {a.x, a.dtype, a.B, a.C, a.HW, a.sb, a.sc, a.shw, a.p, a.eps};
}

}  // namespace

void gem_forward(const GemDeviceArgs& a, float* y) {
  DeviceGuard guard(a.device);
  gem_kernels::run_forward(shape_of(a), y, StreamLauncher{a.stream, gem_kernels::kThreads});
}

void gem_backward(const GemDeviceArgs& a, const float* gy, const float* y, void* dx, float* terms) {
  DeviceGuard guard(a.device);
  gem_kernels::run_backward(shape_of(a), gy, y, dx, terms, StreamLauncher{a.stream, gem_kernels::kThreads});
}

}  // namespace plm::cuda
