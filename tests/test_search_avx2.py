"""The blocking edges of the CPU search kernels (issue 17): the register-blocked many-query kernel
(6-query x 16-row tiles, d in slices of 256, 64-row db tiles, query blocks split over threads)
and the few-query direct kernels (query groups over blocks of 3 or 4 rows), each checked against
a float64 reference under every ISA this machine runs. Sizes straddle every block: Q, N and D
one below, at and one above the block sizes, k near N, and ties that cross panel boundaries."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import ALL_ISAS
from test_search import check_topk, make, reference_scores, tolerance

import pylandmark as plm

# (Q, N, D): Q past 6-query panels and the thread split (>= 96 queries: threads own query
# blocks; below, they split the db); N past 16-row panels and 64-row tiles; D past 8-wide
# vectors, 16-float padding and the 256-wide d slices.
BLOCKED = [(17, 65, 7), (95, 129, 257), (96, 63, 256), (97, 1000, 255), (301, 130, 1030),
           (200, 16, 16), (103, 1, 1), (1031, 200, 64), (36, 2049, 33)]
# Few-query direct kernels: every Q from 5 to 16 (and 1..4), N past row blocks of 3 and 4 and
# the 256-row calls.
DIRECT = [(Q, N, D) for Q, N, D in zip(range(1, 17), (1, 2, 3, 4, 5, 257, 259, 770) * 2,
                                       (1, 9, 31, 1024, 8, 17, 100, 513) * 2)]
# ... and every Q again over 1000 rows: AVX2 scores rows from 3 or 4 long runs of each 256-row
# call at once (256 = 4 x 64 = 3 x 85 + 1; the last call, 232 = 4 x 58 = 3 x 77 + 1), so each
# query group meets whole runs and the rows left over.
DIRECT += [(Q, 1000, 40) for Q in range(1, 17)]


def search_and_check(q, db, k, metric):
    scores, idx = plm.search(q, db, k=k, metric=metric)
    check_topk(scores, idx, reference_scores(q, db, metric), k, tolerance(q, db, metric))
    return scores, idx


@pytest.mark.parametrize("cpu_isa", ALL_ISAS, indirect=True)
@pytest.mark.parametrize("Q,N,D", BLOCKED + DIRECT)
@pytest.mark.parametrize("dbdtype", ["float16", "bfloat16", "float32"])
def test_block_edges_match_float64(rng, cpu_isa, Q, N, D, dbdtype):
    q = make(rng, (Q, D), "float32")
    db = make(rng, (N, D), dbdtype)
    for metric, k in (("cosine", min(N, 5)), ("ip", N + 3 if N < 20 else 7)):
        search_and_check(q, db, k, metric)


@pytest.mark.parametrize("cpu_isa", ALL_ISAS, indirect=True)
@pytest.mark.parametrize("Q", [3, 9, 100])
def test_k_near_n(rng, cpu_isa, Q):
    N, D = 70, 40
    q = make(rng, (Q, D), "float32")
    db = make(rng, (N, D), "float16")
    for k in (N - 1, N, N + 1):
        scores, idx = search_and_check(q, db, k, "cosine")
        if k >= N:  # every row once, then padding
            assert (np.sort(idx[:, :N], axis=1) == np.arange(N)).all()


@pytest.mark.parametrize("cpu_isa", ALL_ISAS, indirect=True)
@pytest.mark.parametrize("Q", [1, 9, 100])
def test_ties_across_panels_go_to_lower_index(rng, cpu_isa, Q):
    """Copies of one row at indices that straddle the 3-, 4-, 16- and 64-row blocks and the
    threads' db ranges tie exactly (same values, same arithmetic): the lowest indices win."""
    N, D = 5000, 48
    db = make(rng, (N, D), "float16")
    copies = np.array([15, 16, 17, 63, 64, 65, 127, 128, 2499, 2500, 2501, 4999])
    db[copies] = db[copies[0]]
    q = np.repeat(db[copies[:1]].astype(np.float32), Q, axis=0)
    q[1:] += make(rng, (Q - 1, D), "float32") * np.float32(1e-3)  # near but not equal queries
    k = len(copies)
    for metric in ("cosine", "ip"):
        scores, idx = plm.search(q, db, k=k, metric=metric)
        np.testing.assert_array_equal(idx[0], copies)
        assert (scores[0] == scores[0, 0]).all()
        # any other query sees the copies as one run of equal scores, in index order
        for i in range(1, Q):
            run = idx[i][np.isin(idx[i], copies)]
            assert (np.diff(run) > 0).all(), (i, idx[i])


@pytest.mark.parametrize("cpu_isa", ALL_ISAS, indirect=True)
def test_thread_counts_agree_on_the_blocked_kernel(rng, cpu_isa):
    """1, 2 and 3 threads split the queries (Q >= 96 per thread) or the db differently; every
    score is computed by the same kernel arithmetic, so the results are bit-identical."""
    q = make(rng, (300, 130), "float32")
    db = make(rng, (3000, 130), "float16")
    before = plm.get_num_threads()
    try:
        results = []
        for t in (1, 2, 3):
            plm.set_num_threads(t)
            results.append(plm.search(q, db, k=9))
            results.append(plm.search(q[:40], db, k=9))
    finally:
        plm.set_num_threads(before)
    for s, i in results[2::2]:
        np.testing.assert_array_equal(s, results[0][0])
        np.testing.assert_array_equal(i, results[0][1])
    for s, i in results[3::2]:
        np.testing.assert_array_equal(s, results[1][0])
        np.testing.assert_array_equal(i, results[1][1])


NATIVE = Path(__file__).resolve().parent / "native" / "run_native.sh"


@pytest.mark.slow
@pytest.mark.parametrize("target", ["host", "aarch64"])
def test_native_driver(tmp_path, target):
    """csrc/cpu built without Python by tests/native/run_native.sh and checked against double
    arithmetic by its driver: on this machine (every x86 ISA it runs), and cross-built for
    aarch64 and run under qemu-user (Debian: g++-aarch64-linux-gnu qemu-user)."""
    need = {"host": ["g++"], "aarch64": ["aarch64-linux-gnu-g++", "qemu-aarch64"]}[target]
    missing = [tool for tool in need if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    res = subprocess.run(["bash", str(NATIVE), target], capture_output=True, text=True,
                         env={**os.environ, "OUT_DIR": str(tmp_path)}, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "FAIL" not in res.stdout and "all checks passed" in res.stdout
    if target == "aarch64":  # the generic kernels are NEON code with hardware float16 conversion
        asm = (tmp_path / "kernels_generic.s").read_text()
        assert asm.count("fmla") > 100 and "fcvtl" in asm
