"""LandmarkNet: backbone -> GeM -> L2N -> optional whitening (Linear) -> L2N.

``LandmarkNet()`` is the network of the paper we reproduce: CSPDarknet-53, learnable GeM
(p initialised to 3), 1024-d descriptors, no whitening. Checkpoints are a directory holding
``config.json`` and ``model.safetensors`` (or ``model.pt``, a torch.save of tensors only), plus
``whitenings.safetensors`` when the network carries precomputed post-hoc whitenings
(:attr:`LandmarkNet.whitenings`, e.g. the Lw of a cirtorch checkpoint).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._checks import check_int
from ..config import JsonConfig, check_values
from ..data.images import IMAGENET_MEAN, IMAGENET_STD
from ..nn import GeM
from ..nn.functional import gem_torch, regional_gem
from ..nn.whiten import Whitening
from .cspdarknet import CSPDarknet, CspDarknetCfg
from .layers import l2n
from .pooling import Pooling
from .resnet import ResNet, ResNetCfg
from .serialization import _named_tensors, read_state_dict
from .vgg import VGG, VggCfg

__all__ = ["LandmarkNetConfig", "LandmarkNet", "LANDMARKNET_PRESETS", "BACKBONES", "create_backbone",
           "IMAGENET_MEAN", "IMAGENET_STD", "register_resolver"]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = {"safetensors": "model.safetensors", "torch": "model.pt"}
WHITENINGS_NAME = "whitenings.safetensors"
#: the descriptor kinds a precomputed whitening exists for: single-scale and multi-scale
WHITENING_KINDS = ("ss", "ms")
_FORMAT_TAG = "pylandmark.LandmarkNet"
_FORMAT_VERSION = 1


def _csp(cfg: dict[str, Any], name: str) -> CSPDarknet:
    return CSPDarknet(_with_overrides(CspDarknetCfg, name, cfg))


def _resnet(cfg: dict[str, Any], name: str) -> ResNet:
    return ResNet(_with_overrides(ResNetCfg, name, cfg))


def _vgg(cfg: dict[str, Any], name: str) -> VGG:
    return VGG(_with_overrides(VggCfg, name, cfg))


def _with_overrides(cfg_cls: type[CspDarknetCfg] | type[ResNetCfg] | type[VggCfg], name: str,
                    overrides: Mapping[str, Any]):
    names = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"backbone_args: unknown fields {sorted(unknown)} for {cfg_cls.__name__}; "
                         f"valid fields are {sorted(names)}")
    try:
        check_values(cfg_cls, overrides)
    except ValueError as err:
        raise ValueError(f"backbone_args: {err}") from None
    return cfg_cls.presets.get_config(name, overrides)


#: backbone name -> builder(backbone_args) returning a module with ``forward_features`` and
#: ``num_features``
BACKBONES: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "cspdarknet53": lambda a: _csp(a, "cspdarknet53"),
    "resnet50": lambda a: _resnet(a, "resnet50"),
    "resnet101": lambda a: _resnet(a, "resnet101"),
    "resnet152": lambda a: _resnet(a, "resnet152"),
    "vgg16": lambda a: _vgg(a, "vgg16"),
}


#: the config class of each built-in backbone (its presets hold the starting configs that
#: backbone_args override)
_BACKBONE_CFGS: dict[str, type[CspDarknetCfg] | type[ResNetCfg] | type[VggCfg]] = {
    "cspdarknet53": CspDarknetCfg, "resnet50": ResNetCfg, "resnet101": ResNetCfg, "resnet152": ResNetCfg,
    "vgg16": VggCfg,
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

    BOUNDS = {"p": (1e-3, 1e3), "gem_eps": (1e-30, 1.0), "whiten_dim": (1, 65536), "mean": (-1e3, 1e3),
              "std": (1e-6, 1e3)}

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone: unknown name {self.backbone!r}; choose one of {sorted(BACKBONES)}")
        if not isinstance(self.backbone_args, Mapping):
            raise TypeError(f"backbone_args must be a dict, got {type(self.backbone_args).__name__}")
        self.backbone_args = dict(self.backbone_args)
        if self.backbone in _BACKBONE_CFGS:  # fail here, not when the network is built
            _with_overrides(_BACKBONE_CFGS[self.backbone], self.backbone, self.backbone_args)
        if not float(self.p) > 0:
            raise ValueError(f"p must be > 0, got {self.p}")
        if not float(self.gem_eps) > 0:
            raise ValueError(f"gem_eps must be > 0, got {self.gem_eps}")
        self.whiten_dim = check_int(self.whiten_dim, "whiten_dim", minimum=1, none_ok=True)
        if self.whiten_dim is not None:
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


#: The paper's settings. ``cspdarknet53-gem`` is the default network; the ResNet ones are the
#: comparison (``-lw``: with the learned-whitening layer).
LANDMARKNET_PRESETS = LandmarkNetConfig.presets
LANDMARKNET_PRESETS.register("cspdarknet53-gem", LandmarkNetConfig())
LANDMARKNET_PRESETS.register("cspdarknet53-gem-lw", LandmarkNetConfig(whitening=True))
LANDMARKNET_PRESETS.register("resnet50-gem", LandmarkNetConfig(backbone="resnet50"))
LANDMARKNET_PRESETS.register("resnet101-gem", LandmarkNetConfig(backbone="resnet101"))
LANDMARKNET_PRESETS.register("resnet101-gem-lw", LandmarkNetConfig(backbone="resnet101", whitening=True))


#: the loader :meth:`LandmarkNet.from_pretrained` hands everything but a :meth:`~LandmarkNet.save`
#: directory to (preset names, checkpoint files, URLs): ``resolver(name_or_path: str, *,
#: progress: bool) -> LandmarkNet``. Registered by :mod:`pylandmark.models.pretrained` when it is
#: imported (``pylandmark.models`` imports it), so this module never imports the resolver.
_resolver: Callable[..., LandmarkNet] | None = None


def register_resolver(fn: Callable[..., LandmarkNet]) -> Callable[..., LandmarkNet]:
    """Makes ``fn`` the loader :meth:`LandmarkNet.from_pretrained` uses for anything that is not
    a directory written by :meth:`LandmarkNet.save` (see :data:`_resolver`); returns ``fn``."""
    global _resolver
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    _resolver = fn
    return fn


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
        whitenings: precomputed post-hoc whitenings of the descriptors, ``{name: {"ss" | "ms":
            Whitening}}`` ("ss" for single-scale, "ms" for multi-scale descriptors); applied by
            :func:`pylandmark.extract` when asked (``whitening=name``), saved with the network.
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
        backbone: Any = create_backbone(config.backbone, config.backbone_args)  # see BACKBONES
        self.backbone = backbone
        self.pool = GeM(p=config.p, eps=config.gem_eps, learn_p=config.learn_p)
        self.norm_eps = 1e-6
        feat = int(backbone.num_features)
        self.whiten: nn.Linear | None = None
        if config.whitening:
            d = config.whiten_dim or feat
            self.whiten = nn.Linear(feat, d, bias=True)
            with torch.no_grad():  # start as a (truncated) identity: no change until learned
                self.whiten.weight.copy_(torch.eye(d, feat))
                self.whiten.bias.zero_()
        self.dim = self.whiten.out_features if self.whiten is not None else feat
        self.whitenings: dict[str, dict[str, Any]] = {}

    @property
    def multiscale_p(self) -> float:
        """Exponent for combining multi-scale descriptors: the GeM p, or 1 with whitening."""
        return 1.0 if self.whiten is not None else float(self.pool.p.detach().reshape(-1)[0])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, C, h, w) backbone features (stride 32:
        h = ceil(H/32) for CSPDarknet and ResNet; stride 16, h = floor(H/16) for VGG16)."""
        return self.backbone.forward_features(x)

    def pool_features(self, features: torch.Tensor, pooling: Pooling | None = None) -> torch.Tensor:
        """(B, C, h, w) feature map -> (B, D) unit-norm descriptors (float32 for half inputs).

        ``pooling``: an extraction-time :class:`~pylandmark.models.pooling.Pooling` (regional
        GeM on the map, GeM+'s fixed p); None: the network's own GeM. Its ``scale_p`` concerns
        several scales, combined by the caller."""
        if pooling is None or pooling.is_default:
            pooled = self.pool(features)
        else:
            if pooling.regional_p is not None:
                features = regional_gem(features, pooling.regional_p, pooling.regional_size)
            pooled = gem_torch(features, self.pool.p if pooling.gem_p is None else pooling.gem_p, self.pool.eps)
        v = l2n(_no_half(pooled), self.norm_eps)
        if self.whiten is not None:
            v = l2n(_no_half(self.whiten(v)), self.norm_eps)
        return v

    def forward(self, x: torch.Tensor, pooling: Pooling | None = None) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, D) unit-norm descriptors (float32 for half);
        ``pooling`` as :meth:`pool_features`."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x must be (B, 3, H, W) images, got shape {tuple(x.shape)}")
        least = int(getattr(self.backbone, "min_input_size", 1))
        if min(x.shape[-2:]) < least:
            raise ValueError(f"x is {tuple(x.shape[-2:])} pixels, too small for the {self.config.backbone} "
                             f"backbone (at least {least} per side, after scaling): use larger images "
                             "or scales")
        return self.pool_features(self.forward_features(x), pooling)

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
        whitenings_file = out / WHITENINGS_NAME
        tmp_whitenings = out / f".{WHITENINGS_NAME}.tmp"
        if self.whitenings:
            meta["whitenings"] = WHITENINGS_NAME
        try:
            if format == "safetensors":
                save_file(state, str(tmp_weights), metadata={"format": _FORMAT_TAG})
            else:
                torch.save(state, tmp_weights)
            if self.whitenings:
                _save_whitenings(self.whitenings, tmp_whitenings)
            tmp_config.write_text(json.dumps(meta, indent=2) + "\n")
            os.replace(tmp_weights, weights)
            if self.whitenings:
                os.replace(tmp_whitenings, whitenings_file)
            elif whitenings_file.is_file():  # left over from an earlier save into this directory
                whitenings_file.unlink()
            os.replace(tmp_config, out / CONFIG_NAME)
        except BaseException:
            for f in (tmp_weights, tmp_config, tmp_whitenings):
                f.unlink(missing_ok=True)
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise
        logger.info("saved LandmarkNet (%s, D=%d) to %s", self.config.backbone, self.dim, out)
        return out

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, map_location: str | torch.device = "cpu",
                        strict: bool = True, progress: bool = True) -> LandmarkNet:
        """Loads a network (in train mode, as ``nn.Module`` loads do) from:

        - a directory written by :meth:`save` (or its ``config.json``);
        - a retrieval checkpoint file in cirtorch's format (``{'state_dict', 'meta'}``: VGG16 or
          ResNet-50/101/152 + GeM, end-to-end whitening, precomputed Lw), or its URL;
        - a backbone checkpoint file or URL (timm / torchvision; the paper's CSPDarknet-53);
        - a weight preset name (:data:`pylandmark.models.presets.WEIGHT_PRESETS`, e.g.
          ``"gl18-tl-resnet101-gem-w"``: downloaded once into the cache, its hash checked), or
          a :data:`LANDMARKNET_PRESETS` name fine-tuned into ``<cache>/models/<name>``.

        ``strict`` applies to a :meth:`save` directory (loading there with ``strict=False``
        tolerates missing / unexpected keys); ``progress`` shows a download bar.
        """
        p = Path(name_or_path).expanduser() if isinstance(name_or_path, (str, Path)) else None
        if p is None or not str(name_or_path):
            raise TypeError(f"name_or_path must be a preset name, a directory, a file or a URL, got "
                            f"{name_or_path!r}")
        if p.is_file() and p.name == CONFIG_NAME:
            p = p.parent
        cfg_file = p / CONFIG_NAME
        if not cfg_file.is_file():
            if p.is_dir():
                raise FileNotFoundError(f"path: no {CONFIG_NAME} in {p}; pass the directory written by "
                                        "LandmarkNet.save()")
            if _resolver is None:
                raise RuntimeError(f"cannot load {str(name_or_path)!r}: no loader for preset names, checkpoint "
                                   "files and URLs is registered (import pylandmark.models, which registers "
                                   "pylandmark.models.pretrained.load_pretrained)")
            return _resolver(str(name_or_path), progress=progress).to(map_location)
        meta = _read_config(cfg_file)
        config = LandmarkNetConfig.from_dict(meta["config"])
        weights = _weights_path(p, meta.get("weights", WEIGHTS_NAMES["safetensors"]), cfg_file)
        if not weights.is_file():
            raise FileNotFoundError(f"weights file {weights} named in {cfg_file} is missing")
        _check_size_fits(config, weights, cfg_file)
        model = cls(config)
        state = _named_tensors(read_state_dict(weights), weights)
        _check_shapes(model, state, weights, strict)
        result = model.load_state_dict(state, strict=strict)
        if not strict and (result.missing_keys or result.unexpected_keys):
            logger.warning("loading %s: missing keys %s, unexpected keys %s", weights,
                           result.missing_keys, result.unexpected_keys)
        if meta.get("whitenings"):
            wfile = p / str(meta["whitenings"])
            if not wfile.is_file():
                raise FileNotFoundError(f"whitenings file {wfile} named in {cfg_file} is missing")
            model.whitenings = _load_whitenings(wfile, model.dim)
        return model.to(map_location)


