// The per-instruction-set kernel table. kernels.cpp is compiled once per ISA (generic, avx2,
// avx512) into its own namespace; dispatch.cpp picks the best table the CPU supports.
//
// Conventions: "Dp" is D rounded up to a multiple of 16 floats; packed float32 rows are Dp long
// and zero padded, so dot products over Dp equal those over D.
#pragma once
#include <cstdint>

#include "dtype.h"

namespace plm::cpu {

constexpr int64_t kPad = 16;
inline int64_t padded_dim(int64_t d) { return (d + kPad - 1) / kPad * kPad; }

// inv_norms entry of a row whose float32 sum of squares cannot be trusted: the search redoes
// that row in double (see search.cpp). Real entries are >= 0.
constexpr float kRedoRow = -1.0f;

// 1/||row||_2 from the row's float32 sum of squares n2, or kRedoRow where n2 may be wrong: it
// overflowed (elements beyond ~1e19), or is below 2^-100, where squares that underflowed into
// subnormals (or to zero) could matter; above 2^-100 each such square errs by at most 2^-149,
// a relative 2^-49 of n2. A float16 row (HALF) reaches neither: its largest square is 2^32, its
// smallest nonzero one 2^-48, so n2 == 0 means a zero row.
template <bool HALF>
inline float inv_norm_or_redo(float n2) {
  if (HALF || (n2 >= 0x1p-100f && n2 <= 3.402823466e38f)) return n2 > 0.0f ? 1.0f / __builtin_sqrtf(n2) : 0.0f;
  return kRedoRow;
}

struct KernelTable {
  const char* name;
  int direct_max_q;  // scores_direct takes at most this many queries

  // src: rows x D elements of dt, rows row_stride elements apart -> dst: rows x Dp float32.
  // inv_norms (optional, rows): 1/||row||_2, 0 for an all-zero row, kRedoRow where the float32
  // sum of squares cannot be trusted (see inv_norm_or_redo).
  void (*pack_rows)(const void* src, DType dt, int64_t row_stride, int64_t rows, int64_t D,
                    int64_t Dp, float* dst, float* inv_norms);

  // out[i*nt + j] = <q_i, tile_j>; q: nq x Dp and tile: nt x Dp, both packed float32.
  void (*scores_tile)(const float* q, int64_t nq, const float* tile, int64_t nt, int64_t Dp,
                      float* out);

  // As scores_tile but reads nt db rows (dt, row_stride apart, D long) directly; nq <= direct_max_q.
  // inv_norms (optional, nt) is filled from the same pass over the rows (as pack_rows does).
  void (*scores_direct)(const float* q, int64_t nq, const void* db, DType dt, int64_t row_stride,
                        int64_t nt, int64_t D, float* out, float* inv_norms);

  // Register-blocked many-query scoring (GEMM-style: both operands packed into panels once, the
  // db's conversion to float32 done while packing). Only ISAs with a tuned micro-kernel have it;
  // block_mr == 0 and null pointers elsewhere, where search uses pack_rows + scores_tile.
  int block_mr;  // queries per query panel
  int block_nr;  // db rows per db panel
  int block_kc;  // d slice: the queries' slice (queries x block_kc floats) should stay in L2
  // q: nq x Dp packed float32 rows -> dst: ceil(nq / block_mr) panels, each Dp x block_mr
  // (d-major), queries past nq zero.
  void (*pack_query_panels)(const float* q, int64_t nq, int64_t Dp, float* dst);
  // out[i*ld + j] = <q_i, row_j> for i < round_up(nq, block_mr), j < round_up(nt, block_nr) (rows
  // past nq or nt score 0); qp from pack_query_panels; the nt db rows (dt, row_stride apart, D
  // long) are read once into work (round_up(nt, block_nr) x Dp floats). inv_norms (optional, nt)
  // as in pack_rows. next (optional): the next next_nt rows to be scored (same layout), fetched
  // into cache meanwhile.
  void (*scores_block)(const float* qp, int64_t nq, const void* db, DType dt, int64_t row_stride,
                       int64_t nt, int64_t D, float* out, int64_t ld, float* inv_norms, float* work,
                       const void* next, int64_t next_nt);

