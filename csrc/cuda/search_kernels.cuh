// Exact top-k search kernels. Included by search.cu, and by the host emulator tests
// (tests/cuda_emu) with PLM_CUDA_EMULATE, so nothing here may use the CUDA runtime API.
//
// One search runs per chunk of queries:
//   1. prep_queries: one warp per query computes the norm, flags non-finite rows, and writes
//      the query in the form the scoring kernel reads (see the planes below).
//   2. scan (search_mma or search_simt): block (query tile, db split) scores its query tile
//      against its contiguous db range one tile of kTileRows rows at a time and keeps, per
//      query, an exact top-K list of that range in the workspace. Scores live in registers and
//      a shared-memory tile; the Q x N score matrix is never written to device memory.
//   3. merge_lists: one block per query merges the lists of all splits and writes the top k.
//
// Per-query selection inside a scan block: a warp owns each query. A query whose best score in
// the tile cannot beat its current k-th best skips the tile (after the first few tiles nearly
// all do); otherwise a candidate enters the query's shared-memory buffer when its key beats the
// k-th best's, and a full buffer is sorted and merged into the list by the warp networks in
// topk.cuh.
#pragma once
#include <cstdint>
#include <type_traits>

#include "cuda/convert.cuh"
#include "cuda/ptx.cuh"
#include "cuda/topk.cuh"

