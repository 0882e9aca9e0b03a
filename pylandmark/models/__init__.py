"""Backbones (CSPDarknet-53, ResNet, VGG16), the LandmarkNet retrieval network, whitening
surgery and pretrained weights (imports torch)."""
from .cspdarknet import CSPDARKNET_PRESETS, CSPDarknet, CSPDarknet53, CspDarknetCfg
from .landmarknet import (
                          BACKBONES,
                          IMAGENET_MEAN,
                          IMAGENET_STD,
                          LANDMARKNET_PRESETS,
                          LandmarkNet,
                          LandmarkNetConfig,
                          create_backbone,
)
from .layers import L2N, ConvNormAct, fold_batchnorm, fold_conv_bn, l2n
from .presets import WEIGHT_PRESETS, WeightPreset
from .resnet import RESNET_PRESETS, ResNet, ResNetCfg, resnet50, resnet101
from .serialization import read_state_dict
from .vgg import VGG, VGG_PRESETS, VggCfg, vgg16
from .weights import LoadReport, load_backbone_weights, sha256sum
from .whitening import install_whitening, select_whitening, strip_whitening

__all__ = [
    "CSPDarknet", "CSPDarknet53", "CspDarknetCfg", "CSPDARKNET_PRESETS",
    "ResNet", "ResNetCfg", "RESNET_PRESETS", "resnet50", "resnet101",
    "VGG", "VggCfg", "VGG_PRESETS", "vgg16",
    "LandmarkNet", "LandmarkNetConfig", "LANDMARKNET_PRESETS", "BACKBONES", "create_backbone",
    "IMAGENET_MEAN", "IMAGENET_STD", "read_state_dict",
    "ConvNormAct", "L2N", "l2n", "fold_batchnorm", "fold_conv_bn",
    "load_backbone_weights", "LoadReport", "sha256sum", "load_network", "WeightsNotFound",
    "WEIGHT_PRESETS", "WeightPreset", "from_cirtorch", "load_cirtorch",
    "strip_whitening", "install_whitening", "select_whitening",
]
# importing pretrained registers LandmarkNet.from_pretrained's resolver (see register_resolver)
from .cirtorch import from_cirtorch, load_cirtorch  # noqa: E402
from .pretrained import WeightsNotFound, load_network  # noqa: E402
