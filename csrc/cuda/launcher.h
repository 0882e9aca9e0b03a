// Kernel launches on a caller's stream, written once for every kernel family: a launch is
// launcher(kernel, grid_x, grid_y, dynamic_smem_bytes, args...), checked at once.
#pragma once
#include <cuda_runtime.h>

#include "cuda/check.h"

namespace plm::cuda {

// Kernels above 48 KiB of dynamic shared memory must opt in (per device, per kernel).
template <class Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > (48u << 10))
    PLM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
}

struct StreamLauncher {
  cudaStream_t stream;
  int threads;
  template <class Kernel, class... Args>
  void operator()(Kernel kernel, unsigned grid_x, unsigned grid_y, size_t smem, Args... args) const {
    if (grid_x == 0 || grid_y == 0) return;
    allow_smem(kernel, smem);
    kernel<<<dim3(grid_x, grid_y), threads, smem, stream>>>(args...);
    PLM_CUDA_CHECK_LAUNCH();
  }
};

}  // namespace plm::cuda
