// The exact search's building blocks, shared by the plain search (search.cpp) and the search
// from compact codes (code_search.cpp), so that both score every (query, row) pair with the same
// kernel and the same float32 operations: bit-identical scores.
#pragma once
#include <cstdint>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/search.h"
#include "cpu/topk.h"

namespace plm::cpu {

struct Plan {
  const KernelTable* kernels;
  const SearchArgs* args;
  int64_t Dp;
  const float* queries;  // Q x Dp packed float32, unit norm for cosine
  bool direct;           // the few-query kernels (scores_direct), chosen by the caller's Q
  bool blocked;          // off the direct path: scores_block (else pack_rows + scores_tile), by Q too
  int64_t query_block;
  int64_t tile_rows;
};

// The queries as the search scores them: Q x Dp float32, zero padded, each scaled to unit norm
// (in double) for cosine. Throws std::invalid_argument when a query holds NaN or inf.
std::vector<float> pack_queries(const SearchArgs& a, const KernelTable& K, int64_t Dp);
// The plan plain search() uses for a (direct when a.Q <= K.direct_max_q).
Plan make_plan(const SearchArgs& a, const KernelTable& K, const float* queries);

// Scores queries [q0, q1) against db rows [n0, n1) into lists (one per query, q0 first), rows
// offered in increasing order. A pair's score depends only on the query, the row, p.direct and,
// on the direct path, on the set of queries [q0, q1) (they share registers), never on the row's
// position or on the other rows.
void scan(const Plan& p, int64_t q0, int64_t q1, int64_t n0, int64_t n1, TopKList* lists);
// Off the direct path only: query i against rows [n0, n1) into list, each pair scored exactly as
// scan() scores it, without the other queries of a register tile (KernelTable::scores_one).
void scan_one(const Plan& p, int64_t i, int64_t n0, int64_t n1, TopKList* list);
// Everything search() does after packing: threads, query blocks or db ranges, merge, sort, into
// p.args->scores / indices.
void search_planned(Plan& p);

std::vector<TopKList> make_lists(float* scores, int64_t* indices, int64_t Q, int64_t k);

// Top-k lists kept apart per part of a search (a thread's db ranges, a share of candidate rows),
// each part one list per query, merged at the end.
class PartLists {
 public:
  PartLists(int parts, int64_t Q, int64_t k);
  TopKList* part(int t) { return lists_[static_cast<size_t>(t)].data(); }
  // Every part's entries offered to (Q, k) scores / indices, best first. offer() orders by
  // (score, index), so merging the parts in any order keeps ties to the lower index.
  void merge(float* scores, int64_t* indices);

 private:
  int64_t Q_, k_;
  std::vector<float> scores_;
  std::vector<int64_t> indices_;
  std::vector<std::vector<TopKList>> lists_;
};
const unsigned char* db_row(const SearchArgs& a, int64_t n);

}  // namespace plm::cpu
