// Planning and launching an exact search from compact codes on the GPU (code_kernels.cuh): the
// float search's own launch sequence (search_launch.cuh) on its narrow tile, with a row-listing
// stage per chunk: quantise the queries, scan the codes, list the rows that can still win.
// Written once against a Launcher, as the plain search is, so the emulator runs this sequence.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>

#include "cuda/code_kernels.cuh"
#include "cuda/search_launch.cuh"

namespace plm::cuda::launch {

// The db's codes on the device (built by cpu::build_codes, laid out by cpu::device_codes).
struct DeviceCodes {
  const void* codes;   // N rows of int8, code_stride bytes apart (a multiple of 16), D bytes used
  int64_t code_stride;
  const float* meta;   // [3][N]: c, E, beta
};

constexpr size_t kCodeChunkBudget = size_t{256} << 20;  // bytes of marks and row lists per chunk

struct CodePlan {
  bool usable;      // false: the plain search (the float plan is not a tensor-core one, or no room)
  Plan rescore;     // the float search on its narrow tile; its chunk is this plan's chunk
  bool wide;        // the code scan's tile: WideTile (64 queries) or SmallTile (16)
  int bq, K;
  size_t smem;
  int slots;        // code scan blocks resident at once
  int64_t dpad;     // code units (two int8) per query row
  int64_t words;    // 32-bit words of marks per query tile
  int64_t cap;      // rows a query tile may list; past it the tile is rescored in full
  size_t q8_offset, qcode_offset, lists_offset, lists_bytes, zero_offset, zero_bytes, ids_offset,
      counts_offset, workspace_bytes;
  // within the zeroed region: tau [qpad] uint64, marked [tiles] int, marks [tiles][words]
  size_t marked_offset, marks_offset;
};

inline int64_t code_dim_units(int64_t D) { return (D + 15) / 16 * 8; }  // 16-byte rows of int8

template <class F>
void with_code_tile(bool wide, F&& f) {
  if (wide) f(TypeTag<kernels::WideTile>{});
  else f(TypeTag<kernels::SmallTile>{});
}

inline size_t code_scan_smem(bool wide, int K) {
  size_t bytes = 0;
  with_list_length(K, [&](auto kc) {
    with_code_tile(wide, [&](auto tt) { bytes = kernels::code_smem_bytes<typename decltype(tt)::type, decltype(kc)::value>(); });
  });
  return bytes;
}

// float_blocks(plan): scan blocks of the float plan per SM; code_blocks(wide, K): code scan
// blocks per SM (0: none fit).
inline CodePlan make_code_plan(const SearchInputs& pr, DeviceLimits dev,
                               const std::function<int(const Plan&)>& float_blocks,
                               const std::function<int(bool, int)>& code_blocks) {
  CodePlan c{};
  if (pr.D > 65536 || pr.N < 1) return c;  // int32 sums of 127 x 127 products
  c.words = ceil_div(pr.N, 32);
  c.cap = std::min<int64_t>(pr.N, std::max<int64_t>(4096, pr.N / 16));
  c.K = list_length(pr.k);
  c.wide = pr.Q > kernels::SmallTile::BQ && code_scan_smem(true, c.K) <= dev.smem_per_block;
  if (!c.wide && code_scan_smem(false, c.K) > dev.smem_per_block) return c;
  c.bq = c.wide ? kernels::WideTile::BQ : kernels::SmallTile::BQ;
  // Marks and lists per query: a tile's bitmap and list shared by bq queries.
  const size_t per_query = (sizeof(uint32_t) * c.words + sizeof(int32_t) * (c.cap + 1)) / c.bq + 16;
  dev.max_chunk = std::min<int64_t>(dev.max_chunk, std::max<int64_t>(int64_t(kCodeChunkBudget / per_query), c.bq));
  dev.max_chunk = std::max<int64_t>(dev.max_chunk / c.bq * c.bq, c.bq);
  c.rescore = make_plan(pr, dev, float_blocks, /*rescoring=*/true);
  if (c.rescore.scan != Scan::mma_small) return c;
  c.smem = code_scan_smem(c.wide, c.K);
  const int per_sm = code_blocks(c.wide, c.K);
  if (per_sm < 1) return c;
  c.slots = per_sm * dev.sm_count;
  c.dpad = ceil_div(code_dim_units(pr.D), kernels::WideTile::BK) * kernels::WideTile::BK;

  const int64_t qpad = ceil_div(c.rescore.chunk, c.bq) * c.bq, tiles = qpad / c.bq;
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(c.slots / tiles, ceil_div(pr.N, kTileRows)));
  size_t at = align256(c.rescore.workspace_bytes);
  c.q8_offset = at;
  at = align256(at + 2 * c.dpad * qpad);
  c.qcode_offset = at;
  at = align256(at + 16 * qpad);
  c.lists_offset = at;
  c.lists_bytes = sizeof(uint64_t) * c.K * qpad * std::max<int64_t>(splits, c.slots / tiles);
  at = align256(at + c.lists_bytes);
  c.zero_offset = at;
  c.marked_offset = align256(sizeof(uint64_t) * qpad);
  c.marks_offset = align256(c.marked_offset + sizeof(int) * tiles);
  c.zero_bytes = align256(c.marks_offset + sizeof(uint32_t) * tiles * c.words);
  at += c.zero_bytes;
  c.ids_offset = at;
  at = align256(at + sizeof(int32_t) * tiles * c.cap);
  c.counts_offset = at;
  c.workspace_bytes = align256(at + sizeof(int32_t) * tiles);
  c.usable = true;
  return c;
}

