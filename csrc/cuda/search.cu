// GPU search entry points: device limits and occupancy from the CUDA runtime, launches on the
// caller's stream, every launch checked.
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

#include "cuda/check.h"
#include "cuda/launcher.h"
#include "cuda/search.h"
#include "cuda/search_launch.cuh"

namespace plm::cuda {

namespace {

// Device attributes and kernel occupancies do not change within a process: ask the runtime once
// per device (and kernel), not on every search.
std::mutex g_cache_mutex;
std::map<int, launch::DeviceLimits> g_limits;
std::map<std::pair<int, const void*>, int> g_blocks_per_sm;

launch::DeviceLimits device_limits(int device) {
  std::lock_guard<std::mutex> lock(g_cache_mutex);
  auto it = g_limits.find(device);
  if (it != g_limits.end()) return it->second;
  launch::DeviceLimits d{};
  int major = 0, minor = 0, optin = 0;
  PLM_CUDA_CHECK(cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, device));
  PLM_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  PLM_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  PLM_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  d.compute_capability = major * 10 + minor;
  d.smem_per_block = static_cast<size_t>(optin);
  d.max_chunk = launch::kMaxChunk;
  g_limits[device] = d;
  return d;
}

// Resident blocks per SM of a scan kernel on `device` (the current device).
template <class Kernel>
int blocks_per_sm(int device, Kernel kernel, size_t smem) {
  const std::pair<int, const void*> key{device, reinterpret_cast<const void*>(kernel)};
  {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    auto it = g_blocks_per_sm.find(key);
    if (it != g_blocks_per_sm.end()) return it->second;
  }
  int blocks = 0;
  allow_smem(kernel, smem);
  PLM_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, launch::kThreads, smem));
  std::lock_guard<std::mutex> lock(g_cache_mutex);
  g_blocks_per_sm[key] = blocks;
  return blocks;
}

void check_limits(const SearchDeviceArgs& a) {
  if (a.k < 1 || a.k > max_search_k())
    throw std::invalid_argument("k must be between 1 and " + std::to_string(max_search_k()) +
                                " on the GPU, got " + std::to_string(a.k));
  if (a.N > INT32_MAX) throw std::invalid_argument("db: the GPU search takes at most 2^31 - 1 rows");
  if (a.D > (1 << 20)) throw std::invalid_argument("queries/db: D must be at most 1048576 on the GPU");
}

launch::Plan plan_for(const SearchDeviceArgs& a) {
  check_limits(a);
  return launch::make_plan(a, device_limits(a.device), [&](const launch::Plan& p) {
    int blocks = 0;
    launch::with_scan_kernel(p, a.db_dtype, [&](auto kernel) { blocks = blocks_per_sm(a.device, kernel, p.smem); });
    return blocks;
  });
}

}  // namespace

const char* search_kernel_name(const SearchDeviceArgs& a) {
  DeviceGuard guard(a.device);
  switch (plan_for(a).scan) {
    case launch::Scan::mma_small: return "mma_small";
    case launch::Scan::mma_wide: return "mma_wide";
    default: return "simt";
  }
}

void search(const SearchDeviceArgs& a, const std::function<void*(size_t)>& workspace, float* scores,
            int64_t* indices) {
  if (a.Q == 0) return;
  DeviceGuard guard(a.device);
  const launch::Plan plan = plan_for(a);
  launch::run_search(plan, a, workspace(plan.workspace_bytes), scores, indices,
                     StreamLauncher{a.stream, launch::kThreads});
}

}  // namespace plm::cuda
