"""SuperGlobal's re-ranking (pylandmark.retrieval.rerank.superglobal) against its definition
written out in float64 loops, on odd sizes, a hand-made scene, and the edge cases (m > N, k > m,
duplicate rows, zero rows)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pylandmark.retrieval.rerank import superglobal

U = 2.0 ** -24


def desc_order(v: np.ndarray) -> np.ndarray:
    return np.argsort(-v, kind="stable")  # ties to the lower index


def reference(q, db, k, m, neighbours, beta):
    """The definition, one query and one row at a time, in float64 (cosine: unit rows)."""
    def unit(x):
        n = np.linalg.norm(x, axis=-1, keepdims=True)
        return np.where(n > 0, x / np.where(n > 0, n, 1), 0)

    q, db = unit(np.asarray(q, np.float64)), unit(np.asarray(db, np.float64))
    m, big_k = min(m, len(db)), neighbours + 1
    scores, ranks = [], []
    for qv in q:
        plain = db @ qv
        order = desc_order(plain)
        top = order[:m]
        x = db[top]
        aug = np.empty_like(x)
        for i in range(m):
            others = [j for j in desc_order(x @ x[i]) if j != i][: min(big_k, m) - 1]
            nb = [i, *others]  # itself, then its most similar others
            w = np.array([1.0] + [beta * (x[j] @ x[i]) for j in others])
            aug[i] = (w[:, None] * x[nb]).sum(0) / w.sum()
        a = aug @ qv
        e = aug[desc_order(a)[: min(big_k, m)]].max(axis=0)
        final = (a + aug @ e) / 2
        new = desc_order(final)
        ranks.append(np.concatenate([top[new], order[m:]])[:k])
        scores.append(np.concatenate([final[new], plain[order[m:]]])[:k])
    return np.array(scores), np.array(ranks)


def tolerance(dim: int, m: int) -> float:
    # float32: each score is a few dot products of vectors of norm <= 1 (D terms: error <= D u
    # each) over augmented rows that are weighted means of m-term sums (<= m u more); 8x covers
    # the handful of such steps in a score
    return 8 * (dim + m) * U


def assert_matches(got, ref, tol):
    s, i = (np.asarray(t.cpu() if isinstance(t, torch.Tensor) else t) for t in got)
    rs, ri = ref
    np.testing.assert_allclose(s, rs, rtol=0, atol=tol)
    for row in range(ri.shape[0]):
        gaps = np.abs(np.diff(rs[row]))
        for j in range(ri.shape[1]):  # a near-tie may swap; everything else is the same row
            near = (j > 0 and gaps[j - 1] <= 2 * tol) or (j < len(gaps) and gaps[j] <= 2 * tol)
            if not near:
                assert i[row, j] == ri[row, j], (row, j)


@pytest.mark.parametrize("n, dim, m, k, neighbours", [(37, 11, 23, 30, 4), (61, 5, 61, 17, 9), (29, 13, 7, 7, 2)])
def test_matches_the_definition(n, dim, m, k, neighbours):
    rng = np.random.default_rng(n)
    db = rng.normal(size=(n, dim)).astype(np.float32)
    q = rng.normal(size=(3, dim)).astype(np.float32)
    ref = reference(q, db, k, m, neighbours, 0.2)
    tol = tolerance(dim, m)
    assert_matches(superglobal(q, db, k, m=m, neighbours=neighbours, beta=0.2), ref, tol)
    assert_matches(superglobal(torch.from_numpy(q), torch.from_numpy(db), k, m=m, neighbours=neighbours, beta=0.2),
                   ref, tol)
    # given the plain ranking instead of searching: the same
    plain = np.argsort(-(q / np.linalg.norm(q, axis=1, keepdims=True)) @
                       (db / np.linalg.norm(db, axis=1, keepdims=True)).T, axis=1, kind="stable")
    assert_matches(superglobal(q, db, k, m=m, neighbours=neighbours, beta=0.2, ranks=plain), ref, tol)
    # one query as (D,)
    s1, i1 = superglobal(q[0], db, k, m=m, neighbours=neighbours, beta=0.2)
    assert s1.shape == (k,) and np.array_equal(i1, superglobal(q[:1], db, k, m=m, neighbours=neighbours,
                                                                 beta=0.2)[1][0])


def test_a_consistent_group_overtakes_a_lone_distractor():
    """q = e1. A lone row is the plain search's first (cosine 0.85) but resembles nothing else; four
    near-identical rows (cosine 0.80 with q) resemble each other. Re-ranked, the group comes first:
    each member's augmented row is itself, while the expansion (the maximum of the top rows) lies
    nearer the group."""
    q = np.array([[1.0, 0.0, 0.0, 0.0]], np.float32)
    distractor = [0.85, 0.0, 0.0, np.sqrt(1 - 0.85 ** 2)]
    group = [[0.8, 0.6 - d, d, 0.0] for d in (0.0, 0.01, 0.02, 0.03)]
    far = [[0.1, 0.0, 0.995, 0.0], [0.0, -1.0, 0.0, 0.0]]
    db = np.array([distractor, *group, *far], np.float32)
    s_plain = (db / np.linalg.norm(db, axis=1, keepdims=True)) @ q[0]
    assert np.argmax(s_plain) == 0
    s, i = superglobal(q, db, k=7, m=7, neighbours=2, beta=0.15)
    assert set(i[0, :4]) == {1, 2, 3, 4} and i[0, 4] == 0 and set(i[0, 5:]) == {5, 6}
    assert_matches((s, i), reference(q, db, 7, 7, 2, 0.15), tolerance(4, 7))


def test_beyond_m_the_plain_ranking_stays(rng):
    db = rng.normal(size=(40, 6)).astype(np.float32)
    q = rng.normal(size=(2, 6)).astype(np.float32)
    from pylandmark import search

    ps, pi = search(q, db, k=40)
    s, i = superglobal(q, db, k=40, m=10, neighbours=3)
    np.testing.assert_array_equal(i[:, 10:], pi[:, 10:])
    np.testing.assert_array_equal(s[:, 10:], ps[:, 10:])
    assert all(set(i[r, :10]) == set(pi[r, :10]) for r in range(2))  # the top 10, reordered
    # m > N: every row re-ranked; k > N refused
    assert_matches(superglobal(q, db, k=40, m=1000, neighbours=3), reference(q, db, 40, 40, 3, 0.15),
                   tolerance(6, 40))
    with pytest.raises(ValueError, match="k=41 is more than"):
        superglobal(q, db, k=41)


def test_duplicate_and_zero_rows(rng):
    db = rng.normal(size=(20, 7)).astype(np.float32)
    db[5] = db[3]
    db[6] = db[3]
    db[9] = 0.0
    db[11] = 0.0
    q = np.concatenate([db[3:4] + 0.01, rng.normal(size=(2, 7))]).astype(np.float32)
    s, i = superglobal(q, db, k=20, m=20, neighbours=4)
    assert np.isfinite(s).all() and all(sorted(r) == list(range(20)) for r in i)
    assert list(i[0, :3]) == [3, 5, 6]  # the three copies, in row order
    for r in range(3):  # zero rows stay zero (score 0), not copies of the best row
        assert (s[r][np.isin(i[r], [9, 11])] == 0).all()
    assert_matches((s, i), reference(q, db, 20, 20, 4, 0.15), tolerance(7, 20))


@pytest.mark.parametrize("kw, match", [({"k": 0}, "k must be"), ({"m": 0}, "m must be"),
                                       ({"neighbours": -1}, "neighbours must be"), ({"beta": -0.1}, "beta must"),
                                       ({"metric": "l2"}, "metric must"),
                                       ({"ranks": np.zeros((2, 3), np.int64)}, "ranks must be")])
def test_bad_arguments(rng, kw, match):
    db = rng.normal(size=(10, 4)).astype(np.float32)
    q = rng.normal(size=(2, 4)).astype(np.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        superglobal(q, db, **{"k": 5, "m": 5, **kw})


def test_top_of_rows_ties_go_to_the_lower_index(rng):
    from pylandmark.retrieval.superglobal import _top_desc

    for v in (rng.integers(0, 4, size=(2, 30, 41)).astype(np.float32), rng.normal(size=(3, 17)).astype(np.float32)):
        for k in (1, 5, 16, v.shape[-1]):
            np.testing.assert_array_equal(_top_desc(v, k), np.argsort(-v, axis=-1, kind="stable")[..., :k])


@pytest.mark.parametrize("fw", ["numpy", "torch"])
def test_top_of_rows_in_blocks_and_with_non_finite_values(rng, monkeypatch, fw):
    """The argmax passes run over blocks of rows (here 3 rows and a shorter last block); rows holding
    -inf or NaN among their picks are sorted instead. Both as the framework's stable sort."""
    from pylandmark.retrieval import superglobal as sg

    monkeypatch.setattr(sg, "_SELECT_ELEMENTS", 3 * 23)
    v = rng.integers(0, 5, size=(4, 5, 23)).astype(np.float32)
    v[0, 1, :20] = -np.inf  # only 3 finite values: picks beyond them are -inf
    v[1, 2, 7] = np.nan
    v[2, 3, [4, 9]] = np.inf
    t = torch.from_numpy(v.copy()) if fw == "torch" else v.copy()
    for k in (1, 4, 10):
        idx, vals = sg._top_values(t, k, fw)
        want = np.asarray(sg._stable_desc(t, fw)[..., :k])
        np.testing.assert_array_equal(np.asarray(idx), want)
        np.testing.assert_array_equal(np.asarray(vals), np.take_along_axis(v, want, axis=-1))
    np.testing.assert_array_equal(np.asarray(t), v)  # the picks were struck out of a scratch copy only


