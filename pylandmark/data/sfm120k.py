"""SfM-120k: the training data of the unsupervised fine-tuning (Radenovic et al., TPAMI 2018).

Layout under ``root`` (what :func:`download_sfm120k` makes)::

    <root>/retrieval-SfM-120k.pkl          {'train': {...}, 'val': {...}}
    <root>/retrieval-SfM-120k-whiten.pkl   {'cids', 'qidxs', 'pidxs'} (learned whitening pairs)
    <root>/retrieval-SfM-30k-whiten.pkl    (optional, same format)
    <root>/ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>     JPEG images without extension

The pickles may also sit in ``<root>/dbs/``. Each split holds ``cids`` (image ids),
``cluster`` (the 3D model id of every image), and the parallel lists ``qidxs`` / ``pidxs``
(query and positive image indices into ``cids``).

The pickles are read by :mod:`pylandmark.data.safe_pickle`: the official files hold only dicts,
lists, strings and ints, so no global (class or function) may be loaded from them, and their
size, depth and element count are bounded. An image id's path must stay inside ``<root>/ims``
(no ``..``, no absolute path: :func:`cid_to_path`).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .._files import inside
from . import safe_pickle
from .download import download_url, extract_tar

__all__ = ["SfM120k", "WhiteningPairs", "download_sfm120k", "load_sfm_pickle", "cid_to_path", "db_file",
           "SFM_URL", "SPLITS", "EXPECTED_COUNTS"]

logger = logging.getLogger(__name__)

SFM_URL = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/train/"
DB_NAME = "retrieval-SfM-120k"
WHITEN_NAMES = ("retrieval-SfM-120k-whiten", "retrieval-SfM-30k-whiten")
IMS_ARCHIVE = "ims/ims.tar.gz"
SPLITS = ("train", "val")
#: (images, pairs) of the official retrieval-SfM-120k.pkl, per split
EXPECTED_COUNTS = {"train": (91642, 181697), "val": (6403, 1691)}
_DONE_MARKER = ".ims_extracted"
#: download limits (the official files: dbs ~30 MB each, ims.tar.gz ~20 GB)
MAX_DB_BYTES = 512 << 20
MAX_IMS_BYTES = 64 << 30


def load_sfm_pickle(path: str | os.PathLike) -> Any:
    """Reads an SfM-120k pickle (``retrieval-SfM-*.pkl``) with :mod:`pylandmark.data.safe_pickle`:
    no code runs, no global loads, and size, depth and element count are bounded.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError (``safe_pickle.PickleRefused``): not a plain pickle of containers and numbers,
            corrupt, or too large.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"SfM-120k file not found: {p}")
    return safe_pickle.load(p, f"{p} (SfM-120k)")


def cid_to_path(root: str | os.PathLike, cid: str, where: str = "cid") -> Path:
    """Image file of ``cid``: ``<root>/ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>``, which
    must stay inside ``<root>/ims`` (:func:`pylandmark._files.inside`: ids come from pickles
    from elsewhere; ``..`` or a separator in one could name any file). ``where`` names the id
    in messages."""
    if not isinstance(cid, str) or len(cid) < 6:
        raise ValueError(f"{where} must be an image id string of at least 6 characters, got {cid!r:.80}")
    what = f"{where}: the image path of id {cid!r:.80}"
    folder = inside(Path(root) / "ims", f"{cid[-2:]}/{cid[-4:-2]}/{cid[-6:-4]}", what)
    return inside(folder, cid, what)


def _image_ids(values: Any, root: Path, where: str) -> list[str]:
    """The ``cids`` of a pickle: strings of at least 6 characters whose image paths stay inside
    ``<root>/ims`` (:func:`cid_to_path`)."""
    cids = safe_pickle.str_list(values, where, 6)
    joined = "\n".join(cids)  # ids without a separator, drive colon, NUL or '..' need no look each
    if any(bad in joined for bad in ("/", "\\", ":", "\0", "..")):
        for i, cid in enumerate(cids):
            cid_to_path(root, cid, f"{where}[{i}]")
    return cids


