// Search and GeM inner loops for one instruction set (see kernels.h). CMake compiles this file
// once per ISA with PLM_ISA_NS naming the namespace; nothing here allocates or throws.
#include "cpu/kernels.h"

#include <cstdint>

#if defined(PLM_ISA_avx512) || defined(PLM_ISA_avx2)
#include <immintrin.h>  // before the namespace: simd.h is included inside it
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

#ifndef PLM_ISA_NS
#error "PLM_ISA_NS must name the ISA namespace"
#endif
#define PLM_CAT2(a, b) a##b
#define PLM_CAT(a, b) PLM_CAT2(a, b)

namespace plm::cpu {
namespace PLM_ISA_NS {

#include "cpu/simd.h"

// ---- packing ------------------------------------------------------------------------------

template <int DT>
static void pack_rows_t(const void* src, int64_t row_stride, int64_t rows, int64_t D, int64_t Dp,
                        float* dst, float* inv_norms) {
  const int64_t esize = elem_size<DT>();
  const int64_t full = D - D % W;
  for (int64_t r = 0; r < rows; ++r) {
    const void* row = static_cast<const unsigned char*>(src) + r * row_stride * esize;
    float* out = dst + r * Dp;
    vf sq = vf{};
    int64_t d = 0;
    for (; d < full; d += W) {
      vf v = load_as_float<DT>(row, d);
      sq += v * v;
      vstore(out + d, v);
    }
    if (d < D) {
      vf v = load_tail<DT>(row, d, D - d);
      sq += v * v;
      vstore(out + d, v);
      d += W;
    }
    for (; d < Dp; d += W) vstore(out + d, vf{});
    if (inv_norms) inv_norms[r] = inv_norm_or_redo<DT == 1>(hsum(sq));
  }
}

static void pack_rows(const void* src, DType dt, int64_t row_stride, int64_t rows, int64_t D,
                      int64_t Dp, float* dst, float* inv_norms) {
  switch (dt) {
    case DType::f16: return pack_rows_t<1>(src, row_stride, rows, D, Dp, dst, inv_norms);
    case DType::bf16: return pack_rows_t<2>(src, row_stride, rows, D, Dp, dst, inv_norms);
    default: return pack_rows_t<0>(src, row_stride, rows, D, Dp, dst, inv_norms);
  }
}

// ---- dot-product micro-kernels --------------------------------------------------------------
// MR queries x NR rows of accumulators, each a vector over d; reduced once at the end.
#if PLM_W == 16
constexpr int kTileMR = 6, kTileNR = 4;
#else
constexpr int kTileMR = 3, kTileNR = 3;
#endif

template <int MR, int NR>
static inline void micro_tile(const float* const* q, const float* const* t, int64_t Dp,
                              float* out, int64_t ld, int64_t mr, int64_t nr) {
  vf acc[MR][NR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[i][j] = vf{};
  for (int64_t d = 0; d < Dp; d += W) {
    vf b[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) b[j] = vload(t[j] + d);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      vf a = vload(q[i] + d);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[i][j] += a * b[j];
    }
  }
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j) out[i * ld + j] = hsum(acc[i][j]);
}

static void scores_tile(const float* q, int64_t nq, const float* tile, int64_t nt, int64_t Dp,
                        float* out) {
  for (int64_t i0 = 0; i0 < nq; i0 += kTileMR) {
    const int64_t mr = imin(kTileMR, nq - i0);
    const float* qr[kTileMR];
    for (int i = 0; i < kTileMR; ++i) qr[i] = q + (i0 + (i < mr ? i : 0)) * Dp;
    for (int64_t j0 = 0; j0 < nt; j0 += kTileNR) {
      const int64_t nr = imin(kTileNR, nt - j0);
      const float* tr[kTileNR];
      for (int j = 0; j < kTileNR; ++j) tr[j] = tile + (j0 + (j < nr ? j : 0)) * Dp;
      micro_tile<kTileMR, kTileNR>(qr, tr, Dp, out + i0 * nt + j0, nt, mr, nr);
    }
  }
}

// Few queries: stream the db rows once, converting on the fly, with the row norms in the same pass.
// AVX2 takes up to 16 this way (groups of queries over 3 rows held in L1, see
// scores_direct_groups): packing panels would cost as much as the FMAs at so few queries.
#if PLM_W == 8
constexpr int kDirectMaxQ = 16;
#else
constexpr int kDirectMaxQ = 4;
#endif
// Rows streamed at once: more rows keep more memory requests in flight, fewer leave registers
// for more queries.
// AVX2 has 16 ymm registers: MR x NR accumulators + NR row norms + NR rows + 1 query must fit,
// or an accumulator spills and its FMA chain goes through memory.
template <int MR>
constexpr int direct_nr() {
#if PLM_W == 8
  return MR == 1 ? 4 : 3;
#else
  return MR == 1 ? 8 : 4;
#endif
}
// AVX2 and AVX-512 take the NR rows scored together from NR far-apart places of the call's rows
// (NR long sequential streams, which the hardware prefetchers follow without software
// prefetch), not from NR neighbouring rows (NR streams of one row each, which they barely start
// on). Zen 3 (AVX2), 2 threads, N = 200,000 x 1024 float16, one query: 20.3 ms against 27.1 ms
// for neighbouring rows with software prefetch, and 18.6 ms for a plain read of the same bytes
// (benchmarks/RESULTS.md, issue 17, run 5). Sapphire Rapids (AVX-512), same sizes: 15.0 ms
// against 18.2 ms, 1.04x the 4-stream read floor; Q = 2 and 4 1.27x faster (issue 27).
#if PLM_W >= 8
constexpr bool kDirectStreams = true;
#else
constexpr bool kDirectStreams = false;
#endif
// Software prefetch distance in elements (measured on Zen 5: ~25% more bandwidth than none).
constexpr int64_t kPrefetchAhead = 256;

// The lambdas of the direct kernels are called from a few places each; a call per vector step
// would cost more than its FMAs.
#define PLM_INLINE __attribute__((always_inline))

// Independent FMA chains per accumulator: 2 when MR x NR (+ NR norms) accumulators are too few
// to cover the FMA latency (4 cycles x 2 ports) and twice as many still fit the registers.
template <int MR, int NR, bool NORMS>
constexpr int direct_chains() {
  constexpr int acc = MR * NR + (NORMS ? NR : 0);
  return acc < 8 && 2 * acc + NR + 1 <= 15 ? 2 : 1;
}

// Scores MR queries (q, Dp apart) against rows[0, NR) (D elements each); row j's scores go to
// out[i * ld + j * jstep], its inverse norm to inv_norms[j * jstep], for j < nr only.
template <int DT, int MR, int NR, bool NORMS>
static inline void micro_direct(const float* q, int64_t Dp, const void* const* rows, int64_t D,
                                float* out, int64_t ld, int64_t nr, float* inv_norms,
                                int64_t pf_bytes, int64_t jstep) {
  constexpr int CH = direct_chains<MR, NR, NORMS>();
  vf acc[CH][MR][NR];
  vf sq[CH][NR];
#pragma GCC unroll 8
  for (int c = 0; c < CH; ++c)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      sq[c][j] = vf{};
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) acc[c][i][j] = vf{};
    }
  auto step = [&](int c, int64_t d, const vf* b) PLM_INLINE {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      vf a = vload(q + i * Dp + d);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[c][i][j] += a * b[j];
    }
    if (NORMS) {
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) sq[c][j] += b[j] * b[j];
    }
  };
  auto load = [&](int64_t d, vf* b) PLM_INLINE {
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      // AVX2: one prefetch per 64-byte line, not one per vector (load slots are scarcer there)
      if (pf_bytes && (PLM_W != 8 || ((d * elem_size<DT>()) & 63) == 0))
        __builtin_prefetch(static_cast<const char*>(rows[j]) + d * elem_size<DT>() + pf_bytes);
      b[j] = load_as_float<DT>(rows[j], d);
    }
  };
  const int64_t full = D - D % (CH * W);
  int64_t d = 0;
  for (; d < full; d += CH * W) {
#pragma GCC unroll 2
    for (int c = 0; c < CH; ++c) {
      vf b[NR];
      load(d + c * W, b);
      step(c, d + c * W, b);
    }
  }
  for (; d + W <= D; d += W) {  // CH = 2: one whole vector left
    vf b[NR];
    load(d, b);
    step(0, d, b);
  }
  if (d < D) {
    vf b[NR];
    for (int j = 0; j < NR; ++j) b[j] = load_tail<DT>(rows[j], d, D - d);
    step(0, d, b);
  }
  for (int j = 0; j < nr; ++j) {
    for (int i = 0; i < MR; ++i) {
      vf s = acc[0][i][j];
      for (int c = 1; c < CH; ++c) s += acc[c][i][j];
      out[i * ld + j * jstep] = hsum(s);
    }
    if (NORMS) {
      vf s = sq[0][j];
      for (int c = 1; c < CH; ++c) s += sq[c][j];
      inv_norms[j * jstep] = inv_norm_or_redo<DT == 1>(hsum(s));
    }
  }
}

