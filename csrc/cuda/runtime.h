// CUDA runtime queries that never throw or abort: a machine without a driver or GPU answers 0.
#pragma once
#include <string>

namespace plm::cuda {

// Number of usable devices; 0 (with the runtime's message in *error) when there is no driver,
// no device, or any other runtime error.
int device_count(std::string* error);
// The CUDA runtime version this module was built against, e.g. 13000.
int runtime_version();

}  // namespace plm::cuda
