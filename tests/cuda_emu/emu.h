// emu.h - host-side CUDA emulator for testing device kernels on the CPU (header-only, C++17, Linux).
//
// WHAT IT IS
//   A kernel source written for nvcc can be compiled by g++ and run on the CPU, to check its logic
//   (indexing, fragment layouts, barriers) against a reference such as numpy:
//
//     g++ -std=c++17 -O1 -DPLM_CUDA_EMULATE -I csrc -I tests/cuda_emu -I /usr/local/cuda/include ...
//
//   The kernel source must `#include "emu.h"` first (before anything that uses CUDA keywords).
//   Kernels are launched with
//     emu::launch(dim3 grid, dim3 block, size_t dynamic_smem_bytes, [&] { my_kernel(args...); });
//   (or emu::launch_kernel(my_kernel, grid, block, smem, args...)); it throws std::runtime_error
//   with a readable message when the emulator detects an error.
//
// API (besides the CUDA built-ins listed below)
//   emu::launch(dim3 grid, dim3 block, size_t dynamic_smem_bytes, F&& body)
//   emu::launch_kernel(kernel, grid, block, dynamic_smem_bytes, args...)
//   emu::set_schedule_seed(uint64_t) / emu::schedule_seed()             (default 0: in order)
//   emu::set_schedule_mode(emu::ScheduleMode) / emu::schedule_mode()  (default warp_priority)
//   emu::set_smem_fill_byte(unsigned char) / emu::smem_fill_byte()    (default 0xA5)
//   emu::set_max_dynamic_smem(size_t)                                 (default 227 KiB)
//   emu::dynamic_smem() -> unsigned char*, emu::dynamic_smem_bytes(), emu::in_kernel()
//   emu::ldmatrix<NUM, TRANS>(uint32_t* r, const void* smem_row)
//   namespace plm::cuda::ptx:
//     unsigned char* dynamic_smem();
//     void cp_async16(void* smem_dst, const void* gmem_src, bool valid);
//     void cp_async_commit();
//     template <int N> void cp_async_wait();
//     void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row);
//     template <class T> void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
//     void mma_16832_s8(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
//
// EXECUTION MODEL
//   * Blocks run one after another (blockIdx.x fastest, then y, then z). Only 1-D blocks
//     (blockDim.y == blockDim.z == 1, blockDim.x <= 1024) are supported; the grid may be 3-D.
//   * Every CUDA thread of a block is a fiber (ucontext, EMU_STACK_BYTES = 256 KiB stack each, with a
//     guard page) scheduled cooperatively on the calling OS thread. A fiber runs until it reaches a
//     barrier / warp collective or exits; it is never preempted. Warps are 32 consecutive
//     threadIdx.x; the last warp may be partial.
//   * Resume order - which runnable thread runs next (a waiting thread becomes runnable when its
//     barrier or warp collective completes); reproducible for a given seed and mode:
//     - emu::set_schedule_seed(0) (the default): in order - increasing threadIdx.x at the start of
//       a block, then first come, first served.
//     - any other seed, in emu::ScheduleMode::warp_priority (the default mode): at the start of
//       every block and at every __syncthreads release (each "barrier episode") a random priority
//       order of the warps is drawn from the seed, and the scheduler always resumes a runnable
//       thread of the highest-priority warp that has one, picking among that warp's runnable lanes
//       at random. An episode thus runs whole warps one after another, in random order: one warp
//       goes through all its warp collectives up to its next __syncthreads (or its exit) before a
//       lower-priority warp runs at all, and between two collectives its lanes run in a random
//       order. Every ordered pair of warps (and of lanes between two collectives) runs in either
//       order with probability 1/2 per episode, however long the path of either side: e.g. a merge
//       tree without the __syncthreads that ends a level fails when a warp finishes its merge and
//       parks its list for the next level over a slot that a lower warp has not read yet.
//     - any other seed after emu::set_schedule_mode(emu::ScheduleMode::random): each switch picks
//       any runnable thread of the block uniformly. Warps interleave at every collective and so
//       rarely get far ahead of one another: this misses races like the merge tree's above.
//     Running a kernel under seed 0 and one or more nonzero seeds (several blocks or seeds give
//     more episodes) and comparing the results exposes missing __syncthreads and __syncwarp. Every
//     warp collective (shuffle, vote, reduce, ldmatrix, mma, __syncwarp) is a point where the
//     whole warp meets, so a missing __syncwarp shows only where no other collective of the warp
//     separates the write from the read.
//   * Dynamic shared memory (emu::dynamic_smem(), plm::cuda::ptx::dynamic_smem()) is 128-byte aligned
//     and filled with the byte 0xA5 (emu::set_smem_fill_byte) at the start of every block, so reads
//     of never-written shared memory show up as garbage (0xA5A5A5A5 = -2.9e-16f, half -0.0227).
//
// WHAT IS EMULATED
//   __syncthreads, __syncthreads_count/_and/_or, __syncwarp, __shfl{,_up,_down,_xor}_sync (any
//   plain type of <= 8 bytes: int, unsigned, float, (unsigned) long long, double, __half2, ...;
//   width 1..32 power of two), __ballot_sync, __any_sync,
//   __all_sync, __reduce_{add,min,max}_sync, atomics (atomicAdd/Sub/Max/Min/Exch/CAS/And/Or/Xor as
//   plain read-modify-write: fibers never preempt, so they are atomic), bit/cast intrinsics,
//   threadIdx/blockIdx/blockDim/gridDim/warpSize, and in namespace plm::cuda::ptx: dynamic_smem,
//   cp_async16 / cp_async_commit / cp_async_wait<N> (deferred: a copy is performed - its source
//   read - only when a cp_async_wait of the issuing thread retires its group, never earlier; copies
//   still pending when the thread exits are performed silently then, and become visible to threads
//   still running),
//   ldmatrix_x4 and mma_16816<__half|__nv_bfloat16> (warp collectives computed from the PTX ISA
//   fragment layouts; mma sums c + the 16 exact products in float, k = 0..15 in order), and
//   mma_16832_s8 (int8 inputs, exact int32 sums; a sum that overflows int32 fails the launch).
//   Extras: emu::ldmatrix<NUM, TRANS>(uint32_t* r, const void* row) for .x1/.x2/.x4 and .trans.
//
// ERRORS DETECTED (launch throws std::runtime_error, message starts with "emu:")
//   * divergent barriers: threads of a block at __syncthreads calls on different source lines, a
//     thread exiting (or having exited) while others wait at __syncthreads, lanes of a warp at
//     different collectives (or a 4-byte and an 8-byte shuffle), a lane exiting while the rest of
//     its warp waits at a collective, a lane at __syncthreads while another waits at a warp
//     collective; plus a generic deadlock report if the block ever stops making progress.
//   * masks other than 0xffffffff (or, for a partial last warp, exactly its existing lanes).
//   * ldmatrix/mma in a partial warp; ldmatrix row / cp.async addresses that are not 16-byte aligned
//     or not inside the block's dynamic shared memory; cp.async global sources inside it.
//   * exceptions escaping the kernel body, __trap().
//   After a failed launch the fibers are abandoned (never resumed; heap objects they own leak);
//   the emulator is ready for the next launch.
//
// WHAT IS NOT EMULATED
//   * The memory model beyond barriers: memory is always coherent, there are no torn or reordered
//     accesses; races are only exposed through scheduling order (seeds, modes) and the garbage
//     fill. No timing, no occupancy, no bank conflicts, no shared-memory size per SM (only a per-block
//     limit, emu::set_max_dynamic_smem, default 227 KiB).
//   * Lanes that legitimately diverge across different shfl/vote call sites are matched like on
//     sm_70+ (only the kind of collective must agree). __syncthreads must be the same call site.
//     PTX lets shfl.sync/vote/bar.warp.sync ignore exited lanes named in the mask; the emulator treats
//     that as an error (strict).
//   * `__shared__` becomes `thread_local` (one instance per OS thread shared by all threads of the
//     block, zero-initialised once, NOT refilled per block, and rejected by the ldmatrix/cp.async
//     address checks): prefer dynamic shared memory. `extern __shared__` does not compile: use
//     plm::cuda::ptx::dynamic_smem() / emu::dynamic_smem().
//   * __CUDA_ARCH__ / __CUDACC__ are NOT defined (test PLM_CUDA_EMULATE instead). Spin loops waiting
//     for another thread of the block hang (no preemption). No streams, no cudaMalloc, no <<< >>>.
//   * Exceptions must not be in flight across a barrier; assert() aborts the whole process.
//
// BUILT-INS: threadIdx / blockIdx / blockDim / gridDim are read-only references to per-OS-thread
// variables that the scheduler rewrites at every fiber switch (plain unsigned fields, usable in
// printf and templates); outside a kernel they read 0xFFFFFFFF / 0. warpSize is constexpr 32.
//
// __half / __nv_bfloat16 and the conversions (__float2half_rn, __half2float, __float2bfloat16_rn,
// __bfloat162float, ...) and most arithmetic come from the host code paths of <cuda_fp16.h> /
// <cuda_bf16.h>, which compile with g++. Device-only there, and provided here (emu::fp namespace,
// exposed globally): __hfma / __hfma2 for __half, __half2, __nv_bfloat16, __nv_bfloat162 (computed
// as fmaf then one rounding to 16 bits, so a rare double rounding may differ in the last bit).
// The header does not include cuda_runtime.h; that may be included after emu.h, not before.
#ifndef PLM_CUDA_EMU_H
#define PLM_CUDA_EMU_H

