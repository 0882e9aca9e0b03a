// Bounded top-k lists kept as binary heaps with the worst entry at the root.
// Order: higher score first, then lower index; index -1 marks an empty slot and ranks last.
#pragma once
#include <algorithm>
#include <cstdint>
#include <limits>

namespace plm::cpu {

inline bool ranks_before(float sa, int64_t ia, float sb, int64_t ib) {
  if (ia < 0 || ib < 0) return ia >= 0 && ib < 0;
  return sa > sb || (sa == sb && ia < ib);
}

// One query's list: k slots of (score, index) in caller-owned memory.
struct TopKList {
  float* score;
  int64_t* index;
  int64_t k;

  void clear() {
    std::fill(score, score + k, -std::numeric_limits<float>::infinity());
    std::fill(index, index + k, int64_t{-1});
  }
  // Scores must beat this to enter (a strict test: callers offer indices in increasing order, so
  // an equal score never displaces a lower index).
  float threshold() const {
    return index[0] < 0 ? -std::numeric_limits<float>::infinity() : score[0];
  }
  void offer(float s, int64_t i) {
    if (!ranks_before(s, i, score[0], index[0])) return;
    int64_t pos = 0;
    for (;;) {  // sift the new entry down from the root
      int64_t l = 2 * pos + 1;
      if (l >= k) break;
      int64_t r = l + 1;
      int64_t worst = (r < k && ranks_before(score[l], index[l], score[r], index[r])) ? r : l;
      if (ranks_before(s, i, score[worst], index[worst])) {  // the worse child moves up
        score[pos] = score[worst];
        index[pos] = index[worst];
        pos = worst;
      } else {
        break;
      }
    }
    score[pos] = s;
    index[pos] = i;
  }
  // Best first.
  void sort() {
    struct Entry { float s; int64_t i; };
    Entry* tmp = new Entry[k];
    for (int64_t j = 0; j < k; ++j) tmp[j] = {score[j], index[j]};
    std::sort(tmp, tmp + k, [](const Entry& a, const Entry& b) { return ranks_before(a.s, a.i, b.s, b.i); });
    for (int64_t j = 0; j < k; ++j) {
      score[j] = tmp[j].s;
      index[j] = tmp[j].i;
    }
    delete[] tmp;
  }
};

}  // namespace plm::cpu