namespace plm::cuda::kernels {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileRows = 128;  // db rows per tile
constexpr int kScorePad = 4;    // floats of padding per score-tile row
constexpr int kMaxBuffer = 64;  // candidate buffer per query (entries)
constexpr int kMaxParts = kWarps;  // column groups of a score tile with their own row maxima

__host__ __device__ constexpr int buffer_entries(int K) { return K < kMaxBuffer ? K : kMaxBuffer; }
__host__ __device__ constexpr size_t align16(size_t x) { return (x + 15) / 16 * 16; }

// Everything the scan kernels read; pointers are already offset to the current query chunk.
struct ScanArgs {
  const void* qprep;   // scoring form of the queries, see prep_queries
  const float* qmul;   // [Qpad] score multiplier per query; NaN marks a non-finite query
  const void* db;      // N rows of D elements, row stride db_stride elements
  int64_t db_stride;
  int64_t N;
  int D, Dpad;
  int64_t Qc, Qpad;    // valid queries in this chunk, and the padded count the planes hold
  int64_t rows_per_split;
  int splits;
  uint64_t* lists;     // [Qpad][splits][K] keys, sorted descending
  int k;
  bool cosine;
  const float* db_inv_norms;  // [N] 1/|x| computed once (db_norms), or null: each block computes its own
  // Rescoring after a code scan (code_kernels.cuh): each group of ids_queries queries scores only
  // the rows of its list, row_ids + group * ids_stride (ascending), row_counts[group] long, or
  // every row where that count is negative (the list overflowed). Null: every row.
  const int32_t* row_ids;
  const int32_t* row_counts;
  int64_t ids_stride;
  int64_t ids_queries;
};

// ---- 1. queries --------------------------------------------------------------------------------
//
// OutT float (the SIMT scan): q / |q| for cosine, q for inner product, qmul = 1, the CPU
// kernel's query form (|q| from q scaled by a power of two, so 1e20 and 1e-30 queries work). OutT half/bfloat16 (tensor cores): q scaled by a power of two so its
// largest element sits where OutT has full precision, split into TERMS planes (the rounded
// value, then the rounding error of the planes before), so that float32 or mixed-type queries
// keep all 24 bits; qmul undoes the scale and applies 1/|q|. Planes: [TERMS][Qpad][Dpad],
// zero-padded.
template <class QT, class OutT, int TERMS>
__global__ void __launch_bounds__(kThreads) prep_queries(const QT* __restrict__ q, int64_t q_stride,
                                                         int64_t Qc, int64_t Qpad, int D, int Dpad,
                                                         bool cosine, OutT* __restrict__ out,
                                                         float* __restrict__ qmul) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= Qpad) return;
  float amax = 0.0f;
  bool finite = true;
  if (row < Qc) {
    for (int d = lane; d < D; d += 32) {
      const float v = to_float<QT>(q[row * q_stride + d]);
      amax = fmaxf(amax, fabsf(v));
      finite = finite && fabsf(v) <= 3.402823466e38f;  // false for inf and NaN
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(topk::kFullMask, amax, off));
  finite = __all_sync(topk::kFullMask, finite);
  const bool real = row < Qc && finite;
  // 2^(ex-1) <= amax < 2^ex: the squares of q * 2^-ex sum to [1/4, D] whatever the query's
  // magnitude, so none overflows (1e20 queries) and none that matters underflows (1e-30).
  int ex = 0;
  if (real && amax > 0.0f) frexpf(amax, &ex);
  float n2 = 0.0f;
  if (real && cosine) {
    for (int d = lane; d < D; d += 32) {
      const float v = ldexpf(to_float<QT>(q[row * q_stride + d]), -ex);
      n2 += v * v;
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) n2 += __shfl_xor_sync(topk::kFullMask, n2, off);
  const float scaled_inv = n2 > 0.0f ? 1.0f / sqrtf(n2) : 0.0f;  // 1 / |q * 2^-ex|
  int shift = 0;
  constexpr int target = std::is_same_v<OutT, __half> ? 13 : 1;
  if constexpr (TERMS > 0 && !std::is_same_v<OutT, float>) {
    // Largest element into [2^12, 2^13) for half (11-bit significand, max 65504), or [1, 2)
    // for bfloat16 (float32's range: keep products with large db values finite).
    shift = amax > 0.0f ? target - ex : 0;
  }
  for (int d = lane; d < Dpad; d += 32) {
    float v = (real && d < D) ? to_float<QT>(q[row * q_stride + d]) : 0.0f;
    if constexpr (std::is_same_v<OutT, float>) {
      out[row * Dpad + d] = cosine ? ldexpf(v, -ex) * scaled_inv : v;  // q / |q| without overflow
    } else {
      float rest = ldexpf(v, shift);
#pragma unroll
      for (int t = 0; t < TERMS; ++t) {  // each plane holds the rounding error of the ones before
        const OutT part = from_float<OutT>(rest);
        out[(t * Qpad + row) * Dpad + d] = part;
        rest -= to_float<OutT>(part);
      }
    }
  }
  if (lane == 0) {
    // planes hold q * 2^shift = q * 2^(target - ex); 1/|q| = 2^-ex * scaled_inv
    float m = 0.0f;
    if (row < Qc) m = !finite ? __uint_as_float(0x7fc00000u)
                      : std::is_same_v<OutT, float> ? 1.0f
                      : cosine ? ldexpf(scaled_inv, -target) : ldexpf(1.0f, -shift);
    qmul[row] = m;
  }
}

// ---- 1b. db row norms, once per search when many query tiles would each recompute them -----------

// 1/|x| of a db row from its float32 sum of squares n2, or, where n2 cannot be trusted, from the
// row itself in double (rare: one thread, one pass): n2 overflowed (elements beyond ~1e19) or is
// below 2^-100, where squares that underflowed into subnormals (or to zero) could matter. A
// half row reaches neither (squares within [2^-48, 2^32]), so only there is n2 == 0 a zero row.
// Rows of norm below 2^-128 (every element subnormal) get 0, as zero rows do: their inverse
// norm is not a float32.
template <class T>
__device__ __forceinline__ float row_inv_norm(float n2, const T* __restrict__ x, int D) {
  if (std::is_same_v<T, __half> || (n2 >= 0x1p-100f && n2 <= 3.402823466e38f))
    return n2 > 0.0f ? 1.0f / sqrtf(n2) : 0.0f;
  double s = 0.0;
  for (int d = 0; d < D; ++d) {
    const double v = to_float<T>(x[d]);
    s += v * v;
  }
  if (s == 0.0) return 0.0f;
  const double inv = 1.0 / sqrt(s);  // NaN stays NaN; inf gives 0, as the float32 form did
  return inv <= 3.402823466e38 ? static_cast<float>(inv) : 0.0f;
}

// The sum of squares of a db row as the tensor-core scan computes it for its own tile: two
// halves, each summing the 16-byte pieces of its half of every BK-column stage in order, then
// half 0 + half 1. The norms pass computes this very sum, so a score's bits do not depend on
// which of the two computed its row's norm (a search's plan, or a rescoring after a code scan).
constexpr int kNormBK = 32;  // the BK of every MmaTile (static_assert below)
template <class T>
__device__ __forceinline__ float half_row_squares(const T* __restrict__ x, int D, int half) {
  float acc = 0.0f;
  for (int c = half * (kNormBK / 2); c < D; c += kNormBK)
#pragma unroll
    for (int v = 0; v < kNormBK / 16; ++v)
      if (c + 8 * v < D) add_squares8<T>(acc, *reinterpret_cast<const uint4*>(x + c + 8 * v));
  return acc;
}

// out[n] = 1/|x_n| (0 for a zero row), float32 sums of squares. VEC (rows 16-byte aligned
// half/bfloat16, D % 8 == 0, the tensor-core scans): two threads per row, the scan's own sum
// (half_row_squares); otherwise one warp per row.
template <class T, bool VEC>
__global__ void __launch_bounds__(kThreads) db_inv_norms(const T* __restrict__ db, int64_t db_stride, int64_t N,
                                                         int D, float* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  if constexpr (VEC) {
    const int64_t row = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 2;
    const int half = threadIdx.x % 2;
    const T* x = db + (row < N ? row : 0) * db_stride;
    const float part = row < N ? half_row_squares<T>(x, D, half) : 0.0f;
    const float other = __shfl_xor_sync(topk::kFullMask, part, 1);
    if (row < N && half == 0) out[row] = row_inv_norm<T>(part + other, x, D);
    return;
  }
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= N) return;
  const T* x = db + row * db_stride;
  float n2 = 0.0f;
  {
    for (int d = lane; d < D; d += 32) {
      const float v = to_float<T>(x[d]);
      n2 += v * v;
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) n2 += __shfl_xor_sync(topk::kFullMask, n2, off);
  if (lane == 0) out[row] = row_inv_norm<T>(n2, x, D);
}

// ---- 2. per-query selection shared by both scan kernels -----------------------------------------

// Shared-memory state of the selection: a score tile, candidate buffers, thresholds.
template <int BQ, int K>
struct Selection {
  static constexpr int B = buffer_entries(K);
  static constexpr int kScoreLd = kTileRows + kScorePad;
  float* scores;      // [BQ][kScoreLd]
  uint64_t* buffer;   // [BQ][B]
  uint64_t* thresh;   // [BQ] key of the k-th best so far (0: fewer than k)
  int* count;         // [BQ]
  float* qmul;        // [BQ]
  float* inv_norm;    // [kTileRows]
  float* row_max;     // [kMaxParts][BQ]: best score of each query in each part of the tile

  __host__ __device__ static constexpr size_t bytes() {
    return align16(sizeof(float) * BQ * kScoreLd) + align16(sizeof(uint64_t) * BQ * B) +
           align16(sizeof(uint64_t) * BQ) + align16(sizeof(int) * BQ) + align16(sizeof(float) * BQ) +
           align16(sizeof(float) * kTileRows) + align16(sizeof(float) * kMaxParts * BQ);
  }
  __device__ explicit Selection(unsigned char* p) {
    scores = reinterpret_cast<float*>(p);
    p += align16(sizeof(float) * BQ * kScoreLd);
    buffer = reinterpret_cast<uint64_t*>(p);
    p += align16(sizeof(uint64_t) * BQ * B);
    thresh = reinterpret_cast<uint64_t*>(p);
    p += align16(sizeof(uint64_t) * BQ);
    count = reinterpret_cast<int*>(p);
    p += align16(sizeof(int) * BQ);
    qmul = reinterpret_cast<float*>(p);
    p += align16(sizeof(float) * BQ);
    inv_norm = reinterpret_cast<float*>(p);
    p += align16(sizeof(float) * kTileRows);
    row_max = reinterpret_cast<float*>(p);
  }

  // The list of local query ql in this block's split (Args: ScanArgs or CodeScanArgs).
  template <class Args>
  __device__ static uint64_t* list_of(const Args& a, int64_t q0, int ql) {
    return a.lists + ((q0 + ql) * a.splits + blockIdx.y) * static_cast<int64_t>(K);
  }

  // Empties the lists and buffers of this block and loads the query multipliers (if any).
  template <class Args>
  __device__ void init(const Args& a, int64_t q0, int valid_q) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int ql = warp; ql < valid_q; ql += kWarps) {
      uint64_t* list = list_of(a, q0, ql);
      for (int i = lane; i < K; i += 32) list[i] = 0;
    }
    for (int i = threadIdx.x; i < BQ; i += kThreads) {
      thresh[i] = 0;
      count[i] = 0;
      qmul[i] = a.qmul ? a.qmul[q0 + i] : 1.0f;
    }
    __syncthreads();
  }

  // Sorts query ql's buffer (n entries) into its list; returns the new threshold.
  template <class Args>
  __device__ uint64_t flush(const Args& a, int64_t q0, int ql, int n) {
    constexpr int KL = K / 32, BL = B / 32;
    const int lane = threadIdx.x % 32;
    __syncwarp();
    const uint64_t* buf = buffer + ql * B;
    uint64_t cand[BL];
#pragma unroll
    for (int j = 0; j < BL; ++j) cand[j] = (j * 32 + lane < n) ? buf[j * 32 + lane] : 0;
    topk::warp_sort<BL>(cand, lane);
    uint64_t* list = list_of(a, q0, ql);
    uint64_t best[KL];
#pragma unroll
    for (int j = 0; j < KL; ++j) best[j] = list[j * 32 + lane];
    topk::warp_merge_top<KL, BL>(best, cand, lane);
#pragma unroll
    for (int j = 0; j < KL; ++j) list[j * 32 + lane] = best[j];
    const uint64_t t = topk::warp_get<KL>(best, a.k - 1);
    __syncwarp();
    return t;
  }

  // Offers the score tile (positions n0 .. n0 + kTileRows of the block's range, masked at n_end;
  // position p is db row row_of(p)) to every valid query. row_max[0 .. parts) hold each query's
  // best score per part of the tile: a query whose best does not beat its k-th best is skipped
  // (equal scores lose too: rows ascend with positions, so this tile's rows come after every
  // row in the list).
  template <class Args, class RowOf>
  __device__ void offer_tile(const Args& a, int64_t q0, int valid_q, int64_t n0, int64_t n_end, int parts,
                             RowOf row_of) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int ql = warp; ql < valid_q; ql += kWarps) {
      uint64_t t = thresh[ql];
      if (t != 0) {
        float best = row_max[ql];
        for (int part = 1; part < parts; ++part) best = fmaxf(best, row_max[part * BQ + ql]);
        if (!(best > topk::key_score(t))) continue;
      }
      int n = count[ql];
      uint64_t* buf = buffer + ql * B;
      const float* row = scores + ql * kScoreLd;
#pragma unroll 1
      for (int c0 = 0; c0 < kTileRows; c0 += 32) {
        const int64_t pos = n0 + c0 + lane;
        const float s = row[c0 + lane];
        uint64_t key = 0;
        if (pos < n_end && topk::admissible(s)) key = topk::make_key(s, static_cast<uint32_t>(row_of(pos)));
        bool pass = key > t;
        unsigned m = __ballot_sync(topk::kFullMask, pass);
        if (m == 0) continue;
        if (n + __popc(m) > B) {
          t = flush(a, q0, ql, n);
          n = 0;
          pass = key > t;
          m = __ballot_sync(topk::kFullMask, pass);
        }
        if (pass) buf[n + __popc(m & ((1u << lane) - 1u))] = key;
        n += __popc(m);
      }
      __syncwarp();
      if (lane == 0) {
        thresh[ql] = t;
        count[ql] = n;
      }
    }
  }

  // Flushes what is left in the buffers (end of the block's range).
  template <class Args>
  __device__ void finish(const Args& a, int64_t q0, int valid_q) {
    const int warp = threadIdx.x / 32;
    for (int ql = warp; ql < valid_q; ql += kWarps)
      if (count[ql] > 0) flush(a, q0, ql, count[ql]);
  }
};

