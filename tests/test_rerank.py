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


def ref_alpha_qe(q, db, k, alpha, metric="cosine", ranks=None, with_bound=False):
    """float64 alpha-QE of the given (rounded) values; with_bound: also expand_bound's (Q, D)."""
    q, db = q.astype(np.float64), db.astype(np.float64)
    raw = db
    if metric == "cosine":
        q, db = l2n(q), l2n(db)
    out, bounds = [], []
    for i, x in enumerate(q):
        nb, sims = ref_neighbours(x, db, k)
        if ranks is not None:
            nb = [int(j) for j in ranks[i][:k] if j >= 0]
        out.append(ref_expand(x, db, nb, sims, alpha))
        bounds.append(expand_bound(x, db, nb, alpha, metric, raw.shape[1]))
    return (np.array(out), np.array(bounds)) if with_bound else np.array(out)


def ref_dba(db, k, alpha, metric="cosine", with_bound=False):
    db = db.astype(np.float64)
    D = db.shape[1]
    if metric == "cosine":
        db = l2n(db)
    out, bounds = [], []
    for i, x in enumerate(db):
        nb, sims = ref_neighbours(x, db, k, exclude=i)
        out.append(ref_expand(x, db, nb, sims, alpha))
        bounds.append(expand_bound(x, db, nb, alpha, metric, D))
    return (np.array(out), np.array(bounds)) if with_bound else np.array(out)


U = 2.0 ** -24  # float32 unit roundoff


def gamma(n):
    """n u / (1 - n u): the relative error of n float32 roundings (Higham, Lemma 3.1)."""
    return n * U / (1 - n * U)


def unit_error(D):
    """Relative error of every element of x / (|x| + 1e-6) in float32, summed in any order: the
    sum of D squares is off by gamma_D, its square root by at most gamma_D / (2 (1 - gamma_D)),
    then sqrt, + 1e-6 and the division round once each."""
    eta = gamma(D) / (2 * (1 - gamma(D)))
    return eta + gamma(3) + eta * gamma(3)


def expand_bound(x, db, nb, alpha, metric, D):
    """Elementwise bound on |float32 L2N(x + sum_i max(s_i, 0)^alpha d_i) - the float64 value|
    for the float64 (already normalised, for cosine) x and db rows nb, whatever order the float32
    sums run in (the library: L2N of the inputs, pylandmark.search for s_i or a float32 einsum
    with given ranks, a float32 einsum for the sum, L2N). First order in u, each step's error
    carried through the next:
      inputs: cosine L2N rounds each element by b = unit_error(D) relative (ip: exact, b = 0);
      s_i: a D-term dot product of those, off by ds_i = ((1 + gamma_D)(1 + b)^2 - 1) sum |x d_i|;
      w_i = max(s_i, 0)^alpha (1-Lipschitz clamp; float32 pow within 1 ulp = 2u): off by
            alpha max(s_i + ds_i, 0)^(alpha-1) ds_i + 2u w_i for alpha >= 1, exact (1) for 0;
      v = x + sum w_i d_i: the inputs' errors plus gamma_(k+1) of |x| + sum w_i |d_i|;
      y = v / (|v| + 1e-6): dy_j <= (dv_j + |y_j| |dv|) / (|v| + 1e-6) (the Jacobian), over
            1 - |dv| / |v| (second order), plus unit_error(D) |y_j| for this L2N's own rounding."""
    assert alpha == 0 or alpha >= 1, "w is Lipschitz at 0 only for alpha = 0 or >= 1"
    b = unit_error(D) if metric == "cosine" else 0.0
    nb = [int(j) for j in nb]
    d = db[nb].reshape(len(nb), db.shape[1])
    ad = np.abs(d)
    s = d @ x
    ds = ((1 + gamma(D)) * (1 + b) ** 2 - 1) * (ad @ np.abs(x))
    sp = np.maximum(s, 0.0)
    w = sp ** alpha
    dw = np.zeros_like(w) if alpha == 0 else alpha * (sp + ds) ** (alpha - 1) * ds + 2 * U * (sp + ds) ** alpha
    v = x + w @ d
    dv = (b * np.abs(x) + (dw * (1 + b) + w * b) @ ad
          + gamma(len(nb) + 1) * (np.abs(x) + (w + dw) @ ad) * (1 + b))
    n, ndv = np.linalg.norm(v), np.linalg.norm(dv)
    assert ndv < n
    y = v / (n + 1e-6)
    return (dv + np.abs(y) * ndv) / (n + 1e-6) / (1 - ndv / n) + unit_error(D) * np.abs(y)


