"""alpha-QE and DBA against a float64 brute-force reference."""
from __future__ import annotations

import numpy as np
import pytest

import pylandmark as plm
from pylandmark.retrieval.rerank import alpha_qe, dba, rerank


def l2n(x):
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)


def ref_neighbours(x, db, k, exclude=None):
    """Top-k rows of db by inner product with x (float64), ties to the lower index."""
    sims = db @ x
    order = sorted(range(len(db)), key=lambda i: (-sims[i], i))
    if exclude is not None:
        order.remove(exclude)
    return order[:k], sims


def ref_expand(x, db, nb, sims, alpha):
    out = x.copy()
    for i in nb:
        out += max(sims[i], 0.0) ** alpha * db[i]
    return out / (np.linalg.norm(out) + 1e-6)


def ref_alpha_qe(q, db, k, alpha, metric="cosine", ranks=None):
    q, db = q.astype(np.float64), db.astype(np.float64)
    if metric == "cosine":
        q, db = l2n(q), l2n(db)
    out = []
    for i, x in enumerate(q):
        nb, sims = ref_neighbours(x, db, k)
        if ranks is not None:
            nb = [int(j) for j in ranks[i][:k] if j >= 0]
        out.append(ref_expand(x, db, nb, sims, alpha))
    return np.array(out)


def ref_dba(db, k, alpha, metric="cosine"):
    db = db.astype(np.float64)
    if metric == "cosine":
        db = l2n(db)
    out = []
    for i, x in enumerate(db):
        nb, sims = ref_neighbours(x, db, k, exclude=i)
        out.append(ref_expand(x, db, nb, sims, alpha))
    return np.array(out)


def data(rng, q=7, n=53, d=19):
    return (rng.standard_normal((q, d)).astype(np.float32),
            rng.standard_normal((n, d)).astype(np.float32))


@pytest.mark.parametrize("metric", ["cosine", "ip"])
@pytest.mark.parametrize("k,alpha", [(1, 3.0), (4, 0.0), (5, 2.5), (53, 3.0), (60, 1.0)])
def test_alpha_qe_matches_reference(rng, metric, k, alpha):
    q, db = data(rng)
    if metric == "ip":
        db *= 0.3  # keep weights moderate
    got = alpha_qe(q, db, k, alpha, metric=metric)
    assert got.dtype == np.float32 and got.shape == q.shape
    want = ref_alpha_qe(q, db, k, alpha, metric)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_alpha_qe_uses_given_ranks(rng):
    q, db = data(rng, q=5, n=31, d=13)
    _, idx = plm.search(q, db, k=12)
    np.testing.assert_allclose(alpha_qe(q, db, 6, 3.0, ranks=idx), alpha_qe(q, db, 6, 3.0),
                               atol=1e-6)
    # arbitrary (not nearest) neighbours with -1 padding: used as given
    ranks = np.stack([rng.permutation(31)[:4] for _ in range(5)])
    ranks = np.concatenate([ranks, -np.ones((5, 2), dtype=np.int64)], axis=1)
    got = alpha_qe(q, db, 6, 2.0, ranks=ranks)
    np.testing.assert_allclose(got, ref_alpha_qe(q, db, 6, 2.0, ranks=ranks), rtol=1e-4, atol=2e-5)


def test_alpha_qe_single_query_and_half(rng):
    q, db = data(rng, q=3, n=29, d=21)
    one = alpha_qe(q[1], db, 3)
    assert one.shape == (21,)
    np.testing.assert_allclose(one, alpha_qe(q, db, 3)[1], atol=1e-6)
    qh, dbh = q.astype(np.float16), db.astype(np.float16)
    got = alpha_qe(qh, dbh, 3)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float64), ref_alpha_qe(qh, dbh, 3, 3.0), atol=2e-3)


