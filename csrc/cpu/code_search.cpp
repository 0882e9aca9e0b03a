// Exact search from compact codes (codes.h): a bounded scan of the int8 codes, then the exact
// scoring of the rows that can still win, with search()'s own kernels (scan.h), so that scores
// and indices equal search()'s bit for bit. The bound and its proof: ARCHITECTURE.md, "Exact
// search from compact codes".
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/codes.h"
#include "cpu/kernels.h"
#include "cpu/scan.h"
#include "cpu/threads.h"
#include "cpu/topk.h"

#if defined(PLM_HAVE_NEONDOT)
#include <sys/auxv.h>
#endif

namespace plm::cpu {

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr double kU = 0x1p-24;  // float32 unit roundoff
// Rows and queries beyond these magnitudes are kept out of the bound (rows always rescored,
// queries searched in full): the float32 error analysis assumes no overflow and bounds the
// underflow of products by kBoundAbs, which holds for norms in [2^-40, 2^40].
constexpr double kMaxNorm = 0x1p40, kMinNorm = 0x1p-40;
constexpr int64_t kTileRows = 256;       // rows per code scan call
constexpr int64_t kQueryBlock = 192;     // queries that share a tile of codes while it is in L2
constexpr int64_t kMinRowsPerRange = 4096;
constexpr int64_t kWindowRows = 4096;    // rows per near-tie test
constexpr size_t kCandidateBytes = 256 << 20;  // all queries' candidate lists together, at most
constexpr int64_t kGiveUp = 16;  // more than 1 in kGiveUp rows rescored: the plain search instead

// x rounded up to float32 (a float32 that is >= x).
float up(double x) {
  float f = static_cast<float>(x);
  return static_cast<double>(f) >= x ? f : std::nextafter(f, kInf);
}
float down(double x) {
  float f = static_cast<float>(x);
  return static_cast<double>(f) <= x ? f : std::nextafter(f, -kInf);
}
// A double computed from D float products and sums, made an upper bound: the double's own
// rounding is at most D * 2^-52 relative, far below 2^-30.
double widen(double x) { return x * (1.0 + 0x1p-30); }

#if defined(PLM_HAVE_NEONDOT)
bool has_dotprod() {
  constexpr unsigned long kHwcapAsimdDp = 1ul << 20;  // HWCAP_ASIMDDP (asm/hwcap.h)
  return getauxval(AT_HWCAP) & kHwcapAsimdDp;
}
#endif

struct CodeIsa {
  const char* isa;  // the kernel table this code kernel belongs to
  const CodeKernelTable* table;
  bool (*supported)();
};
bool always() { return true; }

const CodeIsa kCodeIsas[] = {  // best first
#if defined(PLM_HAVE_AVX512)
    {"avx512", &code_kernels_isa_avx512vnni, has_avx512_vnni},
    {"avx512", &code_kernels_isa_avx512, always},
#endif
#if defined(PLM_HAVE_AVX2)
    {"avx2", &code_kernels_isa_avx2vnni, has_avx_vnni},
    {"avx2", &code_kernels_isa_avx2, always},
#endif
#if defined(PLM_HAVE_NEONDOT)
    {"generic", &code_kernels_isa_neondot, has_dotprod},
#endif
    {"generic", &code_kernels_isa_generic, always},
};

bool isa_supported(const char* isa) {
  int n = 0;
  const char* const* names = supported_isas(&n);
  for (int i = 0; i < n; ++i)
    if (std::strcmp(names[i], isa) == 0) return true;
  return false;
}

std::atomic<const CodeKernelTable*> g_code_override{nullptr};

}  // namespace

const CodeKernelTable& active_code_kernels() {
  if (const CodeKernelTable* t = g_code_override.load(std::memory_order_acquire)) return *t;
  const char* isa = active_kernels().name;
  for (const auto& e : kCodeIsas)
    if (std::strcmp(e.isa, isa) == 0 && e.supported()) return *e.table;
  return code_kernels_isa_generic;
}

const char* const* supported_code_kernels(int* count) {
  static const char* names[sizeof(kCodeIsas) / sizeof(kCodeIsas[0])];
  int n = 0;
  for (const auto& e : kCodeIsas)
    if (isa_supported(e.isa) && e.supported()) names[n++] = e.table->name;
  *count = n;
  return names;
}