#ifdef __CUDACC__
#error "emu.h is for host compilers only (compile the kernel with g++ -DPLM_CUDA_EMULATE)"
#endif

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// Keep a later #include <cuda_runtime.h> from declaring threadIdx/blockIdx/... as variables.
#ifdef __DEVICE_LAUNCH_PARAMETERS_H__
#error "emu.h must be included before cuda_runtime.h / device_launch_parameters.h"
#endif
#define __DEVICE_LAUNCH_PARAMETERS_H__

#define PLM_CUDA_EMU 1

// ---------------------------------------------------------------------------------------------
// Keywords. The CUDA headers' host path (crt/host_defines.h) already makes __global__, __device__,
// __host__, __constant__ empty, __forceinline__ = inline + always_inline and
// __align__(n) = __attribute__((aligned(n))); __restrict__ is a g++ keyword.
// ---------------------------------------------------------------------------------------------
#ifndef __global__
#define __global__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif
#ifndef __align__
#define __align__(n) alignas(n)
#endif
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __grid_constant__
#define __grid_constant__
#endif
#ifdef __shared__
#undef __shared__
#endif
#define __shared__ thread_local  // (at block scope thread_local implies static storage)

#ifndef EMU_STACK_BYTES
#define EMU_STACK_BYTES (256u * 1024u)
#endif

namespace emu {

// ----------------------------------------- settings ------------------------------------------
// How a nonzero schedule seed orders the runnable threads (seed 0 always resumes them in order).
enum class ScheduleMode : uint8_t {
  // (default) At the start of every block and at every __syncthreads release, draw a random
  // priority order of the warps; always resume a runnable thread of the highest-priority warp that
  // has one, its lanes in random order. One warp thus runs all the way to its next __syncthreads
  // (or exit) before any lower-priority warp starts: the extreme inter-warp orders.
  warp_priority,
  // Resume any runnable thread of the block, picked uniformly at every switch (warps interleave
  // at every warp collective, so no warp gets far ahead of another).
  random,
};

namespace detail {
inline uint64_t g_schedule_seed = 0;
inline ScheduleMode g_schedule_mode = ScheduleMode::warp_priority;
inline unsigned char g_fill_byte = 0xA5;
inline size_t g_max_dynamic_smem = 227u * 1024u;
}  // namespace detail

// 0: resume threads in increasing order; otherwise a seeded order chosen by the schedule mode.
inline void set_schedule_seed(uint64_t seed) { detail::g_schedule_seed = seed; }
inline uint64_t schedule_seed() { return detail::g_schedule_seed; }
// What nonzero seeds do (default ScheduleMode::warp_priority); read at every launch.
inline void set_schedule_mode(ScheduleMode m) { detail::g_schedule_mode = m; }
inline ScheduleMode schedule_mode() { return detail::g_schedule_mode; }
// Byte written over the whole dynamic shared memory at the start of every block.
inline void set_smem_fill_byte(unsigned char b) { detail::g_fill_byte = b; }
inline unsigned char smem_fill_byte() { return detail::g_fill_byte; }
// Largest dynamic shared memory a launch may ask for (default 227 KiB, the sm_80/sm_90 opt-in max).
inline void set_max_dynamic_smem(size_t bytes) { detail::g_max_dynamic_smem = bytes; }

namespace detail {

enum class Op : uint8_t {
  None,
  SyncThreads,
  SyncThreadsCount,
  SyncThreadsAnd,
  SyncThreadsOr,
  SyncWarp,
  ShflIdx,
  ShflUp,
  ShflDown,
  ShflXor,
  Ballot,
  Any,
  All,
  ReduceAdd,
  ReduceMin,
  ReduceMax,
  Ldmatrix,
  MmaF16,
  MmaBF16,
  MmaS8,
};

inline std::string op_name(Op op, unsigned aux) {
  switch (op) {
    case Op::None: return "(nothing)";
    case Op::SyncThreads: return "__syncthreads";
    case Op::SyncThreadsCount: return "__syncthreads_count";
    case Op::SyncThreadsAnd: return "__syncthreads_and";
    case Op::SyncThreadsOr: return "__syncthreads_or";
    case Op::SyncWarp: return "__syncwarp";
    case Op::ShflIdx: return "__shfl_sync<" + std::to_string(aux) + " bytes>";
    case Op::ShflUp: return "__shfl_up_sync<" + std::to_string(aux) + " bytes>";
    case Op::ShflDown: return "__shfl_down_sync<" + std::to_string(aux) + " bytes>";
    case Op::ShflXor: return "__shfl_xor_sync<" + std::to_string(aux) + " bytes>";
    case Op::Ballot: return "__ballot_sync";
    case Op::Any: return "__any_sync";
    case Op::All: return "__all_sync";
    case Op::ReduceAdd: return aux ? "__reduce_add_sync(int)" : "__reduce_add_sync(unsigned)";
    case Op::ReduceMin: return aux ? "__reduce_min_sync(int)" : "__reduce_min_sync(unsigned)";
    case Op::ReduceMax: return aux ? "__reduce_max_sync(int)" : "__reduce_max_sync(unsigned)";
    case Op::Ldmatrix:
      return "ldmatrix.m8n8.x" + std::to_string(aux >> 1) + ((aux & 1) ? ".trans" : "") + ".b16";
    case Op::MmaF16: return "mma.m16n8k16.f32.f16.f16.f32";
    case Op::MmaBF16: return "mma.m16n8k16.f32.bf16.bf16.f32";
    case Op::MmaS8: return "mma.m16n8k32.s32.s8.s8.s32";
  }
  return "?";
}

// Short static names (no allocation) for the hot paths.
inline const char* op_cname(Op op) {
  switch (op) {
    case Op::SyncThreads: return "__syncthreads";
    case Op::SyncThreadsCount: return "__syncthreads_count";
    case Op::SyncThreadsAnd: return "__syncthreads_and";
    case Op::SyncThreadsOr: return "__syncthreads_or";
    case Op::ShflIdx: return "__shfl_sync";
    case Op::ShflUp: return "__shfl_up_sync";
    case Op::ShflDown: return "__shfl_down_sync";
    case Op::ShflXor: return "__shfl_xor_sync";
    case Op::Ballot: return "__ballot_sync";
    case Op::Any: return "__any_sync";
    case Op::All: return "__all_sync";
    case Op::ReduceAdd: return "__reduce_add_sync";
    case Op::ReduceMin: return "__reduce_min_sync";
    case Op::ReduceMax: return "__reduce_max_sync";
    default: return "warp collective";
  }
}

inline bool is_block_op(Op op) {
  return op == Op::SyncThreads || op == Op::SyncThreadsCount || op == Op::SyncThreadsAnd ||
         op == Op::SyncThreadsOr;
}

inline const char* base_name(const char* path) {
  if (!path) return "?";
  const char* s = std::strrchr(path, '/');
  return s ? s + 1 : path;
}

inline std::string site(const char* file, int line) {
  if (!file) return "";
  return std::string(" (") + base_name(file) + ":" + std::to_string(line) + ")";
}

// "0-31,64,70-71"
inline std::string id_ranges(const std::vector<unsigned>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!s.empty()) s += ",";
    s += std::to_string(ids[i]);
    if (j > i) s += "-" + std::to_string(ids[j]);
    i = j + 1;
  }
  return s;
}

struct CpCopy {
  void* dst;
  const void* src;
  bool valid;
};

enum class State : uint8_t { Runnable, Waiting, Exited };

