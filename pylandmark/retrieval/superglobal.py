"""The arithmetic of SuperGlobal's re-ranking (:func:`pylandmark.retrieval.rerank.superglobal`, which
reads the rows, chunks the queries and keeps the ranking past the top M): per query, the top M rows'
similarities among themselves, each row's neighbours, the augmentation, the expansion and the new
order, on numpy arrays or torch tensors (CPU or CUDA), in float32.

The (M, M, D) similarities are the only work of that size: the augmented rows are weighted means of
K rows, so their dot products with the query and with the expansion are weighted means of the M
rows' own dot products (M x D each), and only the K augmented rows that make the expansion are formed.
"""
from __future__ import annotations

from typing import Any

import numpy as np

_SELECT_ELEMENTS = 1 << 18  # values per block of rows in _top_values' passes (1 MiB of float32: in cache)
_MAX_PASSES = 32  # _top_values: beyond this many passes a sort is cheaper


def _take_along(a: Any, order: Any, fw: str, axis: int = 1) -> Any:
    if fw == "torch":
        import torch

        return torch.take_along_dim(a, order, dim=axis)
    return np.take_along_axis(a, order, axis=axis)


def _stable_desc(x: Any, fw: str) -> Any:
    """Indices sorting the last axis by decreasing value, ties to the lower index."""
    if fw == "torch":
        import torch

        return torch.sort(x, dim=-1, descending=True, stable=True)[1]
    return np.argsort(-x, axis=-1, kind="stable")


def _top_desc(v: Any, k: int, fw: str = "numpy") -> Any:
    """The first k of ``_stable_desc(v)`` along the last axis of floating-point v (largest first,
    ties to the lower index)."""
    return _top_values(v, k, fw)[0]


def _top_values(v: Any, k: int, fw: str) -> tuple[Any, Any]:
    """``_top_desc(v, k)`` and v's values there, without sorting whole rows: k passes of argmax
    (its pick is the first maximum, so ties go to the lower index), each striking its pick out
    with -inf, over blocks of rows copied into a cache-sized scratch (v itself is not changed).
    Rows whose picks include a -inf (which striking can't tell from a pick) or a NaN are sorted."""
    n = v.shape[-1]
    idx: Any
    vals: Any
    if k >= n or k > _MAX_PASSES:
        idx = _stable_desc(v, fw)[..., :k]
        return idx, _take_along(v, idx, fw, axis=-1)
    rows = v.reshape(-1, n)
    if fw == "torch":
        import torch

        idx = torch.empty((rows.shape[0], k), dtype=torch.int64, device=rows.device)
        vals = torch.empty((rows.shape[0], k), dtype=rows.dtype, device=rows.device)
        whole = rows.device.type != "cpu"  # a GPU: one block, few launches
    else:
        idx, vals, whole = np.empty((rows.shape[0], k), np.int64), np.empty((rows.shape[0], k), rows.dtype), False
    block = max(1, rows.shape[0] if whole else _SELECT_ELEMENTS // n)
    for r0 in range(0, rows.shape[0], block):
        scratch = rows[r0:r0 + block].clone() if fw == "torch" else rows[r0:r0 + block].copy()
        at = torch.arange(scratch.shape[0], device=rows.device) if fw == "torch" else np.arange(scratch.shape[0])
        for j in range(k):
            idx[r0:r0 + block, j] = pick = scratch.argmax(1)
            vals[r0:r0 + block, j] = scratch[at, pick]
            scratch[at, pick] = -np.inf
    bad = ~(vals > -np.inf).all(1)
    if bool(bad.any()):
        idx[bad] = _stable_desc(rows[bad], fw)[:, :k]
        vals[bad] = _take_along(rows[bad], idx[bad], fw)
    return idx.reshape(*v.shape[:-1], k), vals.reshape(*v.shape[:-1], k)


def _superglobal_scores(q: Any, x: Any, big_k: int, beta: float, fw: str) -> tuple[Any, Any]:
    """q (c, D), x (c, m, D) the top m of each query, best first -> (c, m) re-ranking scores in
    the new order and that order (positions into the top m).

    With w_ij the weights of row i's K rows (1 on itself, beta s_ij on its K - 1 most similar
    others), x~_i = sum_j w_ij x_j / sum_j w_ij, so <v, x~_i> = sum_j w_ij <v, x_j> / sum_j w_ij:
    a and <e, x~> are such means of <q, x_j> and <e, x_j>."""
    c, m = x.shape[0], x.shape[1]
    big_k = min(big_k, m)
    queries: Any
    if fw == "torch":
        import torch

        sims = x @ x.transpose(1, 2)                                  # (c, m, m)
        sims.diagonal(dim1=1, dim2=2).fill_(torch.inf)                # each row's first pick: itself
        queries = torch.arange(c, device=x.device)[:, None, None]
    else:
        sims = x @ x.transpose(0, 2, 1)                               # x times its own transpose: a syrk per query
        sims[:, np.arange(m), np.arange(m)] = np.inf
        queries = np.arange(c)[:, None, None]
    nbr, w = _top_values(sims, big_k, fw)                             # (c, m, K): itself, then the others
    w = w * beta
    w[:, :, 0] = 1.0
    denom = w.sum(2)
    denom[denom == 0] = 1.0

    def mean(v: Any) -> Any:  # (c, m) values of the rows -> their weighted means over each row's K rows
        return (w * _take_along(v, nbr.reshape(c, m * big_k), fw).reshape(c, m, big_k)).sum(2) / denom

    a = mean((x @ q[:, :, None])[:, :, 0])
    first = _stable_desc(a, fw)[:, :big_k]                            # (c, K): the K largest a_i
    near, wf = _take_along(nbr, first[:, :, None], fw), _take_along(w, first[:, :, None], fw)  # (c, K, K)
    aug = (wf[..., None] * x[queries, near]).sum(2) / _take_along(denom, first, fw)[:, :, None]  # their x~
    e = aug.amax(1) if fw == "torch" else aug.max(1)                  # (c, D)
    final = (a + mean((x @ e[:, :, None])[:, :, 0])) / 2
    order = _stable_desc(final, fw)
    return _take_along(final, order, fw), order
