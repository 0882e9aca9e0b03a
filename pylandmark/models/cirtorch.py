"""Retrieval checkpoints in cirtorch's format -> LandmarkNet.

The format (Radenovic, Tolias, Chum's ``cnnimageretrieval-pytorch``): a dict with

- ``state_dict``: the backbone under ``features.<i>.``, ``i`` indexing the children of
  torchvision's VGG ``features`` (without the last max-pool) or of torchvision's ResNet up to
  ``layer4``; ``pool.p`` (GeM exponent, shape (1,)); ``whiten.weight`` / ``whiten.bias``
  for a whitening layer learned end-to-end (after GeM + L2N, followed by L2N);
- ``meta``: ``architecture``, ``pooling``, ``whitening``, ``local_whitening``, ``regional``,
  ``mean``, ``std``, ``outputdim``, and optionally ``Lw[<name>]['ss' | 'ms'] = {'m', 'P'}``:
  post-hoc learned whitenings as numpy arrays, applied as ``L2N(P (x - m))`` to single-scale
  ('ss') or multi-scale ('ms') descriptors.

Supported: VGG16 and ResNet-50/101/152 with GeM pooling (what the published files use);
regional pooling and local whitening are refused with a clear error.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..nn.whiten import Whitening
from .landmarknet import WHITENING_KINDS, LandmarkNet, LandmarkNetConfig
from .resnet import ResNet
from .serialization import safe_torch_load

__all__ = ["is_cirtorch_checkpoint", "load_cirtorch", "from_cirtorch", "CIRTORCH_ARCHITECTURES"]

logger = logging.getLogger(__name__)

#: cirtorch ``meta['architecture']`` -> our backbone name
CIRTORCH_ARCHITECTURES = {"vgg16": "vgg16", "resnet50": "resnet50", "resnet101": "resnet101",
                          "resnet152": "resnet152"}
_MAX_NAME = 200


def is_cirtorch_checkpoint(obj: Any) -> bool:
    """True for a dict with a ``state_dict`` and a ``meta`` dict that names an architecture."""
    return (isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping)
            and isinstance(obj.get("meta"), Mapping) and "architecture" in obj["meta"])


def load_cirtorch(path: str | Path) -> LandmarkNet:
    """Reads a cirtorch checkpoint file (safely: tensors, containers and numpy float arrays only)
    and returns the equivalent :class:`LandmarkNet` (train mode, on the CPU)."""
    obj = safe_torch_load(path)
    if not is_cirtorch_checkpoint(obj):
        raise ValueError(f"{path} is not a cirtorch retrieval checkpoint (a dict with 'state_dict' and "
                         "'meta' naming the architecture)")
    return from_cirtorch(obj, source=str(path))


def _flag(meta: Mapping[str, Any], key: str, source: str) -> bool:
    value = meta.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"{source}: meta[{key!r}] must be True or False, got {value!r}")
    return value


def _triple(meta: Mapping[str, Any], key: str, source: str) -> tuple[float, float, float]:
    value = meta.get(key)
    try:
        out = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(math.isfinite(v) for v in out):
        raise ValueError(f"{source}: meta[{key!r}] must be 3 numbers (R, G, B), got {value!r}")
    return out


def _config(meta: Mapping[str, Any], state: Mapping[str, Any], source: str) -> LandmarkNetConfig:
    arch = meta.get("architecture")
    if arch not in CIRTORCH_ARCHITECTURES:
        raise ValueError(f"{source}: architecture {arch!r} is not supported; pylandmark reads cirtorch "
                         f"networks with {', '.join(CIRTORCH_ARCHITECTURES)}")
    pooling = meta.get("pooling")
    if pooling != "gem":
        raise ValueError(f"{source}: pooling {pooling!r} is not supported; pylandmark implements GeM "
                         "(cirtorch pooling 'gem')")
    for key in ("regional", "local_whitening"):
        if _flag(meta, key, source):
            raise ValueError(f"{source}: meta[{key!r}] is True; pylandmark does not implement "
                             f"cirtorch's {key.replace('_', ' ')} (only GeM + optional whitening)")
    p = state.get("pool.p")
    if not isinstance(p, torch.Tensor) or p.numel() != 1 or not p.is_floating_point():
        raise ValueError(f"{source}: state_dict['pool.p'] must be the GeM exponent (one float), got "
                         f"{type(p).__name__ if not isinstance(p, torch.Tensor) else tuple(p.shape)}")
    p_value = float(p.reshape(()))
    if not (math.isfinite(p_value) and p_value > 0):
        raise ValueError(f"{source}: the GeM exponent pool.p must be a finite number > 0, got {p_value}")
    whitening = _flag(meta, "whitening", source)
    has_layer = "whiten.weight" in state
    if whitening != has_layer:
        raise ValueError(f"{source}: meta['whitening'] is {whitening} but the state_dict "
                         f"{'has' if has_layer else 'has no'} whiten.weight")
    whiten_dim = None
    if whitening:
        w = state["whiten.weight"]
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError(f"{source}: whiten.weight must be a (d, D) matrix")
        if w.shape[0] != w.shape[1]:  # a square layer is the config's default size
            whiten_dim = int(w.shape[0])
    return LandmarkNetConfig(backbone=CIRTORCH_ARCHITECTURES[arch], p=p_value, whitening=whitening,
                             whiten_dim=whiten_dim, mean=_triple(meta, "mean", source),
                             std=_triple(meta, "std", source))


def _target_key(key: str, children: tuple[str, ...] | None) -> str | None:
    """cirtorch key -> our LandmarkNet key (None: not a key we know)."""
    if key in ("pool.p", "whiten.weight", "whiten.bias"):
        return key
    parts = key.split(".", 2)
    if len(parts) != 3 or parts[0] != "features" or not parts[1].isdigit():
        return None
    if children is None:  # VGG: our backbone keeps the features.<i> names
        return f"backbone.{key}"
    i = int(parts[1])
    return f"backbone.{children[i]}.{parts[2]}" if i < len(children) else None


def _whitenings(lw: Any, dim: int, source: str) -> dict[str, dict[str, Any]]:
    import numpy as np

    if lw is None:
        return {}
    if not isinstance(lw, Mapping):
        raise ValueError(f"{source}: meta['Lw'] must be a dict of whitenings, got {type(lw).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for name, kinds in lw.items():
        if not isinstance(name, str) or not name or len(name) > _MAX_NAME:
            raise ValueError(f"{source}: meta['Lw'] has an invalid whitening name {name!r}")
        if not isinstance(kinds, Mapping):
            raise ValueError(f"{source}: meta['Lw'][{name!r}] must be a dict with 'ss' and/or 'ms'")
        for kind, entry in kinds.items():
            if kind not in WHITENING_KINDS:
                logger.warning("%s: ignoring meta['Lw'][%r][%r] (only 'ss' and 'ms' are used)", source, name, kind)
                continue
            if not isinstance(entry, Mapping) or not all(isinstance(entry.get(k), np.ndarray) for k in "mP"):
                raise ValueError(f"{source}: meta['Lw'][{name!r}][{kind!r}] must hold numpy arrays 'm' and 'P'")
            m, proj = entry["m"], entry["P"]
            if m.size != dim or proj.ndim != 2 or proj.shape[1] != dim or not 1 <= proj.shape[0] <= dim:
                raise ValueError(f"{source}: meta['Lw'][{name!r}][{kind!r}] has m {m.shape} and P {proj.shape}; "
                                 f"expected m of size {dim} and P of shape (d <= {dim}, {dim})")
            if m.dtype.kind != "f" or proj.dtype.kind != "f" or not (np.isfinite(m).all() and np.isfinite(proj).all()):
                raise ValueError(f"{source}: meta['Lw'][{name!r}][{kind!r}] must hold finite float arrays")
            out.setdefault(name, {})[kind] = Whitening(m.reshape(-1), proj, "lw")
    return out


def from_cirtorch(checkpoint: Mapping[str, Any], source: str = "<checkpoint>") -> LandmarkNet:
    """The :class:`LandmarkNet` equal to a cirtorch network given as its checkpoint dict.

    Every tensor of the network must be in the checkpoint and every checkpoint tensor must have
    a place (BatchNorm ``num_batches_tracked`` excepted: files from old torch versions lack it);
    shapes must match. Precomputed Lw whitenings go to :attr:`LandmarkNet.whitenings`.
    """
    if not is_cirtorch_checkpoint(checkpoint):
        raise ValueError(f"{source}: not a cirtorch checkpoint (a dict with 'state_dict' and 'meta')")
    meta, raw = checkpoint["meta"], checkpoint["state_dict"]
    cfg = _config(meta, raw, source)
    net = LandmarkNet(cfg)
    children = tuple(ResNet.cirtorch_features) if isinstance(net.backbone, ResNet) else None
    own = net.state_dict()
    state: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for key, value in raw.items():
        target = _target_key(str(key), children)
        if target is None or target not in own or not isinstance(value, torch.Tensor):
            unexpected.append(str(key))
        elif tuple(value.shape) != tuple(own[target].shape):
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(own[target].shape)}")
        else:
            state[target] = value.to(own[target].dtype)
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if unexpected or mismatched or missing:
        def some(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" ... ({len(keys) - 5} more)" if len(keys) > 5 else "")

        problems = [f"{name} {len(keys)}: {some(keys)}" for name, keys in
                    (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys]
        raise ValueError(f"{source}: the state_dict does not fit a cirtorch {meta['architecture']} GeM network "
                         f"({'; '.join(problems)})")
    net.load_state_dict(state, strict=False)
    outputdim = meta.get("outputdim")
    if outputdim is not None and outputdim != net.dim:
        raise ValueError(f"{source}: meta['outputdim'] is {outputdim!r} but the network gives {net.dim}-d descriptors")
    net.whitenings = _whitenings(meta.get("Lw"), net.dim, source)
    logger.info("loaded cirtorch %s-gem (p %.4f, %s, %d-d%s) from %s", meta["architecture"], cfg.p,
                "whitening layer" if cfg.whitening else "no whitening layer", net.dim,
                f"; Lw: {', '.join(net.whitenings)}" if net.whitenings else "", source)
    return net
