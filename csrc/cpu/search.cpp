// Exact batched top-k search on the CPU: cache-blocked scoring with the ISA kernels, bounded
// heaps per query, work split across threads by query blocks (many queries) or by db ranges
// (few queries) and merged. Working memory: the packed queries, per-thread tiles and heaps;
// nothing scales with N.
#include "cpu/search.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/scan.h"
#include "cpu/threads.h"
#include "cpu/topk.h"

namespace plm::cpu {

namespace {

constexpr int64_t kQueryBlockBytes = 1 << 20;  // packed queries kept hot while the db streams
constexpr int64_t kSliceBytes = 320 << 10;     // blocked kernels: the queries' d slice, in L2
constexpr int64_t kTileBytes = 256 << 10;      // one packed db tile
constexpr int64_t kDirectRows = 256;           // rows scored per call on the few-query path
constexpr int64_t kMinRowsPerThread = 2048;
constexpr int64_t kRangesPerThread = 8;        // few queries: db ranges per thread, dealt out
constexpr int64_t kMinQueriesPerThread = 48;   // below this, threads split the db instead

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }


}  // namespace

const unsigned char* db_row(const SearchArgs& a, int64_t n) {
  return static_cast<const unsigned char*>(a.db) + n * a.db_stride * dtype_size(a.db_dtype);
}

// Rows whose float32 norm the kernels could not trust (inv_norms[j] == kRedoRow: elements
// beyond ~1e19, or so small that their squares underflow) are scored again in double, which
// holds every square and product of float32 values exactly in range: scores[i * ld + j] becomes
// the cosine and inv_norms[j] 1. Rare; costs one pass over such a row per query block.
static void redo_extreme_rows(const Plan& p, const float* queries, int64_t nq, int64_t n0, int64_t nt,
                       float* scores, int64_t ld, float* inv_norms) {
  const SearchArgs& a = *p.args;
  std::vector<float> row;
  for (int64_t j = 0; j < nt; ++j) {
    if (inv_norms[j] != kRedoRow) continue;
    row.resize(p.Dp);
    p.kernels->pack_rows(db_row(a, n0 + j), a.db_dtype, a.db_stride, 1, a.D, p.Dp, row.data(), nullptr);
    double n2 = 0.0;
    for (int64_t d = 0; d < a.D; ++d) n2 += static_cast<double>(row[d]) * row[d];
    const double inv = 1.0 / std::sqrt(n2);  // inf for a zero row, NaN for a NaN row
    for (int64_t i = 0; i < nq; ++i) {
      const float* q = queries + i * p.Dp;
      double dot = 0.0;
      for (int64_t d = 0; d < a.D; ++d) dot += static_cast<double>(q[d]) * row[d];
      scores[i * ld + j] = n2 == 0.0 ? 0.0f : static_cast<float>(dot * inv);
    }
    inv_norms[j] = 1.0f;
  }
}

// Offers scores[i * ld + j] (times inv_norms[j] for cosine) for queries [0, nq) and rows
// [n0, n1 + nt) to lists[0..nq). Runs of kOfferRun scores are first tested at once (a loop the
// compiler vectorises): once a list is full, almost no score beats its threshold.
constexpr int64_t kOfferRun = 32;

template <bool COSINE>
static void offer_block_t(const float* scores, int64_t ld, int64_t nq, int64_t nt, int64_t n0,
                   const float* inv_norms, TopKList* lists) {
  for (int64_t i = 0; i < nq; ++i) {
    const float* row = scores + i * ld;
    TopKList& list = lists[i];
    float thr = list.threshold();
    for (int64_t j0 = 0; j0 < nt; j0 += kOfferRun) {
      const int64_t j1 = std::min(nt, j0 + kOfferRun);
      int hit = 0;
      for (int64_t j = j0; j < j1; ++j) hit |= (COSINE ? row[j] * inv_norms[j] : row[j]) > thr;
      if (!hit) continue;
      for (int64_t j = j0; j < j1; ++j) {
        const float s = COSINE ? row[j] * inv_norms[j] : row[j];
        if (s > thr) {
          list.offer(s, n0 + j);
          thr = list.threshold();
        }
      }
    }
  }
}

static void offer_block(const float* scores, int64_t ld, int64_t nq, int64_t nt, int64_t n0,
                 const float* inv_norms, TopKList* lists) {
  if (inv_norms) return offer_block_t<true>(scores, ld, nq, nt, n0, inv_norms, lists);
  offer_block_t<false>(scores, ld, nq, nt, n0, nullptr, lists);
}

