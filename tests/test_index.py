"""pylandmark.Index: add/search/remove against numpy, file round trips and every corruption case."""
from __future__ import annotations

import json
import multiprocessing as mp
import struct
from pathlib import Path

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
    # normalised in float64 and rounded once: a float32 normalisation would round twice
    np.testing.assert_array_equal(index.descriptors, unit_rows(x.astype(np.float64)).astype(np.float16))
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


# ---- all-or-nothing changes -------------------------------------------------------------------

def _state(index):
    return (len(index), index.ids.tolist(), np.asarray(index.descriptors).tobytes(),
            None if index.labels is None else index.labels.tolist(), index.paths)


@pytest.mark.parametrize("kwargs,exc", [
    (dict(labels=["c", {"x": 1}], paths=["/a", "/b"]), TypeError),       # the second label is bad
    (dict(labels=["c", "d"], paths=["/a", 3]), TypeError),               # a path that is no path
    (dict(labels=["c", "d"], paths=["/a"]), ValueError),                 # one path short
    (dict(labels=["c", "d"], paths=["/a", "/b"], ids=[0, 77]), ValueError),  # id 0 is taken
    (dict(labels=["c", "d"], paths=["/a", "/b"], ids=[5, 5]), ValueError),
    (dict(labels=["c", "d"]), ValueError),                               # paths missing
])
def test_a_failed_add_changes_nothing(rng, tmp_path, kwargs, exc):
    index = Index(4)
    index.add(rng.standard_normal((3, 4)), labels=["a", "b", "a"], paths=["/x", "/y", "/z"])
    before = _state(index)
    with pytest.raises(exc):
        index.add(np.ones((2, 4)), **kwargs)
    assert _state(index) == before
    again = Index.load(index.save(tmp_path / "after.plmi"))
    assert _state(again) == before


@pytest.mark.parametrize("ids,exc", [([0, 99], KeyError), (["zero"], ValueError), ([[0.5]], ValueError)])
def test_a_failed_remove_changes_nothing(rng, ids, exc):
    index = Index(4)
    index.add(rng.standard_normal((3, 4)), labels=["a", "b", "a"])
    before = _state(index)
    with pytest.raises(exc):
        index.remove(ids)
    assert _state(index) == before


def test_add_normalises_extreme_magnitudes_before_rounding(rng):
    """1e20 * v squares past float32 (the old norm was inf and stored zeros); 1e-30 * v
    squares into subnormals; near 3e38 even the float64 sum of squares needs care. Every stored
    row is v / |v| rounded once to float16."""
    v = rng.standard_normal((3, 16)).astype(np.float32)
    x = np.concatenate([v[:1] * np.float32(1e20), v[1:2] * np.float32(1e-30),
                        v[2:] / np.abs(v[2:]).max() * np.float32(3e38)])
    assert np.isfinite(x).all()
    index = Index(16)
    index.add(x)
    np.testing.assert_array_equal(index.descriptors, unit_rows(x.astype(np.float64)).astype(np.float16))
    # float16 rounding of unit rows: at most half an ulp of 1.0 (2^-11) per element
    np.testing.assert_allclose(index.descriptors, unit_rows(v.astype(np.float64)), atol=2 ** -11)


# ---- one version per load, crafted headers, temporary files -----------------------------------

def _version(v: int, dim: int = 8) -> Index:
    """Version v of a file: every label, path and row says v, and the row count depends on v."""
    index = Index(dim, metadata={"version": v})
    n = 5 + v % 7
    rows = np.zeros((n, dim), np.float32)
    rows[:, v % dim] = 1.0
    index.add(rows, labels=[f"v{v}"] * n, paths=[f"/v{v}/{i}" for i in range(n)])
    return index


def _consistent(index: Index) -> int:
    v = index.metadata["version"]
    n = 5 + v % 7
    assert len(index) == n and index.labels.tolist() == [f"v{v}"] * n
    assert index.paths == [f"/v{v}/{i}" for i in range(n)]
    assert (np.argmax(np.asarray(index.descriptors), axis=1) == v % index.dim).all()
    return v


@pytest.mark.parametrize("mmap", [True, False])
def test_a_load_racing_a_save_sees_one_version(tmp_path, monkeypatch, mmap):
    """The file is replaced right after the loader parsed its header: what it returns still
    comes from the file it opened (header, sections and matrix read through one descriptor)."""
    import pylandmark.retrieval.index as index_module

    path = _version(1).save(tmp_path / "race.plmi")
    newer = tmp_path / "newer.plmi"
    _version(2).save(newer)
    real_loads = json.loads
    swapped = []

    def loads(data, *a, **k):
        if not swapped:
            swapped.append(True)
            import os
            os.replace(newer, path)
        return real_loads(data, *a, **k)

    monkeypatch.setattr(index_module.json, "loads", loads)
    loaded = Index.load(path, mmap=mmap, verify=True)
    monkeypatch.undo()
    assert swapped and _consistent(loaded) == 1
    assert _consistent(Index.load(path)) == 2


