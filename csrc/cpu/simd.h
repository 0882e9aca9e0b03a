// Portable SIMD for one instruction set, included only by kernels.cpp inside its ISA namespace.
//
// Vectors are GCC/Clang vector extensions whose width follows the ISA the file is compiled for
// (16 floats for AVX-512, 8 for AVX2, 4 otherwise); element-type conversions use the hardware
// instructions where the ISA has them (F16C) and exact bit arithmetic elsewhere. Everything here
// is static inline: nothing compiled for one ISA can be linked into another.
#pragma once

#if defined(PLM_ISA_avx512)
#define PLM_W 16
#elif defined(PLM_ISA_avx2)
#define PLM_W 8
#else
#define PLM_W 4
#endif

#if defined(PLM_ISA_avx512) || defined(PLM_ISA_avx2)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

constexpr int W = PLM_W;
typedef float vf __attribute__((vector_size(PLM_W * 4)));
typedef int32_t vi __attribute__((vector_size(PLM_W * 4)));
typedef uint32_t vu __attribute__((vector_size(PLM_W * 4)));
typedef uint16_t vh __attribute__((vector_size(PLM_W * 2)));

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

static inline vf vbroadcast(float s) { return vf{} + s; }
static inline vf vload(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
static inline void vstore(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }

static inline float hsum(vf v) {
#if PLM_W == 16
  typedef float v8 __attribute__((vector_size(32)));
  v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  vf a = v;
#endif
#if PLM_W >= 8
  typedef float v4 __attribute__((vector_size(16)));
  v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
#else
  vf b = a;
#endif
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// ---- element conversions -----------------------------------------------------------------

static inline vf half_to_float(const uint16_t* p) {
#if defined(PLM_ISA_avx512)
  return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(PLM_ISA_avx2)
  return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif defined(__aarch64__)
  // FCVTL: every AArch64 core converts float16 in hardware (exact; no flush to zero under
  // Linux's default FPCR)
  return (vf)vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
#else
  vh h;
  __builtin_memcpy(&h, p, sizeof h);
  vu u = __builtin_convertvector(h, vu);
  vu sign = (u & 0x8000u) << 16;
  vu em = u & 0x7fffu;
  // Shifting the exponent and mantissa into float position and scaling by 2^112 rebiases the
  // exponent and turns half subnormals into float normals exactly.
  vf scaled = (vf)(em << 13) * 0x1p112f;
  vu infnan = (em << 13) | 0x7f800000u;
  vu out = (em >= 0x7c00u) ? infnan : (vu)scaled;
  return (vf)(out | sign);
#endif
}

static inline vf bf16_to_float(const uint16_t* p) {
  vh h;
  __builtin_memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vu) << 16);
}

static inline uint16_t float_to_half_scalar(float f) {
  uint32_t x;
  __builtin_memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return static_cast<uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to infinity
  if (ax < 0x38800000u) {  // half subnormal or zero: let the FPU round at 2^-24 granularity
    float v;
    __builtin_memcpy(&v, &ax, 4);
    v += 0.5f;
    uint32_t r;
    __builtin_memcpy(&r, &v, 4);
    return static_cast<uint16_t>(sign | (r - 0x3f000000u));
  }
  ax += 0xc8000fffu + ((ax >> 13) & 1u);  // rebias exponent by -112, round to nearest even
  return static_cast<uint16_t>(sign | (ax >> 13));
}

static inline void float_to_half(uint16_t* p, vf v) {
#if defined(PLM_ISA_avx512)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(PLM_ISA_avx2)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  for (int i = 0; i < W; ++i) p[i] = float_to_half_scalar(v[i]);
#endif
}

static inline void float_to_bf16(uint16_t* p, vf v) {
  vu u = (vu)v;
  vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  vu quiet_nan = (u >> 16) | 0x40u;
  vu out = (v != v) ? quiet_nan : rounded;
  vh h = __builtin_convertvector(out, vh);
  __builtin_memcpy(p, &h, sizeof h);
}

