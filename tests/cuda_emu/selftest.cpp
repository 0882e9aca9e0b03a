// Self-test kernels for emu.h, built as a shared library and driven from tests/test_cuda_emu.py
// (ctypes + numpy). Every exported st_* function returns 0 on success, or 1 after copying the
// emulator's error message into err.
#include "emu.h"

#include <cuda_runtime.h>  // must still compile after emu.h (threadIdx & co. stay emulated)

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <exception>

using plm::cuda::ptx::cp_async16;
using plm::cuda::ptx::cp_async_commit;
using plm::cuda::ptx::cp_async_wait;
using plm::cuda::ptx::ldmatrix_x4;
using plm::cuda::ptx::mma_16816;

namespace {

constexpr unsigned FULL = 0xffffffffu;

template <class F>
int guarded(char* err, int errlen, F&& f) {
  if (err && errlen > 0) err[0] = '\0';
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    if (err && errlen > 0) std::snprintf(err, static_cast<size_t>(errlen), "%s", e.what());
    return 1;
  }
}

// ------------------------------------------ reduction ------------------------------------------
// Block-wide sum of x[blockIdx.x * n, +n) with warp shuffles and shared memory. racy = 1 drops the
// __syncthreads between writing the per-warp partials and reading them back.
__global__ void block_sum_kernel(const float* __restrict__ x, int n, float* __restrict__ out,
                                 int racy) {
  float* part = reinterpret_cast<float*>(plm::cuda::ptx::dynamic_smem());
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int nwarps = static_cast<int>((blockDim.x + 31) / 32);
  const float* xb = x + static_cast<size_t>(blockIdx.x) * n;
  float v = 0.f;
  for (int i = tid; i < n; i += static_cast<int>(blockDim.x)) v += __ldg(xb + i);
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
  if (lane == 0) part[warp] = v;
  if (!racy) __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? part[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(FULL, v, static_cast<unsigned>(o));
    if (lane == 0) out[blockIdx.x] = v;
  }
}

// ------------------------------------ tree reduction ------------------------------------
// Ascending sort of one value per lane across the warp (bitonic network, 15 shuffles).
__device__ int warp_sort(int v, int lane) {
  for (int k = 2; k <= 32; k <<= 1)
    for (int j = k >> 1; j > 0; j >>= 1) {
      const int other = __shfl_xor_sync(FULL, v, j);
      const bool ascending = (lane & k) == 0, lower = (lane & j) == 0;
      v = lower == ascending ? min(v, other) : max(v, other);
    }
  return v;
}

// The shape of the search's merge_lists tree: every warp holds a 32-value list (one per lane);
// level by level, warps [half, active) park their lists in shared memory and warps [0, half)
// combine them with their own (elementwise sum, then a warp sort: many warp collectives).
// racy = 1 drops the trailing __syncthreads of each level, so at the next level warps
// [half/2, half) may overwrite parked slots that warps [0, half/2) have not read yet. In-order
// and random schedules miss that (the overwriting warp needs a whole sort first); it shows when
// one warp runs ahead of another. out[blockIdx.x][32] = warp 0's final list.
__global__ void tree_kernel(const int* __restrict__ x, int* __restrict__ out, int racy) {
  int* parked = reinterpret_cast<int*>(plm::cuda::ptx::dynamic_smem());  // [warps / 2][32]
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  int v = x[blockIdx.x * blockDim.x + tid];
  for (int active = static_cast<int>(blockDim.x / 32); active > 1; active /= 2) {
    const int half = active / 2;
    if (warp >= half && warp < active) parked[(warp - half) * 32 + lane] = v;
    __syncthreads();
    if (warp < half) v = warp_sort(v + parked[warp * 32 + lane], lane);
    if (!racy) __syncthreads();
  }
  if (warp == 0) out[blockIdx.x * 32 + lane] = v;
}

