"""Resolve a ``--weights`` value (a path, a URL, a preset name, or "random") to a LandmarkNet.

Preset files (:data:`~pylandmark.models.presets.WEIGHT_PRESETS`) are downloaded once into
``<cache>/checkpoints/`` and their SHA-256 prefix (torch.hub's file-name convention) is checked
after the download and on every later load, so a cached network works offline and a corrupt or
substituted file is never used silently. A ``--weights URL`` is cached per URL (see
:func:`~pylandmark.models.weights.url_cache_path`): two URLs that end in the same file name never
share a file, unless that name carries the file's hash, which is then checked likewise.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..data import download
from ..data.download import URL_SCHEMES, digest_mismatch
from .cirtorch import from_cirtorch, is_cirtorch_checkpoint, load_cirtorch
from .landmarknet import LANDMARKNET_PRESETS, LandmarkNet, register_resolver
from .presets import WEIGHT_PRESETS, WeightPreset, checkpoints_dir
from .serialization import looks_like_safetensors, safe_torch_load
from .weights import _resolve, load_backbone_weights

log = logging.getLogger(__name__)

RANDOM = "random"

__all__ = ["load_network", "load_pretrained", "fetch_preset", "WeightsNotFound", "WeightsHashMismatch",
           "models_dir", "RANDOM"]


class WeightsNotFound(FileNotFoundError):
    """No weights where the user pointed; the message says how to get them."""


class WeightsHashMismatch(ValueError):
    """A preset file does not have the SHA-256 its name promises."""


def models_dir() -> Path:
    """Where fine-tuned networks named by preset are looked up: <cache>/models/<preset>/."""
    return download.cache_dir() / "models"


RANDOM_SEED = 0


def random_network():
    """The network ``--weights random`` names: the default LandmarkNet, randomly initialised from
    a fixed seed, so every run (and the index that records "random") uses the same weights. The
    caller's global torch RNG state is left as it was."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return LandmarkNet()


def _check_hash(path: Path, preset: WeightPreset, *, cached: bool) -> None:
    bad = digest_mismatch(path, {"sha256": preset.sha256})
    if bad is None:
        return
    where = "the cached file" if cached else f"the file downloaded from {preset.url}"
    fix = "delete it to download it again" if cached else "it was kept there"
    raise WeightsHashMismatch(
        f"weights {preset.name!r}: {where} does not have the sha256 its name promises: {bad}; {fix}, or if "
        f"you trust this file pass it by path (--weights {path})")


def fetch_preset(name: str, *, progress: bool = True) -> Path:
    """The local file of a weight preset: from the cache when it is there (hash checked, no
    network), else downloaded into the cache (resumable) and checked.

    Raises:
        WeightsNotFound: not cached and the download failed (e.g. offline); one line naming the
            URL and where to put the file by hand.
        WeightsHashMismatch: the file's SHA-256 does not start with the preset's hash.
    """
    if name not in WEIGHT_PRESETS:
        raise ValueError(f"name: unknown weight preset {name!r}; choose one of {', '.join(WEIGHT_PRESETS)}")
    preset = WEIGHT_PRESETS[name]
    dest = preset.cached_path
    if dest.is_file():
        _check_hash(dest, preset, cached=True)
        log.info("using cached %s", dest)
        return dest
    # a complete download that failed its check earlier is not resumed but fetched again
    staging = dest.with_name(dest.name + ".download")
    staging.unlink(missing_ok=True)
    try:
        download.download_url(preset.url, staging, progress=progress)
    except OSError as err:
        cause = err.__cause__ if err.__cause__ is not None else err
        reason = str(getattr(cause, "reason", cause)).strip().splitlines()
        raise WeightsNotFound(
            f"weights {name!r} are not in the cache and could not be downloaded from {preset.url} "
            f"({reason[0] if reason else type(cause).__name__}); fetch that file by other means and put it at "
            f"{dest}, or pass a local file with --weights PATH") from err
    _check_hash(staging, preset, cached=False)
    os.replace(staging, dest)
    log.info("downloaded %s to %s", preset.url, dest)
    return dest


