"""Descriptor-side re-ranking: alpha query expansion (alpha-QE) and database-side augmentation
(DBA), as used with GeM descriptors (Radenovic et al., TPAMI 2018).

Both replace a vector by the L2-normalised sum of itself and its k nearest database vectors,
each neighbour weighted by ``max(similarity, 0) ** alpha`` (alpha = 0 is plain average QE):

    x' = L2N(x + sum_{i=1..k} max(s_i, 0)^alpha * d_i)

alpha-QE does this for queries against the database; DBA for every database vector against the
rest of the database (the vector itself is not counted among its k neighbours). Neighbours come
from :func:`pylandmark.search`. Inputs may be numpy arrays or torch tensors (CPU or CUDA);
outputs have the framework, device and dtype of the input being expanded. Arithmetic is float32.

:func:`superglobal` re-ranks a query's top M from the same descriptors (SuperGlobal, Shao et
al., ICCV 2023): augmentation among the top M, then an expansion by their maximum; over an array
or an index (in-memory, memory-mapped, sharded or distributed), and :class:`SuperGlobalView`
searches an index that way wherever an index is searched.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .._checks import check_int, check_number, framework_of
from ..ops import METRICS, search
from .index import with_ids
from .superglobal import _superglobal_scores, _take_along

logger = logging.getLogger(__name__)

__all__ = ["alpha_qe", "dba", "rerank", "superglobal", "SuperGlobalView"]

_EPS = 1e-6  # as L2N elsewhere: x / (||x|| + 1e-6)
_GATHER_ELEMENTS = 1 << 24  # float32 elements gathered per chunk (64 MiB)
_SUPERGLOBAL_ELEMENTS = 1 << 22  # float32 row elements re-ranked per chunk (16 MiB: ~10 queries of M 400, D 1024)


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


def _l2n(x: Any, fw: str, *, inplace: bool = False) -> Any:
    """x / (||x|| + 1e-6) along the last axis; ``inplace`` (numpy): into x itself, which the
    caller owns."""
    if fw == "torch":
        return x / (x.norm(dim=-1, keepdim=True) + _EPS)
    norm = np.sqrt(np.einsum("...d,...d->...", x, x))  # no array of the squares
    norm += np.float32(_EPS)
    return np.divide(x, norm[..., None], out=x if inplace else None)


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
    nb = db[idx.clamp(min=0)] if fw == "torch" else db[np.where(idx >= 0, idx, 0)]
    return _mul_sum(nb, x, fw) * (idx >= 0)


def _mul_sum(x: Any, q: Any, fw: str) -> Any:
    """(c, n, D) rows and (c, D) queries -> (c, n) dot products."""
    if fw == "torch":
        return (x * q[:, None, :]).sum(-1)
    return np.einsum("cnd,cd->cn", x, q)


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


def superglobal(queries: Any, db: Any, k: int = 100, *, m: int = 400, neighbours: int = 9, beta: float = 0.15,
                ranks: Any = None, metric: str | None = None) -> tuple[Any, Any]:
    """SuperGlobal's re-ranking of the top ``m`` (Shao et al., ICCV 2023): from global
    descriptors only, no extra search of the database.

    For each query q with top-m database rows x_1..x_m (best first):

    1. *Descriptor augmentation among the top m*: every x_i becomes
       ``x~_i = (x_i + beta sum_{j=1..K-1} s_ij x_ij) / (1 + beta sum_j s_ij)`` over its
       ``K - 1 = neighbours`` most similar other rows among the top m (s_ij = <x_i, x_ij>); not
       normalised. (The reference takes the K most similar rows with weight 1 on the first,
       which is the row itself except where a duplicate or a zero row ties with it: here it is
       always itself, so a zero row stays zero rather than copying the best row.)
    2. ``a_i = <q, x~_i>``.
    3. *Query expansion by a maximum*: ``e`` = the element-wise maximum of the x~ of the K
       largest a_i.
    4. The top m are reordered by ``(a_i + <e, x~_i>) / 2``; rows ranked beyond m keep their
       rank and score.

    Ties (in the neighbours, the K largest a_i and the final order) go to the better-ranked row.
    With metric "cosine" queries and rows are L2-normalised first. Arithmetic is float32.

    Args:
        queries: (Q, D) or (D,) descriptors (numpy or torch).
        db: (N, D) database descriptors (numpy, a memory map, or torch on the queries' device),
            or an index (``metric``, ``dim``, ``len``, ``search_rows(queries, k)``,
            ``row_vectors(rows)``): an :class:`~pylandmark.Index` (memory-mapped or not, with
            compact codes or not), a :class:`~pylandmark.retrieval.manifest.ShardedIndex` or a
            :class:`~pylandmark.retrieval.sharded.DistributedIndex`. An index is searched by its
            own ``search_rows`` and only the top rows' stored descriptors are read
            (``row_vectors``), so the answer is that on its (N, D) float16 matrix. With a
            DistributedIndex the call is collective: every rank passes the same queries (rank
            0's are searched, as ``search_rows``' default ``src=0``) and gets the same answer.
        k: results per query (>= 1); an array: at most N; an index: beyond N padded with row -1
            and score -inf, as its ``search_rows``.
        m: rows re-ranked (400 in the reference); more than N: N.
        neighbours: K - 1, the augmentation's and the expansion's neighbours (9).
        beta: the neighbours' weight (0.15).
        ranks: (Q, n) database rows best first (n >= min(max(k, m), N)), e.g. from an earlier
            search; searched when None.
        metric: "cosine" or "ip" for an array (None: "cosine"); an index uses its own.

    Returns:
        ``(scores, idx)``: (Q, k) float32 and int64 (numpy, or torch on the queries' device), the
        first ``min(m, N)`` columns re-ranked with their re-ranking scores, the rest the plain
        ranking with its similarities ((D,) queries: (k,) each). ``idx`` are rows of ``db``
        (of an index: row positions, as its ``search_rows``; ids through ``index.ids``).
    """
    k = check_int(k, "k", minimum=1, hint=" (results per query)")
    m, neighbours, beta = _check_superglobal(m, neighbours, beta)
    fw = _framework(queries, "queries")
    q = _as_f32(queries, fw, "queries", (1, 2))
    one = q.ndim == 1
    if one:
        q = q[None, :]
    metric, n, indexed = _database(db, fw, q.shape[1], metric)
    if k > n and not indexed:
        raise ValueError(f"k={k} is more than the database's {n} rows")
    wanted, k = k, min(k, n)  # an index pads past N, as its search does
    plain_q = q
    if metric == "cosine":
        q = _l2n(q, fw)
    m = min(m, n)
    depth = max(k, m)
    if ranks is None:  # the plain search's bits (beyond m they are the answer)
        scores, idx = db.search_rows(plain_q, depth) if indexed else search(plain_q, db, k=depth, metric=metric)
        idx = _to_index(idx, fw, q)
    else:
        idx = _to_index(ranks, fw, q)
        if idx.ndim == 1 and one:
            idx = idx[None, :]
        if idx.ndim != 2 or idx.shape[0] != q.shape[0] or idx.shape[1] < depth:
            raise ValueError(f"ranks must be (Q, n) with Q={q.shape[0]} and n >= {depth} (max(k, m)), got "
                             f"shape {tuple(idx.shape)}")
        idx = idx[:, :depth]
        if idx.shape[0] and (int(idx.min()) < 0 or int(idx.max()) >= n):  # (no queries: nothing to check)
            raise ValueError(f"ranks holds indices outside [0, {n}) within its first {depth} columns")
        scores = None
    out_s, out_i = [], []
    gathered = m if scores is not None else depth  # rows read per query (given ranks: their scores too)
    chunk = max(1, _SUPERGLOBAL_ELEMENTS // max(1, gathered * q.shape[1]))
    for c0 in range(0, max(1, q.shape[0]), chunk):  # no queries: one empty chunk
        c1 = min(q.shape[0], c0 + chunk)
        top = idx[c0:c1, :m]
        s, order = _superglobal_scores(q[c0:c1], _rows(db, top, fw, metric), neighbours + 1, beta, fw)
        new_top = _take_along(top, order, fw)
        if depth > m:  # beyond the top m: the plain ranking and its similarities
            rest = idx[c0:c1, m:]
            rest_s = scores[c0:c1, m:] if scores is not None else \
                _mul_sum(_rows(db, rest, fw, metric), q[c0:c1], fw)
            s, new_top = _cat(fw, s, rest_s), _cat(fw, new_top, rest)
        out_s.append(s[:, :k])
        out_i.append(new_top[:, :k])
    s_all, i_all = _padded(_cat(fw, *out_s, axis=0), _cat(fw, *out_i, axis=0), wanted, fw)
    if fw == "numpy":
        s_all = np.asarray(s_all, dtype=np.float32)
    return (s_all[0], i_all[0]) if one else (s_all, i_all)


class SuperGlobalView:
    """An index searched with :func:`superglobal`'s re-ranking of its top ``m``, as an
    :class:`~pylandmark.retrieval.index.IndexLike` (``ids``, ``labels``, ``paths``, ``metric``,
    ``len``, ``search_rows``, ``search``): recognition, the CLI's listings and the service use it
    in place of the index.

    ``search_rows(queries, k)`` gives (Q, k) scores and row positions: the first min(m, N)
    columns re-ranked (their scores are re-ranking scores, not similarities), the rest the
    index's plain ranking; past N, row -1 and score -inf, as the index's own search.

    Args:
        index: an :class:`~pylandmark.Index` or a :class:`~pylandmark.retrieval.manifest.ShardedIndex`
            (a :class:`~pylandmark.retrieval.sharded.DistributedIndex` re-ranks collectively
            through its own methods' ``rerank=``).
        m, neighbours, beta: as :func:`superglobal`.
    """

    def __init__(self, index: Any, m: int = 400, neighbours: int = 9, beta: float = 0.15):
        if not all(callable(getattr(index, a, None)) for a in ("search_rows", "row_vectors")) or \
                not hasattr(index, "ids"):
            raise TypeError(f"index must be an Index or a ShardedIndex, got {type(index).__name__} (a "
                            "DistributedIndex re-ranks through its methods' rerank=superglobal)")
        self.index = index
        self.m, self.neighbours, self.beta = _check_superglobal(m, neighbours, beta)
        self.metric, self.dim = index.metric, index.dim

    def __repr__(self) -> str:
        return f"SuperGlobalView({self.index!r}, m={self.m}, neighbours={self.neighbours}, beta={self.beta})"

    def __len__(self) -> int:
        return len(self.index)

    @property
    def ids(self) -> np.ndarray:
        return self.index.ids

    @property
    def labels(self) -> np.ndarray | None:
        return self.index.labels

    @property
    def paths(self) -> list | None:
        return self.index.paths

    @property
    def descriptors(self) -> np.ndarray:
        """The index's stored rows (what the re-ranking reads)."""
        return self.index.descriptors

    def search_rows(self, queries: Any, k: int = 5) -> tuple[Any, Any]:
        """queries (Q, D) or (D,) -> re-ranked scores (Q, k) float32 and rows (Q, k) int64."""
        return superglobal(queries, self.index, k, m=self.m, neighbours=self.neighbours, beta=self.beta)

    def search(self, queries: Any, k: int = 5) -> tuple[Any, Any]:
        """Like :meth:`search_rows`, with ids instead of rows (-1 for padding)."""
        return with_ids(self.index.ids, *self.search_rows(queries, k))


def _check_superglobal(m: Any, neighbours: Any, beta: Any) -> tuple[int, int, float]:
    return (check_int(m, "m", minimum=1, hint=" (the rows re-ranked)"), check_int(neighbours, "neighbours", minimum=0),
            check_number(beta, "beta", minimum=0, hint=" (the neighbours' weight)"))


def _database(db: Any, fw: str, dim: int, metric: str | None) -> tuple[str, int, bool]:
    """superglobal's ``db`` checked against queries of ``fw`` and ``dim``: (metric, N, is an index)."""
    if framework_of(db) == "other":
        if not all(callable(getattr(db, a, None)) for a in ("search_rows", "row_vectors")):
            raise TypeError("db must be a numpy array, a torch tensor or an index (Index, ShardedIndex, "
                            f"DistributedIndex), got {type(db).__name__}")
        if metric is not None and metric != db.metric:
            raise ValueError(f"metric={metric!r} but the index's metric is {db.metric!r}; leave metric out")
        if db.dim != dim:
            raise ValueError(f"queries have D={dim} but the index has D={db.dim}")
        if len(db) == 0:
            raise ValueError("the index is empty; add descriptors before searching")
        return db.metric, len(db), True
    metric = "cosine" if metric is None else metric
    _check_metric(metric)
    if _framework(db, "db") != fw:
        raise TypeError("queries and db must both be numpy arrays or both torch tensors")
    if db.ndim != 2 or db.shape[1] != dim:
        raise ValueError(f"db must be (N, D) with the queries' D={dim}, got shape {tuple(db.shape)}")
    if db.shape[0] == 0:
        raise ValueError("db is empty (N=0)")
    return metric, int(db.shape[0]), False


def _rows(db: Any, idx: Any, fw: str, metric: str) -> Any:
    """db[idx] as float32, (c, n) indices -> (c, n, D), L2-normalised for "cosine" (a memory
    map reads only these rows; an index: its ``row_vectors``, in the queries' framework)."""
    flat: Any = idx.reshape(-1) if fw == "torch" else np.asarray(idx).reshape(-1)
    if framework_of(db) != "other":
        got = db[flat]
    elif fw == "torch":
        import torch

        got = torch.from_numpy(db.row_vectors(flat.cpu().numpy())).to(idx.device)
    else:
        got = db.row_vectors(flat)
    x = _as_f32(got, fw, "db", (2,))
    own = x is not got or framework_of(db) != "other"  # a copy of ours (indexing copies; row_vectors may not)
    x = x.reshape(*idx.shape, x.shape[-1])
    return _l2n(x, fw, inplace=own) if metric == "cosine" else x


def _padded(s: Any, i: Any, k: int, fw: str) -> tuple[Any, Any]:
    """(Q, k') scores and rows widened to k columns with -inf and -1 (an index's search past N)."""
    extra = k - s.shape[1]
    if extra <= 0:
        return s, i
    if fw == "torch":
        import torch

        return (torch.nn.functional.pad(s, (0, extra), value=-torch.inf),
                torch.nn.functional.pad(i, (0, extra), value=-1))
    return (np.pad(s, ((0, 0), (0, extra)), constant_values=-np.inf),
            np.pad(i, ((0, 0), (0, extra)), constant_values=-1))


def _cat(fw: str, *parts: Any, axis: int = 1) -> Any:
    if fw == "torch":
        import torch

        return torch.cat([torch.as_tensor(p) for p in parts], dim=axis)
    return np.concatenate([np.asarray(p) for p in parts], axis=axis)