// Block geometry shared by the scan kernels: the block's queries and its range of positions
// [n_begin, n_end); position p is db row p, or ids[p] when the block scores a list of rows.
struct ScanRange {
  int64_t q0;
  int valid_q;
  int64_t n_begin, n_end;
  int tiles;
  const int32_t* ids;
  __device__ int64_t row(int64_t p) const { return ids ? static_cast<int64_t>(ids[p]) : p; }
};

template <int BQ, class Args>
__device__ __forceinline__ ScanRange scan_range(const Args& a) {
  ScanRange r;
  r.q0 = static_cast<int64_t>(blockIdx.x) * BQ;
  const int64_t left = a.Qc - r.q0;
  r.valid_q = left < BQ ? static_cast<int>(left) : BQ;
  r.ids = nullptr;
  int64_t rows = a.N, per_split = a.rows_per_split;
  if constexpr (std::is_same_v<Args, ScanArgs>) {
    if (a.row_ids) {
      const int64_t group = r.q0 / a.ids_queries;
      const int64_t count = a.row_counts[group];
      if (count >= 0) {  // this block's share of the list, whole tiles
        r.ids = a.row_ids + group * a.ids_stride;
        rows = count;
        per_split = (count + a.splits - 1) / a.splits;
        per_split = (per_split + kTileRows - 1) / kTileRows * kTileRows;
      }
    }
  }
  r.n_begin = static_cast<int64_t>(blockIdx.y) * per_split;
  const int64_t end = r.n_begin + per_split;
  r.n_end = end < rows ? end : rows;
  r.tiles = r.n_end > r.n_begin ? static_cast<int>((r.n_end - r.n_begin + kTileRows - 1) / kTileRows) : 0;
  return r;
}