// Software prefetch offset, bytes from the element being read: none on AVX2 (its rows come as
// long streams, see kDirectStreams), a fixed distance along the row on the others.
template <int DT>
static inline int64_t direct_prefetch_bytes() {
  return kDirectStreams ? 0 : kPrefetchAhead * elem_size<DT>();
}

// Calls score(rows, col, nr, jstep) for blocks of NR of the nt rows at base (row_bytes apart)
// that together cover each row once: row j of a block is row col + j * jstep, for j < nr (the
// other pointers repeat a valid row). Long streams (kDirectStreams): the rows are cut in NR
// equal runs, block t takes row t of each, and the few left over form one last block.
template <int NR, class Score>
static inline void for_row_blocks(const unsigned char* base, int64_t row_bytes, int64_t nt,
                                  Score&& score) {
  const void* rows[NR];
  const int64_t run = kDirectStreams ? nt / NR : 0;
  for (int64_t t = 0; t < run; ++t) {
    for (int j = 0; j < NR; ++j) rows[j] = base + (t + j * run) * row_bytes;
    score(rows, t, static_cast<int64_t>(NR), run);
  }
  for (int64_t j0 = NR * run; j0 < nt; j0 += NR) {
    const int64_t nr = imin(NR, nt - j0);
    for (int j = 0; j < NR; ++j) rows[j] = base + (j0 + (j < nr ? j : 0)) * row_bytes;
    score(rows, j0, nr, int64_t{1});
  }
}

