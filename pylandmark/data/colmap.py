"""Training data from a COLMAP reconstruction of one's own photos, in the SfM-120k format.

A COLMAP model (``sparse/0``: ``cameras``, ``images`` and ``points3D``, ``.bin`` or ``.txt``,
read with ``pycolmap``; ``pip install "pylandmark[colmap]"``) is made into what
:class:`~pylandmark.data.sfm120k.SfM120k` and :class:`~pylandmark.data.sfm120k.WhiteningPairs`
read, so the training loop runs on it unchanged: :func:`colmap_pairs` finds clusters and
(query, positive) pairs, :func:`write_sfm_database` writes the pickles and places the images,
:func:`colmap_to_sfm` does both.

**The images.** Every image of the model that observes at least one 3D point, sorted by name
(``ColmapPairs.names``, indices below refer to this order). Images observing no 3D point (not
registered, or nothing triangulated) are left out: nothing places them, and one of the same scene
would be a wrong negative. ``P(i)`` is the set of 3D points image ``i`` observes (an image that
observes one point twice counts it once, at its first observation in the model).

**Clusters.** Images ``i`` and ``j`` are joined when they co-observe at least ``min_shared``
points, ``|P(i) & P(j)| >= min_shared``; a cluster is a connected component of that graph,
numbered 0, 1, ... in the order of its first image. Clusters take the place of SfM-120k's 3D
models: the loop mines hard negatives only from other clusters.

**Positive pairs** (the "relaxed inliers" rule of Radenovic, Tolias & Chum, *Fine-tuning CNN
image retrieval with no human annotation*, TPAMI 2018, section 3.2, with the random pick made
deterministic). Image ``p`` is a candidate positive of query ``q`` (``p != q``) when all of:

1. ``|P(q) & P(p)| >= min_shared`` (default 15; so every pair lies inside one cluster);
2. ``|P(q) & P(p)| / |P(q)| >= min_overlap`` (t_i, default 0.2 as in the paper; evaluated in
   float64 as written);
3. ``scale(q, p) <= max_scale_change`` (t_s, default 1.5 as in the paper).

``scale(q, p)`` is estimated from the 2D observations of the shared points, not from the camera
poses: in each of the two images, their spread ``s_i = sqrt(mean_k ||x_ik - mean_k x_ik||^2) /
max(W_i, H_i)`` (``x_ik`` the pixel position at which image ``i`` observes shared point ``k``,
``W_i x H_i`` the size of its camera), and ``scale(q, p) = max(s_q / s_p, s_p / s_q)``. Dividing
by the longer side makes it the change of the shared part's size once both images are resized to
the same longer side, as training does; the spread of a point set is invariant to image rotation
and translation. A spread below 1e-6 (all shared points on one spot, up to rounding) makes the
scale infinite: no candidate.

Among its candidates each query takes ONE positive: the candidate with the most shared points,
ties going to the lower index. An image without candidates is not a query (it still serves as a
negative of the other clusters, and as a positive of others). Pairs are ordered by query index.

**The split** (:func:`write_sfm_database`): whole clusters are held out for validation when at
least 2 clusters hold pairs, otherwise a share of the single cluster's pairs; see there.

The model is read by pycolmap (C++): give it models you made, not files from elsewhere. The image
names it holds are treated as untrusted all the same: each must name a file under the image root
(:func:`pylandmark._files.inside`), and nothing is written outside ``out_dir``.
"""
from __future__ import annotations

import filecmp
import hashlib
import logging
import math
import os
import pickle
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._checks import check_int, check_number
from .._files import inside, replaced_atomically
from .sfm120k import DB_NAME, WHITEN_NAMES, cid_to_path

__all__ = ["ColmapPairs", "colmap_pairs", "write_sfm_database", "colmap_to_sfm", "image_id", "connected_components",
           "MIN_SHARED", "MIN_OVERLAP", "MAX_SCALE_CHANGE", "LINKS"]

logger = logging.getLogger(__name__)

