"""SuperGlobal's re-ranking over indexes (issue 29): an in-memory Index, one saved and loaded
memory-mapped, one searched from its compact codes, one with removed rows, a ShardedIndex, and a
DistributedIndex over 2 and 3 gloo ranks (the row fetch included), and SuperGlobalView under
pylandmark.recognize; each compared with superglobal on the index's plain float16 matrix (itself
checked against the float64 definition in tests/test_superglobal.py).

The comparisons are exact (same scores bit for bit, same rows): an index's search gives search()'s
bits on its matrix (the compact codes' path, the shard merge and the distributed merge are exact by
construction, tests/test_codes.py and tests/test_sharded_search.py), ``row_vectors`` returns the
stored float16 bits, and the re-ranking then runs the same float32 operations, in the same chunks,
on the same numbers as the array path does."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from shard_util import make_sharded, rows_with_ties
from test_sharded_search import _run

import pylandmark as plm
from pylandmark.retrieval.index import IndexLike
from pylandmark.retrieval.recognition import LabelledIndex
from pylandmark.retrieval.rerank import SuperGlobalView, superglobal
from pylandmark.retrieval.sharded import DistributedIndex

DIM = 37
# (k, m, neighbours): k < m, k > m (plain ranking after the top m), m past N, m = 1
CASES = [(5, 12, 3), (25, 7, 2), (9, 1000, 9), (6, 1, 4)]


def make_index(rng, n: int, metric: str = "cosine") -> plm.Index:
    """n rows of D = 37 with exact duplicates and two zero rows, labelled and with paths."""
    x = rows_with_ties(rng, n, DIM)
    x[[4, n - 2]] = 0.0
    index = plm.Index(DIM, metric)
    index.add(x, labels=[f"class{i % 5}" for i in range(n)], paths=[f"/img/{i}.jpg" for i in range(n)],
              ids=np.arange(100, 100 + 3 * n, 3))
    return index


def queries(rng, index, q: int = 6) -> np.ndarray:
    out = rng.normal(size=(q, index.dim)).astype(np.float32)
    out[0] = index.descriptors[1]  # a duplicated row: tied scores, first in row order
    return out


def matrix(index) -> np.ndarray:
    """The index's plain (N, D) float16 matrix (a writable copy, as torch wants)."""
    return np.array(index.descriptors)


def assert_same(got, ref):
    """Exact: the same scores bit for bit and the same rows (see the module docstring)."""
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(np.asarray(g.cpu() if isinstance(g, torch.Tensor) else g), np.asarray(r))


def expected(q, x, k, **kw):
    """superglobal on the array x, for an index: past N, row -1 and score -inf (as its search)."""
    s, r = superglobal(q, x, min(k, len(x)), **kw)
    pad = [(0, 0)] * (s.ndim - 1) + [(0, k - s.shape[-1])]
    return np.pad(s, pad, constant_values=-np.inf), np.pad(r, pad, constant_values=-1)


def check_index(index, q, x, metric="cosine"):
    """superglobal over ``index`` (every CASE, numpy and torch queries, one query as (D,), given
    ranks, k past N) equals superglobal over its float16 matrix ``x``."""
    n = len(index)
    for k, m, nb in CASES:
        ref = superglobal(q, x, k, m=m, neighbours=nb, beta=0.2, metric=metric)
        assert_same(superglobal(q, index, k, m=m, neighbours=nb, beta=0.2), ref)
    ref = superglobal(q, x, 8, m=10, metric=metric)
    one = superglobal(q[2], index, 8, m=10)
    assert one[0].shape == (8,)
    assert_same(one, (ref[0][2], ref[1][2]))
    tq = torch.from_numpy(q)
    got = superglobal(tq, index, 8, m=10)
    assert isinstance(got[0], torch.Tensor)
    assert_same(got, superglobal(tq, torch.from_numpy(x), 8, m=10, metric=metric))
    s, r = superglobal(tq, index, n + 3, m=10)
    assert_same((s[:, :n], r[:, :n]), superglobal(tq, torch.from_numpy(x), n, m=10, metric=metric))
    assert (s[:, n:] == -torch.inf).all() and (r[:, n:] == -1).all()
    ranks = plm.search(q, x, k=n, metric=metric)[1]
    assert_same(superglobal(q, index, 20, m=10, ranks=ranks), superglobal(q, x, 20, m=10, ranks=ranks, metric=metric))
    assert_same(superglobal(q, index, n + 3, m=10), expected(q, x, n + 3, m=10, metric=metric))