// Intra-warp: lane l stores s[l], then reads its left neighbour's slot s[l - 1] (lane 0 its own).
// racy = 1 drops the __syncwarp in between: an in-order schedule still gets it right (lane l - 1
// ran first), a random lane order does not.
__global__ void lane_shift_kernel(int* out, int racy) {
  int* s = reinterpret_cast<int*>(plm::cuda::ptx::dynamic_smem());
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  s[tid] = tid * 3 + 1;
  if (!racy) __syncwarp();
  out[blockIdx.x * blockDim.x + tid] = s[lane == 0 ? tid : tid - 1];
}

// ----------------------------------------- divergence -----------------------------------------
__global__ void divergence_kernel(int variant, int* out) {
  const unsigned tid = threadIdx.x, lane = tid & 31;
  int v = static_cast<int>(tid);
  switch (variant) {
    case 0:  // correct
      __syncthreads();
      v += __shfl_xor_sync(FULL, v, 1);
      __syncwarp();
      __syncthreads();
      break;
    case 1:  // half of the block skips __syncthreads and exits
      if (tid < blockDim.x / 2) __syncthreads();
      break;
    case 2:  // half of the block skips the first __syncthreads and reaches the second
      if (tid < blockDim.x / 2) __syncthreads();
      __syncthreads();
      break;
    case 3:  // only half of a warp shuffles; the other lanes exit
      if (lane < 16) v += __shfl_xor_sync(FULL, v, 1);
      break;
    case 4:  // lanes of a warp at different collectives
      if (lane < 16)
        v += __shfl_xor_sync(FULL, v, 1);
      else
        v += static_cast<int>(__ballot_sync(FULL, 1));
      break;
    case 5:  // half a warp at a shuffle, the other half at __syncthreads
      if (lane < 16) v += __shfl_xor_sync(FULL, v, 1);
      __syncthreads();
      break;
    case 6:  // partial mask
      __syncwarp(0x0000ffffu);
      break;
    case 7:  // exception escaping the kernel
      if (tid == 5) throw std::runtime_error("boom from thread 5");
      __syncthreads();
      break;
    case 8: {  // misaligned ldmatrix row address
      uint32_t r[4];
      ldmatrix_x4(r, plm::cuda::ptx::dynamic_smem() + 16 * lane + (lane == 3 ? 4 : 0));
      v += static_cast<int>(r[0]);
      break;
    }
    case 9: {  // cp.async into a local (stack) array instead of shared memory
      alignas(16) unsigned char local[16];
      alignas(16) static const unsigned char src[16] = {};
      cp_async16(local, src, true);
      cp_async_commit();
      cp_async_wait<0>();
      v += local[0];
      break;
    }
    case 10:  // __trap
      if (tid == 40) __trap();
      __syncthreads();
      break;
    case 11:  // shuffle of 4-byte vs 8-byte values in one warp
      if (lane == 7)
        v += static_cast<int>(__shfl_xor_sync(FULL, static_cast<long long>(v), 1));
      else
        v += __shfl_xor_sync(FULL, v, 1);
      break;
    case 12:  // one thread exits early, the others reach __syncthreads later
      if (tid == 70) return;
      __syncthreads();
      break;
    default: break;
  }
  out[blockIdx.x * blockDim.x + tid] = v;
}

// ------------------------------------------ shuffles ------------------------------------------
struct ShuffleOut {
  int* idx;
  int* up;
  int* down;
  int* xr;
  long long* idx64;
  double* xr_dbl;
  unsigned* ballot;
  int* any;
  int* all;
  unsigned* radd;
  int* rmin;
  unsigned* rmax;
  int* count;
  int* sand;
  int* sor;
};

