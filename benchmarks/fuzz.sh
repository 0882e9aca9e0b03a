#!/usr/bin/env bash
# Longer coverage-guided fuzzing of the parsers of files from elsewhere (tests/fuzz_targets.py;
# the suite runs each for a few thousand inputs). Usage: benchmarks/fuzz.sh [SECONDS per target]
# (default 300). Findings are written as crash-* / oom-* / timeout-* files into benchmarks/fuzz-out/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-300}
out=benchmarks/fuzz-out
mkdir -p "$out"
python3 -c "import atheris" 2>/dev/null || python3 -m pip install -q "atheris>=2.3"
for target in index pickle image; do
  [ -d "$out/corpus-$target" ] || python3 tests/fuzz_targets.py seed "$target" "$out/corpus-$target"
  echo "== $target ($seconds s)"
  python3 tests/fuzz_targets.py "$target" "$out/corpus-$target" -max_total_time="$seconds" -timeout=20 \
    -rss_limit_mb=2048 -artifact_prefix="$out/" -print_final_stats=1 2>&1 | tail -12
done