def _from_file(path: Path, source: str, progress: bool):
    """A checkpoint file: a cirtorch retrieval network, or a backbone for the paper's network."""
    with open(path, "rb") as f:
        head = f.read(16)
    weights: Any = path
    if path.suffix != ".safetensors" and not looks_like_safetensors(head):
        weights = safe_torch_load(path)  # read once: either a whole network or a backbone
        if is_cirtorch_checkpoint(weights):
            return from_cirtorch(weights, source=source)
        if not isinstance(weights, Mapping):
            raise ValueError(f"{source} holds a {type(weights).__name__}, expected a checkpoint dict")
    net = LandmarkNet()
    report = load_backbone_weights(net, weights, progress=progress)
    log.info("loaded backbone weights from %s: %s", source, report)
    return net


def _from_url(url: str, progress: bool):
    """A checkpoint URL, downloaded once into ``<cache>/checkpoints`` at the path of that URL."""
    return _from_file(_resolve(url, None, checkpoints_dir(), progress), url, progress)


def load_pretrained(name_or_path: str, *, progress: bool = True):
    """A LandmarkNet (train mode, CPU) from a directory written by ``LandmarkNet.save``, a
    checkpoint file or URL (cirtorch retrieval network or backbone), or a preset name; see
    :meth:`LandmarkNet.from_pretrained` (which hands all but a directory to this function:
    registered below with :func:`~pylandmark.models.landmarknet.register_resolver`)."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ValueError("weights must be a path, a URL, a preset name or 'random'")
    spec = str(name_or_path)
    path = Path(spec).expanduser()
    if path.is_dir() or (path.name == "config.json" and path.is_file()):
        return LandmarkNet.from_pretrained(path)
    if path.is_file():
        return _from_file(path, str(path), progress)
    if spec.startswith(URL_SCHEMES):
        return _from_url(spec, progress)
    if spec in WEIGHT_PRESETS:
        preset = WEIGHT_PRESETS[spec]
        file = fetch_preset(spec, progress=progress)
        if preset.kind == "cirtorch":
            net = load_cirtorch(file)
            if net.config.backbone != preset.architecture or net.dim != preset.dim:
                raise ValueError(f"weights {spec!r}: {file} holds a {net.config.backbone} network with "
                                 f"{net.dim}-d descriptors, the preset is {preset.architecture} with "
                                 f"{preset.dim}-d; delete the file to download it again")
            return net
        net = LandmarkNet(preset.landmarknet)
        load_backbone_weights(net, file, progress=progress)
        return net
    if spec in LANDMARKNET_PRESETS:
        folder = models_dir() / spec
        if (folder / "config.json").is_file():
            return LandmarkNet.from_pretrained(folder)
        raise WeightsNotFound(
            f"no fine-tuned weights for preset {spec!r} in {folder}. Train them with "
            f"`pylandmark train --preset {spec} --data-root DIR --out {folder}`, or copy a directory "
            f"written by LandmarkNet.save() there, or pass --weights PATH. Pretrained networks: "
            f"{', '.join(WEIGHT_PRESETS)} (see `pylandmark models`); --weights random runs without "
            f"weights (results mean nothing).")
    raise WeightsNotFound(f"weights {spec!r} is not a file, a directory, a URL or a preset; presets: "
                          f"{', '.join([*WEIGHT_PRESETS, *LANDMARKNET_PRESETS, RANDOM])} (see `pylandmark models`)")


register_resolver(load_pretrained)


def load_network(weights: str, device: str = "cpu", progress: bool = True):
    """A LandmarkNet in eval mode on `device` from:

    - a directory (or its config.json) written by ``LandmarkNet.save`` / ``pylandmark train``;
    - a checkpoint file or an http(s)/file URL (downloaded once into the cache): a cirtorch
      retrieval network (VGG16 / ResNet + GeM, whitening), or a backbone checkpoint (ImageNet
      initialisation of the paper's network);
    - a weight preset name (``pylandmark models`` lists them), e.g. ``gl18-tl-resnet101-gem-w``
      or ``cspdarknet53-imagenet``; or a LandmarkNet preset fine-tuned into
      ``models_dir()/<preset>``;
    - ``"random"``: random initialisation, for smoke tests only (warns).
    """
    from ..runtime import resolve_device

    if not isinstance(weights, str) or not weights:
        raise ValueError("weights must be a path, a URL, a preset name or 'random'")
    device = resolve_device(device)
    if weights == RANDOM:
        warnings.warn("--weights random: the network is randomly initialised, its results mean nothing",
                      stacklevel=2)
        return random_network().eval().to(device)
    return load_pretrained(weights, progress=progress).eval().to(device)
