"""pylandmark.search against a float64 numpy reference on fresh random data."""
from __future__ import annotations

import itertools
import threading

import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import ALL_ISAS

import pylandmark as plm
from pylandmark import _C

DTYPES = ("float16", "bfloat16", "float32")


def make(rng, shape, dtype, framework="numpy"):
    """Random normal data rounded to dtype, as numpy (ml_dtypes for bfloat16) or torch."""
    x = rng.standard_normal(shape).astype(np.float32)
    if framework == "torch":
        return torch.from_numpy(x).to(getattr(torch, dtype))
    return x.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)


def as_f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.double().numpy()
    return np.asarray(x).astype(np.float64)


def reference_scores(q, db, metric):
    """(Q, N) float64 scores; cosine treats zero vectors as scoring 0 against everything."""
    q, db = as_f64(q), as_f64(db)
    if metric == "cosine":
        qn, dn = np.linalg.norm(q, axis=1, keepdims=True), np.linalg.norm(db, axis=1, keepdims=True)
        q = np.divide(q, qn, out=np.zeros_like(q), where=qn > 0)
        db = np.divide(db, dn, out=np.zeros_like(db), where=dn > 0)
    return q @ db.T


U32 = 2.0 ** -24  # float32 unit roundoff


def gamma(n):
    """Higham's gamma_n = n u / (1 - n u): |theta| <= gamma_n for any product of n factors
    (1 + delta)^(+-1) with |delta| <= u (Accuracy and Stability of Numerical Algorithms, Lemma 3.1)."""
    return n * U32 / (1 - n * U32)


def score_bounds(q, db, metric):
    """(Q, N) worst-case |library score - reference_scores| for these very (already rounded)
    inputs, whatever order the kernel sums in (any ISA, vector width, blocking, FMA or not).

    The db is converted to float32 exactly, so only the float32 arithmetic errs. A dot product
    of D terms summed in any binary tree rounds each product at most D times (its own rounding,
    at most D - 1 additions; zero padding adds exactly): fl(sum x_d y_d) = sum x_d y_d (1 + theta_D)
    with a different |theta_D| <= gamma_D per term, so
      ip:     |s - sum q_d r_d| <= gamma_D * sum |q_d r_d|.
      cosine: q is normalised in double and rounded to float32 (q_d/|q| (1 + theta_2)); its dot with
              the float32 row adds theta_D per term: gamma_(D+2) * a, a = sum |q_d r_d| / (|q||r|);
              the row's float32 sum of squares is |r|^2 (1 + theta_D), whose 1/sqrt is off by at most
              gamma_D / (2 (1 - gamma_D)), and sqrt, 1/x and the final product round 3 more times: a
              factor (1 + beta) on the whole score, so |s - c| <= gamma_(D+2) a (1 + beta) + beta |c|.
    Rows whose float32 squares would overflow or underflow are rescored in double (more exact)."""
    q, db = as_f64(q), as_f64(db)
    D = q.shape[1]
    a = np.abs(q) @ np.abs(db).T
    if metric == "ip":
        return gamma(D) * a
    qn, dn = np.linalg.norm(q, axis=1)[:, None], np.linalg.norm(db, axis=1)[None, :]
    denom = qn * dn
    a = np.divide(a, denom, out=np.zeros_like(a), where=denom > 0)
    c = np.abs(reference_scores(q, db, "cosine"))
    eta = gamma(D) / (2 * (1 - gamma(D)))
    beta = eta + gamma(3) + eta * gamma(3)
    return gamma(D + 2) * a * (1 + beta) + beta * c


def tolerance(q, db, metric):
    """One absolute tolerance for a whole search: the largest per-pair bound (score_bounds)."""
    return float(score_bounds(q, db, metric).max())