// Loads W elements of type dt starting at element i as float32.
template <int DT>
static inline vf load_as_float(const void* base, int64_t i);
template <>
inline vf load_as_float<0>(const void* base, int64_t i) {
  return vload(static_cast<const float*>(base) + i);
}
template <>
inline vf load_as_float<1>(const void* base, int64_t i) {
  return half_to_float(static_cast<const uint16_t*>(base) + i);
}
template <>
inline vf load_as_float<2>(const void* base, int64_t i) {
  return bf16_to_float(static_cast<const uint16_t*>(base) + i);
}

template <int DT>
static inline void store_from_float(void* base, int64_t i, vf v);
template <>
inline void store_from_float<0>(void* base, int64_t i, vf v) {
  vstore(static_cast<float*>(base) + i, v);
}
template <>
inline void store_from_float<1>(void* base, int64_t i, vf v) {
  float_to_half(static_cast<uint16_t*>(base) + i, v);
}
template <>
inline void store_from_float<2>(void* base, int64_t i, vf v) {
  float_to_bf16(static_cast<uint16_t*>(base) + i, v);
}

template <int DT>
constexpr int64_t elem_size() {
  return DT == 0 ? 4 : 2;
}

// Loads the first `count` (< W) elements at element i, zero filling the rest, never reading
// past them (the end of a memory-mapped file may follow).
template <int DT>
static inline vf load_tail(const void* base, int64_t i, int64_t count) {
  alignas(64) unsigned char buf[W * 4] = {};
  __builtin_memcpy(buf, static_cast<const unsigned char*>(base) + i * elem_size<DT>(),
                   count * elem_size<DT>());
  return load_as_float<DT>(buf, 0);
}

template <int DT>
static inline void store_tail(void* base, int64_t i, int64_t count, vf v) {
  alignas(64) unsigned char buf[W * 4];
  store_from_float<DT>(buf, 0, v);
  __builtin_memcpy(static_cast<unsigned char*>(base) + i * elem_size<DT>(), buf,
                   count * elem_size<DT>());
}

// ---- exp and log (float32, a few ulp; Cephes-style range reduction and polynomials) --------

static inline vf vlog(vf x) {  // natural log for x > 0; NaN and +inf pass through
  vi xi = (vi)x;
  vi e = ((xi >> 23) & 0xff) - 127;
  vf m = (vf)((xi & 0x007fffff) | 0x3f800000);  // [1, 2)
  vi big = (vi)(m > vbroadcast(1.41421356f));      // -1 where m > sqrt 2
  m = big ? m * 0.5f : m;
  e = e - big;
  vf ef = __builtin_convertvector(e, vf);
  vf f = m - 1.0f;
  vf z = f * f;
  vf poly = vbroadcast(7.0376836292e-2f);
  poly = poly * f - 1.1514610310e-1f;
  poly = poly * f + 1.1676998740e-1f;
  poly = poly * f - 1.2420140846e-1f;
  poly = poly * f + 1.4249322787e-1f;
  poly = poly * f - 1.6668057665e-1f;
  poly = poly * f + 2.0000714765e-1f;
  poly = poly * f - 2.4999993993e-1f;
  poly = poly * f + 3.3333331174e-1f;
  vf y = poly * f * z;
  y = y + ef * -2.12194440e-4f;
  y = y - 0.5f * z;
  vf r = f + y + ef * 0.693359375f;
  vi special = (vi)(x != x) | (vi)(x == vbroadcast(__builtin_inff()));
  return special ? x : r;
}

static inline vf vexp(vf x) {  // e^x; NaN passes through, overflow gives +inf, underflow 0
  vf xc = x > 88.72f ? vbroadcast(88.72f) : x;
  xc = xc < -87.33f ? vbroadcast(-87.33f) : xc;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  vf n = (xc * 1.44269504088896341f + magic) - magic;
  vf r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf poly = vbroadcast(1.9875691500e-4f);
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  vf e = poly * r * r + r + 1.0f;
  vi ni = __builtin_convertvector(n, vi);
  vi n1 = ni >> 1;  // split 2^n in two factors so n = 128 or -126 never overflows the exponent
  vi n2 = ni - n1;
  e = e * (vf)((n1 + 127) << 23) * (vf)((n2 + 127) << 23);
  e = x > 88.72f ? vbroadcast(__builtin_inff()) : e;
  e = x < -87.33f ? vbroadcast(0.0f) : e;
  return (x != x) ? x : e;
}