struct Fiber {
  ucontext_t ctx;
  uint3 tidx;
  unsigned tid = 0, lane = 0, warp = 0;
  State state = State::Runnable;
  // What the thread waits at, with its operands.
  Op op = Op::None;
  unsigned aux = 0;  // shuffle: value bytes; ldmatrix: num*2+trans; reduce: signed
  unsigned mask = 0;
  const char* file = nullptr;
  int line = 0;
  uint64_t val = 0;    // shuffle value bits / predicate / reduce operand
  long long arg = 0;   // srcLane / delta / laneMask
  int width = 32;
  const void* p0 = nullptr;
  const void* p1 = nullptr;
  void* out = nullptr;
  uint64_t result = 0;
  // cp.async state
  std::vector<CpCopy> open_group;
  std::deque<std::vector<CpCopy>> groups;  // committed, oldest first
};

struct Warp {
  unsigned nlanes = 0;
  unsigned lanes_mask = 0;
  unsigned arrived = 0;  // lanes waiting at the current warp collective
  unsigned at_sync = 0;  // lanes waiting at a block barrier
  unsigned exited = 0;
  Op op = Op::None;
  unsigned aux = 0;
  unsigned mask = 0;
  Fiber* first = nullptr;
};

struct Block {
  // launch configuration
  dim3 grid, block;
  uint3 bidx;
  unsigned nthreads = 0;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  // fibers
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  ucontext_t sched;
  unsigned nexited = 0;
  // block barrier episode
  unsigned sync_arrived = 0;
  Op sync_op = Op::None;
  const char* sync_file = nullptr;
  int sync_line = 0;
  Fiber* sync_first = nullptr;
  int sync_count = 0;
  // Run queue, each runnable fiber at most once. In order (seed 0) and random mode: a ring
  // buffer. Warp-priority mode: a bit per runnable lane of each warp (ready_lanes) and a bit per
  // warp priority rank that has a runnable lane (ready_ranks, bit 0 = highest priority).
  std::vector<Fiber*> ring;
  size_t head = 0, count = 0;
  uint64_t seed = 0, rng = 0;
  bool warp_priority = false;
  uint32_t ready_ranks = 0;
  std::vector<uint32_t> ready_lanes;  // [warp]
  unsigned char rank_warp[32] = {};   // rank -> warp
  unsigned char warp_rank[32] = {};   // warp -> rank
  // failure
  bool failed = false;
  std::string error;