template <int DT, int MR, bool NORMS>
static void scores_direct_t(const float* q, const void* db, int64_t row_stride, int64_t nt,
                            int64_t D, float* out, float* inv_norms) {
  constexpr int NR = direct_nr<MR>();
  const int64_t Dp = padded_dim(D);
  const int64_t pf = direct_prefetch_bytes<DT>();
  for_row_blocks<NR>(static_cast<const unsigned char*>(db), row_stride * elem_size<DT>(), nt,
                     [&](const void* const* rows, int64_t col, int64_t nr, int64_t jstep) PLM_INLINE {
                       micro_direct<DT, MR, NR, NORMS>(q, Dp, rows, D, out + col, nt, nr,
                                                       NORMS ? inv_norms + col : nullptr, pf, jstep);
                     });
}

#if PLM_W == 8
// 4..16 queries: for each 3 rows (6 KiB of float16, read from memory once, then from L1), the
// first 3 queries with the row norms (9 + 3 accumulators + 3 rows + 1 query: the 16 ymm
// registers), then the rest 4 at a time (12 accumulators + 3 rows + 1 query); a last group of
// one query runs 2 FMA chains per accumulator (direct_chains).
template <int DT, int MR, bool NORMS>
static inline void direct_group(const float* q, int64_t Dp, const void* const* rows, int64_t D,
                                float* out, int64_t ld, int64_t nr, float* inv_norms,
                                int64_t jstep) {
  micro_direct<DT, MR, 3, NORMS>(q, Dp, rows, D, out, ld, nr, inv_norms, 0, jstep);
}

template <int DT>
static void scores_direct_groups(const float* q, int64_t nq, const void* db, int64_t row_stride,
                                 int64_t nt, int64_t D, float* out, float* inv_norms) {
  const int64_t Dp = padded_dim(D);
  for_row_blocks<3>(static_cast<const unsigned char*>(db), row_stride * elem_size<DT>(), nt,
                    [&](const void* const* rows, int64_t col, int64_t nr, int64_t jstep) PLM_INLINE {
    float* o = out + col;
    if (inv_norms) direct_group<DT, 3, true>(q, Dp, rows, D, o, nt, nr, inv_norms + col, jstep);
    else direct_group<DT, 3, false>(q, Dp, rows, D, o, nt, nr, nullptr, jstep);
    for (int64_t i = 3; i < nq; i += 4) {
      const float* qi = q + i * Dp;
      float* oi = o + i * nt;
      switch (imin(4, nq - i)) {
        case 4: direct_group<DT, 4, false>(qi, Dp, rows, D, oi, nt, nr, nullptr, jstep); break;
        case 3: direct_group<DT, 3, false>(qi, Dp, rows, D, oi, nt, nr, nullptr, jstep); break;
        case 2: direct_group<DT, 2, false>(qi, Dp, rows, D, oi, nt, nr, nullptr, jstep); break;
        default: direct_group<DT, 1, false>(qi, Dp, rows, D, oi, nt, nr, nullptr, jstep); break;
      }
    }
  });
}
#endif

template <int DT>
static void scores_direct_dt(const float* q, int64_t nq, const void* db, int64_t row_stride,
                             int64_t nt, int64_t D, float* out, float* inv_norms) {
#define PLM_DIRECT_CASE(MR)                                                                 \
  case MR:                                                                                  \
    return inv_norms ? scores_direct_t<DT, MR, true>(q, db, row_stride, nt, D, out, inv_norms) \
                     : scores_direct_t<DT, MR, false>(q, db, row_stride, nt, D, out, nullptr);
  switch (nq) {
    PLM_DIRECT_CASE(1)
    PLM_DIRECT_CASE(2)
    PLM_DIRECT_CASE(3)
#if PLM_W != 8
    PLM_DIRECT_CASE(4)
#endif
    default:
#if PLM_W == 8
      if (nq <= kDirectMaxQ) scores_direct_groups<DT>(q, nq, db, row_stride, nt, D, out, inv_norms);
#endif
      return;
  }
#undef PLM_DIRECT_CASE
}

