"""Exact search from compact codes (pylandmark.prepare): the same scores and indices as
pylandmark.search over the same rows, bit for bit, on every code kernel this CPU runs, and on
inputs built to defeat the bound (issue 27). pylandmark.search is itself checked against a
float64 reference in test_search.py; here it is the reference, because the contract is equality."""
from __future__ import annotations

import zlib

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pylandmark as plm
from pylandmark import _C
from pylandmark.retrieval.format import PREFIX, sum64
from pylandmark.retrieval.index import Index

CODE_KERNELS = ["generic", "avx2", "avx2-vnni", "avx512", "avx512-vnni"]  # each under its ISA's float kernels


@pytest.fixture(params=CODE_KERNELS)
def code_kernel(request):
    name = request.param
    if name not in _C.code_kernels():
        pytest.skip(f"this CPU cannot run the {name} code kernel")
    isa_before = _C.cpu_isa()
    _C.set_cpu_isa(name.split("-")[0])
    _C.set_code_kernel(name)
    yield name
    _C.set_code_kernel("")
    _C.set_cpu_isa(isa_before)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def assert_same(q, db, k, metric="cosine", prepared=None):
    """search(q, prepare(db)) == search(q, db): indices equal, scores equal as bits."""
    prepared = prepared if prepared is not None else plm.prepare(db, metric)
    s0, i0 = plm.search(q, db, k, metric)
    s1, i1 = plm.search(q, prepared, k, metric)
    s0, s1, i0, i1 = (np.asarray(x) for x in (s0, s1, i0, i1))
    assert np.array_equal(i0, i1), f"indices differ in rows {np.nonzero((i0 != i1).any(-1))[0][:5]}"
    assert np.array_equal(s0.view(np.uint32), s1.view(np.uint32)), "scores differ in their bits"
    return prepared.last_stats


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("metric", ["cosine", "ip"])
@pytest.mark.parametrize("Q,k", [(1, 5), (3, 1), (5, 100), (17, 5), (70, 20)])
def test_equal_to_search_bit_for_bit(code_kernel, rng, dtype, metric, Q, k):
    N, D = 6007, 1000  # odd sizes: a partial last block of 16 rows, D not a multiple of 16
    db = rng.standard_normal((N, D)).astype(np.float32)
    if metric == "ip":
        db *= rng.uniform(0.1, 10, (N, 1)).astype(np.float32)  # norms 100x apart
    db = db.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    # queries near db rows: the top-k scores stand out, so the bound prunes and rescoring is tested
    q = np.asarray(db[rng.integers(0, N, Q)], np.float32) + 0.3 * rng.standard_normal((Q, D)).astype(np.float32)
    stats = assert_same(q, db, k, metric)
    if k <= 5:  # (the 20th or 100th best lies in the bulk of scores, within the bound of many rows)
        assert stats["fallback_queries"] < Q and stats["rescored"] < Q * N / 4  # the bound did prune


def test_gaussian_queries_prune_and_stay_exact(code_kernel, rng):
    N, D = 20000, 256
    db = unit(rng.standard_normal((N, D))).astype(np.float16)
    q = rng.standard_normal((9, D)).astype(np.float32)
    stats = assert_same(q, db, 10)
    assert stats["fallback_queries"] == 0 and stats["rescored"] < 9 * N / 16


def bounds(q, db, prepared, metric):
    """(lower, upper): every (query, row) pair's bounds as the code scan computes them."""
    from pylandmark._array import as_array
    lower = np.empty((len(q), len(db)), np.float32)
    upper = np.empty_like(lower)
    _C.code_bounds(as_array(q, "q").spec(), as_array(db, "db").spec(), as_array(prepared.codes, "c").spec(),
                   as_array(prepared.meta, "m").spec(), as_array(lower, "l").spec(), as_array(upper, "u").spec(),
                   metric == "cosine")
    return lower, upper