@pytest.mark.parametrize("n, metric", [(53, "cosine"), (40, "ip"), (3001, "cosine")])
def test_an_index_in_memory_and_memory_mapped(tmp_path, rng, n, metric):
    """In memory (codes built on the first search) and saved, then loaded memory-mapped (the
    codes read from the file). n = 3001 is large enough (N >= 64 depth) for the codes' scan to
    prune rather than search in full."""
    index = make_index(rng, n, metric)
    q = queries(rng, index)
    check_index(index, q, matrix(index), metric)
    assert index.info()["codes"]
    loaded = plm.Index.load(index.save(tmp_path / "i.plmi"), mmap=True)
    assert loaded.info()["memory_mapped"] and loaded.info()["codes"]
    check_index(loaded, q, matrix(index), metric)
    rows = np.array([[n - 1, 0, 7], [7, 3, 1]])  # any shape, as numpy indexing
    np.testing.assert_array_equal(loaded.row_vectors(rows), matrix(index)[rows])
    assert loaded.row_vectors(np.array([], np.int64)).shape == (0, DIM)


def test_an_index_with_removed_rows(rng):
    index = make_index(rng, 50)
    index.remove(index.ids[::3])
    q = queries(rng, index)
    check_index(index, q, matrix(index))
    view = SuperGlobalView(index, m=12, neighbours=3)
    s, ids = view.search(q, 10)
    rs, rows = superglobal(q, matrix(index), 10, m=12, neighbours=3)
    assert_same((s, ids), (rs, index.ids[rows]))  # positions in the index as it is now


def test_a_sharded_index(tmp_path, rng):
    manifest, _, single = make_sharded(tmp_path / "idx", [7, 0, 20, 13, 1], DIM, rng)
    sharded = plm.Index.load(manifest, mmap=True)
    q = queries(rng, single)
    check_index(sharded, q, matrix(single))
    rows = np.array([[40, 0, 7, 26], [27, 7, 6, 6]])  # every shard's first and last rows, duplicates
    np.testing.assert_array_equal(sharded.row_vectors(rows), matrix(single)[rows])


def test_a_distributed_index_in_one_process(rng):
    """Without a process group a DistributedIndex holds every row; superglobal over it, and its
    own methods with rerank=, give the single-index answer."""
    index = make_index(rng, 31)
    di = DistributedIndex.from_index(index)
    q = queries(rng, index)
    check_index(di, q, matrix(index))
    sg = functools.partial(superglobal, m=9, neighbours=2)
    ref = sg(q, matrix(index), 7)
    assert_same(di.search_rows(q, 7, rerank=sg), ref)
    assert_same(di.search(q, 7, rerank=sg), (ref[0], index.ids[ref[1]]))
    assert_same(di.search_rows(q, 40, rerank=sg), expected(q, matrix(index), 40, m=9, neighbours=2))


class _Answered:
    """A labelled index whose search_rows returns a given answer: recognition's vote on it is the
    reference for recognition through a view."""

    def __init__(self, answer, index):
        self._answer, self.labels, self.ids, self.descriptors = answer, index.labels, index.ids, None

    def search_rows(self, _queries, _k):
        return self._answer

    search = search_rows


def assert_same_recognition(got, ref):
    assert got.labels.tolist() == ref.labels.tolist()
    for name in ("neighbors", "neighbor_ids", "scores", "votes", "confidences", "known"):
        np.testing.assert_array_equal(getattr(got, name), getattr(ref, name))


