"""COLMAP models as SfM-120k training data (pylandmark.data.colmap): clusters and positive pairs
against a plain-loop reference of the rule, text and binary models, pycolmap's synthetic scenes,
the written folder as SfM120k / WhiteningPairs read it, and the one-line errors."""
from __future__ import annotations

import math
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pylandmark.data import SfM120k, WhiteningPairs
from pylandmark.data import colmap as cm
from pylandmark.data.sfm120k import cid_to_path


@pytest.fixture
def pycolmap():
    return pytest.importorskip("pycolmap")


# ---------------------------------------------------------------- the rule, as plain loops


def reference(views, sizes, min_shared, min_overlap, max_scale):
    """The module docstring's rule, written independently with sets and loops.

    views: {image name: {point id: (x, y)}}; sizes: {image name: (W, H)}.
    Returns (names, clusters, pairs, shared): sorted names of the images that see a point, their
    cluster labels (numbered by first image), {(query name, positive name)}, {pair: shared}."""
    names = sorted(n for n, v in views.items() if v)

    def spread(name, pts):
        xs = [views[name][k] for k in pts]
        mx = sum(x for x, _ in xs) / len(xs)
        my = sum(y for _, y in xs) / len(xs)
        ms = sum((x - mx) ** 2 + (y - my) ** 2 for x, y in xs) / len(xs)
        return math.sqrt(ms) / max(sizes[name])

    shared = {(q, p): set(views[q]) & set(views[p]) for q in names for p in names if q != p}
    clusters, label = {}, 0
    for start in names:  # breadth-first search over the min_shared graph
        if start in clusters:
            continue
        clusters[start], todo = label, [start]
        while todo:
            cur = todo.pop()
            for other in names:
                if other != cur and other not in clusters and len(shared[cur, other]) >= min_shared:
                    clusters[other] = label
                    todo.append(other)
        label += 1
    pairs, counts = set(), {}
    for qi, q in enumerate(names):
        best = None
        for pi, p in enumerate(names):
            if pi == qi:
                continue
            s = shared[q, p]
            if len(s) < min_shared or len(s) / len(views[q]) < min_overlap:
                continue
            sq, sp = spread(q, s), spread(p, s)
            if sq < 1e-6 or sp < 1e-6 or max(sq / sp, sp / sq) > max_scale:
                continue
            if best is None or len(s) > best[0]:  # the first of equals (lower index) stays
                best = (len(s), p)
        if best is not None:
            pairs.add((q, best[1]))
            counts[q, best[1]] = best[0]
    return names, [clusters[n] for n in names], pairs, counts


def named(result):
    pairs = {(result.names[q], result.names[p]) for q, p in zip(result.qidxs, result.pidxs)}
    shared = {(result.names[q], result.names[p]): int(s) for q, p, s in zip(result.qidxs, result.pidxs, result.shared)}
    return pairs, shared


def check_against_reference(result, views, sizes, min_shared, min_overlap, max_scale):
    names, clusters, pairs, shared = reference(views, sizes, min_shared, min_overlap, max_scale)
    assert result.names == names
    assert result.clusters.dtype == np.int64 and result.clusters.tolist() == clusters
    assert named(result) == (pairs, shared)
    assert result.qidxs.tolist() == sorted(result.qidxs.tolist())  # by query
    assert result.points.tolist() == [len(views[n]) for n in names]
    return names, clusters, pairs


# ---------------------------------------------------------------- a hand-made scene, as COLMAP text


CAMERAS = {1: (640, 480), 2: (1280, 960)}


