// Checks the code scan variants linked in (codes.h tables named on the command line) against an
// exact reference: every (query, row) pair's bounds from the exact integer dot product, in
// double. Built and run by tests/test_code_kernels_aarch64.py for AArch64 under qemu (the x86
// variants are checked through the extension itself, tests/test_codes.py). Prints "ok <pairs>".
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/codes.h"

using namespace plm::cpu;

namespace {

const CodeKernelTable* const kTables[] = {
    &code_kernels_isa_generic,
#if defined(PLM_HAVE_NEONDOT)
    &code_kernels_isa_neondot,
#endif
};

int failures = 0;
void fail(const char* what, const char* kernel, int64_t D, int64_t q, int64_t row, double got, double want) {
  if (++failures <= 10)
    std::printf("FAIL %s %s D=%lld query %lld row %lld: %.9g, reference %.9g\n", what, kernel,
                static_cast<long long>(D), static_cast<long long>(q), static_cast<long long>(row), got, want);
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  int64_t pairs = 0;
  for (int64_t D : {4, 37, 1024}) {
    const int64_t Dc = code_dim(D);
    for (int64_t nt : {16, 37, 256}) {
      const int64_t r0 = 16, blocks = code_blocks(r0 + nt);
      std::vector<uint8_t> codes(blocks * kCodeBlock * Dc);
      for (auto& b : codes) b = static_cast<uint8_t>(1 + rng() % 255);  // x8 in [-127, 127]
      for (int64_t i = 0; i < 64 && i < static_cast<int64_t>(codes.size()); ++i) codes[i] = (i % 2) ? 1 : 255;
      std::vector<float> meta(blocks * kCodeFields * kCodeBlock);
      std::uniform_real_distribution<float> pos(0.5f, 2.0f);
      for (auto& m : meta) m = pos(rng);
      for (const CodeKernelTable* K : kTables) {
        for (int64_t nq = 1; nq <= K->mr; ++nq) {
          std::vector<int8_t> q(nq * Dc, 0);
          std::vector<CodeQuery> params(nq);
          for (int64_t i = 0; i < nq; ++i) {
            int64_t sum = 0;
            for (int64_t d = 0; d < D; ++d) {
              q[i * Dc + d] = static_cast<int8_t>(static_cast<int>(rng() % (2 * K->qmax + 1)) - K->qmax);
              sum += q[i * Dc + d];
            }
            if (i == 0)
              for (int64_t d = 0; d < D; ++d) q[d] = static_cast<int8_t>(d % 2 ? K->qmax : -K->qmax);
            if (i == 0) sum = (D % 2) ? -K->qmax : 0;
            // kappa, eq small: the error term B is tiny against A, so a dot product one off shows
            params[i] = {pos(rng) * 1e-3f, 1e-6f, 1e-6f, static_cast<int32_t>(K->signed_rows ? 0 : 128 * sum)};
          }
          const std::vector<float> tau(nq, -INFINITY);
          std::vector<CodeHit> hits(nq * nt);
          const int64_t nh = K->scan(q.data(), Dc, params.data(), tau.data(), nq, codes.data(), meta.data(), Dc, r0,
                                     nt, hits.data());
          if (nh != nq * nt) {
            std::printf("FAIL %s: %lld hits for %lld pairs\n", K->name, static_cast<long long>(nh),
                        static_cast<long long>(nq * nt));
            return 1;
          }
          for (int64_t h = 0; h < nh; ++h) {
            const CodeHit& hit = hits[h];
            const int64_t n = hit.row;
            const uint8_t* block = codes.data() + (n / kCodeBlock) * kCodeBlock * Dc;
            int64_t dot = 0;
            for (int64_t d = 0; d < D; ++d)
              dot += static_cast<int64_t>(block[(d / 4) * 64 + (n % kCodeBlock) * 4 + d % 4] - 128) * q[hit.query * Dc + d];
            const float* m = meta.data() + (n / kCodeBlock) * kCodeFields * kCodeBlock + n % kCodeBlock;
            const CodeQuery& p = params[hit.query];
            const double A = static_cast<double>(p.cq) * m[0] * static_cast<double>(dot);
            const double B = (static_cast<double>(p.kappa) * m[kCodeBlock] + static_cast<double>(p.eq) * m[2 * kCodeBlock]) *
                                 (1.0 + 0x1p-16) + 0x1p-15 * std::fabs(A) + 0x1p-100;
            // float32 evaluation of A, B and A -+ B: at most 8 roundings of 2^-24 (|A| + B)
            const double tol = 8 * 0x1p-24 * (std::fabs(A) + B);
            if (std::fabs(hit.lower - (A - B)) > tol) fail("lower", K->name, D, hit.query, n, hit.lower, A - B);
            if (std::fabs(hit.upper - (A + B)) > tol) fail("upper", K->name, D, hit.query, n, hit.upper, A + B);
            if (n < r0 || n >= r0 + nt) fail("row", K->name, D, hit.query, n, static_cast<double>(n), r0);
          }
          pairs += nh;
        }
      }
    }
  }
  if (failures) return 1;
  std::printf("ok %lld\n", static_cast<long long>(pairs));
  return 0;
}
