// The scan of block-packed int8 codes for one instruction set (see codes.h). CMake compiles this
// file once per variant (generic, avx2, avx2vnni, avx512, avx512vnni; neondot on AArch64) with
// PLM_ISA_NS naming its namespace; nothing here allocates or throws.
//
// Per quad of dimensions t, one vector holds 4 code bytes of each of its W rows; a query's 4
// bytes are broadcast to every lane, and the lane's 4 products are summed into its int32
// accumulator: vpdpbusd on AVX-512 VNNI and AVX-VNNI (unsigned rows, so the sum carries
// 128 x sum(q8), which CodeQuery::corr takes off), vpsignb / masked negation + vpmaddubsw +
// vpmaddwd on AVX2 and AVX-512BW, sdot on AArch64 (signed rows: no correction). Every variant
// gets the same int8 queries and returns the same exact integer dot products; the bounds then
// differ at most in the rounding of their float32 expression (fused multiply-adds where the ISA
// has them), which the proof covers.
#include <cstdint>

#include "cpu/codes.h"

#if defined(PLM_ISA_avx512) || defined(PLM_ISA_avx2)
#include <immintrin.h>
#endif
#if defined(PLM_CODE_NEONDOT)
#include <arm_neon.h>
#endif

#ifndef PLM_ISA_NS
#error "PLM_ISA_NS must name the ISA namespace"
#endif
#define PLM_CAT2(a, b) a##b
#define PLM_CAT(a, b) PLM_CAT2(a, b)

namespace plm::cpu {
namespace PLM_ISA_NS {

#if defined(PLM_ISA_avx512)
constexpr int W = 16;
#elif defined(PLM_ISA_avx2)
constexpr int W = 8;
#else
constexpr int W = 4;
#endif
typedef float vf __attribute__((vector_size(W * 4)));
typedef int32_t vi __attribute__((vector_size(W * 4)));

#if defined(PLM_ISA_avx512) && defined(PLM_CODE_VNNI)
constexpr int kQMax = 127;
constexpr bool kSignedRows = false;  // vpdpbusd: unsigned row bytes x signed query bytes
static inline vi load_rows(const uint8_t* p) { return (vi)_mm512_loadu_si512(p); }
static inline vi dot4(vi acc, vi rows, vi q) { return (vi)_mm512_dpbusd_epi32((__m512i)acc, (__m512i)rows, (__m512i)q); }
static inline unsigned mask_ge(vf a, vf b) { return _mm512_cmp_ps_mask((__m512)a, (__m512)b, _CMP_GE_OQ); }
#elif defined(PLM_ISA_avx512)
// Without VNNI: the rows as signed bytes (u8 ^ 0x80 = x8), |x8| times the query negated where
// x8 < 0, by vpmaddubsw (pairs of |x8| q <= 2 x 127 x 127 < 2^15: no saturation) + vpmaddwd.
constexpr int kQMax = 127;
constexpr bool kSignedRows = true;
static inline vi load_rows(const uint8_t* p) {
  return (vi)_mm512_xor_si512(_mm512_loadu_si512(p), _mm512_set1_epi8(static_cast<char>(0x80)));
}
static inline vi dot4(vi acc, vi rows, vi q) {
  const __m512i x = (__m512i)rows;
  const __m512i signed_q = _mm512_mask_sub_epi8((__m512i)q, _mm512_movepi8_mask(x), _mm512_setzero_si512(), (__m512i)q);
  const __m512i pairs = _mm512_maddubs_epi16(_mm512_abs_epi8(x), signed_q);
  return acc + (vi)_mm512_madd_epi16(pairs, _mm512_set1_epi16(1));
}
static inline unsigned mask_ge(vf a, vf b) { return _mm512_cmp_ps_mask((__m512)a, (__m512)b, _CMP_GE_OQ); }
#elif defined(PLM_ISA_avx2) && defined(PLM_CODE_VNNI)
// AVX-VNNI: the VEX-encoded vpdpbusd on 8 lanes, as on AVX-512 VNNI.
constexpr int kQMax = 127;
constexpr bool kSignedRows = false;
static inline vi load_rows(const uint8_t* p) {
  return (vi)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
static inline vi dot4(vi acc, vi rows, vi q) {
  return (vi)_mm256_dpbusd_avx_epi32((__m256i)acc, (__m256i)rows, (__m256i)q);
}
static inline unsigned mask_ge(vf a, vf b) {
  return static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps((__m256)a, (__m256)b, _CMP_GE_OQ)));
}
#elif defined(PLM_ISA_avx2)
// The rows as signed bytes (u8 ^ 0x80 = x8): vpsignb moves each x8's sign onto the query byte,
// vpmaddubsw multiplies |x8| by it (pairs <= 2 x 127 x 127 < 2^15: no saturation), vpmaddwd sums.
constexpr int kQMax = 127;
constexpr bool kSignedRows = true;
static inline vi load_rows(const uint8_t* p) {
  return (vi)_mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
                              _mm256_set1_epi8(static_cast<char>(0x80)));
}
static inline vi dot4(vi acc, vi rows, vi q) {
  const __m256i x = (__m256i)rows;
  const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(x), _mm256_sign_epi8((__m256i)q, x));
  return acc + (vi)_mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}
