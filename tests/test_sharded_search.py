"""Sharded search on 2 and 3 gloo processes (forked from the test, one process group through
a file store): every rank's answer equals a single-process search of the whole index (same
scores bit for bit, same ids, ties to the lower row), for indexes whose shards have unequal
sizes, one with fewer rows than k, on manifests (one shard per rank, or ranges over shards),
single files split by rows, and rows each rank brings."""
from __future__ import annotations

import datetime
import itertools
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
from shard_util import make_sharded

import pylandmark as plm
from pylandmark.distributed import share_bounds
from pylandmark.retrieval.sharded import DistributedIndex

KS = (1, 3, 5, 12, 60)
_RUNS = itertools.count()


def _run(world: int, fn, tmp_path, *args) -> list[dict]:
    """Runs fn(rank, world, *args) -> dict on ``world`` forked gloo ranks; returns their dicts.

    Every run gets its own folder, so its file store holds no key of an earlier group (whose
    ranks' addresses are dead: gloo would connect to them and be refused)."""
    run = tmp_path / f"run{next(_RUNS)}"
    run.mkdir()
    ctx = tmp.start_processes(_entry, args=(world, str(run / "store"), str(run), fn, args), nprocs=world,
                              join=False, start_method="fork")
    while not ctx.join(timeout=120):
        pass
    return [torch.load(run / f"out{r}.pt", weights_only=False) for r in range(world)]


def _entry(rank, world, store, out, fn, args):
    torch.set_num_threads(1)  # forked from a process whose thread pools may be running
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))
    try:
        result = fn(rank, world, *args)
        torch.save(result, f"{out}/out{rank}.pt")
    except Exception:
        torch.save({"error": traceback.format_exc()}, f"{out}/out{rank}.pt")
        raise
    finally:
        dist.destroy_process_group()


def _searches(rank, world, paths, q):
    out = {}
    for name, path in paths.items():
        di = DistributedIndex.open(path)
        out[f"{name}:rows"] = di.local_rows
        for k in KS:
            # queries only on rank 0, broadcast to the others
            out[f"{name}:{k}"] = di.search(q if rank == 0 else None, k)
        out[f"{name}:src1"] = di.search(q if rank == 1 else None, 5, src=1)
        out[f"{name}:all"] = di.search_rows(q, 5, src=None)  # every rank passes them: no broadcast
        out[f"{name}:1d"] = di.search(q[2], 5, src=None)
        out[f"{name}:half"] = di.search(torch.from_numpy(q).half() if rank == 0 else None, 5)
        rec = di.recognize(q if rank == 0 else None, k=5)
        out[f"{name}:rec"] = (rec.labels.tolist(), rec.neighbors, rec.neighbor_ids, rec.confidences, rec.votes)
        out[f"{name}:lookup"] = di.lookup(np.array([[0, len(di) - 1, -1]]))
    return out


def _check(results, single, q, names, expected_rows):
    for rank, res in enumerate(results):
        assert "error" not in res, res.get("error")
        for name in names:
            assert res[f"{name}:rows"] == expected_rows[name][rank]
            for k in KS:
                s, ids = res[f"{name}:{k}"]
                ref_s, ref_ids = single.search(q, k)
                np.testing.assert_array_equal(s, ref_s)
                np.testing.assert_array_equal(ids, ref_ids)
            np.testing.assert_array_equal(res[f"{name}:src1"][1], single.search(q, 5)[1])
            np.testing.assert_array_equal(res[f"{name}:all"][1], single.search_rows(q, 5)[1])  # rows, not ids
            np.testing.assert_array_equal(res[f"{name}:1d"][1], single.search(q[2], 5)[1])
            hs, hi = res[f"{name}:half"]
            # rank 0 passed torch queries and gets tensors; the others passed None and get numpy
            assert isinstance(hs, torch.Tensor) == (rank == 0)
            ref_hs, ref_hi = single.search(torch.from_numpy(q).half(), 5)
            assert torch.equal(torch.as_tensor(hs), ref_hs) and torch.equal(torch.as_tensor(hi), ref_hi)
            labels, neighbors, neighbor_ids, conf, votes = res[f"{name}:rec"]
            ref = plm.recognize(single, q, k=5)
            assert labels == ref.labels.tolist()
            np.testing.assert_array_equal(neighbors, ref.neighbors)
            np.testing.assert_array_equal(neighbor_ids, ref.neighbor_ids)
            np.testing.assert_array_equal(conf, ref.confidences)
            np.testing.assert_array_equal(votes, ref.votes)
            found = res[f"{name}:lookup"]
            n = len(single)
            assert found["ids"].tolist() == [[single.ids[0], single.ids[n - 1], -1]]
            assert found["labels"].tolist() == [[single.labels[0], single.labels[n - 1], None]]
            assert found["paths"].tolist() == [[single.paths[0], single.paths[n - 1], None]]


