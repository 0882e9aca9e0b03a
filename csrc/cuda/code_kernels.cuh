// Exact search from compact codes on the GPU (ARCHITECTURE.md, "Exact search from compact
// codes"): the int8 tensor-core scan that bounds every (query, row) score, and the kernels that
// turn the rows that can still win into per-query-tile lists for the exact rescoring (search_mma
// with ScanArgs::row_ids). Included by the CUDA build and by the host emulator tests, so nothing
// here may use the CUDA runtime API.
//
// Per chunk of queries (code_launch.cuh):
//   1. prep_queries (search_kernels.cuh) writes the float planes; prep_code_queries quantises
//      the query those planes score (q_eff = planes x qmul) to int8, with its bound terms.
//   2. scan_codes: block (query tile, db split) computes L <= S <= U for its rows from exact
//      int8 dot products, keeps its k best L (the Selection of the float scan) and publishes its
//      k-th best to the query's tau (atomicMax: every split's k-th best L is <= the k-th best
//      exact score); rows whose U reaches max(own, published) are marked in the tile's bitmap.
//      A tile whose marks pass `cap` (the bound cannot prune) stops and is searched in full.
//   3. compact_marks: the bitmap of each query tile -> its ascending row list.
//   4. search_mma over the lists (or every row where a list overflowed), merge_lists: the float
//      search's own arithmetic for every rescored pair, so its bits.
#pragma once
#include <cstdint>

#include "cuda/search_kernels.cuh"

namespace plm::cuda::kernels {

// The bound of codes.h with the row terms of device_codes (cpu::kBoundRelB etc.): every term
// evaluated in float32 with one rounding each (no contraction), as the proof assumes.
struct CodeBound {
  float lower, upper;
};
__device__ __forceinline__ CodeBound code_bound(int32_t dot, float cq, float kappa, float eq, float c,
                                                         float E, float beta) {
  const float A = __fmul_rn(__fmul_rn(cq, c), static_cast<float>(dot));
  const float B = __fadd_rn(__fmul_rn(kappa, E), __fmul_rn(eq, beta));
  const float Bw = __fadd_rn(__fadd_rn(__fmul_rn(B, 1.0f + 0x1p-16f), __fmul_rn(fabsf(A), 0x1p-15f)), 0x1p-100f);
  return {__fsub_rn(A, Bw), __fadd_rn(A, Bw)};
}

struct CodeScanArgs {
  const uint16_t* q8;     // [Qpad][Dpad] units (two int8 each): the queries' codes, zero-padded
  const float4* qcode;    // [Qpad]: cq, kappa, eq, and w = 0 where the bound cannot serve the query
  const uint16_t* codes;  // N rows of code units, code_stride apart (D units each)
  int64_t code_stride;
  const float* meta;      // [3][N]: c, E, beta of each row (device_codes)
  int64_t N;
  int D, Dpad;            // units
  int64_t Qc, Qpad;
  int64_t rows_per_split;
  int splits;
  uint64_t* lists;        // [Qpad][splits][K] keys of the k best lower bounds of each split
  unsigned long long* tau;  // [Qpad] the largest k-th best lower bound key of any split so far
  uint32_t* marks;        // [query tiles][words] bit n: row n may be in a query's top k
  int64_t words;
  int* marked;            // [query tiles] bits set in marks (past cap: the tile is searched in full)
  int cap;
  int k;
  const float* qmul;      // null (Selection reads no multipliers)
};

// One warp per query row of the chunk (Qpad rows, padding rows left valid and zero): q_eff =
// (sum of the TERMS planes) x qmul, the query the float search scores (exact in double: the
// planes' sum is, and one product with the float qmul rounds by 2^-53); cq = amax / 127,
// q8 = round(q_eff / cq) in [-127, 127], kappa >= ||q_eff||, eq >= ||q_eff - cq q8|| (+ kappa
// 2^-50 for that 2^-53 rounding). A query that is not finite, zero, or of norm outside
// [2^-40, 2^40] (the range of the float32 error analysis) gets w = 0.
// planes: [TERMS][plane_qpad][Dplane]; q8: [Qpad][Dcode] bytes; qcode: [Qpad].
template <class T, int TERMS>
__global__ void __launch_bounds__(kThreads) prep_code_queries(const T* __restrict__ planes, const float* __restrict__ qmul,
                                                              int64_t Qc, int64_t plane_qpad, int Dplane, int D,
                                                              int Dcode, int8_t* __restrict__ q8,
                                                              float4* __restrict__ qcode, int64_t Qpad) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= Qpad) return;
  const bool real = row < Qc;
  const double mul = real ? static_cast<double>(qmul[row]) : 0.0;
  auto element = [&](int d) {
    double v = 0.0;
#pragma unroll
    for (int t = 0; t < TERMS; ++t) v += static_cast<double>(to_float<T>(planes[(t * plane_qpad + row) * Dplane + d]));
    return v * mul;
  };
  double amax = 0.0, n2 = 0.0;
  for (int d = lane; d < D; d += 32) {
    const double v = real ? element(d) : 0.0;
    amax = fmax(amax, fabs(v));
    n2 += v * v;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    amax = fmax(amax, __shfl_xor_sync(topk::kFullMask, amax, off));
    n2 += __shfl_xor_sync(topk::kFullMask, n2, off);
  }
  const double norm = sqrt(n2);
  float cq = static_cast<float>(amax / 127.0);
  const bool usable = real && mul == mul && norm >= 0x1p-40 && norm <= 0x1p40 && cq > 0.0f;
  if (!usable) cq = 0.0f;
  double e2 = 0.0;
  for (int d = lane; d < Dcode; d += 32) {
    double c = 0.0;
    if (usable && d < D) {
      const double v = element(d);
      c = fmin(fmax(rint(v / cq), -127.0), 127.0);
      const double rest = v - static_cast<double>(cq) * c;  // cq * c exact: 24 x 8 bits
      e2 += rest * rest;
    }
    q8[row * Dcode + d] = static_cast<int8_t>(c);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) e2 += __shfl_xor_sync(topk::kFullMask, e2, off);
  if (lane == 0) {
    // Rounded up (the double sums' own rounding is below D 2^-52, far inside 2^-30).
    const double kappa = norm * (1.0 + 0x1p-30);
    const double eq = sqrt(e2) * (1.0 + 0x1p-30) + kappa * 0x1p-50;
    auto up = [](double x) {
      const float f = static_cast<float>(x);
      return static_cast<double>(f) >= x ? f : nextafterf(f, __uint_as_float(0x7f800000u));
    };
    qcode[row] = usable ? make_float4(cq, up(kappa), up(eq), 1.0f)
                        : make_float4(0.0f, 0.0f, 0.0f, real ? 0.0f : 1.0f);
  }
}

