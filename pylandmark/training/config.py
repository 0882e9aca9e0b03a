"""The training configuration (:class:`TrainConfig`), its named recipes (:data:`TRAIN_PRESETS`),
and the runtime it resolves to (device, mixed precision)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from ..config import JsonConfig
from ..nn.losses import LOSSES

__all__ = ["TrainConfig", "TRAIN_PRESETS", "AMP_MODES", "WHITENINGS", "RUNTIME_FIELDS", "resolve_device",
           "autocast_dtype"]

AMP_MODES = ("auto", "float16", "bfloat16", "off")
WHITENINGS = ("lw", "pca")

# fields that may differ between a run and its resumption (they do not change the recipe)
RUNTIME_FIELDS = {"epochs", "device", "workers", "progress", "tensorboard", "validate_every",
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


#: Named recipes. ``cspdarknet53-gem``: the paper's network with the reference recipe;
#: ``resnet101-gem``: the reference command (ResNet-101 GeM, contrastive margin 0.85, Adam
#: lr 5e-7, weight decay 1e-6, 100 epochs); ``test``: a tiny 3-stage CSPDarknet (stride 8) with a
#: trainable whitening layer, for CPU tests and the synthetic example: 96 px images, small mining,
#: and, since it starts from random weights rather than ImageNet ones, a larger lr annealed
#: faster (x exp(-0.3) per epoch).
TRAIN_PRESETS = TrainConfig.presets
TRAIN_PRESETS.register("cspdarknet53-gem", TrainConfig())
TRAIN_PRESETS.register("resnet101-gem", TrainConfig(model="resnet101-gem"))
TRAIN_PRESETS.register("test", TrainConfig(
    model="cspdarknet53-gem-lw",
    model_args={"backbone_args": {"stem_chs": 12, "depths": [1, 1, 1], "out_chs": [24, 48, 96],
                                  "expand_ratio": [2.0, 1.0, 1.0], "bottle_ratio": [0.5, 1.0, 1.0]}},
    image_size=96, query_size=96, pool_size=192, negatives=3, epochs=8, batch_size=4, lr=2e-3,
    lr_decay=0.3, margin=0.7, workers=0, mining_batch_size=32, val_image_size=96, test_image_size=96,
    whiten_image_size=96, progress=False))


def resolve_device(spec: str) -> torch.device:
    # under torchrun every process drives the GPU of its LOCAL_RANK
    local = int(os.environ.get("LOCAL_RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    if spec == "auto":
        return torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device is {spec!r} but torch sees no CUDA device; use device='cpu'")
        if dev.index is None:
            dev = torch.device("cuda", local)
    return dev


def autocast_dtype(cfg: TrainConfig, dev: torch.device) -> torch.dtype | None:
    mode = cfg.amp
    if mode == "auto":
        mode = "float16" if dev.type == "cuda" else "off"
    if mode == "off":
        return None
    return torch.float16 if mode == "float16" else torch.bfloat16
