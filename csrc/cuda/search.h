// Exact top-k search on the GPU (see search_kernels.cuh for the algorithm).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>

#include "search_inputs.h"

namespace plm::cuda {

// queries and db live on `device`; work is queued on `stream`; nothing synchronises.
struct SearchDeviceArgs : SearchInputs {  // k <= max_search_k()
  int device;
  cudaStream_t stream;
};

constexpr int64_t max_search_k() { return 1024; }

// scores (Q x k float32) and indices (Q x k int64), contiguous on the device. The search plans
// once, then calls workspace(bytes) for that much device memory on a.device (the caller's
// allocator; it must stay valid until the queued work has run). Best first, ties to the lower
// index, -inf / -1 padding where k > N; a query row holding NaN or inf gets NaN scores and
// index -1.
void search(const SearchDeviceArgs& a, const std::function<void*(size_t)>& workspace, float* scores,
            int64_t* indices);

// A db's compact codes on its device (pylandmark.prepare: cpu::build_codes laid out by
// cpu::device_codes): N rows of int8 codes code_stride bytes apart (a multiple of 16), and
// meta [3][N] float32 (scale, widened error term, norm), for the metric of the search.
struct DeviceCodesArgs {
  const void* codes;
  int64_t code_stride;
  const float* meta;
};

// search() from the codes (csrc/cuda/code_kernels.cuh): the same scores and indices bit for bit,
// reading the rows only where the codes' bound says they can still win. Where the codes cannot
// serve (a float32 db, unaligned rows, a GPU before sm_80, too little shared memory) this is
// search() itself.
void search_codes(const SearchDeviceArgs& a, const DeviceCodesArgs& codes,
                  const std::function<void*(size_t)>& workspace, float* scores, int64_t* indices);

// "mma_small", "mma_wide" or "simt": the scan kernel search() picks for these arguments.
const char* search_kernel_name(const SearchDeviceArgs& a);

}  // namespace plm::cuda