static void scores_direct(const float* q, int64_t nq, const void* db, DType dt,
                          int64_t row_stride, int64_t nt, int64_t D, float* out,
                          float* inv_norms) {
  switch (dt) {
    case DType::f16: return scores_direct_dt<1>(q, nq, db, row_stride, nt, D, out, inv_norms);
    case DType::bf16: return scores_direct_dt<2>(q, nq, db, row_stride, nt, D, out, inv_norms);
    default: return scores_direct_dt<0>(q, nq, db, row_stride, nt, D, out, inv_norms);
  }
}

// ---- register-blocked many-query scoring (AVX2) ---------------------------------------------
// GEMM-style: C (queries x rows) accumulates outer products of a broadcast query element and a
// vector of 8 db rows. A 6 x 16 tile holds 12 accumulators, 2 db vectors and 1 broadcast in
// 15 of the 16 ymm registers, and does 12 FMAs per 2 loads + 6 broadcasts (from L1). The db
// tile is converted to float32 and transposed into 16-row panels once per tile (amortised over
// every query of the block), the queries into 6-query panels once per block. d is split into
// kBlockKC slices: one db panel slice (KC x 16 floats, 16 KiB) stays in L1 while the queries'
// slice (nq x KC floats, <= ~256 KiB for the search's query blocks) streams from L2. Each slice
// starts its accumulators at zero and is added to C, so no float32 sum runs over more than
// kBlockKC products (the error bound of the lane-split dot products it replaces).
#if PLM_W == 8
#define PLM_HAVE_BLOCKED 1
constexpr int kBlockMR = 6, kBlockNR = 16;
constexpr int64_t kBlockKC = 256;

// Layout: d slices of kBlockKC, each holding every panel's kc x 6 block in turn, so that the
// micro-kernel calls of one slice read the queries as one sequential stream.
static void pack_query_panels(const float* q, int64_t nq, int64_t Dp, float* dst) {
  const int64_t panels = (nq + kBlockMR - 1) / kBlockMR;
  for (int64_t k0 = 0; k0 < Dp; k0 += kBlockKC) {
    const int64_t kc = imin(kBlockKC, Dp - k0);
    for (int64_t p = 0; p < panels; ++p) {
      float* out = dst + k0 * panels * kBlockMR + p * kc * kBlockMR;
      for (int i = 0; i < kBlockMR; ++i) {
        const int64_t row = p * kBlockMR + i;
        for (int64_t d = 0; d < kc; ++d) out[d * kBlockMR + i] = row < nq ? q[row * Dp + k0 + d] : 0.0f;
      }
    }
  }
}

__attribute__((always_inline)) static inline void transpose8(__m256* r) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// nt rows -> ceil(nt / 16) panels of Dp x 16 floats (d-major; rows past nt and d past D zero),
// with each row's 1/norm from the same values (4 partial sums per row, d mod 4 apart).
template <int DT>
static void pack_db_panels_t(const void* db, int64_t row_stride, int64_t nt, int64_t D, int64_t Dp,
                             float* dst, float* inv_norms) {
  const auto* base = static_cast<const unsigned char*>(db);
  const int64_t row_bytes = row_stride * elem_size<DT>();
  const int64_t panels = (nt + kBlockNR - 1) / kBlockNR;
  const int64_t full = D - D % W;
  for (int64_t p = 0; p < panels; ++p) {
    float* out = dst + p * Dp * kBlockNR;
    for (int h = 0; h < kBlockNR / W; ++h) {
      const int64_t r0 = p * kBlockNR + h * W;
      const int64_t valid = imin(W, nt - r0);  // may be <= 0 for the last panel's upper half
      const void* rows[W];
      for (int r = 0; r < W; ++r) rows[r] = base + (r0 + (r < valid ? r : 0)) * row_bytes;
      vf sq[4] = {};
      int64_t d = 0;
      if (valid == W) {  // the common case, without per-row and per-column tests
        for (; d < full; d += W) {
          __m256 v[W];
#pragma GCC unroll 8
          for (int r = 0; r < W; ++r) {
            __builtin_prefetch(static_cast<const char*>(rows[r]) + (d + kPrefetchAhead) * elem_size<DT>());
            v[r] = (__m256)load_as_float<DT>(rows[r], d);
          }
          transpose8(v);
#pragma GCC unroll 8
          for (int l = 0; l < W; ++l) {
            vf c = (vf)v[l];
            vstore(out + (d + l) * kBlockNR + h * W, c);
            sq[l & 3] += c * c;
          }
        }
      }
      for (; d < Dp; d += W) {
        __m256 v[W];
        for (int r = 0; r < W; ++r) {
          vf x = vf{};
          if (r < valid) {
            if (d < full) {
              __builtin_prefetch(static_cast<const char*>(rows[r]) + (d + kPrefetchAhead) * elem_size<DT>());
              x = load_as_float<DT>(rows[r], d);
            } else if (d < D) {
              x = load_tail<DT>(rows[r], d, D - d);
            }
          }
          v[r] = (__m256)x;
        }
        transpose8(v);
        for (int l = 0; l < W; ++l) {
          vf c = (vf)v[l];
          vstore(out + (d + l) * kBlockNR + h * W, c);
          sq[l & 3] += c * c;
        }
      }
      if (inv_norms) {
        vf n2 = (sq[0] + sq[2]) + (sq[1] + sq[3]);
        for (int64_t r = 0; r < valid; ++r) inv_norms[r0 + r] = inv_norm_or_redo<DT == 1>(n2[r]);
      }
    }
  }
}

