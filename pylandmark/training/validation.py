"""Validation during training: revisited Oxford / Paris mAP when their ground truth is present,
otherwise mAP and recall@k on the SfM-120k val split, or, training on labelled photos,
recognition accuracy and mAP of the held-out photos against the training photos."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..extraction import ExtractOptions, extract_shared
from .config import TrainConfig, autocast_dtype

__all__ = ["validate", "has_revisited"]


def _sfm_validation(model: nn.Module, val: Any, cfg: TrainConfig, dev: torch.device, amp: bool) -> dict[str, float]:
    """Every val image is the database. Recall@k: the pair's positive among the first k of its
    query's ranking; mAP: the images of the query's cluster are its positives (revisited
    evaluation, medium protocol, with the query itself as junk)."""
    from ..evaluate import revisited
    from ..ops import search

    size = cfg.val_image_size or cfg.image_size
    n_pairs = val.qidxs.size if cfg.val_queries is None else min(cfg.val_queries, val.qidxs.size)
    qidxs, pidxs = val.qidxs[:n_pairs], val.pidxs[:n_pairs]
    desc = extract_shared(model, val.images, image_size=size, batch_size=cfg.mining_batch_size,
                          num_workers=cfg.workers, device=dev, amp=amp, progress=cfg.progress).astype(np.float32)
    uq = np.unique(qidxs)
    _, ranks = search(desc[uq], desc, k=desc.shape[0], metric="cosine")
    ranks = np.asarray(ranks)
    row_of = {int(q): i for i, q in enumerate(uq)}
    out: dict[str, float] = {}
    pos = np.empty(n_pairs, dtype=np.int64)  # where each pair's positive ranks, its query left out
    for i, (q, p) in enumerate(zip(qidxs, pidxs)):
        r = ranks[row_of[int(q)]]
        pos[i] = np.flatnonzero(r[r != q] == p)[0]
    for k in cfg.recall_ks:
        out[f"val_recall@{k}"] = float(np.mean(pos < k))
    gnd = [{"easy": np.flatnonzero((val.clusters == val.clusters[q]) & (np.arange(desc.shape[0]) != q)),
            "hard": [], "junk": [int(q)]} for q in uq]
    out["val_map"] = float(revisited(ranks, gnd, protocols=("medium",))["medium"]["map"])
    out["score"] = out["val_map"]
    return out


def _held_out_validation(model: nn.Module, val: Any, cfg: TrainConfig, dev: torch.device,
                         amp: bool) -> dict[str, float]:
    """Each held-out photo (:class:`~pylandmark.data.labelled.HeldOut`) searches the training
    photos: ``val_accuracy`` is the share recognised by the majority vote of its 5 nearest
    (:func:`pylandmark.retrieval.recognition.recognize`), ``val_map`` the mAP of its ranking,
    the photos of its landmark being its positives."""
    from ..evaluate import revisited
    from ..evaluate.metrics import accuracy
    from ..ops import search
    from ..retrieval.recognition import recognize

    size = cfg.val_image_size or cfg.image_size
    nq = len(val.query_images)
    desc = extract_shared(model, [*val.query_images, *val.db_images], image_size=size,
                          batch_size=cfg.mining_batch_size, num_workers=cfg.workers, device=dev, amp=amp,
                          progress=cfg.progress).astype(np.float32)
    queries, db = desc[:nq], desc[nq:]
    db_labels = np.asarray(val.db_labels)
    votes = recognize(db, queries, k=min(5, db.shape[0]), labels=db_labels)
    _, ranks = search(queries, db, k=db.shape[0], metric="cosine")
    gnd = [{"easy": np.flatnonzero(db_labels == lab), "hard": [], "junk": []} for lab in val.query_labels]
    out = {"val_accuracy": float(accuracy(votes.labels, val.query_labels)),
           "val_map": float(revisited(np.asarray(ranks), gnd, protocols=("medium",))["medium"]["map"])}
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
