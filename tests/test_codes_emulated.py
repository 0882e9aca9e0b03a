"""The GPU search from compact codes, run on the host CUDA emulator (tests/cuda_emu).

tests/cuda_emu/code_search_emu.cpp compiles csrc/cuda/code_launch.cuh (query quantisation, the
int8 mma.sync code scan, row lists, rescoring by the float search's tensor-core kernel, merge)
against the emulator. The independent reference of each test is the plain GPU search on the
same emulated device (tests/test_search_emulated.py checks that one against float64): the codes
path must give its scores and indices bit for bit. The bounds themselves are checked against
every pair's GPU score (L <= S <= U). The emulator sums tensor-core products in float32 with
round-to-nearest; the hardware's accumulation, for which the bound is widened
(ARCHITECTURE.md), is checked only when a GPU runs tests/test_search_cuda.py.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from search_checks import DTYPE_CODES, make, make_db

import pylandmark as plm

F16, BF16, F32 = "float16", "bfloat16", "float32"
I64, I32, PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


def device_codes(db: torch.Tensor, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes (N, Dg) uint8 bits of int8, meta (3, N)) in the GPU layout, built as prepare() does."""
    codes, meta = plm.ops.build_codes(db, metric)
    return plm.ops.device_codes(codes, meta, db.shape[0], db.shape[1], metric)


def _args(q, db):
    assert q.stride(1) == 1 and db.stride(1) == 1
    return (q.data_ptr(), DTYPE_CODES[q.dtype], q.stride(0), db.data_ptr(), DTYPE_CODES[db.dtype], db.stride(0),
            q.shape[0], db.shape[0], db.shape[1])


@pytest.fixture(scope="module")
def emu(emu_library, emu_search):
    codes_lib = emu_library("code_search_emu.cpp")
    code_fn, bounds_fn = codes_lib.plm_emu_code_search, codes_lib.plm_emu_code_bounds
    for fn in (code_fn, bounds_fn):
        fn.restype = ctypes.c_int
    code_fn.argtypes = [PTR, I32, I64, PTR, I32, I64, I64, I64, I64, I64, I32, PTR, I64, PTR, I32, I32, I64, I32,
                        I64, ctypes.c_uint64, PTR, PTR, ctypes.c_char_p, I32]
    bounds_fn.argtypes = [PTR, I32, I64, PTR, I32, I64, I64, I64, I64, I32, PTR, I64, PTR, PTR, PTR,
                          ctypes.c_char_p, I32]

    class Emu:
        def codes(self, q, db, k, metric="cosine", *, built=None, cc=90, smem=227 * 1024, sms=3,
                  blocks_per_sm=1, max_chunk=65536, seed=0):
            codes, meta = built if built is not None else device_codes(db, metric)
            scores = torch.empty((q.shape[0], k), dtype=torch.float32)
            indices = torch.empty((q.shape[0], k), dtype=torch.int64)
            info = ctypes.create_string_buffer(256)
            rc = code_fn(*_args(q, db), k, int(metric == "cosine"), codes.ctypes.data, codes.shape[1],
                         meta.ctypes.data, sms, cc, smem, blocks_per_sm, max_chunk, seed, scores.data_ptr(),
                         indices.data_ptr(), info, len(info))
            if rc:
                raise RuntimeError(info.value.decode())
            return scores, indices, info.value.decode()

        plain = staticmethod(emu_search)  # the plain GPU search on the same emulator (conftest)

        def bounds(self, q, db, metric="cosine"):
            codes, meta = device_codes(db, metric)
            Q, N = q.shape[0], db.shape[0]
            lower = np.empty((Q, N), np.float32)
            upper = np.empty((Q, N), np.float32)
            info = ctypes.create_string_buffer(256)
            rc = bounds_fn(*_args(q, db), int(metric == "cosine"), codes.ctypes.data, codes.shape[1],
                           meta.ctypes.data, lower.ctypes.data, upper.ctypes.data, info, len(info))
            if rc:
                raise RuntimeError(info.value.decode())
            return lower, upper

    return Emu()


def same_as_plain(emu, q, db, k, metric="cosine", **device):
    """Searches from codes and plainly on the same emulated device; asserts equal bits; returns
    (scores, indices, info of the codes search)."""
    scores, idx, info = emu.codes(q, db, k, metric, **device)
    assert info.startswith("codes"), info
    ref_scores, ref_idx, _ = emu.plain(q, db, k, metric, **device)
    assert torch.equal(idx, ref_idx), (idx, ref_idx)
    assert torch.equal(scores.view(torch.int32), ref_scores.view(torch.int32)), "scores differ in their bits"
    return scores, idx, info


def listed(info: str) -> tuple[int, int]:
    fields = dict(f.split("=") for f in info.split()[1:])
    return int(fields["listed"]), int(fields["full"])


# (Q, N, D, k, query dtype, db dtype, metric): more than 16 queries take the wide code tile
CASES = [
    (1, 1000, 64, 5, F16, F16, "cosine"),
    (1, 777, 72, 100, F32, F16, "ip"),
    (3, 1000, 8, 129, BF16, BF16, "cosine"),
    (5, 1300, 64, 1, F32, BF16, "cosine"),
    (17, 600, 32, 33, F16, F16, "ip"),
    (70, 513, 64, 5, F32, F16, "cosine"),
    (2, 50, 128, 1024, F16, BF16, "cosine"),
]


@pytest.mark.parametrize("Q,N,D,k,qdtype,dbdtype,metric", CASES)
def test_codes_give_the_plain_gpu_search_bit_for_bit(emu, rng, Q, N, D, k, qdtype, dbdtype, metric):
    q, db = make(rng, (Q, D), qdtype, "cpu"), make_db(rng, (N, D), dbdtype, metric, "cpu")
    _, _, info = same_as_plain(emu, q, db, k, metric)
    assert ("wide=1" in info) == (Q > 16), info


