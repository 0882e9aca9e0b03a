"""Revisited Oxford and Paris (Radenovic et al., CVPR 2018): ground truth, image paths, query
crops, optional revisitop 1M distractors, and downloads of the official files.

Layout under ``root`` (as the official download script makes it)::

    <root>/roxford5k/gnd_roxford5k.pkl, <root>/roxford5k/jpg/<name>.jpg
    <root>/rparis6k/gnd_rparis6k.pkl,   <root>/rparis6k/jpg/<name>.jpg
    <root>/revisitop1m/jpg/...          (distractors, optional)

A ground-truth file directly in ``root`` (``<root>/gnd_<name>.pkl``) is found too; images are then
looked for in ``<root>/jpg``.

The ground-truth pickles are read by :mod:`pylandmark.data.safe_pickle`: the official files only
hold dicts, lists, str, int and float, so no class or function may be loaded from them (numpy
arrays are allowed, for re-saved copies), and their size, depth and element count are bounded.
Their image names (and those of a distractor list) must stay inside the ``jpg`` folder: no
absolute name, no ``..`` (:func:`pylandmark._files.inside`).
"""
from __future__ import annotations

import logging
import numbers
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .._files import inside
from . import safe_pickle
from .download import download_url, extract_tar

logger = logging.getLogger(__name__)

__all__ = ["RevisitedDataset", "download_revisited", "load_gnd", "DATASETS"]

DATASETS = ("roxford5k", "rparis6k")
DISTRACTORS = "revisitop1m"

GND_URL = "http://cmp.felk.cvut.cz/revisitop/data/datasets/{name}/gnd_{name}.pkl"
GND_MD5 = {"roxford5k": "f2b67579f625a587b5b0828dbf2e8eb0",
           "rparis6k": "2feae0a8257a5c6ca1b31b8eb73c8571"}
GND_SIZE = {"roxford5k": 149871, "rparis6k": 276508}  # bytes of the official files
#: download limits: image archives are 1-2 GB each, distractor parts about 1 GB
MAX_IMAGES_BYTES = 8 << 30
MAX_DISTRACTOR_BYTES = 16 << 30
IMAGE_URLS = {
    "roxford5k": ("https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz",),
    "rparis6k": ("https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1-v1.tgz",
                 "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_2-v1.tgz"),
}
DISTRACTOR_URL = "http://ptak.felk.cvut.cz/revisitop/revisitop1m/jpg/revisitop1m.{i}.tar.gz"
DISTRACTOR_PARTS = 100
EXPECTED_SIZES = {"roxford5k": (4993, 70), "rparis6k": (6322, 70)}
_MAX_GND_BYTES = 64 << 20  # the official files are 150 and 280 KB

