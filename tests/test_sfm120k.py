"""SfM-120k reading, the restricted unpickler, downloads from a local mirror, and the synthetic
generator's on-disk format."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pylandmark.data import (
    RevisitedDataset,
    SfM120k,
    WhiteningPairs,
    download_sfm120k,
    load_sfm_pickle,
    make_revisited_dataset,
    make_sfm_dataset,
)
from pylandmark.data.download import ChecksumError
from pylandmark.data.sfm120k import cid_to_path


@pytest.fixture(scope="module")
def sfm_root(tmp_path_factory) -> Path:
    return make_sfm_dataset(tmp_path_factory.mktemp("sfm"), n_clusters=9, images_per_cluster=4, image_size=48,
                            seed=3, val_clusters=3, family_size=3)


def test_generator_writes_the_real_layout(sfm_root):
    with open(sfm_root / "retrieval-SfM-120k.pkl", "rb") as f:
        db = pickle.load(f)
    assert sorted(db) == ["train", "val"]
    for split, n_clusters in (("train", 6), ("val", 3)):
        entry = db[split]
        assert sorted(entry) == ["cids", "cluster", "pidxs", "qidxs"]
        assert all(type(v) is list for v in entry.values())
        assert all(type(c) is str and len(c) == 32 for c in entry["cids"])
        assert all(type(v) is int for k in ("cluster", "qidxs", "pidxs") for v in entry[k])
        assert len(entry["cids"]) == len(entry["cluster"]) == n_clusters * 4
        assert len(entry["qidxs"]) == len(entry["pidxs"]) == n_clusters * 4
        cl = np.asarray(entry["cluster"])
        q, p = np.asarray(entry["qidxs"]), np.asarray(entry["pidxs"])
        assert np.all(cl[q] == cl[p]) and np.all(q != p)
        for cid in entry["cids"]:
            path = sfm_root / "ims" / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid
            assert path.is_file() and path.suffix == ""
            with Image.open(path) as im:
                assert im.format == "JPEG" and max(im.size) == 48
    assert not set(db["train"]["cluster"]) & set(db["val"]["cluster"])
    assert not set(db["train"]["cids"]) & set(db["val"]["cids"])
    with open(sfm_root / "retrieval-SfM-120k-whiten.pkl", "rb") as f:
        wh = pickle.load(f)
    assert sorted(wh) == ["cids", "pidxs", "qidxs"] and wh["cids"] == db["train"]["cids"]


def test_generator_is_deterministic_and_views_differ(tmp_path, sfm_root):
    again = make_sfm_dataset(tmp_path / "a", n_clusters=9, images_per_cluster=4, image_size=48, seed=3,
                             val_clusters=3, family_size=3)
    assert (again / "retrieval-SfM-120k.pkl").read_bytes() == (sfm_root / "retrieval-SfM-120k.pkl").read_bytes()
    ds = SfM120k(sfm_root, "train")
    assert (again / "ims").joinpath(*ds.image_path(5).parts[-4:]).read_bytes() == ds.image_path(5).read_bytes()
    other = make_sfm_dataset(tmp_path / "b", n_clusters=9, images_per_cluster=4, image_size=48, seed=4,
                             val_clusters=3)
    assert (other / "retrieval-SfM-120k.pkl").read_bytes() != (sfm_root / "retrieval-SfM-120k.pkl").read_bytes()
    # views of one scene are different images (crop, warp, photometric change)
    a = np.asarray(Image.open(ds.image_path(0)).convert("RGB").resize((48, 48)), dtype=np.float64)
    b = np.asarray(Image.open(ds.image_path(1)).convert("RGB").resize((48, 48)), dtype=np.float64)
    assert np.abs(a - b).mean() > 5


def test_hard_negatives_look_alike(sfm_root):
    # clusters of one family share palette and layout: their mean colours are closer to each other
    # than to clusters of other families
    ds = SfM120k(sfm_root, "train")
    means = {}
    for c in np.unique(ds.clusters):
        imgs = [np.asarray(Image.open(ds.image_path(i)).convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0)
                for i in np.nonzero(ds.clusters == c)[0]]
        means[int(c)] = np.mean(imgs, axis=0)
    family = {c: c // 3 for c in means}
    same = [np.linalg.norm(means[a] - means[b]) for a in means for b in means if a < b and family[a] == family[b]]
    cross = [np.linalg.norm(means[a] - means[b]) for a in means for b in means if family[a] != family[b]]
    assert np.mean(same) < 0.6 * np.mean(cross)


def test_sfm120k_reader(sfm_root):
    tr = SfM120k(sfm_root, "train", check_images=True)
    va = SfM120k(sfm_root, "val")
    assert len(tr) == 24 and tr.n_pairs == 24 and len(va) == 12
    assert tr.clusters.dtype == np.int64 and tr.qidxs.dtype == np.int64
    cid = tr.cids[7]
    assert tr.image_path(7) == sfm_root / "ims" / cid[-2:] / cid[-4:-2] / cid[-6:-4] / cid
    assert tr.images[7] == tr.image_path(7)
    x = tr.load_image(7, image_size=32)
    assert x.shape[0] == 3 and max(x.shape[1:]) == 32
    wp = WhiteningPairs(sfm_root)
    assert len(wp) == 24 and wp.qidxs.size == 24 and wp.images[3] == tr.image_path(3)
    assert "SfM120k" in repr(tr)


def test_db_in_dbs_subfolder(tmp_path, sfm_root):
    (tmp_path / "dbs").mkdir()
    (tmp_path / "dbs" / "retrieval-SfM-120k.pkl").write_bytes((sfm_root / "retrieval-SfM-120k.pkl").read_bytes())
    assert len(SfM120k(tmp_path, "val")) == 12


def test_reader_errors(tmp_path, sfm_root):
    with pytest.raises(ValueError, match="split"):
        SfM120k(sfm_root, "test")
    with pytest.raises(FileNotFoundError, match="download_sfm120k"):
        SfM120k(tmp_path, "train")
    with pytest.raises(TypeError, match="root"):
        SfM120k(3, "train")
    bad = {"train": {"cids": ["abcdef01"], "cluster": [0], "qidxs": [0], "pidxs": [5]}, "val": {}}
    (tmp_path / "retrieval-SfM-120k.pkl").write_bytes(pickle.dumps(bad))
    with pytest.raises(ValueError, match="pidxs"):
        SfM120k(tmp_path, "train")
    with pytest.raises(ValueError, match="lacks"):
        SfM120k(tmp_path, "val")
    bad["train"]["cluster"] = [0, 1]
    (tmp_path / "retrieval-SfM-120k.pkl").write_bytes(pickle.dumps(bad))
    with pytest.raises(ValueError, match="'cluster' has 2"):
        SfM120k(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="missing"):
        ds_root = tmp_path / "x"
        ds_root.mkdir()
        (ds_root / "retrieval-SfM-120k.pkl").write_bytes((sfm_root / "retrieval-SfM-120k.pkl").read_bytes())
        SfM120k(ds_root, "train", check_images=True)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_restricted_unpickler_refuses_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "retrieval-SfM-120k.pkl"
    path.write_bytes(pickle.dumps({"train": {"cids": [_Evil()]}}))
    with pytest.raises(ValueError, match="refusing to load"):
        load_sfm_pickle(path)
    with pytest.raises(ValueError, match="refusing"):
        SfM120k(tmp_path, "train")
    assert not (tmp_path / "pwned_by_pickle").exists()
    # numpy arrays are globals too: refused, the official files are plain lists
    path.write_bytes(pickle.dumps({"cids": np.arange(3)}))
    with pytest.raises(ValueError, match="refusing"):
        load_sfm_pickle(path)
    path.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a readable"):
        load_sfm_pickle(path)


def _mirror(tmp_path: Path, sfm_root: Path, extra_member: bool = False) -> Path:
    """A local copy of the official server layout: dbs/*.pkl and ims/ims.tar.gz."""
    mirror = tmp_path / "mirror"
    (mirror / "dbs").mkdir(parents=True)
    (mirror / "ims").mkdir()
    for name in ("retrieval-SfM-120k", "retrieval-SfM-120k-whiten"):
        (mirror / "dbs" / f"{name}.pkl").write_bytes((sfm_root / f"{name}.pkl").read_bytes())
    (mirror / "dbs" / "retrieval-SfM-30k-whiten.pkl").write_bytes((sfm_root / "retrieval-SfM-120k-whiten.pkl")
                                                                   .read_bytes())
    with tarfile.open(mirror / "ims" / "ims.tar.gz", "w:gz") as tar:
        for p in sorted((sfm_root / "ims").rglob("*")):
            if p.is_file():
                tar.add(p, arcname=str(p.relative_to(sfm_root / "ims")))
        if extra_member:
            data = b"escape"
            info = tarfile.TarInfo("../escaped")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return mirror


def test_download_from_a_mirror(tmp_path, sfm_root):
    mirror = _mirror(tmp_path, sfm_root, extra_member=True)
    dest = tmp_path / "data"
    url = mirror.as_uri() + "/"
    # the default check expects the official counts: the synthetic db is refused and removed
    with pytest.raises(ValueError, match="official file has 91642"):
        download_sfm120k(dest, base_url=url, progress=False)
    assert not (dest / "retrieval-SfM-120k.pkl").exists()
    md5 = hashlib.md5((mirror / "dbs" / "retrieval-SfM-120k.pkl").read_bytes()).hexdigest()
    out = download_sfm120k(dest, base_url=url, expected_counts=None, progress=False,
                           checksums={"retrieval-SfM-120k.pkl": f"md5:{md5}"})
    assert out == dest
    tr = SfM120k(dest, "train", check_images=True)
    va = SfM120k(dest, "val", check_images=True)
    assert len(tr) == 24 and len(va) == 12
    assert tr.image_path(0).read_bytes() == SfM120k(sfm_root, "train").image_path(0).read_bytes()
    assert not (tmp_path / "escaped").exists() and not (dest / "escaped").exists()
    assert (dest / "retrieval-SfM-30k-whiten.pkl").is_file()
    assert not (dest / "ims.tar.gz").exists()
    # a second call finds everything done (the archive is not fetched again)
    (mirror / "ims" / "ims.tar.gz").unlink()
    download_sfm120k(dest, base_url=url, expected_counts=None, progress=False)


def test_download_checks_hashes_and_arguments(tmp_path, sfm_root):
    mirror = _mirror(tmp_path, sfm_root)
    with pytest.raises(ChecksumError):
        download_sfm120k(tmp_path / "d", base_url=mirror.as_uri(), expected_counts=None, progress=False,
                         images=False, checksums={"retrieval-SfM-120k.pkl": "md5:" + "0" * 32})
    with pytest.raises(ValueError, match="checksums"):
        download_sfm120k(tmp_path / "d", base_url=mirror.as_uri(), checksums={"x": "crc:12"})
    with pytest.raises(TypeError, match="root"):
        download_sfm120k(None)


def test_cid_to_path_rule(tmp_path):
    assert cid_to_path(tmp_path, "0123456789abcdef") == tmp_path / "ims" / "ef" / "cd" / "ab" / "0123456789abcdef"
    with pytest.raises(ValueError, match="cid"):
        cid_to_path(tmp_path, "abc")


def test_revisited_generator_is_readable(tmp_path):
    folder = make_revisited_dataset(tmp_path, "rparis6k", n_clusters=3, db_per_cluster=4, image_size=40, seed=1,
                                    distractors=2)
    ds = RevisitedDataset("rparis6k", tmp_path)
    assert ds.dir == folder and ds.n_queries == 3 and ds.n_db == 3 * 5 + 2
    for i, g in enumerate(ds.gnd):
        assert len(g["easy"]) == 2 and len(g["hard"]) == 2 and len(g["junk"]) == 1
        assert not set(g["easy"]) & set(g["hard"])
        listed = [int(j) for key in ("easy", "hard", "junk") for j in g[key]]
        assert all(ds.image_path(j).is_file() for j in listed)
        im, full = ds.load_query(i)
        assert im.size == full  # the box covers the whole query image
    with pytest.raises(ValueError, match="name"):
        make_revisited_dataset(tmp_path, "holidays")
