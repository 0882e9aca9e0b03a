"""Sharded indexes in one process: the exact top-k merge against a plain sort, a manifest opened
by Index.load against the one index file holding the same rows, and every damaged or crafted
manifest refused."""
from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from shard_util import make_sharded

import pylandmark as plm
from pylandmark.distributed import share_bounds
from pylandmark.retrieval.index import IndexFormatError
from pylandmark.retrieval.manifest import ShardedIndex, read_manifest, remove_stale_shards, shard_dir, write_manifest
from pylandmark.retrieval.sharded import DistributedIndex, rank_rows
from pylandmark.retrieval.topk import merge_topk, merge_topk_torch


def reference_merge(scores, rows, k):
    """One query's best k by (score descending, row ascending), padding dropped, as Python sorts."""
    cand = sorted((-float(s), int(r)) for s, r in zip(scores, rows) if r >= 0)[:k]
    out_s = [-s for s, _ in cand] + [-np.inf] * (k - len(cand))
    out_r = [r for _, r in cand] + [-1] * (k - len(cand))
    return out_s, out_r


@pytest.mark.parametrize("k", [1, 4, 9, 30])
def test_merge_topk_matches_a_plain_sort(rng, k):
    q, m = 11, 17
    # few distinct scores, so that ties are everywhere; padding with garbage scores
    scores = rng.integers(0, 4, size=(q, m)).astype(np.float32) / 4
    rows = rng.permutation(q * m).reshape(q, m).astype(np.int64) % 23
    rows[rng.random((q, m)) < 0.2] = -1
    scores[rows < 0] = 99.0  # a padding entry's score must not matter
    s, r = merge_topk(scores, rows, k)
    ts, tr = merge_topk_torch(torch.from_numpy(scores), torch.from_numpy(rows), k)
    for i in range(q):
        ref_s, ref_r = reference_merge(scores[i], rows[i], k)
        np.testing.assert_array_equal(s[i], np.float32(ref_s))
        np.testing.assert_array_equal(r[i], ref_r)
    np.testing.assert_array_equal(ts.numpy(), s)
    np.testing.assert_array_equal(tr.numpy(), r)


def test_share_bounds_and_rank_rows():
    assert share_bounds(10, 3) == [0, 4, 7, 10]
    assert share_bounds(2, 3) == [0, 1, 2, 2]
    assert share_bounds(0, 2) == [0, 0, 0]
    assert rank_rows([5, 0, 7], 3) == [0, 5, 5, 12]  # one shard per rank: the shard boundaries
    assert rank_rows([5, 0, 7], 2) == [0, 6, 12]  # otherwise balanced ranges
    with pytest.raises(ValueError):
        share_bounds(3, 0)


@pytest.fixture
def sharded(tmp_path, rng):
    # unequal shards: an empty one, one with fewer rows than most k below
    return make_sharded(tmp_path, [13, 0, 2, 21, 5], 24, rng)


@pytest.mark.parametrize("k", [1, 3, 5, 40, 50])
def test_manifest_search_equals_the_single_file(sharded, rng, k):
    manifest, _, single = sharded
    index = plm.Index.load(manifest)
    assert isinstance(index, ShardedIndex) and len(index) == len(single) == 41
    q = rng.normal(size=(6, 24)).astype(np.float32)
    q[0] = single.descriptors[1]  # ties: rows 1, 20 and 40 are the same vector
    s_ref, i_ref = single.search(q, k)
    s, i = index.search(q, k)
    np.testing.assert_array_equal(s, s_ref)  # bit for bit: same kernel, same arithmetic per row
    np.testing.assert_array_equal(i, i_ref)
    if k >= 3:
        assert i[0, :3].tolist() == [1, 20, 40]
    # rows, 1-d queries, torch queries
    np.testing.assert_array_equal(index.search_rows(q, k)[1], single.search_rows(q, k)[1])
    s1, i1 = index.search(q[2], k)
    assert s1.shape == (k,) and np.array_equal(i1, i_ref[2])
    ts, ti = index.search(torch.from_numpy(q), k)
    assert torch.equal(ti, torch.from_numpy(i_ref)) and torch.equal(ts, torch.from_numpy(s_ref))