def test_the_codes_prune_most_rows(emu, rng):
    """Gaussian rows, k = 5: the rows rescored are a small part of the db (the point of the scan).
    The list is the union over the tile's queries of the rows whose upper bound reached the
    threshold known when their tile was scanned (the first tiles of a split mark more)."""
    q, db = make(rng, (2, 256), F16, "cpu"), make(rng, (3000, 256), F16, "cpu")
    _, _, info = same_as_plain(emu, q, db, 5, sms=2)
    rows, full = listed(info)
    assert full == 0 and 5 <= rows < 3000 // 5, info


def test_near_ties_fall_back_to_every_row(emu, rng):
    """Rows that all score within the bound's width: more than max(4096, N/16) marks, the query
    tile is rescored in full (and still exact)."""
    base = make(rng, (1, 32), F32, "cpu")
    db = (base + 1e-3 * make(rng, (5000, 32), F32, "cpu")).to(torch.float16)
    q = base.to(torch.float16)
    _, _, info = same_as_plain(emu, q, db, 5, sms=2)
    assert listed(info)[1] == 1, info


def test_chunks_and_splits(emu, rng):
    q, db = make(rng, (70, 64), F16, "cpu"), make_db(rng, (900, 64), F16, "cosine", "cpu")
    for device in ({"max_chunk": 16}, {"max_chunk": 64, "sms": 7}, {"sms": 1}, {"blocks_per_sm": 3, "sms": 5}):
        same_as_plain(emu, q, db, 10, **device)


def test_hostile_rows_and_queries(emu, rng):
    """Ties, duplicates across splits, zero / NaN / inf / tiny / huge rows, zero, orthogonal and
    non-finite queries: every case equals the plain search."""
    D = 64
    db = make(rng, (1500, D), F32, "cpu")
    db[[3, 400, 1100, 1499]] = db[700].clone()  # duplicates in different splits
    db[10] = 0
    db[20, 5] = float("nan")
    db[30] = 1e-6 * db[30]  # float16: subnormal elements
    db[40] = 1e4 * db[40]
    db[50:60] = db[50]  # all equal
    db = db.to(torch.float16)
    q = make(rng, (6, D), F32, "cpu")
    q[0] = db[700].float()
    q[1] = 0
    q[2, 0] = float("inf")
    q[3] = 0
    q[3, 0] = 1.0  # orthogonal to rows that are zero in dimension 0
    db[100:110, 0] = 0
    q[4] = db[50].float()
    for metric in ("cosine", "ip"):
        scores, idx, _ = same_as_plain(emu, q, db, 12, metric, sms=8)
        assert idx[0, :5].tolist() == [3, 400, 700, 1100, 1499]
        assert idx[2].eq(-1).all() and scores[2].isnan().all()  # non-finite query


def test_k_past_n_pads(emu, rng):
    q, db = make(rng, (3, 64), F16, "cpu"), make(rng, (40, 64), F16, "cpu")
    scores, idx, _ = same_as_plain(emu, q, db, 50)
    assert idx[:, 40:].eq(-1).all() and scores[:, 40:].isneginf().all()


@pytest.mark.parametrize("metric", ["cosine", "ip"])
@pytest.mark.parametrize("qdtype,dbdtype", [(F16, F16), (F32, BF16), (BF16, F16)])
def test_bounds_hold_every_pair(emu, rng, metric, qdtype, dbdtype):
    """L <= S <= U for every pair, S the plain GPU search's own score (k = N gives them all), on
    rows of wildly different norms and on rows whose quantisation error points along the query
    (the case the Cauchy-Schwarz step is tight for)."""
    N, D = 300, 64
    q = make(rng, (4, D), qdtype, "cpu")
    db = make_db(rng, (N, D), F32, metric, "cpu") * torch.from_numpy(2.0 ** rng.uniform(-8, 8, (N, 1))).float()
    db[:100] = q[0].float() + 0.02 * make(rng, (100, D), F32, "cpu")  # near the query
    db = db.to(getattr(torch, dbdtype))
    lower, upper = emu.bounds(q, db, metric)
    scores, idx, _ = emu.plain(q, db, N, metric)
    s = np.empty_like(lower)
    for i in range(q.shape[0]):
        s[i, idx[i].numpy()] = scores[i].numpy()
    assert (lower <= s).all() and (s <= upper).all()
    # Not vacuous: for the rows near query 0 (scores near 1 in both metrics) the bound is a few
    # hundredths wide (int8 steps of ~1/127 of the largest element over D = 64), so it prunes.
    assert np.median(upper[0, :100] - lower[0, :100]) < 0.1


def test_the_plain_search_scores_a_query_alike_in_any_batch(emu, rng):
    """A query's scores do not depend on how many queries share its search: the norms pass (many
    query tiles) sums each row's squares as the scan's own tiles do. The old norms pass summed
    in another order, so cosine scores moved in the last bit with the batch size, and a search
    from codes could not have equalled it."""
    q, db = make(rng, (520, 64), F16, "cpu"), make_db(rng, (300, 64), F16, "cosine", "cpu")
    db = (db.float() * torch.linspace(0.3, 3.0, 64)).to(torch.float16)  # uneven columns
    batch_scores, batch_idx, info = emu.plain(q, db, 8, sms=2)
    assert "norms_pass=1" in info, info
    for i in (0, 100, 519):
        alone_scores, alone_idx, info1 = emu.plain(q[i:i + 1], db, 8, sms=2)
        assert "norms_pass=0" in info1
        assert torch.equal(alone_idx[0], batch_idx[i])
        assert torch.equal(alone_scores[0].view(torch.int32), batch_scores[i].view(torch.int32))