def hand_scene():
    """{name: (camera id, {point id: (x, y)})}: groups a (4 images), b (3), e (2) and f (1), zoom
    factors chosen so that scale, overlap, ties and cluster joins each decide something."""
    off = np.random.default_rng(0).uniform(-1, 1, (200, 2))

    def view(cam, zoom, pids):
        w, h = CAMERAS[cam]
        return cam, {int(k): (float(w / 2 + zoom * off[k, 0]), float(h / 2 + zoom * off[k, 1])) for k in pids}

    a_pts, b_pts, e_pts = range(0, 30), range(30, 80), range(80, 120)
    scene = {
        "a/a0.png": view(1, 100, [*a_pts, 150, 151]),   # 150, 151: 2 points shared with f0 (< min_shared)
        "a/a1.png": view(1, 110, a_pts[:20]),
        "a/a2.png": view(2, 220, a_pts[10:]),            # camera 2 at twice the zoom: the same scale as a1
        "a/a3.png": view(1, 200, a_pts),                 # twice a0's scale: no candidate at t_s = 1.5
        "b0.png": view(1, 100, b_pts),
        "b1.png": view(1, 120, b_pts[:8]),               # 8 / 50 = 0.16 of b0's points: not b0's candidate
        "b2.png": view(1, 130, b_pts),
        "e0.jpg": view(1, 100, e_pts),                   # shares 6 / 40 = 0.15 with e1: not a query
        "e1.jpg": view(1, 105, e_pts[:6]),
        "f0.jpg": view(1, 100, [150, 151, 152, 153]),    # 152, 153 also seen by f0's twin image below
        "f1.png": view(1, 100, [152, 153]),              # shares 2 with f0: a cluster of its own
        # all shared points on one spot: no scale, so no pair (their moments leave rounding noise)
        "g0.png": (1, {k: (100.1, 200.3) for k in range(160, 163)}),
        "g1.png": (1, {k: (17.9, 400.2) for k in range(160, 163)}),
        "z_unregistered.png": (1, {}),
    }
    return scene


HAND = {"min_shared": 3, "min_overlap": 0.2, "max_scale_change": 1.5}


def write_text_model(folder: Path, scene, cameras=CAMERAS, seed=1):
    """cameras.txt, images.txt, points3D.txt (https://colmap.github.io/format.html) of ``scene``;
    image ids shuffled, so that their order is not the names' order, and two 2D points without a
    3D point in every image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(scene)
    ids = rng.permutation(len(names)) + 1
    with open(folder / "cameras.txt", "w") as f:
        f.write("# CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]\n")
        for cid, (w, h) in cameras.items():
            f.write(f"{cid} SIMPLE_PINHOLE {w} {h} {max(w, h)} {w / 2} {h / 2}\n")
    tracks: dict[int, list[tuple[int, int]]] = {}
    with open(folder / "images.txt", "w") as f:
        f.write("# IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME\n# POINTS2D[] as (X, Y, POINT3D_ID)\n")
        for image_id, name in zip(ids.tolist(), names):
            cam, obs = scene[name]
            f.write(f"{image_id} 1 0 0 0 0 0 {image_id} {cam} {name}\n")
            items = [(1.5, 2.5, -1), *((x, y, pid) for pid, (x, y) in obs.items()), (3.5, 4.5, -1)]
            for idx, (_, _, pid) in enumerate(items):
                if pid >= 0:
                    tracks.setdefault(pid, []).append((image_id, idx))
            f.write(" ".join(f"{x!r} {y!r} {pid}" for x, y, pid in items) + "\n")
    with open(folder / "points3D.txt", "w") as f:
        f.write("# POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)\n")
        for pid, track in sorted(tracks.items()):
            f.write(f"{pid} 0 0 5 128 128 128 0.5 " + " ".join(f"{i} {j}" for i, j in track) + "\n")
    return folder


def scene_views(scene):
    return ({n: obs for n, (_, obs) in scene.items()}, {n: CAMERAS[cam] for n, (cam, _) in scene.items()})


def write_images(root: Path, names, seed=0):
    """A small real image (PNG or JPEG by extension, distinct pixels) for every name."""
    rng = np.random.default_rng(seed)
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(path)


def test_hand_scene_pairs_and_clusters(tmp_path, pycolmap):
    scene = hand_scene()
    model = write_text_model(tmp_path / "sparse" / "0", scene)
    result = cm.colmap_pairs(model, **HAND)
    names, clusters, pairs = check_against_reference(result, *scene_views(scene), 3, 0.2, 1.5)
    # worked out by hand from the scene's comments
    assert "z_unregistered.png" not in names
    assert pairs == {("a/a0.png", "a/a1.png"),  # a1 and a2 tie at 20 shared points: the lower index
                     ("a/a1.png", "a/a0.png"), ("a/a2.png", "a/a0.png"),
                     ("b0.png", "b2.png"), ("b1.png", "b0.png"),  # b1: b0 and b2 tie at 8
                     ("b2.png", "b0.png"), ("e1.jpg", "e0.jpg")}
    groups = {}
    for n, c in zip(names, clusters):
        groups.setdefault(c, []).append(n)
    assert sorted(groups.values()) == [["a/a0.png", "a/a1.png", "a/a2.png", "a/a3.png"],
                                       ["b0.png", "b1.png", "b2.png"], ["e0.jpg", "e1.jpg"], ["f0.jpg"],
                                       ["f1.png"], ["g0.png", "g1.png"]]
    # each threshold decides: looser ones admit what the defaults refuse
    loose, _ = named(cm.colmap_pairs(model, min_shared=3, min_overlap=0.1, max_scale_change=2.5))
    assert ("e0.jpg", "e1.jpg") in loose and ("a/a3.png", "a/a0.png") in loose
    check_against_reference(cm.colmap_pairs(model, min_shared=3, min_overlap=0.1, max_scale_change=2.5),
                            *scene_views(scene), 3, 0.1, 2.5)
    two = cm.colmap_pairs(model, min_shared=2, min_overlap=0.2, max_scale_change=1.5)
    check_against_reference(two, *scene_views(scene), 2, 0.2, 1.5)
    assert len(set(two.clusters.tolist())) == 4  # f0 joins a (2 shared) and f1


def test_binary_model_gives_the_same_pairs(tmp_path, pycolmap):
    scene = hand_scene()
    text = write_text_model(tmp_path / "text", scene)
    binary = tmp_path / "bin"
    binary.mkdir()
    pycolmap.Reconstruction(str(text)).write(str(binary))
    assert (binary / "points3D.bin").is_file() and not (binary / "points3D.txt").exists()
    a, b = cm.colmap_pairs(text, **HAND), cm.colmap_pairs(binary, **HAND)
    assert a.names == b.names and a.clusters.tolist() == b.clusters.tolist()
    assert named(a) == named(b)
    # a COLMAP 3.x binary model (no rigs.bin / frames.bin) reads the same
    for extra in ("rigs.bin", "frames.bin"):
        (binary / extra).unlink(missing_ok=True)
    assert named(cm.colmap_pairs(binary, **HAND)) == named(a)


def synthetic_views(rec):
    """{name: {point id: (x, y)}} and sizes from pycolmap's own tracks (point -> image, index)."""
    views = {im.name: {} for im in rec.images.values()}
    sizes = {}
    for pid, point in rec.points3D.items():
        for el in point.track.elements:
            image = rec.images[el.image_id]
            x, y = image.points2D[el.point2D_idx].xy
            views[image.name].setdefault(int(pid), (float(x), float(y)))
    for im in rec.images.values():
        cam = rec.cameras[im.camera_id]
        sizes[im.name] = (cam.width, cam.height)
    return views, sizes