_MAX_CONFIG_BYTES = 1 << 20


def _read_config(cfg_file: Path) -> dict:
    """The checked contents of a model directory's config.json (a file from elsewhere): JSON
    parsed with bounded work, and a whitenings file name that stays inside the directory."""
    from .._files import inside, parse_json

    with open(cfg_file, "rb") as f:
        raw = f.read(_MAX_CONFIG_BYTES + 1)
    if len(raw) > _MAX_CONFIG_BYTES:
        raise ValueError(f"{cfg_file} is larger than {_MAX_CONFIG_BYTES} bytes; not a LandmarkNet config")
    meta = parse_json(raw, what=str(cfg_file), max_bytes=_MAX_CONFIG_BYTES)
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT_TAG or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{cfg_file} is not a LandmarkNet config (no format tag {_FORMAT_TAG!r})")
    version = meta.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{cfg_file}: format_version must be an integer, got {version!r:.40}")
    if version > _FORMAT_VERSION:
        raise ValueError(f"{cfg_file} has format_version {version}; this pylandmark "
                         f"reads up to {_FORMAT_VERSION}: upgrade pylandmark")
    if meta.get("whitenings"):
        inside(cfg_file.parent, meta["whitenings"], f"{cfg_file}: 'whitenings'")
    return meta


