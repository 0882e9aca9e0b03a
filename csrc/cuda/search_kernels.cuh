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

// One warp per row: out[n] = 1/|x_n| (0 for a zero row), float32 sums of squares. VEC: rows are
// 16-byte aligned half/bfloat16 and D % 8 == 0, read 16 bytes per lane.
template <class T, bool VEC>
__global__ void __launch_bounds__(kThreads) db_inv_norms(const T* __restrict__ db, int64_t db_stride, int64_t N,
                                                         int D, float* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= N) return;
  const T* x = db + row * db_stride;
  float n2 = 0.0f;
  if constexpr (VEC) {
    for (int d = lane * 8; d < D; d += 32 * 8) add_squares8<T>(n2, *reinterpret_cast<const uint4*>(x + d));
  } else {
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

  // The list of local query ql in this block's split.
  __device__ static uint64_t* list_of(const ScanArgs& a, int64_t q0, int ql) {
    return a.lists + ((q0 + ql) * a.splits + blockIdx.y) * static_cast<int64_t>(K);
  }

  // Empties the lists and buffers of this block and loads the query multipliers.
  __device__ void init(const ScanArgs& a, int64_t q0, int valid_q) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int ql = warp; ql < valid_q; ql += kWarps) {
      uint64_t* list = list_of(a, q0, ql);
      for (int i = lane; i < K; i += 32) list[i] = 0;
    }
    for (int i = threadIdx.x; i < BQ; i += kThreads) {
      thresh[i] = 0;
      count[i] = 0;
      qmul[i] = a.qmul[q0 + i];
    }
    __syncthreads();
  }

  // Sorts query ql's buffer (n entries) into its list; returns the new threshold.
  __device__ uint64_t flush(const ScanArgs& a, int64_t q0, int ql, int n) {
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

  // Offers the score tile (rows n0 .. n0 + kTileRows, masked at n_end) to every valid query.
  // row_max[0 .. parts) hold each query's best score per part of the tile: a query whose best
  // does not beat its k-th best is skipped (equal scores lose too: this tile's rows come after
  // every row in the list).
  __device__ void offer_tile(const ScanArgs& a, int64_t q0, int valid_q, int64_t n0, int64_t n_end, int parts) {
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
        const int64_t idx = n0 + c0 + lane;
        const float s = row[c0 + lane];
        uint64_t key = 0;
        if (idx < n_end && topk::admissible(s)) key = topk::make_key(s, static_cast<uint32_t>(idx));
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
  __device__ void finish(const ScanArgs& a, int64_t q0, int valid_q) {
    const int warp = threadIdx.x / 32;
    for (int ql = warp; ql < valid_q; ql += kWarps)
      if (count[ql] > 0) flush(a, q0, ql, count[ql]);
  }
};

// Block geometry shared by the scan kernels.
struct ScanRange {
  int64_t q0;
  int valid_q;
  int64_t n_begin, n_end;
  int tiles;
};

template <int BQ>
__device__ __forceinline__ ScanRange scan_range(const ScanArgs& a) {
  ScanRange r;
  r.q0 = static_cast<int64_t>(blockIdx.x) * BQ;
  const int64_t left = a.Qc - r.q0;
  r.valid_q = left < BQ ? static_cast<int>(left) : BQ;
  r.n_begin = static_cast<int64_t>(blockIdx.y) * a.rows_per_split;
  const int64_t end = r.n_begin + a.rows_per_split;
  r.n_end = end < a.N ? end : a.N;
  r.tiles = r.n_end > r.n_begin ? static_cast<int>((r.n_end - r.n_begin + kTileRows - 1) / kTileRows) : 0;
  return r;
}

// 1/|x| of db row n (0 for a zero row): from this block's sums of squares (two halves per row in
// `parts`, row n - n0 at index tid) or from the precomputed norms. Rows past the range give 0.
template <class T>
__device__ __forceinline__ float tile_inv_norm(const ScanArgs& a, bool row_norms, const float* parts, int64_t n,
                                               int64_t n_end) {
  if (n >= n_end) return 0.0f;
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

template <class T, int TERMS, class Tile, int K>
__global__ void __launch_bounds__(kThreads) search_mma(ScanArgs a) {
  constexpr int BQ = Tile::BQ, BK = Tile::BK, LD = Tile::LD, STAGES = Tile::STAGES;
  constexpr int MT = Tile::MT, NT = Tile::NT;
  constexpr int STAGE = static_cast<int>(mma_stage_halves<Tile, TERMS>());
  constexpr int CHUNKS = BK / 8;  // 16-byte pieces per shared row
  unsigned char* smem = ptx::dynamic_smem();
  T* stages = reinterpret_cast<T*>(smem);
  float* norm_part = reinterpret_cast<float*>(smem + align16(2 * STAGES * static_cast<size_t>(STAGE)));
  Selection<BQ, K> sel(reinterpret_cast<unsigned char*>(norm_part) + align16(sizeof(float) * 2 * kTileRows));

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wq = warp / Tile::WARPS_N, wn = warp % Tile::WARPS_N;
  const ScanRange r = scan_range<BQ>(a);
  sel.init(a, r.q0, r.valid_q);

  const T* qplanes = static_cast<const T*>(a.qprep);
  const T* db = static_cast<const T*>(a.db);
  const int KT = a.Dpad / BK;

  // Stage `stage` <- columns [kt*BK, kt*BK + BK) of the query planes and of tile `tile`'s db
  // rows (rows past the range and columns past D read as zeros).
  auto load_chunk = [&](int tile, int kt, int stage) {
    const int64_t n0 = r.n_begin + static_cast<int64_t>(tile) * kTileRows;
    const int k0 = kt * BK;
    T* sa = stages + stage * STAGE;
    T* sb = sa + TERMS * BQ * LD;
    for (int i = tid; i < TERMS * BQ * CHUNKS; i += kThreads) {
      const int row = i / CHUNKS, piece = i % CHUNKS;
      const int term = row / BQ, ql = row % BQ;
      const T* src = qplanes + (term * a.Qpad + r.q0 + ql) * a.Dpad + k0 + piece * 8;
      ptx::cp_async16(sa + row * LD + piece * 8, src, true);
    }
    for (int i = tid; i < kTileRows * CHUNKS; i += kThreads) {
      const int row = i / CHUNKS, piece = i % CHUNKS;
      const int64_t n = n0 + row;
      const int col = k0 + piece * 8;
      const bool ok = n < r.n_end && col < a.D;
      ptx::cp_async16(sb + row * LD + piece * 8, ok ? db + n * a.db_stride + col : db, ok);
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

  float acc[MT][NT][4];
  float norm_acc = 0.0f;  // sum of squares of half a db row (row tid % kTileRows)
  const int norm_row = tid % kTileRows, norm_half = tid / kTileRows;
  const bool row_norms = a.cosine && a.db_inv_norms == nullptr;  // else precomputed

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
          for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;
      norm_acc = 0.0f;
    }
    const T* sa = stages + stage * STAGE;
    const T* sb = sa + TERMS * BQ * LD;

    if (row_norms) {  // 16-byte reads: lanes take consecutive rows, LD keeps them conflict-free
      const uint4* p = reinterpret_cast<const uint4*>(sb + norm_row * LD + norm_half * (BK / 2));
#pragma unroll
      for (int v = 0; v < BK / 16; ++v) add_squares8<T>(norm_acc, p[v]);
    }
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
          for (int term = 0; term < TERMS; ++term) ptx::mma_16816<T>(acc[mt][nt], af[term][mt], bf[nt]);
    }

    if (kt == KT - 1) {  // the tile is scored: normalise, select
      const int64_t n0 = r.n_begin + static_cast<int64_t>(tile) * kTileRows;
      if (row_norms) norm_part[norm_half * kTileRows + norm_row] = norm_acc;
      __syncthreads();
      if (a.cosine && tid < kTileRows) sel.inv_norm[tid] = tile_inv_norm<T>(a, row_norms, norm_part, n0 + tid, r.n_end);
      __syncthreads();
      const int g = lane / 4, t4 = lane % 4;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {  // rows g and g + 8 of the m tile
          const int ql = wq * Tile::WQ + mt * 16 + g + half * 8;
          float best = -__uint_as_float(0x7f800000u);
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = half * 2; e < half * 2 + 2; ++e) {
              const int nl = wn * Tile::WN + nt * 8 + t4 * 2 + (e & 1);
              float s = acc[mt][nt][e] * sel.qmul[ql];
              if (a.cosine) s *= sel.inv_norm[nl];
              sel.scores[ql * Selection<BQ, K>::kScoreLd + nl] = s;
              best = fmaxf(best, s);
            }
          best = fmaxf(best, __shfl_xor_sync(topk::kFullMask, best, 1));  // the 4 lanes of row g
          best = fmaxf(best, __shfl_xor_sync(topk::kFullMask, best, 2));
          if (t4 == 0) sel.row_max[wn * BQ + ql] = best;
        }
      __syncthreads();
      sel.offer_tile(a, r.q0, r.valid_q, n0, r.n_end, Tile::WARPS_N);
      __syncthreads();
    }
    if (++stage == STAGES) stage = 0;
    if (++kt == KT) {
      kt = 0;
      ++tile;
    }
  }
  ptx::cp_async_wait<0>();
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
    sel.offer_tile(a, r.q0, r.valid_q, n0, r.n_end, 1);
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