// 1/|x| of the db row at position p (0 for a zero row): from this block's sums of squares (two
// halves per row in `parts`, position p - n0 at index tid) or from the precomputed norms.
// Positions past the range give 0.
template <class T>
__device__ __forceinline__ float tile_inv_norm(const ScanArgs& a, const ScanRange& r, bool row_norms,
                                               const float* parts, int64_t p) {
  if (p >= r.n_end) return 0.0f;
  const int64_t n = r.row(p);
  if (!row_norms) return a.db_inv_norms[n];
  const int i = threadIdx.x;
  return row_inv_norm<T>(parts[i] + parts[kTileRows + i], static_cast<const T*>(a.db) + n * a.db_stride, a.D);
}

// ---- 2a. tensor-core scan (sm_80+, half/bfloat16 db, 16-byte aligned rows) ----------------------

// BQ queries x kTileRows rows per block; WARPS_Q x (kWarps / WARPS_Q) warps; BK columns of D
// per pipeline stage, STAGES stages in flight (cp.async).
template <int BQ_, int WARPS_Q_, int BK_, int STAGES_>
struct MmaTile {
  static constexpr int BQ = BQ_, WARPS_Q = WARPS_Q_, BK = BK_, STAGES = STAGES_;
  static constexpr int WARPS_N = kWarps / WARPS_Q;
  static constexpr int WQ = BQ / WARPS_Q, WN = kTileRows / WARPS_N;
  static constexpr int MT = WQ / 16, NT = WN / 8;
  // 8 halves of padding per shared row: rows 16 bytes apart mod 128, so the 8 row reads of an
  // ldmatrix phase hit distinct banks.
  static constexpr int LD = BK + 8;
  static_assert(MT >= 1 && NT % 2 == 0 && BK % 16 == 0, "bad tile");
};
// Few queries: stream the db; six 64-byte stages per row keep ~40 KiB per block in flight and,
// with two float32 query planes, still fit the 99 KiB per block of sm_86/sm_89.
using SmallTile = MmaTile<16, 1, 32, 6>;
using WideTile = MmaTile<64, 2, 32, 3>;   // many queries: more tensor work per byte