void set_code_kernel(const char* name) {
  if (!name || !*name) {
    g_code_override.store(nullptr, std::memory_order_release);
    return;
  }
  for (const auto& e : kCodeIsas)
    if (std::strcmp(e.table->name, name) == 0 && isa_supported(e.isa) && e.supported()) {
      g_code_override.store(e.table, std::memory_order_release);
      return;
    }
  std::string msg = std::string("code kernel '") + name + "' is not available on this CPU; choose one of:";
  int n = 0;
  const char* const* names = supported_code_kernels(&n);
  for (int i = 0; i < n; ++i) msg += std::string(" ") + names[i];
  throw std::invalid_argument(msg);
}

// ---- building codes -------------------------------------------------------------------------

namespace {

// Element d of a row as the search sees it (float16 and bfloat16 widen to float32 exactly).
double element(const void* row, DType dt, int64_t d) {
  const uint16_t* h = static_cast<const uint16_t*>(row);
  switch (dt) {
    case DType::f16: {
      const uint32_t x = h[d], sign = x >> 15, e = (x >> 10) & 31, m = x & 1023;
      double v = e == 0 ? std::ldexp(static_cast<double>(m), -24)
                 : e == 31 ? (m ? std::nan("") : std::numeric_limits<double>::infinity())
                           : std::ldexp(static_cast<double>(m | 1024), static_cast<int>(e) - 25);
      return sign ? -v : v;
    }
    case DType::bf16: {
      const uint32_t bits = static_cast<uint32_t>(h[d]) << 16;
      float f;
      std::memcpy(&f, &bits, 4);
      return f;
    }
    default:
      return static_cast<const float*>(row)[d];
  }
}

void build_row(const void* row, DType dt, int64_t D, int64_t Dc, bool cosine, int64_t n,
               uint8_t* codes, float* meta, std::vector<double>& x) {
  uint8_t* block = codes + (n / kCodeBlock) * kCodeBlock * Dc;
  float* m = meta + (n / kCodeBlock) * kCodeFields * kCodeBlock + n % kCodeBlock;
  const int64_t r = n % kCodeBlock;
  auto put = [&](int64_t d, uint8_t v) { block[(d / 4) * 64 + r * 4 + d % 4] = v; };
  double amax = 0.0, n2 = 0.0;
  bool finite = true;
  for (int64_t d = 0; d < D; ++d) {
    x[d] = element(row, dt, d);
    finite = finite && std::isfinite(x[d]);
    amax = std::max(amax, std::fabs(x[d]));
    n2 += x[d] * x[d];
  }
  const double norm = std::sqrt(n2);
  const bool zero = finite && amax == 0.0;
  if (!finite || (!zero && (norm > kMaxNorm || norm < kMinNorm))) {  // always rescored
    for (int64_t d = 0; d < Dc; ++d) put(d, 128);
    m[0] = 0.0f;
    m[kCodeBlock] = kInf;
    m[2 * kCodeBlock] = 0.0f;
    return;
  }
  const float s = static_cast<float>(amax / 127.0);
  double r2 = 0.0, b2 = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const double q = s > 0.0f ? std::clamp(std::nearbyint(x[d] / s), -127.0, 127.0) : 0.0;
    const double b = static_cast<double>(s) * q;  // exact: 24 x 8 bits
    r2 += (x[d] - b) * (x[d] - b);
    b2 += b * b;
    put(d, static_cast<uint8_t>(static_cast<int>(q) + 128));
  }
  for (int64_t d = D; d < Dc; ++d) put(d, 128);
  // ip: S = q.x, and S - q.x <= gamma_D ||q|| ||x||; cosine: everything over ||x||, and the
  // float32 score's error is within (3D + 8) u ||q|| (ARCHITECTURE.md).
  const double rounding = cosine ? (3.0 * D + 8.0) * kU : (1.5 * D + 4.0) * kU * norm;
  const double scale = cosine && !zero ? 1.0 / norm : 1.0;
  m[0] = static_cast<float>(s * scale);
  m[kCodeBlock] = up(widen(std::sqrt(r2) * scale + rounding));
  m[2 * kCodeBlock] = up(widen(std::sqrt(b2) * scale));
}

}  // namespace