def test_chunks_do_not_change_the_answer(rng, monkeypatch):
    """One query per chunk gives the same bits as the default chunks (numpy and torch, searched and
    given ranks)."""
    from pylandmark.retrieval import rerank

    db = rng.normal(size=(80, 9)).astype(np.float32)
    q = rng.normal(size=(5, 9)).astype(np.float32)
    ranks = np.argsort(-q @ db.T, axis=1, kind="stable")
    calls = [lambda: superglobal(q, db, 30, m=20, neighbours=4),
             lambda: superglobal(q, db, 30, m=20, neighbours=4, ranks=ranks),
             lambda: superglobal(torch.from_numpy(q), torch.from_numpy(db), 30, m=20, neighbours=4)]
    default = [call() for call in calls]
    monkeypatch.setattr(rerank, "_SUPERGLOBAL_ELEMENTS", 1)
    for call, (s, i) in zip(calls, default):
        s1, i1 = call()
        np.testing.assert_array_equal(np.asarray(s1), np.asarray(s))
        np.testing.assert_array_equal(np.asarray(i1), np.asarray(i))


def test_no_queries_with_their_empty_ranks(rng):
    # zero queries and the (0, n) ranking an earlier search of them gives: an empty answer, not a
    # reduction error on the empty ranks (the bug: ranks.min() of an empty array)
    db = rng.normal(size=(10, 6)).astype(np.float32)
    for q, ranks in ((np.zeros((0, 6), np.float32), np.zeros((0, 5), np.int64)),
                     (torch.zeros((0, 6)), torch.zeros((0, 5), dtype=torch.int64))):
        s, i = superglobal(q, db if isinstance(q, np.ndarray) else torch.from_numpy(db), k=3, m=5, ranks=ranks)
        assert tuple(s.shape) == tuple(i.shape) == (0, 3)