// C[0..6) x [0..16) (+)= A (kc x 6, d-major) times B (kc x 16, d-major).
static inline void micro_block(const float* __restrict a, const float* __restrict b, int64_t kc,
                               float* c, int64_t ld, bool first) {
  vf acc[kBlockMR][2];
#pragma GCC unroll 8
  for (int i = 0; i < kBlockMR; ++i) acc[i][0] = acc[i][1] = vf{};
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const vf b0 = vload(b + k * kBlockNR), b1 = vload(b + k * kBlockNR + W);
#pragma GCC unroll 8
    for (int i = 0; i < kBlockMR; ++i) {
      const vf ai = (vf)_mm256_broadcast_ss(a + k * kBlockMR + i);  // a load, not an add + shuffle
      acc[i][0] += ai * b0;
      acc[i][1] += ai * b1;
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < kBlockMR; ++i) {
    float* ci = c + i * ld;
    if (first) {
      vstore(ci, acc[i][0]);
      vstore(ci + W, acc[i][1]);
    } else {
      vstore(ci, vload(ci) + acc[i][0]);
      vstore(ci + W, vload(ci + W) + acc[i][1]);
    }
  }
}

// Pulls the next tile's rows into L2 a few lines at a time while this tile is scored, so that
// packing it reads L2 instead of waiting on memory.
struct TilePrefetcher {
  const unsigned char* row;
  int64_t row_bytes, line_bytes, rows_left, off = 0;
  void step(int64_t lines) {
    for (; lines > 0 && rows_left > 0; --lines) {
      _mm_prefetch(reinterpret_cast<const char*>(row + off), _MM_HINT_T1);
      off += 64;
      if (off >= line_bytes) {
        off = 0;
        row += row_bytes;
        --rows_left;
      }
    }
  }
};

static void scores_block(const float* qp, int64_t nq, const void* db, DType dt, int64_t row_stride,
                         int64_t nt, int64_t D, float* out, int64_t ld, float* inv_norms,
                         float* work, const void* next, int64_t next_nt) {
  const int64_t Dp = padded_dim(D);
  switch (dt) {
    case DType::f16: pack_db_panels_t<1>(db, row_stride, nt, D, Dp, work, inv_norms); break;
    case DType::bf16: pack_db_panels_t<2>(db, row_stride, nt, D, Dp, work, inv_norms); break;
    default: pack_db_panels_t<0>(db, row_stride, nt, D, Dp, work, inv_norms); break;
  }
  const int64_t qpanels = (nq + kBlockMR - 1) / kBlockMR;
  const int64_t dpanels = (nt + kBlockNR - 1) / kBlockNR;
  const int64_t esize = dt == DType::f32 ? 4 : 2;
  TilePrefetcher pf{static_cast<const unsigned char*>(next), row_stride * esize, D * esize,
                    next ? next_nt : 0};
  const int64_t calls = qpanels * dpanels * ((Dp + kBlockKC - 1) / kBlockKC);
  const int64_t per_call = (next_nt * ((D * esize + 63) / 64) + calls - 1) / calls;
  for (int64_t k0 = 0; k0 < Dp; k0 += kBlockKC) {
    const int64_t kc = imin(kBlockKC, Dp - k0);
    for (int64_t jp = 0; jp < dpanels; ++jp) {
      const float* b = work + (jp * Dp + k0) * kBlockNR;
      for (int64_t ip = 0; ip < qpanels; ++ip) {
        pf.step(per_call);
        micro_block(qp + (k0 * qpanels + ip * kc) * kBlockMR, b, kc, out + ip * kBlockMR * ld + jp * kBlockNR,
                    ld, k0 == 0);
      }
    }
  }
}
// C[0..16) (+)= A (kc x 6, d-major; query 0 only) times B (kc x 16): micro_block's arithmetic for
// one query, so that each (query, row) pair gets the same float32 operations in the same order.
static inline void micro_block_one(const float* __restrict a, const float* __restrict b, int64_t kc, float* c,
                                   bool first) {
  vf acc0 = vf{}, acc1 = vf{};
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const vf b0 = vload(b + k * kBlockNR), b1 = vload(b + k * kBlockNR + W);
    const vf ai = (vf)_mm256_broadcast_ss(a + k * kBlockMR);
    acc0 += ai * b0;
    acc1 += ai * b1;
  }
  if (first) {
    vstore(c, acc0);
    vstore(c + W, acc1);
  } else {
    vstore(c, vload(c) + acc0);
    vstore(c + W, vload(c + W) + acc1);
  }
}
#endif  // PLM_W == 8

