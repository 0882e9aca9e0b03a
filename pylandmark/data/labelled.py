"""Training data from a team's own labelled photos: class folders, Google Landmarks v2 lists and
plain ``path,label`` CSV files, as the SfM-120k interface the training loop reads.

A :class:`LabelledTrainingSet` holds image paths and a landmark per image; its ``clusters`` are
the landmarks (as SfM-120k's are its 3D models), so the loop's hard-negative mining rule (a
negative comes from another landmark than the query's and than the negatives already kept) is
the SfM recipe unchanged. Its (query, positive) pairs join images of the same landmark
(:func:`same_label_pairs`); a landmark with a single image gives no pair and serves only as a
negative.

Layouts read:

- class folders, ``<root>/<landmark>/<image>`` (:class:`~pylandmark.data.folders.LabelledFolder`,
  as ``pylandmark index build --labels-from-folders`` reads them);
- a Google Landmarks v2 list, ``id,landmark_id`` (``train.csv``), images at
  ``<root>/<id[0]>/<id[1]>/<id[2]>/<id>.jpg``;
- a plain list, ``path,label``, paths relative to the image root.

Lists come from elsewhere: every path must stay inside the image root
(:func:`pylandmark._files.inside`), the file is read with bounded work (:data:`MAX_CSV_BYTES`),
and a bad row raises one line naming the file and the line.
"""
from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._files import inside
from .folders import IMAGE_EXTENSIONS, LabelledFolder
from .sfm120k import DB_NAME, db_file

__all__ = ["LabelledTrainingSet", "HeldOut", "same_label_pairs", "held_out_split", "read_landmark_csv", "detect_layout",
           "readable_images", "LAYOUTS", "MAX_CSV_BYTES"]

logger = logging.getLogger(__name__)

#: what ``pylandmark train --data-root`` recognises (:func:`detect_layout`)
LAYOUTS = ("sfm120k", "folders")
#: the largest list read (GLDv2's train.csv is about 150 MB)
MAX_CSV_BYTES = 1 << 30


