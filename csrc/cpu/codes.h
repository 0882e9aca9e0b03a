// Compact codes beside a db and the exact search that scans them first (see ARCHITECTURE.md,
// "Exact search from compact codes", for the bound and its proof).
//
// Layout. Rows are grouped in blocks of kCodeBlock = 16. Row n's code is its int8 quantisation
// x8 = round(x / s) (|x8| <= 127, s = max|x| / 127), stored as x8 + 128 (uint8, so that the
// kernels multiply unsigned row bytes by signed query bytes), Dc = round_up(D, 4) bytes, padded
// with 128 (zero). Within a block the codes are interleaved in quads of dimensions: bytes
// [t * 64 + r * 4, t * 64 + r * 4 + 4) hold dimensions 4t..4t+3 of the block's row r, so one
// 64-byte load holds one quad of all 16 rows. Each block also has kCodeFields x 16 float32 of
// metadata, field-major: the scale factor c, the error term E and the dequantised norm beta of
// each row (see CodeMeta).
#pragma once
#include <cstdint>

#include "cpu/search.h"
#include "dtype.h"

namespace plm::cpu {

constexpr int64_t kCodeBlock = 16;
constexpr int64_t kCodeFields = 3;  // c, E, beta
constexpr int64_t kMaxCodeDim = 65536;  // int32 sums of D products of 255 x 127 cannot overflow
inline int64_t code_dim(int64_t D) { return (D + 3) / 4 * 4; }
inline int64_t code_blocks(int64_t N) { return (N + kCodeBlock - 1) / kCodeBlock; }

// One query's quantisation: q ~ cq * q8 (q8 in [-qmax, qmax]); kappa >= ||q||, eq >= ||q - cq q8||
// (both rounded up); corr = 128 * sum(q8), what unsigned row bytes add to the dot product (0 for
// kernels that read them signed).
struct CodeQuery {
  float cq, kappa, eq;
  int32_t corr;
};

// A (query, row) pair whose upper bound reached the query's threshold, with both bounds.
struct CodeHit {
  int32_t query;
  int64_t row;
  float lower, upper;
};

enum CodePays : int { kNever = 0, kOneOrMany = 1, kAlways = 2 };

struct CodeKernelTable {
  const char* name;
  int qmax;  // query codes lie in [-qmax, qmax] (the kernel's products must not saturate)
  int mr;    // queries per scan call at most
  bool signed_rows;  // the kernel reads the row bytes as x8 (no 128 x sum(q8) in its sums)
  // When the scan pays for itself against the float search on this ISA (measured,
  // benchmarks/RESULTS.md): kAlways; kOneOrMany: one query, or more than the float search's
  // memory-bound few-query path takes (its direct kernels read the rows once for up to 4 or 16
  // queries, while this scan's cost grows with each query); kNever: the plain search instead.
  int pays;
  // For queries [0, nq) (q: nq rows of Dc int8, q_stride apart; nq <= mr) and rows
  // [r0, r0 + nt) of the block-packed codes (r0 a multiple of 16): writes to hits every pair
  // whose upper bound is >= tau[query] (room for nq * nt entries, in row order per query);
  // returns how many.
  int64_t (*scan)(const int8_t* q, int64_t q_stride, const CodeQuery* qp, const float* tau,
                  int64_t nq, const uint8_t* codes, const float* meta, int64_t Dc, int64_t r0,
                  int64_t nt, CodeHit* hits);
};

// The bound of a pair, from the row's metadata (c, E, beta) and the query's (cq, kappa, eq) and
// the exact integer dot product I = q8 . x8: A = cq * c * I, B = kappa * E + eq * beta, widened
// for the float32 evaluation of A, B and A +- B (the proof bounds each rounding by 2^-15 |A| and
// 2^-16 B), plus 2^-100 for products that underflow. Every kernel evaluates exactly this.
constexpr float kBoundRelB = 1.0f + 0x1p-16f;
constexpr float kBoundRelA = 0x1p-15f;
constexpr float kBoundAbs = 0x1p-100f;

#if defined(PLM_HAVE_GENERIC)
extern const CodeKernelTable code_kernels_isa_generic;
#endif
#if defined(PLM_HAVE_AVX2)
extern const CodeKernelTable code_kernels_isa_avx2;
extern const CodeKernelTable code_kernels_isa_avx2vnni;
#endif
#if defined(PLM_HAVE_NEONDOT)
extern const CodeKernelTable code_kernels_isa_neondot;
#endif
#if defined(PLM_HAVE_AVX512)
extern const CodeKernelTable code_kernels_isa_avx512;
extern const CodeKernelTable code_kernels_isa_avx512vnni;
#endif

// The code kernels in use: those of the active ISA (the best variant this CPU runs), or the one
// set_code_kernel chose.
const CodeKernelTable& active_code_kernels();
// Names of the code kernels this CPU runs, best first.
const char* const* supported_code_kernels(int* count);
// "" follows the ISA again; otherwise a supported name, or std::invalid_argument. A kernel set
// here is used for every search (CodeKernelTable::pays aside): tests compare every variant.
void set_code_kernel(const char* name);

// Codes for rows [row0, row0 + rows) of db (rows x D elements of dt, row_stride apart; row n of
// the db is row row0 + n of the codes) into codes (code_blocks x 16 x Dc bytes) and meta
// (code_blocks x kCodeFields x 16 float32), whose other rows are left as they are. cosine: the
// metadata scales each row by 1 / ||row|| (the codes themselves are the same). Rows with a
// non-finite element, or too large or too small for the float32 error analysis, are marked to
// be always rescored (E = +inf).
void build_codes(const void* db, DType dt, int64_t row_stride, int64_t rows, int64_t D,
                 int64_t row0, bool cosine, uint8_t* codes, float* meta, int threads);

// The codes in the GPU scan's layout (csrc/cuda/code_kernels.cuh), from build_codes' output
// for N rows of D: row n's int8 code at out_codes + n * out_stride (zero past D), and out_meta
// [3][N] = c, E', beta. E' = E + 15 rho: the float32 rounding term rho of E, widened 16 times
// for the tensor cores' float32 accumulation, which is not IEEE round-to-nearest (products
// exact, sums aligned and truncated: within a few units of 2^-23 per instruction; ARCHITECTURE.md).
void device_codes(const uint8_t* codes, const float* meta, int64_t N, int64_t D, bool cosine, int8_t* out_codes,
                  int64_t out_stride, float* out_meta);

struct CodeSearchStats {
  int64_t rescored = 0;        // (query, row) pairs scored exactly
  int64_t fallback_queries = 0;  // queries that the bound could not prune, searched in full
};

// The same results as search(a), bit for bit: scans the codes (built by build_codes for this db
// and a.cosine, N rows), then scores exactly only the rows whose upper bound reaches the k-th
// best lower bound. Throws std::invalid_argument as search() does.
void search_codes(const SearchArgs& a, const uint8_t* codes, const float* meta,
                  CodeSearchStats* stats);

// For tests: every (query, row) pair's bounds, lower and upper (Q x N float32 each), as the
// scan computes them (-inf / +inf where a query or row is kept out of the bound).
void code_bounds(const SearchArgs& a, const uint8_t* codes, const float* meta, float* lower, float* upper);

}  // namespace plm::cpu
