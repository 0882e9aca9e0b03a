"""Hard-negative tuple mining, redone at the start of every epoch (Radenovic et al.).

1. Draw ``query_size`` (query, positive) pairs from the training pairs and a random pool of
   ``pool_size`` training images.
2. Describe the queries and the pool with the current network (eval mode, no gradients,
   through :func:`pylandmark.extract`: batched, BatchNorm folded, AMP on the GPU).
3. Rank the pool for every query with :func:`pylandmark.search` (cosine similarity of unit
   descriptors, i.e. increasing Euclidean distance).
4. Walk down each ranking and keep an image as a hard negative only if its cluster differs from
   the query's and from the clusters of the negatives already kept; stop at ``negatives``
   (computed without walking where that is cheaper: :func:`mine_negatives`).

Under ``torch.distributed`` the description (the expensive part) is split across the ranks and
the descriptors are all-gathered; every rank then runs the same selection on the same numbers.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .._checks import check_int, to_numpy
from ..extraction import extract_shared

__all__ = ["Tuples", "select_negatives", "mine_negatives", "draw_queries", "draw_pool", "mine_tuples"]

logger = logging.getLogger(__name__)

#: first search depth: queries whose first ``_FIRST_K`` neighbours do not give enough negatives
#: are searched again over the whole pool
_FIRST_K = 256


@dataclass
class Tuples:
    """The training tuples of one epoch.

    Attributes:
        qidxs: (T,) int64 query image indices (into the dataset's images).
        pidxs: (T,) int64 positive image indices.
        nidxs: (T, n) int64 negative image indices, -1 where a query got fewer than n.
        stats: mining statistics (timings in seconds, counts, mean negative similarity).
    """

    qidxs: np.ndarray
    pidxs: np.ndarray
    nidxs: np.ndarray
    stats: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.qidxs = np.asarray(self.qidxs, dtype=np.int64).reshape(-1)
        self.pidxs = np.asarray(self.pidxs, dtype=np.int64).reshape(-1)
        self.nidxs = np.asarray(self.nidxs, dtype=np.int64)
        if self.nidxs.ndim != 2 or not (self.qidxs.size == self.pidxs.size == self.nidxs.shape[0]):
            raise ValueError(f"qidxs {self.qidxs.shape}, pidxs {self.pidxs.shape} and nidxs {self.nidxs.shape} "
                             "must describe the same number of tuples, nidxs being (T, n)")

    def __len__(self) -> int:
        return int(self.qidxs.size)

    def images(self, i: int) -> list[int]:
        """Image indices of tuple ``i``: ``[query, positive, negative, ...]`` (no padding)."""
        negs = self.nidxs[i]
        return [int(self.qidxs[i]), int(self.pidxs[i]), *(int(n) for n in negs[negs >= 0])]


def _as_int_array(x: Any, name: str) -> np.ndarray:
    a = to_numpy(x, name)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
    return a.astype(np.int64)


def select_negatives(ranks: Any, query_clusters: Any, pool_clusters: Any, negatives: int) -> np.ndarray:
    """Applies the cluster rule to rankings of the pool.

    Args:
        ranks: (Q, K) pool positions, best (most similar) first; -1 entries are ignored.
        query_clusters: (Q,) cluster of each query.
        pool_clusters: (M,) cluster of each pool image.
        negatives: negatives wanted per query.

    Returns:
        (Q, negatives) int64 pool positions, -1 where the ranking ran out first.
    """
    negatives = check_int(negatives, "negatives", minimum=1)
    r = _as_int_array(ranks, "ranks")
    qc = _as_int_array(query_clusters, "query_clusters").reshape(-1)
    pc = _as_int_array(pool_clusters, "pool_clusters").reshape(-1)
    if r.ndim != 2 or r.shape[0] != qc.size:
        raise ValueError(f"ranks must be (Q, K) with Q = len(query_clusters) = {qc.size}, got shape {r.shape}")
    if r.size and (r.max() >= pc.size or r.min() < -1):
        raise ValueError(f"ranks holds positions outside [0, {pc.size}) (the pool size)")
    out = np.full((qc.size, int(negatives)), -1, dtype=np.int64)
    for i in range(qc.size):
        used = {int(qc[i])}
        n = 0
        for j in r[i]:
            if j < 0:
                continue
            c = int(pc[j])
            if c in used:
                continue
            out[i, n] = j
            used.add(c)
            n += 1
            if n == negatives:
                break
    return out


def mine_negatives(query_desc: Any, pool_desc: Any, query_clusters: Any, pool_clusters: Any,
                   negatives: int) -> tuple[np.ndarray, np.ndarray]:
    """Hard negatives by the cluster rule from descriptors.

    With at most ``k = max(256, 16 negatives)`` clusters in the pool every query takes the best
    image of each (:func:`_best_of_clusters`). Otherwise every query walks the ranking of the
    pool's first k images, one short of negatives the first 8 k. A query
    still short of negatives after them, which could gain (the pool holds clusters other than its
    own that it has not met: where a landmark has many photos, its own fill the top of the
    ranking), takes the same negatives from the best image of every cluster
    (:func:`_best_of_clusters`) instead of ranking the whole pool.

    Args:
        query_desc: (Q, D) unit descriptors (numpy or torch, on any device search supports).
        pool_desc: (M, D) unit descriptors, same framework and device.
        query_clusters, pool_clusters: (Q,) and (M,) cluster ids.
        negatives: negatives per query.

    Returns:
        ``(positions, scores)``: (Q, negatives) int64 pool positions (-1 where the pool holds too
        few other clusters) and their float32 cosine similarities (NaN for -1).
    """
    from ..ops import search

    if isinstance(query_desc, torch.Tensor) and query_desc.is_cuda:
        from ..ops import cuda_available

        if not cuda_available():  # this build has no CUDA search kernels: rank on the CPU
            query_desc, pool_desc = query_desc.cpu(), pool_desc.cpu()
    m = int(pool_desc.shape[0])
    q = int(query_desc.shape[0])
    qc = _as_int_array(query_clusters, "query_clusters").reshape(-1)
    pc = _as_int_array(pool_clusters, "pool_clusters").reshape(-1)
    if qc.size != q or pc.size != m:
        raise ValueError(f"query_clusters ({qc.size}) and pool_clusters ({pc.size}) must match the "
                         f"descriptors ({q} queries, {m} pool images)")
    k = min(m, max(_FIRST_K, 16 * int(negatives)))
    pool_set = np.unique(pc)
    if pool_set.size <= k:  # few clusters (a few landmarks): one k = 1 search per cluster beats any walk
        return _finish(query_desc, pool_desc, _best_of_clusters(query_desc, pool_desc, np.arange(q), qc, pc,
                                                                negatives))
    _, idx = search(query_desc, pool_desc, k=k, metric="cosine")
    pos = select_negatives(to_numpy(idx, "indices"), qc, pc, negatives)
    # clusters a query can still meet: the pool's, less its own
    wanted = np.minimum(pool_set.size - np.isin(qc, pool_set), int(negatives))
    deeper = np.flatnonzero((pos >= 0).sum(axis=1) < wanted)
    if deeper.size and k < m:  # walk 8 times deeper, then take the best image of every cluster
        k2 = min(m, 8 * k)
        _, idx = search(_take(query_desc, deeper), pool_desc, k=k2, metric="cosine")
        pos[deeper] = select_negatives(to_numpy(idx, "indices"), qc[deeper], pc, negatives)
        deeper = deeper[(pos[deeper] >= 0).sum(axis=1) < wanted[deeper]]
        if deeper.size and k2 < m:
            pos[deeper] = _best_of_clusters(query_desc, pool_desc, deeper, qc, pc, negatives)
    return _finish(query_desc, pool_desc, pos)


def _take(x: Any, rows: np.ndarray) -> Any:
    """Rows ``rows`` of a numpy array or torch tensor (on its device)."""
    return x[torch.as_tensor(rows, device=x.device)] if isinstance(x, torch.Tensor) else x[rows]


def _best_of_clusters(query_desc: Any, pool_desc: Any, members: np.ndarray, qc: np.ndarray, pc: np.ndarray,
                      negatives: int) -> np.ndarray:
    """The rule's negatives of queries ``members`` without walking their rankings: walking down
    a ranking, the first image met of a cluster is its best-ranked one, and clusters are met in
    the order of those images. So every query takes each other cluster's best image (a k = 1
    search of the cluster's pool images: ties to the lower position, as in the ranking) and
    keeps the ``negatives`` best of them (ties to the lower position). Every pool image is
    scored once per query, whatever the number of clusters or how deep the walk would go.

    Returns:
        (len(members), negatives) int64 pool positions, -1 where fewer clusters remain.
    """
    from ..ops import search

    order = np.argsort(pc, kind="stable")
    bounds = np.flatnonzero(np.r_[True, pc[order][1:] != pc[order][:-1], True])
    clusters = pc[order[bounds[:-1]]]
    best_s = np.full((members.size, clusters.size), -np.inf, dtype=np.float32)
    best_i = np.full((members.size, clusters.size), -1, dtype=np.int64)
    sub_q = _take(query_desc, members)
    for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        rows = np.sort(order[a:b])
        s, i = search(sub_q, _take(pool_desc, rows), k=1, metric="cosine")
        best_s[:, j] = to_numpy(s, "scores")[:, 0]
        best_i[:, j] = rows[to_numpy(i, "indices")[:, 0]]
    own = qc[members][:, None] == clusters[None, :]
    best_s[own], best_i[own] = -np.inf, -1
    ranked = np.lexsort((best_i, -best_s), axis=1)[:, : int(negatives)]
    pos = np.take_along_axis(best_i, ranked, axis=1)
    pos[~np.isfinite(np.take_along_axis(best_s, ranked, axis=1))] = -1
    out = np.full((members.size, int(negatives)), -1, dtype=np.int64)
    out[:, : pos.shape[1]] = pos
    return out


def _finish(query_desc: Any, pool_desc: Any, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(pos, similarities)``: (Q, n) float32 cosine similarity of every query with its chosen
    negatives (NaN for -1)."""
    sims = np.full(pos.shape, np.nan, dtype=np.float32)
    qi, j = np.nonzero(pos >= 0)
    if qi.size:
        a, b = _take(query_desc, qi), _take(pool_desc, pos[qi, j])
        if isinstance(a, torch.Tensor):  # bfloat16 has no numpy type
            a, b = a.float(), b.float()
        a = to_numpy(a, "queries").astype(np.float32, copy=False)
        b = to_numpy(b, "pool").astype(np.float32, copy=False)
        sims[qi, j] = np.einsum("ij,ij->i", a, b)
    return pos, sims


def draw_queries(n_pairs: int, query_size: int, rng: np.random.Generator) -> np.ndarray:
    """``min(query_size, n_pairs)`` distinct pair indices in random order."""
    return rng.permutation(n_pairs)[: min(int(query_size), int(n_pairs))].astype(np.int64)


def draw_pool(n_images: int, pool_size: int, rng: np.random.Generator) -> np.ndarray:
    """``min(pool_size, n_images)`` distinct image indices in random order."""
    return rng.permutation(n_images)[: min(int(pool_size), int(n_images))].astype(np.int64)


def mine_tuples(model: torch.nn.Module, dataset: Any, *, query_size: int = 2000, pool_size: int = 20000,
                negatives: int = 5, image_size: float | None = 362, rng: np.random.Generator,
                batch_size: int = 32, num_workers: int = 0, device: Any = None, amp: bool | None = None,
                progress: bool = True) -> Tuples:
    """One epoch's tuples from an :class:`~pylandmark.data.SfM120k` split.

    Args:
        model: the current network (a LandmarkNet; not modified, described in eval mode).
        dataset: has ``qidxs``, ``pidxs``, ``clusters`` and ``images`` (paths).
        query_size: (query, positive) pairs drawn (the reference: 2000).
        pool_size: images in the negative pool (the reference: 20000).
        negatives: hard negatives per tuple (the reference: 5).
        image_size: longer side of the images described (the training size, 362).
        rng: draws the pairs and the pool; give every rank the same generator state.
        batch_size, num_workers, device, amp, progress: as :func:`pylandmark.extract`.

    Returns:
        :class:`Tuples` (image indices into ``dataset``) with ``stats``: ``mining_s``,
        ``extract_s``, ``search_s``, ``n_short`` (tuples with fewer negatives) and
        ``neg_similarity`` (mean cosine similarity of the chosen negatives).
    """
    query_size = check_int(query_size, "query_size", minimum=1)
    pool_size = check_int(pool_size, "pool_size", minimum=1)
    negatives = check_int(negatives, "negatives", minimum=1)
    t0 = time.perf_counter()
    pairs = draw_queries(dataset.qidxs.size, query_size, rng)
    pool = draw_pool(len(dataset.clusters), pool_size, rng)
    qidxs = dataset.qidxs[pairs]
    pidxs = dataset.pidxs[pairs]
    images = dataset.images
    was_training = model.training
    model.eval()
    try:
        # one extraction call over queries and pool: one pass of the workers, one BN fold
        desc = extract_shared(model, [images[i] for i in qidxs] + [images[i] for i in pool], image_size=image_size,
                              batch_size=batch_size, num_workers=num_workers, device=device, amp=amp,
                              progress=progress, output="torch")
    finally:
        model.train(was_training)
    t1 = time.perf_counter()
    qd, pd = desc[: qidxs.size], desc[qidxs.size:]
    pos, sims = mine_negatives(qd, pd, dataset.clusters[qidxs], dataset.clusters[pool], negatives)
    t2 = time.perf_counter()
    nidxs = np.where(pos >= 0, pool[np.maximum(pos, 0)], -1)
    n_short = int((pos < 0).any(axis=1).sum())
    if n_short:
        logger.warning("mining: %d of %d queries got fewer than %d negatives (the pool holds too few "
                       "other clusters); enlarge pool_size", n_short, qidxs.size, negatives)
    stats = {"mining_s": t2 - t0, "extract_s": t1 - t0, "search_s": t2 - t1, "n_short": float(n_short),
             "neg_similarity": float(np.nanmean(sims)) if np.isfinite(sims).any() else float("nan"),
             "n_described": float(desc.shape[0])}
    logger.info("mined %d tuples (pool %d) in %.1f s: extract %.1f s, search %.2f s, mean negative "
                "similarity %.3f", qidxs.size, pool.size, stats["mining_s"], stats["extract_s"],
                stats["search_s"], stats["neg_similarity"])
    return Tuples(qidxs, pidxs, nidxs, stats)
