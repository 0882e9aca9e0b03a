"""The end of a training run: the exported LandmarkNet directories, with the whitening computed
on the trained network and installed as its whitening layer."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import runtime as dist_utils
from .checkpoint import load_checkpoint
from .config import TrainConfig, autocast_dtype
from .data import TrainingData

if TYPE_CHECKING:
    from ..models import LandmarkNet

__all__ = ["export"]

logger = logging.getLogger(__name__)


def export(model: LandmarkNet, cfg: TrainConfig, out: Path, best_path: Path, main_rank: bool,
           dev: torch.device, data: TrainingData) -> Path:
    """Writes ``model`` (last epoch) and ``model_best``; computes and installs the whitening
    (learned from ``data``'s whitening images)."""
    from ..models import LandmarkNet

    target = out / "model"
    final = model
    if best_path.exists():
        contents, _ = load_checkpoint(best_path)
        best_model = LandmarkNet(model.config)
        best_model.load_state_dict(contents["model"])
        if main_rank:
            model.save(target)
        final = best_model.to(dev)
        target = out / "model_best"
    if cfg.whitening:
        final = _whiten(final, cfg, out, dev, main_rank, data)
    if main_rank:
        final.save(target)
        logger.info("exported the trained network to %s", target)
    dist_utils.barrier()
    return target


def _whiten(model: LandmarkNet, cfg: TrainConfig, out: Path, dev: torch.device, main_rank: bool,
            data: TrainingData) -> LandmarkNet:
    from ..extraction import compute_whitening
    from ..models.whitening import install_whitening

    paths, qidxs, pidxs = data.whitening_images(cfg, str(cfg.whitening))
    amp = autocast_dtype(cfg, dev) is not None and dev.type == "cuda"
    w = compute_whitening(model, paths, str(cfg.whitening), qidxs=qidxs, pidxs=pidxs, image_size=cfg.whiten_image_size,
                          batch_size=cfg.mining_batch_size, num_workers=cfg.workers, device=dev, amp=amp,
                          progress=cfg.progress and main_rank)
    if main_rank:
        w.save(out / f"whitening_{cfg.whitening}.safetensors")
    logger.info("%s whitening from %d images installed (dim %s)", cfg.whitening, len(paths),
                cfg.whiten_dim or w.dim)
    return install_whitening(model, w, cfg.whiten_dim)