static inline unsigned mask_ge(vf a, vf b) {
  return static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps((__m256)a, (__m256)b, _CMP_GE_OQ)));
}
#elif defined(PLM_CODE_NEONDOT)
// AArch64 with the dot-product extension (sdot: Graviton2 and later, Ampere, Apple M1 and later):
// each lane multiplies 4 signed row bytes (u8 ^ 0x80 = x8) by the 4 query bytes and adds.
constexpr int kQMax = 127;
constexpr bool kSignedRows = true;
static inline vi load_rows(const uint8_t* p) { return (vi)veorq_u8(vld1q_u8(p), vdupq_n_u8(0x80)); }
static inline vi dot4(vi acc, vi rows, vi q) { return (vi)vdotq_s32((int32x4_t)acc, (int8x16_t)rows, (int8x16_t)q); }
static inline unsigned mask_ge(vf a, vf b) {
  unsigned m = 0;
  for (int l = 0; l < W; ++l) m |= static_cast<unsigned>(a[l] >= b[l]) << l;
  return m;
}
#else
constexpr int kQMax = 127;
constexpr bool kSignedRows = false;
static inline vi load_rows(const uint8_t* p) {
  vi v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
// Lane l: the 4 unsigned bytes of rows times the 4 signed bytes of q (the same in every lane).
static inline vi dot4(vi acc, vi rows, vi q) {
  uint8_t r[W * 4];
  int8_t qb[4];
  __builtin_memcpy(r, &rows, sizeof r);
  __builtin_memcpy(qb, &q, 4);
  for (int l = 0; l < W; ++l)
    for (int b = 0; b < 4; ++b) acc[l] += static_cast<int32_t>(r[l * 4 + b]) * qb[b];
  return acc;
}
static inline unsigned mask_ge(vf a, vf b) {
  unsigned m = 0;
  for (int l = 0; l < W; ++l) m |= static_cast<unsigned>(a[l] >= b[l]) << l;
  return m;
}
#endif

static inline vi bcast4(const int8_t* p) {
  int32_t x;
  __builtin_memcpy(&x, p, 4);
  return vi{} + x;
}
static inline vf vload(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
static inline vf vabs(vf x) { return (vf)((vi)x & 0x7fffffff); }

// MR queries x NRV row vectors (NRV * W rows) per step; queries past nq repeat query 0 and their
// results are dropped, row vectors past the rows repeat the group's first vector and are masked.
template <int MR, int NRV>
static int64_t scan_t(const int8_t* q, int64_t q_stride, const CodeQuery* qp, const float* tau,
                      int64_t nq, const uint8_t* codes, const float* meta, int64_t Dc, int64_t r0,
                      int64_t nt, CodeHit* hits) {
  constexpr int R = NRV * W;
  const int64_t quads = Dc / 4, block_bytes = kCodeBlock * Dc, block_meta = kCodeFields * kCodeBlock;
  const int8_t* qrow[MR];
  for (int i = 0; i < MR; ++i) qrow[i] = q + (i < nq ? i : 0) * q_stride;
  int64_t nh = 0;
  for (int64_t g = 0; g < nt; g += R) {
    const uint8_t* rp[NRV];
    const float* mp[NRV];
    for (int v = 0; v < NRV; ++v) {
      const int64_t row = r0 + g + (g + v * W < nt ? v * W : 0);
      rp[v] = codes + (row / kCodeBlock) * block_bytes + (row % kCodeBlock) * 4;
      mp[v] = meta + (row / kCodeBlock) * block_meta + row % kCodeBlock;
    }
    vi acc[MR][NRV];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NRV; ++v) acc[i][v] = vi{};
    for (int64_t t = 0; t < quads; ++t) {
      vi rows[NRV];
#pragma GCC unroll 8
      for (int v = 0; v < NRV; ++v) rows[v] = load_rows(rp[v] + t * 64);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const vi qb = bcast4(qrow[i] + t * 4);
#pragma GCC unroll 8
        for (int v = 0; v < NRV; ++v) acc[i][v] = dot4(acc[i][v], rows[v], qb);
      }
    }
    for (int v = 0; v < NRV; ++v) {
      const int64_t first = g + v * W;
      if (first >= nt) break;
      const vf c = vload(mp[v]), E = vload(mp[v] + kCodeBlock), beta = vload(mp[v] + 2 * kCodeBlock);
      for (int i = 0; i < MR && i < nq; ++i) {
        const CodeQuery& cq = qp[i];
        const vf A = __builtin_convertvector(acc[i][v] - cq.corr, vf) * (c * cq.cq);
        const vf B = (E * cq.kappa + beta * cq.eq) * kBoundRelB + vabs(A) * kBoundRelA + kBoundAbs;
        const vf U = A + B;
        unsigned m = mask_ge(U, vf{} + tau[i]);
        while (m) {
          const int l = __builtin_ctz(m);
          m &= m - 1;
          if (first + l >= nt) break;
          hits[nh++] = {static_cast<int32_t>(i), r0 + first + l, A[l] - B[l], U[l]};
        }
      }
    }
  }
  return nh;
}

