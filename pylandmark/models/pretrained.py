"""Resolve a `--weights` value (a path, a URL, a preset name, or "random") to a LandmarkNet."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

# Public ImageNet initialisation for the paper's backbone (timm's cspdarknet53.ra_in1k).
IMAGENET_WEIGHTS = {
    "cspdarknet53-imagenet": ("cspdarknet53-gem",
                              "https://huggingface.co/timm/cspdarknet53.ra_in1k/resolve/main/model.safetensors"),
}
RANDOM = "random"


class WeightsNotFound(FileNotFoundError):
    """No weights where the user pointed; the message says how to get them."""


def models_dir() -> Path:
    """Where fine-tuned networks named by preset are looked up: <cache>/models/<preset>/."""
    from ..data.download import cache_dir

    return cache_dir() / "models"


RANDOM_SEED = 0


def random_network():
    """The network ``--weights random`` names: the default LandmarkNet, randomly initialised from
    a fixed seed, so every run (and the index that records "random") uses the same weights. The
    caller's global torch RNG state is left as it was."""
    import torch

    from . import LandmarkNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return LandmarkNet()


def load_network(weights: str, device: str = "cpu", progress: bool = True):
    """A LandmarkNet in eval mode on `device` from:

    - a directory (or its config.json) written by ``LandmarkNet.save`` / ``pylandmark train``;
    - a backbone checkpoint file or an http(s)/file URL (ImageNet initialisation of the paper's
      network; downloaded once into the cache);
    - a preset name: a fine-tuned network in ``models_dir()/<preset>``, or for
      ``cspdarknet53-imagenet`` the public ImageNet backbone;
    - ``"random"``: random initialisation, for smoke tests only (warns).
    """
    from . import LANDMARKNET_PRESETS, LandmarkNet, load_backbone_weights

    if not isinstance(weights, str) or not weights:
        raise ValueError("weights must be a path, a URL, a preset name or 'random'")
    if weights == RANDOM:
        warnings.warn("--weights random: the network is randomly initialised, its results mean nothing",
                      stacklevel=2)
        return random_network().eval().to(device)
    path = Path(weights).expanduser()
    if path.is_dir() or path.name == "config.json":
        return LandmarkNet.from_pretrained(path, map_location=device).eval()
    if path.is_file() or "://" in weights:
        net = LandmarkNet()
        report = load_backbone_weights(net, weights, progress=progress)
        log.info("loaded backbone weights from %s: %s", weights, report)
        return net.eval().to(device)
    if weights in IMAGENET_WEIGHTS:
        preset, url = IMAGENET_WEIGHTS[weights]
        net = LandmarkNet(preset)
        try:
            load_backbone_weights(net, url, progress=progress)
        except OSError as err:
            raise WeightsNotFound(
                f"could not fetch the {weights} backbone ({err}). Download {url} by hand and pass "
                f"--weights /path/to/model.safetensors") from err
        return net.eval().to(device)
    if weights in LANDMARKNET_PRESETS:
        folder = models_dir() / weights
        if (folder / "config.json").is_file():
            return LandmarkNet.from_pretrained(folder, map_location=device).eval()
        raise WeightsNotFound(
            f"no fine-tuned weights for preset {weights!r} in {folder}. Train them with "
            f"`pylandmark train --preset {weights} --data-root DIR --out {folder}`, or copy a directory "
            f"written by LandmarkNet.save() there, or pass --weights PATH. For ImageNet initialisation use "
            f"--weights cspdarknet53-imagenet; --weights random runs without weights (results mean nothing).")
    known = sorted([*LANDMARKNET_PRESETS, *IMAGENET_WEIGHTS, RANDOM])
    raise WeightsNotFound(f"weights {weights!r} is not a file, a directory, a URL or a preset ({', '.join(known)})")