void build_codes(const void* db, DType dt, int64_t row_stride, int64_t rows, int64_t D,
                 int64_t row0, bool cosine, uint8_t* codes, float* meta, int threads) {
  const int64_t Dc = code_dim(D);
  const int64_t esize = static_cast<int64_t>(dtype_size(dt));
  if (threads <= 0) threads = get_num_threads();
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, rows / 1024)));
  const int64_t chunk = 4096;
  WorkQueue work((rows + chunk - 1) / chunk);
  parallel_for(threads, [&](int) {
    std::vector<double> x(D);
    long long c;
    while (work.next(&c)) {
      const int64_t n1 = std::min<int64_t>(rows, (c + 1) * chunk);
      for (int64_t n = c * chunk; n < n1; ++n)
        build_row(static_cast<const unsigned char*>(db) + n * row_stride * esize, dt, D, Dc, cosine,
                  row0 + n, codes, meta, x);
    }
  });
  // rows past the last one in the last block: zero codes and metadata
  const int64_t end = row0 + rows;
  for (int64_t n = end; n < code_blocks(end) * kCodeBlock; ++n) {
    uint8_t* block = codes + (n / kCodeBlock) * kCodeBlock * Dc;
    for (int64_t d = 0; d < Dc; ++d) block[(d / 4) * 64 + (n % kCodeBlock) * 4 + d % 4] = 128;
    float* m = meta + (n / kCodeBlock) * kCodeFields * kCodeBlock + n % kCodeBlock;
    m[0] = m[kCodeBlock] = m[2 * kCodeBlock] = 0.0f;
  }
}

void device_codes(const uint8_t* codes, const float* meta, int64_t N, int64_t D, bool cosine, int8_t* out_codes,
                  int64_t out_stride, float* out_meta) {
  const int64_t Dc = code_dim(D);
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* block = codes + (n / kCodeBlock) * kCodeBlock * Dc;
    int8_t* out = out_codes + n * out_stride;
    for (int64_t d = 0; d < D; ++d)
      out[d] = static_cast<int8_t>(static_cast<int>(block[(d / 4) * 64 + (n % kCodeBlock) * 4 + d % 4]) - 128);
    std::memset(out + D, 0, static_cast<size_t>(out_stride - D));
    const float* m = meta + (n / kCodeBlock) * kCodeFields * kCodeBlock + n % kCodeBlock;
    const double E = m[kCodeBlock], beta = m[2 * kCodeBlock];
    // rho as build_row adds it; for ip rho = (1.5 D + 4) u nu with nu <= ||b|| + ||r|| <= beta + E.
    const double rho = cosine ? (3.0 * D + 8.0) * kU : (1.5 * D + 4.0) * kU * (beta + E);
    out_meta[n] = m[0];
    out_meta[N + n] = up(widen(E + 15.0 * rho));
    out_meta[2 * N + n] = m[2 * kCodeBlock];
  }
}

// ---- searching ------------------------------------------------------------------------------

namespace {

// One query's scan of the rows [n0, n0 + rows): the k best lower bounds (a min-heap), tau = the
// k-th of them (-inf until k rows were seen), and the rows whose upper bound reached tau when
// they were seen. Before the rows that set the final threshold come, a narrow bulk of scores can
// pass tau by the thousand; past `limit` candidates the scan keeps only each tile's largest
// upper bound ("lost" tiles, scanned again at the end for the final tau, usually none). A scan
// where nearly every row passes (near-ties: the bound cannot prune) gives up early: fallback.
struct QueryScan {
  std::vector<float> lows;
  float tau = -kInf;
  std::vector<std::pair<float, int64_t>> cands;  // (upper bound, row), rows increasing
  std::vector<float> lost_max;                     // per tile of kTileRows, once lost
  int64_t n0 = 0, rows = 0, window_rows = 0, window_pass = 0, windows = 0;
  size_t cap = 0, limit = 0;
  bool fallback = false, lost = false;