template <class Tile, int TERMS>
__host__ __device__ constexpr size_t mma_stage_halves() {
  return static_cast<size_t>(TERMS * Tile::BQ + kTileRows) * Tile::LD;
}

template <class Tile, int TERMS, int K>
constexpr size_t mma_smem_bytes() {
  return align16(2 * Tile::STAGES * mma_stage_halves<Tile, TERMS>()) +
         align16(sizeof(float) * 2 * kTileRows) + Selection<Tile::BQ, K>::bytes();
}

// What a 16-bit unit of the tensor-core tiles holds and the mma that multiplies them (16 units
// of k per instruction either way, so the tiles, copies and ldmatrix addresses are shared).
template <class T>
struct MmaHalf {  // T = __half / __nv_bfloat16: float32 sums of exact products
  using Unit = T;
  using Acc = float;
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    ptx::mma_16816<T>(d, a, b);
  }
};
struct MmaInt8 {  // a unit holds two int8 codes: exact int32 sums
  using Unit = uint16_t;
  using Acc = int32_t;
  __device__ static void mma(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    ptx::mma_16832_s8(d, a, b);
  }
};

// The tensor-core main loop: streams the block's range of db rows through shared memory,
// kTileRows rows at a time, and scores each tile against the block's BQ queries. qplanes holds
// TERMS planes of Qpad query rows of Dpad units (summed into one product); db rows are
// db_stride units apart, of D units (columns past D, and positions past r.n_end, read as zeros).
// on_stage(kt, sb) sees each stage of the tile's db rows as it lands (kTileRows rows, LD units
// apart, columns kt * BK ..); on_tile(tile, acc) runs once tile `tile` is scored (acc: this
// warp's fragments, Mma::Acc) and returns whether to go on, the same answer in every thread.
// Uses the first mma_stage_bytes of dynamic shared memory.
template <class Mma, int TERMS, class Tile, class OnStage, class OnTile>
__device__ __forceinline__ void mma_stream(const typename Mma::Unit* __restrict__ qplanes, int64_t Qpad,
                                           const typename Mma::Unit* __restrict__ db, int64_t db_stride, int D,
                                           int Dpad, const ScanRange& r, OnStage&& on_stage, OnTile&& on_tile) {
  using U = typename Mma::Unit;
  using Acc = typename Mma::Acc;
  constexpr int BQ = Tile::BQ, BK = Tile::BK, LD = Tile::LD, STAGES = Tile::STAGES;
  constexpr int MT = Tile::MT, NT = Tile::NT;
  constexpr int STAGE = static_cast<int>(mma_stage_halves<Tile, TERMS>());
  constexpr int CHUNKS = BK / 8;  // 16-byte pieces per shared row
  static_assert(BK == kNormBK, "half_row_squares follows this loop's stages");
  U* stages = reinterpret_cast<U*>(ptx::dynamic_smem());
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wq = warp / Tile::WARPS_N, wn = warp % Tile::WARPS_N;
  const int KT = Dpad / BK;

  // Stage `stage` <- columns [kt*BK, kt*BK + BK) of the query planes and of tile `tile`'s db rows.
  auto load_chunk = [&](int tile, int kt, int stage) {
    const int64_t n0 = r.n_begin + static_cast<int64_t>(tile) * kTileRows;
    const int k0 = kt * BK;
    U* sa = stages + stage * STAGE;
    U* sb = sa + TERMS * BQ * LD;
    for (int i = tid; i < TERMS * BQ * CHUNKS; i += kThreads) {
      const int row = i / CHUNKS, piece = i % CHUNKS;
      const int term = row / BQ, ql = row % BQ;
      const U* src = qplanes + (term * Qpad + r.q0 + ql) * Dpad + k0 + piece * 8;
      ptx::cp_async16(sa + row * LD + piece * 8, src, true);
    }
    for (int i = tid; i < kTileRows * CHUNKS; i += kThreads) {
      const int row = i / CHUNKS, piece = i % CHUNKS;
      const int64_t p = n0 + row;
      const int col = k0 + piece * 8;
      const bool ok = p < r.n_end && col < D;
      ptx::cp_async16(sb + row * LD + piece * 8, ok ? db + r.row(p) * db_stride + col : db, ok);
    }
  };
  // The pipeline runs over (tile, kt) chunks without a break between tiles: loads run
  // STAGES - 1 chunks ahead of the math, so the next tile streams in during a tile's selection.
  int load_tile = 0, load_kt = 0, load_stage = 0;
  auto load_next = [&]() {
    if (load_tile < r.tiles) load_chunk(load_tile, load_kt, load_stage);
    ptx::cp_async_commit();  // an empty group past the end keeps the group count in step
    if (++load_kt == KT) {
      load_kt = 0;
      ++load_tile;
    }
    if (++load_stage == STAGES) load_stage = 0;
  };

  Acc acc[MT][NT][4];
#pragma unroll 1
  for (int s = 0; s < STAGES - 1; ++s) load_next();
  int tile = 0, kt = 0, stage = 0;
#pragma unroll 1
  while (tile < r.tiles) {
    ptx::cp_async_wait<STAGES - 2>();
    __syncthreads();
    // The stage refilled now was read in the previous iteration, which every thread has finished.
    load_next();

    if (kt == 0) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mt][nt][e] = Acc(0);
    }
    const U* sa = stages + stage * STAGE;
    const U* sb = sa + TERMS * BQ * LD;
    on_stage(kt, sb);
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
      uint32_t af[TERMS][MT][4];