#: defaults of the pair rule (module docstring): shared points, t_i and t_s
MIN_SHARED = 15
MIN_OVERLAP = 0.2
MAX_SCALE_CHANGE = 1.5
#: how write_sfm_database places the images
LINKS = ("hardlink", "copy")
#: ordered co-observation pairs expanded at once (bounds the temporary memory to ~100 MB)
_PAIR_BUDGET = 1 << 20
_MIN_SPREAD = 1e-6
_INSTALL = 'reading a COLMAP model needs pycolmap: pip install "pylandmark[colmap]"'


@dataclass
class ColmapPairs:
    """Clusters and positive pairs of a COLMAP model (:func:`colmap_pairs`).

    Attributes:
        names: (N,) image names as the model holds them, sorted.
        clusters: (N,) int64 cluster of every image.
        qidxs, pidxs: (P,) int64 query / positive indices into ``names``, by query.
        shared: (P,) int64 points each pair co-observes.
        points: (N,) int64 3D points each image observes, ``|P(i)|``.
        source: the model folder (messages).
    """

    names: list[str]
    clusters: np.ndarray
    qidxs: np.ndarray
    pidxs: np.ndarray
    shared: np.ndarray
    points: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return (f"ColmapPairs({self.source!r}, images={len(self.names)}, pairs={self.qidxs.size}, "
                f"clusters={np.unique(self.clusters).size})")


def image_id(name: str) -> str:
    """The SfM-120k image id of a model's image name: the 40 hex digits of the SHA-1 of its UTF-8
    bytes (stable, >= 6 characters, no separator; the loader tells the format from the bytes, so
    no extension is kept)."""
    return hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()


# ------------------------------------------------------------------------------------- reading


def _import_pycolmap() -> Any:
    try:
        import pycolmap
    except ImportError:
        raise ImportError(_INSTALL) from None
    return pycolmap