__global__ void shuffle_kernel(int width, int src_mul, int src_add, unsigned delta, int xmask,
                               ShuffleOut o) {
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int var = tid * 10 + 1;
  o.idx[tid] = __shfl_sync(FULL, var, lane * src_mul + src_add, width);
  o.up[tid] = __shfl_up_sync(FULL, var, delta, width);
  o.down[tid] = __shfl_down_sync(FULL, var, delta, width);
  o.xr[tid] = __shfl_xor_sync(FULL, var, xmask, width);
  const long long v64 = (static_cast<long long>(tid) << 40) | (tid + 7);
  o.idx64[tid] = __shfl_sync(FULL, v64, lane * src_mul + src_add, width);
  o.xr_dbl[tid] = __shfl_xor_sync(FULL, 0.5 + tid, xmask, width);
  o.ballot[tid] = __ballot_sync(FULL, tid % 3 == 0);
  o.any[tid] = __any_sync(FULL, tid == 33);
  o.all[tid] = __all_sync(FULL, tid != 5);
  o.radd[tid] = __reduce_add_sync(FULL, static_cast<unsigned>(tid));
  o.rmin[tid] = __reduce_min_sync(FULL, 100 - tid);
  o.rmax[tid] = __reduce_max_sync(FULL, static_cast<unsigned>(tid * 7 % 11));
  o.count[tid] = __syncthreads_count(tid % 5 == 0);
  o.sand[tid] = __syncthreads_and(tid < 1000);
  o.sor[tid] = __syncthreads_or(tid == 3);
}

// ------------------------------------------ ldmatrix ------------------------------------------
// Four 8x8 b16 matrices in shared memory, row stride `stride` halves; lane L passes the address of
// row L%8 of matrix L/8 (lanes >= 8*num pass row addresses too; they must be ignored).
template <int NUM, bool TRANS>
__global__ void ldmatrix_kernel(const uint16_t* m, int stride, uint32_t* out) {
  auto* s = reinterpret_cast<uint16_t*>(plm::cuda::ptx::dynamic_smem());
  const unsigned lane = threadIdx.x;
  for (int i = static_cast<int>(lane); i < 4 * 8 * stride; i += 32) s[i] = m[i];
  __syncthreads();
  uint32_t r[4] = {0xdeadbeefu, 0xdeadbeefu, 0xdeadbeefu, 0xdeadbeefu};
  const uint16_t* row = s + ((lane / 8) * 8 + lane % 8) * stride;
  if (NUM == 4 && !TRANS)
    ldmatrix_x4(r, row);
  else
    emu::ldmatrix<NUM, TRANS>(r, row);
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r[i];
}

// -------------------------------------------- mma --------------------------------------------
template <class T>
__global__ void mma_frag_kernel(const uint32_t* a, const uint32_t* b, float* d) {
  const unsigned lane = threadIdx.x;
  uint32_t ra[4], rb[2];
  float rd[4];
  for (int i = 0; i < 4; ++i) ra[i] = a[lane * 4 + i];
  for (int i = 0; i < 2; ++i) rb[i] = b[lane * 2 + i];
  for (int i = 0; i < 4; ++i) rd[i] = d[lane * 4 + i];
  mma_16816<T>(rd, ra, rb);
  for (int i = 0; i < 4; ++i) d[lane * 4 + i] = rd[i];
}

// D (16x16) = A (16x16, row-major) @ B^T + C, B stored [n][k] (16x16, k contiguous). One warp:
// cp.async both tiles to shared memory (row stride 24 halves), ldmatrix_x4 for A and for B (two
// n8 tiles), two mma_16816.
template <class T>
__global__ void mma_tile_kernel(const uint16_t* A, const uint16_t* B, const float* C, float* D) {
  constexpr int kStride = 24;  // halves; 48 bytes keeps 16-byte alignment
  auto* sA = reinterpret_cast<uint16_t*>(plm::cuda::ptx::dynamic_smem());
  uint16_t* sB = sA + 16 * kStride;
  const unsigned lane = threadIdx.x;
  {
    const unsigned r = lane / 2, c = (lane % 2) * 8;  // 32 lanes x 16 bytes = one 16x16 tile
    cp_async16(sA + r * kStride + c, A + r * 16 + c, true);
    cp_async16(sB + r * kStride + c, B + r * 16 + c, true);
    cp_async_commit();
    cp_async_wait<0>();
  }
  __syncthreads();
  const unsigned mi = lane / 8, ri = lane % 8;
  uint32_t a[4], b[4];
  // A: matrix 0 = rows 0-7 / k 0-7, 1 = rows 8-15 / k 0-7, 2 = rows 0-7 / k 8-15, 3 = rows 8-15 / k 8-15
  ldmatrix_x4(a, sA + (ri + 8 * (mi & 1)) * kStride + 8 * (mi >> 1));
  // B: matrix 0 = n 0-7 / k 0-7, 1 = n 0-7 / k 8-15, 2 = n 8-15 / k 0-7, 3 = n 8-15 / k 8-15
  ldmatrix_x4(b, sB + (ri + 8 * (mi >> 1)) * kStride + 8 * (mi & 1));
  const unsigned g = lane / 4, t = lane % 4;
  for (int nt = 0; nt < 2; ++nt) {
    float d[4];
    for (int i = 0; i < 4; ++i) d[i] = C[(g + 8 * (i >> 1)) * 16 + nt * 8 + 2 * t + (i & 1)];
    const uint32_t bt[2] = {b[2 * nt], b[2 * nt + 1]};
    mma_16816<T>(d, a, bt);
    for (int i = 0; i < 4; ++i) D[(g + 8 * (i >> 1)) * 16 + nt * 8 + 2 * t + (i & 1)] = d[i];
  }
}

