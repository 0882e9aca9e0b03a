#!/usr/bin/env bash
# Builds tests/native/search_driver.cpp with csrc/cpu for one target and runs it.
#   tests/native/run_native.sh host              # this machine's compiler, every x86 ISA it has
#   tests/native/run_native.sh aarch64           # aarch64-linux-gnu-g++, run under qemu-aarch64
# Needs (Debian): g++; for aarch64 g++-aarch64-linux-gnu and qemu-user. Writes to $OUT_DIR
# (default: a temporary directory), including kernels_generic.s for reading the vector code.
set -euo pipefail
target=${1:-host}
here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/../../csrc" && pwd)
out=${OUT_DIR:-$(mktemp -d)}
mkdir -p "$out"
kflags=(-O3 -fno-math-errno -fno-trapping-math -std=c++17 -I"$src")
case "$target" in
  host) cxx=${CXX:-g++}; run=(); isas=(generic); [[ $(uname -m) == x86_64 ]] && isas+=(avx2 avx512) ;;
  aarch64) cxx=aarch64-linux-gnu-g++; run=(qemu-aarch64 -L /usr/aarch64-linux-gnu); isas=(generic) ;;
  *) echo "run_native.sh: target must be host or aarch64, not '$target'" >&2; exit 2 ;;
esac
declare -A isaflags=([generic]="" [avx2]="-mavx2 -mfma -mf16c"
                     [avx512]="-mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c")
objs=()
defs=()
for isa in "${isas[@]}"; do
  # shellcheck disable=SC2086
  "$cxx" "${kflags[@]}" ${isaflags[$isa]} -DPLM_ISA_$isa=1 -DPLM_ISA_NS=isa_$isa -c "$src/cpu/kernels.cpp" -o "$out/kernels_$isa.o"
  objs+=("$out/kernels_$isa.o")
  defs+=("-DPLM_HAVE_${isa^^}=1")
done
"$cxx" "${kflags[@]}" -DPLM_ISA_generic=1 -DPLM_ISA_NS=isa_generic -S "$src/cpu/kernels.cpp" -o "$out/kernels_generic.s"
"$cxx" -O2 -std=c++17 -I"$src" "${defs[@]}" "$here/search_driver.cpp" "$src/cpu/dispatch.cpp" \
  "$src/cpu/search.cpp" "$src/cpu/threads.cpp" "${objs[@]}" -pthread -o "$out/search_driver"
status=0
for isa in "${isas[@]}"; do  # an ISA this CPU lacks reports "skipped"
  "${run[@]}" "$out/search_driver" "$isa" || status=1
done
exit $status