@pytest.mark.parametrize("kind", ["memory", "mmap", "sharded"])
def test_the_view_recognises_on_the_reranked_top_k(tmp_path, rng, kind):
    manifest, single_path, single = make_sharded(tmp_path / "idx", [9, 14, 6], DIM, rng)
    index = {"memory": plm.Index.load(single_path, mmap=False), "mmap": single,
             "sharded": plm.Index.load(manifest)}[kind]
    view = SuperGlobalView(index, m=15, neighbours=4, beta=0.3)
    assert isinstance(view, IndexLike) and isinstance(view, LabelledIndex)
    assert len(view) == 29 and view.metric == "cosine" and view.dim == DIM
    np.testing.assert_array_equal(view.ids, index.ids)
    assert view.labels.tolist() == index.labels.tolist() and view.paths == index.paths
    q = queries(rng, single)
    ref = superglobal(q, matrix(single), 5, m=15, neighbours=4, beta=0.3)
    assert_same(view.search_rows(q, 5), ref)
    assert_same(view.search(q, 5), (ref[0], single.ids[ref[1]]))
    got = plm.recognize(view, q, k=5, vote="weighted")
    assert_same_recognition(got, plm.recognize(_Answered(ref, single), q, k=5, vote="weighted"))
    assert not np.array_equal(got.neighbors, plm.recognize(index, q, k=5).neighbors)  # it did re-rank
    # k past N: padded like the index's own search, and recognition votes with the N rows
    assert_same(view.search_rows(q, 33), expected(q, matrix(single), 33, m=15, neighbours=4, beta=0.3))
    assert (plm.recognize(view, q, k=33).neighbors[:, 29:] == -1).all()


def _distributed(rank, world, paths, q):
    out = {}
    for name, path in paths.items():
        di = DistributedIndex.open(path)
        for k, m, nb in CASES:
            sg = functools.partial(superglobal, m=m, neighbours=nb)
            out[name, "direct", k, m] = sg(q, di, k)  # every rank passes the same queries
            out[name, "src", k, m] = di.search_rows(q if rank == world - 1 else None, k, src=world - 1, rerank=sg)
        sg = functools.partial(superglobal, m=10, neighbours=3)
        out[name, "ids"] = di.search(q if rank == 0 else None, 8, rerank=sg)
        out[name, "torch"] = di.search_rows(torch.from_numpy(q) if rank == 0 else None, 8, rerank=sg)
        out[name, "1d"] = di.search_rows(q[3], 8, src=None, rerank=sg)
        out[name, "past"] = di.search_rows(q, len(di) + 2, src=None, rerank=sg)
        out[name, "rec"] = di.recognize(q if rank == 0 else None, k=5, rerank=sg)
        out[name, "rows"] = di.row_vectors(np.array([[len(di) - 1, 0, 9], [9, 2, len(di) - 1]]))
        out[name, "no rows"] = di.row_vectors(np.array([], np.int64))
    return out


@pytest.mark.parametrize("world, counts", [(2, [3, 20]), (3, [11, 2, 17])])
def test_a_distributed_index(tmp_path, rng, world, counts):
    """Every rank's answer equals the single-process one, for a manifest (one shard per rank)
    and a single file split into row ranges; queries given everywhere or broadcast from a rank."""
    manifest, single_path, single = make_sharded(tmp_path / "idx", counts, DIM, rng)
    q = queries(rng, single, 5)
    x, n = matrix(single), len(single)
    results = _run(world, _distributed, tmp_path, {"manifest": manifest, "file": single_path}, q)
    sg = functools.partial(superglobal, m=10, neighbours=3)
    ref = sg(q, x, 8)
    ref_rec = plm.recognize(SuperGlobalView(single, m=10, neighbours=3), q, k=5)
    for rank, res in enumerate(results):
        assert "error" not in res, res.get("error")
        for name in ("manifest", "file"):
            for k, m, nb in CASES:
                want = expected(q, x, k, m=m, neighbours=nb)
                assert_same(res[name, "direct", k, m], want)
                assert_same(res[name, "src", k, m], want)
            assert_same(res[name, "ids"], (ref[0], single.ids[ref[1]]))
            assert isinstance(res[name, "torch"][0], torch.Tensor) == (rank == 0)  # as without rerank=
            assert_same(res[name, "torch"], ref)
            assert_same(res[name, "1d"], (ref[0][3], ref[1][3]))
            assert_same(res[name, "past"], expected(q, x, n + 2, m=10, neighbours=3))
            assert_same_recognition(res[name, "rec"], ref_rec)
            np.testing.assert_array_equal(res[name, "rows"], x[[[n - 1, 0, 9], [9, 2, n - 1]]])
            assert res[name, "rows"].dtype == np.float16 and res[name, "no rows"].shape == (0, DIM)


