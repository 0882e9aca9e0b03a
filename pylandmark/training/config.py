"""The training configuration (:class:`TrainConfig`), its named recipes (:data:`TRAIN_PRESETS`),
and the runtime it resolves to (device, mixed precision)."""
from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .._checks import check_int, check_number
from ..config import JsonConfig
from ..nn.losses import CLASSIFICATION_LOSSES, LOSSES

__all__ = ["TrainConfig", "TRAIN_PRESETS", "AMP_MODES", "WHITENINGS", "RUNTIME_FIELDS", "GROUPS", "FieldKind",
           "field_kind", "resolve_device", "autocast_dtype"]

AMP_MODES = ("auto", "float16", "bfloat16", "off")
WHITENINGS = ("lw", "pca")

# argument groups of `pylandmark train --help`, in this order
GROUPS = {"data": "data and output", "recipe": "recipe (defaults: the preset's)", "runtime": "runtime",
          "validation": "validation", "whitening": "whitening (after training, installed into the exported model)"}


def _opt(default: Any, help: str, group: str, *, runtime: bool = False, factory: Any = None,
         **checks: Any) -> Any:
    """A TrainConfig field. ``help`` and ``group`` make its ``pylandmark train`` option; ``runtime``
    fields may change when a run is resumed (they do not change the recipe); ``checks`` are the
    bounds :meth:`TrainConfig.__post_init__` applies (``minimum``, ``above``), and ``choices``,
    ``flag`` (the option name when it is not ``--field-name``) and ``required`` (on the command
    line) shape the option."""
    meta = {"help": help, "group": group, "runtime": runtime, **checks}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig(JsonConfig):
    """Everything a training run needs; the defaults are the paper's recipe (REFERENCE §1) with
    the paper's network (CSPDarknet-53 + GeM) and the reference command's margin and lr.

    Each field's meaning, bounds and command-line option are in its metadata (``help``, shown by
    ``pylandmark train --help``). The groups: data and output (``data_root``, ``out_dir``,
    ``db_name``, ``progress``, ``tensorboard``, ``log_every``); the recipe (network ``model`` /
    ``model_args`` / ``pretrained``, mining sizes ``image_size`` / ``query_size`` / ``pool_size``
    / ``negatives``, loss and Adam settings, ``epochs``, ``batch_size``, ``accumulation``,
    ``seed``); the runtime (``device``, ``amp``, ``channels_last``, ``workers``,
    ``mining_batch_size``); validation (``validate_every``, revisited ``test_root`` or the SfM
    val split); whitening computed after training (``whitening``: None, "lw" or "pca").
    """

    data_root: str = _opt("", "training photos: an SfM-120k folder (retrieval-SfM-120k.pkl and ims/) or class "
                          "folders (<root>/<landmark>/<image>), recognised by what they hold; with --data-csv or "
                          "--colmap, the folder the images are under", "data", runtime=True, required=True)
    data_csv: str | None = _opt(None, "a landmark list: Google Landmarks v2 (id,landmark_id; images at "
                                "<data-root>/<a>/<b>/<c>/<id>.jpg) or path,label (paths under --data-root)", "data")
    colmap: str | None = _opt(None, "a COLMAP model (sparse/0: cameras, images, points3D; text or binary) of the "
                              "photos under --data-root, made into SfM-120k-format pairs under <out>/colmap-data "
                              "(needs pycolmap)", "data")
    colmap_min_shared: int = _opt(15, "COLMAP: 3D points two photos must share to be joined (clusters) or paired",
                                  "data", minimum=1)
    colmap_min_overlap: float = _opt(0.2, "COLMAP: share of the query's 3D points a positive must see (t_i)", "data",
                                     minimum=0, above=True)
    colmap_max_scale_change: float = _opt(1.5, "COLMAP: largest scale change between a query and its positive "
                                          "(t_s)", "data", minimum=1)
    bad_images: str = _opt("stop", "listed image files that are missing or not images: stop with an error "
                           "naming the first, or skip them with a count", "data", choices=("stop", "skip"))
    out_dir: str = _opt("runs/sfm120k", "output folder (checkpoints, logs, exported model)", "data",
                        runtime=True, required=True, flag="--out")
    db_name: str = _opt("retrieval-SfM-120k", "base name of the db pickle", "data")
    image_size: int = _opt(362, "longer side of training images (never upscaled)", "recipe", minimum=1)
    query_size: int = _opt(2000, "tuples mined per epoch", "recipe", minimum=1)
    pool_size: int = _opt(20000, "negative pool size", "recipe", minimum=1)
    negatives: int = _opt(5, "hard negatives per tuple", "recipe", minimum=1)
    positives: int = _opt(5, "labelled photos: (query, positive) pairs per photo, positives drawn among the "
                          "other photos of its landmark", "recipe", minimum=1)
    model: str = _opt("cspdarknet53-gem", "LandmarkNet preset (pylandmark.models.LANDMARKNET_PRESETS)", "recipe")
    model_args: dict[str, Any] = _opt(None, "LandmarkNetConfig fields to override, as a JSON object "
                                      '(e.g. \'{"backbone_args": {"depths": [1, 1, 1, 1, 1]}}\')', "recipe",
                                      factory=dict)
    pretrained: str | None = _opt(None, "backbone weights file / URL, or a LandmarkNet directory, to start from "
                                  "(none: random weights)", "recipe")
    loss: str = _opt("contrastive", "tuple loss (contrastive, triplet: over mined tuples), or arcface: "
                     "additive angular margin over the landmarks as classes, through a head dropped at export "
                     "(each epoch trains query_size images, no mining)", "recipe",
                     choices=(*sorted(LOSSES), *CLASSIFICATION_LOSSES))
    margin: float = _opt(0.85, "loss margin (the code's default is 0.7; arcface: the angle in radians, "
                         "at most pi/2)", "recipe", minimum=0)
    arcface_scale: float = _opt(30.0, "arcface: the logits' scale s", "recipe", minimum=0, above=True)
    lr: float = _opt(5e-7, "base learning rate of Adam (the code's default is 1e-6)", "recipe", minimum=0,
                     above=True)
    p_lr_mult: float = _opt(10.0, "learning rate factor of GeM's p", "recipe", minimum=0, above=True)
    weight_decay: float = _opt(1e-6, "Adam weight decay (not applied to p)", "recipe", minimum=0)
    lr_decay: float = _opt(0.01, "lr x exp(-lr_decay) after every epoch", "recipe", minimum=0)
    epochs: int = _opt(100, "epochs to train", "recipe", runtime=True, minimum=1)
    batch_size: int = _opt(5, "tuples per optimiser step", "recipe", minimum=1)
    accumulation: int = _opt(1, "micro-batches per step (gradient accumulation; batch_size must be divisible "
                             "by accumulation x processes)", "recipe", minimum=1)
    device: str = _opt("auto", "auto (CUDA when available), cpu, cuda or cuda:N", "runtime", runtime=True)
    amp: str = _opt("auto", "mixed precision (auto: float16 on CUDA, off on the CPU)", "runtime",
                    choices=AMP_MODES)
    channels_last: bool | None = _opt(None, "channels_last memory format (default: on for CUDA)", "runtime")
    workers: int = _opt(4, "image loading processes (training and mining)", "runtime", runtime=True, minimum=0)
    mining_batch_size: int = _opt(32, "images per forward pass while mining / validating", "runtime",
                                  runtime=True, minimum=1)
    seed: int = _opt(0, "seeds everything; the epoch's pairs and pool come from default_rng([seed, epoch])",
                     "recipe", minimum=0)
    validate_every: int = _opt(1, "epochs between validations (0: never)", "validation", runtime=True,
                               minimum=0)
    val_fraction: float = _opt(0.1, "labelled photos: the share of every landmark held out (seeded) to "
                               "validate on (recognition accuracy by top-5 vote and mAP against the rest); "
                               "landmarks too small to keep two photos stay whole", "validation", minimum=0)
    validate_initial: bool = _opt(False, "also validate before the first epoch", "validation", runtime=True)
    val_queries: int | None = _opt(None, "cap on the validation queries: SfM val pairs, or held-out photos (a "
                                   "seeded sample; default: all, or as many as rank 2^32 (query, photo) pairs)",
                                   "validation", runtime=True, minimum=1)
    val_image_size: int | None = _opt(None, "size of the SfM val images (default: image_size)", "validation",
                                      runtime=True, minimum=1)
    recall_ks: tuple[int, ...] = _opt((1, 5, 10), "k of the SfM val recall@k", "validation", runtime=True,
                                      minimum=1)
    test_root: str | None = _opt(None, "folder with revisited roxford5k / rparis6k (validates on them when "
                                 "present)", "validation", runtime=True)
    test_datasets: tuple[str, ...] = _opt(("roxford5k", "rparis6k"), "revisited datasets to validate on",
                                          "validation", runtime=True)
    test_image_size: int = _opt(1024, "size of the revisited images", "validation", runtime=True, minimum=1)
    whitening: str | None = _opt(None, "compute this whitening after training and install it", "whitening",
                                 runtime=True, choices=WHITENINGS)
    whiten_dim: int | None = _opt(None, "output size of the whitening (default: the descriptor size)",
                                  "whitening", runtime=True, minimum=1)
    whiten_name: str = _opt("retrieval-SfM-120k-whiten", "base name of the whitening pairs pickle", "whitening",
                            runtime=True)
    whiten_image_size: int = _opt(1024, "size of the whitening images", "whitening", runtime=True, minimum=1)
    progress: bool = _opt(True, "progress bars", "data", runtime=True)
    tensorboard: bool = _opt(False, "also log to TensorBoard (needs the tensorboard package)", "data",
                             runtime=True)
    log_every: int = _opt(0, "steps between debug log lines (0: none)", "data", runtime=True, minimum=0)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _checked(f, getattr(self, f.name)))
        if self.loss in CLASSIFICATION_LOSSES and self.margin > 1.5707963267948966:
            raise ValueError(f"margin must be at most pi/2 for the arcface loss (an angle), got {self.margin}")
        if self.val_fraction >= 1:
            raise ValueError(f"val_fraction must be below 1 (a share of every landmark), got {self.val_fraction}")
        if self.data_csv and self.colmap:
            raise ValueError("data_csv and colmap both name the training data; give one")
        if self.batch_size % self.accumulation:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by accumulation "
                             f"({self.accumulation}): each micro-batch holds batch_size / accumulation tuples")
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu", "cuda")
                                                    or self.device.startswith("cuda:")):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if not isinstance(self.model_args, Mapping):
            raise TypeError("model_args must be a dict of LandmarkNetConfig fields, got "
                            f"{type(self.model_args).__name__}")
        self.model_args = dict(self.model_args)
        from ..models import LANDMARKNET_PRESETS

        if self.model not in LANDMARKNET_PRESETS:
            raise ValueError(f"model must be a LandmarkNet preset, one of {sorted(LANDMARKNET_PRESETS)}; "
                             f"got {self.model!r}")
        self.test_datasets = tuple(str(d) for d in self.test_datasets)
        for n in ("data_root", "out_dir"):
            v = getattr(self, n)
            if isinstance(v, os.PathLike):
                setattr(self, n, os.fspath(v))
            elif not isinstance(v, str):
                raise TypeError(f"{n} must be a path, got {type(v).__name__}")
        for n in ("test_root", "pretrained", "data_csv", "colmap"):
            v = getattr(self, n)
            if isinstance(v, os.PathLike):
                setattr(self, n, os.fspath(v))


