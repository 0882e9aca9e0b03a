"""Learned (Lw) and PCA whitening of global descriptors (the math; installing one into a
LandmarkNet is :mod:`pylandmark.models.whitening`).

Learned whitening from matching pairs ``(q_i, p_i)`` of descriptors X (Radenovic et al.):

1. ``m`` = mean of the query descriptors ``X[qidxs]``;
2. ``S = mean_i (x_qi - x_pi)(x_qi - x_pi)^T``;
3. ``P1 = L^-1`` with ``L`` the (lower) Cholesky factor of ``S``; if ``S`` is not positive
   definite, ``alpha * I`` is added with alpha = 1e-10, 1e-9, ... until it is;
4. the covariance of ``P1 (x - m)`` over all descriptors is eigen-decomposed, eigenvectors
   ``E`` sorted by decreasing eigenvalue;
5. ``P = E^T P1``.

PCA whitening (unsupervised): ``m`` = mean of X, ``P = Lambda^-1/2 E^T`` from the covariance of X.

A whitening is applied as ``x' = L2N(P[:d] (x - m))``; in a LandmarkNet it becomes the
whitening layer (``weight = P[:d]``, ``bias = -P[:d] m``) after GeM + L2N. All arithmetic is
numpy float64. Eigenvector signs are fixed (largest-magnitude entry positive), so results are
reproducible.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._checks import check_int, is_torch, to_numpy
from .._lazy import lazy_exports

__all__ = ["Whitening", "learn_whitening", "pca_whitening", "apply_whitening", "KINDS"]

logger = logging.getLogger(__name__)

KINDS = ("lw", "pca")
_MAX_ALPHA = 1e6


def _as_f64(x: Any, name: str) -> np.ndarray:
    a = to_numpy(x, name, np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be (N, D) descriptors, got shape {a.shape}")
    if a.shape[0] < 2 or a.shape[1] < 1:
        raise ValueError(f"{name} must hold at least 2 descriptors of size >= 1, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} holds NaN or infinite values")
    return a


def as_indices(x: Any, name: str, n: int) -> np.ndarray:
    """(P,) int64 indices in [0, n) (one side of the matching pairs), checked."""
    a = to_numpy(x, name)
    if a.ndim != 1 or a.size == 0 or a.dtype.kind not in "iu":
        raise ValueError(f"{name} must be a non-empty 1-d array of ints (indices into X), got "
                         f"dtype {a.dtype}, shape {a.shape}")
    a = a.astype(np.int64)
    if a.min() < 0 or a.max() >= n:
        raise ValueError(f"{name} holds indices outside [0, {n})")
    return a


def _fix_signs(vecs: np.ndarray) -> np.ndarray:
    """Flips eigenvector columns so that each one's largest-magnitude entry is positive."""
    idx = np.argmax(np.abs(vecs), axis=0)
    signs = np.sign(vecs[idx, np.arange(vecs.shape[1])])
    signs[signs == 0] = 1.0
    return vecs * signs