  void init(int64_t k, int64_t first, int64_t count, size_t most) {
    n0 = first;
    rows = count;
    lows.reserve(static_cast<size_t>(k));
    limit = std::max<size_t>(static_cast<size_t>(8 * k + 4096), std::min<size_t>(most, static_cast<size_t>(rows / 4)));
    cap = std::min<size_t>(limit, static_cast<size_t>(4 * k + 1024));
  }
  void take(const CodeHit& h, size_t k) {
    if (fallback || h.upper < tau) return;
    ++window_pass;
    if (lows.size() < k) {
      lows.push_back(h.lower);
      std::push_heap(lows.begin(), lows.end(), std::greater<float>());
      if (lows.size() == k) tau = lows.front();
    } else if (h.lower > lows.front()) {
      std::pop_heap(lows.begin(), lows.end(), std::greater<float>());
      lows.back() = h.lower;
      std::push_heap(lows.begin(), lows.end(), std::greater<float>());
      tau = lows.front();
    }
    if (lost) {
      float& m = lost_max[(h.row - n0) / kTileRows];
      m = std::max(m, h.upper);
      return;
    }
    cands.emplace_back(h.upper, h.row);
    if (cands.size() >= cap) compact();
  }
  void compact() {
    const float t = tau;
    cands.erase(std::remove_if(cands.begin(), cands.end(), [t](const auto& c) { return c.first < t; }), cands.end());
    if (cands.size() * 2 > cap) cap *= 2;
    if (cap <= limit) return;
    lost = true;
    lost_max.assign(static_cast<size_t>((rows + kTileRows - 1) / kTileRows), -kInf);
    for (const auto& c : cands) {
      float& m = lost_max[(c.second - n0) / kTileRows];
      m = std::max(m, c.first);
    }
    std::vector<std::pair<float, int64_t>>().swap(cands);
  }
  // After each tile: over windows of kWindowRows rows (the first one, where tau is still
  // settling, aside), more than 15 in 16 rows passing tau means the bound cannot prune.
  void end_tile(int64_t rows) {
    window_rows += rows;
    if (window_rows < kWindowRows) return;
    if (windows++ > 0 && window_pass * 16 > window_rows * 15) {
      fallback = true;
      std::vector<std::pair<float, int64_t>>().swap(cands);
      std::vector<float>().swap(lost_max);
    }
    window_rows = window_pass = 0;
  }
};

struct QuantizedQueries {
  std::vector<int8_t> q8;  // Q x Dc
  std::vector<CodeQuery> params;
  std::vector<char> fallback;  // the bound cannot be used for this query
};

// Quantises the packed queries (exactly as the search scores them) to the kernel's range.
QuantizedQueries quantize_queries(const float* queries, int64_t Q, int64_t D, int64_t Dp, int64_t Dc, int qmax,
                                  bool signed_rows) {
  QuantizedQueries out;
  out.q8.assign(Q * Dc, 0);
  out.params.resize(Q);
  out.fallback.assign(Q, 0);
  for (int64_t i = 0; i < Q; ++i) {
    const float* q = queries + i * Dp;
    double amax = 0.0, n2 = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      amax = std::max(amax, std::fabs(static_cast<double>(q[d])));
      n2 += static_cast<double>(q[d]) * q[d];
    }
    const double norm = std::sqrt(n2);
    if (amax == 0.0 || norm > kMaxNorm || norm < kMinNorm) {
      out.fallback[i] = 1;
      continue;
    }
    const float s = static_cast<float>(amax / qmax);
    double r2 = 0.0;
    int64_t sum = 0;
    for (int64_t d = 0; d < D; ++d) {
      const double v = std::clamp(std::nearbyint(q[d] / static_cast<double>(s)), -double(qmax), double(qmax));
      const double res = q[d] - static_cast<double>(s) * v;
      r2 += res * res;
      out.q8[i * Dc + d] = static_cast<int8_t>(v);
      sum += static_cast<int64_t>(v);
    }
    out.params[i] = {s, up(widen(norm)), up(widen(std::sqrt(r2))), static_cast<int32_t>(signed_rows ? 0 : 128 * sum)};
  }
  return out;
}

