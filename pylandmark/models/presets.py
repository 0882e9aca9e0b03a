"""Named pretrained weights: where each file lives, its hash, what it is and how well it does.

Each :class:`WeightPreset` is one downloadable file. ``kind="cirtorch"`` files are complete
retrieval networks in cirtorch's checkpoint format (Radenovic, Tolias, Chum; backbone, GeM p,
whitening); ``kind="backbone"`` files are ImageNet backbones for the paper's CSPDarknet-53
network. The hash is torch.hub's convention: the hex suffix of the file name is the start of
the file's SHA-256, checked after download and on every load from the cache.

The registry itself is plain Python (no torch or numpy code).
"""
from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["WeightPreset", "WEIGHT_PRESETS", "CIRTORCH_BASE_URL", "checkpoints_dir", "hub_hash"]

CIRTORCH_BASE_URL = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/networks/"
_MS_HALF = (1.0, 2 ** -0.5, 0.5)          # the TPAMI multi-scale setting
_MS_UP = (1.0, 2 ** 0.5, 2 ** -0.5)        # cirtorch's setting for the -w networks


def hub_hash(url: str) -> str | None:
    """The hash prefix in a torch.hub-style file name (``name-<hex>.ext``), or None."""
    name = Path(urllib.parse.urlparse(url).path).name
    m = re.search(r"-([0-9a-f]{6,64})\.[A-Za-z0-9]+$", name)
    return m.group(1) if m else None


@dataclass(frozen=True)
class WeightPreset:
    """One named weight file.

    Attributes:
        name: the name users pass (``--weights NAME``, ``LandmarkNet.from_pretrained(NAME)``).
        url: where the file is downloaded from.
        sha256: the expected start of the file's SHA-256 (None: not checked).
        kind: "cirtorch" (a whole retrieval network) or "backbone" (ImageNet initialisation of
            the LandmarkNet architecture preset ``landmarknet``).
        architecture: the backbone (a name in ``pylandmark.models.BACKBONES``).
        dim: descriptor size.
        whitening: "end-to-end" (a learned Linear layer in the network), "Lw <name>" (a
            precomputed post-hoc whitening in the file, applied with ``--whitening <name>``) or
            "none".
        training_data: what the network was trained on.
        eval_scales: the scales of the published evaluation.
        eval_whitening: the ``--whitening`` name of the published evaluation (None: none).
        image_size: longer image side of the published evaluation.
        accuracy: published mAP (%) as ``{"roxford5k/medium": 60.9, ...}``.
        accuracy_source: where the numbers are published, and their setting.
        landmarknet: for ``kind="backbone"``: the LandmarkNet preset the backbone goes into.
        filename: the name in the cache (default: the URL's last part).
    """

    name: str
    url: str
    sha256: str | None
    kind: str
    architecture: str
    dim: int
    whitening: str
    training_data: str
    eval_scales: tuple[float, ...] = (1.0,)
    eval_whitening: str | None = None
    image_size: int = 1024
    accuracy: dict[str, float] = field(default_factory=dict)
    accuracy_source: str = ""
    landmarknet: str | None = None
    filename: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("cirtorch", "backbone"):
            raise ValueError(f"kind must be 'cirtorch' or 'backbone', got {self.kind!r}")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{6,64}", self.sha256):
            raise ValueError(f"sha256 must be 6 to 64 lower-case hex digits or None, got {self.sha256!r}")
        if not self.filename:
            object.__setattr__(self, "filename", Path(urllib.parse.urlparse(self.url).path).name)

    @property
    def cached_path(self) -> Path:
        """Where the file is kept once downloaded: ``<cache>/checkpoints/<filename>``."""
        return checkpoints_dir() / self.filename

    @property
    def is_cached(self) -> bool:
        return self.cached_path.is_file()

    def summary(self) -> dict:
        """A JSON-friendly description (what ``pylandmark models --json`` prints)."""
        return {"name": self.name, "kind": self.kind, "architecture": self.architecture, "dim": self.dim,
                "whitening": self.whitening, "training_data": self.training_data,
                "eval": {"image_size": self.image_size, "scales": [round(s, 6) for s in self.eval_scales],
                         "whitening": self.eval_whitening},
                "accuracy": dict(self.accuracy), "accuracy_source": self.accuracy_source,
                "cached": self.is_cached, "path": str(self.cached_path), "url": self.url,
                "sha256": self.sha256}


def checkpoints_dir() -> Path:
    """``<pylandmark cache>/checkpoints`` (see :func:`pylandmark.data.download.cache_dir`)."""
    from ..data.download import cache_dir

    return cache_dir() / "checkpoints"