#pragma unroll
      for (int term = 0; term < TERMS; ++term)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const int row = term * BQ + wq * Tile::WQ + mt * 16 + (lane & 15);
          ptx::ldmatrix_x4(af[term][mt], sa + row * LD + ks + (lane >> 4) * 8);
        }
      uint32_t bf[NT][2];
#pragma unroll
      for (int nt = 0; nt < NT; nt += 2) {
        const int row = wn * Tile::WN + nt * 8 + (lane & 7) + ((lane >> 4) << 3);
        uint32_t m[4];
        ptx::ldmatrix_x4(m, sb + row * LD + ks + ((lane >> 3) & 1) * 8);
        bf[nt][0] = m[0];
        bf[nt][1] = m[1];
        bf[nt + 1][0] = m[2];
        bf[nt + 1][1] = m[3];
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int term = 0; term < TERMS; ++term) Mma::mma(acc[mt][nt], af[term][mt], bf[nt]);
    }
    if (kt == KT - 1 && !on_tile(tile, acc)) break;
    if (++stage == STAGES) stage = 0;
    if (++kt == KT) {
      kt = 0;
      ++tile;
    }
  }
  ptx::cp_async_wait<0>();
}

// Where this lane's mma.sync fragments sit in the block's score tile: warp (wq, wn) of the
// tile's grid, and in each 16 x 8 piece rows g and g + 8, columns 2 t4 and 2 t4 + 1.
template <class Tile>
struct FragmentPos {
  int wq, wn, g, t4;
  __device__ FragmentPos() {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    wq = warp / Tile::WARPS_N;
    wn = warp % Tile::WARPS_N;
    g = lane / 4;
    t4 = lane % 4;
  }
  __device__ int query(int mt, int half) const { return wq * Tile::WQ + mt * 16 + g + half * 8; }
  __device__ int row(int nt, int j) const { return wn * Tile::WN + nt * 8 + t4 * 2 + j; }
};

// Calls f(ql, nl, e, mt, nt) for every accumulator element of this warp: local query ql, tile
// row nl, element e of fragment (mt, nt).
template <class Tile, class F>
__device__ __forceinline__ void for_each_fragment(F&& f) {
  const FragmentPos<Tile> at;
#pragma unroll
  for (int mt = 0; mt < Tile::MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int nt = 0; nt < Tile::NT; ++nt)
#pragma unroll
        for (int e = half * 2; e < half * 2 + 2; ++e) f(at.query(mt, half), at.row(nt, e & 1), e, mt, nt);
}

// row_max[wn * BQ + ql] = the largest of vals[ql][...] over this warp's columns of the tile.
template <class Tile>
__device__ __forceinline__ void fragment_row_max(const float* vals, int ld, float* row_max) {
  const FragmentPos<Tile> at;
#pragma unroll
  for (int mt = 0; mt < Tile::MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int ql = at.query(mt, half);
      float best = -__uint_as_float(0x7f800000u);
#pragma unroll
      for (int nt = 0; nt < Tile::NT; ++nt)
#pragma unroll
        for (int j = 0; j < 2; ++j) best = fmaxf(best, vals[ql * ld + at.row(nt, j)]);
      best = fmaxf(best, __shfl_xor_sync(topk::kFullMask, best, 1));  // the 4 lanes of row g
      best = fmaxf(best, __shfl_xor_sync(topk::kFullMask, best, 2));
      if (at.t4 == 0) row_max[at.wn * Tile::BQ + ql] = best;
    }
}