// Scans rows [n0, n1) (n0 a multiple of 16) for queries [q0, q1), each into scans[i - q0].
void scan_codes(const CodeKernelTable& CK, const QuantizedQueries& qq, int64_t Dc, int64_t q0, int64_t q1,
                const uint8_t* codes, const float* meta, int64_t n0, int64_t n1, int64_t k,
                QueryScan* scans) {
  std::vector<CodeHit> hits(static_cast<size_t>(CK.mr) * kTileRows);
  std::vector<float> tau(CK.mr);
  std::vector<CodeQuery> params(CK.mr);
  std::vector<int8_t> q8(static_cast<size_t>(CK.mr) * Dc);
  for (int64_t n = n0; n < n1; n += kTileRows) {
    const int64_t nt = std::min(kTileRows, n1 - n);
    bool any = false;
    for (int64_t p0 = q0; p0 < q1; p0 += CK.mr) {
      // the panel: the queries still scanning, packed together
      int64_t nq = 0;
      int64_t who[64];
      for (int64_t i = p0; i < std::min(q1, p0 + CK.mr); ++i) {
        if (qq.fallback[i] || scans[i - q0].fallback) continue;
        who[nq] = i;
        tau[nq] = scans[i - q0].tau;
        params[nq] = qq.params[i];
        std::memcpy(q8.data() + nq * Dc, qq.q8.data() + i * Dc, Dc);
        ++nq;
      }
      if (!nq) continue;
      any = true;
      const int64_t nh = CK.scan(q8.data(), Dc, params.data(), tau.data(), nq, codes, meta, Dc, n, nt, hits.data());
      for (int64_t h = 0; h < nh; ++h) scans[who[hits[h].query] - q0].take(hits[h], static_cast<size_t>(k));
      for (int64_t j = 0; j < nq; ++j) scans[who[j] - q0].end_tile(nt);
    }
    if (!any) return;  // every query fell back
  }
}

// Large k only (a sample holds >= 2 of the k best in proportion): from every kSampleStride-th
// block of rows, each query's k-th best lower bound in proportion (counting each block's best
// only: a block of a query's own near-duplicates, stored together, would otherwise hold the
// whole rank and hide the bulk below it), and how many sampled rows reach it. When more than
// 1 in 2 kGiveUp do (half the share past which a query is searched in full anyway, below: room
// for the sample's scatter), the k-th best score lies inside a dense bulk and the bound will not
// prune: the query is marked to be searched in full before the scan is paid for. *share: the
// sampled rows that reach their query's threshold, summed over the queries, per sampled row
// (>= the share of the db that the union of the candidates will hold; 0 without a sample).
// Speed only: a wrong guess either way leaves the result exact. Returns whether any query was
// marked.
constexpr int64_t kSampleStride = 32;

bool predict_fallbacks(const CodeKernelTable& CK, QuantizedQueries& qq, const SearchArgs& a, int64_t Dc,
                       const uint8_t* codes, const float* meta, int threads, double* share) {
  // Every kSampleStride-th block of 16 rows: small units, so that a run of similar rows (a
  // landmark's photos stored together) weighs in the sample as it does in the db.
  const int64_t blocks = code_blocks(a.N);
  int64_t sampled = 0;
  for (int64_t b = 0; b < blocks; b += kSampleStride) sampled += std::min(kCodeBlock, a.N - b * kCodeBlock);
  const int64_t ks = a.k * sampled / a.N;
  *share = 0.0;
  if (ks < 2 || sampled < 8 * kTileRows) return false;
  std::atomic<bool> any{false};
  std::atomic<int64_t> reached{0};
  WorkQueue panels((a.Q + CK.mr - 1) / CK.mr);
  parallel_for(threads, [&](int) {
    long long g;
    std::vector<CodeHit> hits(static_cast<size_t>(CK.mr) * kTileRows);
    std::vector<std::vector<float>> lows(CK.mr), ups(CK.mr);
    const std::vector<float> tau(CK.mr, -kInf);
    while (panels.next(&g)) {
      const int64_t q0 = g * CK.mr, nq = std::min<int64_t>(CK.mr, a.Q - q0);
      for (int64_t j = 0; j < nq; ++j) lows[j].clear(), ups[j].clear();
      for (int64_t b = 0; b < blocks; b += kSampleStride) {
        const int64_t r0 = b * kCodeBlock, nt = std::min(kCodeBlock, a.N - r0);
        const int64_t nh = CK.scan(qq.q8.data() + q0 * Dc, Dc, &qq.params[q0], tau.data(), nq, codes, meta, Dc, r0,
                                   nt, hits.data());
        for (int64_t j = 0; j < nq; ++j) lows[j].push_back(-kInf);
        for (int64_t h = 0; h < nh; ++h) {
          float& best = lows[hits[h].query].back();
          best = std::max(best, hits[h].lower);
          ups[hits[h].query].push_back(hits[h].upper);
        }
      }
      for (int64_t j = 0; j < nq; ++j) {
        if (qq.fallback[q0 + j] || static_cast<int64_t>(lows[j].size()) < ks) continue;
        std::nth_element(lows[j].begin(), lows[j].begin() + (ks - 1), lows[j].end(), std::greater<float>());
        const float t = lows[j][ks - 1];
        const int64_t reach = std::count_if(ups[j].begin(), ups[j].end(), [t](float u) { return u >= t; });
        reached += reach;
        if (reach * 2 * kGiveUp > static_cast<int64_t>(ups[j].size())) {
          qq.fallback[q0 + j] = 1;
          any = true;
        }
      }
    }
  });
  *share = static_cast<double>(reached.load()) / static_cast<double>(sampled);
  return any;
}

}  // namespace