// Scores queries [q0, q1) against db rows [n0, n1) into lists (one per query, q0 first).
void scan(const Plan& p, int64_t q0, int64_t q1, int64_t n0, int64_t n1, TopKList* lists) {
  const SearchArgs& a = *p.args;
  const KernelTable& K = *p.kernels;
  if (n1 <= n0 || q1 <= q0) return;
  if (p.direct) {
    std::vector<float> scores((q1 - q0) * kDirectRows), inv(kDirectRows);
    for (int64_t n = n0; n < n1; n += kDirectRows) {
      const int64_t nt = std::min(kDirectRows, n1 - n);
      K.scores_direct(p.queries + q0 * p.Dp, q1 - q0, db_row(a, n), a.db_dtype, a.db_stride,
                      nt, a.D, scores.data(), a.cosine ? inv.data() : nullptr);
      if (a.cosine) redo_extreme_rows(p, p.queries + q0 * p.Dp, q1 - q0, n, nt, scores.data(), nt, inv.data());
      offer_block(scores.data(), nt, q1 - q0, nt, n, a.cosine ? inv.data() : nullptr, lists);
    }
    return;
  }
  if (p.blocked) {
    const int64_t ld = round_up(p.tile_rows, K.block_nr);
    std::vector<float> panels(round_up(p.query_block, K.block_mr) * p.Dp), work(ld * p.Dp);
    std::vector<float> scores(round_up(p.query_block, K.block_mr) * ld), inv(p.tile_rows);
    for (int64_t qb = q0; qb < q1; qb += p.query_block) {
      const int64_t nq = std::min(p.query_block, q1 - qb);
      K.pack_query_panels(p.queries + qb * p.Dp, nq, p.Dp, panels.data());
      for (int64_t n = n0; n < n1; n += p.tile_rows) {
        const int64_t nt = std::min(p.tile_rows, n1 - n);
        const int64_t next_nt = std::min(p.tile_rows, n1 - n - nt);
        K.scores_block(panels.data(), nq, db_row(a, n), a.db_dtype, a.db_stride, nt, a.D,
                       scores.data(), ld, a.cosine ? inv.data() : nullptr, work.data(),
                       next_nt > 0 ? db_row(a, n + nt) : nullptr, next_nt);
        if (a.cosine) redo_extreme_rows(p, p.queries + qb * p.Dp, nq, n, nt, scores.data(), ld, inv.data());
        offer_block(scores.data(), ld, nq, nt, n, a.cosine ? inv.data() : nullptr, lists + (qb - q0));
      }
    }
    return;
  }
  std::vector<float> tile(p.tile_rows * p.Dp), inv(p.tile_rows);
  std::vector<float> scores(p.query_block * p.tile_rows);
  for (int64_t qb = q0; qb < q1; qb += p.query_block) {
    const int64_t nq = std::min(p.query_block, q1 - qb);
    for (int64_t n = n0; n < n1; n += p.tile_rows) {
      const int64_t nt = std::min(p.tile_rows, n1 - n);
      K.pack_rows(db_row(a, n), a.db_dtype, a.db_stride, nt, a.D, p.Dp, tile.data(),
                  a.cosine ? inv.data() : nullptr);
      K.scores_tile(p.queries + qb * p.Dp, nq, tile.data(), nt, p.Dp, scores.data());
      if (a.cosine) redo_extreme_rows(p, p.queries + qb * p.Dp, nq, n, nt, scores.data(), nt, inv.data());
      offer_block(scores.data(), nt, nq, nt, n, a.cosine ? inv.data() : nullptr, lists + (qb - q0));
    }
  }
}

void scan_one(const Plan& p, int64_t i, int64_t n0, int64_t n1, TopKList* list) {
  const SearchArgs& a = *p.args;
  const KernelTable& K = *p.kernels;
  const float* q = p.queries + i * p.Dp;
  const int64_t rows = p.tile_rows;
  std::vector<float> scores(rows), inv(rows), work((round_up(rows, 16) + 16) * p.Dp);
  for (int64_t n = n0; n < n1; n += rows) {
    const int64_t nt = std::min(rows, n1 - n);
    (p.blocked ? K.scores_one_block : K.scores_one_tile)(q, db_row(a, n), a.db_dtype, a.db_stride, nt, a.D,
                                                         scores.data(), a.cosine ? inv.data() : nullptr, work.data());
    if (a.cosine) redo_extreme_rows(p, q, 1, n, nt, scores.data(), nt, inv.data());
    offer_block(scores.data(), nt, 1, nt, n, a.cosine ? inv.data() : nullptr, list);
  }
}

std::vector<TopKList> make_lists(float* scores, int64_t* indices, int64_t Q, int64_t k) {
  std::vector<TopKList> lists(Q);
  for (int64_t i = 0; i < Q; ++i) {
    lists[i] = {scores + i * k, indices + i * k, k};
    lists[i].clear();
  }
  return lists;
}

std::vector<float> pack_queries(const SearchArgs& a, const KernelTable& K, int64_t Dp) {
  std::vector<float> queries(a.Q * Dp);
  K.pack_rows(a.queries, a.query_dtype, a.query_stride, a.Q, a.D, Dp, queries.data(), nullptr);
  for (int64_t i = 0; i < a.Q; ++i) {
    float* row = queries.data() + i * Dp;
    for (int64_t d = 0; d < a.D; ++d)
      if (!std::isfinite(row[d]))
        throw std::invalid_argument("queries: row " + std::to_string(i) + " contains NaN or inf; "
                                    "replace or drop such rows before searching");
    if (!a.cosine) continue;
    // unit queries, the norm in double: float32 squares of 1e20 overflow, of 1e-25 underflow
    double n2 = 0.0;
    for (int64_t d = 0; d < a.D; ++d) n2 += static_cast<double>(row[d]) * row[d];
    const double inv = n2 > 0.0 ? 1.0 / std::sqrt(n2) : 0.0;
    for (int64_t d = 0; d < a.D; ++d) row[d] = static_cast<float>(row[d] * inv);
  }
  return queries;
}