// ------------------------------------------ cp.async ------------------------------------------
// 32 threads, two stages of 32 x 16 bytes. Thread t copies chunk t of src0 (invalid when t%4 == 3:
// zero-fill, source pointer null) into stage 0 (group 0), chunk t of src1 into stage 1 (group 1),
// then bumps src0's first word (the copy must read the source when it is performed).
// Records the first word of its chunks: before any wait, after wait<1>, after wait<0>; and the
// first word of a chunk copied by thread 0 with no wait at all, read by thread 1 after a barrier.
__global__ void cp_async_kernel(uint32_t* src0, const uint32_t* src1, uint32_t* rec) {
  unsigned char* smem = plm::cuda::ptx::dynamic_smem();
  const unsigned t = threadIdx.x;
  unsigned char* st0 = smem + 16 * t;
  unsigned char* st1 = smem + 512 + 16 * t;
  const bool valid = t % 4 != 3;
  cp_async16(st0, valid ? src0 + 4 * t : nullptr, valid);
  cp_async_commit();
  cp_async16(st1, src1 + 4 * t, true);
  cp_async_commit();
  if (valid) src0[4 * t] += 1000;
  uint32_t w;
  std::memcpy(&w, st0, 4);
  rec[0 * 32 + t] = w;
  std::memcpy(&w, st1, 4);
  rec[1 * 32 + t] = w;
  cp_async_wait<1>();
  std::memcpy(&w, st0, 4);
  rec[2 * 32 + t] = w;
  std::memcpy(&w, st1, 4);
  rec[3 * 32 + t] = w;
  cp_async_wait<0>();
  std::memcpy(&w, st1, 4);
  rec[4 * 32 + t] = w;
  // never-waited copy: thread 0 copies into a third stage and never waits
  if (t == 0) {
    cp_async16(smem + 1024, src1, true);
    cp_async_commit();
  }
  __syncthreads();
  if (t == 1) {
    std::memcpy(&w, smem + 1024, 4);
    rec[5 * 32] = w;
  }
  __syncthreads();  // thread 0 has not exited yet (exit would complete its copy) when 1 reads
}

// ------------------------------------------ static __shared__ ------------------------------------------
__global__ void static_shared_kernel(int* out) {
  __shared__ int s[4];
  if (threadIdx.x == 0) s[0] = static_cast<int>(blockIdx.x) + 1;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = s[0] * 10 + atomicAdd(&s[1], 1) * 0;
  __syncthreads();
}

// ------------------------------------------ keywords / intrinsics ------------------------------------------
struct __align__(16) Pair {
  float a, b, c, d;
};
__constant__ int kBias = 3;

__device__ __forceinline__ unsigned lane_id() { return threadIdx.x % warpSize; }