#if defined(PLM_HAVE_BLOCKED)
static void scores_one_block(const float* q, const void* db, DType dt, int64_t row_stride, int64_t nt, int64_t D,
                             float* out, float* inv_norms, float* work) {
  const int64_t Dp = padded_dim(D);
  float* qp = work;
  float* panels = work + Dp * kBlockMR;
  pack_query_panels(q, 1, Dp, qp);
  switch (dt) {
    case DType::f16: pack_db_panels_t<1>(db, row_stride, nt, D, Dp, panels, inv_norms); break;
    case DType::bf16: pack_db_panels_t<2>(db, row_stride, nt, D, Dp, panels, inv_norms); break;
    default: pack_db_panels_t<0>(db, row_stride, nt, D, Dp, panels, inv_norms); break;
  }
  alignas(64) float c[kBlockNR];
  for (int64_t jp = 0; jp * kBlockNR < nt; ++jp) {
    for (int64_t k0 = 0; k0 < Dp; k0 += kBlockKC)
      micro_block_one(qp + k0 * kBlockMR, panels + (jp * Dp + k0) * kBlockNR, imin(kBlockKC, Dp - k0), c, k0 == 0);
    for (int64_t j = 0; j < imin(kBlockNR, nt - jp * kBlockNR); ++j) out[jp * kBlockNR + j] = c[j];
  }
}
#endif

static void scores_one_tile(const float* q, const void* db, DType dt, int64_t row_stride, int64_t nt, int64_t D,
                            float* out, float* inv_norms, float* work) {
  const int64_t Dp = padded_dim(D);
  pack_rows(db, dt, row_stride, nt, D, Dp, work, inv_norms);
  const float* qr[1] = {q};
  for (int64_t j0 = 0; j0 < nt; j0 += kTileNR) {
    const int64_t nr = imin(kTileNR, nt - j0);
    const float* tr[kTileNR];
    for (int j = 0; j < kTileNR; ++j) tr[j] = work + (j0 + (j < nr ? j : 0)) * Dp;
    micro_tile<1, kTileNR>(qr, tr, Dp, out + j0, nt, 1, nr);
  }
}

// ---- GeM ------------------------------------------------------------------------------------

template <bool CUBE>
static inline vf pow_p(vf x, float p) {
  if (CUBE) return x * x * x;
  return vexp(vlog(x) * p);
}

static inline vf clamp_min(vf x, float eps) { return x < eps ? vbroadcast(eps) : x; }

template <int DT, bool CUBE>
static void gem_fwd_rows_t(const void* x, int64_t rows, int64_t row_stride, int64_t n, float p,
                           float eps, float* y) {
  const int64_t full = n - n % W;
  const auto* base = static_cast<const unsigned char*>(x);
  for (int64_t r = 0; r < rows; ++r) {
    const void* row = base + r * row_stride * elem_size<DT>();
    vf acc = vf{};
    for (int64_t i = 0; i < full; i += W) acc += pow_p<CUBE>(clamp_min(load_as_float<DT>(row, i), eps), p);
    float sum = hsum(acc);
    if (full < n) {
      vf t = pow_p<CUBE>(clamp_min(load_tail<DT>(row, full, n - full), eps), p);
      for (int64_t i = 0; i < n - full; ++i) sum += t[i];
    }
    y[r] = __builtin_powf(sum / static_cast<float>(n), 1.0f / p);
  }
}