  std::string where() const {
    return "block (" + std::to_string(bidx.x) + "," + std::to_string(bidx.y) + "," +
           std::to_string(bidx.z) + ")";
  }
  uint64_t next_random() {  // splitmix64
    uint64_t z = (rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Warp-priority mode: a new random priority order of the warps (block start, barrier release).
  void draw_warp_priorities() {
    const unsigned n = static_cast<unsigned>(warps.size());
    for (unsigned r = 0; r < n; ++r) rank_warp[r] = static_cast<unsigned char>(r);
    for (unsigned r = n; r > 1; --r) std::swap(rank_warp[r - 1], rank_warp[next_random() % r]);
    ready_ranks = 0;
    for (unsigned r = 0; r < n; ++r) {
      warp_rank[rank_warp[r]] = static_cast<unsigned char>(r);
      if (ready_lanes[rank_warp[r]]) ready_ranks |= 1u << r;
    }
  }
  void push(Fiber* f) {
    if (warp_priority) {
      ready_lanes[f->warp] |= 1u << f->lane;
      ready_ranks |= 1u << warp_rank[f->warp];
    } else {
      ring[(head + count) % ring.size()] = f;
    }
    ++count;
  }
  Fiber* pop() {
    if (count == 0) return nullptr;
    if (warp_priority) {
      const unsigned r = static_cast<unsigned>(__builtin_ctz(ready_ranks));
      const unsigned w = rank_warp[r];
      uint32_t m = ready_lanes[w];
      const unsigned n = static_cast<unsigned>(__builtin_popcount(m));
      for (unsigned k = n > 1 ? static_cast<unsigned>(next_random() % n) : 0u; k > 0; --k)
        m &= m - 1;  // drop the k lowest ready lanes
      const unsigned lane = static_cast<unsigned>(__builtin_ctz(m));
      if ((ready_lanes[w] &= ~(1u << lane)) == 0) ready_ranks &= ~(1u << r);
      --count;
      return &fibers[w * 32 + lane];
    }
    if (seed != 0 && count > 1) {
      size_t k = (head + next_random() % count) % ring.size();
      std::swap(ring[head], ring[k]);
    }
    Fiber* f = ring[head];
    head = (head + 1) % ring.size();
    --count;
    return f;
  }
};

inline thread_local Block* g_block = nullptr;
inline thread_local Fiber* g_cur = nullptr;
// Backing store of threadIdx / blockIdx / blockDim / gridDim (all fibers share the OS thread).
inline constexpr unsigned kPoison = 0xFFFFFFFFu;  // outside a kernel
inline thread_local uint3 g_thread_idx = {kPoison, kPoison, kPoison};
inline thread_local uint3 g_block_idx = {kPoison, kPoison, kPoison};
inline thread_local dim3 g_block_dim = dim3(0, 0, 0);
inline thread_local dim3 g_grid_dim = dim3(0, 0, 0);

inline void set_current(Fiber* f);

// Fiber stacks: mmap'ed once per OS thread, reused by every launch (guard page at the bottom).
struct StackPool {
  std::vector<char*> stacks;
  size_t bytes = EMU_STACK_BYTES;
  size_t guard = 0;
  ~StackPool() {
    for (char* s : stacks) munmap(s, bytes + guard);
  }
  char* get(size_t i) {
    if (guard == 0) guard = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    while (stacks.size() <= i) {
      void* p = mmap(nullptr, bytes + guard, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
      if (p == MAP_FAILED) throw std::runtime_error("emu: cannot mmap a fiber stack");
      mprotect(p, guard, PROT_NONE);
      stacks.push_back(static_cast<char*>(p));
    }
    return stacks[i] + guard;
  }
  bool contains(const void* p) const {
    auto a = reinterpret_cast<uintptr_t>(p);
    for (char* s : stacks) {
      auto b = reinterpret_cast<uintptr_t>(s);
      if (a >= b && a < b + bytes + guard) return true;
    }
    return false;
  }
};
inline thread_local StackPool g_stacks;

[[noreturn]] inline void die(const char* what) {
  std::fprintf(stderr, "emu: internal error: %s\n", what);
  std::abort();
}

inline void set_current(Fiber* f) {
  g_cur = f;
  if (f) g_thread_idx = f->tidx;
}

// Runs the next runnable fiber (or returns to the scheduler when none is left). Returns when the
// calling fiber is resumed.
inline void run_next(Fiber* self) {
  Block& b = *g_block;
  Fiber* next = b.pop();
  if (next == self) return;
  set_current(next);
  if (next)
    swapcontext(&self->ctx, &next->ctx);
  else
    swapcontext(&self->ctx, &b.sched);
  if (g_cur != self) die("fiber resumed with a foreign g_cur");
}

// Reports an error. Inside a kernel: records it and abandons the whole block (never returns).
// Outside: throws.
[[noreturn]] inline void fail(std::string msg) {
  Fiber* self = g_cur;
  Block* b = g_block;
  if (!self || !b) throw std::runtime_error("emu: " + msg);
  if (!b->failed) {
    b->failed = true;
    b->error = "emu: " + msg;
  }
  set_current(nullptr);
  swapcontext(&self->ctx, &b->sched);
  die("a failed fiber was resumed");
}

inline Fiber& cur(const char* what) {
  Fiber* f = g_cur;
  if (!f) {
    if (g_block) die("no current fiber");
    throw std::logic_error(std::string("emu: ") + what + " used outside emu::launch");
  }
  return *f;
}

inline std::string thread_desc(const Block& b, const Fiber& f) {
  return "thread " + std::to_string(f.tid) + " (warp " + std::to_string(f.warp) + " lane " +
         std::to_string(f.lane) + ") of " + b.where();
}

// ------------------------------------------ cp.async ------------------------------------------
inline void perform(const std::vector<CpCopy>& g) {
  for (const CpCopy& c : g) {
    if (c.valid)
      std::memcpy(c.dst, c.src, 16);
    else
      std::memset(c.dst, 0, 16);
  }
}

inline void complete_all_copies(Fiber& f) {
  while (!f.groups.empty()) {
    perform(f.groups.front());
    f.groups.pop_front();
  }
  perform(f.open_group);
  f.open_group.clear();
}

inline bool in_smem(const Block& b, const void* p, size_t n) {
  auto a = reinterpret_cast<uintptr_t>(p);
  auto s = reinterpret_cast<uintptr_t>(b.smem);
  return a >= s && a + n <= s + b.smem_bytes;
}

inline bool overlaps_smem(const Block& b, const void* p, size_t n) {
  auto a = reinterpret_cast<uintptr_t>(p);
  auto s = reinterpret_cast<uintptr_t>(b.smem);
  return a < s + b.smem_bytes && a + n > s;
}

// ------------------------------------------ barriers ------------------------------------------
inline void release_block(Block& b, int count) {
  if (b.warp_priority) b.draw_warp_priorities();
  for (Fiber& f : b.fibers) {
    f.state = State::Runnable;
    f.op = Op::None;
    f.result = static_cast<uint64_t>(static_cast<int64_t>(count));
    b.push(&f);
  }
  for (Warp& w : b.warps) w.at_sync = 0;
  b.sync_arrived = 0;
  b.sync_op = Op::None;
  b.sync_first = nullptr;
  b.sync_count = 0;
}

inline int block_barrier(Op op, int pred, const char* file, int line) {
  Fiber& f = cur(op_cname(op));
  Block& b = *g_block;
  Warp& w = b.warps[f.warp];
  if (b.nexited) {
    std::vector<unsigned> gone;
    for (Fiber& o : b.fibers)
      if (o.state == State::Exited) gone.push_back(o.tid);
    fail("divergent " + op_name(op, 0) + " in " + b.where() + ": thread " + std::to_string(f.tid) +
         " reached " + op_name(op, 0) + site(file, line) + " but thread(s) " + id_ranges(gone) +
         " already exited the kernel, so the barrier can never complete");
  }
  if (w.arrived) {
    fail("divergent barriers in " + b.where() + ": " + thread_desc(b, f) + " reached " +
         op_name(op, 0) + site(file, line) + " while lane " + std::to_string(w.first->lane) +
         " of its warp waits at " + op_name(w.op, w.aux) + site(w.first->file, w.first->line));
  }
  if (b.sync_arrived == 0) {
    b.sync_op = op;
    b.sync_file = file;
    b.sync_line = line;
    b.sync_first = &f;
    b.sync_count = 0;
  } else if (b.sync_op != op || b.sync_line != line ||
             (file != b.sync_file && std::strcmp(file, b.sync_file) != 0)) {
    fail("divergent __syncthreads in " + b.where() + ": thread " + std::to_string(b.sync_first->tid) +
         " waits at " + op_name(b.sync_op, 0) + site(b.sync_file, b.sync_line) + " but thread " +
         std::to_string(f.tid) + " reached " + op_name(op, 0) + site(file, line) +
         " (every thread of the block must reach the same __syncthreads)");
  }
  f.state = State::Waiting;
  f.op = op;
  f.file = file;
  f.line = line;
  if (pred) ++b.sync_count;
  ++w.at_sync;
  if (++b.sync_arrived == b.nthreads) {
    int cnt = b.sync_count;
    int res = cnt;
    if (op == Op::SyncThreadsAnd) res = cnt == static_cast<int>(b.nthreads);
    if (op == Op::SyncThreadsOr) res = cnt != 0;
    release_block(b, res);
  }
  run_next(&f);
  return static_cast<int>(static_cast<int64_t>(f.result));
}

inline void check_mask(const Block& b, const Fiber& f, const Warp& w, unsigned mask, Op op,
                       unsigned aux, const char* file, int line) {
  if (mask == 0xffffffffu || mask == w.lanes_mask) return;
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", mask);
  fail(op_name(op, aux) + site(file, line) + " called by " + thread_desc(b, f) + " with mask " +
       buf + ": the emulator supports only the full mask 0xffffffff (or, in a partial last warp, "
       "exactly its existing lanes)");
}

inline void complete_warp(Block& b, Warp& w, unsigned warp_index);

// Registers the current fiber at a warp collective (operands already stored in f) and blocks
// until the whole warp has arrived.
inline void warp_collective(Fiber& f, Op op, unsigned aux, unsigned mask, const char* file,
                            int line) {
  Block& b = *g_block;
  Warp& w = b.warps[f.warp];
  if (w.exited) {
    std::vector<unsigned> gone;
    for (unsigned l = 0; l < w.nlanes; ++l)
      if (b.fibers[f.warp * 32 + l].state == State::Exited) gone.push_back(l);
    fail("divergent warp collective in " + b.where() + ": " + thread_desc(b, f) + " reached " +
         op_name(op, aux) + site(file, line) + " but lane(s) " + id_ranges(gone) +
         " of its warp already exited");
  }
  if (w.at_sync) {
    Fiber* s = nullptr;
    for (unsigned l = 0; l < w.nlanes && !s; ++l)
      if (is_block_op(b.fibers[f.warp * 32 + l].op)) s = &b.fibers[f.warp * 32 + l];
    fail("divergent barriers in " + b.where() + ": " + thread_desc(b, f) + " reached " +
         op_name(op, aux) + site(file, line) + " while lane " + std::to_string(s ? s->lane : 0) +
         " of its warp waits at " + op_name(b.sync_op, 0) + site(b.sync_file, b.sync_line));
  }
  check_mask(b, f, w, mask, op, aux, file, line);
  if (w.arrived == 0) {
    w.op = op;
    w.aux = aux;
    w.mask = mask;
    w.first = &f;
  } else if (w.op != op || w.aux != aux) {
    fail("divergent warp collective in " + b.where() + " warp " + std::to_string(f.warp) +
         ": lane " + std::to_string(w.first->lane) + " waits at " + op_name(w.op, w.aux) +
         site(w.first->file, w.first->line) + " but lane " + std::to_string(f.lane) + " reached " +
         op_name(op, aux) + site(file, line));
  } else if (w.mask != mask) {
    fail("divergent warp collective in " + b.where() + " warp " + std::to_string(f.warp) + ": " +
         op_name(op, aux) + " called with different masks by lanes " +
         std::to_string(w.first->lane) + " and " + std::to_string(f.lane));
  }
  f.state = State::Waiting;
  f.op = op;
  f.aux = aux;
  f.mask = mask;
  f.file = file;
  f.line = line;
  if (++w.arrived == w.nlanes) {
    complete_warp(b, w, f.warp);
    w.arrived = 0;
    w.op = Op::None;
    w.first = nullptr;
    for (unsigned l = 0; l < w.nlanes; ++l) {
      Fiber& o = b.fibers[f.warp * 32 + l];
      o.state = State::Runnable;
      o.op = Op::None;
      b.push(&o);
    }
  }
  run_next(&f);
}

inline uint64_t garbage64() {
  uint64_t v;
  std::memset(&v, g_fill_byte, sizeof v);
  return v;
}

inline uint32_t load_u32(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline uint16_t load_u16(const void* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

inline float half_bits_to_float(uint16_t bits) {
  __half h;
  std::memcpy(static_cast<void*>(&h), &bits, 2);
  return __half2float(h);
}

inline float bf16_bits_to_float(uint16_t bits) {
  __nv_bfloat16 h;
  std::memcpy(static_cast<void*>(&h), &bits, 2);
  return __bfloat162float(h);
}

inline void complete_warp(Block& b, Warp& w, unsigned warp_index) {
  Fiber* lanes[32] = {};
  for (unsigned l = 0; l < w.nlanes; ++l) lanes[l] = &b.fibers[warp_index * 32 + l];
  const unsigned n = w.nlanes;
  switch (w.op) {
    case Op::SyncWarp: break;
    case Op::ShflIdx:
    case Op::ShflUp:
    case Op::ShflDown:
    case Op::ShflXor: {
      const uint64_t junk = garbage64();
      for (unsigned l = 0; l < n; ++l) {
        Fiber& f = *lanes[l];
        const long long wdt = f.width;
        const long long lo = static_cast<long long>(l) & ~(wdt - 1);  // first lane of the segment
        const long long hi = lo + wdt - 1;                            // last lane of the segment
        long long j = l;
        switch (w.op) {
          case Op::ShflIdx: j = lo + (f.arg & (wdt - 1)); break;
          case Op::ShflUp: j = static_cast<long long>(l) - f.arg; if (j < lo) j = l; break;
          case Op::ShflDown: j = static_cast<long long>(l) + f.arg; if (j > hi) j = l; break;
          case Op::ShflXor: j = static_cast<long long>(l) ^ f.arg; if (j > hi || j < 0) j = l; break;
          default: break;
        }
        f.result = (j >= 0 && j < static_cast<long long>(n)) ? lanes[j]->val : junk;
      }
      break;
    }
    case Op::Ballot:
    case Op::Any:
    case Op::All: {
      uint32_t bal = 0;
      for (unsigned l = 0; l < n; ++l)
        if (lanes[l]->val) bal |= 1u << l;
      uint64_t r = bal;
      if (w.op == Op::Any) r = bal != 0;
      if (w.op == Op::All) r = bal == w.lanes_mask;
      for (unsigned l = 0; l < n; ++l) lanes[l]->result = r;
      break;
    }
    case Op::ReduceAdd:
    case Op::ReduceMin:
    case Op::ReduceMax: {
      uint32_t acc = static_cast<uint32_t>(lanes[0]->val);
      for (unsigned l = 1; l < n; ++l) {
        uint32_t v = static_cast<uint32_t>(lanes[l]->val);
        if (w.op == Op::ReduceAdd) {
          acc += v;
        } else if (w.aux) {  // signed
          int32_t a = static_cast<int32_t>(acc), c = static_cast<int32_t>(v);
          acc = static_cast<uint32_t>(w.op == Op::ReduceMin ? std::min(a, c) : std::max(a, c));
        } else {
          acc = w.op == Op::ReduceMin ? std::min(acc, v) : std::max(acc, v);
        }
      }
      for (unsigned l = 0; l < n; ++l) lanes[l]->result = acc;
      break;
    }
    case Op::Ldmatrix: {
      // PTX ldmatrix .m8n8 .b16: lanes 8i..8i+7 give the addresses of rows 0..7 of matrix i.
      // Without .trans, lane L receives row L/4, columns 2*(L%4) (low half) and 2*(L%4)+1 (high).
      // With .trans it receives the transposed matrix' fragment: elements (2*(L%4), L/4) (low)
      // and (2*(L%4)+1, L/4) (high) of the stored matrix.
      const unsigned num = w.aux >> 1;
      const bool trans = w.aux & 1;
      uint32_t res[32][4] = {};
      for (unsigned l = 0; l < 32; ++l) {
        const unsigned g = l >> 2, t = l & 3;
        for (unsigned i = 0; i < num; ++i) {
          if (!trans) {
            const auto* row = static_cast<const unsigned char*>(lanes[8 * i + g]->p0);
            res[l][i] = load_u32(row + 4 * t);
          } else {
            const auto* r0 = static_cast<const unsigned char*>(lanes[8 * i + 2 * t]->p0);
            const auto* r1 = static_cast<const unsigned char*>(lanes[8 * i + 2 * t + 1]->p0);
            res[l][i] = static_cast<uint32_t>(load_u16(r0 + 2 * g)) |
                        (static_cast<uint32_t>(load_u16(r1 + 2 * g)) << 16);
          }
        }
      }
      for (unsigned l = 0; l < 32; ++l) {
        auto* r = static_cast<uint32_t*>(lanes[l]->out);
        for (unsigned i = 0; i < num; ++i) r[i] = res[l][i];
      }
      break;
    }
    case Op::MmaF16:
    case Op::MmaBF16: {
      // PTX mma.m16n8k16 .row.col, f16/bf16 inputs, f32 accumulators; groupID g = lane>>2,
      // threadID_in_group t = lane%4. Register j holds elements 2j (low 16 bits) and 2j+1 (high).
      //   A (16x16): a_i at row g + 8*((i>>1)&1), col 2t + (i&1) + 8*(i>>2)
      //   B (16x8, k x n): b_i at row k = 2t + (i&1) + 8*(i>>1), col n = g
      //   C/D (16x8): c_i at row g + 8*(i>>1), col 2t + (i&1)
      const bool bf = w.op == Op::MmaBF16;
      auto cvt = [bf](uint16_t v) { return bf ? bf16_bits_to_float(v) : half_bits_to_float(v); };
      float A[16][16], B[16][8], C[16][8];
      for (unsigned l = 0; l < 32; ++l) {
        const unsigned g = l >> 2, t = l & 3;
        const auto* a = static_cast<const uint32_t*>(lanes[l]->p0);
        const auto* bb = static_cast<const uint32_t*>(lanes[l]->p1);
        const auto* c = static_cast<const float*>(lanes[l]->out);
        for (unsigned i = 0; i < 8; ++i) {
          const uint16_t bits = static_cast<uint16_t>(a[i >> 1] >> (16 * (i & 1)));
          A[g + 8 * ((i >> 1) & 1)][2 * t + (i & 1) + 8 * (i >> 2)] = cvt(bits);
        }
        for (unsigned i = 0; i < 4; ++i) {
          const uint16_t bits = static_cast<uint16_t>(bb[i >> 1] >> (16 * (i & 1)));
          B[2 * t + (i & 1) + 8 * (i >> 1)][g] = cvt(bits);
        }
        for (unsigned i = 0; i < 4; ++i) C[g + 8 * (i >> 1)][2 * t + (i & 1)] = c[i];
      }
      float D[16][8];
      for (unsigned m = 0; m < 16; ++m)
        for (unsigned nn = 0; nn < 8; ++nn) {
          float acc = C[m][nn];
          for (unsigned k = 0; k < 16; ++k) acc += A[m][k] * B[k][nn];  // products are exact
          D[m][nn] = acc;
        }
      for (unsigned l = 0; l < 32; ++l) {
        const unsigned g = l >> 2, t = l & 3;
        auto* d = static_cast<float*>(lanes[l]->out);
        for (unsigned i = 0; i < 4; ++i) d[i] = D[g + 8 * (i >> 1)][2 * t + (i & 1)];
      }
      break;
    }
    case Op::MmaS8: {
      // PTX mma.m16n8k32 .row.col .s8, s32 accumulators; byte j of register r is element 4r + j.
      //   A (16x32): register r at row g + 8*(r&1), cols 4t + j + 16*(r>>1)
      //   B (32x8, k x n): register r at rows k = 4t + j + 16*r, col n = g
      //   C/D (16x8): c_i at row g + 8*(i>>1), col 2t + (i&1)
      int32_t A[16][32], B[32][8], C[16][8];
      for (unsigned l = 0; l < 32; ++l) {
        const unsigned g = l >> 2, t = l & 3;
        const auto* a = static_cast<const uint32_t*>(lanes[l]->p0);
        const auto* bb = static_cast<const uint32_t*>(lanes[l]->p1);
        const auto* c = static_cast<const int32_t*>(lanes[l]->out);
        for (unsigned r = 0; r < 4; ++r)
          for (unsigned j = 0; j < 4; ++j)
            A[g + 8 * (r & 1)][4 * t + j + 16 * (r >> 1)] = static_cast<int8_t>(a[r] >> (8 * j));
        for (unsigned r = 0; r < 2; ++r)
          for (unsigned j = 0; j < 4; ++j) B[4 * t + j + 16 * r][g] = static_cast<int8_t>(bb[r] >> (8 * j));
        for (unsigned i = 0; i < 4; ++i) C[g + 8 * (i >> 1)][2 * t + (i & 1)] = c[i];
      }
      int32_t D[16][8];
      for (unsigned m = 0; m < 16; ++m)
        for (unsigned nn = 0; nn < 8; ++nn) {
          int64_t acc = C[m][nn];
          for (unsigned k = 0; k < 32; ++k) acc += A[m][k] * B[k][nn];
          if (acc > INT32_MAX || acc < INT32_MIN) fail("mma.m16n8k32.s8: the int32 sum overflowed");
          D[m][nn] = static_cast<int32_t>(acc);
        }
      for (unsigned l = 0; l < 32; ++l) {
        const unsigned g = l >> 2, t = l & 3;
        auto* d = static_cast<int32_t*>(lanes[l]->out);
        for (unsigned i = 0; i < 4; ++i) d[i] = D[g + 8 * (i >> 1)][2 * t + (i & 1)];
      }
      break;
    }
    default: die("unexpected warp collective");
  }
}

template <class T>
inline T shuffle(Op op, unsigned mask, T var, long long arg, int width, const char* file,
                 int line) {
  // (__half2 / __nv_bfloat162 are not trivially copyable, only bit-copyable: accept those too)
  static_assert(std::is_trivially_destructible_v<T> && sizeof(T) <= 8,
                "emu: shuffles take plain values of at most 8 bytes");
  Fiber& f = cur(op_cname(op));
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    fail(op_name(op, sizeof(T)) + site(file, line) + ": width " + std::to_string(width) +
         " is not a power of two in [1, 32]");
  uint64_t bits = 0;
  std::memcpy(&bits, static_cast<const void*>(&var), sizeof(T));
  f.val = bits;
  f.arg = arg;
  f.width = width;
  warp_collective(f, op, sizeof(T), mask, file, line);
  T out = var;
  std::memcpy(static_cast<void*>(&out), &f.result, sizeof(T));
  return out;
}

inline uint32_t vote(Op op, unsigned mask, int pred, const char* file, int line) {
  Fiber& f = cur(op_cname(op));
  f.val = pred != 0;
  warp_collective(f, op, 0, mask, file, line);
  return static_cast<uint32_t>(f.result);
}

inline uint32_t reduce(Op op, bool is_signed, unsigned mask, uint32_t v, const char* file,
                       int line) {
  Fiber& f = cur(op_cname(op));
  f.val = v;
  warp_collective(f, op, is_signed ? 1u : 0u, mask, file, line);
  return static_cast<uint32_t>(f.result);
}

inline void check_shared_operand(const Block& b, const Fiber& f, const void* p, size_t n,
                                 const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%p", p);
    fail(std::string(what) + ": " + thread_desc(b, f) + " passed address " + buf +
         ", which is not 16-byte aligned");
  }
  if (!in_smem(b, p, n)) {
    char buf[96];
    std::snprintf(buf, sizeof buf, "%p is not inside the block's dynamic shared memory [%p, +%zu)",
                  p, static_cast<const void*>(b.smem), b.smem_bytes);
    fail(std::string(what) + ": " + thread_desc(b, f) + " passed address " + buf +
         (g_stacks.contains(p) ? " (it is on the thread's stack: local memory)" : ""));
  }
}

inline void ldmatrix_impl(uint32_t* r, const void* row, unsigned num, bool trans) {
  Fiber& f = cur("ldmatrix");
  Block& b = *g_block;
  const unsigned aux = num * 2 + (trans ? 1u : 0u);
  if (b.warps[f.warp].nlanes != 32)
    fail(op_name(Op::Ldmatrix, aux) + " executed by a partial warp (" +
         std::to_string(b.warps[f.warp].nlanes) + " lanes) in " + b.where() +
         ": .aligned warp instructions need all 32 lanes");
  // only lanes 0 .. 8*num-1 supply row addresses
  if (f.lane < 8 * num) check_shared_operand(b, f, row, 16, op_name(Op::Ldmatrix, aux).c_str());
  f.p0 = row;
  f.out = r;
  warp_collective(f, Op::Ldmatrix, aux, 0xffffffffu, nullptr, 0);
}

template <class T>
inline void mma_impl(float* d, const uint32_t* a, const uint32_t* bb) {
  constexpr bool is_half = std::is_same_v<T, __half>;
  constexpr bool is_bf16 = std::is_same_v<T, __nv_bfloat16>;
  static_assert(is_half || is_bf16, "mma_16816: T must be __half or __nv_bfloat16");
  const Op op = is_half ? Op::MmaF16 : Op::MmaBF16;
  Fiber& f = cur("mma_16816");
  Block& b = *g_block;
  if (b.warps[f.warp].nlanes != 32)
    fail(op_name(op, 0) + " executed by a partial warp (" + std::to_string(b.warps[f.warp].nlanes) +
         " lanes) in " + b.where() + ": .aligned warp instructions need all 32 lanes");
  f.p0 = a;
  f.p1 = bb;
  f.out = d;
  warp_collective(f, op, 0, 0xffffffffu, nullptr, 0);
}

inline void mma_s8_impl(int32_t* d, const uint32_t* a, const uint32_t* bb) {
  Fiber& f = cur("mma_16832_s8");
  Block& b = *g_block;
  if (b.warps[f.warp].nlanes != 32)
    fail(op_name(Op::MmaS8, 0) + " executed by a partial warp (" + std::to_string(b.warps[f.warp].nlanes) +
         " lanes) in " + b.where() + ": .aligned warp instructions need all 32 lanes");
  f.p0 = a;
  f.p1 = bb;
  f.out = d;
  warp_collective(f, Op::MmaS8, 0, 0xffffffffu, nullptr, 0);
}

// ------------------------------------------- fibers -------------------------------------------
inline void thread_exit(Fiber& f) {
  Block& b = *g_block;
  complete_all_copies(f);
  f.state = State::Exited;
  f.op = Op::None;
  ++b.nexited;
  Warp& w = b.warps[f.warp];
  ++w.exited;
  if (w.arrived) {
    std::vector<unsigned> waiting;
    for (unsigned l = 0; l < w.nlanes; ++l)
      if (b.fibers[f.warp * 32 + l].state == State::Waiting) waiting.push_back(l);
    fail("divergent warp collective in " + b.where() + ": " + thread_desc(b, f) +
         " exited the kernel while lane(s) " + id_ranges(waiting) + " of its warp wait at " +
         op_name(w.op, w.aux) + site(w.first->file, w.first->line));
  }
  if (b.sync_arrived) {
    std::vector<unsigned> waiting;
    for (Fiber& o : b.fibers)
      if (o.state == State::Waiting) waiting.push_back(o.tid);
    fail("divergent " + op_name(b.sync_op, 0) + " in " + b.where() + ": thread " +
         std::to_string(f.tid) + " exited the kernel while thread(s) " + id_ranges(waiting) +
         " wait at " + op_name(b.sync_op, 0) + site(b.sync_file, b.sync_line));
  }
  run_next(&f);
  die("an exited fiber was resumed");
}

inline void fiber_entry() {
  Fiber* f = g_cur;
  Block* b = g_block;
  std::string err;
  bool threw = false;
  try {
    b->body(b->body_arg);
  } catch (const std::exception& e) {
    err = e.what();
    threw = true;
  } catch (...) {
    err = "(non-std exception)";
    threw = true;
  }
  if (threw) fail("kernel " + thread_desc(*b, *f) + " threw: " + err);
  thread_exit(*f);
}

inline std::string deadlock_report(Block& b) {
  // Group threads by what they wait at.
  std::vector<std::pair<std::string, std::vector<unsigned>>> groups;
  for (Fiber& f : b.fibers) {
    std::string key;
    if (f.state == State::Exited)
      key = "exited";
    else if (f.state == State::Waiting)
      key = "wait at " + op_name(f.op, f.aux) + site(f.file, f.line);
    else
      key = "runnable";
    auto it = std::find_if(groups.begin(), groups.end(), [&](auto& g) { return g.first == key; });
    if (it == groups.end()) {
      groups.push_back({key, {}});
      it = groups.end() - 1;
    }
    it->second.push_back(f.tid);
  }
  std::string s = "emu: deadlock (divergent barriers) in " + b.where() + ":";
  for (auto& g : groups) s += " threads " + id_ranges(g.second) + " " + g.first + ";";
  return s;
}

// (Separate and not inlined: getcontext "returns twice", which would pessimise the caller.)
__attribute__((noinline)) inline void make_fiber_context(ucontext_t& ctx, char* stack, size_t bytes,
                                                         ucontext_t* link) {
  if (getcontext(&ctx) != 0) throw std::runtime_error("emu: getcontext failed");
  ctx.uc_stack.ss_sp = stack;
  ctx.uc_stack.ss_size = bytes;
  ctx.uc_link = link;
  makecontext(&ctx, &fiber_entry, 0);
}

inline void launch_impl(dim3 grid, dim3 block, size_t smem_bytes, void (*body)(void*), void* arg) {
  if (g_block) throw std::logic_error("emu: nested emu::launch (from inside a kernel)");
  if (block.y != 1 || block.z != 1)
    throw std::runtime_error("emu: only 1-D blocks are supported (blockDim.y = blockDim.z = 1)");
  if (block.x < 1 || block.x > 1024)
    throw std::runtime_error("emu: blockDim.x must be in [1, 1024], got " + std::to_string(block.x));
  if (grid.x < 1 || grid.y < 1 || grid.z < 1)
    throw std::runtime_error("emu: every grid dimension must be >= 1");
  if (smem_bytes > g_max_dynamic_smem)
    throw std::runtime_error("emu: " + std::to_string(smem_bytes) +
                             " bytes of dynamic shared memory exceed the limit of " +
                             std::to_string(g_max_dynamic_smem));

  Block b;
  b.grid = grid;
  b.block = block;
  b.nthreads = block.x;
  b.body = body;
  b.body_arg = arg;
  b.smem_bytes = smem_bytes;
  const size_t alloc = std::max<size_t>(128, (smem_bytes + 127) / 128 * 128);
  std::unique_ptr<unsigned char, void (*)(void*)> smem(
      static_cast<unsigned char*>(std::aligned_alloc(128, alloc)), &std::free);
  if (!smem) throw std::runtime_error("emu: out of memory for dynamic shared memory");
  b.smem = smem.get();
  b.fibers.resize(b.nthreads);
  const unsigned nwarps = (b.nthreads + 31) / 32;
  b.warps.resize(nwarps);
  for (unsigned w = 0; w < nwarps; ++w) {
    b.warps[w].nlanes = std::min(32u, b.nthreads - 32 * w);
    b.warps[w].lanes_mask =
        b.warps[w].nlanes == 32 ? 0xffffffffu : ((1u << b.warps[w].nlanes) - 1u);
  }
  b.ring.assign(b.nthreads, nullptr);
  b.ready_lanes.assign(nwarps, 0u);
  b.seed = g_schedule_seed;
  b.rng = g_schedule_seed;
  b.warp_priority = b.seed != 0 && g_schedule_mode == ScheduleMode::warp_priority;
  for (unsigned i = 0; i < b.nthreads; ++i) g_stacks.get(i);  // may throw: before any fiber exists

  struct Guard {
    ~Guard() {
      g_block = nullptr;
      g_cur = nullptr;
      g_thread_idx = g_block_idx = make_uint3(kPoison, kPoison, kPoison);
      g_block_dim = g_grid_dim = dim3(0, 0, 0);
    }
  } guard;
  g_block = &b;
  g_block_dim = block;
  g_grid_dim = grid;

  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        b.bidx = make_uint3(bx, by, bz);
        g_block_idx = b.bidx;
        std::memset(b.smem, g_fill_byte, alloc);
        b.nexited = 0;
        b.sync_arrived = 0;
        b.sync_op = Op::None;
        b.sync_first = nullptr;
        b.head = b.count = 0;
        std::fill(b.ready_lanes.begin(), b.ready_lanes.end(), 0u);
        if (b.warp_priority) b.draw_warp_priorities();
        for (Warp& w : b.warps) {
          w.arrived = w.at_sync = w.exited = 0;
          w.op = Op::None;
          w.first = nullptr;
        }
        for (unsigned i = 0; i < b.nthreads; ++i) {
          Fiber& f = b.fibers[i];
          f.tidx = make_uint3(i, 0, 0);
          f.tid = i;
          f.lane = i % 32;
          f.warp = i / 32;
          f.state = State::Runnable;
          f.op = Op::None;
          f.result = 0;
          f.open_group.clear();
          f.groups.clear();
          make_fiber_context(f.ctx, g_stacks.get(i), g_stacks.bytes, &b.sched);
          b.push(&f);
        }
        Fiber* first = b.pop();
        set_current(first);
        swapcontext(&b.sched, &first->ctx);
        set_current(nullptr);
        if (b.failed) throw std::runtime_error(b.error);
        if (b.nexited != b.nthreads) throw std::runtime_error(deadlock_report(b));
      }
}

template <class F>
void invoke(void* p) {
  (*static_cast<F*>(p))();
}

}  // namespace detail

// Runs body() once per CUDA thread of every block (see the top of this file). Throws
// std::runtime_error when the emulator detects an error.
template <class F>
void launch(dim3 grid, dim3 block, size_t dynamic_smem_bytes, F&& body) {
  using Fn = std::remove_reference_t<F>;
  detail::launch_impl(grid, block, dynamic_smem_bytes, &detail::invoke<Fn>,
                      const_cast<void*>(static_cast<const void*>(std::addressof(body))));
}

// emu::launch_kernel(kernel, grid, block, smem, args...) == kernel<<<grid, block, smem>>>(args...)
template <class K, class... Args>
void launch_kernel(K kernel, dim3 grid, dim3 block, size_t dynamic_smem_bytes, Args... args) {
  launch(grid, block, dynamic_smem_bytes, [&] { kernel(args...); });
}

// The current block's dynamic shared memory (128-byte aligned, refilled with the fill byte at the
// start of every block).
inline unsigned char* dynamic_smem() {
  detail::cur("dynamic_smem()");
  return detail::g_block->smem;
}
inline size_t dynamic_smem_bytes() {
  detail::cur("dynamic_smem_bytes()");
  return detail::g_block->smem_bytes;
}
inline bool in_kernel() { return detail::g_cur != nullptr; }

// Extra: ldmatrix.sync.aligned.m8n8.x{NUM}{.trans}.shared.b16; r has NUM registers.
template <int NUM, bool TRANS = false>
inline void ldmatrix(uint32_t* r, const void* smem_row) {
  static_assert(NUM == 1 || NUM == 2 || NUM == 4, "ldmatrix: NUM must be 1, 2 or 4");
  detail::ldmatrix_impl(r, smem_row, NUM, TRANS);
}

}  // namespace emu

// ------------------------------------ built-in variables ------------------------------------
// Read-only views of per-OS-thread variables that the scheduler updates at every fiber switch
// (not macros, so that headers using these names as parameter names still compile).
inline thread_local const uint3& threadIdx = ::emu::detail::g_thread_idx;
inline thread_local const uint3& blockIdx = ::emu::detail::g_block_idx;
inline thread_local const dim3& blockDim = ::emu::detail::g_block_dim;
inline thread_local const dim3& gridDim = ::emu::detail::g_grid_dim;
inline constexpr int warpSize = 32;

// ------------------------------------ synchronisation ------------------------------------
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::emu::detail::block_barrier(::emu::detail::Op::SyncThreads, 0, file, line);
}
inline int __syncthreads_count(int pred, const char* file = __builtin_FILE(),
                               int line = __builtin_LINE()) {
  return ::emu::detail::block_barrier(::emu::detail::Op::SyncThreadsCount, pred != 0, file, line);
}
inline int __syncthreads_and(int pred, const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
  return ::emu::detail::block_barrier(::emu::detail::Op::SyncThreadsAnd, pred != 0, file, line);
}
inline int __syncthreads_or(int pred, const char* file = __builtin_FILE(),
                            int line = __builtin_LINE()) {
  return ::emu::detail::block_barrier(::emu::detail::Op::SyncThreadsOr, pred != 0, file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  ::emu::detail::Fiber& f = ::emu::detail::cur("__syncwarp");
  ::emu::detail::warp_collective(f, ::emu::detail::Op::SyncWarp, 0, mask, file, line);
}
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}
inline void __nanosleep(unsigned) {}
[[noreturn]] inline void __trap() { ::emu::detail::fail("__trap() called"); }

