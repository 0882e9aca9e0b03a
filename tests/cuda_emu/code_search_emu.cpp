// The GPU search from compact codes (csrc/cuda/code_launch.cuh: the float search's launch
// sequence with the code scan listing the rows to rescore) run on the host emulator, exposed to
// tests/test_codes_emulated.py through ctypes, with the plain GPU search beside it and the
// bounds the code scan computes (for the L <= S <= U checks).
#include "emu.h"
// emu.h first: it defines the CUDA keywords and intrinsics the kernels use.
#include <cstdio>
#include <cstring>
#include <exception>
#include <vector>

#include "cuda/code_launch.cuh"

namespace {

using namespace plm::cuda::launch;

struct StopHere {};

struct EmuLauncher {
  template <class Kernel, class... Args>
  void operator()(Kernel kernel, unsigned grid_x, unsigned grid_y, size_t smem, Args... args) const {
    if (grid_x == 0 || grid_y == 0) return;
    emu::launch(dim3(grid_x, grid_y, 1), dim3(kThreads, 1, 1), smem, [&] { kernel(args...); });
  }
};

plm::SearchInputs inputs(const void* queries, int query_dtype, int64_t query_stride, const void* db, int db_dtype,
                         int64_t db_stride, int64_t Q, int64_t N, int64_t D, int64_t k, int cosine) {
  return {queries, static_cast<plm::DType>(query_dtype), query_stride, db, static_cast<plm::DType>(db_dtype),
          db_stride, Q, N, D, k, cosine != 0};
}

}  // namespace

// Searches from the codes (codes: N x code_stride int8 bytes, meta: 3 x N, cpu::device_codes).
// info: "codes wide=W chunk=C listed=L full=F" (listed rows and fully rescored query tiles of the
// last chunk) or "plain" when the plan cannot use the codes.
extern "C" int plm_emu_code_search(const void* queries, int query_dtype, int64_t query_stride, const void* db,
                                   int db_dtype, int64_t db_stride, int64_t Q, int64_t N, int64_t D, int64_t k,
                                   int cosine, const void* codes, int64_t code_stride, const float* meta, int sm_count,
                                   int compute_capability, int64_t smem_per_block, int blocks_per_sm,
                                   int64_t max_chunk, uint64_t schedule_seed, float* scores, int64_t* indices,
                                   char* info, int info_len) {
  try {
    emu::set_schedule_seed(schedule_seed);
    const plm::SearchInputs pr = inputs(queries, query_dtype, query_stride, db, db_dtype, db_stride, Q, N, D, k, cosine);
    const DeviceLimits dev{sm_count, compute_capability, static_cast<size_t>(smem_per_block), max_chunk};
    const CodePlan c = make_code_plan(pr, dev, [&](const Plan&) { return blocks_per_sm; },
                                      [&](bool, int) { return blocks_per_sm; });
    if (!c.usable) {
      std::snprintf(info, info_len, "plain");
      return 0;
    }
    std::vector<uint64_t> workspace(c.workspace_bytes / 8 + 2, 0xA5A5A5A5A5A5A5A5ull);
    const DeviceCodes dc{codes, code_stride, meta};
    run_code_search(c, pr, dc, workspace.data(), scores, indices, EmuLauncher{});
    const int64_t last = (Q - 1) / c.rescore.chunk * c.rescore.chunk;
    const int64_t tiles = ceil_div(Q - last, c.bq);
    const auto* counts = reinterpret_cast<const int32_t*>(reinterpret_cast<unsigned char*>(workspace.data()) + c.counts_offset);
    long long listed = 0, full = 0;
    for (int64_t t = 0; t < tiles; ++t) {
      if (counts[t] < 0) ++full;
      else listed += counts[t];
    }
    std::snprintf(info, info_len, "codes wide=%d chunk=%lld listed=%lld full=%lld", c.wide ? 1 : 0,
                  static_cast<long long>(c.rescore.chunk), listed, full);
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(info, info_len, "%s", e.what());
    return 1;
  }
}

// lower/upper (Q x N): the code scan's bounds of every pair, from the queries as
// prep_queries + prep_code_queries make them and the exact int8 dot products (queries of w = 0,
// which the scan never bounds, get -inf / +inf).
extern "C" int plm_emu_code_bounds(const void* queries, int query_dtype, int64_t query_stride, const void* db,
                                   int db_dtype, int64_t db_stride, int64_t Q, int64_t N, int64_t D, int cosine,
                                   const void* codes, int64_t code_stride, const float* meta, float* lower,
                                   float* upper, char* info, int info_len) {
  try {
    const plm::SearchInputs pr = inputs(queries, query_dtype, query_stride, db, db_dtype, db_stride, Q, N, D, 1, cosine);
    const DeviceLimits dev{1, 90, 227 * 1024, 1 << 20};
    const CodePlan c = make_code_plan(pr, dev, [](const Plan&) { return 1; }, [](bool, int) { return 1; });
    if (!c.usable) throw std::invalid_argument("these inputs do not take the code path");
    if (c.rescore.chunk < Q) throw std::invalid_argument("one chunk only");
    std::vector<uint64_t> workspace(c.workspace_bytes / 8 + 2, 0);
    auto* ws = reinterpret_cast<unsigned char*>(workspace.data());
    // The float search's query preparation, then the code scan's own (CodeRows::quantize), then
    // stop before the scan.
    const DeviceCodes dc{codes, code_stride, meta};
    EmuLauncher launch;
    try {
      with_variant(c.rescore, pr.db_dtype, [&](auto tc, auto kc) {
        using T = typename decltype(tc)::type;
        constexpr int K = decltype(kc)::value;
        if constexpr (!std::is_same_v<T, float>) {
          const CodeRows<T, K, EmuLauncher> rows{c, pr, dc, ws};
          run_search_typed<T, K>(c.rescore, pr, ws, lower, nullptr, launch,
                                 [&](plm::cuda::kernels::ScanArgs& args, int64_t, EmuLauncher& l) {
                                   rows.quantize(args, l);
                                   throw StopHere{};
                                 });
        }
      });
    } catch (const StopHere&) {
    }
    const auto* q8 = reinterpret_cast<const int8_t*>(ws + c.q8_offset);
    const auto* qcode = reinterpret_cast<const float4*>(ws + c.qcode_offset);
    const auto* x8 = static_cast<const int8_t*>(codes);
    for (int64_t q = 0; q < Q; ++q)
      for (int64_t n = 0; n < N; ++n) {
        const float4 qc = qcode[q];
        if (qc.w == 0.0f) {
          lower[q * N + n] = -INFINITY;
          upper[q * N + n] = INFINITY;
          continue;
        }
        int32_t dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += int32_t{q8[q * 2 * c.dpad + d]} * x8[n * code_stride + d];
        const auto b = plm::cuda::kernels::code_bound(dot, qc.x, qc.y, qc.z, meta[n], meta[N + n], meta[2 * N + n]);
        lower[q * N + n] = b.lower;
        upper[q * N + n] = b.upper;
      }
    std::snprintf(info, info_len, "ok");
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(info, info_len, "%s", e.what());
    return 1;
  }
}
