"""Synthetic landmark datasets in the real on-disk formats, for tests, examples and benchmarks.

:func:`make_sfm_dataset` draws procedural "scenes" (one per cluster, the stand-in for a 3D
model of SfM-120k) and renders several views of each: random crops at different scales, small
rotations, perspective warps, and photometric changes (brightness, contrast, colour cast, blur,
noise). Clusters come in *families* that share their background, palette and facade layout and
differ in their details, so the hardest negatives of a query look alike at a glance but belong
to other clusters, as in the real data. The files are written exactly as SfM-120k ships them:
``<root>/retrieval-SfM-120k.pkl`` (``{'train': {...}, 'val': {...}}`` with ``cids``,
``cluster``, ``qidxs``, ``pidxs``), ``<root>/retrieval-SfM-120k-whiten.pkl`` (``cids``,
``qidxs``, ``pidxs``) and JPEG images at ``<root>/ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid>``
(no extension).

:func:`make_revisited_dataset` writes a small dataset in the revisited Oxford / Paris layout
(``<root>/<name>/gnd_<name>.pkl`` and ``<root>/<name>/jpg/<name>.jpg``) from the same kind of
scenes, with easy (mild view change), hard (strong view change) and junk (barely visible) images
per query.

Everything is drawn from ``numpy.random.default_rng(seed)``: the same arguments give the same
files.
"""
from __future__ import annotations

import logging
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .._checks import check_int

__all__ = ["make_sfm_dataset", "make_revisited_dataset", "render_scene", "render_view"]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- scenes


@dataclass
class _Family:
    sky: tuple[np.ndarray, np.ndarray]
    ground: np.ndarray
    horizon: float
    facade: np.ndarray
    window: np.ndarray
    rows: int
    cols: int
    roof: int  # 0 flat, 1 triangle, 2 dome


