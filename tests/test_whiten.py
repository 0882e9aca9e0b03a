"""Learned (Lw) and PCA whitening against independent numpy float64 references."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pylandmark.models import LandmarkNet
from pylandmark.models.whitening import install_whitening, strip_whitening
from pylandmark.nn.whiten import (
    Whitening,
    apply_whitening,
    learn_whitening,
    pca_whitening,
)

TINY = {"backbone_args": {"stem_chs": 8, "depths": [1, 1, 1, 1, 1], "out_chs": [8, 16, 16, 24, 24]}}


def _descriptors(rng, n, d, n_pairs):
    """Unit descriptors with correlated dimensions, and pairs of perturbed copies."""
    mix = rng.normal(size=(d, d)) * rng.uniform(0.2, 2.0, size=d)
    x = rng.normal(size=(n, d)) @ mix
    q = rng.integers(0, n // 2, size=n_pairs)
    p = np.arange(n // 2, n // 2 + n_pairs) % n
    x[p] = x[q] + 0.3 * rng.normal(size=(n_pairs, d)) @ mix[:, ::-1]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, q, p


def _align_rows(a, b):
    """Flips the rows of a to match the signs of b (eigenvectors are defined up to sign)."""
    s = np.sign(np.sum(a * b, axis=1, keepdims=True))
    return a * s


def reference_lw(x, q, p):
    """m, P, the pair differences' covariance S and the whitened covariance's eigenvalues
    (decreasing), in float64."""
    # written independently of the library: S^(-1/2) via an eigen-decomposition instead of the
    # inverse Cholesky factor. Any whitening of S differs from L^-1 by a rotation R, which the
    # second eigen-decomposition absorbs: E'^T (R P1) = E^T P1. So P is the same up to row signs.
    m = x[q].mean(axis=0)
    diff = x[q] - x[p]
    s = diff.T @ diff / len(q)
    w, v = np.linalg.eigh(s)
    s_inv_sqrt = v @ np.diag(w ** -0.5) @ v.T
    y = (x - m) @ s_inv_sqrt.T
    c = y.T @ y / len(x)
    w2, v2 = np.linalg.eigh(c)
    order = np.argsort(w2)[::-1]
    return m, v2[:, order].T @ s_inv_sqrt, s, w2[order]


def test_learned_whitening_matches_reference(rng):
    x, q, p = _descriptors(rng, 300, 13, 120)
    w = learn_whitening(x, q, p)
    m_ref, p_ref, s, _ = reference_lw(x, q, p)
    np.testing.assert_allclose(w.mean, m_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(_align_rows(w.projection, p_ref), p_ref, rtol=1e-7, atol=1e-8)
    # P whitens the pair differences: P S P^T = I
    np.testing.assert_allclose(w.projection @ s @ w.projection.T, np.eye(13), atol=1e-9)
    # and the projected data has a diagonal covariance with decreasing variances
    y = (x - w.mean) @ w.projection.T
    c = y.T @ y / len(x)
    off = c - np.diag(np.diag(c))
    assert np.abs(off).max() < 1e-9 * np.abs(c).max()
    assert np.all(np.diff(np.diag(c)) <= 1e-12)
    assert w.kind == "lw"


def test_learned_whitening_regularises_a_singular_pair_covariance(rng):
    # 5 pairs in 12 dimensions: S has rank 5 and no Cholesky factor; the smallest alpha of
    # 1e-10, 1e-9, ... that makes S + alpha * I positive definite is added
    x, q, p = _descriptors(rng, 60, 12, 5)
    w = learn_whitening(x, q, p)
    assert np.all(np.isfinite(w.projection))
    diff = x[q] - x[p]
    s = diff.T @ diff / len(q)
    assert np.linalg.matrix_rank(s) == 5
    alpha = 1e-10
    while np.linalg.eigvalsh(s + alpha * np.eye(12)).min() <= 0:
        alpha *= 10
    s_reg = s + alpha * np.eye(12)
    np.testing.assert_allclose(w.projection @ s_reg @ w.projection.T, np.eye(12), atol=1e-5)
    # the same P as the reference computed on the regularised covariance (up to row signs)
    vals, vecs = np.linalg.eigh(s_reg)
    s_inv_sqrt = vecs @ np.diag(vals ** -0.5) @ vecs.T
    y = (x - x[q].mean(axis=0)) @ s_inv_sqrt.T
    w2, v2 = np.linalg.eigh(y.T @ y / len(x))
    p_ref = v2[:, np.argsort(w2)[::-1]].T @ s_inv_sqrt
    scale = np.abs(p_ref).max()
    np.testing.assert_allclose(_align_rows(w.projection, p_ref) / scale, p_ref / scale, atol=1e-5)


def test_pca_whitening_matches_reference(rng):
    x, _, _ = _descriptors(rng, 400, 9, 10)
    w = pca_whitening(x)
    m = x.mean(axis=0)
    c = (x - m).T @ (x - m) / len(x)
    vals, vecs = np.linalg.eigh(c)
    order = np.argsort(vals)[::-1]
    p_ref = np.diag(vals[order] ** -0.5) @ vecs[:, order].T
    np.testing.assert_allclose(w.mean, m, atol=1e-12)
    np.testing.assert_allclose(_align_rows(w.projection, p_ref), p_ref, rtol=1e-8, atol=1e-8)
    y = (x - w.mean) @ w.projection.T
    np.testing.assert_allclose(y.T @ y / len(x), np.eye(9), atol=1e-9)
    assert w.kind == "pca"


def _apply_bound(x, mean, proj, u, rounded_inputs):
    """Elementwise bound on |L2N(P (x - m)) computed with unit roundoff u - the exact value| for
    L2N(y) = y / (|y| + 1e-6), summed in any order. (x - m)_j is off by u (|x_j| + |m_j|) where x
    and m were rounded to that precision, and by u |x_j - m_j| for the subtraction; y_i = sum_j
    P_ij (x - m)_j adds P's rounding (u, if rounded) and gamma_D for the dot product, relative to
    sum_j |P_ij| |x_j - m_j|; then L2N: dz_i <= (dy_i + |z_i| |dy|) / (|y| + 1e-6) / (1 - |dy|/|y|)
    (its Jacobian, second order) plus its own rounding: the sum of d squares (gamma_d, halved by
    the sqrt) and sqrt, + 1e-6, division (3u)."""
    D, d = proj.shape[1], proj.shape[0]

    def g(n):
        return n * u / (1 - n * u)

    c = x - mean
    dc = (u * (np.abs(x) + np.abs(mean)) if rounded_inputs else 0.0) + u * np.abs(c)
    dy = dc @ np.abs(proj).T + ((u if rounded_inputs else 0.0) + g(D)) * (1 + u) * (np.abs(c) @ np.abs(proj).T)
    y = c @ proj.T
    ny, ndy = np.linalg.norm(y, axis=1, keepdims=True), np.linalg.norm(dy, axis=1, keepdims=True)
    z = y / (ny + 1e-6)
    assert (ndy < ny).all()
    return (dy + np.abs(z) * ndy) / (ny + 1e-6) / (1 - ndy / ny) + (g(d) / (2 - 2 * g(d)) + g(3)) * np.abs(z)


def test_apply_whitening_numpy_and_torch(rng):
    x, q, p = _descriptors(rng, 200, 10, 80)
    w = learn_whitening(x, q, p)
    # float64 of the same values, as the library defines L2N (y / (|y| + 1e-6)), whose + 1e-6
    # alone moves each row by 1e-6 / |y| relative: more than float64 arithmetic errs
    ref = (x - w.mean) @ w.projection[:6].T
    ref /= np.linalg.norm(ref, axis=1, keepdims=True) + 1e-6
    out = apply_whitening(x, w.mean, w.projection, dim=6)
    bound = _apply_bound(x, w.mean, w.projection[:6], 2.0 ** -53, rounded_inputs=False)
    assert (np.abs(out - ref) <= bound).all()
    out_t = w.apply(torch.tensor(x, dtype=torch.float32), dim=6)
    assert isinstance(out_t, torch.Tensor) and out_t.shape == (200, 6)
    # float32: x, m and P are rounded to float32 too
    bound_t = _apply_bound(x, w.mean, w.projection[:6], 2.0 ** -24, rounded_inputs=True)
    assert (np.abs(out_t.numpy() - ref) <= bound_t).all()
    with pytest.raises(ValueError, match="dim"):
        apply_whitening(x, w.mean, w.projection, dim=11)
    with pytest.raises(ValueError, match="D=10"):
        apply_whitening(x[:, :9], w.mean, w.projection)


def test_install_whitening_into_landmarknet(rng, tmp_path):
    torch.manual_seed(0)
    model = LandmarkNet("cspdarknet53-gem", **TINY).eval()
    images = torch.tensor(rng.normal(size=(40, 3, 70, 53)), dtype=torch.float32)
    with torch.no_grad():
        base = model(images).double().numpy()
    pairs_q, pairs_p = np.arange(0, 20), np.arange(20, 40)
    w = learn_whitening(base, pairs_q, pairs_p)
    whitened = install_whitening(model, w, dim=16)
    assert whitened.whiten is not None and whitened.dim == 16 and whitened.config.whitening
    with torch.no_grad():
        got = whitened(images).double().numpy()
    # The layer computes y = W v + b in float32 (W = P[:16] and b = -W m rounded to float32), then
    # L2N. Rounding W and b costs u = 2^-24 relative each and the length-(D+1) dot product
    # gamma_(D+1) = (D+1)u/(1-(D+1)u) of (|W||v| + |b|) per element; an error e in y moves y/|y|
    # by at most 2|e|/|y|, and L2N itself adds (d+3)u. The reference is float64 on the same v.
    u = 2.0 ** -24
    wmat = w.projection[:16]
    bias = wmat @ w.mean
    y = (base - w.mean) @ wmat.T
    gamma = (base.shape[1] + 1) * u / (1 - (base.shape[1] + 1) * u)
    e = (gamma + 2 * u) * (np.abs(base) @ np.abs(wmat).T + np.abs(bias))
    bound = 2 * np.linalg.norm(e, axis=1, keepdims=True) / np.linalg.norm(y, axis=1, keepdims=True) + 19 * u
    err = np.abs(got - apply_whitening(base, w.mean, w.projection, dim=16))
    assert np.all(err <= bound), f"max error {err.max():.3g} over the bound {bound.min():.3g}..{bound.max():.3g}"
    # stripping the layer gives back the original descriptors; the model survives a save / load
    # (the same weights through the same float32 computation: equal bit for bit)
    with torch.no_grad():
        np.testing.assert_array_equal(strip_whitening(whitened)(images).double().numpy(), base)
    loaded = LandmarkNet.from_pretrained(whitened.save(tmp_path / "net"))
    with torch.no_grad():
        np.testing.assert_array_equal(loaded.eval()(images).double().numpy(), got)
    with pytest.raises(ValueError, match="D=24"):
        install_whitening(model, Whitening(np.zeros(5), np.eye(5)))


def test_whitening_save_load_and_bad_input(rng, tmp_path):
    x, q, p = _descriptors(rng, 100, 6, 40)
    w = learn_whitening(x, q, p)
    w2 = Whitening.load(w.save(tmp_path / "w.safetensors"))
    assert w2.kind == "lw"
    np.testing.assert_array_equal(w2.projection, w.projection)
    np.testing.assert_array_equal(w2.mean, w.mean)
    with pytest.raises(ValueError, match="qidxs"):
        learn_whitening(x, q[:5], p)
    with pytest.raises(ValueError, match="pidxs"):
        learn_whitening(x, q, p + 1000)
    with pytest.raises(ValueError, match="x must be"):
        learn_whitening(x[0], q, p)
    with pytest.raises(ValueError, match="NaN"):
        pca_whitening(np.full((5, 3), np.nan))
    with pytest.raises(ValueError, match="kind"):
        Whitening(np.zeros(3), np.eye(3), kind="zca")