def load_gnd(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a ``gnd_<dataset>.pkl`` file without executing pickle code.

    Args:
        path: the ground-truth pickle.

    Returns:
        ``{"imlist": list[str], "qimlist": list[str], "gnd": list[dict]}`` where each gnd entry
        has ``"bbx"`` (x1, y1, x2, y2 floats, 0-based) and ``"easy"``, ``"hard"``, ``"junk"``
        (int64 arrays of indices into imlist).

    Raises:
        pylandmark.data.safe_pickle.PickleRefused (a pickle.UnpicklingError and a ValueError):
            the file references code, is not a pickle, is too large or too deep, or does not
            have the ground-truth structure.
    """
    path = Path(path)
    cfg = safe_pickle.mapping(safe_pickle.load(path, numpy=True, max_bytes=_MAX_GND_BYTES),
                              f"{path}", ("imlist", "qimlist", "gnd"))
    imlist = _image_names(cfg["imlist"], path, "imlist")
    qimlist = _image_names(cfg["qimlist"], path, "qimlist")
    entries = cfg["gnd"]
    if isinstance(entries, np.ndarray) or not isinstance(entries, (list, tuple)):
        raise safe_pickle.PickleRefused(f"{path}: 'gnd' must be a list of dicts")
    if len(entries) != len(qimlist):
        raise safe_pickle.PickleRefused(f"{path}: {len(entries)} gnd entries but {len(qimlist)} queries")
    gnd = []
    for q, e in enumerate(entries):
        e = safe_pickle.mapping(e, f"{path}: gnd[{q}]")
        item: dict[str, Any] = {key: safe_pickle.index_array(e.get(key, []), f"{path}: gnd[{q}][{key!r}]", len(imlist),
                                                                  "imlist")
                                for key in ("easy", "hard", "junk")}
        if "bbx" in e and e["bbx"] is not None:
            item["bbx"] = _bbox(e["bbx"], f"{path}: gnd[{q}]['bbx']")
        else:
            item["bbx"] = None
        gnd.append(item)
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


def _image_names(values: Any, path: Path, key: str) -> list[str]:
    """The image names of a ground-truth list: each one a relative name that stays inside the
    dataset's ``jpg`` folder (:func:`pylandmark._files.inside`), never a path out of it."""
    names = safe_pickle.str_list(values, f"{path}: {key!r}")
    jpg = path.parent / "jpg"
    for i, name in enumerate(names):
        inside(jpg, name, f"{path}: {key}[{i}]", error=safe_pickle.PickleRefused)
    return names


def _bbox(value: Any, where: str) -> tuple[float, float, float, float]:
    if isinstance(value, np.ndarray):
        value = value.reshape(-1).tolist() if value.dtype.kind in "iuf" else None
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
        raise safe_pickle.PickleRefused(f"{where} must be [x1, y1, x2, y2] numbers")
    box = tuple(float(v) for v in value)
    if not all(np.isfinite(box)):
        raise safe_pickle.PickleRefused(f"{where} must be finite, got {box}")
    x1, y1, x2, y2 = box
    return x1, y1, x2, y2


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or name.lower() not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    return name.lower()


class RevisitedDataset:
    """Revisited Oxford (``"roxford5k"``) or Paris (``"rparis6k"``).

    Args:
        name: "roxford5k" or "rparis6k".
        root: folder holding ``<name>/gnd_<name>.pkl`` and ``<name>/jpg/`` (or
            ``gnd_<name>.pkl`` and ``jpg/`` directly).
        distractors: add the revisitop 1M distractors after the database images: True reads
            ``<root>/revisitop1m/`` (image list ``revisitop1m.txt`` of paths relative to its
            ``jpg/`` folder if present, else every ``*.jpg`` under ``jpg/``, sorted); a path
            names that folder instead.

    Attributes:
        name, root, dir (the folder of the ground truth), imlist, qimlist, gnd (as
        :func:`load_gnd` returns; pass it to :func:`pylandmark.evaluate.revisited`),
        distractor_paths (list of Path).
    """

    def __init__(self, name: str, root: str | os.PathLike, *,
                 distractors: bool | str | os.PathLike = False) -> None:
        self.name = _check_name(name)
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a path, got {type(root).__name__}")
        self.root = Path(root).expanduser()
        fname = f"gnd_{self.name}.pkl"
        candidates = [self.root / self.name / fname, self.root / fname]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"ground truth for {self.name} not found at {candidates[0]} (or {candidates[1]}); "
                f"run pylandmark.data.download_revisited({self.name!r}, {str(self.root)!r}) or "
                f"put {fname} there by hand")
        self.dir = found.parent
        cfg = load_gnd(found)
        self.imlist: list[str] = cfg["imlist"]
        self.qimlist: list[str] = cfg["qimlist"]
        self.gnd: list[dict[str, Any]] = cfg["gnd"]
        expected = EXPECTED_SIZES[self.name]
        if (len(self.imlist), len(self.qimlist)) != expected:
            logger.warning("%s: %d database images and %d queries, expected %d and %d", found,
                           len(self.imlist), len(self.qimlist), *expected)
        self.distractor_paths: list[Path] = []
        if distractors is not False and distractors is not None:
            folder = (self.root / DISTRACTORS if distractors is True
                      else Path(distractors).expanduser())
            self.distractor_paths = _list_distractors(folder)

    @property
    def n_db(self) -> int:
        """Database size including distractors."""
        return len(self.imlist) + len(self.distractor_paths)

    @property
    def n_queries(self) -> int:
        return len(self.qimlist)

    def image_path(self, i: int) -> Path:
        """Path of database image i (distractors follow the dataset's own images)."""
        n = len(self.imlist)
        if not -self.n_db <= i < self.n_db:
            raise IndexError(f"database index {i} out of range [0, {self.n_db})")
        i %= self.n_db
        return self.dir / "jpg" / f"{self.imlist[i]}.jpg" if i < n else self.distractor_paths[i - n]

    @property
    def images(self) -> list[Path]:
        """(n_db,) database image paths: imlist order, then the distractors."""
        return [self.dir / "jpg" / f"{n}.jpg" for n in self.imlist] + list(self.distractor_paths)

    @property
    def query_paths(self) -> list[Path]:
        """(Q,) full query image paths (crop them with :meth:`load_query`)."""
        return [self.dir / "jpg" / f"{n}.jpg" for n in self.qimlist]

    def query_bbox(self, i: int) -> tuple[float, float, float, float]:
        """(x1, y1, x2, y2) of query i in pixels, 0-based, as in the ground truth."""
        bbx = self.gnd[i]["bbx"]
        if bbx is None:
            raise ValueError(f"query {i} has no bounding box in the ground truth")
        return bbx

    def load_query(self, i: int, crop: bool = True) -> tuple[Any, tuple[int, int]]:
        """Load query i as RGB, cropped to its bounding box.

        The box is rounded to whole pixels (as PIL's crop does) and clipped to the image.

        Returns:
            (image, (W, H) of the full image): the PIL image (cropped unless ``crop=False``) and
            the full size, needed to keep the crop's scale when resizing
            (``1024 * max(crop side) / max(full side)``).
        """
        from .images import open_raster

        path = self.query_paths[i]
        with open_raster(path, str(path)) as im:  # the formats read on purpose only
            im = im.convert("RGB")
        full = im.size
        if not crop:
            return im, full
        box = _crop_box(self.query_bbox(i), full)
        return im.crop(box), full

    def evaluate(self, ranks: Any, kappas: Sequence[int] = (1, 5, 10)) -> dict[str, Any]:
        """:func:`pylandmark.evaluate.revisited` with this dataset's ground truth."""
        from ..evaluate.metrics import revisited

        return revisited(ranks, self.gnd, kappas)

    def __repr__(self) -> str:
        return (f"RevisitedDataset({self.name!r}, root={str(self.root)!r}, db={self.n_db}, "
                f"queries={self.n_queries})")