static int64_t scan(const int8_t* q, int64_t q_stride, const CodeQuery* qp, const float* tau,
                    int64_t nq, const uint8_t* codes, const float* meta, int64_t Dc, int64_t r0,
                    int64_t nt, CodeHit* hits) {
#if defined(PLM_ISA_avx512)
  // 32 zmm registers: MR x NRV accumulators + NRV rows + the broadcast (+ the constant of madd)
  if (nq == 1) return scan_t<1, 4>(q, q_stride, qp, tau, nq, codes, meta, Dc, r0, nt, hits);
  if (nq == 2) return scan_t<2, 4>(q, q_stride, qp, tau, nq, codes, meta, Dc, r0, nt, hits);
  if (nq <= 4) return scan_t<4, 4>(q, q_stride, qp, tau, nq, codes, meta, Dc, r0, nt, hits);
  if (nq <= 8) return scan_t<8, 2>(q, q_stride, qp, tau, nq, codes, meta, Dc, r0, nt, hits);
  return scan_t<12, 2>(q, q_stride, qp, tau, nq, codes, meta, Dc, r0, nt, hits);
#elif defined(PLM_ISA_avx2) && defined(PLM_CODE_VNNI)
  // 16 ymm registers: MR x NRV accumulators, NRV rows, the broadcast query bytes
  if (nq == 1) return scan_t<1, 4>(q, q_stride, qp, tau, nq, codes, meta, Dc, r0, nt, hits);
  if (nq == 2) return scan_t<2, 4>(q, q_stride, qp, tau, nq, codes, meta, Dc, r0, nt, hits);
  return scan_t<4, 3>(q, q_stride, qp, tau, nq, codes, meta, Dc, r0, nt, hits);
#elif defined(PLM_ISA_avx2)
  // 16 ymm registers: MR x NRV accumulators, NRV rows and their |x8|, the query, a temporary
  // and the constant of vpmaddwd
  if (nq == 1) return scan_t<1, 4>(q, q_stride, qp, tau, nq, codes, meta, Dc, r0, nt, hits);
  if (nq == 2) return scan_t<2, 2>(q, q_stride, qp, tau, nq, codes, meta, Dc, r0, nt, hits);
  return scan_t<4, 2>(q, q_stride, qp, tau, nq, codes, meta, Dc, r0, nt, hits);
#elif defined(PLM_CODE_NEONDOT)
  // 32 vector registers: MR x NRV accumulators, NRV rows, the broadcast query bytes
  if (nq == 1) return scan_t<1, 4>(q, q_stride, qp, tau, nq, codes, meta, Dc, r0, nt, hits);
  if (nq == 2) return scan_t<2, 4>(q, q_stride, qp, tau, nq, codes, meta, Dc, r0, nt, hits);
  return scan_t<4, 4>(q, q_stride, qp, tau, nq, codes, meta, Dc, r0, nt, hits);
#else
  if (nq == 1) return scan_t<1, 4>(q, q_stride, qp, tau, nq, codes, meta, Dc, r0, nt, hits);
  return scan_t<4, 2>(q, q_stride, qp, tau, nq, codes, meta, Dc, r0, nt, hits);
#endif
}