  // The blocked kernels serve searches of at least block_min_q queries (past the direct path);
  // fewer use pack_rows + scores_tile.
  int block_min_q;
  // One query (q: Dp packed float32) against nt rows, each pair scored exactly as the many-query
  // kernels score it (a pair's accumulation does not depend on the other queries or rows there),
  // without computing the other queries of a register tile: out[j] = <q, row_j>, inv_norms
  // (optional) as pack_rows. _tile: as pack_rows + scores_tile; _block: as scores_block (null
  // where that is). work: round_up(nt, 16) x Dp + 16 x Dp floats.
  void (*scores_one_tile)(const float* q, const void* db, DType dt, int64_t row_stride, int64_t nt, int64_t D,
                          float* out, float* inv_norms, float* work);
  void (*scores_one_block)(const float* q, const void* db, DType dt, int64_t row_stride, int64_t nt, int64_t D,
                           float* out, float* inv_norms, float* work);

  // GeM over rows of n contiguous elements (row r at x + r*row_stride elements):
  // y[r] = (mean_i max(x_ri, eps)^p)^(1/p).
  void (*gem_fwd_rows)(const void* x, DType dt, int64_t rows, int64_t row_stride, int64_t n,
                       float p, float eps, float* y);
  // GeM sums over a contiguous channel axis: C channels at x + s*pos_stride for s in [0, n);
  // acc[c] += sum_s max(x, eps)^p (acc is float32, C long).
  void (*gem_fwd_cols)(const void* x, DType dt, int64_t C, int64_t n, int64_t pos_stride,
                       float p, float eps, float* acc);

  // GeM backward, rows layout, in ratio form so that no power of y can overflow:
  // dx_ri = coef[r] * (xc / y_r)^(p-1) * [x_ri >= eps] written in dt, with xc = max(x_ri, eps)
  // and coef = dL/dy / n; if s, s[r] = sum_i (xc / y_r)^p * ln(xc / y_r), from which
  // dL/dp = sum_r dL/dy_r * y_r * s[r] / (p n).
  void (*gem_bwd_rows)(const void* x, DType dt, int64_t rows, int64_t row_stride, int64_t n,
                       float p, float eps, const float* coef, const float* inv_y,
                       const float* log_y, void* dx, float* s);
  // Columns layout: coef, inv_y, log_y and s are C long (s accumulated, +=); dx has x's layout.
  void (*gem_bwd_cols)(const void* x, DType dt, int64_t C, int64_t n, int64_t pos_stride,
                       float p, float eps, const float* coef, const float* inv_y,
                       const float* log_y, void* dx, float* s);
};

#if defined(PLM_HAVE_GENERIC)
extern const KernelTable kernels_isa_generic;
#endif
#if defined(PLM_HAVE_AVX2)
extern const KernelTable kernels_isa_avx2;
#endif
#if defined(PLM_HAVE_AVX512)
extern const KernelTable kernels_isa_avx512;
#endif

// CPU features beyond a table's own (CPUID, with the OS saving the vector state): the code
// kernels' VNNI variants.
#if defined(PLM_HAVE_AVX2)
bool has_avx_vnni();
#endif
#if defined(PLM_HAVE_AVX512)
bool has_avx512_vnni();
#endif

// The table in use (best supported, or as set by set_isa / PYLANDMARK_CPU_ISA).
const KernelTable& active_kernels();
// Names of the tables this CPU can run, best first.
const char* const* supported_isas(int* count);
// Switch to a supported table by name; throws std::invalid_argument otherwise.
void set_isa(const char* name);

}  // namespace plm::cpu