// ------------------------------------ warp shuffles / votes ------------------------------------
template <class T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = 32,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::emu::detail::shuffle(::emu::detail::Op::ShflIdx, mask, var, srcLane, width, file, line);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::emu::detail::shuffle(::emu::detail::Op::ShflUp, mask, var, delta, width, file, line);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::emu::detail::shuffle(::emu::detail::Op::ShflDown, mask, var, delta, width, file, line);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::emu::detail::shuffle(::emu::detail::Op::ShflXor, mask, var,
                                static_cast<long long>(static_cast<unsigned>(laneMask)), width,
                                file, line);
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return ::emu::detail::vote(::emu::detail::Op::Ballot, mask, pred, file, line);
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return static_cast<int>(::emu::detail::vote(::emu::detail::Op::Any, mask, pred, file, line));
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return static_cast<int>(::emu::detail::vote(::emu::detail::Op::All, mask, pred, file, line));
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned v, const char* file = __builtin_FILE(),
                                  int line = __builtin_LINE()) {
  return ::emu::detail::reduce(::emu::detail::Op::ReduceAdd, false, mask, v, file, line);
}
inline int __reduce_add_sync(unsigned mask, int v, const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
  return static_cast<int>(::emu::detail::reduce(::emu::detail::Op::ReduceAdd, true, mask,
                                                static_cast<uint32_t>(v), file, line));
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned v, const char* file = __builtin_FILE(),
                                  int line = __builtin_LINE()) {
  return ::emu::detail::reduce(::emu::detail::Op::ReduceMin, false, mask, v, file, line);
}
inline int __reduce_min_sync(unsigned mask, int v, const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
  return static_cast<int>(::emu::detail::reduce(::emu::detail::Op::ReduceMin, true, mask,
                                                static_cast<uint32_t>(v), file, line));
}
inline unsigned __reduce_max_sync(unsigned mask, unsigned v, const char* file = __builtin_FILE(),
                                  int line = __builtin_LINE()) {
  return ::emu::detail::reduce(::emu::detail::Op::ReduceMax, false, mask, v, file, line);
}
inline int __reduce_max_sync(unsigned mask, int v, const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
  return static_cast<int>(::emu::detail::reduce(::emu::detail::Op::ReduceMax, true, mask,
                                                static_cast<uint32_t>(v), file, line));
}