def _read_observations(model_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The model's observations of 3D points.

    Returns:
        ``(names, img, pt, u, v)``: (N,) names of the images that observe a point, in model order;
        (M,) int64 index into ``names``, int64 3D point id, and the float64 position
        ``((x - W/2) / L, (y - H/2) / L)`` of every observation (``L = max(W, H)`` of its camera).
    """
    pycolmap = _import_pycolmap()
    if not model_dir.is_dir():
        raise FileNotFoundError(f"COLMAP model {model_dir}: no such folder (give the model folder, e.g. sparse/0, "
                                "holding cameras, images and points3D .bin or .txt)")
    try:
        rec = pycolmap.Reconstruction(str(model_dir))
    except Exception as err:  # noqa: BLE001 - pycolmap raises ValueError / RuntimeError with its check text
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"COLMAP model {model_dir}: cannot read it ({first[:200]}); the folder must hold "
                         "cameras, images and points3D (.bin or .txt)") from None
    names: list[str] = []
    img: list[int] = []
    pt: list[int] = []
    xy: list[Any] = []
    half: list[tuple[float, float, float]] = []
    seen: set[str] = set()
    for _, image in sorted(rec.images.items()):
        if image.name in seen:
            raise ValueError(f"COLMAP model {model_dir}: image name {image.name!r:.80} appears twice")
        seen.add(image.name)
        if hasattr(image, "get_observation_points2D"):  # only the 2D points of a 3D point, at C++ speed
            observed = [(p.point3D_id, p.xy) for p in image.get_observation_points2D()]
        else:
            observed = [(p.point3D_id, p.xy) for p in image.points2D if p.has_point3D()]
        if not observed:
            continue
        cam = rec.cameras[image.camera_id]
        index = len(names)
        names.append(image.name)
        half.append((cam.width / 2.0, cam.height / 2.0, float(max(cam.width, cam.height, 1))))
        img.extend([index] * len(observed))
        pt.extend(o[0] for o in observed)
        xy.extend(o[1] for o in observed)
    if not names:
        return names, np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    img_a = np.asarray(img, np.int64)
    geometry = np.asarray(half, np.float64)[img_a]
    pos = np.asarray(xy, np.float64).reshape(-1, 2)
    u = (pos[:, 0] - geometry[:, 0]) / geometry[:, 2]
    v = (pos[:, 1] - geometry[:, 1]) / geometry[:, 2]
    return names, img_a, np.asarray(pt, np.int64), u, v


# ------------------------------------------------------------------------------------- co-visibility


def _reduce(keys: np.ndarray, sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sums the (K, 4) rows of ``sums`` per key; returns the sorted unique keys and their sums."""
    uk, inv = np.unique(keys, return_inverse=True)
    out = np.empty((uk.size, sums.shape[1]), np.float64)
    for j in range(sums.shape[1]):
        out[:, j] = np.bincount(inv.ravel(), weights=sums[:, j], minlength=uk.size)
    return uk, out


def _covisibility(n: int, img: np.ndarray, pt: np.ndarray, u: np.ndarray, v: np.ndarray,
                  budget: int = _PAIR_BUDGET) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Co-observation counts and moments of every ordered image pair that shares a point.

    Args:
        n: images; img, pt, u, v: (M,) observations (:func:`_read_observations`).
        budget: ordered pairs expanded at once.

    Memory: the result (K ordered pairs, 40 bytes each: sparse, never n x n) and about 100 bytes
    per pair of ``budget`` for the expansion.

    Returns:
        ``(keys, sums, points)``: (K,) int64 sorted keys ``a * n + b`` (a != b); (K, 4) float64
        ``[count, sum u_a, sum v_a, sum (u_a^2 + v_a^2)]`` over the points both observe, at their
        positions in image ``a``; (n,) int64 ``|P(i)|``.
    """
    order = np.lexsort((img, pt))  # by point, then image; stable, so the first observation leads
    img, pt, u, v = img[order], pt[order], u[order], v[order]
    first = np.ones(img.size, bool)
    first[1:] = (pt[1:] != pt[:-1]) | (img[1:] != img[:-1])
    img, pt, u, v = img[first], pt[first], u[first], v[first]
    points = np.bincount(img, minlength=n).astype(np.int64)
    starts = np.flatnonzero(np.r_[True, pt[1:] != pt[:-1]]) if pt.size else np.zeros(0, np.int64)
    lengths = np.diff(np.r_[starts, pt.size]).astype(np.int64)
    partners = np.repeat(lengths, lengths)  # the track length of every observation
    track_of = np.repeat(starts, lengths)   # where its track starts
    cum = np.cumsum(partners)
    moments = np.stack([np.ones_like(u), u, v, u * u + v * v], axis=1)
    merged = (np.zeros(0, np.int64), np.zeros((0, 4)))
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    pending = 0
    lo = 0
    while lo < pt.size:  # observations lo..hi-1 and all their partners: at most budget pairs, or one observation
        base = cum[lo - 1] if lo else 0
        hi = max(lo + 1, int(np.searchsorted(cum, base + budget, side="right")))
        per = partners[lo:hi]
        a = np.repeat(np.arange(lo, hi), per)
        run = np.cumsum(per) - per  # where each observation's run of partners starts
        b = np.repeat(track_of[lo:hi], per) + np.arange(a.size) - np.repeat(run, per)
        keep = a != b
        a, b = a[keep], b[keep]
        parts.append(_reduce(img[a] * n + img[b], moments[a]))
        pending += parts[-1][0].size
        if pending > max(budget, merged[0].size):
            merged = _reduce(np.concatenate([merged[0], *(p[0] for p in parts)]),
                             np.concatenate([merged[1], *(p[1] for p in parts)]))
            parts, pending = [], 0
        lo = hi
    if parts:
        merged = _reduce(np.concatenate([merged[0], *(p[0] for p in parts)]),
                         np.concatenate([merged[1], *(p[1] for p in parts)]))
    return merged[0], merged[1], points


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,) int64 connected component of every node of the graph with edges a[k] - b[k],
    numbered 0, 1, ... in the order of their smallest node."""
    label = np.arange(n, dtype=np.int64)
    while a.size:
        low = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, low)
        np.minimum.at(new, b, low)
        new = new[new]  # pointer jumping: each label is a node of the same component
        if np.array_equal(new, label):
            break
        label = new
    return np.unique(label, return_inverse=True)[1].ravel().astype(np.int64)