def aligned_rows(rng, q, n):
    """Rows whose quantisation error points along sign(q) (n // 2 rows) or against it: each
    element half a step (0.49) off the int8 grid of its row, whose largest element (exactly 127
    steps) fixes the grid. Their exact scores sit about 0.8 of the Cauchy-Schwarz bound away from
    the codes' estimate by |q . r| / (||q|| ||r||) = sum |q_d| / (sqrt(D) max|q_d|): all of it for
    a query of +-1 (which its own codes hold exactly), about sqrt(2 / pi) for a Gaussian one."""
    D = q.shape[-1]
    base = rng.integers(-120, 121, (n, D)).astype(np.float64)
    sign = np.where(np.arange(n) < n // 2, 1.0, -1.0)[:, None]
    x = base + 0.49 * sign * np.sign(q)
    x[:, 0] = 127.0  # the grid: s = max|x| / 127 = 1 step
    return (x / 127).astype(np.float32)


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_bound_holds_and_is_nearly_reached(code_kernel, rng, metric):
    """L <= S <= U for every pair, S the float32 score the search returns (k = N gives them all),
    on rows built to push the error towards the bound; and those rows do reach it (to the
    float32 slack), so a bound that were a few percent too small would fail here."""
    D = 512
    q = np.where(rng.random((3, D)) < 0.5, -1.0, 1.0).astype(np.float32)
    db = np.concatenate([aligned_rows(rng, q[i], 400) for i in range(3)])
    prepared = plm.prepare(db, metric)
    lower, upper = bounds(q, db, prepared, metric)
    s, idx = plm.search(q, db, len(db), metric)
    exact = np.empty_like(lower)
    np.put_along_axis(exact, idx, s, axis=1)
    assert (lower <= exact).all() and (exact <= upper).all()
    mid, half = (upper + lower) / 2, (upper - lower) / 2
    reach = np.abs(exact - mid) / half  # 1.0: the bound is exactly tight
    for i in range(3):  # query i's own aligned rows
        assert reach[i, 400 * i:400 * (i + 1)].max() > 0.97
    assert_same(q, db, 16, metric, prepared=prepared)


def test_direct_path_union_split_across_threads(code_kernel, rng):
    """5 to 16 queries take the float search's direct kernels, which score a row for all queries
    at once: the union of the queries' candidates is scored for every query, one contiguous share
    per thread, and the threads' lists merged. A row duplicated at both ends of the db ties
    across the shares and must come out at its lower index."""
    D = 32
    db = rng.standard_normal((60000, D)).astype(np.float16)
    db[59000] = db[100]
    q = rng.standard_normal((12, D)).astype(np.float32)
    q[0] = db[100].astype(np.float32) + 0.01 * rng.standard_normal(D).astype(np.float32)
    stats = assert_same(q, db, 50)
    _, idx = plm.search(q[:1], db, 2)
    assert sorted(idx[0].tolist()) == [100, 59000]
    assert stats["fallback_queries"] == 0 and stats["rescored"] >= 2 * 256  # two shares of the union


def test_ties_duplicates_and_equal_rows(code_kernel, rng):
    D = 300
    row = unit(rng.standard_normal(D)).astype(np.float16)
    others = unit(rng.standard_normal((5000, D))).astype(np.float16)
    db = np.concatenate([others[:1000], np.repeat(row[None], 40, 0), others[1000:], np.repeat(row[None], 40, 0)])
    # ties at the top broken to the lower index, also across the two runs of duplicates
    stats = assert_same(row[None].astype(np.float32), db, 50)
    assert stats["fallback_queries"] == 0
    assert_same(np.repeat(row[None], 3, 0).astype(np.float32), db, 80)
    # every row the same: nothing can be pruned, the search falls back and stays exact
    same = np.repeat(row[None], 5000, 0)
    stats = assert_same(rng.standard_normal((2, D)).astype(np.float32), same, 7)
    assert stats["fallback_queries"] == 2


def test_near_ties_fall_back(code_kernel, rng):
    D = 256
    base = rng.standard_normal(D)
    db = unit(base + 1e-4 * rng.standard_normal((20000, D))).astype(np.float16)
    q = (base + 1e-4 * rng.standard_normal((20, D))).astype(np.float32)
    stats = assert_same(q, db, 5)
    assert stats["fallback_queries"] == 20


def test_zero_nan_inf_tiny_and_huge_rows(code_kernel, rng):
    N, D = 5000, 64
    db = unit(rng.standard_normal((N, D))).astype(np.float32)
    db[7] = 0
    db[100, 3] = np.nan
    db[200, :] = np.nan
    db[300, 5] = np.inf
    db[400] *= 1e-30       # float32 squares underflow: the search redoes such rows in double
    db[500] *= 1e30        # and these overflow
    db[600, :2] = 1e-45    # subnormal elements in a normal row
    q = np.asarray(db[[1, 400, 500, 600]], np.float32) + 0.1
    for metric in ("cosine", "ip"):
        for dtype in (np.float32, np.float16):
            with np.errstate(over="ignore"):
                rows = db.astype(dtype)
            assert_same(q, rows, 9, metric)
            assert_same(q, rows, N, metric)  # every row: the codes cannot help, still exact
            assert_same(q, rows, N + 3, metric)


def test_orthogonal_and_zero_queries(code_kernel, rng):
    D = 128
    db = np.zeros((4000, D), np.float32)
    db[:, : D // 2] = rng.standard_normal((4000, D // 2))
    q = np.zeros((3, D), np.float32)
    q[0, D // 2:] = 1.0      # orthogonal to every row: every score is 0, ties to the lower index
    q[2] = db[17]
    for metric in ("cosine", "ip"):
        assert_same(q, db.astype(np.float16), 6, metric)


def test_k_up_to_n_and_beyond(code_kernel, rng):
    db = unit(rng.standard_normal((1000, 48))).astype(np.float16)
    q = rng.standard_normal((4, 48)).astype(np.float32)
    for k in (1, 15, 16, 999, 1000, 1500):
        assert_same(q, db, k)


def test_strided_torch_and_one_dim_inputs(rng):
    db = torch.from_numpy(unit(rng.standard_normal((6000, 96))).astype(np.float16))
    q = torch.from_numpy(rng.standard_normal((5, 96)).astype(np.float32))
    assert_same(q, db, 5)
    assert_same(q, db[::3], 5)          # strided rows are read in place
    prepared = plm.prepare(db)
    s, i = plm.search(q[0], prepared, 4)
    s0, i0 = plm.search(q[0], db, 4)
    assert i.shape == (4,) and torch.equal(i, i0) and torch.equal(s, s0)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 3000), d=st.integers(1, 70), q=st.integers(1, 20), k=st.integers(1, 40),
       metric=st.sampled_from(["cosine", "ip"]), dup=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_property_equal_to_search(n, d, q, k, metric, dup, seed):
    rng = np.random.default_rng(seed)
    db = rng.standard_normal((n, d)).astype(np.float16)
    if dup:
        db[rng.integers(0, n, n // 2)] = db[0]
    queries = np.asarray(db[rng.integers(0, n, q)], np.float32) + rng.standard_normal((q, d)).astype(np.float32)
    assert_same(queries, db, k, metric)


def test_metric_must_match_and_bad_input():
    db = np.ones((10, 8), np.float16)
    prepared = plm.prepare(db, "cosine")
    with pytest.raises(ValueError, match="prepared for metric 'cosine'"):
        plm.search(np.ones(8, np.float32), prepared, 3, metric="ip")
    with pytest.raises(ValueError, match=r"db must be \(N, D\)"):
        plm.prepare(np.ones(8, np.float16))
    with pytest.raises(ValueError, match="metric must be one of"):
        plm.prepare(db, "l2")
    with pytest.raises(ValueError, match="NaN or inf"):
        plm.search(np.full(8, np.nan, np.float32), prepared, 3)
    codes, meta = plm.ops.build_codes(db, "cosine")
    wrong = plm.ops.build_codes(np.ones((40, 8), np.float16), "cosine")
    from pylandmark._array import as_array
    spec = lambda a, n: as_array(a, n).spec()  # noqa: E731
    s, i = np.empty((1, 3), np.float32), np.empty((1, 3), np.int64)
    with pytest.raises(ValueError, match="codes describe 48 rows, the db has 10"):
        _C.search_codes(spec(np.ones((1, 8), np.float32), "q"), spec(db, "db"), spec(wrong[0], "codes"),
                        spec(wrong[1], "meta"), spec(s, "s"), spec(i, "i"), 3, True)


# ---- the index keeps codes --------------------------------------------------------------------

def test_index_codes_follow_add_remove_save_and_load(tmp_path, rng):
    D = 200
    x = unit(rng.standard_normal((3000, D)))
    idx = Index(D)
    idx.add(x[:1001])
    q = (x[rng.integers(0, 3000, 6)] + 0.2 * rng.standard_normal((6, D))).astype(np.float32)
    assert_same(q, idx.descriptors, 5, prepared=idx.prepared())
    idx.add(x[1001:])  # codes extended in place of the partial block, not rebuilt
    fresh = plm.ops.build_codes(idx.descriptors, "cosine")
    assert np.array_equal(idx.prepared().codes, fresh[0]) and np.array_equal(idx.prepared().meta, fresh[1])
    s, ids = idx.search(q, 5)
    s0, i0 = plm.search(q, idx.descriptors, 5)
    assert np.array_equal(ids, idx.ids[i0]) and np.array_equal(s, s0)
    idx.remove(idx.ids[:10])
    assert_same(q, idx.descriptors, 5, prepared=idx.prepared())
    path = idx.save(tmp_path / "a.plmi")
    loaded = Index.load(path)
    assert loaded.info()["codes"] and isinstance(loaded.prepared().codes, np.memmap)
    assert np.array_equal(loaded.prepared().codes, idx.prepared().codes)
    assert_same(q, loaded.descriptors, 5, prepared=loaded.prepared())


def _rewrite_header(path, edit):
    """Rewrites an index file's header JSON through edit(header) -> (header, version)."""
    import json
    raw = bytearray(path.read_bytes())
    magic, version, hlen, _, _ = PREFIX.unpack_from(raw)
    header, version = edit(json.loads(raw[PREFIX.size:PREFIX.size + hlen]), version)
    new = json.dumps(header, sort_keys=True).encode().ljust(hlen)
    assert len(new) == hlen
    raw[:PREFIX.size] = PREFIX.pack(magic, version, hlen, zlib.crc32(new), 0)
    raw[PREFIX.size:PREFIX.size + hlen] = new
    path.write_bytes(bytes(raw))
    return header


def test_version_1_files_load_and_get_codes(tmp_path, rng):
    idx = Index(32)
    idx.add(unit(rng.standard_normal((500, 32))))
    path = idx.save(tmp_path / "v1.plmi")

    def to_v1(h, version):
        del h["sections"]["codes"], h["sections"]["code_meta"]
        return h, 1

    _rewrite_header(path, to_v1)
    old = Index.load(path)
    assert not old.info()["codes"]
    q = rng.standard_normal((3, 32)).astype(np.float32)
    assert np.array_equal(old.search(q, 4)[1], idx.search(q, 4)[1])
    assert old.info()["codes"]  # built on first use


def test_codes_that_do_not_match_the_matrix_are_dropped(tmp_path, rng, caplog):
    idx = Index(32)
    idx.add(unit(rng.standard_normal((500, 32))))
    path = idx.save(tmp_path / "x.plmi")
    raw = bytearray(path.read_bytes())
    _, _, hlen, _, _ = PREFIX.unpack_from(raw)
    import json
    sec = json.loads(raw[PREFIX.size:PREFIX.size + hlen])["sections"]["codes"]
    raw[sec["offset"]] ^= 0x40  # a crafted code with a consistent checksum
    path.write_bytes(bytes(raw))
    codes = np.frombuffer(bytes(raw[sec["offset"]:sec["offset"] + sec["nbytes"]]), np.uint8)

    def fix_sum(h, version):
        h["sections"]["codes"]["sum64"] = sum64(codes)
        return h, version

    _rewrite_header(path, fix_sum)
    loaded = Index.load(path)
    assert not loaded.info()["codes"] and "do not match" in caplog.text
    q = rng.standard_normal((3, 32)).astype(np.float32)
    assert np.array_equal(loaded.search(q, 4)[1], idx.search(q, 4)[1])


def test_distributed_index_searches_the_shards_codes(tmp_path, rng):
    """One process, no process group: the index's one segment takes the file's codes (no rebuild)
    and answers as search() does."""
    from pylandmark.retrieval.sharded import DistributedIndex
    x = unit(rng.standard_normal((5000, 64)))
    idx = Index(64)
    idx.add(x)
    path = idx.save(tmp_path / "d.plmi")
    di = DistributedIndex.open(path)
    (seg,) = di.segments
    assert isinstance(seg.codes[0], np.memmap)
    q = (x[rng.integers(0, 5000, 4)] + 0.1 * rng.standard_normal((4, 64))).astype(np.float32)
    s, ids = di.search(q, 6)
    s0, i0 = plm.search(q, idx.descriptors, 6)
    assert np.array_equal(np.asarray(ids), idx.ids[i0]) and np.array_equal(np.asarray(s), s0)
    prepared = seg.database("cosine")
    assert_same(q, idx.descriptors, 6, prepared=prepared)


def test_recognize_and_cli_add_codes_to_an_old_file(tmp_path, rng):
    from pylandmark.pipelines.local import add_codes_to_index_file
    idx = Index(32)
    x = unit(rng.standard_normal((3000, 32)))
    idx.add(x, labels=[f"c{i % 7}" for i in range(3000)])
    path = idx.save(tmp_path / "old.plmi")

    def to_v1(h, version):
        del h["sections"]["codes"], h["sections"]["code_meta"]
        return h, 1

    _rewrite_header(path, to_v1)
    assert add_codes_to_index_file(path) == {"count": 3000, "updated": True}
    assert add_codes_to_index_file(path) == {"count": 3000, "updated": False}
    loaded = Index.load(path)
    assert loaded.info()["codes"]
    q = (x[:5] + 0.05 * rng.standard_normal((5, 32))).astype(np.float32)
    a = plm.recognize(loaded, q)
    b = plm.recognize((np.asarray(idx.descriptors), np.asarray(idx.labels)), q)
    assert list(a.labels) == list(b.labels)


def test_searches_during_adds_see_whole_snapshots(rng):
    """Threads search an Index while another adds to it: every answer equals search() over the
    rows as they were after some number of adds (the matrix and its codes are swapped as one
    snapshot; a search never mixes the codes of one with the rows of the other)."""
    import threading
    D, chunk, adds = 64, 320, 16
    x = unit(rng.standard_normal((chunk * (adds + 1), D))).astype(np.float16)
    idx = Index(D)
    idx.add(x[:chunk])
    idx.prepared()  # codes from the start, extended by every add
    q = (np.asarray(x[rng.integers(0, len(x), 3)], np.float32) + 0.1 * rng.standard_normal((3, D))).astype(np.float32)
    seen, errors, done = [], [], threading.Event()

    def reader():
        while not done.is_set():
            try:
                seen.append(tuple(np.asarray(a).copy() for a in idx.search_rows(q, 5)))
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(err)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for i in range(1, adds + 1):
        idx.add(x[i * chunk:(i + 1) * chunk])
    done.set()
    for t in threads:
        t.join()
    assert not errors, errors[:1]
    snapshots = [plm.search(q, x[:n * chunk], 5) for n in range(1, adds + 2)]
    for s, r in seen:
        assert any(np.array_equal(r, r0) and np.array_equal(s.view(np.uint32), s0.view(np.uint32))
                   for s0, r0 in snapshots)
    assert len(seen) > adds


def test_every_code_kernel_gives_the_same_bounds(rng):
    """Same int8 queries and exact integer dot products on every variant (vpdpbusd on unsigned
    rows with the 128 x sum(q8) correction, vpsignb / masked negation + vpmaddubsw on signed
    rows, plain C). The SIMD variants evaluate the bound expression with the same fused
    multiply-adds: bit for bit equal. The generic build has no FMA: its few float32 roundings
    (A, B and A +- B: at most 6, each <= 2^-24 of |A| + B) may differ in the last bits."""
    D = 203
    db = rng.standard_normal((777, D)).astype(np.float16)
    q = rng.standard_normal((13, D)).astype(np.float32)
    q[0, :] = 127.0 / 128  # extreme query codes: every byte at +-127
    q[1, ::2] = -1.0
    prepared = plm.prepare(db, "ip")
    results = {}
    isa_before = _C.cpu_isa()
    try:
        for name in _C.code_kernels():
            _C.set_cpu_isa(name.split("-")[0])
            _C.set_code_kernel(name)
            results[name] = bounds(q, db, prepared, "ip")
    finally:
        _C.set_code_kernel("")
        _C.set_cpu_isa(isa_before)
    simd = {name: r for name, r in results.items() if name != "generic"}
    if simd:
        first = next(iter(simd.values()))
        for name, (lo, up) in simd.items():
            assert np.array_equal(lo.view(np.uint32), first[0].view(np.uint32)), name
            assert np.array_equal(up.view(np.uint32), first[1].view(np.uint32)), name
        lo, up = results["generic"]
        scale = np.abs(first[0]) + np.abs(first[1])  # >= |A| + B
        assert (np.abs(lo - first[0]) <= 6 * 2.0**-24 * scale).all()
        assert (np.abs(up - first[1]) <= 6 * 2.0**-24 * scale).all()
