"""LandmarkNet: backbone -> GeM -> L2N -> optional whitening (Linear) -> L2N.

``LandmarkNet()`` is the network of the paper we reproduce: CSPDarknet-53, learnable GeM
(p initialised to 3), 1024-d descriptors, no whitening. Checkpoints are a directory holding
``config.json`` and ``model.safetensors`` (or ``model.pt``, a torch.save of tensors only).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..nn import GeM
from .cspdarknet import CSPDARKNET_PRESETS, CSPDarknet, CspDarknetCfg
from .layers import l2n
from .resnet import RESNET_PRESETS, ResNet, ResNetCfg
from ..config import JsonConfig

__all__ = ["LandmarkNetConfig", "LandmarkNet", "LANDMARKNET_PRESETS", "BACKBONES", "create_backbone",
           "IMAGENET_MEAN", "IMAGENET_STD"]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = {"safetensors": "model.safetensors", "torch": "model.pt"}
_FORMAT_TAG = "pylandmark.LandmarkNet"
_FORMAT_VERSION = 1


def _csp(cfg: dict[str, Any], name: str) -> CSPDarknet:
    return CSPDarknet(_with_overrides(CSPDARKNET_PRESETS[name], cfg))


def _resnet(cfg: dict[str, Any], name: str) -> ResNet:
    return ResNet(_with_overrides(RESNET_PRESETS[name], cfg))


def _with_overrides(base: CspDarknetCfg | ResNetCfg, overrides: Mapping[str, Any]):
    names = {f.name for f in dataclasses.fields(base)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"backbone_args: unknown fields {sorted(unknown)} for {type(base).__name__}; "
                         f"valid fields are {sorted(names)}")
    return dataclasses.replace(base, **overrides)


#: backbone name -> builder(backbone_args) returning a module with ``forward_features`` and
#: ``num_features``
BACKBONES: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "cspdarknet53": lambda a: _csp(a, "cspdarknet53"),
    "resnet50": lambda a: _resnet(a, "resnet50"),
    "resnet101": lambda a: _resnet(a, "resnet101"),
    "resnet152": lambda a: _resnet(a, "resnet152"),
}


def create_backbone(name: str, backbone_args: Mapping[str, Any] | None = None) -> nn.Module:
    """Builds a backbone by name (see :data:`BACKBONES`), with its config fields overridden by
    ``backbone_args`` (e.g. ``{"depths": [1, 1, 1, 1, 1]}`` for a small test network)."""
    if name not in BACKBONES:
        raise ValueError(f"backbone: unknown name {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name](dict(backbone_args or {}))


@dataclass
class LandmarkNetConfig(JsonConfig):
    """Configuration of a :class:`LandmarkNet` (defaults: the paper's CSPDarknet-53 network).

    Attributes:
        backbone: a name in :data:`BACKBONES`.
        backbone_args: overrides of the backbone config's fields (JSON-serialisable).
        p: initial GeM exponent.
        learn_p: whether p is trained.
        gem_eps: GeM clamp floor.
        whitening: add a learned whitening layer (Linear with bias, then L2N).
        whiten_dim: output size of the whitening; None keeps the backbone's width.
        mean: per-channel image mean used by the extraction pipeline (RGB, 0..1 scale).
        std: per-channel image std used by the extraction pipeline.
    """

    backbone: str = "cspdarknet53"
    backbone_args: dict[str, Any] = field(default_factory=dict)
    p: float = 3.0
    learn_p: bool = True
    gem_eps: float = 1e-6
    whitening: bool = False
    whiten_dim: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone: unknown name {self.backbone!r}; choose one of {sorted(BACKBONES)}")
        if not isinstance(self.backbone_args, Mapping):
            raise TypeError(f"backbone_args must be a dict, got {type(self.backbone_args).__name__}")
        self.backbone_args = dict(self.backbone_args)
        if not float(self.p) > 0:
            raise ValueError(f"p must be > 0, got {self.p}")
        if not float(self.gem_eps) > 0:
            raise ValueError(f"gem_eps must be > 0, got {self.gem_eps}")
        if self.whiten_dim is not None:
            wd = self.whiten_dim
            if isinstance(wd, bool) or not isinstance(wd, int) or wd < 1:
                raise ValueError(f"whiten_dim must be a positive int or None, got {self.whiten_dim!r}")
            if not self.whitening:
                raise ValueError("whiten_dim is set but whitening is False; set whitening=True "
                                 "or leave whiten_dim=None")
        for name in ("mean", "std"):
            v = tuple(float(x) for x in getattr(self, name))
            if len(v) != 3:
                raise ValueError(f"{name} must have 3 entries (R, G, B), got {v}")
            setattr(self, name, v)
        if min(self.std) <= 0:
            raise ValueError(f"std entries must be > 0, got {self.std}")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "LandmarkNetConfig":
        """A named preset from :data:`LANDMARKNET_PRESETS`, with fields overridden."""
        if name not in LANDMARKNET_PRESETS:
            raise ValueError(f"name: unknown preset {name!r}; choose one of {sorted(LANDMARKNET_PRESETS)}")
        return dataclasses.replace(LANDMARKNET_PRESETS[name], **overrides)


#: The paper's settings. ``cspdarknet53-gem`` is the default network; the ResNet ones are the
#: comparison (``-lw``: with the learned-whitening layer).
LANDMARKNET_PRESETS: dict[str, LandmarkNetConfig] = {
    "cspdarknet53-gem": LandmarkNetConfig(),
    "cspdarknet53-gem-lw": LandmarkNetConfig(whitening=True),
    "resnet50-gem": LandmarkNetConfig(backbone="resnet50"),
    "resnet101-gem": LandmarkNetConfig(backbone="resnet101"),
    "resnet101-gem-lw": LandmarkNetConfig(backbone="resnet101", whitening=True),
}


class LandmarkNet(nn.Module):
    """Global image descriptor network: backbone -> GeM -> L2N -> [Linear whitening -> L2N].

    Args:
        config: a :class:`LandmarkNetConfig`, a preset name, or None for the default
            (the paper's CSPDarknet-53 + GeM, 1024-d).
        **overrides: config fields to change, e.g. ``LandmarkNet(whitening=True)``.

    Attributes:
        backbone: module with ``forward_features`` and ``num_features``.
        pool: :class:`pylandmark.nn.GeM`.
        whiten: ``nn.Linear(num_features, whiten_dim)`` or None.
        dim: descriptor size D.
    """

    def __init__(self, config: LandmarkNetConfig | str | None = None, **overrides: Any):
        super().__init__()
        if config is None:
            config = LandmarkNetConfig(**overrides)
        elif isinstance(config, str):
            config = LandmarkNetConfig.from_preset(config, **overrides)
        elif isinstance(config, LandmarkNetConfig):
            config = dataclasses.replace(config, **overrides)
        else:
            raise TypeError(f"config must be a LandmarkNetConfig, a preset name or None, "
                            f"got {type(config).__name__}")
        self.config = config
        self.backbone = create_backbone(config.backbone, config.backbone_args)
        self.pool = GeM(p=config.p, eps=config.gem_eps, learn_p=config.learn_p)
        self.norm_eps = 1e-6
        feat = int(self.backbone.num_features)
        self.whiten: nn.Linear | None = None
        if config.whitening:
            d = config.whiten_dim or feat
            self.whiten = nn.Linear(feat, d, bias=True)
            with torch.no_grad():  # start as a (truncated) identity: no change until learned
                self.whiten.weight.copy_(torch.eye(d, feat))
                self.whiten.bias.zero_()
        self.dim = self.whiten.out_features if self.whiten is not None else feat

    @property
    def multiscale_p(self) -> float:
        """Exponent for combining multi-scale descriptors: the GeM p, or 1 with whitening."""
        return 1.0 if self.whiten is not None else float(self.pool.p.detach().reshape(-1)[0])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, C, ceil(H/32), ceil(W/32)) backbone features."""
        return self.backbone.forward_features(x)

    def pool_features(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) feature map -> (B, D) unit-norm descriptors (float32 for half inputs)."""
        v = l2n(_no_half(self.pool(features)), self.norm_eps)
        if self.whiten is not None:
            v = l2n(_no_half(self.whiten(v)), self.norm_eps)
        return v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, D) unit-norm descriptors (float32 for half)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x must be (B, 3, H, W) images, got shape {tuple(x.shape)}")
        return self.pool_features(self.forward_features(x))

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path, *, format: str = "safetensors") -> Path:
        """Writes ``config.json`` and the weights (``model.safetensors`` or ``model.pt``, a
        torch.save of a plain ``{name: tensor}`` dict) into the directory ``path``.

        Returns the directory.
        """
        if format not in WEIGHTS_NAMES:
            raise ValueError(f"format must be one of {sorted(WEIGHTS_NAMES)}, got {format!r}")
        out = Path(path)
        if out.exists() and not out.is_dir():
            raise ValueError(f"path must be a directory (it is an existing file): {out}")
        from .._version import __version__

        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.state_dict().items()}
        weights = out / WEIGHTS_NAMES[format]
        meta = {"format": _FORMAT_TAG, "format_version": _FORMAT_VERSION, "pylandmark_version": __version__,
                "weights": weights.name, "config": self.config.to_dict()}
        if format == "safetensors":
            try:
                from safetensors.torch import save_file
            except ImportError as err:  # pragma: no cover - depends on the environment
                raise ImportError("saving as safetensors needs the 'safetensors' package "
                                  "(pip install safetensors), or pass format='torch'") from err
        # Everything is written under temporary names first and renamed at the end: a failed save
        # leaves neither partial files nor a directory it created.
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        tmp_weights, tmp_config = out / f".{weights.name}.tmp", out / f".{CONFIG_NAME}.tmp"
        try:
            if format == "safetensors":
                save_file(state, str(tmp_weights), metadata={"format": _FORMAT_TAG})
            else:
                torch.save(state, tmp_weights)
            tmp_config.write_text(json.dumps(meta, indent=2) + "\n")
            os.replace(tmp_weights, weights)
            os.replace(tmp_config, out / CONFIG_NAME)
        except BaseException:
            for f in (tmp_weights, tmp_config):
                f.unlink(missing_ok=True)
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise
        logger.info("saved LandmarkNet (%s, D=%d) to %s", self.config.backbone, self.dim, out)
        return out

    @classmethod
    def from_pretrained(cls, path: str | Path, *, map_location: str | torch.device = "cpu",
                        strict: bool = True) -> "LandmarkNet":
        """Loads a network written by :meth:`save` (a directory, or its ``config.json``)."""
        p = Path(path)
        if p.is_file() and p.name == CONFIG_NAME:
            p = p.parent
        cfg_file = p / CONFIG_NAME
        if not cfg_file.is_file():
            raise FileNotFoundError(f"path: no {CONFIG_NAME} in {p}; pass the directory written by "
                                    "LandmarkNet.save()")
        meta = json.loads(cfg_file.read_text())
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT_TAG or "config" not in meta:
            raise ValueError(f"{cfg_file} is not a LandmarkNet config (no format tag {_FORMAT_TAG!r})")
        if int(meta.get("format_version", 0)) > _FORMAT_VERSION:
            raise ValueError(f"{cfg_file} has format_version {meta['format_version']}; this pylandmark "
                             f"reads up to {_FORMAT_VERSION}: upgrade pylandmark")
        model = cls(LandmarkNetConfig.from_dict(meta["config"]))
        weights = p / str(meta.get("weights", WEIGHTS_NAMES["safetensors"]))
        if not weights.is_file():
            raise FileNotFoundError(f"weights file {weights} named in {cfg_file} is missing")
        state = read_state_dict(weights)
        result = model.load_state_dict(state, strict=strict)
        if not strict and (result.missing_keys or result.unexpected_keys):
            logger.warning("loading %s: missing keys %s, unexpected keys %s", weights,
                           result.missing_keys, result.unexpected_keys)
        return model.to(map_location)


def _no_half(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads ``{name: tensor}`` from a ``.safetensors`` file or a torch.save file, never
    unpickling arbitrary objects (``weights_only=True``)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or _looks_like_safetensors(head):
        try:
            from safetensors.torch import load_file
        except ImportError as err:  # pragma: no cover
            raise ImportError(f"{path} is a safetensors file; pip install safetensors") from err
        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read {path} as a tensors-only torch checkpoint: {err}") from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a dict of tensors")
    return dict(obj)


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length followed by a JSON object
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30