#if defined(PLM_ISA_avx512)
constexpr int kMR = 12;
#else
constexpr int kMR = 4;
#endif
// Measured on the 2-vCPU AVX-512 VNNI VM (benchmarks/RESULTS.md, issue 27): VNNI 1.8-4.6x the
// float16 search at every Q; AVX2 1.6-1.8x at Q = 1, 0.7-0.9x at Q = 2..16 (the float16 direct
// path reads the rows once for all of them), 1.0-1.4x beyond; the plain C scan 0.2-0.7x.
#if defined(PLM_CODE_VNNI)
constexpr int kPays = kAlways;
#elif defined(PLM_CODE_NEONDOT)
// Unmeasured (no ARM machine here): sdot does four times the multiply-adds of a float32 fmla
// per instruction, as vpdpbusd does on x86, where the scan pays at every query count.
constexpr int kPays = kAlways;
#elif defined(PLM_ISA_avx512) || defined(PLM_ISA_avx2)
constexpr int kPays = kOneOrMany;
#else
constexpr int kPays = kNever;
#endif

}  // namespace PLM_ISA_NS

#if defined(PLM_ISA_avx512) && defined(PLM_CODE_VNNI)
#define PLM_CODE_NAME "avx512-vnni"
#elif defined(PLM_ISA_avx2) && defined(PLM_CODE_VNNI)
#define PLM_CODE_NAME "avx2-vnni"
#elif defined(PLM_CODE_NEONDOT)
#define PLM_CODE_NAME "neon-dotprod"
#elif defined(PLM_ISA_avx512)
#define PLM_CODE_NAME "avx512"
#elif defined(PLM_ISA_avx2)
#define PLM_CODE_NAME "avx2"
#else
#define PLM_CODE_NAME "generic"
#endif

extern const CodeKernelTable PLM_CAT(code_kernels_, PLM_ISA_NS);
const CodeKernelTable PLM_CAT(code_kernels_, PLM_ISA_NS) = {
    PLM_CODE_NAME, PLM_ISA_NS::kQMax, PLM_ISA_NS::kMR, PLM_ISA_NS::kSignedRows, PLM_ISA_NS::kPays, PLM_ISA_NS::scan};

}  // namespace plm::cpu
