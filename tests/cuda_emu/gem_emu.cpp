// The GPU GeM kernels (csrc/cuda/gem_kernels.cuh) run on the host emulator, exposed to
// tests/test_gem_emulated.py through ctypes. Layout selection and launches are the GPU's own
// (run_forward / run_backward); only the launcher differs.
#include "emu.h"
// emu.h first: it defines the CUDA keywords and intrinsics the kernels use.
#include <cstdio>
#include <exception>

#include "cuda/gem_kernels.cuh"

namespace {

namespace gk = plm::cuda::gem_kernels;

struct EmuLauncher {
  template <class Kernel, class... Args>
  void operator()(Kernel kernel, unsigned grid_x, unsigned grid_y, size_t smem, Args... args) const {
    if (grid_x == 0 || grid_y == 0) return;
    emu::launch(dim3(grid_x, grid_y, 1), dim3(gk::kThreads, 1, 1), smem, [&] { kernel(args...); });
  }
};

gk::GemShape shape(const void* x, int dtype, const int64_t* dims, const int64_t* strides, const float* p,
                   float eps) {
  return {x, static_cast<plm::DType>(dtype), dims[0], dims[1], dims[2], strides[0], strides[1], strides[2], p, eps};
}

template <class F>
int guarded(char* info, int info_len, uint64_t seed, F&& f) {
  try {
    emu::set_schedule_seed(seed);
    f();
    std::snprintf(info, info_len, "ok");
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(info, info_len, "%s", e.what());
    return 1;
  }
}

}  // namespace

// dims = (B, C, HW), strides = (sb, sc, shw) in elements; y: B*C float32.
extern "C" int plm_emu_gem_forward(const void* x, int dtype, const int64_t* dims, const int64_t* strides,
                                   const float* p, float eps, float* y, uint64_t seed, char* info, int info_len) {
  return guarded(info, info_len, seed, [&] { gk::run_forward(shape(x, dtype, dims, strides, p, eps), y, EmuLauncher{}); });
}

// dx: x's dtype and strides; terms: B*C float32 or null.
extern "C" int plm_emu_gem_backward(const void* x, int dtype, const int64_t* dims, const int64_t* strides,
                                    const float* p, float eps, const float* gy, const float* y, void* dx,
                                    float* terms, uint64_t seed, char* info, int info_len) {
  return guarded(info, info_len, seed, [&] {
    gk::run_backward(shape(x, dtype, dims, strides, p, eps), gy, y, dx, terms, EmuLauncher{});
  });
}
