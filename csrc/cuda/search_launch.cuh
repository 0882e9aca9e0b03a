// Planning and launching a GPU search: which scan kernel, how the db is split across blocks,
// how queries are chunked, where the workspace pieces go. The launch sequence is written once
// against a `Launcher` (search.cu: CUDA launches on the caller's stream; tests/cuda_emu: the
// host emulator), so the tests run the very sequence the GPU runs.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/search_kernels.cuh"
#include "search_inputs.h"

namespace plm::cuda::launch {

using kernels::kThreads;
using plm::SearchInputs;
using kernels::kTileRows;
using kernels::kWarps;

constexpr int kMaxK = 1024;
constexpr int64_t kMaxChunk = 65536;                 // queries per chunk
constexpr size_t kPlanesBudget = size_t{128} << 20;  // bytes of prepared queries per chunk
constexpr size_t kListsBudget = size_t{256} << 20;   // bytes of partial lists per chunk
constexpr size_t kNormsBudget = size_t{1} << 30;     // bytes of precomputed db norms at most
// From this many query tiles per chunk on, the db norms are computed once up front (one extra
// read of the db) instead of by every query tile's blocks.
constexpr int64_t kNormsPassTiles = 8;
constexpr const char* kWhat = "queries/db: the GPU search";  // dtype errors

enum class Scan { simt, mma_small, mma_wide };

struct DeviceLimits {
  int sm_count;
  int compute_capability;  // major * 10 + minor
  size_t smem_per_block;   // opt-in maximum
  int64_t max_chunk;       // queries per chunk at most (kMaxChunk; tests lower it)
};

struct Plan {
  Scan scan;
  int terms;  // query planes for the tensor-core scan
  int K;      // list length: a power of two >= k
  int bq;     // queries per block
  int64_t dpad;
  size_t smem;
  int64_t chunk;  // queries per chunk (multiple of bq)
  int slots;      // blocks resident at once on the device
  size_t planes_bytes, qmul_offset, lists_offset, lists_bytes, workspace_bytes;
  bool norms_pass;  // 1/|x| of every db row computed once, at norms_offset
  size_t norms_offset;
};

// Splitting of the db for one chunk of queries.
struct Split {
  int splits;
  int64_t rows_per_split;
};

// Query planes a db type needs at most (make_plan): half holds float32 in two, bfloat16 in three.
template <class T>
constexpr int max_terms() {
  return std::is_same_v<T, __half> ? 2 : 3;
}

inline int list_length(int64_t k) { return k <= 32 ? 32 : (k <= 128 ? 128 : 1024); }

template <class F>
void with_list_length(int K, F&& f) {
  switch (K) {
    case 32: return f(std::integral_constant<int, 32>{});
    case 128: return f(std::integral_constant<int, 128>{});
    default: return f(std::integral_constant<int, 1024>{});
  }
}

template <class F>
void with_terms(int terms, F&& f) {
  switch (terms) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    default: return f(std::integral_constant<int, 3>{});
  }
}

// Calls f(kernel pointer) with the scan kernel of the plan, for a db of element type T and
// list length K (the plan's K).
template <class T, int K, class F>
void with_scan_kernel_typed(const Plan& p, F&& f) {
  if constexpr (std::is_same_v<T, float>) {
    f(&kernels::search_simt<float, K>);
  } else {
    if (p.scan == Scan::simt) return f(&kernels::search_simt<T, K>);
    with_terms(p.terms, [&](auto tc2) {
      constexpr int TERMS = decltype(tc2)::value;
      if constexpr (TERMS <= max_terms<T>()) {
        if (p.scan == Scan::mma_small) f(&kernels::search_mma<T, TERMS, kernels::SmallTile, K>);
        else f(&kernels::search_mma<T, TERMS, kernels::WideTile, K>);
      }
    });
  }
}

