// Machine probes for bench_cpu.py, compiled at benchmark time with -O2 -march=native and loaded
// with ctypes (which releases the GIL, so Python threads run one call per core at once).
//
//   plm_probe_fma(iters)        -> float32 FLOPs done: 12 independent FMA chains on the widest
//                                  vectors the compiler targets (12 covers latency 4 x 2 ports
//                                  and latency 4 x 3 ports on the cores we know)
//   plm_probe_read(p, n_bytes)  -> a checksum of a plain streaming read of p[0, n_bytes): the
//                                  bandwidth floor of any method that reads those bytes once
//   plm_probe_read_streams(p, n_bytes, streams)
//                               -> the same bytes read as `streams` (1..16) equal runs in turn,
//                                  one vector of each per step: several long sequential streams
//                                  at once, which some cores' prefetchers fetch faster than one
//                                  (Zen 3: 4 streams up to ~1.3x one, often equal); the floor is
//                                  the faster read
//   plm_probe_vector_bytes()    -> the vector width used, in bytes
#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
constexpr int kBytes = 64;
#elif defined(__AVX__)
constexpr int kBytes = 32;
#else
constexpr int kBytes = 16;
#endif

typedef float vf __attribute__((vector_size(kBytes)));
typedef uint64_t vu __attribute__((vector_size(kBytes)));

extern "C" {

int plm_probe_vector_bytes() { return kBytes; }

double plm_probe_fma(long long iters) {
  vf acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = vf{} + 1.0f / (i + 2);
  vf a = vf{} + 0.999999f, b = vf{} + 1e-7f;
  for (long long it = 0; it < iters; ++it) {
    // The empty asm keeps a and b opaque so the compiler cannot fold the chain.
    __asm__ volatile("" : "+x"(a), "+x"(b));
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) acc[i] = acc[i] * a + b;
  }
  vf s = vf{};
  for (int i = 0; i < 12; ++i) s += acc[i];
  float out = 0.0f;
  for (int i = 0; i < kBytes / 4; ++i) out += s[i];
  volatile float sink = out;
  (void)sink;
  return static_cast<double>(iters) * 12 * (kBytes / 4) * 2;
}

unsigned long long plm_probe_read(const void* p, long long n_bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  vu acc[4] = {};
  long long i = 0;
  for (; i + 4 * kBytes <= n_bytes; i += 4 * kBytes) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      vu v;
      std::memcpy(&v, c + i + j * kBytes, kBytes);
      acc[j] += v;
    }
  }
  unsigned long long s = 0;
  for (; i < n_bytes; ++i) s += c[i];
  for (int j = 0; j < 4; ++j)
    for (int l = 0; l < kBytes / 8; ++l) s += acc[j][l];
  return s;
}

unsigned long long plm_probe_read_streams(const void* p, long long n_bytes, int streams) {
  if (streams < 1 || streams > 16) return 0;
  const auto* c = static_cast<const unsigned char*>(p);
  const long long run = n_bytes / streams / kBytes * kBytes;
  vu acc[16] = {};
  for (long long i = 0; i < run; i += kBytes) {
    for (int s = 0; s < streams; ++s) {
      vu v;
      std::memcpy(&v, c + s * run + i, kBytes);
      acc[s] += v;
    }
  }
  unsigned long long sum = 0;
  for (long long i = streams * run; i < n_bytes; ++i) sum += c[i];
  for (int s = 0; s < streams; ++s)
    for (int l = 0; l < kBytes / 8; ++l) sum += acc[s][l];
  return sum;
}

}  // extern "C"