Plan make_plan(const SearchArgs& a, const KernelTable& K, const float* queries) {
  Plan p;
  p.kernels = &K;
  p.args = &a;
  p.Dp = padded_dim(a.D);
  p.queries = queries;
  p.direct = a.Q <= K.direct_max_q;
  p.blocked = K.scores_block != nullptr && a.Q >= K.block_min_q;
  p.query_block = std::clamp<int64_t>(kQueryBlockBytes / (p.Dp * 4), 6, 512) / 6 * 6;
  p.tile_rows = std::max<int64_t>(8, std::min<int64_t>(512, kTileBytes / (p.Dp * 4)) / 4 * 4);
  return p;
}

void search(const SearchArgs& a) {
  if (a.Q == 0) return;
  const KernelTable& K = active_kernels();
  std::vector<float> queries = pack_queries(a, K, padded_dim(a.D));
  Plan p = make_plan(a, K, queries.data());
  search_planned(p);
}

void search_planned(Plan& p) {
  const SearchArgs& a = *p.args;
  const KernelTable& K = *p.kernels;
  const int64_t Dp = p.Dp;
  int threads = a.threads > 0 ? a.threads : get_num_threads();
  const int64_t flops = a.Q * a.N * std::max<int64_t>(a.D, 16);
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, flops >> 22)));

  if (!p.direct && a.Q >= threads * kMinQueriesPerThread) {
    // Many queries: each thread owns whole query blocks, streams the db once per block, and
    // keeps its lists in the output arrays.
    if (p.blocked) {
      // Equal blocks, a multiple of the threads in number: every block streams the whole db and
      // packs it for its queries, so the largest blocks whose d slice stays in L2 are best.
      const int64_t slice = std::min<int64_t>(Dp, K.block_kc) * 4;
      const int64_t most = std::clamp<int64_t>(kSliceBytes / slice, K.block_mr, 512);
      const int64_t nblocks = round_up((a.Q + most - 1) / most, threads);
      p.query_block = round_up((a.Q + nblocks - 1) / nblocks, K.block_mr);
    } else {
      p.query_block = std::min(p.query_block, round_up((a.Q + threads - 1) / threads, 6));
    }
    auto lists = make_lists(a.scores, a.indices, a.Q, a.k);
    const int64_t nblocks = (a.Q + p.query_block - 1) / p.query_block;
    WorkQueue work(nblocks);
    parallel_for(threads, [&](int) {
      long long b;
      while (work.next(&b)) {
        const int64_t q0 = b * p.query_block, q1 = std::min(a.Q, q0 + p.query_block);
        scan(p, q0, q1, 0, a.N, lists.data() + q0);
        for (int64_t i = q0; i < q1; ++i) lists[i].sort();
      }
    });
    return;
  }

  // Few queries: the threads scan db ranges into private lists, merged afterwards. The ranges
  // are handed out in increasing order, kRangesPerThread per thread on average, so that a thread
  // slowed by other work on its core takes fewer of them.
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, a.N / kMinRowsPerThread)));
  const int64_t pieces = threads == 1 ? 1 : threads * kRangesPerThread;
  const int64_t chunk = round_up(std::max<int64_t>((a.N + pieces - 1) / pieces,
                                                   threads == 1 ? 1 : kMinRowsPerThread), p.tile_rows);
  WorkQueue ranges((a.N + chunk - 1) / chunk);
  // Each thread takes its ranges in increasing order, so its lists see increasing indices (the
  // strict threshold test keeps ties to the lower index).
  PartLists parts(threads, a.Q, a.k);
  parallel_for(threads, [&](int t) {
    long long r;
    while (ranges.next(&r)) {
      const int64_t n0 = r * chunk, n1 = std::min(a.N, n0 + chunk);
      scan(p, 0, a.Q, n0, n1, parts.part(t));
    }
  });
  parts.merge(a.scores, a.indices);
}

PartLists::PartLists(int parts, int64_t Q, int64_t k)
    : Q_(Q), k_(k), scores_(static_cast<size_t>(parts) * Q * k), indices_(scores_.size()), lists_(parts) {
  for (int t = 0; t < parts; ++t) lists_[t] = make_lists(scores_.data() + t * Q * k, indices_.data() + t * Q * k, Q, k);
}

void PartLists::merge(float* scores, int64_t* indices) {
  auto out = make_lists(scores, indices, Q_, k_);
  for (int64_t i = 0; i < Q_; ++i) {
    for (auto& part : lists_) {
      TopKList& src = part[i];
      src.sort();
      for (int64_t j = 0; j < k_ && src.index[j] >= 0; ++j) out[i].offer(src.score[j], src.index[j]);
    }
    out[i].sort();
  }
}

}  // namespace plm::cpu