// ------------------------------------ bit / cast / math intrinsics ------------------------------------
inline unsigned __float_as_uint(float x) {
  unsigned u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
inline int __float_as_int(float x) {
  int u;
  std::memcpy(&u, &x, 4);
  return u;
}
inline float __int_as_float(int u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
inline long long __double_as_longlong(double x) {
  long long u;
  std::memcpy(&u, &x, 8);
  return u;
}
inline double __longlong_as_double(long long u) {
  double x;
  std::memcpy(&x, &u, 8);
  return x;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline int __mulhi(int a, int b) {
  return static_cast<int>((static_cast<long long>(a) * b) >> 32);
}
// (glibc declares __expf & co. noexcept; these definitions must match.)
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) noexcept { return std::exp(x); }
inline float __logf(float x) noexcept { return std::log(x); }
inline float __powf(float a, float b) noexcept { return std::pow(a, b); }
inline float __sinf(float x) noexcept { return std::sin(x); }
inline float __cosf(float x) noexcept { return std::cos(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / std::sqrt(x); }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __saturatef(float x) { return x != x ? 0.0f : std::min(1.0f, std::max(0.0f, x)); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
// CUDA's device-side min/max accept any mix of arithmetic types.
template <class A, class B,
          class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
constexpr std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <class A, class B,
          class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
constexpr std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

// Cache-hinted loads/stores are plain accesses.
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }

// ------------------------------------ atomics (plain: fibers never preempt) ------------------------------------
#define EMU_ATOMIC_RMW(NAME, T, EXPR) \
  inline T NAME(T* p, T v) {          \
    T old = *p;                       \
    *p = (EXPR);                      \
    return old;                       \
  }
EMU_ATOMIC_RMW(atomicAdd, int, old + v)
EMU_ATOMIC_RMW(atomicAdd, unsigned, old + v)
EMU_ATOMIC_RMW(atomicAdd, unsigned long long, old + v)
EMU_ATOMIC_RMW(atomicAdd, float, old + v)
EMU_ATOMIC_RMW(atomicAdd, double, old + v)
EMU_ATOMIC_RMW(atomicSub, int, old - v)
EMU_ATOMIC_RMW(atomicSub, unsigned, old - v)
EMU_ATOMIC_RMW(atomicExch, int, v)
EMU_ATOMIC_RMW(atomicExch, unsigned, v)
EMU_ATOMIC_RMW(atomicExch, unsigned long long, v)
EMU_ATOMIC_RMW(atomicExch, float, v)
EMU_ATOMIC_RMW(atomicMax, int, std::max(old, v))
EMU_ATOMIC_RMW(atomicMax, unsigned, std::max(old, v))
EMU_ATOMIC_RMW(atomicMax, long long, std::max(old, v))
EMU_ATOMIC_RMW(atomicMax, unsigned long long, std::max(old, v))
EMU_ATOMIC_RMW(atomicMin, int, std::min(old, v))
EMU_ATOMIC_RMW(atomicMin, unsigned, std::min(old, v))
EMU_ATOMIC_RMW(atomicMin, long long, std::min(old, v))
EMU_ATOMIC_RMW(atomicMin, unsigned long long, std::min(old, v))
EMU_ATOMIC_RMW(atomicAnd, int, old & v)
EMU_ATOMIC_RMW(atomicAnd, unsigned, old & v)
EMU_ATOMIC_RMW(atomicAnd, unsigned long long, old & v)
EMU_ATOMIC_RMW(atomicOr, int, old | v)
EMU_ATOMIC_RMW(atomicOr, unsigned, old | v)
EMU_ATOMIC_RMW(atomicOr, unsigned long long, old | v)
EMU_ATOMIC_RMW(atomicXor, int, old ^ v)
EMU_ATOMIC_RMW(atomicXor, unsigned, old ^ v)
EMU_ATOMIC_RMW(atomicXor, unsigned long long, old ^ v)
#undef EMU_ATOMIC_RMW
inline unsigned atomicInc(unsigned* p, unsigned v) {
  unsigned old = *p;
  *p = old >= v ? 0u : old + 1u;
  return old;
}
inline unsigned atomicDec(unsigned* p, unsigned v) {
  unsigned old = *p;
  *p = (old == 0 || old > v) ? v : old - 1u;
  return old;
}
template <class T>
inline T atomicCAS(T* p, T compare, T v) {
  static_assert(std::is_integral_v<T>, "atomicCAS: integral types only");
  T old = *p;
  if (old == compare) *p = v;
  return old;
}

// ------------------------------------ fp16 / bf16 functions missing from the CUDA host path
namespace emu::fp {
inline __half hfma(__half a, __half b, __half c) {
  return __float2half_rn(std::fma(__half2float(a), __half2float(b), __half2float(c)));
}
inline __nv_bfloat16 hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
  return __float2bfloat16_rn(
      std::fma(__bfloat162float(a), __bfloat162float(b), __bfloat162float(c)));
}
inline __half2 hfma2(__half2 a, __half2 b, __half2 c) {
  return __halves2half2(hfma(__low2half(a), __low2half(b), __low2half(c)),
                        hfma(__high2half(a), __high2half(b), __high2half(c)));
}
inline __nv_bfloat162 hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  return __halves2bfloat162(hfma(__low2bfloat16(a), __low2bfloat16(b), __low2bfloat16(c)),
                            hfma(__high2bfloat16(a), __high2bfloat16(b), __high2bfloat16(c)));
}
}  // namespace emu::fp
// Templates, so that a CUDA version which declares host versions wins overload resolution instead
// of clashing.
template <int = 0>
inline __half __hfma(__half a, __half b, __half c) { return ::emu::fp::hfma(a, b, c); }
template <int = 0>
inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
  return ::emu::fp::hfma(a, b, c);
}
template <int = 0>
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) { return ::emu::fp::hfma2(a, b, c); }
template <int = 0>
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
  return ::emu::fp::hfma2(a, b, c);
}