def same_label_pairs(targets: Any, positives: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(query, positive) pairs of images with the same label.

    Every image of a label with n >= 2 images is the query of ``min(positives, n - 1)`` pairs,
    its positives drawn without replacement among the other n - 1 images of its label by
    ``numpy.random.default_rng(seed)``; labels with one image give no pair.

    Args:
        targets: (N,) integer label of every image.
        positives: pairs per query image (>= 1).
        seed: seeds the draw (the same seed, the same pairs).

    Returns:
        ``(qidxs, pidxs)``: (P,) int64 image indices, by query image then draw order.
    """
    t = np.asarray(targets)
    if t.ndim != 1 or t.dtype.kind not in "iu":
        raise ValueError(f"targets must be a 1-d integer array, got shape {t.shape} dtype {t.dtype}")
    if isinstance(positives, bool) or not isinstance(positives, (int, np.integer)) or positives < 1:
        raise ValueError(f"positives must be an integer >= 1, got {positives!r}")
    rng = np.random.default_rng(seed)
    q_parts, p_parts = [], []
    for group in _label_groups(t):
        n = group.size
        if n < 2:
            continue
        m = min(int(positives), n - 1)
        offsets = _draw_offsets(rng, n, m) if n - 1 > m else np.tile(np.arange(1, n), (n, 1))
        others = (np.arange(n)[:, None] + offsets) % n
        q_parts.append(np.repeat(group, m))
        p_parts.append(group[others].reshape(-1))
    if not q_parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    q, p = np.concatenate(q_parts), np.concatenate(p_parts)
    by_query = np.argsort(q, kind="stable")
    return q[by_query].astype(np.int64), p[by_query].astype(np.int64)


def _label_groups(t: np.ndarray) -> list[np.ndarray]:
    """The image indices of each label (ascending), labels in sorted order: one sort, not a scan
    of every image per label."""
    if not t.size:
        return []
    order = np.argsort(t, kind="stable")
    starts = np.flatnonzero(np.r_[True, t[order][1:] != t[order][:-1]])
    return np.split(order, starts[1:])


#: random draws held at once by _draw_offsets (32 MiB of float64)
_DRAW_CELLS = 1 << 22


def _draw_offsets(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """(n, m) distinct offsets in [1, n) per row: the first m of a random permutation of the
    n - 1 other members (the positions of the m smallest of n - 1 uniform draws), drawn a block
    of rows at a time so that a landmark with many photos needs no (n, n - 1) array."""
    rows = max(1, _DRAW_CELLS // (n - 1))
    out = np.empty((n, m), dtype=np.int64)
    for r0 in range(0, n, rows):
        u = rng.random((min(rows, n - r0), n - 1))
        first = np.argpartition(u, m - 1, axis=1)[:, :m]
        out[r0:r0 + u.shape[0]] = np.take_along_axis(first, np.argsort(np.take_along_axis(u, first, axis=1),
                                                                       axis=1), axis=1) + 1
    return out


def held_out_split(targets: Any, fraction: float, seed: int = 0, min_train: int = 2) -> np.ndarray:
    """A seeded per-landmark hold-out: a boolean (N,) mask of the held-out images.

    A landmark with n images holds out ``round(n * fraction)`` of them (at least one), drawn by
    ``numpy.random.default_rng(seed)``, when ``n - held >= min_train`` (it keeps a training pair);
    smaller landmarks stay whole in training.
    """
    t = np.asarray(targets)
    if not 0 <= float(fraction) < 1:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {fraction!r}")
    held = np.zeros(t.size, dtype=bool)
    if fraction == 0:
        return held
    rng = np.random.default_rng(seed)
    for group in _label_groups(t):
        k = max(1, int(round(group.size * float(fraction))))
        if group.size - k >= min_train:
            held[rng.choice(group, size=k, replace=False)] = True
    return held


class LabelledTrainingSet:
    """Images with landmark labels, as the training loop reads SfM-120k.

    Args:
        paths: (N,) image files.
        labels: (N,) landmark of every image (strings or ints).
        positives: pairs per query image (:func:`same_label_pairs`).
        seed: seeds the pairs.
        source: what the set was read from (messages).

    Attributes:
        images: (N,) paths.
        labels: (N,) landmark names (str).
        classes: the sorted landmark names.
        clusters: (N,) int64 landmark index of every image (into ``classes``).
        qidxs, pidxs: (P,) int64 same-landmark (query, positive) image indices.
    """

    def __init__(self, paths: Sequence[Path], labels: Sequence[Any], *, positives: int = 5, seed: int = 0,
                 source: str = "labelled images"):
        if len(paths) != len(labels):
            raise ValueError(f"{source}: {len(paths)} paths but {len(labels)} labels")
        if not paths:
            raise ValueError(f"{source}: no images")
        self.images = [Path(p) for p in paths]
        self.labels = [str(lab) for lab in labels]
        self.classes = sorted(set(self.labels))
        index = {c: i for i, c in enumerate(self.classes)}
        self.clusters = np.array([index[lab] for lab in self.labels], dtype=np.int64)
        self.source, self.positives, self.seed = source, positives, seed
        self.qidxs, self.pidxs = same_label_pairs(self.clusters, positives, seed)
        if self.qidxs.size == 0:
            raise ValueError(f"{source}: no landmark has two images, so there is no (query, positive) pair "
                             "to train on; give every landmark at least two photos")
        if len(self.classes) < 2:
            raise ValueError(f"{source}: all {len(self.images)} images are of one landmark "
                             f"({self.classes[0]!r}), so there are no negatives; give at least two landmarks")
        singles = int(np.count_nonzero(np.bincount(self.clusters) == 1))
        if singles:
            logger.info("%s: %d landmark(s) with a single image serve only as negatives", source, singles)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def n_pairs(self) -> int:
        return int(self.qidxs.size)

    def subset(self, keep: Any, source: str) -> LabelledTrainingSet:
        """The images where the (N,) mask ``keep`` is true, with pairs drawn anew among them."""
        mask = np.asarray(keep, dtype=bool)
        return LabelledTrainingSet([p for p, k in zip(self.images, mask) if k],
                                   [lab for lab, k in zip(self.labels, mask) if k],
                                   positives=self.positives, seed=self.seed, source=source)

    def split(self, fraction: float, seed: int = 0) -> tuple[LabelledTrainingSet, HeldOut | None]:
        """The training photos and the held-out ones (:func:`held_out_split`); (self, None) when
        no landmark is large enough to give any."""
        held = held_out_split(self.clusters, fraction, seed)
        if not held.any():
            return self, None
        train = self.subset(~held, self.source)
        return train, HeldOut([p for p, h in zip(self.images, held) if h],
                              [lab for lab, h in zip(self.labels, held) if h], train.images, train.labels)

    @classmethod
    def from_folders(cls, root: str | os.PathLike, *, bad_images: str = "stop", **kwargs: Any) -> LabelledTrainingSet:
        """Class folders ``<root>/<landmark>/<image>``; files that are not images are handled as
        :func:`readable_images` says."""
        folder = LabelledFolder(root)
        source = f"{folder.root} (class folders)"
        paths, labels = readable_images(folder.paths, folder.labels, bad_images, source)
        return cls(paths, labels, source=source, **kwargs)

    @classmethod
    def from_csv(cls, csv_path: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
                 bad_images: str = "stop", **kwargs: Any) -> LabelledTrainingSet:
        """A list (:func:`read_landmark_csv`); listed files that are missing or not images are
        handled as :func:`readable_images` says."""
        paths, labels = read_landmark_csv(csv_path, image_root, missing=bad_images)
        source = f"{csv_path} (landmark list)"
        paths, labels = readable_images(paths, labels, bad_images, source)
        return cls(paths, labels, source=source, **kwargs)

    def __repr__(self) -> str:
        return (f"LabelledTrainingSet({self.source}: images={len(self)}, landmarks={len(self.classes)}, "
                f"pairs={self.n_pairs})")


@dataclass
class HeldOut:
    """Held-out photos to validate on: each query is recognised among the training photos.

    Attributes:
        query_images, query_labels: (Q,) the held-out photos and their landmarks.
        db_images, db_labels: (N,) the training photos and their landmarks.
    """

    query_images: list[Path]
    query_labels: list[str]
    db_images: list[Path]
    db_labels: list[str]


def readable_images(paths: Sequence[Path], labels: Sequence[Any], bad_images: str,
                    source: str) -> tuple[list[Path], list[Any]]:
    """The images whose header opens as a supported raster format
    (:func:`pylandmark.data.images.open_raster`: the header only, so a photo truncated further
    on fails later, when it is decoded, naming the file). ``bad_images="stop"`` raises on the
    first that does not open; ``"skip"`` leaves them out with a count."""
    from .images import ImageLoadError, open_raster

    if bad_images not in ("stop", "skip"):
        raise ValueError(f"bad_images must be 'stop' or 'skip', got {bad_images!r}")
    keep_paths, keep_labels, bad = [], [], []
    for path, label in zip(paths, labels):
        try:
            with open(path, "rb") as f, open_raster(f, str(path)):
                pass
        except (OSError, ImageLoadError) as err:
            if bad_images == "stop":
                raise ImageLoadError(f"{source}: {err} (--bad-images skip leaves such files out)") from None
            bad.append(path)
            continue
        keep_paths.append(path)
        keep_labels.append(label)
    if bad:
        logger.warning("%s: skipped %d file(s) that are not readable images, e.g. %s", source, len(bad), bad[0])
    return keep_paths, keep_labels


def gldv2_path(root: Path, image_id: str, where: str) -> Path:
    """``<root>/<id[0]>/<id[1]>/<id[2]>/<id>.jpg``, inside ``root``."""
    if len(image_id) < 3 or not image_id.isalnum():
        raise ValueError(f"{where}: image id {image_id!r:.80} is not a Google Landmarks id (letters and digits, "
                         "at least 3)")
    return inside(root, f"{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg", where)


def read_landmark_csv(csv_path: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
                      missing: str = "stop") -> tuple[list[Path], list[str]]:
    """Image paths and landmarks from a list with a header row (``missing``: "stop" raises on a
    listed file that does not exist, "skip" leaves its row out with a count).

    ``id,landmark_id`` (Google Landmarks v2 ``train.csv``; images at
    ``<image_root>/<a>/<b>/<c>/<id>.jpg``) or ``path,label`` (paths relative to ``image_root``);
    other columns are ignored. ``image_root`` defaults to the list's folder.

    Raises:
        FileNotFoundError: no list, or (``missing="stop"``) an image file that does not exist.
        ValueError: a header without either column pair, an empty field, a path outside the
            image root, a file over :data:`MAX_CSV_BYTES` (each names the file and line).
    """
    if missing not in ("stop", "skip"):
        raise ValueError(f"missing must be 'stop' or 'skip', got {missing!r}")
    path = Path(csv_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"landmark list not found: {path}")
    if path.stat().st_size > MAX_CSV_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, more than the {MAX_CSV_BYTES} a list may have")
    root = Path(image_root).expanduser() if image_root is not None else path.parent
    if not root.is_dir():
        raise FileNotFoundError(f"image root {root} is not a directory")
    text = path.read_bytes().decode("utf-8-sig", errors="strict")
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        raise ValueError(f"{path}: empty; expected a header row 'id,landmark_id' or 'path,label'")
    names = [h.strip().lower() for h in header]
    if "id" in names and "landmark_id" in names:
        key, value, gld = names.index("id"), names.index("landmark_id"), True
    elif "path" in names and "label" in names:
        key, value, gld = names.index("path"), names.index("label"), False
    else:
        raise ValueError(f"{path}:1: the header {header!r:.120} has neither 'id,landmark_id' (Google Landmarks) "
                         "nor 'path,label' columns")
    paths: list[Path] = []
    labels: list[str] = []
    absent = 0
    for line, row in enumerate(reader, start=2):
        if not row or all(not f.strip() for f in row):
            continue
        where = f"{path}:{line}"
        if len(row) <= max(key, value):
            raise ValueError(f"{where}: {len(row)} field(s), the header names {len(names)}")
        name, label = row[key].strip(), row[value].strip()
        if not name or not label:
            raise ValueError(f"{where}: empty {'id' if gld else 'path'} or label")
        image = gldv2_path(root, name, where) if gld else inside(root, name, f"{where}: the path")
        if image.suffix.lower() not in IMAGE_EXTENSIONS:
            raise ValueError(f"{where}: {name!r:.80} is not an image file name ({', '.join(IMAGE_EXTENSIONS)})")
        if not image.is_file():
            if missing == "stop":
                raise FileNotFoundError(f"{where}: no image file {image} (--bad-images skip leaves such rows out)")
            absent += 1
            continue
        paths.append(image)
        labels.append(label)
    if absent:
        logger.warning("%s: %d listed image(s) are missing and were left out", path, absent)
    if not paths:
        raise ValueError(f"{path}: no image rows")
    return paths, labels


def detect_layout(root: str | os.PathLike, db_name: str = DB_NAME) -> str:
    """What ``root`` holds, one of :data:`LAYOUTS`: ``"sfm120k"`` (``<db_name>.pkl`` there or in
    ``dbs/``: :func:`~pylandmark.data.sfm120k.db_file`) or ``"folders"`` (sub-folders holding
    images)."""
    r = Path(root).expanduser()
    if not r.is_dir():
        raise FileNotFoundError(f"data root {r} is not a directory")
    if db_file(r, db_name) is not None:
        return "sfm120k"
    for sub in sorted(p for p in r.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if any(f.suffix.lower() in IMAGE_EXTENSIONS for f in sub.iterdir() if f.is_file()):
            return "folders"
    raise ValueError(f"data root {r} holds neither SfM-120k ({db_name}.pkl) nor class folders "
                     "(<root>/<landmark>/<image>); for a list give --data-csv, for a COLMAP model --colmap")