def _own_rows(rank, world, x, q):
    share = np.array_split(np.arange(len(x)), world)[rank]
    di = DistributedIndex.from_rows(x[share], metric="cosine")
    return {"dtype": di.row_dtype, "sg": superglobal(q, di, 12, m=9, neighbours=2),
            "rows": di.row_vectors(np.arange(len(x)))}


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_rows_brought_by_each_rank(tmp_path, rng, dtype):
    """from_rows keeps the rows as given: row_vectors returns them exactly (float32 rows as float32)."""
    x = rng.normal(size=(23, DIM)).astype(dtype)
    q = rng.normal(size=(3, DIM)).astype(np.float32)
    for res in _run(2, _own_rows, tmp_path, x, q):
        assert "error" not in res, res.get("error")
        assert res["dtype"] == dtype
        np.testing.assert_array_equal(res["rows"], x)
        assert_same(res["sg"], superglobal(q, x, 12, m=9, neighbours=2))


def test_an_empty_index(rng):
    q = rng.normal(size=(2, DIM)).astype(np.float32)
    index = make_index(rng, 5)
    emptied = make_index(rng, 5)
    emptied.remove(emptied.ids)
    for empty in (plm.Index(DIM), emptied):
        with pytest.raises(ValueError, match="the index is empty"):
            superglobal(q, empty, 3)
        with pytest.raises(ValueError, match="the index is empty"):
            SuperGlobalView(empty).search_rows(q, 3)
    assert_same(superglobal(q[:0], index, 3), (np.empty((0, 3), np.float32), np.empty((0, 3), np.int64)))


def _bad(rng):
    index = make_index(rng, 12)
    sharded_like = DistributedIndex.from_index(index)
    q = rng.normal(size=(2, DIM)).astype(np.float32)
    return [
        (lambda: superglobal(q, index, 3, metric="ip"), ValueError, "metric='ip' but the index's metric is 'cosine'"),
        (lambda: superglobal(q[:, :5], index, 3), ValueError, "queries have D=5 but the index has D=37"),
        (lambda: superglobal(q, object(), 3), TypeError, "db must be a numpy array, a torch tensor or an index"),
        (lambda: superglobal(q, index, 3, m=0), ValueError, "m must be"),
        (lambda: superglobal(q, index, 0), ValueError, "k must be"),
        (lambda: superglobal(q, index, 3, ranks=np.zeros((2, 2), np.int64)), ValueError, "ranks must be"),
        (lambda: SuperGlobalView(matrix(index)), TypeError, "index must be an Index or a ShardedIndex"),
        (lambda: SuperGlobalView(sharded_like), TypeError, "DistributedIndex re-ranks through"),
        (lambda: SuperGlobalView(index, beta=-1), ValueError, "beta must"),
        (lambda: SuperGlobalView(index, neighbours=1.5), TypeError, "neighbours must be"),
        (lambda: SuperGlobalView(index).search_rows(q, 0), ValueError, "k must be"),
        (lambda: index.row_vectors(np.array([12])), ValueError, r"rows must lie in \[0, 12\)"),
        (lambda: index.row_vectors(np.array([-1])), ValueError, r"rows must lie in \[0, 12\)"),
        (lambda: index.row_vectors(np.array([0.5])), ValueError, "rows must be integers"),
        (lambda: index.row_vectors(np.array([True])), ValueError, "rows must be integers"),
        (lambda: sharded_like.row_vectors(np.array([99])), ValueError, r"rows must lie in \[0, 12\)"),
    ]


@pytest.mark.parametrize("case", range(16))
def test_bad_arguments(rng, case):
    call, error, match = _bad(rng)[case]
    with pytest.raises(error, match=match) as err:
        call()
    assert "\n" not in str(err.value)