template <int DT, bool CUBE>
static void gem_fwd_cols_t(const void* x, int64_t C, int64_t n, int64_t pos_stride, float p,
                           float eps, float* acc) {
  const int64_t full = C - C % W;
  const auto* base = static_cast<const unsigned char*>(x);
  for (int64_t s = 0; s < n; ++s) {
    const void* pos = base + s * pos_stride * elem_size<DT>();
    int64_t c = 0;
    for (; c < full; c += W)
      vstore(acc + c, vload(acc + c) + pow_p<CUBE>(clamp_min(load_as_float<DT>(pos, c), eps), p));
    if (c < C) {
      vf t = pow_p<CUBE>(clamp_min(load_tail<DT>(pos, c, C - c), eps), p);
      for (int64_t i = 0; i < C - c; ++i) acc[c + i] += t[i];
    }
  }
}

// One element vector of the backward pass in ratio form (see kernels.h): returns dx and adds
// (xc / y)^p ln(xc / y) to s_acc when WANT_S.
template <bool CUBE, bool WANT_S>
static inline vf gem_bwd_vec(vf xv, float p, float eps, vf coef, vf inv_y, vf log_y, vf* s_acc) {
  vf xc = clamp_min(xv, eps);
  vf pass = (vf)((vi)(xv >= eps) & (vi)vbroadcast(1.0f));  // 1.0 where the clamp passes gradient
  vf r = xc * inv_y;
  vf t;  // (xc / y)^(p-1)
  if (CUBE) {
    t = r * r;
    if (WANT_S) *s_acc += t * r * (vlog(xc) - log_y);
  } else {
    vf d = vlog(xc) - log_y;
    t = vexp(d * (p - 1.0f));
    if (WANT_S) *s_acc += t * r * d;
  }
  return coef * t * pass;
}

template <int DT, bool CUBE, bool WANT_S>
static void gem_bwd_rows_t(const void* x, int64_t rows, int64_t row_stride, int64_t n, float p,
                           float eps, const float* coef, const float* inv_y, const float* log_y,
                           void* dx, float* s) {
  const int64_t full = n - n % W;
  const int64_t es = elem_size<DT>();
  for (int64_t r = 0; r < rows; ++r) {
    const vf ly = vbroadcast(log_y[r]), iy = vbroadcast(inv_y[r]);
    const void* row = static_cast<const unsigned char*>(x) + r * row_stride * es;
    void* drow = static_cast<unsigned char*>(dx) + r * row_stride * es;
    const vf c = vbroadcast(coef[r]);
    vf s_acc = vf{};
    int64_t i = 0;
    for (; i < full; i += W)
      store_from_float<DT>(drow, i, gem_bwd_vec<CUBE, WANT_S>(load_as_float<DT>(row, i), p, eps, c, iy, ly, &s_acc));
    float s_tail = 0.0f;
    if (i < n) {
      vf tail_acc = vf{};
      vf d = gem_bwd_vec<CUBE, WANT_S>(load_tail<DT>(row, i, n - i), p, eps, c, iy, ly, &tail_acc);
      store_tail<DT>(drow, i, n - i, d);
      for (int64_t k = 0; k < n - i; ++k) s_tail += tail_acc[k];
    }
    if (WANT_S) s[r] = hsum(s_acc) + s_tail;
  }
}

template <int DT, bool CUBE, bool WANT_S>
static void gem_bwd_cols_t(const void* x, int64_t C, int64_t n, int64_t pos_stride, float p,
                           float eps, const float* coef, const float* inv_y, const float* log_y,
                           void* dx, float* s) {
  const int64_t full = C - C % W;
  const int64_t es = elem_size<DT>();
  for (int64_t sp = 0; sp < n; ++sp) {
    const void* pos = static_cast<const unsigned char*>(x) + sp * pos_stride * es;
    void* dpos = static_cast<unsigned char*>(dx) + sp * pos_stride * es;
    int64_t c = 0;
    for (; c < full; c += W) {
      vf s_acc = vf{};
      vf d = gem_bwd_vec<CUBE, WANT_S>(load_as_float<DT>(pos, c), p, eps, vload(coef + c),
                                       vload(inv_y + c), vload(log_y + c), &s_acc);
      store_from_float<DT>(dpos, c, d);
      if (WANT_S) vstore(s + c, vload(s + c) + s_acc);
    }
    if (c < C) {
      alignas(64) float cbuf[W] = {}, ibuf[W] = {}, lbuf[W] = {};
      for (int64_t k = 0; k < C - c; ++k) {
        cbuf[k] = coef[c + k];
        ibuf[k] = inv_y[c + k];
        lbuf[k] = log_y[c + k];
      }
      vf s_acc = vf{};
      vf d = gem_bwd_vec<CUBE, WANT_S>(load_tail<DT>(pos, c, C - c), p, eps, vload(cbuf), vload(ibuf),
                                       vload(lbuf), &s_acc);
      store_tail<DT>(dpos, c, C - c, d);
      if (WANT_S)
        for (int64_t k = 0; k < C - c; ++k) s[c + k] += s_acc[k];
    }
  }
}

