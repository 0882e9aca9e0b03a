"""Out-of-core search: the chunked loop (CPU fallback here; the CUDA ring where a GPU is
present) equals one pylandmark.search call over the whole database, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from shard_util import rows_with_ties

import pylandmark as plm
from pylandmark.retrieval.chunked import default_chunk_rows, search_chunked


@pytest.fixture
def db(rng):
    return rows_with_ties(rng, 1003, 40).astype(np.float16)


@pytest.mark.parametrize("chunk_rows", [1, 7, 256, 1002, 1003, 5000])
@pytest.mark.parametrize("k", [1, 5, 100])
def test_chunks_equal_one_call(db, rng, chunk_rows, k):
    q = rng.normal(size=(6, 40)).astype(np.float32)
    q[0] = db[1]  # rows 1, 501 and 1002 tie; with small chunks they sit in different chunks
    ref_s, ref_r = plm.search(q, db, k=k)
    s, r = search_chunked(q, db, k=k, chunk_rows=chunk_rows)
    # a row's score is computed the same way whichever chunk holds it, so the scores are equal
    # bit for bit, and the merge keeps the lower row on ties
    np.testing.assert_array_equal(s, ref_s)
    np.testing.assert_array_equal(r, ref_r)
    if k >= 3:
        assert r[0, :3].tolist() == [1, 501, 1002]


def test_memory_mapped_db_and_k_beyond_n(tmp_path, db, rng):
    path = tmp_path / "db.npy"
    np.save(path, db)
    mm = np.load(path, mmap_mode="r")
    q = rng.normal(size=(3, 40)).astype(np.float32)
    for metric in ("cosine", "ip"):
        ref = plm.search(q, db, k=1010, metric=metric)
        got = search_chunked(q, mm, k=1010, metric=metric, chunk_rows=333)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_array_equal(got[1], ref[1])
        assert (got[1][:, 1003:] == -1).all() and np.isneginf(got[0][:, 1003:]).all()


@pytest.mark.parametrize("db_dtype", ["float32", "bfloat16"])
def test_db_dtypes_and_torch_queries(rng, db_dtype):
    x = rng.normal(size=(300, 17)).astype(np.float32)
    db = torch.from_numpy(x).to(getattr(torch, db_dtype))
    q = torch.from_numpy(rng.normal(size=(4, 17)).astype(np.float32))
    ref_s, ref_r = plm.search(q, db, k=9)
    s, r = search_chunked(q, db, k=9, chunk_rows=64)
    assert isinstance(s, torch.Tensor) and torch.equal(s, ref_s) and torch.equal(r, ref_r)
    s1, r1 = search_chunked(q[1], db, k=9, chunk_rows=64)  # 1-d queries give 1-d results
    assert s1.shape == (9,) and torch.equal(r1, ref_r[1])
    if db_dtype == "bfloat16":  # numpy bfloat16 (ml_dtypes) goes through the same path
        ml = pytest.importorskip("ml_dtypes")
        arr = db.view(torch.int16).numpy().view(ml.bfloat16)
        np.testing.assert_array_equal(search_chunked(q.numpy(), arr, k=9, chunk_rows=50)[1], ref_r.numpy())


def test_bad_arguments(db, rng):
    q = rng.normal(size=(2, 40)).astype(np.float32)
    with pytest.raises(ValueError, match="chunk_rows"):
        search_chunked(q, db, chunk_rows=0)
    with pytest.raises(ValueError, match="k must"):
        search_chunked(q, db, k=0)
    with pytest.raises(ValueError, match="metric"):
        search_chunked(q, db, metric="l2")
    with pytest.raises(ValueError, match=r"queries must be \(Q, 40\)"):
        search_chunked(q[:, :39], db)
    with pytest.raises(ValueError, match="empty"):
        search_chunked(q, db[:0])
    with pytest.raises(TypeError, match="int32"):
        search_chunked(q, db.astype(np.int32))
    with pytest.raises(ValueError, match="device"):
        search_chunked(q, db, device="meta")
    assert default_chunk_rows(1024, 2, "cuda") == 262144 and default_chunk_rows(1024, 2, "cpu") == 262144


@pytest.mark.gpu
@pytest.mark.skipif(not plm.cuda_available(), reason="needs a CUDA device and a CUDA build")
def test_cuda_ring_equals_one_gpu_call(db, rng):
    """The two-stream ring on a real GPU: host db (pageable and pinned) streamed in chunks
    equals one GPU search of the whole db on the device."""
    q = torch.from_numpy(rng.normal(size=(33, 40)).astype(np.float32)).cuda()
    ref_s, ref_r = plm.search(q, torch.from_numpy(db).cuda(), k=20)
    for host in (db, torch.from_numpy(db).pin_memory()):
        s, r = search_chunked(q, host, k=20, device="cuda", chunk_rows=100)
        torch.cuda.synchronize()
        assert torch.equal(r, ref_r) and torch.equal(s, ref_s)