@pytest.mark.parametrize("budget", [cm._PAIR_BUDGET, 7])
def test_synthetic_reconstruction_matches_reference(tmp_path, pycolmap, monkeypatch, budget):
    if not hasattr(pycolmap, "synthesize_dataset"):
        pytest.skip("this pycolmap has no synthesize_dataset")
    monkeypatch.setattr(cm, "_PAIR_BUDGET", budget)  # 7: many chunks and merges of the accumulation
    pycolmap.set_random_seed(5)
    options = pycolmap.SyntheticDatasetOptions()
    options.num_rigs, options.num_cameras_per_rig, options.num_frames_per_rig = 2, 1, 9
    options.num_points3D, options.track_length = 160, 3
    rec = pycolmap.synthesize_dataset(options)
    model = tmp_path / "model"
    model.mkdir()
    rec.write(str(model))
    views, sizes = synthetic_views(pycolmap.Reconstruction(str(model)))
    rules = [(3, 0.2, 1.5), (3, 0.05, 1.5), (3, 0.2, 1.05), (6, 0.1, 1.1)]
    seen = []
    for ms, mo, sc in rules:
        result = cm.colmap_pairs(model, min_shared=ms, min_overlap=mo, max_scale_change=sc)
        _, clusters, pairs = check_against_reference(result, views, sizes, ms, mo, sc)
        seen.append((len(pairs), len(set(clusters))))
    # the rules were chosen so that each threshold decides something in this scene (18 images)
    assert seen[1][0] > seen[0][0] > seen[2][0] > 0, seen  # overlap, then scale, refuse candidates
    assert seen[3][1] > 1 and seen[0][1] == 1, seen  # min_shared splits the clusters