def half_spacing(y, dtype):
    """Half the spacing of dtype (float16 or bfloat16) at |y|: the most rounding y to it moves y
    (rounding to nearest; the spacing is taken at the larger neighbour's binade)."""
    bits, emin = {"float16": (11, -14), "bfloat16": (8, -126)}[dtype]
    e = np.floor(np.log2(np.maximum(np.abs(y), 2.0 ** emin)))
    return 2.0 ** (e - bits)  # 2^(e - (bits - 1)) / 2


def assert_within(got, want, bound):
    got = np.asarray(got, dtype=np.float64)
    err = np.abs(got - want)
    assert (err <= bound).all(), f"max error {err.max():.3g}; excess {(err - bound).max():.3g} over the bound"


def data(rng, q=7, n=53, d=19):
    return (rng.standard_normal((q, d)).astype(np.float32),
            rng.standard_normal((n, d)).astype(np.float32))


# Every comparison below is with the float64 reference on the same (rounded) inputs, within
# expand_bound: the float32 arithmetic's worst case for any summation order (numpy, torch, BLAS,
# search ISA), plus half a float16 / bfloat16 spacing where the result is rounded to that dtype.


@pytest.mark.parametrize("metric", ["cosine", "ip"])
@pytest.mark.parametrize("k,alpha", [(1, 3.0), (4, 0.0), (5, 2.5), (53, 3.0), (60, 1.0)])
def test_alpha_qe_matches_reference(rng, metric, k, alpha):
    q, db = data(rng)
    if metric == "ip":
        db *= 0.3  # keep weights moderate
    got = alpha_qe(q, db, k, alpha, metric=metric)
    assert got.dtype == np.float32 and got.shape == q.shape
    want, bound = ref_alpha_qe(q, db, k, alpha, metric, with_bound=True)
    assert_within(got, want, bound)
    # unit rows: |got| is |want| (1 - 1e-6 / |v|, from L2N's + 1e-6) within the norm of the error
    assert_within(np.linalg.norm(got.astype(np.float64), axis=1), np.linalg.norm(want, axis=1),
                  np.linalg.norm(bound, axis=1))


def test_alpha_qe_uses_given_ranks(rng):
    q, db = data(rng, q=5, n=31, d=13)
    _, idx = plm.search(q, db, k=12)
    # similarities recomputed from the descriptors (an einsum, not the search kernel): the same
    # float64 reference and bound as searching
    want, bound = ref_alpha_qe(q, db, 6, 3.0, with_bound=True)
    assert_within(alpha_qe(q, db, 6, 3.0, ranks=idx), want, bound)
    assert_within(alpha_qe(q, db, 6, 3.0), want, bound)
    # arbitrary (not nearest) neighbours with -1 padding: used as given
    ranks = np.stack([rng.permutation(31)[:4] for _ in range(5)])
    ranks = np.concatenate([ranks, -np.ones((5, 2), dtype=np.int64)], axis=1)
    got = alpha_qe(q, db, 6, 2.0, ranks=ranks)
    assert_within(got, *ref_alpha_qe(q, db, 6, 2.0, ranks=ranks, with_bound=True))


def test_alpha_qe_single_query_and_half(rng):
    q, db = data(rng, q=3, n=29, d=21)
    one = alpha_qe(q[1], db, 3)
    assert one.shape == (21,)
    want, bound = ref_alpha_qe(q, db, 3, 3.0, with_bound=True)
    assert_within(one, want[1], bound[1])
    qh, dbh = q.astype(np.float16), db.astype(np.float16)
    got = alpha_qe(qh, dbh, 3)
    assert got.dtype == np.float16
    want, bound = ref_alpha_qe(qh, dbh, 3, 3.0, with_bound=True)  # float32 inside, then float16
    assert_within(got, want, bound + half_spacing(np.abs(want) + bound, "float16"))