def test_manifest_contents_equal_the_single_file(sharded, rng):
    manifest, _, single = sharded
    index = plm.Index.load(manifest)
    np.testing.assert_array_equal(index.descriptors, single.descriptors)
    np.testing.assert_array_equal(index.ids, single.ids)
    assert list(index.labels) == list(single.labels) and index.paths == single.paths
    assert index.metadata == single.metadata
    info = index.info()
    assert info["count"] == 41 and info["shards"] == [13, 0, 2, 21, 5] and info["classes"] == 4
    merged = index.merged()
    np.testing.assert_array_equal(merged.descriptors, single.descriptors)
    q = rng.normal(size=(3, 24)).astype(np.float32)
    np.testing.assert_array_equal(merged.search(q, 7)[1], single.search(q, 7)[1])
    for call in (lambda: index.add(q), lambda: index.remove([0]), lambda: index.save(manifest)):
        with pytest.raises(NotImplementedError, match="read-only"):
            call()


def test_recognize_on_a_manifest(sharded, rng):
    manifest, _, single = sharded
    q = rng.normal(size=(8, 24)).astype(np.float32)
    a = plm.recognize(single, q, k=5)
    b = plm.recognize(plm.Index.load(manifest), q, k=5)
    assert a.labels.tolist() == b.labels.tolist()
    np.testing.assert_array_equal(a.neighbors, b.neighbors)
    np.testing.assert_array_equal(a.neighbor_ids, b.neighbor_ids)
    np.testing.assert_array_equal(a.confidences, b.confidences)


def test_distributed_index_in_one_process(sharded, rng):
    """Without a process group a DistributedIndex holds every row: the same answers."""
    manifest, single_path, single = sharded
    q = rng.normal(size=(5, 24)).astype(np.float32)
    for path in (manifest, single_path):
        di = DistributedIndex.open(path)
        assert len(di) == 41 and di.local_rows == (0, 41)
        for k in (1, 5, 45):
            s, i = di.search(q, k)
            np.testing.assert_array_equal(s, single.search(q, k)[0])
            np.testing.assert_array_equal(i, single.search(q, k)[1])
        rec = di.recognize(q, k=5)
        ref = plm.recognize(single, q, k=5)
        assert rec.labels.tolist() == ref.labels.tolist()
        np.testing.assert_array_equal(rec.neighbor_ids, ref.neighbor_ids)
        found = di.lookup(np.array([[0, 40, -1]]))
        assert found["ids"].tolist() == [[0, 40, -1]]
        assert found["paths"].tolist() == [["/images/0000.jpg", "/images/0040.jpg", None]]
        assert di.label_set() == ["class0", "class1", "class2", "class3"]
    with pytest.raises(ValueError, match="also a database label"):
        di.recognize(q, unknown="class1")


def test_ids_follow_the_id_offsets(tmp_path, rng):
    manifest, _, single = make_sharded(tmp_path, [3, 4], 8, rng, id_start=100)
    index = plm.Index.load(manifest)
    assert index.ids.tolist() == list(range(100, 107)) == single.ids.tolist()
    q = rng.normal(size=(2, 8)).astype(np.float32)
    np.testing.assert_array_equal(index.search(q, 7)[1], single.search(q, 7)[1])


def _rewrite(manifest, mutate):
    header = read_manifest(manifest)
    mutate(header)
    body = json.dumps(header).encode()
    manifest.write_bytes(struct.pack("<8sIIII", b"PLMSHARD", 1, len(body), zlib.crc32(body), 0) + body)


