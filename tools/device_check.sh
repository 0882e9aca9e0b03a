#!/usr/bin/env bash
# Issue 18: everything a lent GPU machine should run, in one call, with logs and the tables last.
#
#   tools/device_check.sh --prepare   # here, before the call (~10 min on 2 cores): the cp312
#                                     # manylinux CUDA wheel for sm_90 (tools/build_wheels.sh
#                                     # --cuda) and pytest's wheels into dist/ (no network there)
#   tools/device_check.sh             # there, from the repository root, with dist/ carried
#
# On the device: installs dist/pylandmark*-<its python tag>-*.whl (pylandmark-cu13) into a venv
# that sees the machine's torch / timm / cupy (--system-site-packages), writes nvidia-smi, driver,
# torch and CUDA versions to $OUT/device.txt, runs the CUDA tests (tests/test_search_cuda.py and
# test_gem_cuda.py into $OUT/pytest.log; the other tests that take a GPU path, extraction in
# float16 and with SuperGlobal's pooling, the chunked multi-GPU ring, into $OUT/pytest_more.log), then benchmarks/gpu_bench.py
# --json $OUT/gpu.json into $OUT/gpu_bench.log, and prints the bench's tables last. Each step has its own time limit (STEP_S, default 240 s)
# and a failed step does not stop the next; the exit status is the first failure's.
# Env: OUT (default ./device-out), PYTHON (default python3), STEP_S, BENCH_ARGS (extra arguments
# for gpu_bench.py, e.g. "--only search").
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

if [[ ${1:-} == --prepare ]]; then
  set -e
  py312=${PY312:-/tmp/v312/bin/python}
  [[ -x $py312 ]] || PYENV_VERSION=3.12.1 python -m venv "$(dirname "$(dirname "$py312")")"
  mkdir -p dist
  start=$(date +%s)
  # the manylinux_2_28 CUDA wheel (static libstdc++ and cudart): a plain `pip wheel .` here
  # needs this machine's GLIBCXX_3.4.29 and glibc 2.34, which the device may not have
  CUDAARCHS=${CUDAARCHS:-90} tools/build_wheels.sh --cuda --python "$py312" --out dist --smoke
  "$py312" -m pip download -q pytest -d dist --only-binary=:all:
  echo "prepared in $(( $(date +%s) - start )) s:"; ls -l dist
  exit 0
fi

out=${OUT:-device-out}
step_s=${STEP_S:-240}
mkdir -p "$out"
: >"$out/summary.txt"
status=0
note() { echo "== $*" >>"$out/summary.txt"; }
run_step() {  # name, log, command...: bounded, logged, status kept
  local name=$1 log=$2 rc
  shift 2
  local t0=$SECONDS
  timeout "$step_s" "$@" >"$out/$log" 2>&1
  rc=$?
  note "$name: rc=$rc in $(( SECONDS - t0 )) s (log: $log)"
  (( rc != 0 && status == 0 )) && status=$rc
  return 0
}

tag=$("$python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
wheel=$(ls dist/pylandmark*-"$tag"-*.whl 2>/dev/null | head -1)
if [[ -z $wheel ]]; then
  echo "device_check: no dist/pylandmark*-$tag-*.whl for this $python; run tools/device_check.sh --prepare and carry dist" >&2
  exit 2
fi
venv=${VENV:-/tmp/plm-device-venv}
if [[ ! -x $venv/bin/python ]]; then
  "$python" -m venv --system-site-packages "$venv" || exit 2
fi
"$venv/bin/pip" install -q --no-index --no-deps --force-reinstall "$wheel" || exit 2
"$venv/bin/python" -c "import pytest" 2>/dev/null \
  || "$venv/bin/pip" install -q --no-index --find-links dist pytest || exit 2

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1
  (cd / && "$venv/bin/python" -) <<'EOF'
import torch, pylandmark as plm
from pylandmark import _C
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
print("pylandmark", plm.__version__, "from", plm.__file__)
print("extension CUDA kernels", hasattr(_C, "gem_forward_cuda"), "devices", _C.cuda_device_count(), "cpu isa", _C.cpu_isa())
EOF
} >"$out/device.txt" 2>&1
note "wheel $wheel"
cat "$out/device.txt" >>"$out/summary.txt"

# the project's addopts name pytest-benchmark, which the device may lack
run_step "CUDA tests" pytest.log "$venv/bin/python" -m pytest -q -p no:cacheprovider \
  -o addopts="-ra --durations=15" tests/test_search_cuda.py tests/test_gem_cuda.py
grep -E "passed|failed|error|skipped|no tests ran" "$out/pytest.log" | tail -n 1 >>"$out/summary.txt"
run_step "other GPU tests" pytest_more.log "$venv/bin/python" -m pytest -q -p no:cacheprovider \
  -o addopts="-ra" tests/test_extraction.py tests/test_pooling.py tests/test_chunked_search.py -k cuda
grep -E "passed|failed|error|skipped|no tests ran" "$out/pytest_more.log" | tail -n 1 >>"$out/summary.txt"
# shellcheck disable=SC2086
run_step "gpu_bench" gpu_bench.log "$venv/bin/python" benchmarks/gpu_bench.py --json "$out/gpu.json" ${BENCH_ARGS:-}
# exact search from codes on the GPU (issue 27): N = 1M x 1024 float16, against the float16 kernel
run_step "codes_bench" codes_bench.log "$venv/bin/python" benchmarks/bench_codes.py --device cuda --no-faiss \
  --queries 1 1024 --k 5 100 --repeat 5 --json "$out/codes_gpu.json" ${CODES_ARGS:-}
tail -n 12 "$out/codes_bench.log" >>"$out/summary.txt"
cat "$out/summary.txt"
echo "---- gpu_bench (tables last) ----"
tail -n 60 "$out/gpu_bench.log"
exit "$status"