def check_topk(scores, idx, ref, k, atol):
    """The result is the exact top-k of ref: valid, sorted, true scores, true k-th best, and the
    reference order (ties to the lower index) wherever scores are separated by more than atol."""
    scores, idx = np.asarray(scores), np.asarray(idx)
    Q, N = ref.shape
    assert scores.shape == (Q, k) and idx.shape == (Q, k)
    assert scores.dtype == np.float32 and idx.dtype == np.int64
    kk = min(k, N)
    # padding beyond N
    assert (idx[:, kk:] == -1).all() and np.isneginf(scores[:, kk:]).all()
    got_i = idx[:, :kk]
    assert ((got_i >= 0) & (got_i < N)).all()
    for row in got_i:
        assert len(set(row.tolist())) == kk, "duplicate indices"
    true = np.take_along_axis(ref, got_i, axis=1)
    np.testing.assert_allclose(scores[:, :kk], true, atol=atol, rtol=0)
    assert (np.diff(scores[:, :kk], axis=1) <= 0).all(), "not sorted best first"
    order = np.lexsort((np.broadcast_to(np.arange(N), ref.shape), -ref), axis=1)[:, :kk]
    kth_true = np.take_along_axis(ref, order[:, -1:], axis=1)[:, 0]
    # a missed row r (ref(r) >= kth_true) scored at most the returned k-th, and at least ref(r) - atol
    assert (scores[:, kk - 1] >= kth_true - atol).all(), "a better neighbour was missed"
    ref_sorted = np.take_along_axis(ref, order, axis=1)
    # positions whose reference score is well separated from its neighbours must match exactly
    gaps = np.abs(np.diff(np.take_along_axis(ref, np.lexsort(
        (np.broadcast_to(np.arange(N), ref.shape), -ref), axis=1)[:, :min(kk + 1, N)], axis=1), axis=1))
    for i in range(Q):
        for j in range(kk):
            left = gaps[i, j - 1] if j > 0 else np.inf
            right = gaps[i, j] if j < gaps.shape[1] else np.inf
            if min(left, right) > 2 * atol:
                assert got_i[i, j] == order[i, j], (i, j)
    return ref_sorted