def _sorted_eigh(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    vals, vecs = np.linalg.eigh((c + c.T) / 2)
    order = np.argsort(-vals, kind="stable")
    return vals[order], _fix_signs(vecs[:, order])


@dataclass
class Whitening:
    """A whitening ``x' = L2N(P[:d] (x - m))``.

    Attributes:
        mean: (D,) float64 ``m``.
        projection: (D, D) float64 ``P`` (rows ordered by decreasing variance).
        kind: "lw" (learned from pairs) or "pca".
    """

    mean: np.ndarray
    projection: np.ndarray
    kind: str = "lw"

    def __post_init__(self) -> None:
        self.mean = np.asarray(self.mean, dtype=np.float64).reshape(-1)
        self.projection = np.asarray(self.projection, dtype=np.float64)
        d = self.mean.size
        if self.projection.ndim != 2 or self.projection.shape[1] != d or self.projection.shape[0] > d:
            raise ValueError(f"projection must be (d, D) with d <= D = {d}, got {self.projection.shape}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def dim(self) -> int:
        return int(self.mean.size)

    def apply(self, x: Any, dim: int | None = None) -> Any:
        """:func:`apply_whitening` with this whitening."""
        return apply_whitening(x, self.mean, self.projection, dim)

    def save(self, path: str | os.PathLike) -> Path:
        """Writes ``mean`` and ``projection`` (float64) to a ``.safetensors`` file."""
        from safetensors.numpy import save_file

        from .._files import replaced_atomically

        p = Path(path)
        with replaced_atomically(p) as tmp:
            save_file({"mean": np.ascontiguousarray(self.mean), "projection": np.ascontiguousarray(self.projection)},
                      str(tmp), metadata={"kind": self.kind, "format": "pylandmark.Whitening"})
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> Whitening:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "pylandmark.Whitening":
                raise ValueError(f"{path} is not a whitening file written by Whitening.save()")
            return cls(f.get_tensor("mean"), f.get_tensor("projection"), meta.get("kind", "lw"))


def learn_whitening(x: Any, qidxs: Any, pidxs: Any) -> Whitening:
    """Learned whitening (Lw) from matching pairs.

    Args:
        x: (N, D) descriptors (numpy or torch, any float dtype).
        qidxs, pidxs: (P,) parallel indices into ``x`` of the matching pairs.

    Returns:
        a :class:`Whitening` with ``kind="lw"``.
    """
    xs = _as_f64(x, "x")
    q = as_indices(qidxs, "qidxs", xs.shape[0])
    p = as_indices(pidxs, "pidxs", xs.shape[0])
    if q.size != p.size:
        raise ValueError(f"qidxs ({q.size}) and pidxs ({p.size}) must have the same length")
    m = xs[q].mean(axis=0)
    df = xs[q] - xs[p]
    s = df.T @ df / q.size
    s = (s + s.T) / 2
    alpha = 0.0
    while True:
        try:
            chol = np.linalg.cholesky(s + alpha * np.eye(s.shape[0]) if alpha else s)
            break
        except np.linalg.LinAlgError:
            alpha = 1e-10 if alpha == 0 else alpha * 10
            if alpha > _MAX_ALPHA:
                raise ValueError("learned whitening: the pair-difference covariance stays singular; "
                                 "give more (and distinct) matching pairs") from None
    if alpha:
        logger.info("learned whitening: added %g * I to make the pair covariance positive definite", alpha)
    p1 = np.linalg.inv(chol)
    xc = (xs - m) @ p1.T
    _, vecs = _sorted_eigh(xc.T @ xc / xs.shape[0])
    return Whitening(m, vecs.T @ p1, "lw")


def pca_whitening(x: Any, eps: float = 1e-12) -> Whitening:
    """PCA whitening ``P = Lambda^-1/2 E^T`` of the covariance of ``x`` (N, D).

    Eigenvalues below ``eps * largest`` are raised to it (directions without variance, when
    N <= D), which keeps ``P`` finite.
    """
    xs = _as_f64(x, "x")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    m = xs.mean(axis=0)
    xc = xs - m
    vals, vecs = _sorted_eigh(xc.T @ xc / xs.shape[0])
    if not vals[0] > 0:
        raise ValueError("x has no variance: all descriptors are equal")
    if xs.shape[0] <= xs.shape[1]:
        logger.warning("PCA whitening from %d descriptors of size %d: the covariance is rank deficient",
                       xs.shape[0], xs.shape[1])
    vals = np.maximum(vals, eps * vals[0])
    return Whitening(m, vecs.T / np.sqrt(vals)[:, None], "pca")


def apply_whitening(x: Any, mean: Any, projection: Any, dim: int | None = None) -> Any:
    """``L2N(P[:dim] (x - m))`` for (N, D) or (D,) descriptors.

    numpy input gives float64 numpy; torch input gives a torch tensor of its float dtype
    (float32 for half) on its device.
    """
    pm = np.asarray(projection, dtype=np.float64)
    mm = np.asarray(mean, dtype=np.float64).reshape(-1)
    if pm.ndim != 2 or pm.shape[1] != mm.size:
        raise ValueError(f"projection must be (d, D) with D = len(mean) = {mm.size}, got {pm.shape}")
    d = check_int(dim, "dim", minimum=1, maximum=pm.shape[0], none_ok=True)
    pm = pm[: pm.shape[0] if d is None else d]
    if is_torch(x):
        import torch

        xt = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        if xt.shape[-1] != mm.size:
            raise ValueError(f"x has D={xt.shape[-1]} but the whitening expects D={mm.size}")
        y = (xt - torch.as_tensor(mm, dtype=xt.dtype, device=xt.device)) @ \
            torch.as_tensor(pm, dtype=xt.dtype, device=xt.device).T
        return y / (torch.linalg.vector_norm(y, dim=-1, keepdim=True) + 1e-6)
    xa = np.asarray(x, dtype=np.float64)
    if xa.shape[-1] != mm.size:
        raise ValueError(f"x has D={xa.shape[-1]} but the whitening expects D={mm.size}")
    y = (xa - mm) @ pm.T
    return y / (np.linalg.norm(y, axis=-1, keepdims=True) + 1e-6)


# ---- old import paths, kept for one release ---------------------------------------------------
#: names that lived here, -> (module under pylandmark, attribute); looked up by name on access
#: (nothing here imports models or extraction, which sit above this module)
_MOVED = {
    "strip_whitening": ("models.whitening", "strip_whitening"),
    "install_whitening": ("models.whitening", "install_whitening"),
    "select_whitening": ("models.whitening", "select_whitening"),
    "compute_whitening": ("extraction", "compute_whitening"),
}
# a throwaway namespace: nothing is cached in this module's globals, so every use of an old path
# warns (once per place, as warnings do)
_moved_getattr = lazy_exports(__name__, {}, _MOVED, package="pylandmark")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        module, attr = _MOVED[name]
        warnings.warn(f"pylandmark.nn.whiten.{name} moved to pylandmark.{module}.{attr}; import it from "
                      "there (the old path goes away in the next release)", DeprecationWarning, stacklevel=2)
    return _moved_getattr(name)