// Calls f(TypeTag<db element type>, integral_constant<K>) for the plan's variant: the search
// code is instantiated once per (db type, K) pair, so each pair can live in its own
// translation unit (search.cu) and no one unit holds every kernel.
template <class F>
void with_variant(const Plan& p, DType db_dtype, F&& f) {
  with_list_length(p.K, [&](auto kc) { with_float_type(db_dtype, kWhat, [&](auto tc) { f(tc, kc); }); });
}

inline size_t scan_smem(Scan scan, int terms, int K) {
  size_t bytes = 0;
  with_list_length(K, [&](auto kc) {
    constexpr int KK = decltype(kc)::value;
    with_terms(terms, [&](auto tc) {
      constexpr int TERMS = decltype(tc)::value;
      switch (scan) {
        case Scan::simt: bytes = kernels::simt_smem_bytes<KK>(); break;
        case Scan::mma_small: bytes = kernels::mma_smem_bytes<kernels::SmallTile, TERMS, KK>(); break;
        case Scan::mma_wide: bytes = kernels::mma_smem_bytes<kernels::WideTile, TERMS, KK>(); break;
      }
    });
  });
  return bytes;
}

inline size_t align256(size_t x) { return (x + 255) / 256 * 256; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How a chunk of `qtiles` query tiles splits the db: as many blocks as fit on the device at once
// (rounding down: a second, nearly empty wave would double the time), no split shorter than a
// tile, and no more lists than the workspace holds.
inline Split split_db(const Plan& p, int64_t N, int64_t qtiles) {
  int64_t splits = p.slots / qtiles;
  const int64_t fit = static_cast<int64_t>(p.lists_bytes / (sizeof(uint64_t) * p.K * qtiles * p.bq));
  splits = std::min<int64_t>({splits, ceil_div(N, kTileRows), int64_t{65535}, std::max<int64_t>(fit, 1)});
  splits = std::max<int64_t>(splits, 1);
  const int64_t rows = ceil_div(ceil_div(N, splits), kTileRows) * kTileRows;
  return {static_cast<int>(ceil_div(N, rows)), rows};
}

// blocks_per_sm(plan) reports how many scan blocks of the plan fit on one SM (0: none).
// rescoring: the plan scores a few listed rows per query tile (code_launch.cuh): the narrow
// tensor-core tile, and each block's own row norms (no pass over the whole db).
inline Plan make_plan(const SearchInputs& pr, const DeviceLimits& dev,
                      const std::function<int(const Plan&)>& blocks_per_sm, bool rescoring = false) {
  Plan p{};
  p.K = list_length(pr.k);
  const bool half_db = pr.db_dtype == DType::f16 || pr.db_dtype == DType::bf16;
  const bool aligned = pr.D % 8 == 0 && pr.db_stride % 8 == 0 && reinterpret_cast<uintptr_t>(pr.db) % 16 == 0;
  // Query planes that hold the query exactly: a half plane holds a (scaled) bfloat16 query,
  // two hold a float32 one; bfloat16 planes need two for a half query, three for float32.
  if (pr.db_dtype == DType::f16) p.terms = pr.query_dtype == DType::f32 ? 2 : 1;
  else p.terms = pr.query_dtype == DType::bf16 ? 1 : (pr.query_dtype == DType::f16 ? 2 : 3);
  p.scan = Scan::simt;
  if (dev.compute_capability >= 80 && half_db && aligned) {
    if (!rescoring && pr.Q > kernels::SmallTile::BQ && scan_smem(Scan::mma_wide, p.terms, p.K) <= dev.smem_per_block)
      p.scan = Scan::mma_wide;
    else if (scan_smem(Scan::mma_small, p.terms, p.K) <= dev.smem_per_block)
      p.scan = Scan::mma_small;
  }
  if (p.scan == Scan::simt) p.terms = 1;
  int bk = kernels::kSimtBK;
  p.bq = kernels::kSimtBQ;
  if (p.scan == Scan::mma_small) {
    p.bq = kernels::SmallTile::BQ;
    bk = kernels::SmallTile::BK;
  } else if (p.scan == Scan::mma_wide) {
    p.bq = kernels::WideTile::BQ;
    bk = kernels::WideTile::BK;
  }
  p.dpad = ceil_div(pr.D, bk) * bk;
  p.smem = scan_smem(p.scan, p.terms, p.K);
  if (p.smem > dev.smem_per_block)
    throw std::runtime_error("this GPU has " + std::to_string(dev.smem_per_block) +
                             " bytes of shared memory per block; the search kernel needs " +
                             std::to_string(p.smem) + "; search on the CPU instead");
  const int per_sm = blocks_per_sm(p);
  if (per_sm < 1) throw std::runtime_error("the search kernel cannot be resident on this GPU");
  p.slots = per_sm * dev.sm_count;

  const size_t plane_bytes = p.scan == Scan::simt ? 4 * p.dpad : size_t(2) * p.terms * p.dpad;
  int64_t cap = std::min<int64_t>(dev.max_chunk, static_cast<int64_t>(kPlanesBudget / plane_bytes));
  cap = std::min<int64_t>(cap, static_cast<int64_t>(kListsBudget / (sizeof(uint64_t) * p.K)));
  cap = std::max<int64_t>(cap / p.bq * p.bq, p.bq);
  p.chunk = std::min<int64_t>(ceil_div(pr.Q, p.bq) * p.bq, cap);

  // Lists: room for the first chunk split as it wants, and for any smaller last chunk (whose
  // query tiles times splits is at most the slots, or its tiles alone).
  const int64_t qtiles = p.chunk / p.bq;
  const int64_t want = std::min<int64_t>(p.slots / qtiles, ceil_div(pr.N, kTileRows));
  const int64_t tiles_x_splits = std::max<int64_t>(qtiles * std::max<int64_t>(want, 1), p.slots);
  p.lists_bytes = sizeof(uint64_t) * p.K * p.bq * tiles_x_splits;
  p.planes_bytes = plane_bytes * p.chunk;
  p.qmul_offset = align256(p.planes_bytes);
  p.lists_offset = align256(p.qmul_offset + sizeof(float) * p.chunk);
  p.workspace_bytes = p.lists_offset + p.lists_bytes;
  p.norms_pass = !rescoring && pr.cosine && qtiles >= kNormsPassTiles && sizeof(float) * pr.N <= kNormsBudget;
  if (p.norms_pass) {
    p.norms_offset = align256(p.workspace_bytes);
    p.workspace_bytes = p.norms_offset + sizeof(float) * pr.N;
  }
  return p;
}

// Every row for every query (a plain search).
struct AllRows {
  template <class Launcher>
  void operator()(kernels::ScanArgs&, int64_t /*q0*/, Launcher&) const {}
};

// Runs the whole search for the plan, for a db of element type T and list length K = p.K: per
// chunk, prepare queries, (rows), scan, merge. `launch` is called as launch(kernel, grid_x,
// grid_y, smem_bytes, args...) with kThreads threads per block. rows(args, q0, launch) may
// queue work that lists the rows each query tile of the chunk scores (args.row_ids ...), once
// the chunk's query planes are ready (code_launch.cuh).
template <class T, int K, class Launcher, class Rows = AllRows>
void run_search_typed(const Plan& p, const SearchInputs& pr, void* workspace, float* scores, int64_t* indices,
                      Launcher&& launch, Rows&& rows = Rows{}) {
  auto* ws = static_cast<unsigned char*>(workspace);
  void* planes = ws;
  auto* qmul = reinterpret_cast<float*>(ws + p.qmul_offset);
  auto* lists = reinterpret_cast<uint64_t*>(ws + p.lists_offset);
  const size_t qsize = dtype_size(pr.query_dtype);
  float* inv_norms = nullptr;
  if (p.norms_pass) {
    inv_norms = reinterpret_cast<float*>(ws + p.norms_offset);
    const bool vec = p.scan != Scan::simt;  // the tensor-core scans need 16-byte aligned rows too
    {
      const auto grid = static_cast<unsigned>(ceil_div(pr.N, kWarps));  // a warp per row
      const auto vec_grid = static_cast<unsigned>(ceil_div(2 * pr.N, kThreads));  // two threads per row
      const auto* db = static_cast<const T*>(pr.db);
      const int D = static_cast<int>(pr.D);
      if constexpr (std::is_same_v<T, float>) {
        launch(&kernels::db_inv_norms<T, false>, grid, 1u, size_t{0}, db, pr.db_stride, pr.N, D, inv_norms);
      } else {
        if (vec) launch(&kernels::db_inv_norms<T, true>, vec_grid, 1u, size_t{0}, db, pr.db_stride, pr.N, D, inv_norms);
        else launch(&kernels::db_inv_norms<T, false>, grid, 1u, size_t{0}, db, pr.db_stride, pr.N, D, inv_norms);
      }
    }
  }
  for (int64_t q0 = 0; q0 < pr.Q; q0 += p.chunk) {
    const int64_t qc = std::min<int64_t>(p.chunk, pr.Q - q0);
    const int64_t qpad = ceil_div(qc, p.bq) * p.bq;
    const void* qsrc = static_cast<const unsigned char*>(pr.queries) + q0 * pr.query_stride * qsize;

    with_float_type(pr.query_dtype, kWhat, [&](auto qt) {
      using QT = typename decltype(qt)::type;
      const auto* qtyped = static_cast<const QT*>(qsrc);
      const auto grid = static_cast<unsigned>(ceil_div(qpad, kWarps));
      const int D = static_cast<int>(pr.D), Dpad = static_cast<int>(p.dpad);
      if (p.scan == Scan::simt) {
        launch(&kernels::prep_queries<QT, float, 1>, grid, 1u, size_t{0}, qtyped, pr.query_stride, qc, qpad,
               D, Dpad, pr.cosine, static_cast<float*>(planes), qmul);
        return;
      }
      if constexpr (!std::is_same_v<T, float>) {
        with_terms(p.terms, [&](auto tc) {
          constexpr int TERMS = decltype(tc)::value;
          if constexpr (TERMS <= max_terms<T>())
            launch(&kernels::prep_queries<QT, T, TERMS>, grid, 1u, size_t{0}, qtyped, pr.query_stride, qc, qpad,
                   D, Dpad, pr.cosine, static_cast<T*>(planes), qmul);
        });
      }
    });

    const Split sp = split_db(p, pr.N, qpad / p.bq);
    kernels::ScanArgs args{planes,
                           qmul,
                           pr.db,
                           pr.db_stride,
                           pr.N,
                           static_cast<int>(pr.D),
                           static_cast<int>(p.dpad),
                           qc,
                           qpad,
                           sp.rows_per_split,
                           sp.splits,
                           lists,
                           static_cast<int>(pr.k),
                           pr.cosine,
                           inv_norms,
                           nullptr,
                           nullptr,
                           0,
                           0};
    rows(args, q0, launch);
    with_scan_kernel_typed<T, K>(p, [&](auto kernel) {
      launch(kernel, static_cast<unsigned>(qpad / p.bq), static_cast<unsigned>(sp.splits), p.smem, args);
    });
    launch(&kernels::merge_lists<K>, static_cast<unsigned>(qc), 1u, kernels::merge_smem_bytes<K>(),
           static_cast<const uint64_t*>(lists), sp.splits, static_cast<const float*>(qmul), static_cast<int>(pr.k),
           scores + q0 * pr.k, indices + q0 * pr.k);
  }
}

// run_search_typed for the plan's variant (every variant instantiated in this unit).
template <class Launcher>
void run_search(const Plan& p, const SearchInputs& pr, void* workspace, float* scores, int64_t* indices,
                Launcher&& launch) {
  with_variant(p, pr.db_dtype, [&](auto tc, auto kc) {
    using T = typename decltype(tc)::type;
    run_search_typed<T, decltype(kc)::value>(p, pr, workspace, scores, indices, launch);
  });
}

}  // namespace plm::cuda::launch
