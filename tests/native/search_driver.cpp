// Stand-alone check of the CPU search (csrc/cpu, no Python): exact top-k against a double
// reference on random data, for each db element type, metric and a grid of sizes that straddle
// the kernels' blocks, plus every finite float16 value read back exactly. Built for one target
// by run_native.sh (the host, or aarch64 under qemu-user); exits 0 when every check holds.
//
//   search_driver [isa]     isa: a kernel table name (default: the best this CPU runs)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <random>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/search.h"

using plm::DType;

namespace {

int failures = 0;

void fail(const char* what, int64_t Q, int64_t N, int64_t D, int64_t k, int dt, bool cosine) {
  if (++failures <= 20)
    std::printf("FAIL %s: Q=%lld N=%lld D=%lld k=%lld dtype=%d cosine=%d\n", what, (long long)Q,
                (long long)N, (long long)D, (long long)k, dt, (int)cosine);
}

uint16_t to_half(float f) {  // round to nearest even, finite normal range only (|f| < 65504)
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const float a = std::fabs(f);
  if (a < 6.103515625e-05f) {  // half subnormal: multiples of 2^-24
    const float m = std::nearbyint(a * 16777216.0f);
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(m));
  }
  uint32_t ax = x & 0x7fffffffu;
  ax += 0xc8000fffu + ((ax >> 13) & 1u);
  return static_cast<uint16_t>(sign | (ax >> 13));
}

double from_half(uint16_t h) {
  const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
  const double s = (h & 0x8000) ? -1.0 : 1.0;
  if (e == 0) return s * std::ldexp(m, -24);
  return s * std::ldexp(1024 + m, e - 25);
}

uint16_t to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

double from_bf16(uint16_t h) {
  const uint32_t x = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

// One search problem checked against double arithmetic on the very values searched.
void check(std::mt19937_64& rng, int64_t Q, int64_t N, int64_t D, int64_t k, DType dt, bool cosine) {
  std::normal_distribution<float> normal;
  std::vector<float> q(Q * D);
  for (auto& v : q) v = normal(rng);
  std::vector<double> dbv(N * D);
  std::vector<float> db32;
  std::vector<uint16_t> db16;
  if (dt == DType::f32) db32.resize(N * D);
  else db16.resize(N * D);
  std::uniform_real_distribution<float> scale(0.25f, 4.0f);
  for (int64_t n = 0; n < N; ++n) {
    const float s = scale(rng);
    for (int64_t d = 0; d < D; ++d) {
      const float v = normal(rng) * s;
      const int64_t i = n * D + d;
      if (dt == DType::f32) dbv[i] = db32[i] = v;
      else if (dt == DType::f16) dbv[i] = from_half(db16[i] = to_half(v));
      else dbv[i] = from_bf16(db16[i] = to_bf16(v));
    }
  }
  std::vector<float> scores(Q * k);
  std::vector<int64_t> idx(Q * k);
  plm::cpu::SearchArgs a{};
  a.queries = q.data();
  a.query_dtype = DType::f32;
  a.query_stride = D;
  a.db = dt == DType::f32 ? static_cast<const void*>(db32.data()) : db16.data();
  a.db_dtype = dt;
  a.db_stride = D;
  a.Q = Q;
  a.N = N;
  a.D = D;
  a.k = k;
  a.cosine = cosine;
  a.scores = scores.data();
  a.indices = idx.data();
  a.threads = 0;
  plm::cpu::search(a);

  // Float32 accumulation: a few ulp times sqrt(D) of the product of the norms (as the tests).
  std::vector<double> ref(N);
  for (int64_t i = 0; i < Q; ++i) {
    double qn = 0.0, dn_max = 0.0;
    for (int64_t d = 0; d < D; ++d) qn += double(q[i * D + d]) * q[i * D + d];
    qn = std::sqrt(qn);
    for (int64_t n = 0; n < N; ++n) {
      double dot = 0.0, dn = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        dot += q[i * D + d] * dbv[n * D + d];
        dn += dbv[n * D + d] * dbv[n * D + d];
      }
      dn = std::sqrt(dn);
      dn_max = std::fmax(dn_max, dn);
      ref[n] = cosine ? (dn > 0 ? dot / (qn * dn) : 0.0) : dot;
    }
    const double tol = (1.2e-6 * std::sqrt(double(D)) + 1e-7) * (cosine ? 1.0 : qn * dn_max);
    const int64_t kk = k < N ? k : N;
    std::vector<double> sorted(ref);
    std::sort(sorted.begin(), sorted.end(), [](double x, double y) { return x > y; });
    std::vector<char> seen(N, 0);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t n = idx[i * k + j];
      const float s = scores[i * k + j];
      if (j >= kk) {
        if (n != -1 || !std::isinf(s) || s > 0) fail("padding", Q, N, D, k, int(dt), cosine);
        continue;
      }
      if (n < 0 || n >= N || seen[n]) { fail("index", Q, N, D, k, int(dt), cosine); return; }
      seen[n] = 1;
      if (std::fabs(s - ref[n]) > tol) fail("score", Q, N, D, k, int(dt), cosine);
      if (j > 0 && s > scores[i * k + j - 1]) fail("order", Q, N, D, k, int(dt), cosine);
    }
    if (ref[idx[i * k + kk - 1]] < sorted[kk - 1] - tol) fail("missed a neighbour", Q, N, D, k, int(dt), cosine);
  }
}

