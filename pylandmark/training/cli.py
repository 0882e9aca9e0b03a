"""``pylandmark train`` and ``python -m pylandmark.training``: options, config, run."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from .. import runtime as dist_utils
from .config import GROUPS, TRAIN_PRESETS, TrainConfig, field_kind
from .loop import train

__all__ = ["add_arguments", "config_from_args", "run", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the ``pylandmark train`` options to ``parser``: ``--preset``, ``--resume`` and one
    option per :class:`TrainConfig` field, made from the field's type, default and metadata."""
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    groups["data"].add_argument("--resume", action="store_true",
                                help="continue the run in --out from its last checkpoint")
    groups["recipe"].add_argument("--preset", default="cspdarknet53-gem", choices=sorted(TRAIN_PRESETS),
                                  help="named recipe (default cspdarknet53-gem, the paper's network)")
    defaults = TRAIN_PRESETS["cspdarknet53-gem"]
    for f in dataclasses.fields(TrainConfig):
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        groups[f.metadata["group"]].add_argument(flag, **_option(f, getattr(defaults, f.name)))


def _option(f: dataclasses.Field, default: Any) -> dict[str, Any]:
    """argparse keywords of the option of field ``f``; the parsed value is None when the option
    is not given, so the preset's value stays."""
    kind = field_kind(f)
    help_text = f.metadata["help"]
    if not f.metadata.get("required") and default is not None and default != {}:
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        help_text += f" (cspdarknet53-gem: {shown})"
    kw: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
    if f.metadata.get("required"):
        kw["required"] = True
    if kind.base is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif kind.base is tuple:
        kw.update(nargs="+", type=kind.item)
    elif kind.base is dict:
        kw["type"] = _json_object
    else:
        kw["type"] = kind.base
    if "choices" in f.metadata:
        kw["choices"] = f.metadata["choices"]
    return kw


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err})") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object {{...}}, got {text!r}")
    return value


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``pylandmark train`` arguments: the preset with the
    options that were given."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    if getattr(args, "quiet", False):
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
                                     description="Fine-tune a LandmarkNet on SfM-120k, labelled photos or a "
                                                 "COLMAP model.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return run(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"pylandmark train: error: {err}", file=sys.stderr)
        return 2