// Fills n words with zero (the scan's marks, counts and thresholds, per chunk). The kernels
// here are templates so that every translation unit including this header may instantiate them.
template <class W>
__global__ void __launch_bounds__(kThreads) fill_zero(W* __restrict__ p, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) p[i] = 0;
}

template <class Tile, int K>
__host__ __device__ constexpr size_t code_smem_bytes() {
  return align16(2 * Tile::STAGES * mma_stage_halves<Tile, 1>()) + Selection<Tile::BQ, K>::bytes() +
         align16(sizeof(float) * Tile::BQ * Selection<Tile::BQ, K>::kScoreLd) +  // upper bounds
         align16(sizeof(float) * 3 * kTileRows) + align16(sizeof(float4) * Tile::BQ) + 16;
}

template <class Tile, int K>
__global__ void __launch_bounds__(kThreads) scan_codes(CodeScanArgs a) {
  constexpr int BQ = Tile::BQ, STAGES = Tile::STAGES;
  constexpr int LDS = Selection<BQ, K>::kScoreLd;
  unsigned char* smem = ptx::dynamic_smem();
  unsigned char* p = smem + align16(2 * STAGES * mma_stage_halves<Tile, 1>());
  Selection<BQ, K> sel(p);
  p += Selection<BQ, K>::bytes();
  float* upper = reinterpret_cast<float*>(p);  // [BQ][LDS]
  p += align16(sizeof(float) * BQ * LDS);
  float* row_meta = reinterpret_cast<float*>(p);  // [3][kTileRows]: c, E, beta
  p += align16(sizeof(float) * 3 * kTileRows);
  float4* qc = reinterpret_cast<float4*>(p);  // [BQ]
  p += align16(sizeof(float4) * BQ);
  int* go_on = reinterpret_cast<int*>(p);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const ScanRange r = scan_range<BQ>(a);
  const int64_t qtile = blockIdx.x;
  int* marked = a.marked + qtile;
  uint32_t* marks = a.marks + qtile * a.words;
  bool usable = true;
  for (int ql = 0; ql < r.valid_q; ++ql) usable = usable && a.qcode[r.q0 + ql].w != 0.0f;
  if (!usable) {  // the same in every thread: the tile is searched in full
    if (tid == 0) atomicMax(marked, a.cap + 1);
    return;
  }
  sel.init(a, r.q0, r.valid_q);
  for (int i = tid; i < BQ; i += kThreads) qc[i] = a.qcode[r.q0 + i];

  auto on_stage = [](int, const uint16_t*) {};
  auto on_tile = [&](int tile, const int32_t (&acc)[Tile::MT][Tile::NT][4]) {
    const int64_t n0 = r.n_begin + static_cast<int64_t>(tile) * kTileRows;
    if (tid < kTileRows) {
      const int64_t n = n0 + tid;
      const bool in = n < r.n_end;
      for (int f = 0; f < 3; ++f) row_meta[f * kTileRows + tid] = in ? a.meta[f * a.N + n] : 0.0f;
    }
    __syncthreads();
    for_each_fragment<Tile>([&](int ql, int nl, int e, int mt, int nt) {
      const float4 q = qc[ql];
      const CodeBound b = code_bound(acc[mt][nt][e], q.x, q.y, q.z, row_meta[nl], row_meta[kTileRows + nl],
                                     row_meta[2 * kTileRows + nl]);
      sel.scores[ql * LDS + nl] = b.lower;
      upper[ql * LDS + nl] = b.upper;
    });
    __syncwarp();
    fragment_row_max<Tile>(sel.scores, LDS, sel.row_max);
    __syncthreads();
    sel.offer_tile(a, r.q0, r.valid_q, n0, r.n_end, Tile::WARPS_N, [](int64_t n) { return n; });
    __syncthreads();
    // Publish each query's k-th best lower bound; mark the rows whose upper bound reaches the
    // best threshold known (>=: ties stay; a NaN bound marks its row too).
    for (int ql = warp; ql < r.valid_q; ql += kWarps) {
      const uint64_t own = sel.thresh[ql];
      unsigned long long* shared_tau = a.tau + r.q0 + ql;
      if (own != 0 && lane == 0) atomicMax(shared_tau, static_cast<unsigned long long>(own));
      __syncwarp();
      const uint64_t best = topk::kmax(own, *static_cast<volatile unsigned long long*>(shared_tau));
      const float thr = topk::key_score(best);  // -inf while no split has k rows
      for (int c0 = 0; c0 < kTileRows; c0 += 32) {
        const int64_t n = n0 + c0 + lane;
        const bool hit = n < r.n_end && !(upper[ql * LDS + c0 + lane] < thr);
        const unsigned m = __ballot_sync(topk::kFullMask, hit);
        if (m != 0 && lane == 0) {  // n0 is a multiple of 32: one word holds the 32 rows
          const uint32_t old = atomicOr(marks + (n0 + c0) / 32, m);
          const int fresh = __popc(m & ~old);
          if (fresh) atomicAdd(marked, fresh);
        }
      }
    }
    __syncthreads();
    if (tid == 0) *go_on = *static_cast<volatile int*>(marked) <= a.cap;
    __syncthreads();
    return *go_on != 0;
  };
  mma_stream<MmaInt8, 1, Tile>(a.q8, a.Qpad, a.codes, a.code_stride, a.D, a.Dpad, r, on_stage, on_tile);
}

