"""LabelledFolder on the real PNU photos and on odd hand-made trees."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from pylandmark.data import LabelledFolder

PNU_CLASSES = ["cse", "hh", "rg", "wb", "wjj"]


@pytest.mark.parametrize("split,per_class", [("train", 7), ("test", 3)])
def test_pnu_folders(shared_data, split, per_class):
    root = shared_data / "pnu_landmarks" / split
    ds = LabelledFolder(root)
    assert ds.classes == PNU_CLASSES
    assert len(ds) == 5 * per_class
    # reference listing with os.listdir
    want = [(root / c / f, c) for c in sorted(os.listdir(root))
            for f in sorted(os.listdir(root / c)) if f.lower().endswith(".png")]
    assert list(ds) == want
    assert ds.labels == [c for _, c in want]
    np.testing.assert_array_equal(ds.targets, np.repeat(np.arange(5), per_class))
    assert all(p.is_file() for p in ds.paths)
    assert LabelledFolder(str(root)).paths == ds.paths  # deterministic


def test_pnu_train_and_test_share_classes(shared_data):
    train = LabelledFolder(shared_data / "pnu_landmarks" / "train")
    test = LabelledFolder(shared_data / "pnu_landmarks" / "test")
    assert train.class_to_idx == test.class_to_idx == {c: i for i, c in enumerate(PNU_CLASSES)}


def test_loader_is_used(shared_data):
    Image = pytest.importorskip("PIL.Image")
    ds = LabelledFolder(shared_data / "pnu_landmarks" / "test",
                        loader=lambda p: Image.open(p).size)
    size, label = ds[4]
    assert label == "hh"
    with Image.open(ds.paths[4]) as im:
        assert size == im.size


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_odd_tree(tmp_path, caplog):
    for rel in ["b/2.JPG", "b/10.jpeg", "b/1.png", "b/.hidden.jpg", "b/notes.txt",
                "b/sub/deep.jpg", "a/x.WebP", "a/y.tif", ".git/z.jpg", "empty/readme.md",
                "root_level.jpg"]:
        touch(tmp_path / rel)
    (tmp_path / "c").mkdir()
    with caplog.at_level(logging.WARNING, logger="pylandmark.data.folders"):
        ds = LabelledFolder(tmp_path)
    assert ds.classes == ["a", "b"]
    assert [p.relative_to(tmp_path).as_posix() for p in ds.paths] == \
        ["a/x.WebP", "a/y.tif", "b/1.png", "b/10.jpeg", "b/2.JPG"]
    assert ds.labels == ["a", "a", "b", "b", "b"] and ds.targets.tolist() == [0, 0, 1, 1, 1]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert any(f"{tmp_path / 'c'} has no images" in m for m in messages)
    assert any(f"{tmp_path / 'empty'} has no images" in m for m in messages)
    only_png = LabelledFolder(tmp_path, extensions=("PNG",))
    assert only_png.classes == ["b"] and len(only_png) == 1


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        LabelledFolder(tmp_path / "missing")
    (tmp_path / "cls").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        LabelledFolder(tmp_path)
    with pytest.raises(TypeError, match="root"):
        LabelledFolder(3)
    with pytest.raises(ValueError, match="extensions"):
        LabelledFolder(tmp_path, extensions=".jpg")
    with pytest.raises(TypeError, match="loader"):
        LabelledFolder(tmp_path, loader="PIL")