void code_bounds(const SearchArgs& a, const uint8_t* codes, const float* meta, float* lower, float* upper) {
  const KernelTable& K = active_kernels();
  const CodeKernelTable& CK = active_code_kernels();
  const int64_t Dp = padded_dim(a.D), Dc = code_dim(a.D);
  std::vector<float> queries = pack_queries(a, K, Dp);
  const QuantizedQueries qq = quantize_queries(queries.data(), a.Q, a.D, Dp, Dc, CK.qmax, CK.signed_rows);
  std::vector<CodeHit> hits(kTileRows);
  const float tau = -kInf;
  for (int64_t i = 0; i < a.Q; ++i) {
    for (int64_t n = 0; n < a.N; ++n) lower[i * a.N + n] = -kInf, upper[i * a.N + n] = kInf;
    if (qq.fallback[i]) continue;
    for (int64_t n = 0; n < a.N; n += kTileRows) {
      const int64_t nh = CK.scan(qq.q8.data() + i * Dc, Dc, &qq.params[i], &tau, 1, codes, meta, Dc, n,
                                 std::min(kTileRows, a.N - n), hits.data());
      for (int64_t h = 0; h < nh; ++h) {
        lower[i * a.N + hits[h].row] = hits[h].lower;
        upper[i * a.N + hits[h].row] = hits[h].upper;
      }
    }
  }
}

