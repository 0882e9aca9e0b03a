// One search problem, as the CPU and the GPU back ends both take it (no Python, no CUDA here).
#pragma once
#include <cstdint>

#include "dtype.h"

namespace plm {

// Q queries and N db rows of D elements each, unit element stride, the given row strides in
// elements; exact top-k by inner product, or by cosine.
struct SearchInputs {
  const void* queries;
  DType query_dtype;
  int64_t query_stride;
  const void* db;
  DType db_dtype;
  int64_t db_stride;
  int64_t Q, N, D, k;
  bool cosine;
};

}  // namespace plm