template <class T, int TERMS, class Tile, int K>
__global__ void __launch_bounds__(kThreads) search_mma(ScanArgs a) {
  constexpr int BQ = Tile::BQ, BK = Tile::BK, LD = Tile::LD, STAGES = Tile::STAGES;
  constexpr int STAGE = static_cast<int>(mma_stage_halves<Tile, TERMS>());
  unsigned char* smem = ptx::dynamic_smem();
  float* norm_part = reinterpret_cast<float*>(smem + align16(2 * STAGES * static_cast<size_t>(STAGE)));
  Selection<BQ, K> sel(reinterpret_cast<unsigned char*>(norm_part) + align16(sizeof(float) * 2 * kTileRows));
  const int tid = threadIdx.x;
  const ScanRange r = scan_range<BQ>(a);
  sel.init(a, r.q0, r.valid_q);

  float norm_acc = 0.0f;  // sum of squares of half a db row (position tid % kTileRows of the tile)
  const int norm_row = tid % kTileRows, norm_half = tid / kTileRows;
  const bool row_norms = a.cosine && a.db_inv_norms == nullptr;  // else precomputed
  auto on_stage = [&](int kt, const T* sb) {
    if (kt == 0) norm_acc = 0.0f;
    if (row_norms) {  // 16-byte reads: lanes take consecutive rows, LD keeps them conflict-free
      const uint4* p = reinterpret_cast<const uint4*>(sb + norm_row * LD + norm_half * (BK / 2));
#pragma unroll
      for (int v = 0; v < BK / 16; ++v) add_squares8<T>(norm_acc, p[v]);
    }
  };
  auto on_tile = [&](int tile, const float (&acc)[Tile::MT][Tile::NT][4]) {  // normalise, select
    const int64_t n0 = r.n_begin + static_cast<int64_t>(tile) * kTileRows;
    if (row_norms) norm_part[norm_half * kTileRows + norm_row] = norm_acc;
    __syncthreads();
    if (a.cosine && tid < kTileRows) sel.inv_norm[tid] = tile_inv_norm<T>(a, r, row_norms, norm_part, n0 + tid);
    __syncthreads();
    for_each_fragment<Tile>([&](int ql, int nl, int e, int mt, int nt) {
      float s = acc[mt][nt][e] * sel.qmul[ql];
      if (a.cosine) s *= sel.inv_norm[nl];
      sel.scores[ql * Selection<BQ, K>::kScoreLd + nl] = s;
    });
    __syncwarp();
    fragment_row_max<Tile>(sel.scores, Selection<BQ, K>::kScoreLd, sel.row_max);
    __syncthreads();
    sel.offer_tile(a, r.q0, r.valid_q, n0, r.n_end, Tile::WARPS_N, [&](int64_t p) { return r.row(p); });
    __syncthreads();
    return true;
  };
  mma_stream<MmaHalf<T>, TERMS, Tile>(static_cast<const T*>(a.qprep), a.Qpad, static_cast<const T*>(a.db),
                                      a.db_stride, a.D, a.Dpad, r, on_stage, on_tile);
  sel.finish(a, r.q0, r.valid_q);
}

// ---- 2b. SIMT scan: float32 db, unaligned rows, GPUs before sm_80 --------------------------------

constexpr int kSimtBQ = 32;  // queries per block: warp w scores queries 4w..4w+3
constexpr int kSimtBK = 32;

template <int K>
constexpr size_t simt_smem_bytes() {
  return align16(sizeof(float) * kSimtBK * (kSimtBQ + 1)) +
         align16(sizeof(float) * kSimtBK * (kTileRows + 1)) + Selection<kSimtBQ, K>::bytes();
}

