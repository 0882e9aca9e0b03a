"""Unsupervised fine-tuning on SfM-120k (Radenovic, Tolias, Chum, TPAMI 2018), as the paper trains.

Every epoch:

1. **Mining** (:func:`pylandmark.training.mining.mine_tuples`): ``query_size`` (query, positive) pairs
   and a pool of ``pool_size`` images are drawn; the current network (eval mode) describes them
   and every query takes ``negatives`` hard negatives from its ranking of the pool, one per
   cluster, none from its own cluster.
2. **Training**: tuples are forwarded in steps of ``batch_size`` tuples; every image keeps its
   own size (longer side ``image_size``, never upscaled, no augmentation). Images of one step
   that happen to share a shape run as one batch: with BatchNorm frozen (eval mode) every image
   is processed independently, so this is the same computation as one forward per image, only
   faster. The loss (contrastive, or triplet) is summed over the pairs and tuples of the step;
   Adam (weight decay on every parameter but GeM's p, which gets ``p_lr_mult`` x the learning
   rate) updates the network, and the learning rate is multiplied by ``exp(-lr_decay)`` after
   every epoch. ``accumulation`` splits a step into micro-batches (gradients add up: the same
   update with less memory). On the GPU: float16 autocast with loss scaling (or bfloat16) and
   channels_last.
3. **Bookkeeping**: an atomic checkpoint ``<out>/checkpoints/last.pt`` (model, optimizer,
   scheduler, loss scaler, RNG states, epoch, config, history), one log line (console,
   ``log.csv``, ``log.jsonl``, optionally TensorBoard), validation every ``validate_every``
   epochs (revisited Oxford / Paris when present under ``test_root``, otherwise mAP and
   recall@k on the SfM-120k val split) keeping ``checkpoints/best.pt``.

All the randomness of an epoch (pairs, pool) comes from ``numpy.random.default_rng([seed,
epoch])``, and the torch / numpy / Python generators are checkpointed, so on the CPU a resumed
run reproduces the uninterrupted one bit for bit.

After the last epoch the network is exported as a LandmarkNet directory (``<out>/model``, and
``<out>/model_best`` when validation ran); with ``whitening="lw"`` (learned, from the
whitening pairs) or ``"pca"`` the whitening is computed on the exported network and installed
as its whitening layer (the matrices are also saved, ``whitening_<kind>.safetensors``).

Several processes: run under ``torchrun`` (``torchrun --nproc_per_node 2 -m pylandmark.training.loop
--data-root ... --out ...``); mining is split across the ranks, each step's tuples are dealt
to the ranks, and DistributedDataParallel sums the gradients (NCCL on GPUs, gloo on CPUs).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed as dist_utils
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..config import JsonConfig
from ..nn.losses import LOSSES, make_loss
from .mining import Tuples, describe, mine_tuples

__all__ = ["TrainConfig", "TRAIN_PRESETS", "train", "build_model", "build_optimizer", "train_step",
           "validate", "freeze_batchnorm", "add_arguments", "run", "main"]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
AMP_MODES = ("auto", "float16", "bfloat16", "off")
WHITENINGS = ("lw", "pca")

# fields that may differ between a run and its resumption (they do not change the recipe)
_RUNTIME_FIELDS = {"epochs", "device", "workers", "progress", "tensorboard", "validate_every",
                   "mining_batch_size", "data_root", "test_root", "out_dir", "log_every", "val_queries",
                   "whitening", "whiten_dim", "whiten_name", "whiten_image_size", "test_datasets",
                   "test_image_size", "val_image_size", "validate_initial", "recall_ks"}


@dataclass
class TrainConfig(JsonConfig):
    """Everything a training run needs; the defaults are the paper's recipe (REFERENCE §1) with
    the paper's network (CSPDarknet-53 + GeM) and the reference command's margin and lr.

    Data:
        data_root: SfM-120k folder (``retrieval-SfM-120k.pkl`` and ``ims/``).
        db_name: base name of the db pickle.
        image_size: longer side of training images (362; never upscaled).
        query_size, pool_size, negatives: mining sizes (2000, 20000, 5).
    Network:
        model: a LandmarkNet preset name (``pylandmark.models.LANDMARKNET_PRESETS``).
        model_args: LandmarkNetConfig fields to override (e.g. ``backbone_args``).
        pretrained: backbone weights (file or URL, e.g. timm's ImageNet CSPDarknet-53) or a
            LandmarkNet directory to start from; None starts from random weights.
    Optimisation:
        loss: "contrastive" or "triplet"; margin: its margin (0.85; code default 0.7).
        lr: base learning rate of Adam (5e-7; code default 1e-6); p_lr_mult: factor for GeM's p.
        weight_decay: 1e-6 (not applied to p); lr_decay: lr x exp(-lr_decay) per epoch.
        epochs: 100; batch_size: tuples per optimiser step (5); accumulation: micro-batches per
            step (batch_size must be divisible by accumulation x processes).
    Runtime:
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:N".
        amp: "auto" (float16 on CUDA, off on the CPU), "float16", "bfloat16", "off".
        channels_last: None = on for CUDA.
        workers: DataLoader processes for image loading (training and mining).
        mining_batch_size: images per forward pass while mining / validating.
        seed: seeds everything; the epoch's pairs and pool come from ``default_rng([seed, epoch])``.
    Validation:
        validate_every: epochs between validations (0: never); validate_initial: also before
        the first epoch. val_queries: cap on SfM val queries (None: all). val_image_size: size
        of val images (None: image_size). recall_ks: k of recall@k.
        test_root: folder with revisited ``roxford5k`` / ``rparis6k`` (used when present);
        test_datasets, test_image_size (1024).
    Whitening (after training, installed into the exported model):
        whitening: None, "lw" (learned from ``whiten_name`` pairs) or "pca"; whiten_dim;
        whiten_name; whiten_image_size.
    Output:
        out_dir; progress (tqdm bars); tensorboard (needs the ``tensorboard`` package);
        log_every (steps between debug log lines, 0: none).
    """

    data_root: str = ""
    out_dir: str = "runs/sfm120k"
    db_name: str = "retrieval-SfM-120k"
    image_size: int = 362
    query_size: int = 2000
    pool_size: int = 20000
    negatives: int = 5
    model: str = "cspdarknet53-gem"
    model_args: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    loss: str = "contrastive"
    margin: float = 0.85
    lr: float = 5e-7
    p_lr_mult: float = 10.0
    weight_decay: float = 1e-6
    lr_decay: float = 0.01
    epochs: int = 100
    batch_size: int = 5
    accumulation: int = 1
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool | None = None
    workers: int = 4
    mining_batch_size: int = 32
    seed: int = 0
    validate_every: int = 1
    validate_initial: bool = False
    val_queries: int | None = None
    val_image_size: int | None = None
    recall_ks: tuple[int, ...] = (1, 5, 10)
    test_root: str | None = None
    test_datasets: tuple[str, ...] = ("roxford5k", "rparis6k")
    test_image_size: int = 1024
    whitening: str | None = None
    whiten_dim: int | None = None
    whiten_name: str = "retrieval-SfM-120k-whiten"
    whiten_image_size: int = 1024
    progress: bool = True
    tensorboard: bool = False
    log_every: int = 0

    def __post_init__(self) -> None:
        def pos_int(name: str, minimum: int = 1) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
            setattr(self, name, int(v))

        def pos_float(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or \
                    (v < 0 if allow_zero else v <= 0):
                raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {v!r}")
            setattr(self, name, float(v))

        for n in ("image_size", "query_size", "pool_size", "negatives", "epochs", "batch_size",
                  "accumulation", "mining_batch_size", "test_image_size", "whiten_image_size"):
            pos_int(n)
        for n in ("workers", "validate_every", "seed", "log_every"):
            pos_int(n, 0)
        for n in ("lr", "p_lr_mult"):
            pos_float(n)
        for n in ("margin", "weight_decay", "lr_decay"):
            pos_float(n, allow_zero=True)
        if self.batch_size % self.accumulation:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by accumulation "
                             f"({self.accumulation}): each micro-batch holds batch_size / accumulation tuples")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {self.loss!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu", "cuda")
                                                    or self.device.startswith("cuda:")):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.whitening not in (None, *WHITENINGS):
            raise ValueError(f"whitening must be None, 'lw' or 'pca', got {self.whitening!r}")
        if self.whiten_dim is not None:
            pos_int("whiten_dim")
        if self.val_queries is not None:
            pos_int("val_queries")
        if self.val_image_size is not None:
            pos_int("val_image_size")
        if not isinstance(self.model_args, Mapping):
            raise TypeError(f"model_args must be a dict of LandmarkNetConfig fields, got {type(self.model_args).__name__}")
        self.model_args = dict(self.model_args)
        from ..models import LANDMARKNET_PRESETS

        if self.model not in LANDMARKNET_PRESETS:
            raise ValueError(f"model must be a LandmarkNet preset, one of {sorted(LANDMARKNET_PRESETS)}; "
                             f"got {self.model!r}")
        self.recall_ks = tuple(int(k) for k in self.recall_ks)
        if not self.recall_ks or min(self.recall_ks) < 1:
            raise ValueError(f"recall_ks must be ints >= 1, got {self.recall_ks!r}")
        self.test_datasets = tuple(str(d) for d in self.test_datasets)
        for n in ("data_root", "out_dir"):
            v = getattr(self, n)
            if isinstance(v, os.PathLike):
                setattr(self, n, os.fspath(v))
            elif not isinstance(v, str):
                raise TypeError(f"{n} must be a path, got {type(v).__name__}")
        for n in ("test_root", "pretrained"):
            v = getattr(self, n)
            if isinstance(v, os.PathLike):
                setattr(self, n, os.fspath(v))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "TrainConfig":
        """A named recipe from :data:`TRAIN_PRESETS` with fields overridden."""
        if name not in TRAIN_PRESETS:
            raise ValueError(f"preset must be one of {sorted(TRAIN_PRESETS)}, got {name!r}")
        return dataclasses.replace(TRAIN_PRESETS[name], **overrides)


#: Named recipes. ``cspdarknet53-gem``: the paper's network with the reference recipe;
#: ``resnet101-gem``: the reference command (ResNet-101 GeM, contrastive margin 0.85, Adam
#: lr 5e-7, weight decay 1e-6, 100 epochs); ``test``: a tiny 3-stage CSPDarknet (stride 8) with a
#: trainable whitening layer, for CPU tests and the synthetic example: 96 px images, small mining,
#: and, since it starts from random weights rather than ImageNet ones, a larger lr annealed
#: faster (x exp(-0.3) per epoch).
TRAIN_PRESETS: dict[str, TrainConfig] = {
    "cspdarknet53-gem": TrainConfig(),
    "resnet101-gem": TrainConfig(model="resnet101-gem"),
    "test": TrainConfig(
        model="cspdarknet53-gem-lw",
        model_args={"backbone_args": {"stem_chs": 12, "depths": [1, 1, 1], "out_chs": [24, 48, 96],
                                      "expand_ratio": [2.0, 1.0, 1.0], "bottle_ratio": [0.5, 1.0, 1.0]}},
        image_size=96, query_size=96, pool_size=192, negatives=3, epochs=8, batch_size=4, lr=2e-3,
        lr_decay=0.3, margin=0.7, workers=0, mining_batch_size=32, val_image_size=96, test_image_size=96,
        whiten_image_size=96, progress=False),
}


# ------------------------------------------------------------------------------------ building


def _resolve_device(spec: str) -> torch.device:
    from ..devices import resolve_device

    # under torchrun every process drives the GPU of its LOCAL_RANK
    local = int(os.environ.get("LOCAL_RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    return resolve_device(spec, cuda_index=local)


def _amp_dtype(cfg: TrainConfig, dev: torch.device) -> torch.dtype | None:
    mode = cfg.amp
    if mode == "auto":
        mode = "float16" if dev.type == "cuda" else "off"
    if mode == "off":
        return None
    return torch.float16 if mode == "float16" else torch.bfloat16


def build_model(cfg: TrainConfig) -> Any:
    """The LandmarkNet of ``cfg`` (preset + ``model_args``), initialised from ``pretrained``."""
    from ..models import LandmarkNet, LandmarkNetConfig, load_backbone_weights

    if cfg.pretrained and (Path(cfg.pretrained) / "config.json").is_file():
        model = LandmarkNet.from_pretrained(cfg.pretrained)
        logger.info("starting from the LandmarkNet in %s", cfg.pretrained)
        return model
    model = LandmarkNet(LandmarkNetConfig.from_preset(cfg.model, **cfg.model_args))
    if cfg.pretrained:
        report = load_backbone_weights(model, cfg.pretrained, progress=cfg.progress)
        logger.info("backbone weights from %s: %d tensors", cfg.pretrained, len(report.loaded))
    else:
        logger.warning("training %s from random weights: the paper starts from ImageNet weights "
                       "(pass pretrained=<backbone weights file or URL>)", cfg.model)
    return model


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    """Adam with two groups (network: lr, weight decay; GeM p: ``p_lr_mult`` x lr, no decay) and
    the exponential decay ``lr x exp(-lr_decay)`` per epoch."""
    p_params = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("pool.")]
    others = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("pool.")]
    groups = [{"params": others, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if p_params:
        groups.append({"params": p_params, "lr": cfg.lr * cfg.p_lr_mult, "weight_decay": 0.0})
    optimizer = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=math.exp(-cfg.lr_decay))
    return optimizer, scheduler


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Puts every BatchNorm layer in eval mode (running statistics frozen; affine still trains)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


class _GroupForward(nn.Module):
    """Runs the network on a list of same-shape image batches in one call (one DDP forward per
    micro-batch, whatever the number of shapes)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, groups: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.model(x) for x in groups]


