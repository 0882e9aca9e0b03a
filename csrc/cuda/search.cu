// GPU search entry points: device limits and occupancy from the CUDA runtime, the plan, and the
// dispatch to the variant (db type, list length) that launches on the caller's stream. The
// variants' kernels are compiled in their own translation units (search_variant.cuh).
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>

#include "cuda/check.h"
#include "cuda/search.h"
#include "cuda/search_launch.cuh"
#include "cuda/search_variant.h"

namespace plm::cuda {

namespace {

// Device attributes and kernel occupancies do not change within a process: ask the runtime once
// per device (and kernel), not on every search.
std::mutex g_cache_mutex;
std::map<int, launch::DeviceLimits> g_limits;
// (device, db dtype, list length, scan, query planes) -> resident scan blocks per SM
std::map<std::tuple<int, int, int, int, int>, int> g_blocks_per_sm;
// (device, db dtype, wide tile, list length) -> resident code scan blocks per SM
std::map<std::tuple<int, int, int, int>, int> g_code_blocks_per_sm;

// cache[key], computed by compute() the first time (outside the lock: runtime calls).
template <class Map, class Compute>
typename Map::mapped_type cached(Map& cache, const typename Map::key_type& key, Compute&& compute) {
  {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  const typename Map::mapped_type value = compute();
  std::lock_guard<std::mutex> lock(g_cache_mutex);
  cache.emplace(key, value);
  return value;
}

launch::DeviceLimits device_limits(int device) {
  return cached(g_limits, device, [&] {
    launch::DeviceLimits d{};
    int major = 0, minor = 0, optin = 0;
    PLM_CUDA_CHECK(cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, device));
    PLM_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    PLM_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    PLM_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    d.compute_capability = major * 10 + minor;
    d.smem_per_block = static_cast<size_t>(optin);
    d.max_chunk = launch::kMaxChunk;
    return d;
  });
}

// Resident scan blocks per SM of the plan's kernel on `device` (the current device).
int blocks_per_sm(int device, const launch::Plan& p, DType db_dtype) {
  const auto key = std::make_tuple(device, static_cast<int>(db_dtype), p.K, static_cast<int>(p.scan), p.terms);
  return cached(g_blocks_per_sm, key, [&] {
    int blocks = 0;
    launch::with_variant(p, db_dtype, [&](auto tc, auto kc) {
      blocks = variants::blocks_per_sm<typename decltype(tc)::type, decltype(kc)::value>(p);
    });
    return blocks;
  });
}

// Resident code scan blocks per SM (wide or small tile, list length K) on `device`.
int code_blocks_per_sm(int device, DType db_dtype, bool wide, int K) {
  return cached(g_code_blocks_per_sm, std::make_tuple(device, static_cast<int>(db_dtype), wide ? 1 : 0, K), [&] {
    int blocks = 0;
    launch::Plan p{};
    p.K = K;
    launch::with_variant(p, db_dtype, [&](auto tc, auto kc) {
      blocks = variants::code_blocks_per_sm<typename decltype(tc)::type, decltype(kc)::value>(wide);
    });
    return blocks;
  });
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
  return launch::make_plan(a, device_limits(a.device),
                           [&](const launch::Plan& p) { return blocks_per_sm(a.device, p, a.db_dtype); });
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
  void* ws = workspace(plan.workspace_bytes);
  launch::with_variant(plan, a.db_dtype, [&](auto tc, auto kc) {
    variants::run<typename decltype(tc)::type, decltype(kc)::value>(plan, a, ws, scores, indices, a.stream);
  });
}

void search_codes(const SearchDeviceArgs& a, const DeviceCodesArgs& codes,
                  const std::function<void*(size_t)>& workspace, float* scores, int64_t* indices) {
  if (a.Q == 0) return;
  DeviceGuard guard(a.device);
  check_limits(a);
  const launch::CodePlan c = launch::make_code_plan(
      a, device_limits(a.device), [&](const launch::Plan& p) { return blocks_per_sm(a.device, p, a.db_dtype); },
      [&](bool wide, int K) { return code_blocks_per_sm(a.device, a.db_dtype, wide, K); });
  if (!c.usable) return search(a, workspace, scores, indices);
  void* ws = workspace(c.workspace_bytes);
  const launch::DeviceCodes dc{codes.codes, codes.code_stride, codes.meta};
  launch::with_variant(c.rescore, a.db_dtype, [&](auto tc, auto kc) {
    variants::run_codes<typename decltype(tc)::type, decltype(kc)::value>(c, a, dc, ws, scores, indices, a.stream);
  });
}

}  // namespace plm::cuda