def _queries(rng, single):
    q = rng.normal(size=(7, single.dim)).astype(np.float32)
    q[0] = single.descriptors[1].astype(np.float32)  # tied rows 1, N/2 and N-1 sit on different ranks
    return q


@pytest.mark.parametrize("world, counts", [(2, [3, 20]), (3, [11, 2, 17])])
def test_one_shard_per_rank(tmp_path, rng, world, counts):
    manifest, single_path, single = make_sharded(tmp_path / "idx", counts, 24, rng)
    q = _queries(rng, single)
    results = _run(world, _searches, tmp_path, {"manifest": manifest, "file": single_path}, q)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    shard_rows = [(int(bounds[r]), int(bounds[r + 1])) for r in range(world)]
    sb = share_bounds(sum(counts), world)  # a single file: balanced row ranges
    even = [(sb[r], sb[r + 1]) for r in range(world)]
    _check(results, single, q, ["manifest", "file"], {"manifest": shard_rows, "file": even})


def test_ranges_across_shards_and_an_empty_rank(tmp_path, rng):
    """3 ranks over 5 shards (one of them empty): ranges cut through shard files; and an index
    of 2 rows over 3 ranks, so that one rank holds nothing."""
    manifest, _, single = make_sharded(tmp_path / "a", [4, 0, 9, 1, 6], 16, rng, name="a.plmi", id_start=7)
    tiny, _, tiny_single = make_sharded(tmp_path / "b", [1, 1], 16, rng, name="b.plmi")
    q = _queries(rng, single)
    results = _run(3, _searches, tmp_path, {"a": manifest}, q)
    _check(results, single, q, ["a"], {"a": [(0, 7), (7, 14), (14, 20)]})
    results = _run(3, _searches, tmp_path, {"b": tiny}, q)
    _check(results, tiny_single, q, ["b"], {"b": [(0, 1), (1, 2), (2, 2)]})


def _own_rows(rank, world, x, q):
    share = np.array_split(np.arange(len(x)), world)[rank]
    di = DistributedIndex.from_rows(x[share], metric="cosine")
    return {"rows": di.local_rows, "full": di.search_rows(q, len(x), src=None),
            "k5": di.search(q if rank == 0 else None, 5)}


@pytest.mark.parametrize("world", [2, 3])
def test_rows_brought_by_each_rank(tmp_path, rng, world):
    """What evaluate does: each rank searches the descriptors it extracted; the full ranking
    (k = N) equals one search over all of them."""
    x = rng.normal(size=(26, 12)).astype(np.float16)
    x[25] = x[0]
    q = rng.normal(size=(4, 12)).astype(np.float16)
    results = _run(world, _own_rows, tmp_path, x, q)
    ref_s, ref_r = plm.search(q, x, k=26)
    for res in results:
        np.testing.assert_array_equal(res["full"][0], ref_s)
        np.testing.assert_array_equal(res["full"][1], ref_r)
        np.testing.assert_array_equal(res["k5"][1], ref_r[:, :5])
