// Picks the best kernel table this CPU runs; PYLANDMARK_CPU_ISA=generic|avx2|avx512 caps it.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cpu/kernels.h"

#if defined(PLM_HAVE_AVX2) || defined(PLM_HAVE_AVX512)
#include <cpuid.h>
#endif

namespace plm::cpu {

namespace {

struct IsaEntry {
  const char* name;
  const KernelTable* table;
  bool (*supported)();
};

bool always() { return true; }

#if defined(PLM_HAVE_AVX2) || defined(PLM_HAVE_AVX512)
// CPUID and XGETBV read directly: __builtin_cpu_supports depends on the compiler runtime's CPU
// model, which some toolchains (zig's compiler-rt, used for the manylinux wheels) leave empty,
// and the vector state must be enabled by the OS as well as present in the CPU.
struct X86Features {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512vnni = false;  // EVEX vpdpbusd (the avx512 code kernels)
  bool avx_vnni = false;    // VEX vpdpbusd on ymm (Alder Lake and later clients, Zen 5, Sierra Forest)
};

X86Features detect_x86() {
  X86Features f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28);
  if (!osxsave || !avx) return f;
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool ymm = (xcr0_lo & 0x6u) == 0x6u;     // SSE and AVX state saved by the OS
  const bool zmm = (xcr0_lo & 0xe6u) == 0xe6u;   // plus opmask and both ZMM halves
  f.fma = ymm && (c & (1u << 12));
  f.f16c = ymm && (c & (1u << 29));
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = ymm && (b & (1u << 5));
  f.avx512f = zmm && (b & (1u << 16));
  f.avx512dq = zmm && (b & (1u << 17));
  f.avx512bw = zmm && (b & (1u << 30));
  f.avx512vl = zmm && (b & (1u << 31));
  f.avx512vnni = zmm && (c & (1u << 11));
  __cpuid_count(7, 1, a, b, c, d);
  f.avx_vnni = ymm && (a & (1u << 4));
  return f;
}

const X86Features& x86() {
  static const X86Features f = detect_x86();
  return f;
}
#endif
#if defined(PLM_HAVE_AVX2)
bool has_avx2() { return x86().avx2 && x86().fma && x86().f16c; }
#endif
#if defined(PLM_HAVE_AVX512)
bool has_avx512() {
  const X86Features& f = x86();
  return f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.f16c && f.fma;
}
#endif

#if defined(PLM_HAVE_AVX512) && defined(PLM_HAVE_AVX2)
// AVX-512 with the AVX2 register-blocked kernels for large query batches: the 6 x 16 GEMM
// micro-kernel keeps both FMA ports busy, where the 16-lane tile kernel (dot products reduced
// across lanes) does not; below block_min_q the tile kernel's cheaper packing wins. Measured
// on the 2-vCPU AVX-512 VNNI VM, N = 200,000 x 1024 float16, 2 threads: Q = 1024 2.04 s against
// 2.46 s, Q = 256 0.57 s against 0.67 s, Q = 128 0.97x, Q = 64 equal (benchmarks/RESULTS.md).
// Few queries: AVX-512's direct kernels (long streams, 16 lanes) up to its direct_max_q, then
// AVX2's query groups (3 rows in L1, up to 16 queries), instead of the tile kernel.
void scores_direct_avx512_or_avx2(const float* q, int64_t nq, const void* db, DType dt, int64_t row_stride,
                                  int64_t nt, int64_t D, float* out, float* inv_norms) {
  const KernelTable& k = nq <= kernels_isa_avx512.direct_max_q ? kernels_isa_avx512 : kernels_isa_avx2;
  k.scores_direct(q, nq, db, dt, row_stride, nt, D, out, inv_norms);
}

KernelTable avx512_with_blocked() {
  KernelTable t = kernels_isa_avx512;
  t.block_mr = kernels_isa_avx2.block_mr;
  t.block_nr = kernels_isa_avx2.block_nr;
  t.block_kc = kernels_isa_avx2.block_kc;
  t.pack_query_panels = kernels_isa_avx2.pack_query_panels;
  t.scores_block = kernels_isa_avx2.scores_block;
  t.scores_one_block = kernels_isa_avx2.scores_one_block;
  t.block_min_q = 256;
  t.direct_max_q = kernels_isa_avx2.direct_max_q;
  t.scores_direct = scores_direct_avx512_or_avx2;
  return t;
}
const KernelTable kernels_avx512_blocked = avx512_with_blocked();
#define PLM_AVX512_TABLE kernels_avx512_blocked
#elif defined(PLM_HAVE_AVX512)
#define PLM_AVX512_TABLE kernels_isa_avx512
#endif

const IsaEntry kIsas[] = {  // best first
#if defined(PLM_HAVE_AVX512)
    {"avx512", &PLM_AVX512_TABLE, has_avx512},
#endif
#if defined(PLM_HAVE_AVX2)
    {"avx2", &kernels_isa_avx2, has_avx2},
#endif
    {"generic", &kernels_isa_generic, always},
};
constexpr int kNumIsas = sizeof(kIsas) / sizeof(kIsas[0]);

const KernelTable* find(const char* name) {
  for (const auto& e : kIsas)
    if (std::strcmp(e.name, name) == 0 && e.supported()) return e.table;
  return nullptr;
}

const KernelTable* initial_table() {
  if (const char* env = std::getenv("PYLANDMARK_CPU_ISA")) {
    if (const KernelTable* t = find(env)) return t;
  }
  for (const auto& e : kIsas)
    if (e.supported()) return e.table;
  return &kernels_isa_generic;
}

std::atomic<const KernelTable*> g_active{nullptr};

}  // namespace

#if defined(PLM_HAVE_AVX2)
bool has_avx_vnni() { return x86().avx_vnni; }
#endif
#if defined(PLM_HAVE_AVX512)
bool has_avx512_vnni() { return x86().avx512vnni; }
#endif

const KernelTable& active_kernels() {
  const KernelTable* t = g_active.load(std::memory_order_acquire);
  if (!t) {
    t = initial_table();
    g_active.store(t, std::memory_order_release);
  }
  return *t;
}

const char* const* supported_isas(int* count) {
  static const char* names[kNumIsas];
  int n = 0;
  for (const auto& e : kIsas)
    if (e.supported()) names[n++] = e.name;
  *count = n;
  return names;
}

void set_isa(const char* name) {
  const KernelTable* t = find(name);
  if (!t) {
    std::string msg = std::string("isa '") + name + "' is not available on this CPU; choose one of:";
    int n = 0;
    const char* const* names = supported_isas(&n);
    for (int i = 0; i < n; ++i) msg += std::string(" ") + names[i];
    throw std::invalid_argument(msg);
  }
  g_active.store(t, std::memory_order_release);
}

}  // namespace plm::cpu
