// The per-variant half of the GPU search: for a db of element type T and list length K, the
// occupancy of the plan's scan kernel and the launch sequence on a stream. Each (T, K) pair is
// explicitly instantiated in its own translation unit (CMakeLists.txt generates them from
// search_variant.cu.in), so the kernels compile in parallel and no unit dominates the build.
#pragma once
#include <cuda_runtime.h>

#include "cuda/check.h"
#include "cuda/launcher.h"
#include "cuda/search_launch.cuh"
#include "cuda/search_variant.h"

namespace plm::cuda::variants {

template <class T, int K>
int blocks_per_sm(const launch::Plan& p) {
  int blocks = 0;
  launch::with_scan_kernel_typed<T, K>(p, [&](auto kernel) {
    allow_smem(kernel, p.smem);
    PLM_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, launch::kThreads, p.smem));
  });
  return blocks;
}

template <class T, int K>
void run(const launch::Plan& p, const SearchInputs& pr, void* workspace, float* scores, int64_t* indices,
         cudaStream_t stream) {
  launch::run_search_typed<T, K>(p, pr, workspace, scores, indices, StreamLauncher{stream, launch::kThreads});
}

}  // namespace plm::cuda::variants