def colmap_pairs(model_dir: str | os.PathLike, *, min_shared: int = MIN_SHARED, min_overlap: float = MIN_OVERLAP,
                 max_scale_change: float = MAX_SCALE_CHANGE) -> ColmapPairs:
    """Clusters and (query, positive) pairs of a COLMAP model, by the rule of the module docstring.

    Args:
        model_dir: the model folder (``sparse/0``): cameras, images, points3D, ``.bin`` or ``.txt``.
        min_shared: points two images must co-observe to be joined in a cluster, and a pair to
            be a candidate (int >= 1).
        min_overlap: t_i, the least ``|P(q) & P(p)| / |P(q)|`` of a candidate, in [0, 1].
        max_scale_change: t_s, the largest ``scale(q, p)`` of a candidate, >= 1.

    Returns:
        :class:`ColmapPairs`: N images, P pairs.

    Raises:
        ImportError: pycolmap is not installed (the message says how to install it).
        FileNotFoundError: no folder at ``model_dir``.
        ValueError: the model cannot be read, or yields no pair.
    """
    min_shared = check_int(min_shared, "min_shared", minimum=1)
    min_overlap = check_number(min_overlap, "min_overlap", minimum=0, maximum=1)
    max_scale_change = check_number(max_scale_change, "max_scale_change", minimum=1)
    model = Path(model_dir).expanduser()
    names, img, pt, u, v = _read_observations(model)
    by_name = sorted(range(len(names)), key=names.__getitem__)
    rank = np.empty(len(names), np.int64)
    rank[by_name] = np.arange(len(names))
    names = [names[i] for i in by_name]
    n = len(names)
    keys, sums, points = _covisibility(n, rank[img] if img.size else img, pt, u, v, budget=_PAIR_BUDGET)
    a, b = keys // max(n, 1), keys % max(n, 1)
    count = sums[:, 0]
    mean_u, mean_v = sums[:, 1] / np.maximum(count, 1), sums[:, 2] / np.maximum(count, 1)
    var = sums[:, 3] / np.maximum(count, 1) - mean_u * mean_u - mean_v * mean_v
    spread = np.sqrt(np.maximum(var, 0.0))
    spread_b = spread[np.searchsorted(keys, b * n + a)] if keys.size else spread  # the same points in b
    flat = (spread < _MIN_SPREAD) | (spread_b < _MIN_SPREAD)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(flat, np.inf, np.maximum(spread / spread_b, spread_b / spread))
    shared = count.astype(np.int64)
    joined = shared >= min_shared
    ok = joined & (shared / np.maximum(points[a], 1) >= min_overlap) & (scale <= max_scale_change)
    cand = np.flatnonzero(ok)
    pick = cand[np.lexsort((b[cand], -shared[cand], a[cand]))]
    lead = np.ones(pick.size, bool)
    lead[1:] = a[pick][1:] != a[pick][:-1]
    pick = pick[lead]
    edges = joined & (a < b)
    clusters = connected_components(n, a[edges], b[edges])
    pairs = ColmapPairs(names=names, clusters=clusters, qidxs=a[pick].astype(np.int64),
                        pidxs=b[pick].astype(np.int64), shared=shared[pick], points=points, source=str(model))
    if pairs.qidxs.size == 0:
        raise ValueError(f"COLMAP model {model}: no image pair shares enough points ({n} images; min_shared="
                         f"{min_shared}, min_overlap={min_overlap}, max_scale_change={max_scale_change}): lower "
                         "--colmap-min-overlap or --colmap-min-shared, or raise --colmap-max-scale-change")
    logger.info("COLMAP model %s: %d images, %d clusters, %d pairs", model, n, np.unique(clusters).size,
                pairs.qidxs.size)
    return pairs


# ------------------------------------------------------------------------------------- writing