@pytest.mark.parametrize("case, message", [
    ("traversal", "plain"),
    ("absolute", "plain"),
    ("count", "sum of the shard counts"),
    ("shard_count", "manifest says"),
    ("missing", "missing"),
    ("swapped", "not the file"),
    ("twice", "listed twice"),
    ("bool", "must be an int"),
    ("negative_offset", "id_offset"),
    ("dim", "manifest says"),
    ("not_a_list", "shards must be a list"),
])
def test_crafted_manifests_are_refused(sharded, case, message):
    manifest, _, _ = sharded
    folder = shard_dir(manifest)

    def mutate(h):
        s = h["shards"]
        if case == "traversal":
            s[0]["file"] = "../single-idx.plmi"
        elif case == "absolute":
            s[0]["file"] = "/etc/passwd"
        elif case == "count":
            h["count"] += 1
        elif case == "shard_count":
            s[0]["count"] += 1
            h["count"] += 1
        elif case == "missing":
            s[0]["file"] = "nothere.plmi"
        elif case == "swapped":
            s[0]["file"], s[2]["file"] = s[2]["file"], s[0]["file"]
        elif case == "twice":
            s[1]["file"] = s[0]["file"]
        elif case == "bool":
            s[0]["count"] = True
        elif case == "negative_offset":
            s[0]["id_offset"] = -5
        elif case == "dim":
            h["dim"] = 25
        elif case == "not_a_list":
            h["shards"] = {"a": 1}

    _rewrite(manifest, mutate)
    with pytest.raises(IndexFormatError, match=message):
        plm.Index.load(manifest)
    assert folder.is_dir()  # loading never deletes or writes anything


def test_damaged_manifests_are_refused(sharded):
    manifest, _, _ = sharded
    raw = bytearray(manifest.read_bytes())
    raw[40] ^= 1
    manifest.write_bytes(bytes(raw))
    with pytest.raises(IndexFormatError, match="checksum"):
        plm.Index.load(manifest)
    manifest.write_bytes(bytes(raw[:30]))
    with pytest.raises(IndexFormatError, match="truncated"):
        plm.Index.load(manifest)
    body = b"{}"
    manifest.write_bytes(struct.pack("<8sIIII", b"PLMSHARD", 9, len(body), zlib.crc32(body), 0) + body)
    with pytest.raises(IndexFormatError, match="upgrade"):
        plm.Index.load(manifest)
    manifest.write_bytes(struct.pack("<8sIIII", b"PLMSHARD", 1, 1 << 30, 0, 0))
    with pytest.raises(IndexFormatError, match="invalid manifest prefix"):
        plm.Index.load(manifest)


def test_duplicate_ids_across_shards_are_refused(sharded):
    manifest, _, _ = sharded
    _rewrite(manifest, lambda h: h["shards"][3].__setitem__("id_offset", 0))
    with pytest.raises(IndexFormatError, match="not unique"):
        plm.Index.load(manifest)


def test_damaged_shard_is_refused(sharded):
    manifest, _, _ = sharded
    shard = shard_dir(manifest) / "part3.plmi"
    raw = bytearray(shard.read_bytes())
    raw[-300] ^= 0x10  # inside the descriptor matrix: its checksum catches it
    shard.write_bytes(bytes(raw))
    with pytest.raises(IndexFormatError, match="checksum"):
        plm.Index.load(manifest)


def test_write_manifest_refuses_path_names(tmp_path):
    with pytest.raises(ValueError, match="plain"):
        write_manifest(tmp_path / "x.plmi", dim=4, metric="cosine", metadata={},
                       shards=[{"file": "../a.plmi", "count": 0, "id_offset": 0, "header_crc": 0}])
    assert not (tmp_path / "x.plmi").exists()


def test_remove_stale_shards_deletes_only_its_own_names(tmp_path):
    folder = shard_dir(tmp_path / "x.plmi")
    folder.mkdir()
    ours = ["0123456789abcdef-00000-of-00002.plmi", "0123456789abcdef-00001-of-00002.plmi", "base-0a0b0c0d.plmi"]
    for name in ours + ["notes.txt", "mine.plmi"]:
        (folder / name).write_text("x")
    assert remove_stale_shards(tmp_path / "x.plmi", keep={ours[1]}) == 2
    assert sorted(p.name for p in folder.iterdir()) == sorted([ours[1], "notes.txt", "mine.plmi"])
    for name in ("notes.txt", "mine.plmi"):
        (folder / name).unlink()
    remove_stale_shards(tmp_path / "x.plmi")
    assert not folder.exists()  # empty: removed
