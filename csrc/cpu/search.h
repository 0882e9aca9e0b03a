#pragma once
#include <cstdint>

#include "search_inputs.h"

namespace plm::cpu {

// Writes Q x k scores (float32) and indices (int64, -1 where k > N), best first, ties to the
// lower index.
struct SearchArgs : SearchInputs {
  float* scores;
  int64_t* indices;
  int threads;  // <= 0: get_num_threads()
};

// Throws std::invalid_argument when a query holds NaN or inf.
void search(const SearchArgs& args);

}  // namespace plm::cpu