void search_codes(const SearchArgs& a, const uint8_t* codes, const float* meta, CodeSearchStats* stats) {
  if (a.Q == 0) return;
  const KernelTable& K = active_kernels();
  const CodeKernelTable& CK = active_code_kernels();
  const int64_t Dp = padded_dim(a.D), Dc = code_dim(a.D);
  std::vector<float> queries = pack_queries(a, K, Dp);
  Plan p = make_plan(a, K, queries.data());
  // (a kernel chosen by set_code_kernel always runs: tests compare every variant)
  const bool forced = g_code_override.load(std::memory_order_acquire) != nullptr;
  const bool pays = forced || CK.pays == kAlways || (CK.pays == kOneOrMany && (a.Q == 1 || !p.direct));
  if (!pays || a.D > kMaxCodeDim || a.k * 64 > a.N) {  // the scan would not pay for itself
    if (stats) stats->fallback_queries += a.Q;
    return search_planned(p);
  }
  QuantizedQueries qq = quantize_queries(queries.data(), a.Q, a.D, Dp, Dc, CK.qmax, CK.signed_rows);

  int threads = a.threads > 0 ? a.threads : get_num_threads();
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, a.Q * a.N * a.D >> 22)));
  // The direct kernels search all queries together (one query that falls back takes them all),
  // reading each row once: past an eighth of the db in candidates the plain search is cheaper.
  double share = 0.0;
  if ((predict_fallbacks(CK, qq, a, Dc, codes, meta, threads, &share) || share * 8 > 1.0) && p.direct) {
    if (stats) stats->fallback_queries += a.Q;
    return search_planned(p);
  }
  // scans[t * Q + i]: query i over thread t's rows (by rows), or over all rows (t = 0, by queries)
  const bool by_queries = a.Q >= threads * 2 * CK.mr;
  const int parts = by_queries ? 1 : static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, a.N / kMinRowsPerRange)));
  const int64_t range = (a.N + parts - 1) / parts / kTileRows * kTileRows + kTileRows;
  std::vector<QueryScan> scans(static_cast<size_t>(parts) * a.Q);
  for (int t = 0; t < parts; ++t)
    for (int64_t i = 0; i < a.Q; ++i)
      scans[t * a.Q + i].init(a.k, by_queries ? 0 : std::min(a.N, t * range), by_queries ? a.N : range,
                              kCandidateBytes / 12 / static_cast<size_t>(a.Q * parts));
  if (by_queries) {
    const int64_t block = std::min<int64_t>(kQueryBlock, (a.Q + threads - 1) / threads + CK.mr - 1) / CK.mr * CK.mr;
    WorkQueue work((a.Q + block - 1) / block);
    parallel_for(threads, [&](int) {
      long long b;
      while (work.next(&b)) {
        const int64_t q0 = b * block, q1 = std::min(a.Q, q0 + block);
        scan_codes(CK, qq, Dc, q0, q1, codes, meta, 0, a.N, a.k, scans.data() + q0);
      }
    });
  } else {
    parallel_for(parts, [&](int t) {
      const int64_t n0 = std::min(a.N, t * range), n1 = std::min(a.N, n0 + range);
      scan_codes(CK, qq, Dc, 0, a.Q, codes, meta, n0, n1, a.k, scans.data() + t * a.Q);
    });
  }

  // Each query's threshold (the k-th best lower bound over all rows) and its candidates: the
  // rows whose upper bound reaches it (>=, so that ties stay). Queries in parallel.
  std::vector<std::vector<int64_t>> cands(a.Q);
  std::vector<char> gave_up(a.Q, 0);
  WorkQueue each(a.Q);
  parallel_for(threads, [&](int) {
    long long i;
    std::vector<CodeHit> hits(kTileRows);
    while (each.next(&i)) {
      bool fb = qq.fallback[i];
      std::vector<float> lows;
      for (int t = 0; t < parts && !fb; ++t) {
        const QueryScan& s = scans[t * a.Q + i];
        fb = s.fallback;
        lows.insert(lows.end(), s.lows.begin(), s.lows.end());
      }
      float tau = -kInf;
      if (!fb && static_cast<int64_t>(lows.size()) >= a.k) {
        std::nth_element(lows.begin(), lows.begin() + (a.k - 1), lows.end(), std::greater<float>());
        tau = lows[a.k - 1];
      }
      // Lost tiles that reach tau are scanned again, unless they hold more than N/16 rows: then
      // the bound does not prune enough for that to pay (the k-th best score inside a dense bulk
      // of scores), and the query is searched in full without scanning them.
      int64_t again = 0;
      for (int t = 0; t < parts && !fb; ++t)
        for (float m : scans[t * a.Q + i].lost_max) again += m >= tau;
      fb = fb || again * kTileRows * kGiveUp > a.N;
      for (int t = 0; t < parts && !fb; ++t) {
        const QueryScan& s = scans[t * a.Q + i];
        for (const auto& c : s.cands)
          if (c.first >= tau) cands[i].push_back(c.second);
        for (size_t tile = 0; tile < s.lost_max.size(); ++tile) {
          if (!(s.lost_max[tile] >= tau)) continue;
          const int64_t r0 = s.n0 + static_cast<int64_t>(tile) * kTileRows, nt = std::min(kTileRows, a.N - r0);
          const int64_t nh = CK.scan(qq.q8.data() + i * Dc, Dc, &qq.params[i], &tau, 1, codes, meta, Dc, r0, nt,
                                     hits.data());
          for (int64_t h = 0; h < nh; ++h) cands[i].push_back(hits[h].row);
        }
      }
      std::sort(cands[i].begin(), cands[i].end());
      if (fb || static_cast<int64_t>(cands[i].size()) * kGiveUp > a.N) {  // cheaper to search in full
        std::vector<int64_t>().swap(cands[i]);
        gave_up[i] = 1;
      }
    }
  });
  std::vector<int64_t> fallback;
  for (int64_t i = 0; i < a.Q; ++i)
    if (gave_up[i]) fallback.push_back(i);
  std::vector<QueryScan>().swap(scans);
  // The direct kernels score a query together with the other queries of the call, so there the
  // union of all queries' candidates is scored for all queries at once.
  std::vector<int64_t> all;
  if (p.direct && fallback.empty()) {
    for (const auto& c : cands) all.insert(all.end(), c.begin(), c.end());
    std::sort(all.begin(), all.end());
    all.erase(std::unique(all.begin(), all.end()), all.end());
  }
  // A direct search reads each row once for all its queries; rescoring copies the union's rows
  // first: past a quarter of the db the plain search is the cheaper one.
  if (p.direct && (!fallback.empty() || static_cast<int64_t>(all.size()) * 4 > a.N)) {
    if (stats) stats->fallback_queries += a.Q;
    return search_planned(p);
  }
  if (stats) {
    stats->fallback_queries += static_cast<int64_t>(fallback.size());
    for (const auto& c : cands) stats->rescored += static_cast<int64_t>(c.size());
  }

  // Exact scores of the candidates, copied in increasing row order and scored by the search's
  // own kernels (a pair's score depends on neither the other rows nor, off the direct path, the
  // other queries), rows mapped back. Direct path: the union split into one contiguous share per
  // thread, each scored for every query into the share's lists, then merged (PartLists).
  // Elsewhere each query scores its own candidates alone (scan_one).
  const int64_t esize = static_cast<int64_t>(dtype_size(a.db_dtype));
  auto score_rows = [&](const int64_t* rows, int64_t n, int64_t q0, int64_t q1, std::vector<unsigned char>& copy,
                        TopKList* lists) {
    copy.resize(static_cast<size_t>(std::max<int64_t>(1, n) * a.D * esize));
    for (int64_t j = 0; j < n; ++j) std::memcpy(copy.data() + j * a.D * esize, db_row(a, rows[j]), a.D * esize);
    SearchArgs sub = a;
    sub.db = copy.data();
    sub.db_stride = a.D;
    sub.N = n;
    Plan ps = p;
    ps.args = &sub;
    if (p.direct) scan(ps, q0, q1, 0, n, lists);
    else scan_one(ps, q0, 0, n, lists);
    for (int64_t i = q0; i < q1; ++i) {
      TopKList& l = lists[i - q0];
      for (int64_t j = 0; j < a.k; ++j)
        if (l.index[j] >= 0) l.index[j] = rows[l.index[j]];
    }
  };
  if (p.direct) {
    const int shares = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, static_cast<int64_t>(all.size()) / 256)));
    const int64_t per = (static_cast<int64_t>(all.size()) + shares - 1) / shares;
    PartLists parts(shares, a.Q, a.k);
    parallel_for(shares, [&](int t) {
      const int64_t j0 = std::min<int64_t>(static_cast<int64_t>(all.size()), t * per);
      const int64_t j1 = std::min<int64_t>(static_cast<int64_t>(all.size()), j0 + per);
      std::vector<unsigned char> copy;
      score_rows(all.data() + j0, j1 - j0, 0, a.Q, copy, parts.part(t));
    });
    parts.merge(a.scores, a.indices);
    return;
  }
  WorkQueue each_query(a.Q);
  parallel_for(threads, [&](int) {
    long long i;
    std::vector<unsigned char> copy;
    while (each_query.next(&i)) {
      if (gave_up[i]) continue;
      auto lists = make_lists(a.scores + i * a.k, a.indices + i * a.k, 1, a.k);
      score_rows(cands[i].data(), static_cast<int64_t>(cands[i].size()), i, i + 1, copy, lists.data());
      lists[0].sort();
    }
  });

  if (fallback.empty()) return;
  // Queries the bound could not prune: the plain search, over every row.
  const int64_t nf = static_cast<int64_t>(fallback.size());
  std::vector<float> fq(nf * Dp), fs(nf * a.k);
  std::vector<int64_t> fi(nf * a.k);
  for (int64_t j = 0; j < nf; ++j)
    std::memcpy(fq.data() + j * Dp, queries.data() + fallback[j] * Dp, Dp * sizeof(float));
  SearchArgs sub = a;
  sub.Q = nf;
  sub.scores = fs.data();
  sub.indices = fi.data();
  Plan pf = p;
  pf.args = &sub;
  pf.queries = fq.data();
  search_planned(pf);
  for (int64_t j = 0; j < nf; ++j) {
    std::memcpy(a.scores + fallback[j] * a.k, fs.data() + j * a.k, a.k * sizeof(float));
    std::memcpy(a.indices + fallback[j] * a.k, fi.data() + j * a.k, a.k * sizeof(int64_t));
  }
}

}  // namespace plm::cpu