template <class T, int K>
__global__ void __launch_bounds__(kThreads) search_simt(ScanArgs a) {
  constexpr int ALD = kSimtBQ + 1, BLD = kTileRows + 1;
  unsigned char* smem = ptx::dynamic_smem();
  float* sa = reinterpret_cast<float*>(smem);  // [kSimtBK][ALD], transposed queries
  float* sb = reinterpret_cast<float*>(smem + align16(sizeof(float) * kSimtBK * ALD));  // [kSimtBK][BLD]
  Selection<kSimtBQ, K> sel(reinterpret_cast<unsigned char*>(sb) + align16(sizeof(float) * kSimtBK * BLD));

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const ScanRange r = scan_range<kSimtBQ>(a);
  sel.init(a, r.q0, r.valid_q);
  const float* qf = static_cast<const float*>(a.qprep);
  const T* db = static_cast<const T*>(a.db);

#pragma unroll 1
  for (int tile = 0; tile < r.tiles; ++tile) {
    const int64_t n0 = r.n_begin + static_cast<int64_t>(tile) * kTileRows;
    float acc[4][4] = {};
    float norm_acc = 0.0f;
#pragma unroll 1
    for (int k0 = 0; k0 < a.D; k0 += kSimtBK) {
      __syncthreads();  // the previous chunk is consumed
      for (int i = tid; i < kSimtBQ * kSimtBK; i += kThreads) {
        const int ql = i / kSimtBK, kk = i % kSimtBK;
        sa[kk * ALD + ql] = qf[(r.q0 + ql) * a.Dpad + k0 + kk];
      }
      for (int i = tid; i < kTileRows * kSimtBK; i += kThreads) {
        const int row = i / kSimtBK, kk = i % kSimtBK;
        const int64_t n = n0 + row;
        const int col = k0 + kk;
        sb[kk * BLD + row] = (n < r.n_end && col < a.D) ? to_float<T>(db[n * a.db_stride + col]) : 0.0f;
      }
      __syncthreads();
      if (a.cosine && !a.db_inv_norms && tid < kTileRows)
        for (int kk = 0; kk < kSimtBK; ++kk) norm_acc += sb[kk * BLD + tid] * sb[kk * BLD + tid];
#pragma unroll 4
      for (int kk = 0; kk < kSimtBK; ++kk) {
        float qv[4], xv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) qv[i] = sa[kk * ALD + warp * 4 + i];
#pragma unroll
        for (int j = 0; j < 4; ++j) xv[j] = sb[kk * BLD + lane + 32 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(qv[i], xv[j], acc[i][j]);
      }
    }
    if (a.cosine && tid < kTileRows) {
      const int64_t n = n0 + tid;
      sel.inv_norm[tid] = n >= r.n_end ? 0.0f
                          : a.db_inv_norms ? a.db_inv_norms[n]
                                           : row_inv_norm<T>(norm_acc, db + n * a.db_stride, a.D);
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int ql = warp * 4 + i;
      float best = -__uint_as_float(0x7f800000u);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int nl = lane + 32 * j;
        float s = acc[i][j] * sel.qmul[ql];
        if (a.cosine) s *= sel.inv_norm[nl];
        sel.scores[ql * Selection<kSimtBQ, K>::kScoreLd + nl] = s;
        best = fmaxf(best, s);
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) best = fmaxf(best, __shfl_xor_sync(topk::kFullMask, best, off));
      if (lane == 0) sel.row_max[ql] = best;
    }
    __syncthreads();
    sel.offer_tile(a, r.q0, r.valid_q, n0, r.n_end, 1, [](int64_t p) { return p; });
    __syncthreads();
  }
  sel.finish(a, r.q0, r.valid_q);
}

// ---- 3. merge ------------------------------------------------------------------------------------

constexpr int kMergeSmemSlots = kWarps / 2;  // lists parked in shared memory per tree level

template <int K>
__host__ __device__ constexpr size_t merge_smem_bytes() {
  return sizeof(uint64_t) * K * kMergeSmemSlots;
}

// One block per query: warp w merges lists w, w + kWarps, ... (the next list's loads in flight
// while the current one merges), then the warps' results meet in a tree through shared memory.
// Writes the top k, best first; a non-finite query (qmul NaN) gets NaN scores and index -1.
template <int K>
__global__ void __launch_bounds__(kThreads) merge_lists(const uint64_t* __restrict__ lists, int splits,
                                                        const float* __restrict__ qmul, int k,
                                                        float* __restrict__ scores, int64_t* __restrict__ indices) {
  constexpr int KL = K / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x;
  const uint64_t* list = lists + row * splits * static_cast<int64_t>(K);
  uint64_t best[KL], next[KL];
#pragma unroll
  for (int j = 0; j < KL; ++j) best[j] = warp < splits ? list[warp * K + j * 32 + lane] : 0;
  if (warp + kWarps < splits) {
#pragma unroll
    for (int j = 0; j < KL; ++j) next[j] = list[(warp + kWarps) * K + j * 32 + lane];
  }
#pragma unroll 1
  for (int s = warp + kWarps; s < splits; s += kWarps) {
    uint64_t other[KL];
#pragma unroll
    for (int j = 0; j < KL; ++j) other[j] = next[j];
    if (s + kWarps < splits) {
#pragma unroll
      for (int j = 0; j < KL; ++j) next[j] = list[(s + kWarps) * K + j * 32 + lane];
    }
    topk::warp_merge_top<KL, KL>(best, other, lane);
  }
  uint64_t* parked = reinterpret_cast<uint64_t*>(ptx::dynamic_smem());  // [kMergeSmemSlots][K]
#pragma unroll 1
  for (int active = kWarps; active > 1; active /= 2) {
    const int half = active / 2;
    if (warp >= half && warp < active) {
#pragma unroll
      for (int j = 0; j < KL; ++j) parked[(warp - half) * K + j * 32 + lane] = best[j];
    }
    __syncthreads();
    if (warp < half) {
      uint64_t other[KL];
#pragma unroll
      for (int j = 0; j < KL; ++j) other[j] = parked[warp * K + j * 32 + lane];
      topk::warp_merge_top<KL, KL>(best, other, lane);
    }
    __syncthreads();
  }
  if (warp != 0) return;
  const bool bad = qmul[row] != qmul[row];  // NaN
#pragma unroll
  for (int j = 0; j < KL; ++j) {
    const int i = j * 32 + lane;
    if (i < k) {
      scores[row * k + i] = bad ? __uint_as_float(0x7fc00000u) : topk::key_score(best[j]);
      indices[row * k + i] = bad ? int64_t{-1} : topk::key_index(best[j]);
    }
  }
}

}  // namespace plm::cuda::kernels