def _split(pairs: ColmapPairs, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                        np.ndarray]:
    """``(train_images, train_pairs, val_images, val_pairs)``: sorted image indices and pair
    indices of each split (the rule of :func:`write_sfm_database`)."""
    rng = np.random.default_rng(seed)
    n, n_pairs = len(pairs.names), pairs.qidxs.size
    q_cluster = pairs.clusters[pairs.qidxs]
    with_pairs, per_cluster = np.unique(q_cluster, return_counts=True)
    everything = np.arange(n)
    if with_pairs.size >= 2:
        order = rng.permutation(with_pairs.size)
        target = val_fraction * n_pairs
        chosen, taken = [], 0
        for i in order:
            if taken + per_cluster[i] <= target:
                chosen.append(with_pairs[i])
                taken += int(per_cluster[i])
        if not chosen:  # every cluster holds more pairs than the target: the smallest one (first in order)
            chosen = [with_pairs[order[int(np.argmin(per_cluster[order]))]]]
        in_val = np.isin(pairs.clusters, chosen)
        val_pairs = np.flatnonzero(in_val[pairs.qidxs])
        return (np.flatnonzero(~in_val), np.flatnonzero(~in_val[pairs.qidxs]), np.flatnonzero(in_val), val_pairs)
    if n_pairs < 2:
        raise ValueError(f"COLMAP model {pairs.source}: a single pair in a single cluster cannot be split into "
                         "training and validation pairs; lower --colmap-min-overlap or add photos")
    k = min(n_pairs - 1, max(1, math.floor(val_fraction * n_pairs + 0.5)))
    held = np.zeros(n_pairs, bool)
    held[rng.choice(n_pairs, size=k, replace=False)] = True
    return everything, np.flatnonzero(~held), everything, np.flatnonzero(held)


def _entry(pairs: ColmapPairs, cids: list[str], images: np.ndarray, chosen: np.ndarray) -> dict[str, list]:
    """One split of the db pickle: its images' ids and clusters, pairs re-indexed into them."""
    local = np.full(len(pairs.names), -1, np.int64)
    local[images] = np.arange(images.size)
    q, p = local[pairs.qidxs[chosen]], local[pairs.pidxs[chosen]]
    if (q < 0).any() or (p < 0).any():
        raise ValueError(f"COLMAP model {pairs.source}: a pair joins images of different clusters; "
                         "ColmapPairs must come from colmap_pairs")
    return {"cids": [cids[i] for i in images.tolist()], "cluster": pairs.clusters[images].tolist(),
            "qidxs": q.tolist(), "pidxs": p.tolist()}