# ------------------------------------------------------------------------------------ one step


def _group_by_shape(images: Sequence[torch.Tensor]) -> list[list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(images):
        groups.setdefault(tuple(x.shape), []).append(i)
    return list(groups.values())


def _micro_loss(net: nn.Module, tuples: Sequence[Sequence[torch.Tensor]], loss_fn: nn.Module,
                dev: torch.device, amp_dtype: torch.dtype | None, channels_last: bool) -> torch.Tensor:
    flat = [x for t in tuples for x in t]
    groups = _group_by_shape(flat)
    batches = []
    for g in groups:
        x = torch.stack([flat[i] for i in g]).to(dev, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        batches.append(x)
    with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        outs = net(batches)
    perm = torch.as_tensor([i for g in groups for i in g], device=dev)
    desc = torch.cat([o.float() if o.dtype in (torch.float16, torch.bfloat16) else o for o in outs])
    desc = desc[torch.argsort(perm)]
    dim = desc.shape[1]
    starts = np.cumsum([0] + [len(t) for t in tuples])
    n_max = max(len(t) - 2 for t in tuples)
    b = len(tuples)
    q = desc[torch.as_tensor(starts[:-1], device=dev)]
    p = desc[torch.as_tensor(starts[:-1] + 1, device=dev)]
    neg_rows = np.zeros((b, max(n_max, 1)), dtype=np.int64)
    mask = np.zeros((b, max(n_max, 1)), dtype=bool)
    for i, t in enumerate(tuples):
        k = len(t) - 2
        neg_rows[i, :k] = np.arange(starts[i] + 2, starts[i] + 2 + k)
        mask[i, :k] = True
    negs = desc[torch.as_tensor(neg_rows, device=dev).reshape(-1)].reshape(b, neg_rows.shape[1], dim)
    return loss_fn(q, p, negs, torch.as_tensor(mask, device=dev))


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence[Sequence[Sequence[torch.Tensor]]],
               loss_fn: nn.Module, *, device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None,
               scaler: Any = None, channels_last: bool = False, world_size: int = 1) -> float:
    """One optimiser step over this process's share of a batch of tuples, with the network in
    training mode and its BatchNorm layers in eval mode (frozen statistics).

    Args:
        net: the network (a LandmarkNet), or a ``DistributedDataParallel`` wrapping
            ``_GroupForward(model)`` when several processes train together.
        optimizer: its optimizer.
        micro_batches: ``accumulation`` lists of tuples; a tuple is a list of (3, H, W) images
            ``[query, positive, negative, ...]``.
        loss_fn: a tuple loss module (sum over pairs and tuples).
        device, amp_dtype, scaler, channels_last: runtime settings (``scaler``: a
            ``torch.amp.GradScaler`` for float16).
        world_size: processes in the DDP group: the loss is scaled by it so that DDP's gradient
            average becomes the sum over all tuples of the step.

    Returns:
        the summed loss of this process's tuples (a float).
    """
    dev = torch.device(device)
    ddp = isinstance(net, nn.parallel.DistributedDataParallel)
    fwd = net if ddp else _GroupForward(net)
    freeze_batchnorm(fwd.train())  # the recipe: BatchNorm statistics stay frozen
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i, mb in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        ctx = net.no_sync() if (ddp and not last) else contextlib.nullcontext()
        with ctx:
            loss = _micro_loss(fwd, mb, loss_fn, dev, amp_dtype, channels_last)
            scaled = loss * world_size if ddp else loss
            if scaler is not None:
                scaler.scale(scaled).backward()
            else:
                scaled.backward()
        total += float(loss.detach())
    if scaler is not None:
        scaler.step(optimizer)  # skips the step (and lowers the scale) on inf / NaN gradients
        scaler.update()
    else:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not math.isfinite(total) or (grads and not torch.isfinite(
                torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads])).all()):
            raise FloatingPointError(
                f"train_step: the loss ({total}) or a gradient is not finite; lower the learning rate "
                "(a large GeM p, e.g. from a high lr, underflows x^p for channels that are all below eps)")
        optimizer.step()
    return total