def _checked(f: dataclasses.Field, v: Any) -> Any:
    """``v`` checked against the bounds and choices in the metadata of field ``f``."""
    kind, none_ok, _ = field_kind(f)
    minimum = f.metadata.get("minimum")
    if minimum is not None and kind is float:
        v = check_number(v, f.name, minimum=minimum, above=f.metadata.get("above", False), none_ok=none_ok)
    elif minimum is not None and kind is tuple:
        items = () if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__") else tuple(v)
        if not items:
            raise ValueError(f"{f.name} must be a non-empty sequence of ints, got {v!r}")
        v = tuple(check_int(x, f.name, minimum=minimum) for x in items)
    elif minimum is not None:
        v = check_int(v, f.name, minimum=minimum, none_ok=none_ok)
    choices = f.metadata.get("choices")
    if choices is not None and v not in choices and not (v is None and none_ok):
        raise ValueError(f"{f.name} must be one of {list(choices)}{' or None' if none_ok else ''}, got {v!r}")
    return v


class FieldKind(NamedTuple):
    """What a TrainConfig field holds: ``base`` (int, float, str, bool, tuple or dict), whether
    None is allowed, and for tuples the type of the items."""

    base: type
    none_ok: bool
    item: type | None


def field_kind(f: dataclasses.Field) -> FieldKind:
    """The :class:`FieldKind` of a TrainConfig field, from its annotation."""
    return _FIELD_KINDS[f.name]


