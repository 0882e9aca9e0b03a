"""CSPDarknet-53 with timm's state-dict layout (so ``cspdarknet53.ra_in1k`` loads strictly).

The network: ``stem.conv1`` (3x3, stride 1) and five cross-stage-partial stages, each halving
the resolution. A stage runs ``conv_down`` (3x3, stride 2) and ``conv_exp`` (1x1), splits the
channels in two halves, sends the second half through residual dark blocks (1x1 -> 3x3, add,
no activation after the add) and ``conv_transition_b`` (1x1), concatenates it back behind the
first half and mixes with ``conv_transition`` (1x1). Output: 1024 channels at stride 32.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .layers import ConvNormAct, init_conv_bn
from ..config import JsonConfig

__all__ = ["CspDarknetCfg", "CSPDARKNET_PRESETS", "CSPDarknet", "CSPDarknet53", "DarkBlock",
           "CrossStage"]


def _tuple(value: Any, name: str, kind: type) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a sequence of {kind.__name__}, got {value!r}")
    return tuple(kind(v) for v in value)


@dataclass
class CspDarknetCfg(JsonConfig):
    """Architecture of a CSPDarknet (defaults: timm's ``cspdarknet53``).

    Per-stage tuples have one entry per stage. A stage's block width is half its expanded
    width (the residual blocks run on one half of the split); the blocks' inner width is
    ``bottle_ratio * block width``.

    Attributes:
        in_chans: input image channels.
        stem_chs: channels of the stem convolution.
        stem_kernel: stem kernel size (stride 1).
        depths: residual blocks per stage.
        out_chs: output channels per stage.
        expand_ratio: ``conv_exp`` width / stage output width.
        bottle_ratio: block inner width / block width.
        negative_slope: LeakyReLU slope.
        bn_eps: BatchNorm epsilon.
    """

    in_chans: int = 3
    stem_chs: int = 32
    stem_kernel: int = 3
    depths: tuple[int, ...] = (1, 2, 8, 8, 4)
    out_chs: tuple[int, ...] = (64, 128, 256, 512, 1024)
    expand_ratio: tuple[float, ...] = (2.0, 1.0, 1.0, 1.0, 1.0)
    bottle_ratio: tuple[float, ...] = (0.5, 1.0, 1.0, 1.0, 1.0)
    negative_slope: float = 0.01
    bn_eps: float = 1e-5

    BOUNDS = {"in_chans": (1, 64), "stem_chs": (1, 8192), "stem_kernel": (1, 15), "depths": (0, 64),
              "out_chs": (1, 8192), "expand_ratio": (1 / 64, 64), "bottle_ratio": (1 / 64, 64),
              "negative_slope": (0, 1), "bn_eps": (1e-12, 1)}

    def __post_init__(self) -> None:
        self.depths = _tuple(self.depths, "depths", int)
        self.out_chs = _tuple(self.out_chs, "out_chs", int)
        self.expand_ratio = _tuple(self.expand_ratio, "expand_ratio", float)
        self.bottle_ratio = _tuple(self.bottle_ratio, "bottle_ratio", float)
        n = len(self.depths)
        if n < 1:
            raise ValueError("depths must name at least one stage")
        for name in ("out_chs", "expand_ratio", "bottle_ratio"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries but depths has {n}; "
                                 "give one entry per stage")
        if any(d < 0 for d in self.depths):
            raise ValueError(f"depths must be >= 0, got {self.depths}")
        for out, er in zip(self.out_chs, self.expand_ratio):
            exp = int(round(out * er))
            if out < 1 or exp < 2 or exp % 2:
                raise ValueError(f"out_chs * expand_ratio must be an even channel count >= 2, got "
                                 f"out_chs={out}, expand_ratio={er}")
        if self.stem_chs < 1 or self.in_chans < 1:
            raise ValueError("stem_chs and in_chans must be >= 1")


#: Named architectures. ``cspdarknet53`` is timm's (26,617,184 parameters without a classifier).
CSPDARKNET_PRESETS: dict[str, CspDarknetCfg] = {
    "cspdarknet53": CspDarknetCfg(),
}


class DarkBlock(nn.Module):
    """Residual block: ``x + conv2(conv1(x))`` with 1x1 ``conv1`` (-> mid) and 3x3 ``conv2``
    (-> width); (B, width, H, W) -> (B, width, H, W). No activation after the add."""

    def __init__(self, width: int, mid: int, negative_slope: float = 0.01, bn_eps: float = 1e-5):
        super().__init__()
        kw = dict(negative_slope=negative_slope, bn_eps=bn_eps)
        self.conv1 = ConvNormAct(width, mid, 1, **kw)
        self.conv2 = ConvNormAct(mid, width, 3, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


class CrossStage(nn.Module):
    """One cross-stage-partial stage; (B, in_chs, H, W) -> (B, out_chs, ceil(H/2), ceil(W/2))."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, expand_ratio: float,
                 bottle_ratio: float, negative_slope: float = 0.01, bn_eps: float = 1e-5):
        super().__init__()
        kw = dict(negative_slope=negative_slope, bn_eps=bn_eps)
        exp_chs = int(round(out_chs * expand_ratio))
        width = exp_chs // 2
        mid = max(1, int(round(width * bottle_ratio)))
        self.split_chs = width
        self.conv_down = ConvNormAct(in_chs, out_chs, 3, stride=2, **kw)
        self.conv_exp = ConvNormAct(out_chs, exp_chs, 1, **kw)
        self.blocks = nn.Sequential(*[DarkBlock(width, mid, **kw) for _ in range(depth)])
        self.conv_transition_b = ConvNormAct(width, width, 1, **kw)
        self.conv_transition = ConvNormAct(exp_chs, out_chs, 1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_exp(self.conv_down(x))
        xs, xb = x.split(self.split_chs, dim=1)
        xb = self.conv_transition_b(self.blocks(xb))
        return self.conv_transition(torch.cat([xs, xb], dim=1))


class _Stem(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, **kw: Any):
        super().__init__()
        self.conv1 = ConvNormAct(in_chs, out_chs, kernel_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)


class _ClassifierHead(nn.Module):
    """Global average pool + ``fc``; (B, C, H, W) -> (B, num_classes). Keys ``fc.*``."""

    def __init__(self, in_chs: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_chs, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class CSPDarknet(nn.Module):
    """A CSPDarknet backbone with timm's key names.

    Args:
        cfg: architecture, or the name of a preset in :data:`CSPDARKNET_PRESETS`.
        num_classes: > 0 adds timm's ImageNet classifier ``head.fc`` (global average pool +
            linear); 0 (default) builds the backbone alone.

    Attributes:
        num_features: channels of the final feature map (1024 for CSPDarknet-53).
        feature_stride: total stride of :meth:`forward_features` (32).
    """

    #: child modules in the order a cirtorch-style ``features`` Sequential would list them
    cirtorch_features: tuple[str, ...] = ("stem", "stages")

    def __init__(self, cfg: CspDarknetCfg | str = "cspdarknet53", num_classes: int = 0):
        super().__init__()
        if isinstance(cfg, str):
            if cfg not in CSPDARKNET_PRESETS:
                raise ValueError(f"cfg: unknown preset {cfg!r}; choose one of {sorted(CSPDARKNET_PRESETS)} "
                                 "or pass a CspDarknetCfg")
            cfg = dataclasses.replace(CSPDARKNET_PRESETS[cfg])
        if not isinstance(cfg, CspDarknetCfg):
            raise TypeError(f"cfg must be a CspDarknetCfg or a preset name, got {type(cfg).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        self.cfg = cfg
        kw = dict(negative_slope=cfg.negative_slope, bn_eps=cfg.bn_eps)
        self.stem = _Stem(cfg.in_chans, cfg.stem_chs, cfg.stem_kernel, **kw)
        stages = []
        prev = cfg.stem_chs
        for depth, out, er, br in zip(cfg.depths, cfg.out_chs, cfg.expand_ratio, cfg.bottle_ratio):
            stages.append(CrossStage(prev, out, depth, er, br, **kw))
            prev = out
        self.stages = nn.Sequential(*stages)
        self.num_features = prev
        self.feature_stride = 2 ** len(stages)
        self.num_classes = num_classes
        if num_classes > 0:
            self.head = _ClassifierHead(prev, num_classes)
        init_conv_bn(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_features, ceil(H/32), ceil(W/32)) (before any head)."""
        return self.stages(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> logits (B, num_classes) with a head, else the feature map."""
        x = self.forward_features(x)
        if self.num_classes > 0:
            return self.head(x)
        return x


class CSPDarknet53(CSPDarknet):
    """timm's ``cspdarknet53``: 26,617,184 parameters without the classifier, 1024 channels at
    stride 32. ``num_classes=1000`` adds ``head.fc`` to hold the full ImageNet checkpoint."""

    def __init__(self, num_classes: int = 0, cfg: CspDarknetCfg | str = "cspdarknet53"):
        super().__init__(cfg, num_classes=num_classes)