// Expands (dtype, p == 3, want_s) into template arguments.
#define PLM_GEM_DISPATCH_DT(FN, DT, ...)                     \
  (cube ? FN<DT, true PLM_GEM_S>(__VA_ARGS__) : FN<DT, false PLM_GEM_S>(__VA_ARGS__))
#define PLM_GEM_DISPATCH(FN, ...)                                 \
  switch (dt) {                                                   \
    case DType::f16: PLM_GEM_DISPATCH_DT(FN, 1, __VA_ARGS__); break; \
    case DType::bf16: PLM_GEM_DISPATCH_DT(FN, 2, __VA_ARGS__); break; \
    default: PLM_GEM_DISPATCH_DT(FN, 0, __VA_ARGS__); break;     \
  }

static void gem_fwd_rows(const void* x, DType dt, int64_t rows, int64_t row_stride, int64_t n,
                         float p, float eps, float* y) {
  const bool cube = p == 3.0f;
#define PLM_GEM_S
  PLM_GEM_DISPATCH(gem_fwd_rows_t, x, rows, row_stride, n, p, eps, y)
#undef PLM_GEM_S
}

static void gem_fwd_cols(const void* x, DType dt, int64_t C, int64_t n, int64_t pos_stride,
                         float p, float eps, float* acc) {
  const bool cube = p == 3.0f;
#define PLM_GEM_S
  PLM_GEM_DISPATCH(gem_fwd_cols_t, x, C, n, pos_stride, p, eps, acc)
#undef PLM_GEM_S
}

static void gem_bwd_rows(const void* x, DType dt, int64_t rows, int64_t row_stride, int64_t n,
                         float p, float eps, const float* coef, const float* inv_y,
                         const float* log_y, void* dx, float* s) {
  const bool cube = p == 3.0f;
  if (s) {
#define PLM_GEM_S , true
    PLM_GEM_DISPATCH(gem_bwd_rows_t, x, rows, row_stride, n, p, eps, coef, inv_y, log_y, dx, s)
#undef PLM_GEM_S
  } else {
#define PLM_GEM_S , false
    PLM_GEM_DISPATCH(gem_bwd_rows_t, x, rows, row_stride, n, p, eps, coef, inv_y, log_y, dx, s)
#undef PLM_GEM_S
  }
}

static void gem_bwd_cols(const void* x, DType dt, int64_t C, int64_t n, int64_t pos_stride,
                         float p, float eps, const float* coef, const float* inv_y,
                         const float* log_y, void* dx, float* s) {
  const bool cube = p == 3.0f;
  if (s) {
#define PLM_GEM_S , true
    PLM_GEM_DISPATCH(gem_bwd_cols_t, x, C, n, pos_stride, p, eps, coef, inv_y, log_y, dx, s)
#undef PLM_GEM_S
  } else {
#define PLM_GEM_S , false
    PLM_GEM_DISPATCH(gem_bwd_cols_t, x, C, n, pos_stride, p, eps, coef, inv_y, log_y, dx, s)
#undef PLM_GEM_S
  }
}

}  // namespace PLM_ISA_NS

#if defined(PLM_ISA_avx512)
#define PLM_ISA_NAME "avx512"
#elif defined(PLM_ISA_avx2)
#define PLM_ISA_NAME "avx2"
#else
#define PLM_ISA_NAME "generic"
#endif

extern const KernelTable PLM_CAT(kernels_, PLM_ISA_NS);
const KernelTable PLM_CAT(kernels_, PLM_ISA_NS) = {
    PLM_ISA_NAME,
    PLM_ISA_NS::kDirectMaxQ,
    PLM_ISA_NS::pack_rows,
    PLM_ISA_NS::scores_tile,
    PLM_ISA_NS::scores_direct,
#if defined(PLM_HAVE_BLOCKED)
    PLM_ISA_NS::kBlockMR,
    PLM_ISA_NS::kBlockNR,
    static_cast<int>(PLM_ISA_NS::kBlockKC),
    PLM_ISA_NS::pack_query_panels,
    PLM_ISA_NS::scores_block,
#else
    0,
    0,
    0,
    nullptr,
    nullptr,
#endif
#if defined(PLM_HAVE_BLOCKED)
    0,
    PLM_ISA_NS::scores_one_tile,
    PLM_ISA_NS::scores_one_block,
#else
    0,
    PLM_ISA_NS::scores_one_tile,
    nullptr,
#endif
    PLM_ISA_NS::gem_fwd_rows,
    PLM_ISA_NS::gem_fwd_cols,
    PLM_ISA_NS::gem_bwd_rows,
    PLM_ISA_NS::gem_bwd_cols,
};

}  // namespace plm::cpu
