// The per-variant half of the GPU search: for a db of element type T and list length K, the
// occupancy of the plan's scan kernel and the launch sequence on a stream. Each (T, K) pair is
// explicitly instantiated in its own translation unit (CMakeLists.txt generates them from
// search_variant.cu.in), so the kernels compile in parallel and no unit dominates the build.
#pragma once
#include <cuda_runtime.h>

#include "cuda/check.h"
#include "cuda/code_launch.cuh"
#include "cuda/launcher.h"
#include "cuda/search_launch.cuh"
#include "cuda/search_variant.h"

namespace plm::cuda::variants {

// Blocks of `kernel` (kThreads threads, smem bytes of dynamic shared memory) resident per SM.
template <class Kernel>
int resident_blocks(Kernel kernel, size_t smem) {
  int blocks = 0;
  allow_smem(kernel, smem);
  PLM_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, launch::kThreads, smem));
  return blocks;
}

template <class T, int K>
int blocks_per_sm(const launch::Plan& p) {
  int blocks = 0;
  launch::with_scan_kernel_typed<T, K>(p, [&](auto kernel) { blocks = resident_blocks(kernel, p.smem); });
  return blocks;
}

template <class T, int K>
void run(const launch::Plan& p, const SearchInputs& pr, void* workspace, float* scores, int64_t* indices,
         cudaStream_t stream) {
  launch::run_search_typed<T, K>(p, pr, workspace, scores, indices, StreamLauncher{stream, launch::kThreads});
}

template <class T, int K>
int code_blocks_per_sm(bool wide) {
  int blocks = 0;
  launch::with_code_tile(wide, [&](auto tt) {
    blocks = resident_blocks(&kernels::scan_codes<typename decltype(tt)::type, K>, launch::code_scan_smem(wide, K));
  });
  return blocks;
}

template <class T, int K>
void run_codes(const launch::CodePlan& c, const SearchInputs& pr, const launch::DeviceCodes& dc, void* workspace,
               float* scores, int64_t* indices, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>)
    launch::run_code_search_typed<T, K>(c, pr, dc, workspace, scores, indices, StreamLauncher{stream, launch::kThreads});
}

}  // namespace plm::cuda::variants
