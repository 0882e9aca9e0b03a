"""Backbones (CSPDarknet-53, ResNet) and the LandmarkNet retrieval network (imports torch)."""
from .cspdarknet import CSPDARKNET_PRESETS, CSPDarknet, CSPDarknet53, CspDarknetCfg
from .landmarknet import (
                          BACKBONES,
                          IMAGENET_MEAN,
                          IMAGENET_STD,
                          LANDMARKNET_PRESETS,
                          LandmarkNet,
                          LandmarkNetConfig,
                          create_backbone,
                          read_state_dict,
)
from .layers import L2N, ConvNormAct, fold_batchnorm, fold_conv_bn, l2n
from .resnet import RESNET_PRESETS, ResNet, ResNetCfg, resnet50, resnet101
from .weights import LoadReport, load_backbone_weights, sha256sum

__all__ = [
    "CSPDarknet", "CSPDarknet53", "CspDarknetCfg", "CSPDARKNET_PRESETS",
    "ResNet", "ResNetCfg", "RESNET_PRESETS", "resnet50", "resnet101",
    "LandmarkNet", "LandmarkNetConfig", "LANDMARKNET_PRESETS", "BACKBONES", "create_backbone",
    "IMAGENET_MEAN", "IMAGENET_STD", "read_state_dict",
    "ConvNormAct", "L2N", "l2n", "fold_batchnorm", "fold_conv_bn",
    "load_backbone_weights", "LoadReport", "sha256sum", "load_network", "WeightsNotFound",
]
from .pretrained import WeightsNotFound, load_network  # noqa: E402  (needs the names above)
