"""Coverage-guided fuzzing (atheris) of the parsers of files from elsewhere, bounded for the suite:
each target of tests/fuzz_targets.py runs a fixed number of inputs grown from real seeds, in its
own process (libFuzzer ends the process on a finding). A finding fails the test with the input
that caused it; longer runs: benchmarks/fuzz.sh."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

HERE = Path(__file__).resolve().parent
RUNS = {"index": 5000, "pickle": 20000, "image": 3000}


@pytest.mark.parametrize("target", sorted(RUNS))
def test_fuzz_target(target, tmp_path):
    from fuzz_targets import write_seeds

    corpus = tmp_path / "corpus"
    write_seeds(target, corpus)
    proc = subprocess.run([sys.executable, str(HERE / "fuzz_targets.py"), target, str(corpus),
                           f"-atheris_runs={RUNS[target]}", "-timeout=20", "-rss_limit_mb=2048",
                           f"-artifact_prefix={tmp_path}/"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    assert proc.returncode == 0 and not crashes, (crashes, proc.stderr[-4000:])