def _kinds() -> dict[str, FieldKind]:
    out = {}
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        args = typing.get_args(hint)
        none_ok = type(None) in args
        base = next(a for a in args if a is not type(None)) if none_ok else hint
        origin = typing.get_origin(base) or base
        item = typing.get_args(base)[0] if origin is tuple else None
        out[f.name] = FieldKind(origin, none_ok, item)
    return out


_FIELD_KINDS = _kinds()

#: fields that may differ between a run and its resumption (they do not change the recipe)
RUNTIME_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["runtime"])


#: Named recipes. ``cspdarknet53-gem``: the paper's network with the reference recipe;
#: ``resnet101-gem``: the reference command (ResNet-101 GeM, contrastive margin 0.85, Adam
#: lr 5e-7, weight decay 1e-6, 100 epochs); ``test``: a tiny 3-stage CSPDarknet (stride 8) with a
#: trainable whitening layer, for CPU tests and the synthetic example: 96 px images, small mining,
#: and, since it starts from random weights rather than ImageNet ones, a larger lr annealed
#: faster (x exp(-0.3) per epoch).
TRAIN_PRESETS = TrainConfig.presets
TRAIN_PRESETS.register("cspdarknet53-gem", TrainConfig())
TRAIN_PRESETS.register("resnet101-gem", TrainConfig(model="resnet101-gem"))
#: ``cspdarknet53-gem-arcface``: the paper's network trained as a classifier of the landmarks
#: (labelled photos) with ArcFace, a starting point rather than a tuned recipe: margin 0.15 rad
#: (DELG trains GLDv2 with 0.1), scale 30, 32 images per step, 10,000 per epoch, Adam at 1e-5
TRAIN_PRESETS.register("cspdarknet53-gem-arcface", TrainConfig(loss="arcface", margin=0.15, arcface_scale=30.0,
                                                               batch_size=32, query_size=10000, lr=1e-5))
TRAIN_PRESETS.register("test", TrainConfig(
    model="cspdarknet53-gem-lw",
    model_args={"backbone_args": {"stem_chs": 12, "depths": [1, 1, 1], "out_chs": [24, 48, 96],
                                  "expand_ratio": [2.0, 1.0, 1.0], "bottle_ratio": [0.5, 1.0, 1.0]}},
    image_size=96, query_size=96, pool_size=192, negatives=3, epochs=8, batch_size=4, lr=2e-3,
    lr_decay=0.3, margin=0.7, workers=0, mining_batch_size=32, val_image_size=96, test_image_size=96,
    whiten_image_size=96, progress=False))


def resolve_device(spec: str) -> torch.device:
    """The training device: the shared parser (auto, cpu, cuda, cuda:N), where under torchrun
    every process drives the GPU of its LOCAL_RANK."""
    from ..runtime import rank_device

    return rank_device(spec)


def autocast_dtype(cfg: TrainConfig, dev: torch.device) -> torch.dtype | None:
    mode = cfg.amp
    if mode == "auto":
        mode = "float16" if dev.type == "cuda" else "off"
    if mode == "off":
        return None
    return torch.float16 if mode == "float16" else torch.bfloat16
