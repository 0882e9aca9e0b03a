"""The GPU search, run on the host CUDA emulator (tests/cuda_emu), against a float64 reference.

tests/cuda_emu/search_emu.cpp compiles csrc/cuda/search_launch.cuh (plan, query preparation,
tensor-core and SIMT scan kernels, merge) with g++ against the emulator, which runs every CUDA
thread as a fiber, implements cp.async / ldmatrix / mma.sync from the PTX ISA, fills shared memory
and the workspace with garbage, and fails on divergent barriers. The device limits are arguments,
so each test picks the scan kernel, the number of db splits and the query chunk size. This is
the logic of the GPU path, not its timing or its memory model: tests/test_search_cuda.py runs
the same checks on a real GPU.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from search_checks import check, check_matches_cpu, make, make_db, reference, tolerance

H100 = {"cc": 90, "smem": 227 * 1024}


def run_and_check(emu_search, q, db, k, metric="cosine", kernel=None, **device):
    """Searches on the emulator under two thread schedules, checks the exact top-k against the
    float64 reference and the CPU kernel; returns (scores, indices, info)."""
    scores, idx, info = emu_search(q, db, k, metric, **device)
    if kernel:
        assert info.split()[0] == kernel, info
    again, idx2, _ = emu_search(q, db, k, metric, seed=7, **device)
    assert torch.equal(idx, idx2) and torch.equal(scores.nan_to_num(), again.nan_to_num()), \
        "results depend on the thread schedule (a shared-memory race)"
    atol = tolerance(str(q.dtype).removeprefix("torch."), str(db.dtype).removeprefix("torch."))
    ref = reference(q, db, metric)
    check(scores, idx, ref, k, atol)
    check_matches_cpu(q, db, idx, ref, k, metric, atol)
    return scores, idx, info


F16, BF16, F32 = "float16", "bfloat16", "float32"



# (Q, N, D, k, query dtype, db dtype, metric, kernel): the tensor-core scans need a half or
# bfloat16 db with 16-byte aligned rows (D % 8 == 0); more than 16 queries take the wide tile.
CASES = [
    (1, 300, 64, 5, F16, F16, "cosine", "mma_small"),
    (16, 777, 72, 33, F32, F16, "ip", "mma_small"),
    (5, 1000, 8, 129, BF16, BF16, "cosine", "mma_small"),
    (3, 2000, 64, 1000, F32, BF16, "cosine", "mma_small"),
    (2, 1, 64, 40, F16, F16, "cosine", "mma_small"),
    (2, 50, 128, 1024, F16, BF16, "cosine", "mma_small"),
    (17, 500, 64, 1, F16, F16, "cosine", "mma_wide"),
    (64, 640, 32, 32, BF16, F16, "ip", "mma_wide"),
    (65, 300, 96, 100, F32, F16, "cosine", "mma_wide"),
    (130, 1200, 64, 128, F16, BF16, "cosine", "mma_wide"),
    (20, 1500, 64, 1000, F32, BF16, "cosine", "mma_wide"),
    (3, 300, 17, 5, F16, F16, "cosine", "simt"),
    (40, 500, 33, 100, F32, F32, "cosine", "simt"),
    (2, 700, 64, 129, BF16, F32, "ip", "simt"),
    (9, 130, 1, 31, F16, F16, "cosine", "simt"),
]


@pytest.mark.parametrize("Q,N,D,k,qdtype,dbdtype,metric,kernel", CASES)
def test_exact_top_k(emu_search, rng, Q, N, D, k, qdtype, dbdtype, metric, kernel):
    q, db = make(rng, (Q, D), qdtype, "cpu"), make_db(rng, (N, D), dbdtype, metric, "cpu")
    run_and_check(emu_search, q, db, k, metric, kernel)


def test_gpus_before_sm80_take_the_simt_scan(emu_search, rng):
    q, db = make(rng, (33, 64), F16, "cpu"), make(rng, (400, 64), F16, "cpu")
    run_and_check(emu_search, q, db, 5, kernel="simt", cc=75, smem=64 * 1024)


def test_small_shared_memory_falls_back_to_the_small_tile(emu_search, rng):
    """sm_86 has 99 KiB per block: too little for the wide tile, enough for the small one."""
    q, db = make(rng, (40, 64), F16, "cpu"), make(rng, (400, 64), F16, "cpu")
    run_and_check(emu_search, q, db, 100, kernel="mma_small", cc=86, smem=99 * 1024)


def test_too_little_shared_memory_is_an_error(emu_search, rng):
    q, db = make(rng, (4, 64), F16, "cpu"), make(rng, (400, 64), F16, "cpu")
    with pytest.raises(RuntimeError, match="shared memory per block"):
        emu_search(q, db, 5, cc=75, smem=16 * 1024)


@pytest.mark.parametrize("Q,kernel", [(3, "mma_small"), (40, "mma_wide")])
@pytest.mark.parametrize("dbdtype", [F16, F32])
def test_duplicate_rows_in_different_splits_tie_to_the_lower_index(emu_search, rng, Q, kernel, dbdtype):
    if dbdtype == F32:
        kernel = "simt"
    db = make(rng, (1500, 64), dbdtype, "cpu")
    copies = [3, 400, 401, 1100, 1499]  # several db splits of 128-row tiles
    db[copies] = db[700].clone()
    q = make(rng, (Q, 64), F16, "cpu")
    q[0] = db[700].to(q.dtype)
    scores, idx, info = run_and_check(emu_search, q, db, 8, kernel=kernel, sms=8)
    assert int(info.split("splits=")[1].split()[0]) > 1, info
    assert idx[0, :6].tolist() == sorted([700, *copies])
    assert torch.unique(scores[0, :6]).numel() == 1


def test_zero_rows_and_zero_queries_score_zero(emu_search, rng):
    db = make(rng, (600, 64), F16, "cpu")
    db[[5, 77, 300]] = 0
    q = make(rng, (5, 64), F16, "cpu")
    q[2] = 0
    scores, idx, _ = run_and_check(emu_search, q, db, 10)
    assert idx[2].tolist() == list(range(10)) and (scores[2] == 0).all()


@pytest.mark.parametrize("kernel,dbdtype,qdtype", [("mma_small", F16, F32), ("simt", F32, F16)])
def test_non_finite_query_rows_give_nan_and_minus_one(emu_search, rng, kernel, dbdtype, qdtype):
    q, db = make(rng, (6, 64), qdtype, "cpu"), make(rng, (500, 64), dbdtype, "cpu")
    q[1, 3], q[4, 0] = float("nan"), float("inf")
    scores, idx, info = emu_search(q, db, 7)
    assert info.startswith(kernel)
    bad = [1, 4]
    assert torch.isnan(scores[bad]).all() and (idx[bad] == -1).all()
    good = [0, 2, 3, 5]
    ref = reference(q[good], db, "cosine")
    check(scores[good], idx[good], ref, 7, tolerance(qdtype, dbdtype))


@pytest.mark.parametrize("Q,max_chunk", [(150, 64), (150, 128), (300, 64)])
def test_query_chunks_give_the_unchunked_result(emu_search, rng, Q, max_chunk):
    q, db = make(rng, (Q, 64), F32, "cpu"), make(rng, (700, 64), F16, "cpu")
    whole, whole_idx, _ = emu_search(q, db, 9)
    scores, idx, info = run_and_check(emu_search, q, db, 9, max_chunk=max_chunk)
    assert f"chunk={max_chunk}" in info
    assert torch.equal(idx, whole_idx) and torch.equal(scores, whole)


@pytest.mark.parametrize("extra,kernel", [(8, "mma_small"), (3, "simt")])
def test_strided_db_rows(emu_search, rng, extra, kernel):
    """Rows farther apart than D: a stride that keeps rows 16-byte aligned stays on tensor cores."""
    base = make(rng, (900, 64 + extra), F16, "cpu")
    db = base[:, :64]
    run_and_check(emu_search, make(rng, (4, 64), F16, "cpu"), db, 12, kernel=kernel)


@pytest.mark.parametrize("Q,D,qdtype,dbdtype,kernel", [
    (600, 64, F16, F16, "mma_wide"), (520, 72, F32, BF16, "mma_wide"),
    (300, 40, F16, F32, "simt"), (260, 17, BF16, F16, "simt")])
def test_db_norms_computed_once_for_many_query_tiles(emu_search, rng, Q, D, qdtype, dbdtype, kernel):
    """From 8 query tiles on, 1/|x| of every db row comes from one pass before the scan."""
    q, db = make(rng, (Q, D), qdtype, "cpu"), make_db(rng, (300, D), dbdtype, "cosine", "cpu")
    db[7] = 0
    _, _, info = run_and_check(emu_search, q, db, 6, kernel=kernel)
    assert "norms_pass=1" in info, info
    _, _, info = run_and_check(emu_search, q, db, 6, "ip", kernel=kernel)
    assert "norms_pass=0" in info, info


def test_many_splits_and_resident_blocks(emu_search, rng):
    """32 resident blocks for one query tile: 5000 rows in splits of two 128-row tiles."""
    q, db = make(rng, (2, 64), BF16, "cpu"), make(rng, (5000, 64), BF16, "cpu")
    _, _, info = run_and_check(emu_search, q, db, 50, sms=16, blocks_per_sm=2)
    assert "splits=20" in info, info


def test_more_neighbours_than_rows_pad_every_kernel(emu_search, rng):
    for dbdtype, D in ((F16, 64), (F32, 64), (F16, 30)):
        q, db = make(rng, (20, D), F16, "cpu"), make(rng, (70, D), dbdtype, "cpu")
        scores, idx, _ = run_and_check(emu_search, q, db, 200)
        assert (idx[:, 70:] == -1).all() and torch.isneginf(scores[:, 70:]).all()


def test_workspace_garbage_never_reaches_the_results(emu_search, rng):
    """The workspace starts as 0xA5 bytes (search_emu.cpp): lists a block never fills would show
    up as huge scores or wild indices."""
    q, db = make(rng, (3, 64), F16, "cpu"), make(rng, (129, 64), F16, "cpu")
    scores, idx, _ = run_and_check(emu_search, q, db, 5, sms=64)
    assert ((idx >= 0) & (idx < 129)).all() and np.isfinite(scores.numpy()).all()


# (Q, N, D, query dtype, db dtype, kernel, norms pass): rows c * q score cos = 1 whatever c
EXTREME = [
    (6, 400, 64, F32, BF16, "mma_small", False),
    (40, 400, 64, F32, BF16, "mma_wide", False),
    (7, 400, 40, F32, F32, "simt", False),
    (600, 300, 64, F32, BF16, "mma_wide", True),
    (300, 300, 40, F32, F32, "simt", True),
]


@pytest.mark.parametrize("Q,N,D,qdtype,dbdtype,kernel,norms_pass", EXTREME)
def test_cosine_at_extreme_magnitudes(emu_search, rng, Q, N, D, qdtype, dbdtype, kernel, norms_pass):
    """db rows 1e20 * q (float32 squares overflow: the old norm gave score 0), 1e-22 * q and
    1e-30 * q (squares underflow: the old scores exceeded 1), and queries scaled the same way."""
    q = make(rng, (Q, D), qdtype, "cpu")
    db = make_db(rng, (N, D), dbdtype, "cosine", "cpu")
    scales = (1e20, 1e-22, 1e-30, 3e37)
    for i, s in enumerate(scales):
        db[10 + i] = (q[i].double() * s).to(db.dtype)
    q[Q - 1] = q[Q - 1] * 1e20
    q[Q - 2] = q[Q - 2] * 1e-30
    scores, idx, info = run_and_check(emu_search, q, db, 6, kernel=kernel)
    assert ("norms_pass=1" in info) == norms_pass, info
    for i in range(len(scales)):
        assert idx[i, 0] == 10 + i, (scales[i], idx[i])
        assert abs(float(scores[i, 0]) - 1.0) <= tolerance(qdtype, dbdtype), (scales[i], scores[i])
