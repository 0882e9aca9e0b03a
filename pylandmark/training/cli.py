"""``pylandmark train`` and ``python -m pylandmark.training``: options, config, run."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Sequence

from .. import distributed as dist_utils
from ..nn.losses import LOSSES
from .config import AMP_MODES, TRAIN_PRESETS, WHITENINGS, TrainConfig
from .loop import train

__all__ = ["add_arguments", "config_from_args", "run", "main"]


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
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N")
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
    """Entry point of ``python -m pylandmark.training`` (e.g. under torchrun)."""
    parser = argparse.ArgumentParser(prog="python -m pylandmark.training",
                                     description="Fine-tune a LandmarkNet on SfM-120k.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return run(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"pylandmark train: error: {err}", file=sys.stderr)
        return 2

