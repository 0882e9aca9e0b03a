"""Training checkpoints: atomic writes, tensors-only contents, and the random number generators.

A checkpoint is one ``torch.save`` file holding only tensors, state_dicts (tensors and plain
numbers, strings, lists, dicts) and a JSON string; it is read back with ``weights_only=True``,
so loading one never runs code. The write goes to a temporary file in the same folder, is
flushed to disk, and replaces the target with ``os.replace``: a crash leaves either the old or
the new checkpoint, never a torn one.

:func:`rng_state` / :func:`set_rng_state` capture and restore the torch (CPU and every CUDA
device), numpy (legacy global) and Python ``random`` generators, so that a resumed run draws
the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._files import replaced_atomically

__all__ = ["rng_state", "set_rng_state", "save_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT"]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "pylandmark.TrainCheckpoint"
CHECKPOINT_VERSION = 1


def rng_state() -> dict[str, Any]:
    """The state of the torch, CUDA, numpy and Python generators, as tensors and JSON-able values."""
    np_state: Any = np.random.get_state(legacy=True)  # ("MT19937", keys, pos, has_gauss, cached)
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [s.cpu() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64).copy()),
        "numpy_meta": json.dumps([np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]),
        "python": json.dumps([py_state[0], list(py_state[1]), py_state[2]]),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restores the generators from :func:`rng_state`'s output."""
    missing = [k for k in ("torch", "numpy_keys", "numpy_meta", "python") if k not in state]
    if missing:
        raise ValueError(f"state lacks {missing}; pass the dict rng_state() returned")
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    cuda = list(state.get("cuda") or [])
    if cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in cuda])
        else:
            logger.warning("checkpoint has CUDA generator states for %d devices, this machine has %d; "
                           "they are not restored", len(cuda),
                           torch.cuda.device_count() if torch.cuda.is_available() else 0)
    name, pos, has_gauss, cached = json.loads(state["numpy_meta"])
    keys = state["numpy_keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((name, keys, int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(path: str | os.PathLike, contents: Mapping[str, Any], meta: Mapping[str, Any]) -> Path:
    """Writes ``contents`` (tensors / state_dicts) and ``meta`` (JSON-serialisable) atomically.

    Args:
        path: the checkpoint file; its folder is created.
        contents: e.g. ``{"model": ..., "optimizer": ..., "rng": rng_state()}``.
        meta: e.g. ``{"epoch": 3, "config": {...}}``; stored as a JSON string.

    Returns:
        ``path``.
    """
    p = Path(path)
    if "meta_json" in contents or "format" in contents:
        raise ValueError("contents must not use the reserved keys 'meta_json' and 'format'")
    try:
        meta_json = json.dumps(meta, allow_nan=True)
    except (TypeError, ValueError) as err:
        raise TypeError(f"meta must be JSON-serialisable: {err}") from err
    obj = dict(contents)
    obj["format"] = f"{CHECKPOINT_FORMAT}/{CHECKPOINT_VERSION}"
    obj["meta_json"] = meta_json
    with replaced_atomically(p, durable=True) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    return p


def load_checkpoint(path: str | os.PathLike,
                    map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads a checkpoint written by :func:`save_checkpoint` (tensors only, no code runs).

    Returns:
        ``(contents, meta)``.

    Raises:
        FileNotFoundError: no file; ValueError: not a pylandmark training checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    try:
        obj = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{p} is not a readable tensors-only checkpoint: {err}") from err
    fmt = obj.get("format", "") if isinstance(obj, dict) else ""
    if not isinstance(fmt, str) or not fmt.startswith(CHECKPOINT_FORMAT + "/"):
        raise ValueError(f"{p} is not a pylandmark training checkpoint (format tag {fmt!r})")
    version = int(fmt.rsplit("/", 1)[1])
    if version > CHECKPOINT_VERSION:
        raise ValueError(f"{p} has checkpoint version {version}; this pylandmark reads up to "
                         f"{CHECKPOINT_VERSION}: upgrade pylandmark")
    meta = json.loads(obj.pop("meta_json"))
    obj.pop("format")
    return obj, meta