# ------------------------------------------------------------------------------------ data


class _TupleImages(torch.utils.data.Dataset):
    """Tuple ``order[i]`` of an epoch as a list of (3, H, W) training images."""

    def __init__(self, paths: Sequence[Path], tuples: Tuples, order: Sequence[int], image_size: int,
                 mean: Sequence[float], std: Sequence[float]):
        self.paths, self.tuples, self.order = paths, tuples, list(order)
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        from ..data.images import load_image

        return [load_image(self.paths[j], self.image_size, mean=self.mean, std=self.std)
                for j in self.tuples.images(self.order[i])]


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def _collate_one(x: Any) -> Any:
    return x


def _epoch_schedule(n_tuples: int, cfg: TrainConfig, world: int, rank: int) -> tuple[list[list[list[int]]], int]:
    """This rank's tuples: a list of steps, each a list of ``accumulation`` micro-batches of
    tuple indices. Tuple j of a step goes to slot j % (world x accumulation); slot s belongs to
    rank s % world, micro-batch s // world. An incomplete last step is dropped when it cannot
    give every slot a tuple (all ranks must take part in every step)."""
    slots = world * cfg.accumulation
    if cfg.batch_size < slots:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be >= accumulation x processes ({slots})")
    steps = []
    dropped = 0
    for s0 in range(0, n_tuples, cfg.batch_size):
        ids = list(range(s0, min(s0 + cfg.batch_size, n_tuples)))
        if len(ids) < slots:
            dropped = len(ids)
            break
        micro: list[list[int]] = [[] for _ in range(cfg.accumulation)]
        for j, t in enumerate(ids):
            s = j % slots
            if s % world == rank:
                micro[s // world].append(t)
        steps.append(micro)
    return steps, dropped


# ------------------------------------------------------------------------------------ validation


def _sfm_validation(model: nn.Module, val: Any, cfg: TrainConfig, dev: torch.device, amp: bool) -> dict[str, float]:
    from ..evaluate import compute_ap
    from ..ops import search

    size = cfg.val_image_size or cfg.image_size
    n_pairs = val.qidxs.size if cfg.val_queries is None else min(cfg.val_queries, val.qidxs.size)
    qidxs, pidxs = val.qidxs[:n_pairs], val.pidxs[:n_pairs]
    desc = describe(model, val.images, image_size=size, batch_size=cfg.mining_batch_size,
                    num_workers=cfg.workers, device=dev, amp=amp, progress=cfg.progress,
                    output_device="cpu").float().numpy()
    n = desc.shape[0]
    uq = np.unique(qidxs)
    _, ranks = search(desc[uq], desc, k=n, metric="cosine")
    ranks = np.asarray(ranks)
    pos_of = {int(q): r for q, r in zip(uq, ranks)}
    out: dict[str, float] = {}
    for k in cfg.recall_ks:
        hits = 0
        for q, p in zip(qidxs, pidxs):
            r = pos_of[int(q)]
            r = r[r != q]
            hits += int(p in r[:k])
        out[f"val_recall@{k}"] = hits / len(qidxs)
    aps = []
    for q in uq:
        r = pos_of[int(q)]
        r = r[r != q]
        positives = val.clusters[r] == val.clusters[q]
        npos = int(positives.sum())
        if npos:
            aps.append(compute_ap(np.nonzero(positives)[0], npos))
    out["val_map"] = float(np.mean(aps)) if aps else float("nan")
    out["score"] = out["val_map"]
    return out


def _revisited_present(cfg: TrainConfig) -> list[str]:
    if not cfg.test_root:
        return []
    root = Path(cfg.test_root)
    return [n for n in cfg.test_datasets
            if (root / n / f"gnd_{n}.pkl").is_file() or (root / f"gnd_{n}.pkl").is_file()]


def _revisited_validation(model: nn.Module, names: Sequence[str], cfg: TrainConfig, dev: torch.device,
                          amp: bool) -> dict[str, float]:
    from ..data.revisited import RevisitedDataset
    from ..ops import search

    out: dict[str, float] = {}
    mediums = []
    for name in names:
        ds = RevisitedDataset(name, cfg.test_root)
        db = describe(model, ds.images, image_size=cfg.test_image_size, batch_size=cfg.mining_batch_size,
                      num_workers=cfg.workers, device=dev, amp=amp, progress=cfg.progress,
                      output_device="cpu").float().numpy()
        qd = describe(model, ds.query_paths, image_size=cfg.test_image_size, batch_size=1,
                      num_workers=cfg.workers, device=dev, amp=amp, progress=cfg.progress,
                      bboxes=[ds.query_bbox(i) for i in range(ds.n_queries)], output_device="cpu").float().numpy()
        _, ranks = search(qd, db, k=db.shape[0], metric="cosine")
        res = ds.evaluate(np.asarray(ranks))
        for proto in ("easy", "medium", "hard"):
            out[f"{name}_map_{proto}"] = float(res[proto]["map"])
        mediums.append(float(res["medium"]["map"]))
    out["score"] = float(np.mean(mediums))
    return out


def validate(model: nn.Module, cfg: TrainConfig, val: Any = None, device: Any = None) -> dict[str, float]:
    """Validation metrics of ``model`` (fractions): revisited Oxford / Paris mAP (E/M/H) when
    their ground truth is under ``cfg.test_root``, else mAP and recall@k on the SfM val split
    ``val``. ``score`` is what picks the best checkpoint (mean medium mAP, or val mAP). The
    generators' states are left as they were."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    amp = _amp_dtype(cfg, dev) is not None and dev.type == "cuda"
    names = _revisited_present(cfg)
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            if names:
                return _revisited_validation(model, names, cfg, dev, amp)
            if val is None:
                raise ValueError("no validation data: give the SfM val split or test_root with revisited data")
            return _sfm_validation(model, val, cfg, dev, amp)
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------ logging


class _RunLog:
    """Console / CSV / JSON-lines / TensorBoard log of the epochs (rank 0 only)."""

    def __init__(self, out: Path, tensorboard: bool, enabled: bool):
        self.out, self.enabled = out, enabled
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                logger.warning("tensorboard=True but the 'tensorboard' package is not installed "
                               "(pip install tensorboard); logging to CSV / JSON only")

    def write(self, history: Sequence[Mapping[str, Any]]) -> None:
        if not self.enabled:
            return
        keys: list[str] = []
        for row in history:
            keys.extend(k for k in row if k not in keys)
        tmp = self.out / "log.csv.tmp"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for row in history:
                w.writerow({k: row.get(k, "") for k in keys})
        os.replace(tmp, self.out / "log.csv")
        tmp = self.out / "log.jsonl.tmp"
        with open(tmp, "w") as f:
            for row in history:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, self.out / "log.jsonl")
        if self.writer is not None and history:
            row = history[-1]
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k, v, int(row["epoch"]))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _format_row(row: Mapping[str, Any]) -> str:
    parts = [f"epoch {row['epoch']}"]
    if "loss" in row:
        parts.append(f"loss {row['loss']:.4f}  lr {row['lr']:.3g}  p {row['p']:.3f}  time {row['epoch_s']:.1f}s "
                     f"(mining {row['mining_s']:.1f}s)  {row['images_per_s']:.1f} img/s")
    for k, v in row.items():
        if k.startswith(("val_", "roxford", "rparis")):
            parts.append(f"{k} {100 * v:.2f}")
    return "  ".join(parts)


# ------------------------------------------------------------------------------------ training


def _check_resume_config(saved: Mapping[str, Any], cfg: TrainConfig) -> None:
    now = cfg.to_dict()
    diff = [k for k in now if k not in _RUNTIME_FIELDS and saved.get(k) != now[k]]
    if diff:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in diff)
        raise ValueError(f"resume: the configuration differs from the checkpoint's ({details}); "
                         "use the same recipe, or a new out_dir to start over")


def _unwrap_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _p_value(model: nn.Module) -> float:
    return float(model.pool.p.detach().reshape(-1)[0])


def train(config: TrainConfig | Mapping[str, Any] | None = None, **overrides: Any) -> Path:
    """Fine-tunes a LandmarkNet on SfM-120k as :mod:`pylandmark.training.loop` describes.

    Args:
        config: a :class:`TrainConfig`, a dict of its fields, or None (defaults); ``overrides``
            replace fields (e.g. ``train(cfg, epochs=5)``). ``resume=True`` among the overrides
            continues the run in ``out_dir`` from ``checkpoints/last.pt``.

    Returns:
        the exported LandmarkNet directory (``<out_dir>/model_best`` when validation ran, else
        ``<out_dir>/model``); load it with ``LandmarkNet.from_pretrained``.

    Raises:
        ValueError: bad configuration, a non-empty ``out_dir`` without ``resume``, or a resume
            whose recipe differs from the checkpoint's.
    """
    resume = bool(overrides.pop("resume", False))
    if config is None:
        cfg = TrainConfig(**overrides)
    elif isinstance(config, TrainConfig):
        cfg = dataclasses.replace(config, **overrides)
    elif isinstance(config, Mapping):
        cfg = TrainConfig.from_dict({**config, **overrides})
    else:
        raise TypeError(f"config must be a TrainConfig, a dict or None, got {type(config).__name__}")
    if not cfg.data_root:
        raise ValueError("data_root is empty: give the SfM-120k folder (with retrieval-SfM-120k.pkl and "
                         "ims/), e.g. from pylandmark.data.download_sfm120k or make_sfm_dataset")
    dev = _resolve_device(cfg.device)
    own_group = dist_utils.init_from_env(dev.type)
    try:
        return _train(cfg, dev, resume)
    finally:
        if own_group:
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, dev: torch.device, resume: bool) -> Path:
    from ..data.sfm120k import SfM120k

    world, rank = dist_utils.world_size(), dist_utils.rank()
    main_rank = rank == 0
    out = Path(cfg.out_dir)
    ckpt_dir = out / CHECKPOINT_DIR
    last_path, best_path = ckpt_dir / LAST, ckpt_dir / BEST
    if not resume and last_path.exists():
        raise ValueError(f"out_dir {out} already holds a training checkpoint; pass resume=True (--resume) "
                         "to continue it, or choose another out_dir")
    if resume and not last_path.exists():
        raise ValueError(f"resume: no checkpoint at {last_path}; run without resume to start training")
    dist_utils.barrier()
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    amp_dtype = _amp_dtype(cfg, dev)
    channels_last = dev.type == "cuda" if cfg.channels_last is None else bool(cfg.channels_last)
    progress = cfg.progress and main_rank

    train_ds = SfM120k(cfg.data_root, "train", name=cfg.db_name)
    val_ds = SfM120k(cfg.data_root, "val", name=cfg.db_name)
    train_paths = train_ds.images
    logger.info("training on %r (%d images, %d pairs), %d process(es) on %s, amp %s", train_ds.db_path.name,
                len(train_ds), train_ds.n_pairs, world, dev, amp_dtype)

    model = build_model(cfg).to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda") if (amp_dtype == torch.float16 and dev.type == "cuda") else None
    loss_fn = make_loss(cfg.loss, cfg.margin)

    start_epoch = 0
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"score": None, "epoch": None}
    if resume:
        contents, meta = load_checkpoint(last_path)
        _check_resume_config(meta["config"], cfg)
        model.load_state_dict(contents["model"])
        optimizer.load_state_dict(contents["optimizer"])
        scheduler.load_state_dict(contents["scheduler"])
        if scaler is not None and contents.get("scaler"):
            scaler.load_state_dict(contents["scaler"])
        set_rng_state(contents["rng"])
        start_epoch, history, best = int(meta["epoch"]), list(meta["history"]), dict(meta["best"])
        logger.info("resuming %s after epoch %d", out, start_epoch)

    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            _GroupForward(model), device_ids=[dev.index] if dev.type == "cuda" else None,
            broadcast_buffers=False)
    log = _RunLog(out, cfg.tensorboard, main_rank)
    log.write(history)

    def checkpoint_meta(epoch: int) -> dict[str, Any]:
        return {"epoch": epoch, "config": cfg.to_dict(), "history": history, "best": best, "world_size": world,
                "torch_version": torch.__version__}

    def save(epoch: int, is_best: bool) -> None:
        if not main_rank:
            return
        contents = {"model": _unwrap_state(model), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else {},
                    "rng": rng_state()}
        save_checkpoint(last_path, contents, checkpoint_meta(epoch))
        if is_best:
            tmp = best_path.with_name(best_path.name + ".tmp")
            shutil.copyfile(last_path, tmp)
            os.replace(tmp, best_path)

    try:
        if cfg.validate_initial and start_epoch == 0 and not history and cfg.validate_every:
            metrics = validate(model, cfg, val_ds, dev)
            row = {"epoch": 0, **{k: v for k, v in metrics.items() if k != "score"}}
            history.append(row)
            if main_rank:
                logger.info(_format_row(row))
            log.write(history)

        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            rng = np.random.default_rng([cfg.seed, epoch])
            tuples = mine_tuples(model, train_ds, query_size=cfg.query_size, pool_size=cfg.pool_size,
                                 negatives=cfg.negatives, image_size=cfg.image_size, rng=rng,
                                 batch_size=cfg.mining_batch_size, num_workers=cfg.workers, device=dev,
                                 amp=amp_dtype is not None and dev.type == "cuda", progress=progress)
            t1 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            loss_sum, n_tuples, n_images = _train_epoch(net, model, tuples, train_paths, cfg, optimizer, scaler,
                                                         loss_fn, dev, amp_dtype, channels_last, world, rank,
                                                         progress, epoch)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t2 = time.perf_counter()
            scheduler.step()
            row = {"epoch": epoch + 1, "loss": loss_sum / max(n_tuples, 1), "lr": lr, "p": _p_value(model),
                   "epoch_s": t2 - t0, "mining_s": t1 - t0, "train_s": t2 - t1,
                   "images_per_s": n_images / max(t2 - t1, 1e-9), "tuples_per_s": n_tuples / max(t2 - t1, 1e-9),
                   "n_tuples": n_tuples, "neg_similarity": tuples.stats.get("neg_similarity", float("nan"))}
            is_best = False
            last_epoch = epoch + 1 == cfg.epochs
            if cfg.validate_every and ((epoch + 1) % cfg.validate_every == 0 or last_epoch):
                metrics = validate(model, cfg, val_ds, dev)
                score = metrics.pop("score")
                row.update(metrics)
                if best["score"] is None or score > best["score"]:
                    best = {"score": score, "epoch": epoch + 1}
                    is_best = True
            history.append(row)
            save(epoch + 1, is_best)
            if main_rank:
                logger.info(_format_row(row))
            log.write(history)
            dist_utils.barrier()
    finally:
        log.close()

    return _export(model, cfg, out, best_path, main_rank, dev)


def _train_epoch(net: nn.Module, model: nn.Module, tuples: Tuples, paths: Sequence[Path], cfg: TrainConfig,
                 optimizer: torch.optim.Optimizer, scaler: Any, loss_fn: nn.Module, dev: torch.device,
                 amp_dtype: torch.dtype | None, channels_last: bool, world: int, rank: int, progress: bool,
                 epoch: int) -> tuple[float, int, int]:
    steps, dropped = _epoch_schedule(len(tuples), cfg, world, rank)
    if dropped:
        logger.info("epoch %d: the last %d tuples do not fill a step across %d process(es) x %d micro-batches; "
                    "they are skipped", epoch + 1, dropped, world, cfg.accumulation)
    order = [t for step in steps for micro in step for t in micro]
    model.train()
    freeze_batchnorm(model)
    ds = _TupleImages(paths, tuples, order, cfg.image_size, model.config.mean, model.config.std)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=cfg.workers,
                                         collate_fn=_collate_one, pin_memory=dev.type == "cuda",
                                         worker_init_fn=_worker_init if cfg.workers > 0 else None,
                                         prefetch_factor=4 if cfg.workers > 0 else None)
    it: Iterator[list[torch.Tensor]] = iter(loader)
    loss_sum = 0.0
    n_images = 0
    bar = tqdm(total=len(steps), disable=not progress, desc=f"epoch {epoch + 1}", unit="step", leave=False)
    try:
        for s, step in enumerate(steps):
            micro = [[next(it) for _ in mb] for mb in step]
            n_images += sum(len(t) for mb in micro for t in mb)
            loss = train_step(net, optimizer, micro, loss_fn, device=dev, amp_dtype=amp_dtype, scaler=scaler,
                              channels_last=channels_last, world_size=world)
            loss_sum += loss
            bar.update(1)
            if cfg.log_every and (s + 1) % cfg.log_every == 0:
                logger.debug("epoch %d step %d/%d loss %.4f", epoch + 1, s + 1, len(steps), loss)
    finally:
        bar.close()
    n_tuples = len(order)
    if world > 1:
        loss_sum, n_tuples, n_images = dist_utils.all_reduce_sum([loss_sum, n_tuples, n_images], dev)
    return loss_sum, int(n_tuples), int(n_images)


def _export(model: nn.Module, cfg: TrainConfig, out: Path, best_path: Path, main_rank: bool,
            dev: torch.device) -> Path:
    """Writes ``model`` (last epoch) and ``model_best``; computes and installs the whitening."""
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
        final = _whiten(final, cfg, out, dev, main_rank)
    if main_rank:
        final.save(target)
        logger.info("exported the trained network to %s", target)
    dist_utils.barrier()
    return target


def _whiten(model: nn.Module, cfg: TrainConfig, out: Path, dev: torch.device, main_rank: bool) -> nn.Module:
    from ..data.sfm120k import WhiteningPairs
    from ..nn.whiten import Whitening, install_whitening, learn_whitening, pca_whitening, strip_whitening

    if cfg.whitening == "lw":
        pairs = WhiteningPairs(cfg.data_root, cfg.whiten_name)
        paths, qidxs, pidxs = pairs.images, pairs.qidxs, pairs.pidxs
    else:
        try:
            pairs = WhiteningPairs(cfg.data_root, cfg.whiten_name)
            paths = pairs.images
        except FileNotFoundError:
            from ..data.sfm120k import SfM120k

            paths = SfM120k(cfg.data_root, "train", name=cfg.db_name).images
        qidxs = pidxs = None
    amp = _amp_dtype(cfg, dev) is not None and dev.type == "cuda"
    with torch.random.fork_rng(devices=[]):
        x = describe(strip_whitening(model).eval(), paths, image_size=cfg.whiten_image_size,
                     batch_size=cfg.mining_batch_size, num_workers=cfg.workers, device=dev, amp=amp,
                     progress=cfg.progress and main_rank, output_device="cpu").float().numpy()
    w: Whitening = learn_whitening(x, qidxs, pidxs) if cfg.whitening == "lw" else pca_whitening(x)
    if main_rank:
        w.save(out / f"whitening_{cfg.whitening}.safetensors")
    logger.info("%s whitening from %d images installed (dim %s)", cfg.whitening, x.shape[0],
                cfg.whiten_dim or x.shape[1])
    return install_whitening(model, w, cfg.whiten_dim)


# ------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``pylandmark train`` options to ``parser``."""
    g = parser.add_argument_group("data and output")
    g.add_argument("--data-root", required=True, help="SfM-120k folder (retrieval-SfM-120k.pkl and ims/)")
    g.add_argument("--out", required=True, help="output folder (checkpoints, logs, exported model)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g = parser.add_argument_group("recipe (defaults: the preset's)")
    g.add_argument("--preset", default="cspdarknet53-gem", choices=sorted(TRAIN_PRESETS),
                   help="named recipe (default cspdarknet53-gem, the paper's network)")
    g.add_argument("--pretrained", help="backbone weights file / URL, or a LandmarkNet directory, to start from")
    g.add_argument("--epochs", type=int)
    g.add_argument("--image-size", type=int, help="longer side of training images (362)")
    g.add_argument("--query-size", type=int, help="tuples mined per epoch (2000)")
    g.add_argument("--pool-size", type=int, help="negative pool size (20000)")
    g.add_argument("--negatives", type=int, help="hard negatives per tuple (5)")
    g.add_argument("--batch-size", type=int, help="tuples per optimiser step (5)")
    g.add_argument("--accumulation", type=int, help="micro-batches per step (gradient accumulation)")
    g.add_argument("--loss", choices=sorted(LOSSES))
    g.add_argument("--margin", type=float)
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--lr-decay", type=float, help="lr x exp(-lr_decay) after every epoch (0.01)")
    g.add_argument("--seed", type=int)
    g = parser.add_argument_group("runtime")
    g.add_argument("--device", help="auto (CUDA when available; the default), cpu, cuda or cuda:N")
    g.add_argument("--amp", choices=AMP_MODES)
    g.add_argument("--workers", type=int, help="image loading processes")
    g.add_argument("--validate-every", type=int, help="epochs between validations (0: never)")
    g.add_argument("--test-root", help="folder with revisited roxford5k / rparis6k for validation")
    g.add_argument("--whitening", choices=WHITENINGS, help="compute this whitening after training and install it")
    g.add_argument("--whiten-dim", type=int)
    g.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (needs tensorboard)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


_ARG_FIELDS = {"epochs": "epochs", "image_size": "image_size", "query_size": "query_size", "pool_size": "pool_size",
               "negatives": "negatives", "batch_size": "batch_size", "accumulation": "accumulation", "loss": "loss",
               "margin": "margin", "lr": "lr", "weight_decay": "weight_decay", "lr_decay": "lr_decay",
               "seed": "seed", "device": "device", "amp": "amp", "workers": "workers",
               "validate_every": "validate_every", "test_root": "test_root", "whitening": "whitening",
               "whiten_dim": "whiten_dim", "pretrained": "pretrained"}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``pylandmark train`` arguments."""
    overrides: dict[str, Any] = {"data_root": args.data_root, "out_dir": args.out}
    for attr, fld in _ARG_FIELDS.items():
        v = getattr(args, attr, None)
        if v is not None:
            overrides[fld] = v
    if getattr(args, "tensorboard", False):
        overrides["tensorboard"] = True
    if getattr(args, "no_progress", False) or getattr(args, "quiet", False):
        overrides["progress"] = False
    return TrainConfig.from_preset(args.preset, **overrides)


def run(args: argparse.Namespace) -> int:
    """``pylandmark train``: trains and prints where the network went."""
    cfg = config_from_args(args)
    path = train(cfg, resume=bool(args.resume))
    if dist_utils.rank() == 0:
        print(f"trained network: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pylandmark.training.loop`` (e.g. under torchrun)."""
    parser = argparse.ArgumentParser(prog="python -m pylandmark.training.loop",
                                     description="Fine-tune a LandmarkNet on SfM-120k.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return run(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"pylandmark train: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