def _craft(path, header_changes=None, sections=None, drop=()):
    """Rewrites the index at `path` with changed header fields and/or section bytes, all
    checksums (header CRC, section CRCs and the matrix sum) valid for the new content."""
    import zlib

    from pylandmark.retrieval.format import PREFIX as _PREFIX
    from pylandmark.retrieval.format import sum64 as _sum64

    data = path.read_bytes()
    header = _header(data)
    blobs = {name: data[s["offset"]:s["offset"] + s["nbytes"]] for name, s in header["sections"].items()}
    blobs.update(sections or {})
    for name in drop:
        blobs.pop(name)
    out = bytearray(8192)
    offset = 8192
    secs = {}
    for name, blob in blobs.items():
        big = name in ("matrix", "codes")  # the sections checked by sum64
        key = "sum64" if big else "crc32"
        value = _sum64(np.frombuffer(blob, np.uint8)) if big else zlib.crc32(blob)
        pad = -offset % 64  # the codes must be 64-byte aligned
        out += b"\0" * pad
        offset += pad
        secs[name] = {"offset": offset, "nbytes": len(blob), key: value}
        out += blob
        offset += len(blob)
    header["sections"] = secs
    for key, value in (header_changes or {}).items():
        if callable(value):
            value(header)
        else:
            header[key] = value
    hb = json.dumps(header).encode()
    assert len(hb) < 8192 - 24
    out[:24] = _PREFIX.pack(b"PLMINDEX", FORMAT_VERSION, len(hb), zlib.crc32(hb), 0)
    out[24:24 + len(hb)] = hb
    path.write_bytes(bytes(out))
    return path


def _set_section(name, key, value):
    def change(header):
        header["sections"][name][key] = value
    return change


CRAFTED = {
    "labels short": dict(sections={"labels": json.dumps(["a"] * 4).encode()}),
    "paths short": dict(sections={"paths": json.dumps(["/p"] * 4).encode()}),
    "labels not a list": dict(sections={"labels": b'{"a": 1}'}),
    "label a dict": dict(sections={"labels": json.dumps([{"x": 1}] * 5).encode()}),
    "path a number": dict(sections={"paths": json.dumps([1] * 5).encode()}),
    "labels invalid json": dict(sections={"labels": b'["a", '}),
    "labels not utf-8": dict(sections={"labels": b'["\xff"]'}),
    "labels nested deep": dict(sections={"labels": b"[" * 200000}),
    "labels nested at all": dict(sections={"labels": json.dumps([["a"]] * 5).encode()}),
    "metadata nested past the bound": dict(header_changes={"metadata": {"m": json.loads("[" * 150 + "]" * 150)}}),
    "id -1": dict(sections={"ids": np.array([0, 1, -1, 3, 4], "<i8").tobytes()}),
    "duplicate ids": dict(sections={"ids": np.array([0, 1, 1, 3, 4], "<i8").tobytes()}),
    "negative offset": dict(header_changes={"x": _set_section("ids", "offset", -8)}),
    "float offset": dict(header_changes={"x": _set_section("ids", "offset", 8192.5)}),
    "string nbytes": dict(header_changes={"x": _set_section("labels", "nbytes", "20")}),
    "offset inside the header": dict(header_changes={"x": _set_section("matrix", "offset", 0)}),
    "section not a dict": dict(header_changes={"x": _set_section("labels", "offset", None)}),
    "no ids section": dict(drop=("ids",)),
    "bool dim": dict(header_changes={"dim": True}),
    "float count": dict(header_changes={"count": 5.0}),
    "huge dim": dict(header_changes={"dim": 2 ** 62}),
    "metadata a list": dict(header_changes={"metadata": [1, 2]}),
    "sections a list": dict(header_changes={"sections": [1]}),
    "unknown metric": dict(header_changes={"metric": "l2"}),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_headers_with_valid_checksums_raise_index_format_error(tmp_path, rng, case):
    index = Index(8)
    index.add(rng.standard_normal((5, 8)), labels=list("abcde"), paths=[f"/{i}" for i in range(5)])
    path = _craft(index.save(tmp_path / "crafted.plmi"), **CRAFTED[case])
    for mmap in (True, False):
        with pytest.raises(IndexFormatError) as info:
            Index.load(path, mmap=mmap)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_header_length_beyond_the_file_is_refused_without_reading_it(tmp_path, rng):
    from pylandmark.retrieval.format import PREFIX as _PREFIX

    path = tmp_path / "long.plmi"
    path.write_bytes(_PREFIX.pack(b"PLMINDEX", FORMAT_VERSION, 0xFFFFFFF0, 0, 0) + b"{}")
    with pytest.raises(IndexFormatError, match="truncated"):
        Index.load(path)


def _temp_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != "kept.plmi")