// One block per query tile: its bitmap -> row_ids[tile] (ascending) and row_counts[tile], or
// row_counts[tile] = -1 where the marks passed cap (every row is rescored).
template <int THREADS>
__global__ void __launch_bounds__(THREADS) compact_marks(const uint32_t* __restrict__ marks, int64_t words,
                                                          const int* __restrict__ marked, int cap,
                                                          int32_t* __restrict__ row_ids, int64_t ids_stride,
                                                          int32_t* __restrict__ row_counts) {
  __shared__ int offsets[THREADS + 1];
  const int64_t tile = blockIdx.x;
  const int tid = threadIdx.x;
  if (marked[tile] > cap) {
    if (tid == 0) row_counts[tile] = -1;
    return;
  }
  const uint32_t* m = marks + tile * words;
  const int64_t per = (words + THREADS - 1) / THREADS;
  const int64_t w0 = tid * per, w1 = w0 + per < words ? w0 + per : words;
  int count = 0;
  for (int64_t w = w0; w < w1; ++w) count += __popc(m[w]);
  offsets[tid + 1] = count;
  __syncthreads();
  if (tid == 0) {
    offsets[0] = 0;
    for (int i = 1; i <= THREADS; ++i) offsets[i] += offsets[i - 1];
    row_counts[tile] = offsets[THREADS];
  }
  __syncthreads();
  int32_t* out = row_ids + tile * ids_stride + offsets[tid];
  for (int64_t w = w0; w < w1; ++w)
    for (uint32_t bits = m[w]; bits != 0; bits &= bits - 1)
      *out++ = static_cast<int32_t>(w * 32 + __ffs(bits) - 1);
}

}  // namespace plm::cuda::kernels
