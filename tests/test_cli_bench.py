"""The `pylandmark bench` command and the library function behind it."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pylandmark.cli import main
from pylandmark.retrieval.bench import BenchConfig, format_rows, run_bench


def test_run_bench_times_both_and_agrees_with_numpy():
    cfg = BenchConfig(n=3001, dim=67, queries=(1, 5), k=4, repeat=1)
    rows = run_bench(cfg)
    assert [r.queries for r in rows] == [1, 5]
    for r in rows:
        assert r.pylandmark_ms > 0 and r.numpy_ms > 0
        assert r.speedup == pytest.approx(r.numpy_ms / r.pylandmark_ms)
        assert r.same_results  # random float data: no ties, so exact top-k must equal numpy's
    text = format_rows(cfg, rows)
    table, legend = text.split("\n\n")
    # title, column header, one row per batch size; then the legend explaining every column
    assert "N=3001 x D=67" in table and table.count("\n") == 3
    assert all(col in legend for col in ("pylandmark ms", "numpy ms", "speed-up", "queries/s", "same"))


def test_cli_json_output(capsys):
    assert main(["bench", "--n", "500", "--dim", "16", "--queries", "2", "--k", "3", "--repeat", "1",
                 "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["n"] == 500 and len(out["rows"]) == 1 and out["rows"][0]["same_results"]


@pytest.mark.parametrize("argv,words", [(["bench", "--n", "0"], "must be >= 1"),
                                        (["bench", "--n", "3", "--k", "5"], "must not exceed")])
def test_cli_errors_are_one_line_and_nonzero(capsys, argv, words):
    assert main(argv + ["--quiet"]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_console_entry_point_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pylandmark", "bench", "--n", "300", "--dim", "8",
                          "--queries", "1", "--k", "2", "--repeat", "1", "--quiet"],
                         capture_output=True, text=True, check=True, cwd=tmp_path)
    assert "same top-k" in out.stdout
