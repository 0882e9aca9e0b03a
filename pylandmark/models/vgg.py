"""VGG16 feature extractor with torchvision's ``features.<i>`` state-dict layout.

As retrieval networks use it (cirtorch's GeM networks): the convolutional part of VGG16 up to
its last ReLU, without the final max-pool, so the feature map has 512 channels at stride 16.
Each 3x3 convolution (padding 1, with bias) is followed by a ReLU; ``"M"`` is a 2x2 max-pool
with stride 2 (floor). Keys are ``features.<i>.weight`` / ``.bias`` with ``i`` the index of the
convolution in that sequence (0, 2, 5, 7, 10, ... for VGG16), which are torchvision's names.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .layers import init_conv_bn
from ..config import JsonConfig

__all__ = ["VggCfg", "VGG_PRESETS", "VGG", "vgg16"]

#: VGG16 ("configuration D") up to the last ReLU: channels per 3x3 conv, "M" for a max-pool
VGG16_LAYERS: tuple[Any, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                                 512, 512, 512)


@dataclass
class VggCfg(JsonConfig):
    """Architecture of a VGG feature extractor (defaults: VGG16 without its last max-pool).

    Attributes:
        layers: one entry per layer: an int is a 3x3 convolution (padding 1, bias) to that many
            channels followed by a ReLU; ``"M"`` is a 2x2 max-pool with stride 2. Must end with
            a convolution.
        in_chans: input image channels.
    """

    layers: tuple[Any, ...] = VGG16_LAYERS
    in_chans: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
            raise TypeError(f"layers must be a sequence of ints and 'M', got {self.layers!r}")
        out = []
        for v in self.layers:
            if v == "M":
                out.append("M")
            elif isinstance(v, int) and not isinstance(v, bool) and v >= 1:
                out.append(int(v))
            else:
                raise ValueError(f"layers entries must be channel counts >= 1 or 'M', got {v!r}")
        if not out or out[-1] == "M":
            raise ValueError(f"layers must end with a convolution (an int), got {self.layers!r}")
        self.layers = tuple(out)
        if isinstance(self.in_chans, bool) or not isinstance(self.in_chans, int) or self.in_chans < 1:
            raise ValueError(f"in_chans must be an int >= 1, got {self.in_chans!r}")


#: Named architectures (VGG16 features: 14,714,688 parameters, 26 state-dict keys).
VGG_PRESETS: dict[str, VggCfg] = {"vgg16": VggCfg()}


class VGG(nn.Module):
    """VGG convolutional features, (B, 3, H, W) -> (B, 512, H', W') with H' = floor(H / 16) for
    VGG16 (each max-pool floors the size).

    Args:
        cfg: architecture, or a preset name in :data:`VGG_PRESETS`.

    Attributes:
        features: the ``nn.Sequential`` of Conv2d / ReLU / MaxPool2d (torchvision's indices).
        num_features: channels of the feature map.
        feature_stride: 2 ** (number of max-pools).
        min_input_size: the smallest image side it accepts (``feature_stride``).
    """

    def __init__(self, cfg: VggCfg | str = "vgg16"):
        super().__init__()
        if isinstance(cfg, str):
            if cfg not in VGG_PRESETS:
                raise ValueError(f"cfg: unknown preset {cfg!r}; choose one of {sorted(VGG_PRESETS)} "
                                 "or pass a VggCfg")
            cfg = dataclasses.replace(VGG_PRESETS[cfg])
        if not isinstance(cfg, VggCfg):
            raise TypeError(f"cfg must be a VggCfg or a preset name, got {type(cfg).__name__}")
        self.cfg = cfg
        layers: list[nn.Module] = []
        prev = cfg.in_chans
        for v in cfg.layers:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(prev, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                prev = v
        self.features = nn.Sequential(*layers)
        self.num_features = prev
        self.feature_stride = 2 ** sum(v == "M" for v in cfg.layers)
        #: the smallest side that leaves a non-empty feature map (each max-pool halves, floored)
        self.min_input_size = self.feature_stride
        init_conv_bn(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_features, H', W') at stride ``feature_stride`` (floored)."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map (no classifier)."""
        return self.forward_features(x)


def vgg16() -> VGG:
    """VGG16 features (torchvision layout, last max-pool removed)."""
    return VGG("vgg16")