// ------------------------------------ PTX wrappers (host emulation) ------------------------------------
namespace plm::cuda::ptx {

inline unsigned char* dynamic_smem() { return ::emu::dynamic_smem(); }

// cp.async.cg.shared.global [dst], [src], 16, src-size (= valid ? 16 : 0). Deferred until the
// cp_async_wait that retires its group (or thread exit).
inline void cp_async16(void* smem_dst, const void* gmem_src, bool valid) {
  using namespace ::emu::detail;
  Fiber& f = cur("cp_async16");
  Block& b = *g_block;
  check_shared_operand(b, f, smem_dst, 16, "cp_async16 destination");
  if (valid) {
    if (reinterpret_cast<uintptr_t>(gmem_src) % 16 != 0)
      fail("cp_async16: " + thread_desc(b, f) + " passed a global source that is not 16-byte aligned");
    if (overlaps_smem(b, gmem_src, 16))
      fail("cp_async16: " + thread_desc(b, f) +
           " passed a source inside shared memory (cp.async copies global -> shared)");
  }
  f.open_group.push_back({smem_dst, gmem_src, valid});
}

// cp.async.commit_group: closes the current group (possibly empty).
inline void cp_async_commit() {
  ::emu::detail::Fiber& f = ::emu::detail::cur("cp_async_commit");
  f.groups.push_back(std::move(f.open_group));
  f.open_group.clear();
}

// cp.async.wait_group N: performs this thread's committed groups except the N most recent.
template <int N>
inline void cp_async_wait() {
  static_assert(N >= 0, "cp_async_wait<N>: N must be >= 0");
  ::emu::detail::Fiber& f = ::emu::detail::cur("cp_async_wait");
  while (f.groups.size() > static_cast<size_t>(N)) {
    ::emu::detail::perform(f.groups.front());
    f.groups.pop_front();
  }
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8i..8i+7 give rows 0..7 of matrix i;
// r[i] = this lane's fragment of matrix i (row lane/4, columns 2*(lane%4), 2*(lane%4)+1).
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  ::emu::detail::ldmatrix_impl(r, smem_row, 4, false);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16|bf16}.{f16|bf16}.f32 d, a, b, d.
template <class T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ::emu::detail::mma_impl<T>(d, a, b);
}

// mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 d, a, b, d.
inline void mma_16832_s8(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ::emu::detail::mma_s8_impl(d, a, b);
}

}  // namespace plm::cuda::ptx

#endif  // PLM_CUDA_EMU_H
