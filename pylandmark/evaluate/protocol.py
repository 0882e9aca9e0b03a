"""The revisited Oxford / Paris evaluation loop, once for every caller (``pylandmark evaluate``
in one process or under torchrun, and training's validation): describe the database and the
cropped queries, optionally re-rank (alpha-QE, DBA), rank the whole database, score E / M / H.

Under torch.distributed each rank describes a share of the database and keeps it; the queries
are described in shares and gathered, and the ranking comes from a sharded search (with QE or
DBA, which need every row, the database is gathered first). Every rank gets the same results.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import runtime
from ..extraction import ExtractOptions, describe

__all__ = ["evaluate_revisited", "rank_database"]


def rank_database(queries: np.ndarray, database: np.ndarray, *, gathered: bool) -> np.ndarray:
    """(Q, N) int64 ranking of every database row for each query (cosine, best first).

    Args:
        queries: (Q, D) descriptors, the same on every rank.
        database: (N, D) descriptors, or this rank's share of them (``gathered=False`` under
            torch.distributed: the ranking is then a sharded search over the shares).
    """
    if gathered or runtime.world_size() == 1:
        from ..ops import search

        return np.asarray(search(queries, database, k=len(database))[1])
    from ..retrieval.sharded import DistributedIndex

    index = DistributedIndex.from_rows(database, metric="cosine")
    return np.asarray(index.search_rows(queries, k=len(index), src=None)[1])


def evaluate_revisited(network: Any, names: Sequence[str], data_root: str | Path, opts: ExtractOptions, *,
                       qe_k: int = 0, qe_alpha: float = 3.0, dba_k: int = 0, dba_alpha: float = 3.0,
                       superglobal: Mapping[str, Any] | None = None, query_batch_size: int | None = None,
                       keep_ranks: bool = False) -> dict:
    """mAP and mP@k (easy / medium / hard) per dataset.

    Args:
        network: the network (a LandmarkNet or any module :func:`pylandmark.extract` takes).
        names: dataset names ("roxford5k", "rparis6k").
        data_root: the folder holding ``<name>/gnd_<name>.pkl`` and ``<name>/jpg/``.
        opts: how images are described (queries too).
        qe_k, qe_alpha, dba_k, dba_alpha: alpha query expansion / database augmentation
            (:func:`pylandmark.retrieval.rerank.rerank`); 0 = off.
        superglobal: also evaluate SuperGlobal's re-ranking of the same ranking
            (:func:`pylandmark.retrieval.rerank.superglobal` with these keyword arguments, e.g.
            ``{"m": 400}``; its defaults for the others), as ``results[name]["superglobal"]``;
            None = off.
        query_batch_size: batch size for the queries (default ``opts.batch_size``; their crops
            differ in shape, so batches rarely fill).
        keep_ranks: also return "ranks", the (Q, N) int64 ranking (for plots).

    Returns:
        ``{name: {"options": ..., "easy" | "medium" | "hard": {"map", "mp@k", ...}, ["ranks"],
        ["superglobal": {"easy" | ...}]}}`` as :func:`pylandmark.evaluate.revisited` gives, on
        every rank.
    """
    from ..data.revisited import RevisitedDataset
    from ..retrieval.rerank import rerank
    from ..retrieval.rerank import superglobal as superglobal_rerank

    query_opts = opts if query_batch_size is None else dataclasses.replace(opts, batch_size=query_batch_size)
    results = {}
    for name in names:
        ds = RevisitedDataset(name, data_root)
        db, _, _ = describe(network, ds.images, opts, gather=False)  # this rank's share
        bboxes = [ds.query_bbox(i) for i in range(ds.n_queries)]
        q, _, _ = describe(network, ds.query_paths, query_opts, bboxes=bboxes)
        gathered = False
        if qe_k or dba_k:
            full = runtime.gather_shares(db, len(ds.images))
            q, full = rerank(q, full, qe_k=qe_k, qe_alpha=qe_alpha, dba_k=dba_k, dba_alpha=dba_alpha)
            db, gathered = np.asarray(full), True
        ranks = rank_database(np.asarray(q), np.asarray(db), gathered=gathered)
        results[name] = {"options": {**dataclasses.asdict(opts), "qe_k": qe_k, "dba_k": dba_k,
                                     "superglobal": None if superglobal is None else dict(superglobal)},
                         **ds.evaluate(ranks)}
        if superglobal is not None:  # the same ranking, its top M re-ranked (every rank holds all rows for it)
            full = db if gathered else runtime.gather_shares(db, len(ds.images))
            _, reranked = superglobal_rerank(np.asarray(q), np.asarray(full), k=ranks.shape[1], ranks=ranks,
                                             **superglobal)
            results[name]["superglobal"] = ds.evaluate(np.asarray(reranked))
        if keep_ranks:
            results[name]["ranks"] = ranks
    return results
