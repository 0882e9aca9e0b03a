"""ResNet-50/101/152 (bottleneck, stride on the 3x3 conv) with torchvision's state-dict names.

Keys: ``conv1``, ``bn1``, ``layer{1..4}.{i}.{conv1,bn1,conv2,bn2,conv3,bn3}``,
``layer{k}.0.downsample.{0,1}`` and, with a classifier, ``fc``; so torchvision's ImageNet
checkpoints (and cirtorch's ``features.*`` retrieval checkpoints, through
:func:`pylandmark.models.load_backbone_weights`) load strictly.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .layers import init_conv_bn
from ..config import JsonConfig

__all__ = ["ResNetCfg", "RESNET_PRESETS", "ResNet", "Bottleneck", "resnet50", "resnet101"]


@dataclass
class ResNetCfg(JsonConfig):
    """Architecture of a bottleneck ResNet (defaults: ResNet-50).

    Attributes:
        layers: bottleneck blocks per stage (4 stages).
        in_chans: input image channels.
        width: channels of the stem and of the first stage's inner convolutions.
        expansion: block output channels / inner channels.
        bn_eps: BatchNorm epsilon.
    """

    layers: tuple[int, ...] = (3, 4, 6, 3)
    in_chans: int = 3
    width: int = 64
    expansion: int = 4
    bn_eps: float = 1e-5

    BOUNDS = {"layers": (1, 64), "in_chans": (1, 64), "width": (1, 8192), "expansion": (1, 64),
              "bn_eps": (1e-12, 1)}

    def __post_init__(self) -> None:
        if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
            raise TypeError(f"layers must be a sequence of 4 ints, got {self.layers!r}")
        self.layers = tuple(int(v) for v in self.layers)
        if len(self.layers) != 4 or any(v < 1 for v in self.layers):
            raise ValueError(f"layers must be 4 ints >= 1, got {self.layers}")
        if self.width < 1 or self.expansion < 1 or self.in_chans < 1:
            raise ValueError("width, expansion and in_chans must be >= 1")


#: Named architectures (parameters without ``fc``: 23,508,032 / 42,500,160 / 58,143,808).
RESNET_PRESETS: dict[str, ResNetCfg] = {
    "resnet50": ResNetCfg(layers=(3, 4, 6, 3)),
    "resnet101": ResNetCfg(layers=(3, 4, 23, 3)),
    "resnet152": ResNetCfg(layers=(3, 8, 36, 3)),
}


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 with a projection shortcut when the shape changes;
    (B, in_chs, H, W) -> (B, planes * expansion, ceil(H/stride), ceil(W/stride))."""

    _conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(self, in_chs: int, planes: int, stride: int = 1, expansion: int = 4,
                 bn_eps: float = 1e-5):
        super().__init__()
        out_chs = planes * expansion
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, eps=bn_eps)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=bn_eps)
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs, eps=bn_eps)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_chs, eps=bn_eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + shortcut)


class ResNet(nn.Module):
    """Bottleneck ResNet backbone with torchvision's key names.

    Args:
        cfg: architecture, or a preset name in :data:`RESNET_PRESETS`.
        num_classes: > 0 adds the classifier ``fc`` (global average pool + linear).

    Attributes:
        num_features: channels of the final feature map (2048 for the presets).
        feature_stride: 32.
    """

    #: child modules in the order cirtorch's ``features`` Sequential lists them
    cirtorch_features: tuple[str, ...] = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2",
                                          "layer3", "layer4")
    _conv_bn_pairs = (("conv1", "bn1"),)

    def __init__(self, cfg: ResNetCfg | str = "resnet50", num_classes: int = 0):
        super().__init__()
        if isinstance(cfg, str):
            if cfg not in RESNET_PRESETS:
                raise ValueError(f"cfg: unknown preset {cfg!r}; choose one of {sorted(RESNET_PRESETS)} "
                                 "or pass a ResNetCfg")
            cfg = dataclasses.replace(RESNET_PRESETS[cfg])
        if not isinstance(cfg, ResNetCfg):
            raise TypeError(f"cfg must be a ResNetCfg or a preset name, got {type(cfg).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        self.cfg = cfg
        w = cfg.width
        self.conv1 = nn.Conv2d(cfg.in_chans, w, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w, eps=cfg.bn_eps)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        prev = w
        for i, n in enumerate(cfg.layers):
            planes = w * 2 ** i
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(prev, planes, stride=2 if (i > 0 and j == 0) else 1,
                                         expansion=cfg.expansion, bn_eps=cfg.bn_eps))
                prev = planes * cfg.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_features = prev
        self.feature_stride = 32
        self.num_classes = num_classes
        if num_classes > 0:
            self.fc = nn.Linear(prev, num_classes)
        init_conv_bn(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_features, H', W') at stride 32."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> logits (B, num_classes) with a classifier, else the feature map."""
        x = self.forward_features(x)
        if self.num_classes > 0:
            return self.fc(x.mean(dim=(2, 3)))
        return x


def resnet50(num_classes: int = 0) -> ResNet:
    """ResNet-50 (torchvision layout)."""
    return ResNet("resnet50", num_classes=num_classes)


def resnet101(num_classes: int = 0) -> ResNet:
    """ResNet-101 (torchvision layout)."""
    return ResNet("resnet101", num_classes=num_classes)
