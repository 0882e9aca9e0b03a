// The GPU search (csrc/cuda/search_launch.cuh: plan, query preparation, scan kernels, merge)
// run on the host emulator, exposed to tests/test_search_emulated.py through ctypes. Device
// limits are parameters, so a test picks the scan kernel and the number of db splits.
#include "emu.h"
// emu.h first: it defines the CUDA keywords and intrinsics the kernels use.
#include <cstdio>
#include <cstring>
#include <exception>
#include <vector>

#include "cuda/search_launch.cuh"

namespace {

using namespace plm::cuda::launch;

struct EmuLauncher {
  template <class Kernel, class... Args>
  void operator()(Kernel kernel, unsigned grid_x, unsigned grid_y, size_t smem, Args... args) const {
    if (grid_x == 0 || grid_y == 0) return;
    emu::launch(dim3(grid_x, grid_y, 1), dim3(kThreads, 1, 1), smem, [&] { kernel(args...); });
  }
};

const char* scan_name(Scan s) {
  switch (s) {
    case Scan::mma_small: return "mma_small";
    case Scan::mma_wide: return "mma_wide";
    default: return "simt";
  }
}

}  // namespace

extern "C" int plm_emu_search(const void* queries, int query_dtype, int64_t query_stride, const void* db,
                              int db_dtype, int64_t db_stride, int64_t Q, int64_t N, int64_t D, int64_t k,
                              int cosine, int sm_count, int compute_capability, int64_t smem_per_block,
                              int blocks_per_sm, int64_t max_chunk, uint64_t schedule_seed, float* scores,
                              int64_t* indices, char* info, int info_len) {
  try {
    emu::set_schedule_seed(schedule_seed);
    const plm::SearchInputs pr{queries, static_cast<plm::DType>(query_dtype), query_stride,
                               db,      static_cast<plm::DType>(db_dtype),    db_stride,
                               Q,       N,                                    D,
                               k,       cosine != 0};
    DeviceLimits dev{sm_count, compute_capability, static_cast<size_t>(smem_per_block), max_chunk};
    const Plan plan = make_plan(pr, dev, [&](const Plan&) { return blocks_per_sm; });
    // Garbage in the workspace, as in a fresh allocation: nothing may rely on it being zero.
    std::vector<uint64_t> workspace(plan.workspace_bytes / 8 + 2, 0xA5A5A5A5A5A5A5A5ull);
    run_search(plan, pr, workspace.data(), scores, indices, EmuLauncher{});
    std::snprintf(info, info_len, "%s splits=%d chunk=%lld K=%d terms=%d norms_pass=%d", scan_name(plan.scan),
                  split_db(plan, N, plan.chunk / plan.bq).splits, static_cast<long long>(plan.chunk), plan.K,
                  plan.terms, plan.norms_pass ? 1 : 0);
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(info, info_len, "%s", e.what());
    return 1;
  }
}
