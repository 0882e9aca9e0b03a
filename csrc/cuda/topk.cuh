// Exact top-k on the GPU, one warp per list.
//
// An entry (score, index) is packed into one 64-bit key that orders like the result: higher
// score first, then lower index. Key 0 is the empty slot (-inf, -1) and ranks last. A list of K
// entries (K a power of two >= 32) is held by a warp with K/32 keys per lane, entry i in slot
// i / 32 of lane i % 32; the sorting networks below exchange keys by shuffles (strides < 32) or
// inside a lane (strides >= 32), so no shared memory is needed.
#pragma once
#include <cstdint>

namespace plm::cuda::topk {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ uint64_t make_key(float score, uint32_t index) {
  if (score == 0.0f) score = 0.0f;  // -0 and +0 tie, as on the CPU
  const uint32_t u = __float_as_uint(score);
  const uint32_t ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<uint64_t>(ordered) << 32) | static_cast<uint32_t>(~index);
}

__device__ __forceinline__ float key_score(uint64_t key) {
  if (key == 0) return -__uint_as_float(0x7f800000u);
  const uint32_t ordered = static_cast<uint32_t>(key >> 32);
  return __uint_as_float((ordered & 0x80000000u) ? (ordered & 0x7fffffffu) : ~ordered);
}

__device__ __forceinline__ int64_t key_index(uint64_t key) {
  return key == 0 ? int64_t{-1} : static_cast<int64_t>(~static_cast<uint32_t>(key));
}

// Scores that can enter a list: NaN and -inf never do (as on the CPU).
__device__ __forceinline__ bool admissible(float score) { return score > -__uint_as_float(0x7f800000u); }

__device__ __forceinline__ uint64_t kmax(uint64_t a, uint64_t b) { return a > b ? a : b; }
__device__ __forceinline__ uint64_t kmin(uint64_t a, uint64_t b) { return a < b ? a : b; }

// One compare-exchange step of a bitonic network over PL keys per lane: element i pairs with
// i ^ stride; within a block of `size` the pair is ordered descending when (i & size) == 0
// (size = 0: always descending).
template <int PL>
__device__ __forceinline__ void bitonic_step(uint64_t (&v)[PL], int size, int stride, int lane) {
  if (stride >= 32) {
    const int js = stride / 32;
#pragma unroll
    for (int j = 0; j < PL; ++j) {
      const int jp = j ^ js;
      if (jp > j) {
        const int i = j * 32 + lane;
        const bool desc = (i & size) == 0;
        const uint64_t hi = kmax(v[j], v[jp]), lo = kmin(v[j], v[jp]);
        v[j] = desc ? hi : lo;
        v[jp] = desc ? lo : hi;
      }
    }
  } else {
    const bool lower = (lane & stride) == 0;
#pragma unroll
    for (int j = 0; j < PL; ++j) {
      const int i = j * 32 + lane;
      const bool desc = (i & size) == 0;
      const uint64_t other = __shfl_xor_sync(kFullMask, v[j], stride);
      v[j] = (lower == desc) ? kmax(v[j], other) : kmin(v[j], other);
    }
  }
}

// Sorts PL*32 keys descending.
template <int PL>
__device__ __forceinline__ void warp_sort(uint64_t (&v)[PL], int lane) {
#pragma unroll
  for (int size = 2; size <= PL * 32; size <<= 1) {
    // The last stage sorts the whole list descending: (i & size) == 0 for every i < size.
#pragma unroll
    for (int stride = size / 2; stride > 0; stride >>= 1) bitonic_step<PL>(v, size, stride, lane);
  }
}

// Sorts a bitonic sequence of PL*32 keys descending.
template <int PL>
__device__ __forceinline__ void warp_bitonic_merge(uint64_t (&v)[PL], int lane) {
#pragma unroll
  for (int stride = PL * 16; stride > 0; stride >>= 1) bitonic_step<PL>(v, 0, stride, lane);
}

// list (KL keys per lane, sorted descending) becomes the top KL*32 of list U other, where other
// (OL <= KL keys per lane) is sorted descending too.
template <int KL, int OL>
__device__ __forceinline__ void warp_merge_top(uint64_t (&list)[KL], const uint64_t (&other)[OL], int lane) {
  // Pair list[i] with other[K-1-i] (other read backwards, padded with empty keys): the larger
  // of each pair forms a bitonic sequence holding exactly the top K of the union.
#pragma unroll
  for (int j = 0; j < KL; ++j) {
    const int src_slot = KL - 1 - j;
    if (src_slot < OL) {
      const uint64_t o = __shfl_sync(kFullMask, other[src_slot], 31 - lane);
      list[j] = kmax(list[j], o);
    }
  }
  warp_bitonic_merge<KL>(list, lane);
}

// Key at position `pos` of a warp-held list (every lane gets it).
template <int KL>
__device__ __forceinline__ uint64_t warp_get(const uint64_t (&list)[KL], int pos) {
  uint64_t mine = 0;
#pragma unroll
  for (int j = 0; j < KL; ++j)
    if (j == pos / 32) mine = list[j];
  return __shfl_sync(kFullMask, mine, pos % 32);
}

}  // namespace plm::cuda::topk
