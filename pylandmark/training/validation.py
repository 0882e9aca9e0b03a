"""Validation during training: revisited Oxford / Paris mAP when their ground truth is present,
otherwise mAP and recall@k on the SfM-120k val split, or, training on labelled photos,
recognition accuracy and mAP of the held-out photos against the training photos."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..extraction import ExtractOptions, extract_shared
from .config import TrainConfig, autocast_dtype

__all__ = ["validate", "has_revisited", "held_out_sample"]

logger = logging.getLogger(__name__)


def _sfm_validation(model: nn.Module, val: Any, cfg: TrainConfig, dev: torch.device, amp: bool) -> dict[str, float]:
    """Every val image is the database. Recall@k: the pair's positive among the first k of its
    query's ranking; mAP: the images of the query's cluster are its positives (revisited
    evaluation, medium protocol, with the query itself as junk)."""
    size = cfg.val_image_size or cfg.image_size
    n_pairs = val.qidxs.size if cfg.val_queries is None else min(cfg.val_queries, val.qidxs.size)
    qidxs, pidxs = val.qidxs[:n_pairs], val.pidxs[:n_pairs]
    desc = extract_shared(model, val.images, image_size=size, batch_size=cfg.mining_batch_size,
                          num_workers=cfg.workers, device=dev, amp=amp, progress=cfg.progress).astype(np.float32)
    uq, pair_query = np.unique(qidxs, return_inverse=True)
    gnd = [{"easy": np.flatnonzero((val.clusters == val.clusters[q]) & (np.arange(desc.shape[0]) != q)),
            "hard": [], "junk": [int(q)]} for q in uq]
    pos = np.empty(n_pairs, dtype=np.int64)  # where each pair's positive ranks, its query left out
    aps = []
    for c0, ranks in _rankings(desc[uq], desc):
        for i in np.flatnonzero((pair_query >= c0) & (pair_query < c0 + len(ranks))):
            r = ranks[pair_query[i] - c0]
            pos[i] = np.flatnonzero(r[r != qidxs[i]] == pidxs[i])[0]
        aps.append(_medium_ap(ranks, gnd[c0:c0 + len(ranks)]))
    out = {f"val_recall@{k}": float(np.mean(pos < k)) for k in cfg.recall_ks}
    out["val_map"] = _mean(aps)
    out["score"] = out["val_map"]
    return out


#: (query, row) pairs of full rankings held at once (scores and rows: 12 bytes each, 192 MiB)
_RANK_PAIRS = 1 << 24
#: held-out validation ranks at most this many (query, row) pairs unless --val-queries says
#: otherwise: a few minutes of search, where all of a Google Landmarks v2 hold-out (150,000 photos
#: against 1.4 million) would take hours
_DEFAULT_PAIRS = 1 << 32


def held_out_sample(n_queries: int, n_db: int, cap: int | None, seed: int) -> np.ndarray:
    """The held-out photos validated on: all of them, or a seeded sample (sorted indices) of
    ``cap`` of them; without a cap, as many as keep their full rankings within
    ``_DEFAULT_PAIRS`` (query, row) pairs."""
    limit = cap if cap is not None else max(1, _DEFAULT_PAIRS // max(1, n_db))
    if n_queries <= limit:
        return np.arange(n_queries)
    if cap is None:
        logger.warning("validating on a seeded sample of %d of the %d held-out photos (the full ranking of "
                       "%d training photos each); --val-queries sets how many", limit, n_queries, n_db)
    return np.sort(np.random.default_rng([seed, 0x76616C]).choice(n_queries, limit, replace=False))


def _rankings(queries: np.ndarray, db: np.ndarray):
    """Yields ``(start, ranks)``: the full cosine rankings of ``db`` (N, D) by queries
    ``start..start + c`` of ``queries`` (Q, D), (c, N) int64, a few queries at a time so that at
    most ``_RANK_PAIRS`` (query, row) pairs are held (never the whole (Q, N) ranking)."""
    from ..ops import search

    step = max(1, _RANK_PAIRS // max(1, db.shape[0]))
    for c0 in range(0, len(queries), step):
        yield c0, np.asarray(search(queries[c0:c0 + step], db, k=db.shape[0], metric="cosine")[1])


def _medium_ap(ranks: np.ndarray, gnd: Sequence[dict]) -> np.ndarray:
    """(c,) medium-protocol AP of each ranking (:func:`pylandmark.evaluate.revisited`; NaN for a
    query without positives)."""
    from ..evaluate import revisited

    return revisited(ranks, gnd, protocols=("medium",))["medium"]["ap"]


def _mean(aps: list[np.ndarray]) -> float:
    """The mean AP over the chunks' queries that have positives (as revisited's mAP)."""
    ap = np.concatenate(aps) if aps else np.empty(0)
    return float(np.mean(ap[~np.isnan(ap)])) if (~np.isnan(ap)).any() else float("nan")


def _held_out_validation(model: nn.Module, val: Any, cfg: TrainConfig, dev: torch.device,
                         amp: bool) -> dict[str, float]:
    """Each held-out photo (:class:`~pylandmark.data.labelled.HeldOut`; at most ``val_queries``
    of them, :func:`held_out_sample`) searches the training photos: ``val_accuracy`` is the
    share recognised by the majority vote of its 5 nearest
    (:func:`pylandmark.retrieval.recognition.recognize`), ``val_map`` the mAP of its ranking,
    the photos of its landmark being its positives."""
    from ..evaluate.metrics import accuracy
    from ..retrieval.recognition import recognize

    size = cfg.val_image_size or cfg.image_size
    chosen = held_out_sample(len(val.query_images), len(val.db_images), cfg.val_queries, cfg.seed)
    query_images = [val.query_images[i] for i in chosen]
    query_labels = [val.query_labels[i] for i in chosen]
    nq = len(query_images)
    desc = extract_shared(model, [*query_images, *val.db_images], image_size=size,
                          batch_size=cfg.mining_batch_size, num_workers=cfg.workers, device=dev, amp=amp,
                          progress=cfg.progress).astype(np.float32)
    queries, db = desc[:nq], desc[nq:]
    db_labels = np.asarray(val.db_labels)
    votes = recognize(db, queries, k=min(5, db.shape[0]), labels=db_labels)
    gnd = [{"easy": np.flatnonzero(db_labels == lab), "hard": [], "junk": []} for lab in query_labels]
    aps = [_medium_ap(ranks, gnd[c0:c0 + len(ranks)]) for c0, ranks in _rankings(queries, db)]
    out = {"val_accuracy": float(accuracy(votes.labels, query_labels)), "val_map": _mean(aps)}
    out["score"] = out["val_map"]
    return out


def has_revisited(cfg: TrainConfig) -> bool:
    """Whether revisited Oxford / Paris ground truth under ``cfg.test_root`` is validated on."""
    return bool(_revisited_present(cfg))


def _revisited_present(cfg: TrainConfig) -> list[str]:
    if not cfg.test_root:
        return []
    root = Path(cfg.test_root)
    return [n for n in cfg.test_datasets
            if (root / n / f"gnd_{n}.pkl").is_file() or (root / f"gnd_{n}.pkl").is_file()]


def _revisited_validation(model: nn.Module, names: Sequence[str], cfg: TrainConfig, dev: torch.device,
                          amp: bool) -> dict[str, float]:
    """:func:`pylandmark.evaluate.protocol.evaluate_revisited` at the test image size (queries
    one by one: their crops all differ in shape)."""
    from ..evaluate.protocol import evaluate_revisited

    assert cfg.test_root is not None  # names come from _revisited_present
    opts = ExtractOptions(image_size=cfg.test_image_size, batch_size=cfg.mining_batch_size, num_workers=cfg.workers,
                          device=str(dev), progress=cfg.progress, amp=amp)
    results = evaluate_revisited(model, names, cfg.test_root, opts, query_batch_size=1)
    out = {f"{name}_map_{proto}": float(res[proto]["map"]) for name, res in results.items()
           for proto in ("easy", "medium", "hard")}
    out["score"] = float(np.mean([res["medium"]["map"] for res in results.values()]))
    return out


def validate(model: nn.Module, cfg: TrainConfig, val: Any = None, device: Any = None) -> dict[str, float]:
    """Validation metrics of ``model`` (fractions): revisited Oxford / Paris mAP (E/M/H) when
    their ground truth is under ``cfg.test_root``, else mAP and recall@k on the SfM val split
    ``val``, or the held-out labelled photos ``val`` (accuracy and mAP). ``score`` is what picks
    the best checkpoint (mean medium mAP, or val mAP). The generators' states are left as they
    were."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    amp = autocast_dtype(cfg, dev) is not None and dev.type == "cuda"
    names = _revisited_present(cfg)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            if names:
                return _revisited_validation(model, names, cfg, dev, amp)
            if val is None:
                raise ValueError("no validation data: give the SfM val split, held-out labelled photos or "
                                 "test_root with revisited data")
            if hasattr(val, "query_images"):
                return _held_out_validation(model, val, cfg, dev, amp)
            return _sfm_validation(model, val, cfg, dev, amp)
    finally:
        model.train(was_training)