def db_file(root: str | os.PathLike, name: str = DB_NAME) -> Path | None:
    """Where ``<name>.pkl`` is under ``root`` (there, or in ``dbs/``), or None."""
    r = Path(root)
    return next((p for p in (r / f"{name}.pkl", r / "dbs" / f"{name}.pkl") if p.is_file()), None)


def _find_db(root: Path, name: str) -> Path:
    found = db_file(root, name)
    if found is None:
        raise FileNotFoundError(f"{name}.pkl not found in {root} (nor in {root / 'dbs'}); run "
                                f"pylandmark.data.download_sfm120k({str(root)!r}) or put the file there")
    return found


class SfM120k:
    """One split of SfM-120k (or of any file in its format, e.g. the synthetic one).

    Args:
        root: folder with ``<name>.pkl`` (or ``dbs/<name>.pkl``) and ``ims/``.
        split: "train" or "val".
        name: base name of the pickle (default ``retrieval-SfM-120k``).
        check_images: verify that every image file exists (one stat per image).

    Attributes:
        root, split, name, db_path.
        cids: (N,) image ids.
        clusters: (N,) int64 cluster (3D model) id per image.
        qidxs, pidxs: (P,) int64 query / positive image indices (parallel).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", *, name: str = DB_NAME,
                 check_images: bool = False):
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a path, got {type(root).__name__}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.root = Path(root).expanduser()
        self.split, self.name = split, name
        self.db_path = _find_db(self.root, name)
        db = load_sfm_pickle(self.db_path)
        if not isinstance(db, Mapping) or split not in db:
            keys = sorted(db) if isinstance(db, Mapping) else type(db).__name__
            raise ValueError(f"{self.db_path} must be a dict with 'train' and 'val' entries, got {keys}")
        entry = db[split]
        where = f"{self.db_path.name}[{split!r}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where} must be a dict, got {type(entry).__name__}")
        missing = [k for k in ("cids", "cluster", "qidxs", "pidxs") if k not in entry]
        if missing:
            raise ValueError(f"{where} lacks {missing}; expected keys cids, cluster, qidxs, pidxs")
        self.cids = _image_ids(entry["cids"], self.root, f"{where}['cids']")
        n = len(self.cids)
        self.clusters = safe_pickle.index_array(entry["cluster"], f"{where}['cluster']")
        if self.clusters.size != n:
            raise ValueError(f"{where}: 'cluster' has {self.clusters.size} entries but 'cids' has {n}")
        self.qidxs = safe_pickle.index_array(entry["qidxs"], f"{where}['qidxs']", n, "cids")
        self.pidxs = safe_pickle.index_array(entry["pidxs"], f"{where}['pidxs']", n, "cids")
        if self.qidxs.size != self.pidxs.size:
            raise ValueError(f"{where}: 'qidxs' ({self.qidxs.size}) and 'pidxs' ({self.pidxs.size}) "
                             "must be parallel lists of the same length")
        if self.qidxs.size == 0:
            raise ValueError(f"{where} has no (query, positive) pairs")
        cross = int(np.count_nonzero(self.clusters[self.qidxs] != self.clusters[self.pidxs]))
        if cross:
            logger.warning("%s: %d of %d pairs join images of different clusters", where, cross,
                           self.qidxs.size)
        expected = EXPECTED_COUNTS[split]
        if name == DB_NAME and (n, self.qidxs.size) != expected:
            logger.info("%s: %d images and %d pairs (the official file has %d and %d)", where, n,
                        self.qidxs.size, *expected)
        if check_images:
            absent = [c for c in self.cids if not cid_to_path(self.root, c).is_file()]
            if absent:
                raise FileNotFoundError(f"{len(absent)} of {n} images of {where} are missing, e.g. "
                                        f"{cid_to_path(self.root, absent[0])}")

    def __len__(self) -> int:
        return len(self.cids)

    @property
    def n_pairs(self) -> int:
        return int(self.qidxs.size)

    def image_path(self, i: int) -> Path:
        """Path of image ``i``."""
        return cid_to_path(self.root, self.cids[i])

    @property
    def images(self) -> list[Path]:
        """(N,) image paths in ``cids`` order."""
        return [cid_to_path(self.root, c) for c in self.cids]

    def load_image(self, i: int, image_size: float | None = 362) -> Any:
        """Image ``i`` as a normalised (3, H, W) float32 tensor, longer side ``image_size``
        (never upscaled)."""
        from .images import load_image

        return load_image(self.image_path(i), image_size)

    def __repr__(self) -> str:
        return (f"SfM120k(root={str(self.root)!r}, split={self.split!r}, images={len(self)}, "
                f"pairs={self.n_pairs}, clusters={np.unique(self.clusters).size})")


class WhiteningPairs:
    """Matching pairs for learned whitening (``retrieval-SfM-120k-whiten.pkl`` or
    ``retrieval-SfM-30k-whiten.pkl``): top-level ``cids``, ``qidxs``, ``pidxs``.

    Attributes:
        root, name, path, cids, qidxs, pidxs (int64 arrays), images (paths).
    """

    def __init__(self, root: str | os.PathLike, name: str = WHITEN_NAMES[0]):
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a path, got {type(root).__name__}")
        self.root = Path(root).expanduser()
        self.name = name
        self.path = _find_db(self.root, name)
        db = load_sfm_pickle(self.path)
        if not isinstance(db, Mapping):
            raise ValueError(f"{self.path} must hold a dict with cids, qidxs, pidxs")
        missing = [k for k in ("cids", "qidxs", "pidxs") if k not in db]
        if missing:
            raise ValueError(f"{self.path} lacks {missing}; expected top-level cids, qidxs, pidxs")
        self.cids = _image_ids(db["cids"], self.root, f"{self.path.name}['cids']")
        n = len(self.cids)
        self.qidxs = safe_pickle.index_array(db["qidxs"], f"{self.path.name}['qidxs']", n)
        self.pidxs = safe_pickle.index_array(db["pidxs"], f"{self.path.name}['pidxs']", n)
        if self.qidxs.size != self.pidxs.size or self.qidxs.size == 0:
            raise ValueError(f"{self.path}: qidxs ({self.qidxs.size}) and pidxs ({self.pidxs.size}) must "
                             "be non-empty parallel lists")

    def __len__(self) -> int:
        return len(self.cids)

    @property
    def images(self) -> list[Path]:
        return [cid_to_path(self.root, c) for c in self.cids]

    def __repr__(self) -> str:
        return f"WhiteningPairs({str(self.path)!r}, images={len(self)}, pairs={self.qidxs.size})"


# --------------------------------------------------------------------------------- download


def _ims_path(path: PurePosixPath) -> PurePosixPath | None:
    """Member path below ims/ (archives may or may not carry the ims/ folder itself)."""
    parts = [q for q in path.parts if q not in (".", "")]
    if parts and parts[0] == "ims":
        parts = parts[1:]
    return PurePosixPath(*parts) if parts else None


def _extract_images(archive: Path, ims: Path) -> int:
    """Extracts the image files of ``archive`` into ``ims``. Returns files written."""
    return extract_tar(archive, ims, _ims_path)


def _verify_db(path: Path, expected: Mapping[str, tuple[int, int]] | None) -> None:
    db = load_sfm_pickle(path)
    if not isinstance(db, Mapping) or any(s not in db for s in SPLITS):
        raise ValueError(f"{path} is not an SfM-120k db (no 'train' / 'val' entries)")
    for split, (n_img, n_pairs) in (expected or {}).items():
        try:
            got = (len(db[split]["cids"]), len(db[split]["qidxs"]))
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: the {split!r} entry lacks 'cids' / 'qidxs' ({err})") from err
        if got != (n_img, n_pairs):
            raise ValueError(f"{path}: {split} has {got[0]} images and {got[1]} pairs, the official "
                             f"file has {n_img} and {n_pairs}; delete it and download again")


def download_sfm120k(root: str | os.PathLike, *, images: bool = True, whitening: bool = True,
                     keep_archive: bool = False, checksums: Mapping[str, str] | None = None,
                     base_url: str = SFM_URL,
                     expected_counts: Mapping[str, tuple[int, int]] | None = EXPECTED_COUNTS,
                     progress: bool = True, timeout: float = 60) -> Path:
    """Fetches the official SfM-120k files into ``root``.

    Downloads ``dbs/retrieval-SfM-120k.pkl`` (and, with ``whitening``, the two whitening-pair
    files) into ``root``, and ``ims/ims.tar.gz`` extracted into ``root/ims``. Every download
    resumes an interrupted transfer and checks the size the server announces
    (:func:`pylandmark.data.download.download_url`); the db is then checked for the published image
    and pair counts (train 91,642 / 181,697; val 6,403 / 1,691). Finished work is skipped: an
    existing verified file, and an image archive already extracted (marker ``ims/.ims_extracted``).

    Args:
        root: destination folder (created).
        images: fetch and extract the images (about 20 GB).
        whitening: fetch the whitening-pair files.
        keep_archive: keep ``ims.tar.gz`` after extraction.
        checksums: optional ``{file name: "md5:<hex>" or "sha256:<hex>"}`` for extra checks.
        base_url: where the files live (a mirror, or a ``file://`` folder).
        expected_counts: ``{split: (images, pairs)}`` the db must have (default: the official
            counts); None checks only the structure.
        progress: show download bars.
        timeout: network timeout in seconds.

    Returns:
        ``root``.

    Raises:
        pylandmark.data.download.DownloadError: the network failed (running again resumes).
        pylandmark.data.download.ChecksumError / ValueError: a file has the wrong hash or content.
    """
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path, got {type(root).__name__}")
    if not isinstance(base_url, str) or not base_url:
        raise ValueError(f"base_url must be a URL string, got {base_url!r}")
    base = base_url if base_url.endswith("/") else base_url + "/"
    sums = dict(checksums or {})
    for key, value in sums.items():
        if not isinstance(value, str) or ":" not in value or value.split(":", 1)[0] not in ("md5", "sha256"):
            raise ValueError(f"checksums[{key!r}] must be 'md5:<hex>' or 'sha256:<hex>', got {value!r}")

    def hashes(fname: str) -> dict[str, str]:
        if fname not in sums:
            return {}
        kind, digest = sums[fname].split(":", 1)
        return {kind: digest}

    out = Path(root).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    names = [DB_NAME] + (list(WHITEN_NAMES) if whitening else [])
    for nm in names:
        fname = f"{nm}.pkl"
        path = download_url(f"{base}dbs/{fname}", out / fname, progress=progress, timeout=timeout,
                            max_bytes=MAX_DB_BYTES, **hashes(fname))  # type: ignore[arg-type]
        if nm == DB_NAME:
            try:
                _verify_db(path, expected_counts)
            except ValueError:
                path.unlink()
                raise
    if images:
        ims = out / "ims"
        marker = ims / _DONE_MARKER
        if marker.is_file():
            logger.info("SfM-120k images already extracted in %s", ims)
        else:
            ims.mkdir(parents=True, exist_ok=True)
            archive = download_url(f"{base}{IMS_ARCHIVE}", out / "ims.tar.gz", progress=progress,
                                   timeout=timeout, max_bytes=MAX_IMS_BYTES, **hashes("ims.tar.gz"))  # type: ignore[arg-type]
            n = _extract_images(archive, ims)
            marker.write_text(f"{n}\n")
            logger.info("extracted %d SfM-120k images into %s", n, ims)
            if not keep_archive:
                archive.unlink()
        db = load_sfm_pickle(out / f"{DB_NAME}.pkl")
        absent = sum(not cid_to_path(out, c).is_file() for s in SPLITS for c in db[s]["cids"])
        if absent:
            logger.warning("%d SfM-120k images named by the db are missing under %s", absent, ims)
    return out
