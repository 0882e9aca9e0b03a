#include <cuda_runtime.h>

#include "cuda/runtime.h"

namespace plm::cuda {

int device_count(std::string* error) {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    if (error) *error = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky error so later calls start clean
    return 0;
  }
  return n;
}

int runtime_version() { return CUDART_VERSION; }

}  // namespace plm::cuda