def _color(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> np.ndarray:
    return rng.integers(lo, hi, size=3).astype(np.float64)


def _jitter(c: np.ndarray, rng: np.random.Generator, amount: float) -> tuple[int, int, int]:
    r, g, b = (int(x) for x in np.clip(c + rng.normal(0, amount, size=3), 0, 255))
    return r, g, b


def _draw_family(rng: np.random.Generator) -> _Family:
    return _Family(sky=(_color(rng, 90, 256), _color(rng, 40, 220)), ground=_color(rng, 30, 200),
                   horizon=float(rng.uniform(0.55, 0.8)), facade=_color(rng, 40, 240),
                   window=_color(rng, 0, 200), rows=int(rng.integers(2, 5)), cols=int(rng.integers(2, 6)),
                   roof=int(rng.integers(0, 3)))


def render_scene(family_seed: int, scene_seed: int, size: int) -> Image.Image:
    """Renders one scene (a square RGB canvas of side ``size``).

    ``family_seed`` fixes what scenes of one family share (background, palette, building
    layout); ``scene_seed`` draws what makes this scene unique (building proportions and
    position, window pattern, ornaments, extra objects).
    """
    size = check_int(size, "size", minimum=16)
    fam = _draw_family(np.random.default_rng(family_seed))
    rng = np.random.default_rng(scene_seed)
    s = size
    # background: vertical sky gradient, ground below the horizon
    t = np.linspace(0.0, 1.0, s)[:, None, None]
    sky = fam.sky[0] * (1 - t) + fam.sky[1] * t
    img = np.broadcast_to(sky, (s, s, 3)).copy()
    hy = int(fam.horizon * s)
    img[hy:] = fam.ground + rng.normal(0, 6, size=(s - hy, 1, 3))
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(canvas)

    # distant objects (trees / hills): family-coloured blobs at scene-specific places
    for _ in range(int(rng.integers(2, 6))):
        cx, r = rng.uniform(0, s), rng.uniform(0.04, 0.12) * s
        cy = hy - rng.uniform(0, 0.05) * s
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_jitter(fam.ground * 0.7, rng, 12))

    # the building: family layout, scene-specific proportions, position and details
    bw = rng.uniform(0.35, 0.6) * s
    bh = rng.uniform(0.3, 0.5) * s
    bx = rng.uniform(0.1 * s, 0.9 * s - bw)
    by = hy - bh
    facade = _jitter(fam.facade, rng, 10)
    d.rectangle([bx, by, bx + bw, hy], fill=facade, outline=(20, 20, 20))
    if fam.roof == 1:
        peak = rng.uniform(0.1, 0.3) * s
        d.polygon([(bx - 0.03 * s, by), (bx + bw + 0.03 * s, by), (bx + bw / 2 + rng.uniform(-0.1, 0.1) * bw,
                                                                   by - peak)],
                  fill=_jitter(fam.facade * 0.6, rng, 10))
    elif fam.roof == 2:
        r = bw * rng.uniform(0.2, 0.35)
        cx = bx + bw / 2
        d.pieslice([cx - r, by - r, cx + r, by + r], 180, 360, fill=_jitter(fam.window, rng, 20))
    # windows: a grid with scene-specific gaps, sizes and arched / square shapes
    mask = rng.random((fam.rows, fam.cols)) < rng.uniform(0.6, 0.95)
    arched = rng.random() < 0.5
    ww, wh = bw / (fam.cols * 1.6 + 0.6), bh / (fam.rows * 1.6 + 0.6)
    for i in range(fam.rows):
        for j in range(fam.cols):
            if not mask[i, j]:
                continue
            x0 = bx + ww * (0.6 + 1.6 * j)
            y0 = by + wh * (0.6 + 1.6 * i)
            col: tuple[int, ...] = _jitter(fam.window, rng, 8)
            if arched:
                arch = min(ww, wh)
                d.rectangle([x0, y0 + arch / 2, x0 + ww, y0 + max(wh, arch / 2)], fill=col)
                d.pieslice([x0, y0, x0 + ww, y0 + arch], 180, 360, fill=col)
            else:
                d.rectangle([x0, y0, x0 + ww, y0 + wh], fill=col)
    # scene-specific ornaments: distinctive coloured shapes on and around the building
    for _ in range(int(rng.integers(3, 7))):
        kind = int(rng.integers(0, 4))
        cx, cy = rng.uniform(0.05, 0.95) * s, rng.uniform(0.05, 0.95) * s
        r = rng.uniform(0.03, 0.09) * s
        col = tuple(int(v) for v in _color(rng))
        if kind == 0:
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
        elif kind == 1:
            d.rectangle([cx - r, cy - r * 0.5, cx + r, cy + r * 0.5], fill=col)
        elif kind == 2:
            pts = [(cx + r * math.cos(a), cy + r * math.sin(a))
                   for a in np.sort(rng.uniform(0, 2 * math.pi, size=int(rng.integers(3, 7))))]
            d.polygon(pts, fill=col)
        else:
            for k in range(int(rng.integers(2, 5))):  # stripes
                d.line([cx - r, cy - r + k * r * 0.5, cx + r, cy - r + k * r * 0.5], fill=col,
                       width=max(1, int(r * 0.2)))
    # fine texture so that crops at any scale carry some detail
    noise = rng.normal(0, 5, size=(s, s, 1))
    arr = np.clip(np.asarray(canvas, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _perspective_coeffs(dst: np.ndarray, src: np.ndarray) -> list[float]:
    """Coefficients of PIL's PERSPECTIVE transform mapping output points ``dst`` to input
    points ``src`` (4 x 2 each)."""
    a = np.zeros((8, 8))
    b = np.zeros(8)
    for k, ((x, y), (u, v)) in enumerate(zip(dst, src)):
        a[2 * k] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * k + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
        b[2 * k], b[2 * k + 1] = u, v
    return [float(c) for c in np.linalg.solve(a, b)]


def render_view(scene: Image.Image, rng: np.random.Generator, out_size: int, *,
                strength: float = 1.0, lighting: float = 1.0) -> Image.Image:
    """A random view of ``scene``: crop (scale, position), rotation, perspective warp and
    photometric change; the output's longer side is ``out_size`` and its aspect ratio is
    random (landscape or portrait). ``strength`` scales how far the view departs from a
    centred, frontal one (0: almost none, 1: the default, 2: hard); ``lighting`` scales the
    illumination change (per-channel gain, i.e. colour temperature, brightness, contrast,
    gamma: the time of day and weather of a photo; 0: none)."""
    s = scene.size[0]
    st = float(strength)
    aspect = rng.uniform(0.6, 1.0)
    landscape = rng.random() < 0.6
    ow, oh = (out_size, max(8, round(out_size * aspect))) if landscape else \
        (max(8, round(out_size * aspect)), out_size)
    # crop window in the scene: side = scale * s, centre jittered, rotated by angle
    scale = float(np.clip(rng.uniform(0.6, 0.85) - 0.1 * st * rng.random(), 0.3, 0.95))
    half = 0.5 * scale * s
    cx = s / 2 + rng.uniform(-1, 1) * min(0.12 * st * s, s / 2 - half)
    cy = s / 2 + rng.uniform(-1, 1) * min(0.1 * st * s, s / 2 - half)
    ang = math.radians(rng.uniform(-10, 10) * st)
    hx, hy = half * ow / max(ow, oh), half * oh / max(ow, oh)
    corners = np.array([[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]])
    corners = corners + rng.uniform(-0.12, 0.12, size=(4, 2)) * half * st  # perspective
    rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
    src = corners @ rot.T + [cx, cy]
    dst = np.array([[0, 0], [ow, 0], [ow, oh], [0, oh]], dtype=np.float64)
    view = scene.transform((ow, oh), Image.Transform.PERSPECTIVE, _perspective_coeffs(dst, src),
                           Image.Resampling.BICUBIC, fillcolor=(0, 0, 0))
    # photometric change: illumination (gain per channel, gamma, contrast, brightness), noise
    lt = float(lighting)
    a = np.asarray(view, dtype=np.float64) / 255.0
    a = a ** math.exp(rng.normal(0, 0.15 * lt))
    a = a * np.exp(rng.normal(0, 0.05 * lt, size=3))
    a = (a - 0.5) * math.exp(rng.normal(0, 0.12 * lt)) + 0.5 + rng.normal(0, 0.06 * lt)
    a = a * 255.0 + rng.normal(0, 3.0, size=a.shape)
    view = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.3 * st:
        view = view.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    return view


# ----------------------------------------------------------------------------------- SfM-120k


def _cid(rng: np.random.Generator, used: set[str]) -> str:
    while True:
        cid = "".join(f"{b:02x}" for b in rng.integers(0, 256, size=16))
        if cid not in used:
            used.add(cid)
            return cid


def _image_path(root: Path, cid: str) -> Path:
    return root / "ims" / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid


def make_sfm_dataset(root: str | os.PathLike, n_clusters: int = 24, images_per_cluster: int = 8,
                     image_size: int = 128, seed: int = 0, *, val_clusters: int | None = None,
                     family_size: int = 3, whiten_pairs: bool = True, jpeg_quality: int = 90,
                     lighting: float = 1.0, name: str = "retrieval-SfM-120k") -> Path:
    """Writes a small dataset in the SfM-120k on-disk format under ``root``.

    Args:
        root: output folder (created). Receives ``<name>.pkl``, ``<name>-whiten.pkl`` and
            ``ims/``.
        n_clusters: number of clusters (scenes) in all; the last ``val_clusters`` of them form
            the ``val`` split, the others ``train``.
        images_per_cluster: views rendered per cluster (>= 2).
        image_size: longer side of the written JPEGs.
        seed: seeds everything.
        val_clusters: clusters in the val split (default ``max(2, n_clusters // 4)``); they
            belong to their own families, disjoint from the training ones.
        family_size: clusters per family (look-alike scenes: the hard negatives).
        whiten_pairs: also write ``<name>-whiten.pkl`` (pairs drawn from the training images).
        jpeg_quality: JPEG quality of the images.
        lighting: strength of the illumination change between views (see :func:`render_view`).
        name: base name of the pickles.

    Each image is a query once per split, with a random other view of its cluster as the
    positive (``qidxs`` / ``pidxs`` parallel lists); ``cluster`` holds the cluster id of every
    image (train and val ids are disjoint). Returns ``root``.
    """
    n_clusters = check_int(n_clusters, "n_clusters", minimum=3)
    images_per_cluster = check_int(images_per_cluster, "images_per_cluster", minimum=2)
    image_size = check_int(image_size, "image_size", minimum=16)
    family_size = check_int(family_size, "family_size", minimum=1)
    if val_clusters is None:
        val_clusters = max(2, n_clusters // 4)
    val_clusters = check_int(val_clusters, "val_clusters", minimum=0)
    if n_clusters - val_clusters < 2:
        raise ValueError(f"val_clusters={val_clusters} leaves {n_clusters - val_clusters} training "
                         f"clusters of n_clusters={n_clusters}; at least 2 are needed")
    if not 1 <= int(jpeg_quality) <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality!r}")
    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    used: set[str] = set()
    scene_px = int(round(image_size * 1.6))
    splits: dict[str, dict[str, list[Any]]] = {}
    n_train = n_clusters - val_clusters
    fam_seeds = rng.integers(0, 2**62, size=n_clusters)
    for split, clusters in (("train", range(n_train)), ("val", range(n_train, n_clusters))):
        cids: list[str] = []
        cluster: list[int] = []
        qidxs: list[int] = []
        pidxs: list[int] = []
        first = list(clusters)[0] if len(clusters) else 0
        for c in clusters:
            # families never straddle the train / val border
            fam = int(fam_seeds[first + (c - first) // family_size * family_size])
            scene = render_scene(fam, int(rng.integers(0, 2**62)), scene_px)
            start = len(cids)
            for _ in range(images_per_cluster):
                cid = _cid(rng, used)
                view = render_view(scene, rng, image_size, lighting=lighting)
                p = _image_path(out, cid)
                p.parent.mkdir(parents=True, exist_ok=True)
                view.save(p, format="JPEG", quality=int(jpeg_quality))
                cids.append(cid)
                cluster.append(int(c))
            members = list(range(start, len(cids)))
            for q in members:
                others = [m for m in members if m != q]
                qidxs.append(q)
                pidxs.append(int(others[int(rng.integers(0, len(others)))]))
        splits[split] = {"cids": cids, "cluster": cluster, "qidxs": qidxs, "pidxs": pidxs}
    with open(out / f"{name}.pkl", "wb") as f:
        pickle.dump(splits, f, protocol=2)
    if whiten_pairs:
        tr = splits["train"]
        with open(out / f"{name}-whiten.pkl", "wb") as f:
            pickle.dump({"cids": list(tr["cids"]), "qidxs": list(tr["qidxs"]), "pidxs": list(tr["pidxs"])},
                        f, protocol=2)
    logger.info("synthetic SfM dataset: %d train / %d val clusters x %d images at %d px in %s",
                n_train, val_clusters, images_per_cluster, image_size, out)
    return out


# ----------------------------------------------------------------------------------- revisited


def make_revisited_dataset(root: str | os.PathLike, name: str = "roxford5k", n_clusters: int = 6,
                           db_per_cluster: int = 6, queries_per_cluster: int = 1,
                           image_size: int = 128, seed: int = 0, *, family_size: int = 3,
                           distractors: int = 0) -> Path:
    """Writes a small dataset in the revisited Oxford / Paris layout under ``root``.

    ``<root>/<name>/gnd_<name>.pkl`` holds ``imlist``, ``qimlist`` and ``gnd`` (per query:
    ``bbx`` = the whole image, ``easy``, ``hard``, ``junk`` index lists into ``imlist``); images
    are ``<root>/<name>/jpg/<image name>.jpg``. Per cluster, database views drawn with a mild
    change are *easy*, strong ones *hard*, and one almost-empty crop per cluster is *junk*.
    ``distractors`` extra database images of unrelated scenes are added. Returns
    ``<root>/<name>``.
    """
    if name not in ("roxford5k", "rparis6k"):
        raise ValueError(f"name must be 'roxford5k' or 'rparis6k', got {name!r}")
    n_clusters = check_int(n_clusters, "n_clusters", minimum=1)
    db_per_cluster = check_int(db_per_cluster, "db_per_cluster", minimum=2)
    queries_per_cluster = check_int(queries_per_cluster, "queries_per_cluster", minimum=1)
    image_size = check_int(image_size, "image_size", minimum=16)
    distractors = check_int(distractors, "distractors", minimum=0)
    folder = Path(root) / name
    jpg = folder / "jpg"
    jpg.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scene_px = int(round(image_size * 1.6))
    imlist: list[str] = []
    qimlist: list[str] = []
    gnd: list[dict[str, Any]] = []
    fam_seeds = rng.integers(0, 2**62, size=n_clusters)
    pending: list[tuple[int, list[int], list[int], list[int], Image.Image]] = []
    for c in range(n_clusters):
        scene = render_scene(int(fam_seeds[c // family_size * family_size]), int(rng.integers(0, 2**62)),
                             scene_px)
        easy: list[int] = []
        hard: list[int] = []
        junk: list[int] = []
        for j in range(db_per_cluster):
            strength = 0.6 if j % 2 == 0 else 1.8
            nm = f"{name}_c{c:03d}_{j:03d}"
            render_view(scene, rng, image_size, strength=strength).save(jpg / f"{nm}.jpg", quality=90)
            (easy if j % 2 == 0 else hard).append(len(imlist))
            imlist.append(nm)
        # junk: a small corner of the scene, blown up
        nm = f"{name}_c{c:03d}_junk"
        corner = scene.crop((0, 0, scene_px // 5, scene_px // 5)).resize((image_size, image_size))
        corner.save(jpg / f"{nm}.jpg", quality=90)
        junk.append(len(imlist))
        imlist.append(nm)
        pending.append((c, easy, hard, junk, scene))
    for k in range(distractors):
        scene = render_scene(int(rng.integers(0, 2**62)), int(rng.integers(0, 2**62)), scene_px)
        nm = f"{name}_distractor_{k:04d}"
        render_view(scene, rng, image_size).save(jpg / f"{nm}.jpg", quality=90)
        imlist.append(nm)
    for c, easy, hard, junk, scene in pending:
        for qi in range(queries_per_cluster):
            nm = f"{name}_query_c{c:03d}_{qi}"
            view = render_view(scene, rng, image_size, strength=0.5)
            view.save(jpg / f"{nm}.jpg", quality=90)
            w, h = view.size
            qimlist.append(nm)
            gnd.append({"bbx": [0.0, 0.0, float(w), float(h)], "easy": list(easy),
                        "hard": list(hard), "junk": list(junk)})
    with open(folder / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f, protocol=2)
    logger.info("synthetic %s: %d database images, %d queries in %s", name, len(imlist), len(qimlist),
                folder)
    return folder