def _cirtorch(name: str, folder: str, suffix: str, architecture: str, dim: int, whitening: str,
              training_data: str, scales: tuple[float, ...], eval_whitening: str | None,
              accuracy: dict[str, float], source: str) -> WeightPreset:
    url = f"{CIRTORCH_BASE_URL}{folder}/{name}-{suffix}.pth"
    return WeightPreset(name=name, url=url, sha256=hub_hash(url), kind="cirtorch", architecture=architecture,
                        dim=dim, whitening=whitening, training_data=training_data, eval_scales=scales,
                        eval_whitening=eval_whitening, accuracy=accuracy, accuracy_source=source)


def _acc(rox_m: float, rox_h: float, rpar_m: float, rpar_h: float) -> dict[str, float]:
    return {"roxford5k/medium": rox_m, "roxford5k/hard": rox_h, "rparis6k/medium": rpar_m,
            "rparis6k/hard": rpar_h}


_SFM = "SfM-120k (retrieval-SfM-120k, 3D-reconstruction clusters)"
_GL18 = "Google Landmarks 2018 (gl18)"
_TPAMI = ("cirtorch README, PyTorch networks of the TPAMI 2018 paper: multi-scale (1, 1/sqrt 2, 1/2) "
          "+ Lw retrieval-SfM-120k, image size 1024")
_E2E = ("cirtorch README, networks with whitening learned end-to-end: multi-scale (1, sqrt 2, "
        "1/sqrt 2), image size 1024")

#: name -> preset. ``cspdarknet53-imagenet`` is the ImageNet backbone of our own network.
WEIGHT_PRESETS: dict[str, WeightPreset] = {p.name: p for p in [
    _cirtorch("retrievalSfM120k-vgg16-gem", "retrieval-SfM-120k", "b4dcdc6", "vgg16", 512,
              "Lw retrieval-SfM-120k", _SFM, _MS_HALF, "retrieval-SfM-120k", _acc(60.9, 32.9, 69.3, 44.2), _TPAMI),
    _cirtorch("retrievalSfM120k-resnet101-gem", "retrieval-SfM-120k", "b80fb85", "resnet101", 2048,
              "Lw retrieval-SfM-120k", _SFM, _MS_HALF, "retrieval-SfM-120k", _acc(65.4, 40.1, 76.7, 55.2), _TPAMI),
    _cirtorch("rSfM120k-tl-resnet50-gem-w", "retrieval-SfM-120k", "97bf910", "resnet50", 2048, "end-to-end",
              _SFM, _MS_UP, None, _acc(64.7, 39.0, 76.3, 54.9), _E2E),
    _cirtorch("rSfM120k-tl-resnet101-gem-w", "retrieval-SfM-120k", "a155e54", "resnet101", 2048, "end-to-end",
              _SFM, _MS_UP, None, _acc(67.8, 41.7, 77.6, 56.3), _E2E),
    _cirtorch("rSfM120k-tl-resnet152-gem-w", "retrieval-SfM-120k", "f39cada", "resnet152", 2048, "end-to-end",
              _SFM, _MS_UP, None, _acc(68.8, 41.3, 78.0, 57.2), _E2E),
    _cirtorch("gl18-tl-resnet50-gem-w", "gl18", "83fdc30", "resnet50", 2048, "end-to-end",
              _GL18, _MS_UP, None, _acc(63.6, 40.9, 78.0, 57.5), _E2E),
    _cirtorch("gl18-tl-resnet101-gem-w", "gl18", "a4d43db", "resnet101", 2048, "end-to-end",
              _GL18, _MS_UP, None, _acc(67.3, 44.3, 80.6, 61.5), _E2E),
    _cirtorch("gl18-tl-resnet152-gem-w", "gl18", "21278d5", "resnet152", 2048, "end-to-end",
              _GL18, _MS_UP, None, _acc(68.7, 44.2, 79.7, 60.3), _E2E),
    WeightPreset(name="cspdarknet53-imagenet",
                 url="https://huggingface.co/timm/cspdarknet53.ra_in1k/resolve/main/model.safetensors",
                 sha256=None, kind="backbone", architecture="cspdarknet53", dim=1024, whitening="none",
                 training_data="ImageNet-1k (timm cspdarknet53.ra_in1k); no retrieval fine-tuning",
                 accuracy={"imagenet/top1": 80.08},
                 accuracy_source="timm model card (classification, not retrieval)",
                 landmarknet="cspdarknet53-gem", filename="cspdarknet53.ra_in1k.safetensors"),
]}
