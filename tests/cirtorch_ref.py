"""An independent reference for cirtorch retrieval networks, written from the published method
and torchvision's layer layout (no pylandmark code): checkpoints in cirtorch's format built from
the architecture description, and descriptors computed with plain torch / numpy float64 ops.

Checkpoint: {'state_dict': {features.<i>.* (children of torchvision's VGG16 ``features``
without the last max-pool, or of torchvision's ResNet up to layer4), pool.p, [whiten.weight,
whiten.bias]}, 'meta': {architecture, pooling, whitening, local_whitening, regional, mean, std,
outputdim, [Lw: {name: {'ss' | 'ms': {'m': (D, 1), 'P': (D, D)}}}]}}.

Descriptor of one image x (1, 3, H, W) at one scale: features -> GeM (clamp 1e-6, power p, mean,
power 1/p) -> x / (||x|| + 1e-6) -> [whiten Linear -> x / (||x|| + 1e-6)]. Multi-scale:
resize with bilinear, align_corners=False (scale_factor s), v = (mean_s v_s^q)^(1/q) with q = p
(q = 1 with a whitening layer), v / ||v||. Lw: P (v - m), then / (||.|| + 1e-6), numpy float64.
Test images: RGB, longer side fitted to the image size like PIL's thumbnail (LANCZOS, never
upscaled, no reducing gap as in the Pillow of the published code), /255, (x - mean) / std.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

#: torchvision's VGG16 ("D") features; cirtorch drops the final "M"
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
RESNET_BLOCKS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}
DIMS = {"vgg16": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}
#: cirtorch's features.<i> children of a torchvision ResNet: conv1, bn1, relu, maxpool, layer1..4
RESNET_LAYER_INDEX = {1: 4, 2: 5, 3: 6, 4: 7}
BN_EPS = 1e-5


def vgg16_convs() -> list[tuple[int, int, int]]:
    """(index in features, in channels, out channels) of each 3x3 convolution."""
    out, i, c = [], 0, 3
    for v in VGG16_CFG[:-1]:
        if v == "M":
            i += 1
        else:
            out.append((i, c, v))
            c, i = v, i + 2  # conv, ReLU
    return out


def _bn(sd: dict, prefix: str, c: int, g: torch.Generator, scale: tuple[float, float] = (0.5, 1.5),
        with_tracked: bool = True) -> None:
    lo, hi = scale
    sd[f"{prefix}.weight"] = lo + (hi - lo) * torch.rand(c, generator=g)
    sd[f"{prefix}.bias"] = 0.1 * torch.randn(c, generator=g)
    sd[f"{prefix}.running_mean"] = 0.2 * torch.randn(c, generator=g)
    sd[f"{prefix}.running_var"] = 0.5 + torch.rand(c, generator=g)
    if with_tracked:
        sd[f"{prefix}.num_batches_tracked"] = torch.tensor(1000, dtype=torch.int64)


def _conv(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    fan_in = shape[1] * shape[2] * shape[3]
    return torch.randn(shape, generator=g) * math.sqrt(2.0 / fan_in)


def backbone_state(arch: str, g: torch.Generator, with_tracked: bool = True) -> dict[str, torch.Tensor]:
    """Random backbone weights under cirtorch's ``features.<i>.`` names."""
    sd: dict[str, torch.Tensor] = {}
    if arch == "vgg16":
        for i, cin, cout in vgg16_convs():
            sd[f"features.{i}.weight"] = _conv((cout, cin, 3, 3), g)
            sd[f"features.{i}.bias"] = 0.05 * torch.randn(cout, generator=g)
        return sd
    sd["features.0.weight"] = _conv((64, 3, 7, 7), g)
    _bn(sd, "features.1", 64, g, with_tracked=with_tracked)
    inplanes = 64
    for stage, n in enumerate(RESNET_BLOCKS[arch], start=1):
        planes = 64 * 2 ** (stage - 1)
        for j in range(n):
            pre = f"features.{RESNET_LAYER_INDEX[stage]}.{j}"
            sd[f"{pre}.conv1.weight"] = _conv((planes, inplanes, 1, 1), g)
            _bn(sd, f"{pre}.bn1", planes, g, with_tracked=with_tracked)
            sd[f"{pre}.conv2.weight"] = _conv((planes, planes, 3, 3), g)
            _bn(sd, f"{pre}.bn2", planes, g, with_tracked=with_tracked)
            sd[f"{pre}.conv3.weight"] = _conv((planes * 4, planes, 1, 1), g)
            # a small last-BN scale keeps the residual sum from growing over 30+ blocks
            _bn(sd, f"{pre}.bn3", planes * 4, g, scale=(0.05, 0.25), with_tracked=with_tracked)
            if j == 0:
                sd[f"{pre}.downsample.0.weight"] = _conv((planes * 4, inplanes, 1, 1), g)
                _bn(sd, f"{pre}.downsample.1", planes * 4, g, with_tracked=with_tracked)
            inplanes = planes * 4
    return sd


def random_lw(dim: int, rng: np.random.Generator, d: int | None = None) -> dict[str, np.ndarray]:
    """A whitening in cirtorch's layout: m (D, 1), P (d, D), both float64 with a spread of scales."""
    p = np.diag(np.exp(rng.uniform(-1.0, 1.5, size=dim))) + rng.standard_normal((dim, dim)) / math.sqrt(dim)
    return {"m": 0.02 * rng.standard_normal((dim, 1)), "P": p[: d or dim]}


