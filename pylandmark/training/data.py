"""The training data of a run, whatever its source, as the loop reads it.

- **SfM-120k** (a folder holding ``retrieval-SfM-120k.pkl``): its train and val splits, its
  whitening pairs.
- **Labelled photos**, class folders under ``data_root`` or a landmark list (``data_csv``):
  a :class:`~pylandmark.data.labelled.LabelledTrainingSet`, whose clusters are the landmarks;
  ``val_fraction`` of every landmark is held out (seeded by the run's seed) and validated on
  (:class:`~pylandmark.data.labelled.HeldOut`); Lw whitening learns from the same-landmark pairs.
- **A COLMAP model** (``colmap``): made into an SfM-120k-format folder, ``<out>/colmap-data``,
  once (rank 0 writes it; a resumed run reads what is there), then read as SfM-120k.

Every source gives ``train`` with ``images`` (paths), ``clusters``, ``qidxs``, ``pidxs``: what
:func:`~pylandmark.training.mining.mine_tuples` reads.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import runtime as dist_utils
from .config import TrainConfig

__all__ = ["TrainingData", "load_training_data", "COLMAP_DATA"]

logger = logging.getLogger(__name__)

#: where a COLMAP model's SfM-120k-format pairs go, under the run's out_dir
COLMAP_DATA = "colmap-data"


@dataclass
class TrainingData:
    """A run's data.

    Attributes:
        layout: "sfm120k", "folders", "csv" or "colmap".
        train: the training split (``images``, ``clusters``, ``qidxs``, ``pidxs``).
        val: the SfM-120k val split, a HeldOut set of labelled photos, or None (nothing to
            validate on).
        root: the SfM-120k-format folder (sfm120k, colmap), else None.
    """

    layout: str
    train: Any
    val: Any
    root: Path | None

    def whitening_images(self, cfg: TrainConfig, kind: str) -> tuple[list[Path], Any, Any]:
        """``(paths, qidxs, pidxs)`` to learn the ``kind`` whitening from (pairs None for PCA)."""
        if self.root is None:  # labelled photos: the training photos and their landmark pairs
            pairs = (self.train.qidxs, self.train.pidxs) if kind == "lw" else (None, None)
            return list(self.train.images), *pairs
        from ..data.sfm120k import WHITEN_NAMES, WhiteningPairs

        try:
            wp = WhiteningPairs(self.root, cfg.whiten_name if self.layout == "sfm120k" else WHITEN_NAMES[0])
        except FileNotFoundError:
            if kind == "lw":
                raise
            return list(self.train.images), None, None
        return wp.images, *((wp.qidxs, wp.pidxs) if kind == "lw" else (None, None))


def load_training_data(cfg: TrainConfig) -> TrainingData:
    """The data ``cfg`` names (collective under torch.distributed: rank 0 writes a COLMAP
    model's pairs while the others wait)."""
    from ..data.labelled import LabelledTrainingSet, detect_layout
    from ..data.sfm120k import SfM120k

    root = Path(cfg.data_root).expanduser()
    if cfg.colmap:
        data_dir = _colmap_data(cfg, root)
        return TrainingData("colmap", SfM120k(data_dir, "train"), SfM120k(data_dir, "val"), data_dir)
    if cfg.data_csv:
        layout = "csv"
        full = LabelledTrainingSet.from_csv(cfg.data_csv, root, bad_images=cfg.bad_images,
                                            positives=cfg.positives, seed=cfg.seed)
    else:
        layout = detect_layout(root, cfg.db_name)
        if layout == "sfm120k":
            return TrainingData(layout, SfM120k(root, "train", name=cfg.db_name),
                                SfM120k(root, "val", name=cfg.db_name), root)
        full = LabelledTrainingSet.from_folders(root, bad_images=cfg.bad_images, positives=cfg.positives,
                                                seed=cfg.seed)
    train, val = full.split(cfg.val_fraction, cfg.seed)
    if val is None and cfg.validate_every and not cfg.test_root:
        logger.warning("%s: no landmark is large enough to hold photos out (val_fraction %g), so there is "
                       "nothing to validate on", full.source, cfg.val_fraction)
    return TrainingData(layout, train, val, None)


def _colmap_data(cfg: TrainConfig, image_root: Path) -> Path:
    """``<out>/colmap-data``, written from the COLMAP model by rank 0 unless already there."""
    out = Path(cfg.out_dir) / COLMAP_DATA
    from ..data.sfm120k import DB_NAME

    if dist_utils.rank() == 0 and not (out / f"{DB_NAME}.pkl").is_file():  # written last: complete
        from ..data.colmap import colmap_to_sfm

        logger.info("making SfM-120k-format pairs of the COLMAP model %s in %s", cfg.colmap, out)
        assert cfg.colmap is not None  # the caller's test
        colmap_to_sfm(cfg.colmap, image_root, out, min_shared=cfg.colmap_min_shared,
                      min_overlap=cfg.colmap_min_overlap, max_scale_change=cfg.colmap_max_scale_change,
                      val_fraction=cfg.val_fraction, seed=cfg.seed)
    dist_utils.barrier()
    return out


def describe_clusters(train: Any) -> str:
    """One line on a training split: images, pairs, clusters."""
    return (f"{len(train.images)} images, {int(np.size(train.qidxs))} pairs, "
            f"{np.unique(train.clusters).size} clusters")