def test_alpha_qe_torch(rng):
    torch = pytest.importorskip("torch")
    q, db = data(rng, q=4, n=37, d=17)
    want = ref_alpha_qe(q, db, 5, 3.0)
    got = alpha_qe(torch.from_numpy(q), torch.from_numpy(db), 5)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=2e-5)
    qb, dbb = torch.from_numpy(q).bfloat16(), torch.from_numpy(db).bfloat16()
    got = alpha_qe(qb, dbb, 5)
    assert got.dtype == torch.bfloat16
    want_b = ref_alpha_qe(qb.float().numpy(), dbb.float().numpy(), 5, 3.0)
    np.testing.assert_allclose(got.float().numpy(), want_b, atol=1.6e-2)
    _, idx = plm.search(torch.from_numpy(q), torch.from_numpy(db), k=9)
    np.testing.assert_allclose(alpha_qe(torch.from_numpy(q), torch.from_numpy(db), 5,
                                        ranks=idx).numpy(), want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("metric", ["cosine", "ip"])
@pytest.mark.parametrize("k,alpha", [(1, 3.0), (3, 0.0), (7, 3.0), (40, 2.0)])
def test_dba_matches_reference(rng, metric, k, alpha):
    _, db = data(rng, n=41, d=11)
    if metric == "ip":
        db *= 0.4
    got = dba(db, k, alpha, metric=metric)
    assert got.dtype == np.float32 and got.shape == db.shape
    np.testing.assert_allclose(got, ref_dba(db, k, alpha, metric), rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(dba(db, k, alpha, metric=metric, chunk_size=4), got, atol=1e-6)


def test_dba_torch_and_duplicates(rng):
    torch = pytest.importorskip("torch")
    _, db = data(rng, n=23, d=9)
    db[5] = db[2]  # a duplicate must still count the other copy as a neighbour
    want = ref_dba(db, 4, 3.0)
    got = dba(torch.from_numpy(db), 4, chunk_size=5)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(dba(db, 4), want, rtol=1e-4, atol=2e-5)


def test_dba_ip_when_self_is_not_nearest(rng):
    # with inner products a short vector's nearest rows are long ones, not itself
    db = rng.standard_normal((9, 4)).astype(np.float32) * 0.1
    db[:, 0] += np.array([0.05, 3, 2.5, 2, 1.5, 1.2, 1.1, 1.0, 0.9], dtype=np.float32)
    _, idx = plm.search(db[:1], db, k=4, metric="ip")
    assert 0 not in idx[0].tolist()
    for k in (1, 3, 8):
        np.testing.assert_allclose(dba(db, k, 3.0, metric="ip"), ref_dba(db, k, 3.0, "ip"),
                                   rtol=1e-4, atol=2e-5)


def test_dba_single_row_is_normalised_self():
    db = np.array([[3.0, 4.0]], dtype=np.float32)
    np.testing.assert_allclose(dba(db, 5), [[0.6, 0.8]], atol=1e-6)


def test_rerank_composes_dba_then_qe(rng):
    q, db = data(rng, q=6, n=33, d=15)
    q2, db2 = rerank(q, db, qe_k=4, qe_alpha=2.0, dba_k=3, dba_alpha=3.0)
    db_ref = ref_dba(db, 3, 3.0)
    np.testing.assert_allclose(db2, db_ref, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(q2, ref_alpha_qe(q, db_ref.astype(np.float32), 4, 2.0), rtol=1e-4,
                               atol=5e-5)
    q3, db3 = rerank(q, db)
    assert q3 is q and db3 is db


@pytest.mark.parametrize("kwargs,exc,pattern", [
    ({"k": 0}, ValueError, "k must be an int >= 1, got 0"),
    ({"k": 2.0}, TypeError, "k must be an int"),
    ({"alpha": -1.0}, ValueError, "alpha"),
    ({"alpha": float("nan")}, ValueError, "alpha"),
    ({"metric": "l2"}, ValueError, "metric"),
    ({"ranks": np.zeros((2, 3), dtype=np.int64)}, ValueError, "ranks"),
    ({"ranks": np.full((4, 3), 99)}, ValueError, "ranks"),
])
def test_alpha_qe_bad_input(rng, kwargs, exc, pattern):
    q, db = data(rng, q=4, n=10, d=5)
    with pytest.raises(exc, match=pattern):
        alpha_qe(q, db, **kwargs)


def test_bad_arrays(rng):
    q, db = data(rng, q=4, n=10, d=5)
    with pytest.raises(ValueError, match="D=5"):
        alpha_qe(q, db[:, :4].copy())
    with pytest.raises(TypeError, match="floating point"):
        alpha_qe(q.astype(np.int32), db)
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        dba(db.tolist())
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        dba(db[0])
    with pytest.raises(ValueError, match="chunk_size"):
        dba(db, chunk_size=0)
    with pytest.raises(ValueError, match="qe_k"):
        rerank(q, db, qe_k=-1)
