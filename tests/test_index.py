"""pylandmark.Index: add/search/remove against numpy, file round trips and every corruption case."""
from __future__ import annotations

import json
import multiprocessing as mp
import struct

import numpy as np
import pytest

import pylandmark as plm
from pylandmark.retrieval.index import FORMAT_VERSION, Index, IndexFormatError


def unit_rows(x):
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


@pytest.fixture
def filled(rng):
    x = rng.standard_normal((1003, 37)).astype(np.float32)
    labels = [f"class{i % 7}" for i in range(len(x))]
    paths = [f"/photos/{i:05d}.jpg" for i in range(len(x))]
    index = Index(37, metadata={"model": "test", "image_size": 1024})
    index.add(x, labels=labels, paths=paths)
    return index, x, labels, paths


def test_add_normalises_once_and_stores_float16(filled):
    index, x, _, _ = filled
    assert len(index) == 1003 and index.descriptors.dtype == np.float16
    np.testing.assert_array_equal(index.descriptors, unit_rows(x).astype(np.float16))
    np.testing.assert_array_equal(index.ids, np.arange(1003))


def test_search_returns_ids_and_matches_float64_reference(filled, rng):
    index, x, _, _ = filled
    q = rng.standard_normal((9, 37)).astype(np.float32)
    scores, ids = index.search(q, k=6)
    stored = index.descriptors.astype(np.float64)
    ref = unit_rows(q.astype(np.float64)) @ unit_rows(stored).T
    order = np.argsort(-ref, axis=1, kind="stable")[:, :6]
    np.testing.assert_array_equal(ids, order)  # ids are 0..N-1 here
    np.testing.assert_allclose(scores, np.take_along_axis(ref, order, 1), atol=1e-5)


def test_custom_ids_remove_and_padding(rng):
    index = Index(8)
    x = rng.standard_normal((5, 8)).astype(np.float32)
    index.add(x, ids=[50, 10, 30, 20, 40])
    assert index.remove([10, 40]) == 2
    assert len(index) == 3 and index.ids.tolist() == [50, 30, 20]
    scores, ids = index.search(x[0], k=5)
    assert ids[0] == 50 and ids[3:].tolist() == [-1, -1] and np.isneginf(scores[3:]).all()
    new = index.add(x[:2])
    assert new.tolist() == [51, 52]
    with pytest.raises(KeyError, match="99"):
        index.remove([99])
    with pytest.raises(ValueError, match="unique"):
        index.add(x[:1], ids=[30])


def test_ip_metric_keeps_scale(rng):
    index = Index(16, metric="ip")
    x = rng.standard_normal((40, 16)).astype(np.float32) * 3
    index.add(x)
    scores, ids = index.search(x[:2], k=3)
    ref = x[:2].astype(np.float64) @ x.astype(np.float16).astype(np.float64).T
    np.testing.assert_allclose(scores[:, 0], ref.max(axis=1), rtol=1e-5)


@pytest.mark.parametrize("mmap", [True, False])
def test_save_load_round_trip(filled, tmp_path, rng, mmap):
    index, _, labels, paths = filled
    path = index.save(tmp_path / "sub" / "landmarks.plmi")
    loaded = Index.load(path, mmap=mmap)
    assert isinstance(loaded._matrix, np.memmap) is mmap
    assert loaded.dim == 37 and loaded.metric == "cosine" and len(loaded) == 1003
    assert loaded.metadata == {"model": "test", "image_size": 1024}
    assert list(loaded.labels) == labels and loaded.paths == paths
    np.testing.assert_array_equal(loaded.descriptors, index.descriptors)
    q = rng.standard_normal((4, 37)).astype(np.float32)
    s1, i1 = index.search(q, k=10)
    s2, i2 = loaded.search(q, k=10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)
    assert loaded.info()["classes"] == 7 and loaded.info()["memory_mapped"] is mmap
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary left behind


def test_empty_and_unlabelled_round_trip(tmp_path, rng):
    empty = Index(5, metric="ip")
    loaded = Index.load(empty.save(tmp_path / "e.plmi"))
    assert len(loaded) == 0 and loaded.metric == "ip" and loaded.labels is None
    with pytest.raises(ValueError, match="empty"):
        loaded.search(np.ones(5, np.float32))
    plain = Index(5)
    plain.add(rng.standard_normal((3, 5)))
    again = Index.load(plain.save(tmp_path / "p.plmi"))
    assert again.labels is None and again.paths is None and again.ids.tolist() == [0, 1, 2]


def test_memmapped_search_equals_in_memory_on_a_larger_index(tmp_path, rng):
    index = Index(96)
    index.add(rng.standard_normal((30011, 96)).astype(np.float32))
    path = index.save(tmp_path / "big.plmi")
    mm = Index.load(path, mmap=True)
    mem = Index.load(path, mmap=False)
    q = rng.standard_normal((17, 96)).astype(np.float32)
    for k in (1, 20):
        np.testing.assert_array_equal(mm.search(q, k)[1], mem.search(q, k)[1])
        np.testing.assert_array_equal(mm.search(q, k)[0], mem.search(q, k)[0])


