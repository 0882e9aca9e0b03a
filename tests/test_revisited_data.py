"""Revisited Oxford / Paris: safe ground-truth loading, paths, query crops, distractors and the
download step (with file:// URLs, never the network)."""
from __future__ import annotations

import io
import logging
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest

from pylandmark import evaluate as ev
from pylandmark.data import RevisitedDataset, download_revisited, load_gnd
from pylandmark.data import revisited as rv
from pylandmark.data.download import ChecksumError

Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def gnd_dir(shared_data):
    return shared_data / "revisited"


@pytest.mark.parametrize("name,n_db", [("roxford5k", 4993), ("rparis6k", 6322)])
def test_real_ground_truth(gnd_dir, name, n_db):
    path = gnd_dir / f"gnd_{name}.pkl"
    cfg = load_gnd(path)
    with open(path, "rb") as f:  # trusted copy: stdlib pickle is the reference here
        raw = pickle.load(f)
    assert cfg["imlist"] == raw["imlist"] and cfg["qimlist"] == raw["qimlist"]
    assert len(cfg["imlist"]) == n_db and len(cfg["qimlist"]) == 70
    assert not set(cfg["qimlist"]) & set(cfg["imlist"])
    for g, r in zip(cfg["gnd"], raw["gnd"]):
        for key in ("easy", "hard", "junk"):
            assert g[key].dtype == np.int64 and g[key].tolist() == list(r[key])
        assert len(set(r["easy"]) | set(r["hard"]) | set(r["junk"])) == \
            len(r["easy"]) + len(r["hard"]) + len(r["junk"])
        assert g["bbx"] == tuple(float(v) for v in r["bbx"])
        assert g["bbx"][0] < g["bbx"][2] and g["bbx"][1] < g["bbx"][3]
    empty_easy = [q for q, g in enumerate(cfg["gnd"]) if g["easy"].size == 0]
    assert empty_easy == ([11, 66] if name == "roxford5k" else [])


def test_dataset_paths_and_known_answer(gnd_dir, tmp_path):
    ds = RevisitedDataset("roxford5k", gnd_dir)  # ground truth directly under root
    assert ds.dir == gnd_dir and ds.n_db == 4993 and ds.n_queries == 70
    assert ds.images[0] == gnd_dir / "jpg" / f"{ds.imlist[0]}.jpg"
    assert ds.image_path(17) == ds.images[17] and ds.image_path(-1) == ds.images[-1]
    assert ds.query_paths[3] == gnd_dir / "jpg" / f"{ds.qimlist[3]}.jpg"
    assert ds.query_bbox(0) == (136.5, 34.1, 648.5, 955.7)
    res = ds.evaluate(np.tile(np.arange(ds.n_db), (70, 1)))
    assert [round(100 * res[p]["map"], 4) for p in ev.PROTOCOLS] == [0.9472, 1.7114, 0.8679]
    # the official layout: <root>/<name>/gnd_<name>.pkl
    (tmp_path / "RParis6k".lower()).mkdir()
    shutil.copy(gnd_dir / "gnd_rparis6k.pkl", tmp_path / "rparis6k")
    ds = RevisitedDataset("RPARIS6K", tmp_path)
    assert ds.dir == tmp_path / "rparis6k" and ds.n_db == 6322
    with pytest.raises(IndexError):
        ds.image_path(6322)


def test_missing_files_and_bad_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="download_revisited"):
        RevisitedDataset("roxford5k", tmp_path)
    with pytest.raises(ValueError, match="roxford5k"):
        RevisitedDataset("oxford105k", tmp_path)
    with pytest.raises(ValueError, match="name"):
        download_revisited("holidays", tmp_path)


class Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_restricted_unpickler_refuses_code(tmp_path, protocol):
    marker = tmp_path / "pwned"
    payload = {"imlist": [], "qimlist": [], "gnd": [], "x": Evil(str(marker))}
    path = tmp_path / "gnd_evil.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    with pytest.raises(pickle.UnpicklingError, match="posix.mkdir|os.mkdir|nt.mkdir"):
        load_gnd(path)
    assert not marker.exists()
    # and a class object, which could run code on construction
    path.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [], "c": logging.Logger},
                                  protocol=protocol))
    with pytest.raises(pickle.UnpicklingError, match="logging.Logger"):
        load_gnd(path)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_arrays_are_allowed(tmp_path, rng, protocol):
    gnd = [{"bbx": np.array([1.0, 2.0, 30.0, 40.0]), "easy": np.array([0, 3]),
            "hard": np.array([], dtype=np.int64), "junk": np.arange(4, 7, dtype=np.int32)}]
    path = tmp_path / "g.pkl"
    path.write_bytes(pickle.dumps({"imlist": [f"i{i}" for i in range(9)], "qimlist": ["q"],
                                   "gnd": gnd}, protocol=protocol))
    cfg = load_gnd(path)
    assert cfg["gnd"][0]["easy"].tolist() == [0, 3] and cfg["gnd"][0]["junk"].tolist() == [4, 5, 6]
    assert cfg["gnd"][0]["bbx"] == (1.0, 2.0, 30.0, 40.0)


@pytest.mark.parametrize("content,exc,pattern", [
    (pickle.dumps([1, 2]), ValueError, "imlist"),
    (pickle.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": []}), ValueError, "1 queries"),
    (pickle.dumps({"imlist": ["a"], "qimlist": ["q"],
                   "gnd": [{"easy": [1], "hard": [], "junk": []}]}), ValueError, "outside imlist"),
    (pickle.dumps({"imlist": ["a"], "qimlist": ["q"],
                   "gnd": [{"easy": [0], "hard": [], "junk": [], "bbx": [1, 2]}]}), ValueError,
     "bbx"),
    (b"not a pickle at all", pickle.UnpicklingError, "not a readable"),
])
def test_malformed_ground_truth(tmp_path, content, exc, pattern):
    path = tmp_path / "g.pkl"
    path.write_bytes(content)
    with pytest.raises(exc, match=pattern):
        load_gnd(path)


def write_toy(root, rng, bbx, size=(37, 29)):
    """A tiny dataset in the official layout with one query image."""
    folder = root / "roxford5k"
    (folder / "jpg").mkdir(parents=True)
    cfg = {"imlist": ["a", "b", "c"], "qimlist": ["q"],
           "gnd": [{"bbx": bbx, "easy": [2], "hard": [0], "junk": []}]}
    (folder / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(cfg))
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "jpg" / "q.jpg", quality=95)
    return folder


def test_query_crop(tmp_path, rng):
    folder = write_toy(tmp_path, rng, [2.4, 3.6, 10.5, 9.0])
    ds = RevisitedDataset("roxford5k", tmp_path)
    full_pixels = np.asarray(Image.open(folder / "jpg" / "q.jpg").convert("RGB"))
    crop, full = ds.load_query(0)
    assert full == (37, 29)
    # rounded as Python/PIL round: x 2.4 -> 2, y 3.6 -> 4, x 10.5 -> 10, y 9.0 -> 9
    np.testing.assert_array_equal(np.asarray(crop), full_pixels[4:9, 2:10])
    whole, _ = ds.load_query(0, crop=False)
    np.testing.assert_array_equal(np.asarray(whole), full_pixels)


def test_query_crop_clipped_to_image(tmp_path, rng):
    folder = write_toy(tmp_path, rng, [-3.0, 20.2, 50.0, 40.0])
    ds = RevisitedDataset("roxford5k", tmp_path)
    crop, _ = ds.load_query(0)
    full_pixels = np.asarray(Image.open(folder / "jpg" / "q.jpg").convert("RGB"))
    np.testing.assert_array_equal(np.asarray(crop), full_pixels[20:29, 0:37])