def test_write_sfm_database_loads_and_places_images(tmp_path, pycolmap):
    scene = hand_scene()
    model = write_text_model(tmp_path / "sparse", scene)
    root = tmp_path / "photos"
    write_images(root, scene)
    pairs = cm.colmap_pairs(model, **HAND)
    out = cm.write_sfm_database(pairs, root, tmp_path / "out", val_fraction=0.1, seed=3)
    assert out == tmp_path / "out"
    train, val = SfM120k(out, "train", check_images=True), SfM120k(out, "val", check_images=True)
    wp = WhiteningPairs(out)
    by_cid = {cm.image_id(n): n for n in pairs.names}
    assert len(by_cid) == len(pairs.names)
    # every image named is there, with the source's bytes (hard-linked: the same file)
    for split in (train, val, wp):
        for cid, path in zip(split.cids, split.images):
            src = root / by_cid[cid]
            assert path.read_bytes() == src.read_bytes()
            assert path.stat().st_ino == src.stat().st_ino
    # 7 pairs in 4 clusters with pairs: a 3, b 3, e 1; 10% of 7 fits no cluster, so the smallest (e)
    val_names = {by_cid[c] for c in val.cids}
    assert val_names == {"e0.jpg", "e1.jpg"}
    assert {(by_cid[val.cids[q]], by_cid[val.cids[p]]) for q, p in zip(val.qidxs, val.pidxs)} == {("e1.jpg", "e0.jpg")}
    assert {by_cid[c] for c in train.cids} == set(pairs.names) - val_names  # f0, f1 stay as negatives
    all_pairs, _ = named(pairs)
    for split in (train, val):
        got = {(by_cid[split.cids[q]], by_cid[split.cids[p]]) for q, p in zip(split.qidxs, split.pidxs)}
        assert got <= all_pairs
        names = [by_cid[c] for c in split.cids]
        assert split.clusters.tolist() == [int(pairs.clusters[pairs.names.index(n)]) for n in names]
    assert train.n_pairs + val.n_pairs == len(all_pairs)
    assert {(by_cid[wp.cids[q]], by_cid[wp.cids[p]]) for q, p in zip(wp.qidxs, wp.pidxs)} == all_pairs
    # plain pickles: dicts, lists, str, int
    with open(out / "retrieval-SfM-120k.pkl", "rb") as f:
        raw = pickle.load(f)
    assert all(type(v) is int for v in raw["train"]["qidxs"] + raw["train"]["cluster"])
    # a larger share: whole clusters, at most the share of the pairs, the same for the same seed
    for seed in range(6):
        out2 = cm.write_sfm_database(pairs, root, tmp_path / f"half{seed}", val_fraction=0.5, seed=seed, link="copy")
        val2 = SfM120k(out2, "val")
        assert 1 <= val2.n_pairs <= 3.5
        val_clusters = set(val2.clusters.tolist())
        assert not val_clusters & set(SfM120k(out2, "train").clusters.tolist())
        assert len(val2) == int(np.isin(pairs.clusters, list(val_clusters)).sum())
        path = val2.images[0]
        assert path.stat().st_ino != (root / by_cid[val2.cids[0]]).stat().st_ino  # copied
        again = cm.write_sfm_database(pairs, root, tmp_path / f"again{seed}", val_fraction=0.5, seed=seed)
        assert SfM120k(again, "val").cids == val2.cids
    # writing again over the folder keeps it readable (files replaced or kept)
    cm.write_sfm_database(pairs, root, out, val_fraction=0.1, seed=3, link="copy")
    assert SfM120k(out, "train", check_images=True).cids == train.cids
    assert not list(out.rglob("*.tmp"))


def test_single_cluster_holds_out_a_share_of_its_pairs(tmp_path, pycolmap):
    scene = {n: v for n, v in hand_scene().items() if n.startswith("a/")}
    model = write_text_model(tmp_path / "m", scene)
    root = tmp_path / "photos"
    write_images(root, scene, seed=4)
    out = cm.colmap_to_sfm(model, root, tmp_path / "out", val_fraction=0.5, seed=1, **HAND)
    train, val = SfM120k(out, "train", check_images=True), SfM120k(out, "val", check_images=True)
    assert train.cids == val.cids and len(train) == 4  # both splits hold every image
    assert (train.n_pairs, val.n_pairs) == (1, 2)  # 3 pairs, round(1.5) = 2 held out
    key = {(train.cids[q], train.cids[p]) for q, p in zip(train.qidxs, train.pidxs)}
    held = {(val.cids[q], val.cids[p]) for q, p in zip(val.qidxs, val.pidxs)}
    ids = {cm.image_id(a): a for a in scene}
    assert not key & held
    assert {(ids[q], ids[p]) for q, p in key | held} == reference(*scene_views(scene), 3, 0.2, 1.5)[2]


