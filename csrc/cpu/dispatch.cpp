// Picks the best kernel table this CPU runs; PYLANDMARK_CPU_ISA=generic|avx2|avx512 caps it.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cpu/kernels.h"

namespace plm::cpu {

namespace {

struct IsaEntry {
  const char* name;
  const KernelTable* table;
  bool (*supported)();
};

bool always() { return true; }
#if defined(PLM_HAVE_AVX2)
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
#endif
#if defined(PLM_HAVE_AVX512)
bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
}
#endif

const IsaEntry kIsas[] = {  // best first
#if defined(PLM_HAVE_AVX512)
    {"avx512", &kernels_isa_avx512, has_avx512},
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