// out[0..7] per thread: popc, ffs, float bits round trip, mixed min/max, atomicAdd (float) total,
// gridDim.x * blockDim.x, block-static counter, aligned load.
__global__ void __launch_bounds__(64, 2) misc_kernel(const Pair* __restrict__ pairs, int* out,
                                                     float* fsum) {
  static __shared__ int counter;
  const unsigned tid = threadIdx.x;
  if (tid == 0) counter = 0;
  __syncthreads();
  atomicAdd(&counter, 1);
  atomicAdd(fsum, 0.5f);
  __syncthreads();
  const Pair p = __ldg(pairs + tid);
  int* o = out + 8 * (blockIdx.x * blockDim.x + tid);
  o[0] = __popc(tid * 2654435761u);
  o[1] = __ffs(static_cast<int>(tid));
  o[2] = static_cast<int>(__float_as_uint(__uint_as_float(0x3f800000u + tid)) - 0x3f800000u);
  o[3] = static_cast<int>(min(tid, 40u)) + max(-1, static_cast<int>(lane_id()) - 30) + kBias;
  o[4] = static_cast<int>(gridDim.x * blockDim.x);
  o[5] = counter;
  o[6] = static_cast<int>(p.a + p.d);
  o[7] = __popcll(0xF0F0F0F0F0ull << (tid % 8)) + __clz(static_cast<int>(tid + 1));
}

// ------------------------------------------- bench -------------------------------------------
__global__ void bench_kernel(int iters, unsigned* out) {
  unsigned* s = reinterpret_cast<unsigned*>(plm::cuda::ptx::dynamic_smem());
  const unsigned tid = threadIdx.x;
  unsigned v = tid;
  for (int i = 0; i < iters; ++i) {
    v += __shfl_xor_sync(FULL, v, 1 + (i & 15));
    if (i % 4 == 3) {
      s[tid] = v;
      __syncthreads();
      v ^= s[(tid + 1) % blockDim.x];
      __syncthreads();
    }
  }
  out[blockIdx.x * blockDim.x + tid] = v;
}

}  // namespace

extern "C" {

void st_set_seed(uint64_t seed) { emu::set_schedule_seed(seed); }
// 0: emu::ScheduleMode::warp_priority (the default), 1: emu::ScheduleMode::random.
void st_set_mode(int mode) {
  emu::set_schedule_mode(mode ? emu::ScheduleMode::random : emu::ScheduleMode::warp_priority);
}

int st_tree(const int* x, int blocks, int threads, int racy, int* out, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    emu::launch_kernel(tree_kernel, blocks, threads, (threads / 64) * 32 * sizeof(int), x, out, racy);
  });
}

int st_lane_shift(int blocks, int threads, int racy, int* out, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    emu::launch_kernel(lane_shift_kernel, blocks, threads, threads * sizeof(int), out, racy);
  });
}

int st_block_sum(const float* x, int n, int blocks, int threads, int racy, float* out, char* err,
                 int errlen) {
  return guarded(err, errlen, [&] {
    emu::launch(dim3(blocks), dim3(threads), 32 * sizeof(float),
                [&] { block_sum_kernel(x, n, out, racy); });
  });
}

int st_divergence(int variant, int blocks, int threads, int* out, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    emu::launch_kernel(divergence_kernel, dim3(blocks), dim3(threads), 1024, variant, out);
  });
}

int st_bad_block_shape(char* err, int errlen) {
  return guarded(err, errlen, [&] { emu::launch(dim3(1), dim3(32, 2), 0, [] {}); });
}

int st_outside_kernel(char* err, int errlen) {
  return guarded(err, errlen, [&] { __syncthreads(); });
}

// threadIdx.x outside a kernel: the poison value 0xFFFFFFFF.
unsigned st_thread_idx_outside() { return threadIdx.x; }