// Every finite float16 value, read back as the score of a one-hot query (inner product).
void check_half_values() {
  std::vector<uint16_t> vals;
  for (uint32_t b = 0; b < 65536; ++b)
    if (((b >> 10) & 0x1f) != 0x1f) vals.push_back(static_cast<uint16_t>(b));
  const int64_t D = 16, N = (static_cast<int64_t>(vals.size()) + D - 1) / D;
  std::vector<uint16_t> db(N * D, 0);
  std::copy(vals.begin(), vals.end(), db.begin());
  for (int64_t col : {0, 7, 15}) {
    std::vector<float> q(D, 0.0f);
    q[col] = 1.0f;
    std::vector<float> scores(N);
    std::vector<int64_t> idx(N);
    plm::cpu::SearchArgs a{};
    a.queries = q.data();
    a.query_dtype = DType::f32;
    a.query_stride = D;
    a.db = db.data();
    a.db_dtype = DType::f16;
    a.db_stride = D;
    a.Q = 1;
    a.N = N;
    a.D = D;
    a.k = N;
    a.cosine = false;
    a.scores = scores.data();
    a.indices = idx.data();
    plm::cpu::search(a);
    for (int64_t j = 0; j < N; ++j)
      if (static_cast<double>(scores[j]) != from_half(db[idx[j] * D + col])) {
        fail("float16 value", 1, N, D, N, 1, false);
        break;
      }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1) {
    try {
      plm::cpu::set_isa(argv[1]);
    } catch (const std::exception& e) {
      std::printf("skipped: %s\n", e.what());
      return 0;
    }
  }
  std::printf("kernels: %s\n", plm::cpu::active_kernels().name);
  std::mt19937_64 rng(17);
  const int64_t sizes[][4] = {  // Q, N, D, k
      {1, 1000, 1024, 5}, {2, 517, 8, 17}, {3, 259, 100, 100}, {4, 999, 31, 1000},
      {5, 770, 1024, 7},  {9, 257, 33, 300}, {16, 1030, 257, 5}, {17, 65, 7, 70},
      {64, 2049, 96, 10}, {97, 1000, 255, 5}, {301, 130, 1030, 9}, {103, 1, 1, 3}};
  for (const auto& s : sizes)
    for (DType dt : {DType::f16, DType::bf16, DType::f32})
      for (bool cosine : {true, false}) check(rng, s[0], s[1], s[2], s[3], dt, cosine);
  check_half_values();
  std::printf("%s (%d failures)\n", failures ? "FAILED" : "all checks passed", failures);
  return failures ? 1 : 0;
}