def make_checkpoint(arch: str, *, seed: int, p: float = 2.7, whitening: bool = False,
                    lw_names: tuple[str, ...] = (), with_tracked: bool = True) -> dict:
    """A cirtorch checkpoint dict with random weights, GeM p, and optional whitening / Lw."""
    g = torch.Generator().manual_seed(seed)
    sd = backbone_state(arch, g, with_tracked)
    sd["pool.p"] = torch.tensor([p])
    dim = DIMS[arch]
    if whitening:
        # near-identity plus noise, as whitening initialised from Lw then fine-tuned would be
        sd["whiten.weight"] = torch.eye(dim) + 0.05 * torch.randn(dim, dim, generator=g)
        sd["whiten.bias"] = 0.01 * torch.randn(dim, generator=g)
    meta = {"architecture": arch, "pooling": "gem", "whitening": whitening, "local_whitening": False,
            "regional": False, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "outputdim": dim}
    if lw_names:
        rng = np.random.default_rng(seed)
        meta["Lw"] = {name: {"ss": random_lw(dim, rng), "ms": random_lw(dim, rng)} for name in lw_names}
    return {"state_dict": sd, "meta": meta}


# ---------------------------------------------------------------------------- reference forward
def features(sd: dict, arch: str, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float64 -> the backbone's last feature map, from the checkpoint alone."""
    w = {k: v.double() for k, v in sd.items() if v.is_floating_point()}
    if arch == "vgg16":
        i = 0
        for v in VGG16_CFG[:-1]:
            if v == "M":
                x = F.max_pool2d(x, kernel_size=2, stride=2)
                i += 1
            else:
                x = F.relu(F.conv2d(x, w[f"features.{i}.weight"], w[f"features.{i}.bias"], padding=1))
                i += 2
        return x

    def bn(t: torch.Tensor, pre: str) -> torch.Tensor:
        return F.batch_norm(t, w[f"{pre}.running_mean"], w[f"{pre}.running_var"], w[f"{pre}.weight"],
                            w[f"{pre}.bias"], training=False, eps=BN_EPS)

    x = F.relu(bn(F.conv2d(x, w["features.0.weight"], stride=2, padding=3), "features.1"))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    for stage, n in enumerate(RESNET_BLOCKS[arch], start=1):
        for j in range(n):
            pre = f"features.{RESNET_LAYER_INDEX[stage]}.{j}"
            stride = 2 if stage > 1 and j == 0 else 1
            y = F.relu(bn(F.conv2d(x, w[f"{pre}.conv1.weight"]), f"{pre}.bn1"))
            y = F.relu(bn(F.conv2d(y, w[f"{pre}.conv2.weight"], stride=stride, padding=1), f"{pre}.bn2"))
            y = bn(F.conv2d(y, w[f"{pre}.conv3.weight"]), f"{pre}.bn3")
            short = x if j else bn(F.conv2d(x, w[f"{pre}.downsample.0.weight"], stride=stride),
                                   f"{pre}.downsample.1")
            x = F.relu(y + short)
    return x


def _l2n(v: torch.Tensor) -> torch.Tensor:
    return v / (torch.sqrt((v * v).sum(-1, keepdim=True)) + 1e-6)


def descriptor(ckpt: dict, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, D) float64 network output (GeM, L2N, [whiten, L2N])."""
    sd, meta = ckpt["state_dict"], ckpt["meta"]
    f = features(sd, meta["architecture"], x.double())
    p = float(sd["pool.p"])
    v = _l2n(f.clamp(min=1e-6).pow(p).mean(dim=(-2, -1)).pow(1.0 / p))
    if meta["whitening"]:
        v = _l2n(v @ sd["whiten.weight"].double().T + sd["whiten.bias"].double())
    return v


def multiscale(ckpt: dict, x: torch.Tensor, scales) -> np.ndarray:
    """(1, 3, H, W) image -> (D,) float64 multi-scale descriptor (cirtorch's combination)."""
    q = float(ckpt["state_dict"]["pool.p"]) if len(scales) > 1 and not ckpt["meta"]["whitening"] else 1.0
    acc = 0
    for s in scales:
        xs = x if s == 1 else F.interpolate(x.double(), scale_factor=s, mode="bilinear", align_corners=False)
        acc = acc + descriptor(ckpt, xs)[0].pow(q)
    v = (acc / len(scales)).pow(1.0 / q)
    return (v / v.norm()).numpy()


def apply_lw(v: np.ndarray, lw: dict) -> np.ndarray:
    """(N, D) descriptors -> L2N(P (v - m)) in float64 (column convention of the published code)."""
    x = lw["P"] @ (v.T - lw["m"])
    return (x / (np.linalg.norm(x, axis=0, keepdims=True) + 1e-6)).T


def load_image(path, image_size: int, mean, std) -> torch.Tensor:
    """An image file -> (1, 3, H, W) float64 normalised, longer side fitted into image_size."""
    from PIL import Image

    im = Image.open(path).convert("RGB")
    im.thumbnail((image_size, image_size), Image.Resampling.LANCZOS, reducing_gap=None)
    a = torch.from_numpy(np.asarray(im, dtype=np.float64) / 255.0).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float64)[:, None, None]
    s = torch.tensor(std, dtype=torch.float64)[:, None, None]
    return ((a - m) / s)[None]


def write_photos(root, sizes, seed: int = 5) -> list:
    """PNG photos of the given (W, H) sizes: smooth random content (so that resizing and scaling
    matter) plus pixel noise."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate(sizes):
        coarse = rng.uniform(0, 255, size=(5, 7, 3)).astype(np.uint8)
        im = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
        a = np.asarray(im, dtype=np.int16) + rng.integers(-30, 30, size=(h, w, 3))
        path = root / f"photo{i}.png"
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths
