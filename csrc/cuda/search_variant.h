// Declarations of the per-variant half of the GPU search (definitions: search_variant.cuh,
// instantiated once per (db type T, list length K) in generated translation units).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/code_launch.cuh"
#include "cuda/search_launch.cuh"

namespace plm::cuda::variants {

// Scan blocks of the plan resident per SM of the current device (0: none fit).
template <class T, int K>
int blocks_per_sm(const launch::Plan& p);

// The whole search for the plan, queued on `stream` (the current device holds the data).
template <class T, int K>
void run(const launch::Plan& p, const SearchInputs& pr, void* workspace, float* scores, int64_t* indices,
         cudaStream_t stream);

// Code scan blocks (wide or small tile, list length K) resident per SM of the current device.
template <class T, int K>
int code_blocks_per_sm(bool wide);

// The whole search from codes for the plan (c.usable; T half or bfloat16), queued on `stream`.
template <class T, int K>
void run_codes(const launch::CodePlan& c, const SearchInputs& pr, const launch::DeviceCodes& dc, void* workspace,
               float* scores, int64_t* indices, cudaStream_t stream);

}  // namespace plm::cuda::variants