def _weights_path(folder: Path, name: Any, cfg_file: Path) -> Path:
    """The weights file a config names: a relative path inside the model directory, never an
    absolute path or one that climbs out with '..'."""
    if not isinstance(name, str) or not name or "\\" in name:
        raise ValueError(f"{cfg_file}: 'weights' must name a file in {folder}, got {name!r:.80}")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or rel.drive:
        raise ValueError(f"{cfg_file}: 'weights' must name a file inside {folder}, got {name!r:.80}")
    return folder / rel


def _check_size_fits(config: LandmarkNetConfig, weights: Path, cfg_file: Path) -> None:
    """Builds the network on the meta device (no memory) and refuses a config that describes more
    tensor elements than the weights file could hold at 2 bytes each: a crafted config cannot
    make the loader allocate a network its weights do not match."""
    with torch.device("meta"):
        numel = sum(t.numel() for t in LandmarkNet(config).state_dict().values())
    size = weights.stat().st_size
    if 2 * numel > size:
        raise ValueError(f"{cfg_file} describes a network of {numel} values but {weights.name} holds only "
                         f"{size} bytes: the config and the weights do not belong together")


def _check_shapes(model: nn.Module, state: Mapping[str, torch.Tensor], weights: Path, strict: bool) -> None:
    """One-line errors for weights that do not fit the network (torch's are many lines)."""
    own = model.state_dict()
    bad = [f"{k}: file {tuple(v.shape)}, network {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"{weights} does not fit its config: {len(bad)} tensors have other shapes ({bad[0]}"
                         f"{f'; and {len(bad) - 1} more' if len(bad) > 1 else ''})")
    if strict:
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            raise ValueError(f"{weights} does not fit its config: {len(missing)} tensors missing "
                             f"({', '.join(missing[:3])}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])})")


def _no_half(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _save_whitenings(whitenings: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """``{name: {kind: Whitening}}`` -> one safetensors file, keys ``<name>/<kind>/mean`` and
    ``<name>/<kind>/projection`` (float64)."""
    import numpy as np
    from safetensors.numpy import save_file

    tensors = {}
    for name, kinds in whitenings.items():
        for kind, w in kinds.items():
            tensors[f"{name}/{kind}/mean"] = np.ascontiguousarray(w.mean, dtype=np.float64)
            tensors[f"{name}/{kind}/projection"] = np.ascontiguousarray(w.projection, dtype=np.float64)
    save_file(tensors, str(path), metadata={"format": "pylandmark.Whitenings"})


def _load_whitenings(path: Path, dim: int) -> dict[str, dict[str, Any]]:
    from safetensors import safe_open

    out: dict[str, dict[str, Any]] = {}
    with safe_open(str(path), framework="numpy") as f:
        keys = set(f.keys())
        for key in sorted(keys):
            name, _, rest = key.rpartition("/")
            if rest != "mean":
                continue
            name, _, kind = name.rpartition("/")
            proj = f"{name}/{kind}/projection"
            if not name or kind not in WHITENING_KINDS or proj not in keys:
                raise ValueError(f"{path}: unexpected entry {key!r}; not a whitenings file written by "
                                 "LandmarkNet.save()")
            w = Whitening(f.get_tensor(key), f.get_tensor(proj), "lw")
            if w.dim != dim:
                raise ValueError(f"{path}: whitening {name!r} ({kind}) is for D={w.dim} descriptors, "
                                 f"the network's are D={dim}")
            out.setdefault(name, {})[kind] = w
    return out