SAVER = """
import os, sys, time
import numpy as np
import pylandmark.retrieval.index as m
stage = sys.argv[2]
def hang(*a, **k):
    open(sys.argv[3], "w").close()
    time.sleep(600)
if stage == "write":
    m.os.fsync = hang          # killed while the data are written
else:
    m.os.replace = hang        # killed after the data are complete, before the rename
index = m.Index(64)
index.add(np.ones((20000, 64), np.float32))
index.save(sys.argv[1])
"""


@pytest.mark.parametrize("stage", ["write", "rename"])
@pytest.mark.parametrize("then", ["save", "load"])
def test_a_save_killed_with_sigkill_leaves_nothing_the_next_save_or_load_keeps(tmp_path, rng, stage, then):
    import os
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "kept.plmi"
    index = Index(64)
    index.add(rng.standard_normal((10, 64)))
    index.save(path)
    before = path.read_bytes()
    ready = tmp_path.parent / f"ready-{stage}-{then}"
    child = subprocess.Popen([sys.executable, "-c", SAVER, str(path), stage, str(ready)])
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert child.poll() is None and time.monotonic() < deadline, "the saver did not start"
            time.sleep(0.05)
        assert _temp_files(tmp_path), "the saver should have a temporary file open"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert path.read_bytes() == before
    if then == "save":
        index.save(path)
    else:
        Index.load(path)
    assert _temp_files(tmp_path) == []


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="POSIX file locks")
def test_a_save_whose_temp_file_a_cleaner_is_inspecting_still_holds_its_lock(tmp_path, rng, monkeypatch):
    """A cleaner (another process's save or load) may hold the lock on a new, empty temporary
    file for a moment. The saver must wait for the lock, not go on unlocked: an unlocked file
    looks abandoned, and the next cleaner deletes it under the saver (seen in the soak test)."""
    import fcntl
    import os
    import threading

    import pylandmark._files as files

    real_open = os.open
    held, timers = [], []

    def open_then_inspect(name, flags, *args):
        fd = real_open(name, flags, *args)
        if str(name).endswith(".tmp") and flags & os.O_CREAT:
            cleaner = real_open(name, os.O_RDONLY)  # a second open file description, as another process has
            fcntl.flock(cleaner, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(str(name))
            timers.append(threading.Timer(0.3, os.close, (cleaner,)))  # the cleaner looks, then lets go
            timers[-1].start()
        return fd

    monkeypatch.setattr(files.os, "open", open_then_inspect)
    fd, tmp = files.create_temp(tmp_path / "x.plmi")
    monkeypatch.undo()
    try:
        assert held == [str(tmp)]
        timers[0].join()  # the cleaner has let go
        probe = os.open(tmp, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):  # the saver holds the lock now
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(probe)
        os.write(fd, b"data")
        files.remove_stale_temps(tmp_path / "x.plmi")
        assert Path(tmp).exists()  # a live saver's file survives the next cleaner
    finally:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_get_the_umask_mode(tmp_path, rng, umask):
    import os

    index = Index(4)
    index.add(rng.standard_normal((2, 4)))
    old = os.umask(umask)
    try:
        path = index.save(tmp_path / "mode.plmi")
        index.save(path)  # replacing keeps the rule
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def _soak_saver(path, seed, stop_at):
    import time
    v = seed
    while time.monotonic() < stop_at:
        _version(v).save(path)
        v += 2
    return v


def _soak_loader(path, stop_at):
    import time
    seen = set()
    loads = 0
    while time.monotonic() < stop_at:
        verify = loads % 2 == 0
        index = Index.load(path, mmap=loads % 3 != 0, verify=verify)
        seen.add(_consistent(index))
        loads += 1
    return loads, len(seen)


def test_soak_concurrent_savers_and_loaders_see_whole_versions(tmp_path):
    """Two processes save alternating versions of one file while two others load it (with and
    without the matrix checksum, mapped and read): every load must be one whole version."""
    import time

    path = tmp_path / "soak.plmi"
    _version(0).save(path)
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        stop_at = time.monotonic() + 12.0  # the workers start within seconds; each runs to this time
        savers = [pool.apply_async(_soak_saver, (path, s, stop_at)) for s in (0, 1)]
        loaders = [pool.apply_async(_soak_loader, (path, stop_at)) for _ in range(2)]
        saved = [s.get(timeout=60) for s in savers]
        results = [ld.get(timeout=60) for ld in loaders]
    assert all(v > 10 for v in saved), saved
    assert all(loads > 20 and versions > 2 for loads, versions in results), results
    assert [p.name for p in tmp_path.iterdir()] == ["soak.plmi"]