# A covering design over the grid: every Q x N pair, with D, k and dtypes cycling so that
# each value of each axis appears several times.
QS, NS = (1, 3, 64, 257), (1, 7, 1000, 40961)
DS = (8, 100, 1023, 1024, 2048)
KS = (1, 5, 100, 1024, "over")
GRID = []
for n_case, (Q, N) in enumerate(itertools.product(QS, NS)):
    for rep in range(2):
        c = 2 * n_case + rep
        D = DS[c % len(DS)]
        k = KS[(c // 2 + rep) % len(KS)]
        k = N + 3 if k == "over" else k
        if Q * N * D > 257 * 40961 * 1024:  # keep the float64 reference affordable
            D = 1023
        GRID.append((Q, N, D, k, DTYPES[c % 3], DTYPES[(c // 3) % 3], ("numpy", "torch")[c % 2],
                     ("cosine", "ip")[(c // 2) % 2]))


@pytest.mark.parametrize("Q,N,D,k,qdtype,dbdtype,framework,metric", GRID)
def test_search_grid(rng, Q, N, D, k, qdtype, dbdtype, framework, metric):
    q = make(rng, (Q, D), qdtype, framework)
    db = make(rng, (N, D), dbdtype, framework)
    scores, idx = plm.search(q, db, k=k, metric=metric)
    if framework == "torch":
        assert isinstance(scores, torch.Tensor) and isinstance(idx, torch.Tensor)
        scores, idx = scores.numpy(), idx.numpy()
    else:
        assert isinstance(scores, np.ndarray)
    check_topk(scores, idx, reference_scores(q, db, metric), k, tolerance(q, db, metric))


@pytest.mark.parametrize("cpu_isa", ALL_ISAS, indirect=True)
@pytest.mark.parametrize("Q,N,D,k", [(1, 1000, 1023, 5), (2, 517, 8, 17), (3, 40961, 100, 100),
                                     (4, 999, 2048, 1024), (5, 3001, 1024, 7), (13, 257, 33, 300),
                                     (64, 4099, 1024, 100), (257, 2000, 100, 5)])
@pytest.mark.parametrize("dbdtype", DTYPES)
def test_search_every_isa(rng, cpu_isa, Q, N, D, k, dbdtype):
    q = make(rng, (Q, D), "float32")
    db = make(rng, (N, D), dbdtype)
    for metric in ("cosine", "ip"):
        scores, idx = plm.search(q, db, k=k, metric=metric)
        check_topk(scores, idx, reference_scores(q, db, metric), k, tolerance(q, db, metric))


@pytest.mark.parametrize("cpu_isa", ALL_ISAS, indirect=True)
def test_half_conversion_is_exact_for_every_isa(cpu_isa):
    """Every finite float16 value (normals, subnormals, +-0) must convert exactly: search with a
    one-hot query reads single db elements back as scores."""
    bits = np.arange(0, 1 << 16, dtype=np.uint16)
    halves = bits.view(np.float16)
    halves = halves[np.isfinite(halves)]
    D = 16
    pad = (-len(halves)) % D
    db = np.concatenate([halves, np.zeros(pad, np.float16)]).reshape(-1, D)
    for col in (0, 5, 15):
        q = np.zeros(D, np.float32)
        q[col] = 1.0
        scores, idx = plm.search(q, db, k=len(db), metric="ip")
        got = np.empty(len(db), np.float32)
        got[idx] = scores
        np.testing.assert_array_equal(got, db[:, col].astype(np.float32))


def test_ties_go_to_lower_index(rng):
    base = make(rng, (5, 64), "float32")
    db = np.concatenate([base, base, base])  # rows i, i+5, i+10 are identical
    db = np.concatenate([db] * 2000)  # 30000 rows: every thread split sees ties
    q = base[2:4]
    for metric in ("cosine", "ip"):
        scores, idx = plm.search(q, db, k=7, metric=metric)
        np.testing.assert_array_equal(idx[0], [2, 7, 12, 17, 22, 27, 32])
        np.testing.assert_array_equal(idx[1], [3, 8, 13, 18, 23, 28, 33])
        assert (scores[0] == scores[0, 0]).all()


def test_zero_vectors_score_zero_under_cosine(rng):
    db = make(rng, (50, 20), "float32")
    db[[3, 17]] = 0
    q = -db[:1]  # everything but row 0 and the zero rows is random; zero rows score exactly 0
    scores, idx = plm.search(q, db, k=50)
    zero_pos = np.flatnonzero(np.isin(idx[0], [3, 17]))
    assert (scores[0, zero_pos] == 0).all()
    s0, i0 = plm.search(np.zeros(20, np.float32), db, k=4)
    np.testing.assert_array_equal(i0, [0, 1, 2, 3])
    np.testing.assert_array_equal(s0, np.zeros(4, np.float32))


def test_one_dimensional_query_gives_one_dimensional_result(rng):
    db = make(rng, (100, 31), "float16")
    q = make(rng, (31,), "float32")
    s, i = plm.search(q, db, k=3)
    assert s.shape == (3,) and i.shape == (3,)
    s2, i2 = plm.search(q[None], db, k=3)
    np.testing.assert_array_equal(i, i2[0])
    np.testing.assert_array_equal(s, s2[0])


def test_k_beyond_n_pads(rng):
    db = make(rng, (3, 8), "float32")
    s, i = plm.search(db[:1], db, k=6)
    np.testing.assert_array_equal(i[0, 3:], [-1, -1, -1])
    assert np.isneginf(s[0, 3:]).all()
    assert i[0, 0] == 0


def test_memmapped_readonly_db_equals_in_memory(rng, tmp_path):
    db = make(rng, (20011, 96), "float16")
    path = tmp_path / "db.f16"
    db.tofile(path)
    mm = np.memmap(path, dtype=np.float16, mode="r", shape=db.shape)
    assert not mm.flags.writeable
    q = make(rng, (9, 96), "float32")
    s1, i1 = plm.search(q, mm, k=10)
    s2, i2 = plm.search(q, db, k=10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)


def test_strided_and_reversed_rows(rng):
    big = make(rng, (4001, 72), "float16")
    q = make(rng, (6, 72), "float32")
    for view, qv in ((big[::3], q), (big[::-1], q), (big[:, :64], q[:, :64])):
        s, i = plm.search(qv, view, k=20, metric="ip")
        check_topk(s, i, reference_scores(qv, view, "ip"), 20, tolerance(qv, view, "ip"))


def test_noncontiguous_queries_are_copied(rng):
    db = make(rng, (300, 40), "float32")
    qbig = make(rng, (40, 10), "float32")
    q = qbig.T  # (10, 40) with element stride 10
    s, i = plm.search(q, db, k=5)
    s2, i2 = plm.search(np.ascontiguousarray(q), db, k=5)
    np.testing.assert_array_equal(i, i2)
    tq = torch.from_numpy(qbig).t()
    s3, i3 = plm.search(tq, torch.from_numpy(db), k=5)
    np.testing.assert_array_equal(i3.numpy(), i2)


def test_results_follow_query_framework_and_mixed_frameworks(rng):
    db = make(rng, (500, 16), "float32")
    q = make(rng, (4, 16), "float32")
    s_t, i_t = plm.search(torch.from_numpy(q), db, k=3)
    assert isinstance(s_t, torch.Tensor) and s_t.dtype == torch.float32 and i_t.dtype == torch.int64
    s_n, i_n = plm.search(q, torch.from_numpy(db), k=3)
    assert isinstance(s_n, np.ndarray)
    np.testing.assert_array_equal(i_t.numpy(), i_n)


def test_requires_grad_tensors_are_accepted(rng):
    q = torch.randn(3, 24, requires_grad=True)
    db = torch.randn(100, 24)
    s, i = plm.search(q, db, k=4)
    ref = reference_scores(q.detach(), db, "cosine")
    check_topk(s.numpy(), i.numpy(), ref, 4, tolerance(q.detach(), db, "cosine"))


def test_thread_counts_give_identical_results(rng):
    import os

    db = make(rng, (30011, 128), "float16")
    q = make(rng, (70, 128), "float32")
    try:
        plm.set_num_threads(1)
        s1, i1 = plm.search(q, db, k=50)
        plm.set_num_threads(3)
        s3, i3 = plm.search(q, db, k=50)
    finally:
        plm.set_num_threads(0)
    # 0 restores the default: the cores this process may run on (not the count earlier tests left)
    if hasattr(os, "sched_getaffinity"):
        assert plm.get_num_threads() == len(os.sched_getaffinity(0))
    np.testing.assert_array_equal(i1, i3)
    np.testing.assert_array_equal(s1, s3)


def test_concurrent_calls_from_python_threads(rng):
    db = make(rng, (20000, 64), "float16")
    qs = [make(rng, (5, 64), "float32") for _ in range(4)]
    expected = [plm.search(q, db, k=8) for q in qs]
    results = [None] * 4

    def work(j):
        results[j] = plm.search(qs[j], db, k=8)

    threads = [threading.Thread(target=work, args=(j,)) for j in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (s, i), (es, ei) in zip(results, expected):
        np.testing.assert_array_equal(i, ei)
        np.testing.assert_array_equal(s, es)


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(queries=np.zeros((2, 3, 4), np.float32)), ValueError, "queries must be"),
    (dict(db=np.zeros(8, np.float32)), ValueError, "db must be (N, D)"),
    (dict(queries=np.zeros((2, 7), np.float32)), ValueError, "D=7"),
    (dict(k=0), ValueError, "k must be an int in [1, 2147483647], got 0"),
    (dict(k=2.0), TypeError, "k must be an int"),
    (dict(k=True), TypeError, "k must be an int"),
    (dict(db=np.zeros((0, 8), np.float32)), ValueError, "db is empty"),
    (dict(db=np.zeros((5, 8), np.float64)), TypeError, "db has dtype float64"),
    (dict(queries=np.zeros((2, 8), np.int32)), TypeError, "queries has dtype int32"),
    (dict(queries=[[0.0] * 8]), TypeError, "queries must be"),
    (dict(metric="l2"), ValueError, "metric must be"),
])
def test_bad_input_raises_clear_errors(kwargs, exc, words):
    args = dict(queries=np.ones((2, 8), np.float32), db=np.ones((5, 8), np.float32), k=2, metric="cosine")
    args.update(kwargs)
    with pytest.raises(exc) as info:
        plm.search(**args)
    assert words in str(info.value)


def test_nan_in_queries_is_rejected_with_the_row(rng):
    db = make(rng, (10, 8), "float32")
    q = make(rng, (3, 8), "float32")
    q[2, 5] = np.nan
    with pytest.raises(ValueError, match="row 2 contains NaN"):
        plm.search(q, db, k=2)


def test_db_with_strided_elements_is_rejected(rng):
    db = make(rng, (10, 16), "float32")[:, ::2]
    with pytest.raises(ValueError, match="db: the last axis must be contiguous"):
        plm.search(np.ones((1, 8), np.float32), db, k=2)


def test_native_layer_rejects_mixed_devices_and_bad_outputs():
    """The extension's own checks (the Python layer normally catches these first)."""
    q = np.ones((2, 8), np.float32)
    db = np.ones((5, 8), np.float32)
    s = np.empty((2, 3), np.float32)
    i = np.empty((2, 3), np.int64)

    def spec(a, device=1):
        return (a.ctypes.data, str(a.dtype), a.shape, tuple(x // a.itemsize for x in a.strides), device, 0, False)

    with pytest.raises(ValueError, match="same device"):
        _C.search(spec(q), spec(db, device=2), spec(s), spec(i), 3, True)
    with pytest.raises(ValueError, match="shape \\(Q, k\\)"):
        _C.search(spec(q), spec(db), spec(s), spec(i), 4, True)
    with pytest.raises(TypeError, match="indices must be int64"):
        _C.search(spec(q), spec(db), spec(s), spec(s), 3, True)
    ro = (s.ctypes.data, "float32", s.shape, (3, 1), 1, 0, True)
    with pytest.raises(ValueError, match="read-only"):
        _C.search(spec(q), spec(db), ro, spec(i), 3, True)


def test_empty_query_batch(rng):
    db = make(rng, (10, 8), "float32")
    s, i = plm.search(np.zeros((0, 8), np.float32), db, k=3)
    assert s.shape == (0, 3) and i.shape == (0, 3)


def test_search_kernel_describes_only_the_gpu_search():
    from pylandmark.ops import search_kernel

    with pytest.raises(ValueError, match="GPU search"):
        search_kernel(np.ones((2, 8), np.float32), np.ones((5, 8), np.float16), 5)


# ---- exact answers at the edges ---------------------------------------------------------------

EXTREME_SCALES = [1e20, 1e-22, 3e37, 1e-30, 1e-40]  # float32 squares overflow / underflow / subnormals


@pytest.mark.parametrize("cpu_isa", ALL_ISAS, indirect=True)
@pytest.mark.parametrize("dbdtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("Q", [1, 5, 70])  # the few-query path, and the tiled path
def test_cosine_at_extreme_magnitudes_is_exact(rng, cpu_isa, dbdtype, Q):
    """Rows c * q_i score cos = 1 whatever c; the old float32 sums of squares gave 0.0 for
    1e20 * q (overflow) and 1.0157 for 1e-22 * q (underflowed squares)."""
    D = 37
    q = rng.standard_normal((Q, D)).astype(np.float32)
    noise = rng.standard_normal((600, D)).astype(np.float32)
    rows = [q[i % Q] * np.float32(s) for i, s in enumerate(EXTREME_SCALES)]
    db32 = np.concatenate([noise[:300], np.stack(rows), noise[300:]])
    db = db32.astype(ml_dtypes.bfloat16) if dbdtype == "bfloat16" else db32
    scores, idx = plm.search(q, db, k=8, metric="cosine")
    ref = reference_scores(q, db, "cosine")
    bounds = score_bounds(q, db, "cosine")
    for i, s in enumerate(EXTREME_SCALES):
        row = 300 + i
        assert abs(ref[i % Q, row]) <= 1 + 1e-12
        hit = np.flatnonzero(idx[i % Q] == row)
        assert hit.size == 1, (s, idx[i % Q])
        # the reference is of the stored (rounded) row; score_bounds: float32 arithmetic, any order
        assert abs(scores[i % Q, hit[0]] - ref[i % Q, row]) <= bounds[i % Q, row], s
    check_topk(scores, idx, ref, 8, tolerance(q, db, "cosine"))


@pytest.mark.parametrize("cpu_isa", ALL_ISAS, indirect=True)
def test_extreme_queries_are_normalised_exactly(rng, cpu_isa):
    """fl(s * base) for s = 1e20, 1e-30 (normal float32) and 1e-40 (subnormal) and base itself.

    Rounding s * base to float32 moves it off the direction of base: by half an ulp per element,
    a relative 2^-24 for normal values but, in the subnormal range (ulp 2^-149 whatever the value),
    about 2^-17 for a 1e-40 query, which keeps only ~16 significant bits. So its true cosines differ
    from base's by ~2e-6, more than float32 arithmetic errs. Each query is therefore checked
    against float64 cosines of that exact query (the library's own error, score_bounds), and the
    scaled queries against base's cosines within what their rounding can move a cosine."""
    D, k = 24, 5
    db = make(rng, (300, D), "float16")
    base = rng.standard_normal((1, D)).astype(np.float32)
    scales = (1e20, 1e-30, 1e-40)
    q = np.concatenate([base * np.float32(s) for s in scales] + [base])
    assert (np.abs(q[2]) < np.finfo(np.float32).tiny).all()  # 1e-40 * base is subnormal
    scores, idx = plm.search(q, db, k=k)
    ref = reference_scores(q, db, "cosine")
    bounds = score_bounds(q, db, "cosine")
    for i in range(len(q)):  # every query: the exact top-k of its own float64 cosines
        check_topk(scores[i:i + 1], idx[i:i + 1], ref[i:i + 1], k, bounds[i].max())
    for i, s in enumerate(scales):
        # q_i = sigma * base + e (sigma = float32(s); sigma * base is exact in float64), each |e_d| at
        # most half the float32 spacing at q_id. x -> <x, r>/(|x||r|) has gradient norm <= 1/|x|, and
        # |x| >= |q_i| - |e| between q_i and sigma * base, so the cosines move by at most
        # |e| / (|q_i| - |e|): 2^-24-ish for normal q_i, ~2^-17 * sqrt(D) |q_i|_max / |q_i| subnormal.
        e = np.linalg.norm(np.spacing(np.abs(q[i])).astype(np.float64) / 2)
        moved = e / (np.linalg.norm(q[i].astype(np.float64)) - e)
        assert np.abs(ref[i] - ref[3]).max() <= moved, s
        # ... so q_i's scores are base's cosines within its own arithmetic error plus that
        check_topk(scores[i:i + 1], idx[i:i + 1], ref[3:4], k, bounds[i].max() + moved)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_every_non_finite_query_is_rejected_with_the_row(rng, bad):
    db = make(rng, (10, 8), "float32")
    q = make(rng, (3, 8), "float32")
    q[1, 2] = bad
    for metric in ("cosine", "ip"):
        with pytest.raises(ValueError, match="row 1 contains NaN or inf"):
            plm.search(q, db, k=2, metric=metric)


def test_negative_and_conjugate_views_are_read_by_value(rng):
    """torch views with the negative or conjugate bit share memory with their base; the values
    they stand for are what must be searched."""
    base = torch.from_numpy(rng.standard_normal((6, 1)).astype(np.float32))
    db = torch.from_numpy(rng.standard_normal((9, 1)).astype(np.float32))
    z = torch.complex(torch.zeros_like(base), base)
    views = [z.conj().imag, torch._neg_view(base)]
    assert all(v.is_neg() for v in views)
    for v in views:
        for metric in ("cosine", "ip"):
            for query, data in ((v, db), (db[:3], torch._neg_view(-db))):
                scores, idx = plm.search(query, data, k=4, metric=metric)
                want_s, want_i = plm.search(query.clone(), data.clone(), k=4, metric=metric)
                torch.testing.assert_close(scores, want_s)
                assert torch.equal(idx, want_i)


def test_thread_counts_beyond_reason_are_one_value_error():
    from pylandmark.ops import get_num_threads, set_num_threads

    before = get_num_threads()
    for n in (2 ** 40, 2 ** 63, -1):
        with pytest.raises(ValueError, match="n must be an int in"):
            set_num_threads(n)
    assert get_num_threads() == before


def test_results_beyond_the_machine_memory_are_a_value_error_not_an_oom_kill(rng, monkeypatch):
    import pylandmark.ops as ops

    monkeypatch.setattr(ops, "_physical_memory", lambda: 1 << 20)  # a 1 MiB machine: half is 512 KiB
    db = make(rng, (30, 8), "float16")
    with pytest.raises(ValueError, match=r"k=1000 for 100 queries needs .* GiB of results.*only N=30 rows"):
        plm.search(make(rng, (100, 8), "float32"), db, k=1000)  # 100 x 1000 x 12 B = 1.2 MB
    scores, idx = plm.search(make(rng, (10, 8), "float32"), db, k=1000)  # 120 KB fits
    assert idx.shape == (10, 1000) and (idx[:, 30:] == -1).all() and sorted(idx[0, :30]) == list(range(30))