def test_distractors(tmp_path, rng):
    write_toy(tmp_path, rng, [0, 0, 5, 5])
    djpg = tmp_path / "revisitop1m" / "jpg"
    for rel in ("b/2.jpg", "a/9.jpg", "a/10.jpg", "b/notes.txt"):
        (djpg / rel).parent.mkdir(parents=True, exist_ok=True)
        (djpg / rel).write_bytes(b"x")
    ds = RevisitedDataset("roxford5k", tmp_path, distractors=True)
    assert ds.distractor_paths == [djpg / "a/10.jpg", djpg / "a/9.jpg", djpg / "b/2.jpg"]
    assert ds.n_db == 6 and ds.image_path(3) == djpg / "a/10.jpg" and len(ds.images) == 6
    # a list file fixes the order
    (tmp_path / "revisitop1m" / "revisitop1m.txt").write_text("b/2\na/9.jpg\n")
    ds = RevisitedDataset("roxford5k", tmp_path, distractors=tmp_path / "revisitop1m")
    assert ds.distractor_paths == [djpg / "b/2.jpg", djpg / "a/9.jpg"]
    # distractors rank but never count as positives or junk
    res = ds.evaluate(np.array([[3, 4, 2, 0, 1]]))
    assert res["easy"]["map"] == pytest.approx(ev.compute_ap([2], 1))
    with pytest.raises(FileNotFoundError, match="distractors"):
        RevisitedDataset("roxford5k", tmp_path, distractors=tmp_path / "nowhere")


def make_tgz(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:  # a symlink
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
                continue
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_download_revisited_from_file_urls(gnd_dir, tmp_path, monkeypatch, caplog):
    srv = tmp_path / "srv"
    (srv / "roxford5k").mkdir(parents=True)
    shutil.copy(gnd_dir / "gnd_roxford5k.pkl", srv / "roxford5k")
    imlist = load_gnd(gnd_dir / "gnd_roxford5k.pkl")["imlist"]
    make_tgz(srv / "images.tgz", [
        (f"oxbuild/{imlist[0]}.jpg", b"one"),
        (f"deep/er/{imlist[1]}.JPG", b"two"),
        ("../escape.jpg", b"bad"),
        ("readme.txt", b"text"),
        ("link.jpg", None),
    ])
    monkeypatch.setattr(rv, "GND_URL", srv.as_uri() + "/{name}/gnd_{name}.pkl")
    monkeypatch.setattr(rv, "IMAGE_URLS", {"roxford5k": ((srv / "images.tgz").as_uri(),)})
    root = tmp_path / "data"
    with caplog.at_level(logging.WARNING, logger="pylandmark.data.revisited"):
        folder = download_revisited("roxford5k", root, progress=False)
    assert folder == root / "roxford5k"
    jpg = folder / "jpg"
    assert (folder / "gnd_roxford5k.pkl").read_bytes() == (gnd_dir / "gnd_roxford5k.pkl").read_bytes()
    assert sorted(p.name for p in jpg.iterdir()) == sorted([f"{imlist[0]}.jpg", f"{imlist[1]}.JPG"])
    assert (jpg / f"{imlist[0]}.jpg").read_bytes() == b"one"
    assert not (tmp_path / "escape.jpg").exists() and not (folder / "escape.jpg").exists()
    assert not (folder / "images.tgz").exists()  # archive removed after extraction
    assert any("missing" in r.getMessage() for r in caplog.records)
    ds = RevisitedDataset("roxford5k", root)
    assert ds.images[0].read_bytes() == b"one"
    # a wrong md5 for the ground truth is refused and nothing is left behind
    monkeypatch.setattr(rv, "GND_MD5", {"roxford5k": "0" * 32})
    with pytest.raises(ChecksumError, match="md5"):
        download_revisited("roxford5k", tmp_path / "other", images=False, progress=False)
    assert not (tmp_path / "other" / "roxford5k" / "gnd_roxford5k.pkl").exists()
