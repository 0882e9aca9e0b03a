"""Hard-negative tuple mining, redone at the start of every epoch (Radenovic et al.).

1. Draw ``query_size`` (query, positive) pairs from the training pairs and a random pool of
   ``pool_size`` training images.
2. Describe the queries and the pool with the current network (eval mode, no gradients,
   through :func:`pylandmark.extract`: batched, BatchNorm folded, AMP on the GPU).
3. Rank the pool for every query with :func:`pylandmark.search` (cosine similarity of unit
   descriptors, i.e. increasing Euclidean distance).
4. Walk down each ranking and keep an image as a hard negative only if its cluster differs from
   the query's and from the clusters of the negatives already kept; stop at ``negatives``.

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

    Args:
        query_desc: (Q, D) unit descriptors (numpy or torch, on any device search supports).
        pool_desc: (M, D) unit descriptors, same framework and device.
        query_clusters, pool_clusters: (Q,) and (M,) cluster ids.
        negatives: negatives per query.

    Returns:
        ``(positions, scores)``: (Q, negatives) int64 pool positions (-1 where the pool holds too
        few other clusters) and their float32 cosine similarities (NaN for -1).
    """
    from ..ops import SEARCH_CUDA_MAX_K, cuda_available, search

    if isinstance(query_desc, torch.Tensor) and query_desc.is_cuda and not cuda_available():
        # this build has no CUDA search kernels: rank on the CPU
        query_desc, pool_desc = query_desc.cpu(), pool_desc.cpu()
    m = int(pool_desc.shape[0])
    q = int(query_desc.shape[0])
    qc = _as_int_array(query_clusters, "query_clusters").reshape(-1)
    pc = _as_int_array(pool_clusters, "pool_clusters").reshape(-1)
    if qc.size != q or pc.size != m:
        raise ValueError(f"query_clusters ({qc.size}) and pool_clusters ({pc.size}) must match the "
                         f"descriptors ({q} queries, {m} pool images)")
    k = min(m, max(_FIRST_K, 16 * int(negatives)))
    scores, idx = search(query_desc, pool_desc, k=k, metric="cosine")
    scores, idx = to_numpy(scores, "scores").astype(np.float32), to_numpy(idx, "indices")
    pos = select_negatives(idx, qc, pc, negatives)
    short = np.nonzero((pos < 0).any(axis=1))[0]
    if short.size and k < m:
        # not enough other clusters near these queries: rank the whole pool for them
        sel: Any = torch.as_tensor(short, device=query_desc.device) if isinstance(query_desc, torch.Tensor) \
            else short
        sub, pool = query_desc[sel], pool_desc
        if isinstance(pool, torch.Tensor) and pool.is_cuda and m > SEARCH_CUDA_MAX_K:
            sub, pool = sub.cpu(), pool.cpu()  # the GPU search stops at k = 1024
        s2, i2 = search(sub, pool, k=m, metric="cosine")
        pos[short] = select_negatives(to_numpy(i2, "indices"), qc[short], pc, negatives)
        full_scores = np.full((q, m), np.nan, dtype=np.float32)
        full_idx = np.full((q, m), -1, dtype=np.int64)
        full_scores[:, :k], full_idx[:, :k] = scores, idx
        full_scores[short], full_idx[short] = to_numpy(s2, "scores"), to_numpy(i2, "indices")
        scores, idx = full_scores, full_idx
    # similarity of every chosen negative, looked up in the ranking
    sims = np.full(pos.shape, np.nan, dtype=np.float32)
    for i in range(q):
        lookup = dict(zip(idx[i].tolist(), scores[i].tolist()))
        for j, p in enumerate(pos[i]):
            if p >= 0:
                sims[i, j] = lookup[int(p)]
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