// The rows stage of run_search_typed: quantise the chunk's queries, scan the codes, list the
// rows each query tile rescores.
template <class T, int K, class Launcher>
struct CodeRows {
  const CodePlan& c;
  const SearchInputs& pr;
  const DeviceCodes& dc;
  unsigned char* ws;

  // The chunk's query codes (q8, qcode in the workspace) from its float query planes.
  void quantize(const kernels::ScanArgs& args, Launcher& launch) const {
    const int64_t qpad = ceil_div(args.Qc, c.bq) * c.bq;
    with_terms(c.rescore.terms, [&](auto tc) {
      constexpr int TERMS = decltype(tc)::value;
      if constexpr (TERMS <= max_terms<T>())
        launch(&kernels::prep_code_queries<T, TERMS>, static_cast<unsigned>(ceil_div(qpad, kWarps)), 1u, size_t{0},
               static_cast<const T*>(args.qprep), static_cast<const float*>(args.qmul), args.Qc, args.Qpad,
               static_cast<int>(c.rescore.dpad), static_cast<int>(pr.D), static_cast<int>(2 * c.dpad),
               reinterpret_cast<int8_t*>(ws + c.q8_offset), reinterpret_cast<float4*>(ws + c.qcode_offset), qpad);
    });
  }

  void operator()(kernels::ScanArgs& args, int64_t /*q0*/, Launcher& launch) const {
    const int64_t qc = args.Qc, qpad = ceil_div(qc, c.bq) * c.bq, tiles = qpad / c.bq;
    auto* q8 = reinterpret_cast<int8_t*>(ws + c.q8_offset);
    auto* qcode = reinterpret_cast<float4*>(ws + c.qcode_offset);
    unsigned char* zero = ws + c.zero_offset;
    auto* tau = reinterpret_cast<unsigned long long*>(zero);
    auto* marked = reinterpret_cast<int*>(zero + c.marked_offset);
    auto* marks = reinterpret_cast<uint32_t*>(zero + c.marks_offset);
    auto* ids = reinterpret_cast<int32_t*>(ws + c.ids_offset);
    auto* counts = reinterpret_cast<int32_t*>(ws + c.counts_offset);

    quantize(args, launch);
    const int64_t zero_words = static_cast<int64_t>(c.zero_bytes / 4);
    launch(&kernels::fill_zero<uint32_t>, static_cast<unsigned>(std::min<int64_t>(ceil_div(zero_words, kThreads), 4096)), 1u,
           size_t{0}, reinterpret_cast<uint32_t*>(zero), zero_words);

    int64_t splits = std::min<int64_t>(std::max<int64_t>(c.slots / tiles, 1), ceil_div(pr.N, kTileRows));
    splits = std::min<int64_t>({splits, int64_t{65535},
                                std::max<int64_t>(int64_t(c.lists_bytes / (sizeof(uint64_t) * c.K * qpad)), 1)});
    const int64_t rows = ceil_div(ceil_div(pr.N, splits), kTileRows) * kTileRows;
    kernels::CodeScanArgs a{reinterpret_cast<const uint16_t*>(q8),
                            qcode,
                            static_cast<const uint16_t*>(dc.codes),
                            dc.code_stride / 2,
                            dc.meta,
                            pr.N,
                            static_cast<int>(code_dim_units(pr.D)),
                            static_cast<int>(c.dpad),
                            qc,
                            qpad,
                            rows,
                            static_cast<int>(ceil_div(pr.N, rows)),
                            reinterpret_cast<uint64_t*>(ws + c.lists_offset),
                            tau,
                            marks,
                            c.words,
                            marked,
                            static_cast<int>(c.cap),
                            static_cast<int>(pr.k),
                            nullptr};
    with_code_tile(c.wide, [&](auto tt) {
      launch(&kernels::scan_codes<typename decltype(tt)::type, K>, static_cast<unsigned>(tiles),
             static_cast<unsigned>(a.splits), c.smem, a);
    });
    launch(&kernels::compact_marks<kThreads>, static_cast<unsigned>(tiles), 1u, size_t{0}, static_cast<const uint32_t*>(marks),
           c.words, static_cast<const int*>(marked), static_cast<int>(c.cap), ids, c.cap, counts);
    args.row_ids = ids;
    args.row_counts = counts;
    args.ids_stride = c.cap;
    args.ids_queries = c.bq;
  }
};

// The whole search from codes for the plan (c.usable), db element type T, list length K =
// c.K: the same results as run_search_typed(plain plan), bit for bit.
template <class T, int K, class Launcher>
void run_code_search_typed(const CodePlan& c, const SearchInputs& pr, const DeviceCodes& dc, void* workspace,
                           float* scores, int64_t* indices, Launcher&& launch) {
  auto* ws = static_cast<unsigned char*>(workspace);
  using L = std::remove_reference_t<Launcher>;
  run_search_typed<T, K>(c.rescore, pr, workspace, scores, indices, launch, CodeRows<T, K, L>{c, pr, dc, ws});
}

template <class Launcher>
void run_code_search(const CodePlan& c, const SearchInputs& pr, const DeviceCodes& dc, void* workspace,
                     float* scores, int64_t* indices, Launcher&& launch) {
  with_variant(c.rescore, pr.db_dtype, [&](auto tc, auto kc) {
    using T = typename decltype(tc)::type;
    if constexpr (!std::is_same_v<T, float>)
      run_code_search_typed<T, decltype(kc)::value>(c, pr, dc, workspace, scores, indices, launch);
  });
}

}  // namespace plm::cuda::launch