int st_shuffles(int threads, int width, int src_mul, int src_add, unsigned delta, int xmask,
                int* idx, int* up, int* down, int* xr, long long* idx64, double* xr_dbl,
                unsigned* ballot, int* any, int* all, unsigned* radd, int* rmin, unsigned* rmax,
                int* count, int* sand, int* sor, char* err, int errlen) {
  ShuffleOut o{idx, up, down, xr, idx64, xr_dbl, ballot, any, all, radd, rmin, rmax, count, sand, sor};
  return guarded(err, errlen, [&] {
    emu::launch_kernel(shuffle_kernel, dim3(1), dim3(threads), 0, width, src_mul, src_add, delta,
                       xmask, o);
  });
}

int st_ldmatrix(int num, int trans, const uint16_t* m, int stride, uint32_t* out, char* err,
                int errlen) {
  return guarded(err, errlen, [&] {
    const size_t smem = 4 * 8 * static_cast<size_t>(stride) * 2;
    if (num == 4 && !trans) emu::launch_kernel(ldmatrix_kernel<4, false>, 1, 32, smem, m, stride, out);
    if (num == 2 && !trans) emu::launch_kernel(ldmatrix_kernel<2, false>, 1, 32, smem, m, stride, out);
    if (num == 1 && !trans) emu::launch_kernel(ldmatrix_kernel<1, false>, 1, 32, smem, m, stride, out);
    if (num == 4 && trans) emu::launch_kernel(ldmatrix_kernel<4, true>, 1, 32, smem, m, stride, out);
    if (num == 2 && trans) emu::launch_kernel(ldmatrix_kernel<2, true>, 1, 32, smem, m, stride, out);
  });
}

int st_mma_frag(int bf16, const uint32_t* a, const uint32_t* b, float* d, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    if (bf16)
      emu::launch_kernel(mma_frag_kernel<__nv_bfloat16>, 1, 32, 0, a, b, d);
    else
      emu::launch_kernel(mma_frag_kernel<__half>, 1, 32, 0, a, b, d);
  });
}

int st_mma_tile(int bf16, const uint16_t* A, const uint16_t* B, const float* C, float* D,
                char* err, int errlen) {
  return guarded(err, errlen, [&] {
    const size_t smem = 2 * 16 * 24 * 2;
    if (bf16)
      emu::launch_kernel(mma_tile_kernel<__nv_bfloat16>, 1, 32, smem, A, B, C, D);
    else
      emu::launch_kernel(mma_tile_kernel<__half>, 1, 32, smem, A, B, C, D);
  });
}

int st_cp_async(uint32_t* src0, const uint32_t* src1, uint32_t* rec, char* err, int errlen) {
  return guarded(err, errlen,
                 [&] { emu::launch_kernel(cp_async_kernel, 1, 32, 2048, src0, src1, rec); });
}

int st_static_shared(int blocks, int threads, int* out, char* err, int errlen) {
  return guarded(err, errlen,
                 [&] { emu::launch_kernel(static_shared_kernel, blocks, threads, 0, out); });
}

int st_bench(int blocks, int threads, int iters, unsigned* out, double* seconds, char* err,
             int errlen) {
  return guarded(err, errlen, [&] {
    auto t0 = std::chrono::steady_clock::now();
    emu::launch_kernel(bench_kernel, blocks, threads, threads * sizeof(unsigned), iters, out);
    *seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  });
}

int st_misc(int blocks, const float* pairs, int* out, float* fsum, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    emu::launch_kernel(misc_kernel, blocks, 64, 0, reinterpret_cast<const Pair*>(pairs), out, fsum);
  });
}

// __hfma (device-only in the CUDA headers, provided by emu.h).
float st_hfma(float a, float b, float c, int bf16) {
  if (bf16)
    return __bfloat162float(
        __hfma(__float2bfloat16_rn(a), __float2bfloat16_rn(b), __float2bfloat16_rn(c)));
  return __half2float(__hfma(__float2half_rn(a), __float2half_rn(b), __float2half_rn(c)));
}

// Host-side conversions of the CUDA headers, for checking the fragment packing in Python.
float st_half_to_float(uint16_t bits) { return emu::detail::half_bits_to_float(bits); }
float st_bf16_to_float(uint16_t bits) { return emu::detail::bf16_bits_to_float(bits); }

}  // extern "C"