def test_image_names_outside_the_root_or_missing_are_one_line_errors(tmp_path, pycolmap):
    scene = hand_scene()
    scene["../x.jpg"] = scene.pop("e0.jpg")
    model = write_text_model(tmp_path / "m", scene)
    root = tmp_path / "photos"
    write_images(root, [n for n in scene if not n.startswith("..")])
    write_images(tmp_path, ["x.jpg"])  # exists, but outside the root
    pairs = cm.colmap_pairs(model, **HAND)
    with pytest.raises(ValueError, match=r"COLMAP model .*m: image name must be a relative path") as err:
        cm.write_sfm_database(pairs, root, tmp_path / "out")
    assert "\n" not in str(err.value) and "'../x.jpg'" in str(err.value)
    assert not (tmp_path / "out").exists()  # checked before anything is written
    scene = hand_scene()
    model = write_text_model(tmp_path / "m2", scene)
    (root / "b1.png").unlink()
    with pytest.raises(ValueError) as err:
        cm.colmap_to_sfm(model, root, tmp_path / "out", **HAND)
    assert str(err.value) == f"COLMAP model {model}: image 'b1.png' not found under {root}"
    assert not (tmp_path / "out").exists()


def test_no_pairs_and_unreadable_models_are_one_line_errors(tmp_path, pycolmap):
    model = write_text_model(tmp_path / "m", hand_scene())
    with pytest.raises(ValueError, match="no image pair shares enough points.*lower --colmap-min-overlap") as err:
        cm.colmap_pairs(model, min_shared=60)
    assert "\n" not in str(err.value) and str(model) in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"COLMAP model .*empty: cannot read it") as err:
        cm.colmap_pairs(empty)
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        cm.colmap_pairs(tmp_path / "absent")
    with pytest.raises(ValueError, match="min_overlap must be"):
        cm.colmap_pairs(model, min_overlap=1.5)
    pairs = cm.colmap_pairs(model, **HAND)
    with pytest.raises(ValueError, match="val_fraction must be"):
        cm.write_sfm_database(pairs, tmp_path, tmp_path / "out", val_fraction=0)
    with pytest.raises(ValueError, match="link must be one of"):
        cm.write_sfm_database(pairs, tmp_path, tmp_path / "out", link="symlink")


def test_missing_pycolmap_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycolmap", None)  # import pycolmap raises ImportError
    with pytest.raises(ImportError) as err:
        cm.colmap_pairs(tmp_path)
    assert str(err.value) == 'reading a COLMAP model needs pycolmap: pip install "pylandmark[colmap]"'


def test_placed_paths_follow_the_cid_layout(tmp_path):
    cid = cm.image_id("a/a0.png")
    assert len(cid) == 40 and all(c in "0123456789abcdef" for c in cid)
    assert cid_to_path(tmp_path, cid) == tmp_path / "ims" / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid


def test_hard_link_failure_falls_back_to_a_copy(tmp_path, pycolmap, monkeypatch):
    scene = {n: v for n, v in hand_scene().items() if n.startswith("b")}
    model = write_text_model(tmp_path / "m", scene)
    root = tmp_path / "photos"
    write_images(root, scene, seed=7)

    def no_links(src, dst, *args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(cm.os, "link", no_links)
    out = cm.colmap_to_sfm(model, root, tmp_path / "out", **HAND)
    wp = WhiteningPairs(out)
    ids = {cm.image_id(n): n for n in scene}
    assert sorted(ids[c] for c in wp.cids) == sorted(scene)
    for cid, path in zip(wp.cids, wp.images):
        src = root / ids[cid]
        assert path.read_bytes() == src.read_bytes() and path.stat().st_ino != src.stat().st_ino
    assert not list(out.rglob(".*.tmp"))