def _place(src: Path, dst: Path, link: str) -> None:
    """Puts the bytes of ``src`` at ``dst`` (a hard link, else a copy), replacing atomically
    whatever else is there; a file already holding those bytes is kept."""
    if dst.exists() and (os.path.samefile(src, dst) or filecmp.cmp(src, dst, shallow=False)):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link == "hardlink":
        tmp = dst.with_name(f".{dst.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or links not allowed: copy
            pass
        else:
            try:
                os.replace(tmp, dst)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            return
    with replaced_atomically(dst) as tmp:
        shutil.copyfile(src, tmp)


def _dump(obj: Any, path: Path) -> None:
    with replaced_atomically(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=4)


def write_sfm_database(pairs: ColmapPairs, image_root: str | os.PathLike, out_dir: str | os.PathLike, *,
                       val_fraction: float = 0.1, seed: int = 0, link: str = "hardlink") -> Path:
    """Writes ``pairs`` as an SfM-120k folder that :class:`~pylandmark.data.sfm120k.SfM120k` and
    :class:`~pylandmark.data.sfm120k.WhiteningPairs` read.

    Written under ``out_dir``, images first and the db last (its presence means the folder is
    complete; each file is replaced atomically):

    - ``ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>``: every image, ``cid =``
      :func:`image_id` of its name, hard-linked to ``<image_root>/<name>`` (copied where a link
      fails, e.g. across file systems, or with ``link="copy"``);
    - ``retrieval-SfM-120k-whiten.pkl``: ``{'cids', 'qidxs', 'pidxs'}``, every image and pair;
    - ``retrieval-SfM-120k.pkl``: ``{'train': {'cids', 'cluster', 'qidxs', 'pidxs'}, 'val': ...}``.

    The split, seeded by ``numpy.random.default_rng(seed)``:

    - at least 2 clusters hold pairs: whole clusters go to val. The clusters with pairs are
      visited in a seeded random order, and one goes to val when the val pairs stay at most
      ``val_fraction`` of all pairs; if none fits, the one with fewest pairs (the first of them
      in that order). Val holds the images of its clusters, train every other image (the clusters
      without pairs included, as negatives), each split its clusters' pairs;
    - a single cluster holds pairs (at least 2 of them): ``round(val_fraction * P)`` (halves up;
      at least 1, at most P - 1) of its pairs, drawn without replacement, are val pairs; both
      splits hold every image, so val images are also training images.

    Args:
        pairs: from :func:`colmap_pairs`.
        image_root: the folder the model's image names are relative to.
        out_dir: the SfM-120k folder to write (created).
        val_fraction: the share of the pairs held out, in (0, 1).
        seed: seeds the split.
        link: "hardlink" or "copy".

    Returns:
        ``out_dir``.

    Raises:
        ValueError: an image name leaves ``image_root`` or its file is missing (one line naming
            the model), no pairs, or a bad argument.
    """
    if not isinstance(pairs, ColmapPairs):
        raise TypeError(f"pairs must be a ColmapPairs (from colmap_pairs), got {type(pairs).__name__}")
    val_fraction = check_number(val_fraction, "val_fraction", minimum=0, above=True, maximum=1)
    if val_fraction >= 1:
        raise ValueError(f"val_fraction must be below 1 (the share of pairs held out), got {val_fraction}")
    seed = check_int(seed, "seed", minimum=0)
    if link not in LINKS:
        raise ValueError(f"link must be one of {LINKS}, got {link!r}")
    if pairs.qidxs.size == 0:
        raise ValueError(f"COLMAP model {pairs.source}: no image pair shares enough points: lower "
                         "--colmap-min-overlap or --colmap-min-shared, or raise --colmap-max-scale-change")
    root, out = Path(image_root).expanduser(), Path(out_dir).expanduser()
    sources = []
    for name in pairs.names:
        src = inside(root, name, f"COLMAP model {pairs.source}: image name")
        if not src.is_file():
            raise ValueError(f"COLMAP model {pairs.source}: image {name!r:.120} not found under {root}")
        sources.append(src)
    cids = [image_id(name) for name in pairs.names]
    train_images, train_pairs, val_images, val_pairs = _split(pairs, val_fraction, seed)
    db = {"train": _entry(pairs, cids, train_images, train_pairs),
          "val": _entry(pairs, cids, val_images, val_pairs)}
    whiten = {"cids": cids, "qidxs": pairs.qidxs.tolist(), "pidxs": pairs.pidxs.tolist()}
    for src, cid in zip(sources, cids):
        _place(src, cid_to_path(out, cid), link)
    _dump(whiten, out / f"{WHITEN_NAMES[0]}.pkl")
    _dump(db, out / f"{DB_NAME}.pkl")
    logger.info("wrote %s: train %d images / %d pairs, val %d images / %d pairs", out, train_images.size,
                train_pairs.size, val_images.size, val_pairs.size)
    n_train_clusters = np.unique(pairs.clusters[train_images]).size
    if n_train_clusters < 2:
        logger.warning("COLMAP model %s: the training images form %d cluster; hard negatives come only from "
                       "other clusters, so there are none: raise --colmap-min-shared or add another model's photos",
                       pairs.source, n_train_clusters)
    return out


def colmap_to_sfm(model_dir: str | os.PathLike, image_root: str | os.PathLike, out_dir: str | os.PathLike, *,
                  min_shared: int = MIN_SHARED, min_overlap: float = MIN_OVERLAP,
                  max_scale_change: float = MAX_SCALE_CHANGE, val_fraction: float = 0.1, seed: int = 0,
                  link: str = "hardlink") -> Path:
    """:func:`colmap_pairs` of ``model_dir`` written by :func:`write_sfm_database` into ``out_dir``
    (the arguments are theirs). Returns ``out_dir``."""
    pairs = colmap_pairs(model_dir, min_shared=min_shared, min_overlap=min_overlap,
                         max_scale_change=max_scale_change)
    return write_sfm_database(pairs, image_root, out_dir, val_fraction=val_fraction, seed=seed, link=link)
