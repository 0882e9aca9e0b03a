"""Descriptor-side re-ranking: alpha query expansion (alpha-QE) and database-side augmentation
(DBA), as used with GeM descriptors (Radenovic et al., TPAMI 2018).

Both replace a vector by the L2-normalised sum of itself and its k nearest database vectors,
each neighbour weighted by ``max(similarity, 0) ** alpha`` (alpha = 0 is plain average QE):

    x' = L2N(x + sum_{i=1..k} max(s_i, 0)^alpha * d_i)

alpha-QE does this for queries against the database; DBA for every database vector against the
rest of the database (the vector itself is not counted among its k neighbours). Neighbours come
from :func:`pylandmark.search`. Inputs may be numpy arrays or torch tensors (CPU or CUDA);
outputs have the framework, device and dtype of the input being expanded. Arithmetic is float32.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .._checks import check_int, framework_of
from ..ops import METRICS, search

logger = logging.getLogger(__name__)

__all__ = ["alpha_qe", "dba", "rerank"]

_EPS = 1e-6  # as L2N elsewhere: x / (||x|| + 1e-6)
_GATHER_ELEMENTS = 1 << 24  # float32 elements gathered per chunk (64 MiB)


def _framework(x: Any, name: str) -> str:
    fw = framework_of(x)
    if fw not in ("numpy", "torch"):
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    return fw


def _as_f32(x: Any, fw: str, name: str, ndim: tuple[int, ...]) -> Any:
    if x.ndim not in ndim:
        want = " or ".join({1: "(D,)", 2: "(N, D)"}[d] for d in ndim)
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if fw == "torch":
        import torch

        if not torch.is_floating_point(x):
            raise TypeError(f"{name} must be floating point, got {x.dtype}; convert with .float()")
        return x.detach().to(torch.float32)
    if x.dtype.kind != "f":
        raise TypeError(f"{name} must be floating point, got {x.dtype}; convert with "
                        ".astype(np.float32)")
    return np.ascontiguousarray(x, dtype=np.float32)


def _l2n(x: Any, fw: str) -> Any:
    if fw == "torch":
        return x / (x.norm(dim=-1, keepdim=True) + _EPS)
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + _EPS)


def _check_k_alpha(k: Any, alpha: Any, k_name: str = "k", alpha_name: str = "alpha") -> tuple[int, float]:
    k = check_int(k, k_name, minimum=1, hint=" (the number of neighbours)")
    try:
        a = float(alpha)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{alpha_name} must be a number, got {type(alpha).__name__}") from err
    if not (a >= 0 and np.isfinite(a)):
        raise ValueError(f"{alpha_name} must be a finite number >= 0, got {alpha!r}")
    return int(k), a


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def _expand(x: Any, db: Any, idx: Any, sims: Any, alpha: float, fw: str) -> Any:
    """L2N(x + sum_i w_i db[idx_i]) with w = max(sims, 0)^alpha, 0 where idx < 0.
    x (c, D), db (N, D), idx (c, k) int64, sims (c, k) -> (c, D)."""
    if fw == "torch":
        import torch

        valid = idx >= 0
        w = sims.clamp(min=0).pow(alpha) * valid
        w = torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0)
        nb = db[idx.clamp(min=0)]
        out = x + torch.einsum("ck,ckd->cd", w, nb)
    else:
        valid = idx >= 0
        with np.errstate(invalid="ignore"):
            w = np.where(valid, np.maximum(sims, 0.0) ** alpha, 0.0).astype(np.float32)
        nb = db[np.where(valid, idx, 0)]
        out = x + np.einsum("ck,ckd->cd", w, nb)
    return _l2n(out, fw)


def _to_index(idx: Any, fw: str, ref: Any) -> Any:
    """Bring search indices to the framework/device of ``ref``."""
    if fw == "torch":
        import torch

        if not isinstance(idx, torch.Tensor):
            idx = torch.as_tensor(np.asarray(idx))
        return idx.to(device=ref.device, dtype=torch.int64)
    if framework_of(idx) == "torch":
        idx = idx.cpu().numpy()
    return np.asarray(idx, dtype=np.int64)


def _restore(y: Any, like: Any, fw: str) -> Any:
    if fw == "torch":
        return y.to(like.dtype)
    return y.astype(like.dtype, copy=False)


def _gather_sims(x: Any, db: Any, idx: Any, fw: str) -> Any:
    """sims[c, j] = <x[c], db[idx[c, j]]> (0 where idx < 0)."""
    if fw == "torch":
        nb = db[idx.clamp(min=0)]
        return (nb * x[:, None, :]).sum(-1) * (idx >= 0)
    nb = db[np.where(idx >= 0, idx, 0)]
    return np.einsum("ckd,cd->ck", nb, x) * (idx >= 0)


def alpha_qe(queries: Any, db: Any, k: int = 10, alpha: float = 3.0, *, ranks: Any = None,
             metric: str = "cosine") -> Any:
    """Alpha-weighted query expansion.

    ``q' = L2N(q + sum_{i=1..k} max(s_i, 0)^alpha * d_i)`` over the top-k database neighbours
    ``d_i`` of q with similarities ``s_i``. With metric "cosine", q and the rows of db are
    L2-normalised first (so the result equals expanding normalised descriptors); with "ip" they
    are used as given.

    Args:
        queries: (Q, D) or (D,) float descriptors (numpy or torch).
        db: (N, D) float database descriptors, same framework and device.
        k: neighbours added to each query (>= 1); with k > N all N are used.
        alpha: weight exponent (>= 0; 0 gives average QE).
        ranks: optional (Q, n) database indices, best first (n >= 1; -1 pads), e.g. from an
            earlier search; its first k columns are used instead of searching again, with
            similarities recomputed from the descriptors.
        metric: "cosine" or "ip".

    Returns:
        the expanded queries, L2-normalised, with the shape, framework, device and dtype of
        ``queries``.
    """
    k, alpha = _check_k_alpha(k, alpha)
    _check_metric(metric)
    fw = _framework(queries, "queries")
    if _framework(db, "db") != fw:
        raise TypeError("queries and db must both be numpy arrays or both torch tensors")
    q = _as_f32(queries, fw, "queries", (1, 2))
    d = _as_f32(db, fw, "db", (2,))
    one = q.ndim == 1
    if one:
        q = q[None, :]
    if q.shape[1] != d.shape[1]:
        raise ValueError(f"queries have D={q.shape[1]} but db has D={d.shape[1]}")
    if d.shape[0] == 0:
        raise ValueError("db is empty (N=0)")
    if metric == "cosine":
        q, d = _l2n(q, fw), _l2n(d, fw)
    if ranks is None:
        sims, idx = search(q, d, k=k, metric="ip")
        idx = _to_index(idx, fw, q)
        if fw == "numpy":
            sims = np.asarray(sims)
    else:
        idx = _to_index(ranks, fw, q)
        if idx.ndim == 1 and one:
            idx = idx[None, :]
        if idx.ndim != 2 or idx.shape[0] != q.shape[0] or idx.shape[1] < 1:
            raise ValueError(f"ranks must be (Q, n) with Q={q.shape[0]} rows and n >= 1, got "
                             f"shape {tuple(idx.shape)}")
        idx = idx[:, :k]
        if int(idx.max()) >= d.shape[0] or int(idx.min()) < -1:
            raise ValueError(f"ranks holds indices outside [0, {d.shape[0]}) (-1 pads)")
        sims = _gather_sims(q, d, idx, fw)
    out = _expand(q, d, idx, sims, alpha, fw)
    if one:
        out = out[0]
    return _restore(out, queries, fw)


def dba(db: Any, k: int = 10, alpha: float = 3.0, *, metric: str = "cosine",
        progress: bool = False, chunk_size: int | None = None) -> Any:
    """Database-side augmentation.

    Every database vector becomes ``L2N(x + sum_{i=1..k} max(s_i, 0)^alpha * d_i)`` over its k
    nearest other database vectors (itself excluded), using the original descriptors for all
    rows. With metric "cosine" the rows are L2-normalised first.

    Args:
        db: (N, D) float descriptors (numpy or torch).
        k: neighbours added to each vector (>= 1); with k >= N all other N - 1 are used.
        alpha: weight exponent (>= 0).
        metric: "cosine" or "ip".
        progress: show a tqdm bar over chunks of rows.
        chunk_size: rows searched and expanded at a time (default: about 64 MiB of gathered
            neighbours per chunk).

    Returns:
        the augmented database, L2-normalised, with the framework, device and dtype of ``db``.
    """
    k, alpha = _check_k_alpha(k, alpha)
    _check_metric(metric)
    fw = _framework(db, "db")
    d = _as_f32(db, fw, "db", (2,))
    n, dim = d.shape
    if n == 0:
        raise ValueError("db is empty (N=0)")
    if metric == "cosine":
        d = _l2n(d, fw)
    if chunk_size is None:
        chunk_size = max(1, _GATHER_ELEMENTS // max(1, (k + 1) * dim))
    else:
        chunk_size = check_int(chunk_size, "chunk_size", minimum=1)
    outs = []
    for r0 in tqdm(range(0, n, chunk_size), desc="DBA", unit="chunk", disable=not progress,
                   leave=False):
        r1 = min(n, r0 + chunk_size)
        x = d[r0:r1]
        sims, idx = search(x, d, k=k + 1, metric="ip")
        idx = _to_index(idx, fw, x)
        rows = np.arange(r0, r1)
        if fw == "torch":
            import torch

            rows_t = torch.arange(r0, r1, device=idx.device)[:, None]
            is_self = idx == rows_t
            # rows where self is not among the k+1: drop the last neighbour instead
            no_self = ~is_self.any(dim=1)
            is_self[:, -1] |= no_self
            keep = ~is_self
            idx = idx[keep].reshape(r1 - r0, k)
            sims = sims[keep].reshape(r1 - r0, k)
        else:
            sims = np.asarray(sims)
            is_self = idx == rows[:, None]
            is_self[:, -1] |= ~is_self.any(axis=1)
            keep = ~is_self
            idx = idx[keep].reshape(r1 - r0, k)
            sims = sims[keep].reshape(r1 - r0, k)
        outs.append(_expand(x, d, idx, sims, alpha, fw))
    out: Any
    if fw == "torch":
        import torch

        out = torch.cat(outs, dim=0)
    else:
        out = np.concatenate(outs, axis=0)
    logger.debug("dba: augmented %d vectors with k=%d, alpha=%g", n, k, alpha)
    return _restore(out, db, fw)


def rerank(queries: Any, db: Any, *, qe_k: int = 0, qe_alpha: float = 3.0, dba_k: int = 0,
           dba_alpha: float = 3.0, metric: str = "cosine", progress: bool = False) -> tuple[Any, Any]:
    """DBA on the database, then alpha-QE of the queries against the augmented database.

    Args:
        queries: (Q, D) descriptors; db: (N, D) descriptors (numpy or torch).
        qe_k, qe_alpha: alpha-QE neighbours and exponent (qe_k = 0: no query expansion).
        dba_k, dba_alpha: DBA neighbours and exponent (dba_k = 0: no augmentation).
        metric: "cosine" or "ip".
        progress: show a progress bar for DBA.

    Returns:
        (queries', db'): unchanged inputs where a step is off; otherwise L2-normalised results in
        the inputs' framework and dtype.
    """
    qe_k = check_int(qe_k, "qe_k", minimum=0, hint=" (0 turns the step off)")
    dba_k = check_int(dba_k, "dba_k", minimum=0, hint=" (0 turns the step off)")
    if dba_k:
        db = dba(db, dba_k, dba_alpha, metric=metric, progress=progress)
    if qe_k:
        queries = alpha_qe(queries, db, qe_k, qe_alpha, metric=metric)
    return queries, db
