// CUDA error checking and a device guard. Errors become C++ exceptions (RuntimeError in Python).
#pragma once
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace plm::cuda {

[[noreturn]] inline void fail(cudaError_t err, const char* what, const char* file, int line) {
  cudaGetLastError();  // clear a non-sticky error so the next call starts clean
  throw std::runtime_error(std::string("CUDA error in ") + what + " (" + file + ":" +
                           std::to_string(line) + "): " + cudaGetErrorName(err) + ": " +
                           cudaGetErrorString(err));
}

#define PLM_CUDA_CHECK(call)                                                \
  do {                                                                      \
    cudaError_t plm_err_ = (call);                                          \
    if (plm_err_ != cudaSuccess) ::plm::cuda::fail(plm_err_, #call, __FILE__, __LINE__); \
  } while (0)

// Checks the launch that just happened (configuration errors); does not synchronise.
#define PLM_CUDA_CHECK_LAUNCH() PLM_CUDA_CHECK(cudaGetLastError())

// Makes `device` current for the scope and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    PLM_CUDA_CHECK(cudaGetDevice(&previous_));
    if (device != previous_) PLM_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace plm::cuda