def _crop_box(bbx: Sequence[float], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Round (x1, y1, x2, y2) to whole pixels and clip it to an image of ``size`` (W, H)."""
    w, h = size
    x1, y1, x2, y2 = (int(round(float(v))) for v in bbx)
    x1, x2 = max(0, min(x1, w)), max(0, min(x2, w))
    y1, y2 = max(0, min(y1, h)), max(0, min(y2, h))
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"bounding box {tuple(bbx)} is empty inside an image of size {size}")
    if (x1, y1, x2, y2) != tuple(int(round(float(v))) for v in bbx):
        logger.debug("bounding box %s clipped to the image (%d x %d)", tuple(bbx), w, h)
    return x1, y1, x2, y2


def _list_distractors(folder: Path) -> list[Path]:
    jpg = folder / "jpg"
    listing = folder / f"{DISTRACTORS}.txt"
    if listing.is_file():
        names = [(i, ln.strip()) for i, ln in enumerate(listing.read_text().splitlines(), 1) if ln.strip()]
        paths = [inside(jpg, n if n.lower().endswith(".jpg") else n + ".jpg", f"{listing}: line {i}")
                 for i, n in names]
    elif jpg.is_dir():
        paths = sorted(p for p in jpg.rglob("*") if p.suffix.lower() == ".jpg" and p.is_file())
    else:
        raise FileNotFoundError(f"distractors not found: neither {listing} nor {jpg} exists; run "
                                "download_revisited(..., distractors=True) or pass the folder")
    logger.info("%d distractor images from %s", len(paths), folder)
    return paths


# --------------------------------------------------------------------------------- downloads


def _extract_jpgs(archive: Path, out: Path, *, flat: bool) -> int:
    """Extract the .jpg files of a tar archive into ``out`` (by basename when ``flat``, else by
    their relative path). Returns the number of files written."""
    def target(path: PurePosixPath) -> PurePosixPath | None:
        if not path.name.lower().endswith(".jpg"):
            return None
        return PurePosixPath(path.name) if flat else path

    return extract_tar(archive, out, target)


def download_revisited(name: str, root: str | os.PathLike, *, images: bool = True,
                       distractors: bool = False, keep_archives: bool = False,
                       progress: bool = True, timeout: float = 60) -> Path:
    """Fetch the official revisited Oxford / Paris files into ``<root>/<name>/``.

    The ground truth is checked against its known md5; image archives are checked against the
    size the server announces, and their .jpg files extracted into ``<root>/<name>/jpg/``
    (flat, as the ground truth names them). Work already done is skipped: a verified ground
    truth, a complete ``jpg/`` folder, distractor parts marked done.

    Args:
        name: "roxford5k" or "rparis6k".
        root: the data root (created if missing).
        images: also fetch and extract the images.
        distractors: also fetch the 100 revisitop 1M distractor archives into
            ``<root>/revisitop1m/jpg/`` (about 1M images; large).
        keep_archives: keep the downloaded .tgz files after extraction.
        progress: show download progress bars.
        timeout: network timeout in seconds.

    Returns:
        the dataset folder ``<root>/<name>``.

    Raises:
        pylandmark.data.download.DownloadError: no network or an interrupted download (the message
            says which URL failed and where to put the file by hand).
        pylandmark.data.download.ChecksumError: the ground truth has the wrong md5.
    """
    name = _check_name(name)
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path, got {type(root).__name__}")
    root = Path(root).expanduser()
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    gnd_path = download_url(GND_URL.format(name=name), folder / f"gnd_{name}.pkl",
                            md5=GND_MD5[name], size=GND_SIZE[name], progress=progress, timeout=timeout)
    if images:
        cfg = load_gnd(gnd_path)
        jpg = folder / "jpg"
        wanted = cfg["imlist"] + cfg["qimlist"]
        missing = [n for n in wanted if not (jpg / f"{n}.jpg").is_file()]
        if not missing:
            logger.info("%s: all %d images present in %s", name, len(wanted), jpg)
        else:
            for url in IMAGE_URLS[name]:
                archive = download_url(url, folder / url.rsplit("/", 1)[-1], progress=progress,
                                       timeout=timeout, max_bytes=MAX_IMAGES_BYTES)
                n = _extract_jpgs(archive, jpg, flat=True)
                logger.info("extracted %d images from %s", n, archive.name)
                if not keep_archives:
                    archive.unlink()
            missing = [n for n in wanted if not (jpg / f"{n}.jpg").is_file()]
            if missing:
                logger.warning("%s: %d of %d images named by the ground truth are missing from "
                               "%s (first: %s)", name, len(missing), len(wanted), jpg, missing[0])
    if distractors:
        dfolder = root / DISTRACTORS
        djpg = dfolder / "jpg"
        for i in range(1, DISTRACTOR_PARTS + 1):
            marker = djpg / f".done_{i}"
            if marker.is_file():
                continue
            url = DISTRACTOR_URL.format(i=i)
            archive = download_url(url, dfolder / url.rsplit("/", 1)[-1], progress=progress,
                                   timeout=timeout, max_bytes=MAX_DISTRACTOR_BYTES)
            n = _extract_jpgs(archive, djpg, flat=False)
            marker.write_text(f"{n}\n")
            logger.info("distractors part %d/%d: %d images", i, DISTRACTOR_PARTS, n)
            if not keep_archives:
                archive.unlink()
    return folder