def _search_in_child(args):
    path, q = args
    return Index.load(path).search(q, k=5)[1]


def test_several_processes_read_one_file(filled, tmp_path, rng):
    index, *_ = filled
    path = str(index.save(tmp_path / "shared.plmi"))
    qs = [rng.standard_normal((3, 37)).astype(np.float32) for _ in range(3)]
    with mp.get_context("spawn").Pool(2) as pool:
        results = pool.map(_search_in_child, [(path, q) for q in qs])
    for q, got in zip(qs, results):
        np.testing.assert_array_equal(got, index.search(q, k=5)[1])


# ---- damaged files ----------------------------------------------------------------------------

@pytest.fixture
def saved(filled, tmp_path):
    index, *_ = filled
    path = index.save(tmp_path / "good.plmi")
    return path, path.read_bytes()


def _header(data: bytes) -> dict:
    hlen = struct.unpack_from("<I", data, 12)[0]
    return json.loads(data[24:24 + hlen])


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.01, 0.3, 0.7, 0.999])
def test_truncated_files_raise(saved, tmp_path, fraction):
    path, data = saved
    bad = tmp_path / "bad.plmi"
    bad.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(IndexFormatError, match="truncated|bad magic"):
        Index.load(bad)


def test_flipped_bytes_in_every_section_raise(saved, tmp_path):
    path, data = saved
    sections = _header(data)["sections"]
    spots = {"prefix-version": 9, "header": 40}
    for name, sec in sections.items():
        spots[name] = sec["offset"] + sec["nbytes"] // 2
        spots[name + "-last"] = sec["offset"] + sec["nbytes"] - 1
    for where, offset in spots.items():
        for mmap in (True, False):
            damaged = bytearray(data)
            damaged[offset] ^= 0x10
            bad = tmp_path / f"flip-{where}.plmi"
            bad.write_bytes(bytes(damaged))
            with pytest.raises(IndexFormatError) as info:
                Index.load(bad, mmap=mmap)
            assert str(bad) in str(info.value), where


def test_foreign_and_newer_files_raise(saved, tmp_path):
    path, data = saved
    foreign = tmp_path / "photo.jpg"
    foreign.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 5000)
    with pytest.raises(IndexFormatError, match="not a pylandmark index"):
        Index.load(foreign)
    newer = tmp_path / "newer.plmi"
    newer.write_bytes(data[:8] + struct.pack("<I", FORMAT_VERSION + 1) + data[12:])
    with pytest.raises(IndexFormatError, match="newer than this pylandmark"):
        Index.load(newer)
    with pytest.raises(FileNotFoundError, match="no index file"):
        Index.load(tmp_path / "missing.plmi")


def test_failed_save_keeps_the_old_file(filled, tmp_path, monkeypatch):
    index, *_ = filled
    path = index.save(tmp_path / "keep.plmi")
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("pylandmark.retrieval.index.os.fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        index.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.plmi"]


# ---- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("call,exc,words", [
    (lambda ix: ix.add(np.ones((2, 9), np.float32)), ValueError, "descriptors must be (n, 8)"),
    (lambda ix: ix.add(np.array([[np.nan] * 8], np.float32)), ValueError, "row 0 holds NaN"),
    (lambda ix: ix.add(np.ones((2, 8), np.int64)), TypeError, "floating-point"),
    (lambda ix: ix.add(np.ones((2, 8)), labels=["a"]), ValueError, "one entry per descriptor"),
    (lambda ix: ix.add(np.ones((1, 8)), labels=[{"a": 1}]), TypeError, "labels entries"),
    (lambda ix: ix.add(np.ones((1, 8)), ids=[-3]), ValueError, "ids must be >= 0"),
    (lambda ix: Index(0), ValueError, "dim must be"),
    (lambda ix: Index(8, metric="l2"), ValueError, "metric must be"),
    (lambda ix: Index(8, metadata={"f": object()}), TypeError, "not JSON serializable"),
])
def test_bad_input(call, exc, words):
    with pytest.raises(exc) as info:
        call(Index(8))
    assert words in str(info.value)


def test_labels_are_all_or_none(rng):
    ix = Index(4)
    ix.add(rng.standard_normal((2, 4)), labels=["a", "b"])
    with pytest.raises(ValueError, match="pass labels for the new rows"):
        ix.add(rng.standard_normal((1, 4)))
    ix2 = Index(4)
    ix2.add(rng.standard_normal((2, 4)))
    with pytest.raises(ValueError, match="no labels"):
        ix2.add(rng.standard_normal((1, 4)), labels=["c"])


def test_top_level_name():
    assert plm.Index is Index
