"""Model surgery with whitenings: a LandmarkNet without its whitening layer, one with a
:class:`~pylandmark.nn.whiten.Whitening` installed as that layer, and the post-hoc whitening
to apply to a network's descriptors (:func:`select_whitening`, used by
:func:`pylandmark.extract`).

The whitening arithmetic itself (learning, PCA, applying) is in :mod:`pylandmark.nn.whiten`;
this module sits above both it and :mod:`pylandmark.models.landmarknet`.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from .._checks import check_int
from ..nn.whiten import Whitening
from .landmarknet import LandmarkNet

__all__ = ["strip_whitening", "install_whitening", "select_whitening"]


def strip_whitening(model: Any) -> Any:
    """A copy of a LandmarkNet without its whitening layer (descriptors = GeM + L2N), on the
    model's device; the model itself is unchanged."""
    if not isinstance(model, LandmarkNet):
        raise TypeError(f"model must be a LandmarkNet, got {type(model).__name__}")
    cfg = dataclasses.replace(model.config, whitening=False, whiten_dim=None)
    out = LandmarkNet(cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("whiten.")}
    out.load_state_dict(state, strict=True)
    dev = next(model.parameters()).device
    return out.to(dev).train(model.training)


def install_whitening(model: Any, whitening: Whitening, dim: int | None = None) -> Any:
    """A new LandmarkNet equal to ``model`` followed by ``whitening``: its whitening layer gets
    ``weight = P[:dim]`` and ``bias = -P[:dim] m`` (``dim`` defaults to the full size).

    The whitening must have been computed on the descriptors of ``model`` without its own
    whitening layer (:func:`strip_whitening`); an existing layer is replaced.
    """
    if not isinstance(model, LandmarkNet):
        raise TypeError(f"model must be a LandmarkNet, got {type(model).__name__}")
    if not isinstance(whitening, Whitening):
        raise TypeError(f"whitening must be a Whitening, got {type(whitening).__name__}")
    feat = int(model.backbone.num_features)
    if whitening.dim != feat:
        raise ValueError(f"whitening is for D={whitening.dim} descriptors but the model's pooled "
                         f"descriptors have D={feat}")
    d = check_int(dim, "dim", minimum=1, maximum=whitening.projection.shape[0], none_ok=True)
    d = whitening.projection.shape[0] if d is None else d
    cfg = dataclasses.replace(model.config, whitening=True, whiten_dim=None if d == feat else d)
    out = LandmarkNet(cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("whiten.")}
    missing, unexpected = out.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("whiten.") for k in missing):
        raise ValueError(f"model state does not fit: missing {missing}, unexpected {unexpected}")
    p = whitening.projection[:d]
    assert out.whiten is not None  # built with whitening=True
    with torch.no_grad():
        out.whiten.weight.copy_(torch.from_numpy(p).to(out.whiten.weight.dtype))
        out.whiten.bias.copy_(torch.from_numpy(-p @ whitening.mean).to(out.whiten.bias.dtype))
    dev = next(model.parameters()).device
    return out.to(dev).train(model.training)


def select_whitening(model: Any, whitening: Any, multiscale: bool) -> Whitening | None:
    """The post-hoc whitening to apply to ``model``'s descriptors.

    Args:
        model: the network (its ``whitenings``, ``{name: {"ss" | "ms": Whitening}}``, are
            looked up by name; its ``dim`` is checked).
        whitening: None (none), a :class:`Whitening`, the name of one of the model's
            precomputed whitenings (e.g. cirtorch's ``"retrieval-SfM-120k"``), or the path of a
            file written by :meth:`Whitening.save`.
        multiscale: picks the multi-scale ("ms") or single-scale ("ss") variant of a named one.
    """
    if whitening is None:
        return None
    held = getattr(model, "whitenings", None) or {}
    if isinstance(whitening, Whitening):
        w = whitening
    elif isinstance(whitening, (str, os.PathLike)):
        name = str(whitening)
        kind = "ms" if multiscale else "ss"
        if name in held:
            if kind not in held[name]:
                raise ValueError(f"whitening {name!r} of this network has no {kind!r} ("
                                 f"{'multi' if multiscale else 'single'}-scale) variant, only "
                                 f"{sorted(held[name])}; change the number of scales")
            w = held[name][kind]
        elif Path(name).expanduser().is_file():
            w = Whitening.load(Path(name).expanduser())
        else:
            names = ", ".join(sorted(held)) or "none"
            raise ValueError(f"whitening {name!r} is neither a precomputed whitening of this network "
                             f"(it has: {names}) nor a whitening file written by Whitening.save()")
    else:
        raise TypeError(f"whitening must be None, a Whitening, a name or a file path, got "
                        f"{type(whitening).__name__}")
    dim = getattr(model, "dim", None)
    if dim is not None and w.dim != int(dim):
        raise ValueError(f"whitening is for D={w.dim} descriptors but the network gives D={dim}")
    return w
