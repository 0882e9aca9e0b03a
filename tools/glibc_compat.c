/* Linked into the CUDA wheel's module only (tools/build_wheels.sh --cuda), whose static libstdc++
 * comes from the build machine's GCC, built against a newer glibc than the wheel targets (2.28).
 * Two of the symbols it uses are missing from glibc 2.28; these hidden definitions satisfy them
 * inside the module, with the same meaning:
 *  - __libc_single_threaded (glibc 2.32): 0 means "maybe multithreaded", so libstdc++ always
 *    uses atomic reference counts, which is what it did before glibc had the flag;
 *  - arc4random (glibc 2.36), behind std::random_device: random bits from getrandom (2.25). */
#include <errno.h>
#include <stdlib.h>
#include <sys/random.h>
#include <sys/types.h>

__attribute__((visibility("hidden"))) char __libc_single_threaded = 0;

__attribute__((visibility("hidden"))) unsigned int arc4random(void) {
  unsigned int v;
  for (;;) {
    ssize_t n = getrandom(&v, sizeof v, 0);
    if (n == (ssize_t)sizeof v) return v;
    if (n < 0 && errno != EINTR) abort(); /* arc4random cannot fail: no kernel getrandom */
  }
}
