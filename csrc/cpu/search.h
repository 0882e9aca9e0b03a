#pragma once
#include <cstdint>

#include "dtype.h"

namespace plm::cpu {

// Exact top-k by inner product (or cosine) of Q queries against N db rows, both D long with
// unit element stride and the given row strides (in elements). Writes Q x k scores (float32)
// and indices (int64, -1 where k > N), best first, ties to the lower index.
struct SearchArgs {
  const void* queries;
  DType query_dtype;
  int64_t query_row_stride;
  const void* db;
  DType db_dtype;
  int64_t db_row_stride;
  int64_t Q, N, D, k;
  bool cosine;
  float* scores;
  int64_t* indices;
  int threads;  // <= 0: get_num_threads()
};

// Throws std::invalid_argument when a query holds NaN.
void search(const SearchArgs& args);

}  // namespace plm::cpu