def test_alpha_qe_torch(rng):
    torch = pytest.importorskip("torch")
    q, db = data(rng, q=4, n=37, d=17)
    want, bound = ref_alpha_qe(q, db, 5, 3.0, with_bound=True)
    got = alpha_qe(torch.from_numpy(q), torch.from_numpy(db), 5)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    assert_within(got.numpy(), want, bound)
    qb, dbb = torch.from_numpy(q).bfloat16(), torch.from_numpy(db).bfloat16()
    got = alpha_qe(qb, dbb, 5)
    assert got.dtype == torch.bfloat16
    want_b, bound_b = ref_alpha_qe(qb.float().numpy(), dbb.float().numpy(), 5, 3.0, with_bound=True)
    assert_within(got.float().numpy(), want_b, bound_b + half_spacing(np.abs(want_b) + bound_b, "bfloat16"))
    _, idx = plm.search(torch.from_numpy(q), torch.from_numpy(db), k=9)
    assert_within(alpha_qe(torch.from_numpy(q), torch.from_numpy(db), 5, ranks=idx).numpy(), want, bound)


@pytest.mark.parametrize("metric", ["cosine", "ip"])
@pytest.mark.parametrize("k,alpha", [(1, 3.0), (3, 0.0), (7, 3.0), (40, 2.0)])
def test_dba_matches_reference(rng, metric, k, alpha):
    _, db = data(rng, n=41, d=11)
    if metric == "ip":
        db *= 0.4
    got = dba(db, k, alpha, metric=metric)
    assert got.dtype == np.float32 and got.shape == db.shape
    want, bound = ref_dba(db, k, alpha, metric, with_bound=True)
    assert_within(got, want, bound)
    # chunks of 4 rows: other einsum shapes, so other float32 sums; the same reference and bound
    assert_within(dba(db, k, alpha, metric=metric, chunk_size=4), want, bound)


def test_dba_torch_and_duplicates(rng):
    torch = pytest.importorskip("torch")
    _, db = data(rng, n=23, d=9)
    db[5] = db[2]  # a duplicate must still count the other copy as a neighbour
    want, bound = ref_dba(db, 4, 3.0, with_bound=True)
    got = dba(torch.from_numpy(db), 4, chunk_size=5)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    assert_within(got.numpy(), want, bound)
    assert_within(dba(db, 4), want, bound)


def test_dba_ip_when_self_is_not_nearest(rng):
    # with inner products a short vector's nearest rows are long ones, not itself. Row 0 is
    # (0.05 + 0.01|n|, 0.01 n, 0.01 n, 0.01 n), the others (c + 0.1|n|, 0.1 n, ...): for every
    # |n| <= 4, self scores <= 0.09^2 + 3 * 0.04^2 < 0.013 and the 4 rows with c >= 1.5 at least
    # 0.05 * 1.5 - 3 * 0.004 * 0.4 > 0.027 (any seed; with plain noise, a negative first element,
    # 1 seed in 3, made row 0 its own nearest)
    db = rng.standard_normal((9, 4)).astype(np.float32) * 0.1
    db[0] *= 0.1
    db[:, 0] = np.abs(db[:, 0]) + np.array([0.05, 3, 2.5, 2, 1.5, 1.2, 1.1, 1.0, 0.9], dtype=np.float32)
    _, idx = plm.search(db[:1], db, k=4, metric="ip")
    assert 0 not in idx[0].tolist()
    for k in (1, 3, 8):
        assert_within(dba(db, k, 3.0, metric="ip"), *ref_dba(db, k, 3.0, "ip", with_bound=True))


def test_dba_single_row_is_normalised_self():
    db = np.array([[3.0, 4.0]], dtype=np.float32)
    want, bound = ref_dba(db, 5, 3.0, with_bound=True)
    # no neighbours: L2N twice, x / (|x| + e) / (|x| / (|x| + e) + e) = x / (5 + e (5 + e)), e = 1e-6
    np.testing.assert_allclose(want, [[3.0, 4.0]] / np.float64(5 + 1e-6 * (5 + 1e-6)), rtol=1e-15, atol=0)
    assert_within(dba(db, 5), want, bound)


def test_rerank_composes_dba_then_qe(rng):
    q, db = data(rng, q=6, n=33, d=15)
    q2, db2 = rerank(q, db, qe_k=4, qe_alpha=2.0, dba_k=3, dba_alpha=3.0)
    assert_within(db2, *ref_dba(db, 3, 3.0, with_bound=True))
    # QE runs on the float32 DBA output it got: the reference starts from that same db2
    assert_within(q2, *ref_alpha_qe(q, db2, 4, 2.0, with_bound=True))
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
