"""CUDA search against a float64 reference and the CPU kernel (skips without a GPU).

Every case rebuilds the scores in float64 on the CPU from the very values the GPU read (half
precision included) and checks that the GPU returned the exact top-k: the scores are the
reference scores of the returned rows, the rows are the true top-k up to near-ties (a float32
accumulation tolerance), equal scores come in index order, k > N pads with -1 / -inf, and the CPU
kernel on .cpu() copies returns the same rows wherever the reference separates them.
"""
from __future__ import annotations

import pytest
from search_checks import check, check_matches_cpu, make, make_db, reference, tolerance

import pylandmark as plm
from pylandmark import _C
from pylandmark.ops import search_kernel

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not hasattr(_C, "search_cuda"), reason="pylandmark built without CUDA"),
]

DTYPES = ("float16", "bfloat16", "float32")
METRICS = ("cosine", "ip")
SLEEP_CYCLES = 50_000_000  # tens of milliseconds of GPU time: long enough to expose a race

# (Q, N, D, k): N = 1, N < k (padding), odd D, D = 4096, k on both sides of the kernel's bucket
# edges, Q around warp and tile multiples. Dtypes and metric cycle below so that every
# (query dtype, db dtype) pair appears.
SHAPES = [
    (1, 1, 3, 1), (2, 1, 17, 5), (15, 7, 1001, 31), (16, 5000, 17, 32), (17, 4099, 128, 33),
    (63, 3000, 1001, 100), (64, 2000, 4096, 127), (65, 3001, 256, 128), (300, 1500, 96, 129),
    (2049, 1200, 64, 1000), (1, 50000, 1024, 1024), (64, 1000, 33, 1024), (300, 20000, 3, 5),
]
GRID = [(*shape, DTYPES[c % 3], DTYPES[(c // 3) % 3], METRICS[c % 2]) for c, shape in enumerate(SHAPES)]
KS = (1, 5, 31, 32, 33, 100, 127, 128, 129, 1000, 1024)
# db layouts: 16-byte aligned half rows (tensor-core scan on GPUs that have one), the same rows
# 2 bytes off alignment, and float32 rows (both scanned without tensor cores)
LAYOUTS = ("float16", "float16_unaligned", "float32")


def run_and_check(q, db, k, metric="cosine"):
    """Searches on the GPU, checks framework, device and the top-k, and compares with the CPU."""
    atol = tolerance(str(q.dtype).removeprefix("torch."), str(db.dtype).removeprefix("torch."))
    scores, idx = plm.search(q, db, k=k, metric=metric)
    assert isinstance(scores, torch.Tensor) and isinstance(idx, torch.Tensor)
    assert scores.device == idx.device == q.device
    ref = reference(q, db, metric)
    check(scores.reshape(-1, k), idx.reshape(-1, k), ref, k, atol)
    check_matches_cpu(q, db, idx, ref, k, metric, atol)
    return scores, idx


@pytest.mark.parametrize("Q,N,D,k,qdtype,dbdtype,metric", GRID)
def test_shapes(rng, Q, N, D, k, qdtype, dbdtype, metric):
    run_and_check(make(rng, (Q, D), qdtype), make_db(rng, (N, D), dbdtype, metric), k, metric)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("Q", [16, 65])
@pytest.mark.parametrize("k", KS)
def test_k_and_q_edges_on_every_db_layout(rng, k, Q, layout):
    if layout == "float16_unaligned":
        db = make(rng, (2011, 129), "float16")[:, 1:]
    else:
        db = make(rng, (2011, 128), layout)
    run_and_check(make(rng, (Q, 128), "float32"), db, k)


@pytest.mark.parametrize("dbdtype", ["float16", "float32"])
def test_more_queries_than_one_internal_batch(rng, dbdtype):
    """8200 float32 queries of D=4096 are more than 128 MB prepared: the GPU takes two batches
    (and, with many query tiles, computes the db norms in one pass first)."""
    run_and_check(make(rng, (8200, 4096), "float32"), make_db(rng, (300, 4096), dbdtype), 5)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dbdtype", DTYPES)
@pytest.mark.parametrize("qdtype", DTYPES)
def test_every_dtype_pair(rng, qdtype, dbdtype, metric):
    run_and_check(make(rng, (33, 200), qdtype), make_db(rng, (2500, 200), dbdtype, metric), 40, metric)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [7, 129, 1024])
def test_ties_go_to_lower_index(rng, k, metric):
    base = make(rng, (5, 64), "float16")
    db = base.repeat(6000, 1)  # row r equals base[r % 5]: ties across every block of the grid
    scores, idx = plm.search(base[2:4], db, k=k, metric=metric)
    expected = torch.arange(k, device=db.device) * 5
    torch.testing.assert_close(idx, torch.stack([expected + 2, expected + 3]), rtol=0, atol=0)
    assert (scores == scores[:, :1]).all()


@pytest.mark.parametrize("metric", METRICS)
def test_zero_rows_and_zero_queries(rng, metric):
    db = make(rng, (300, 40), "float16")
    db[[3, 17, 250]] = 0
    q = make(rng, (4, 40), "float32")
    q[1] = 0
    scores, idx = run_and_check(q, db, 300, metric)
    assert (scores[1] == 0).all()
    torch.testing.assert_close(idx[1], torch.arange(300, device=db.device), rtol=0, atol=0)
    assert (scores[torch.isin(idx, torch.tensor([3, 17, 250], device=db.device))] == 0).all()


@pytest.mark.parametrize("view", ["every_2nd_row", "every_3rd_row_from_1", "column_prefix", "column_window",
                                  "unaligned_column_window"])
def test_strided_db_and_transposed_queries(rng, view):
    big = make(rng, (4001, 80), "float16")
    db = {"every_2nd_row": big[::2], "every_3rd_row_from_1": big[1::3],
          "column_prefix": big[:, :72], "column_window": big[::2, 8:],
          "unaligned_column_window": big[:, 3:75]}[view]
    q = make(rng, (9, db.shape[1]), "float32").t().contiguous().t()  # element stride 9: copied
    for metric in METRICS:
        run_and_check(q, db, 50, metric)


def test_row_offsets_beyond_2_31_elements(rng):
    N, stride, D = 40000, 60000, 64
    if torch.cuda.mem_get_info()[0] < 2 * N * stride + (1 << 30):
        pytest.skip("needs about 6 GB of free GPU memory")
    big = torch.empty((N, stride), dtype=torch.float16, device="cuda")
    db = big[:, :D]
    db.copy_(make(rng, (N, D), "float16"))
    assert (N - 1) * db.stride(0) >= 2**31
    q = db[[N - 1, N // 2, 0]].float()
    _, idx = run_and_check(q, db, 10)
    assert idx[:, 0].tolist() == [N - 1, N // 2, 0]


def test_one_dimensional_query_gives_one_dimensional_result(rng):
    db = make(rng, (700, 31), "float16")
    q = make(rng, (31,), "float32")
    s, i = run_and_check(q, db, 3)
    assert s.shape == (3,) and i.shape == (3,)
    s2, i2 = plm.search(q[None], db, k=3)
    torch.testing.assert_close(i, i2[0], rtol=0, atol=0)
    torch.testing.assert_close(s, s2[0], rtol=0, atol=0)


def test_the_scan_kernel_follows_dtype_alignment_and_query_count(rng):
    """Tensor cores for an aligned half/bfloat16 db on sm_80+ (small tile up to 16 queries),
    the CUDA-core scan for float32 rows and unaligned rows."""
    db = make(rng, (1000, 128), "float16")
    tensor_cores = torch.cuda.get_device_capability(db.device) >= (8, 0)
    expect = (lambda name: name) if tensor_cores else (lambda name: "simt")
    assert search_kernel(make(rng, (3, 128), "float32"), db, 5) == expect("mma_small")
    assert search_kernel(make(rng, (300, 128), "bfloat16"), db, 5) == expect("mma_wide")
    assert search_kernel(make(rng, (3, 128), "float16"), db.float(), 5) == "simt"
    assert search_kernel(make(rng, (3, 127), "float16"), db[:, 1:], 5) == "simt"


def test_empty_query_batch(rng):
    s, i = plm.search(make(rng, (0, 8), "float32"), make(rng, (10, 8), "float16"), k=3)
    assert s.shape == (0, 3) and i.shape == (0, 3) and s.is_cuda and i.is_cuda


def test_k_above_1024_is_rejected(rng):
    with pytest.raises(ValueError, match="1024"):
        plm.search(make(rng, (2, 16), "float32"), make(rng, (2000, 16), "float16"), k=1025)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("qdtype", ["float32", "float16"])
def test_nan_and_inf_query_rows_give_nan_and_minus_one(rng, qdtype, metric):
    db = make(rng, (1000, 24), "float16")
    q = make(rng, (6, 24), qdtype)
    q[1, 3], q[3, 0], q[4, 7] = float("nan"), float("inf"), float("-inf")
    scores, idx = plm.search(q, db, k=20, metric=metric)  # no error: the GPU does not look
    bad = torch.tensor([1, 3, 4], device="cuda")
    assert torch.isnan(scores[bad]).all() and (idx[bad] == -1).all()
    good = torch.tensor([0, 2, 5], device="cuda")
    check(scores[good], idx[good], reference(q[good], db, metric), 20, tolerance(qdtype, "float16"))


def test_runs_on_the_callers_stream_and_reads_inputs_written_there(rng):
    q_src, db_src = make(rng, (40, 128), "float32"), make(rng, (30000, 128), "float16")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)  # the copies below land late on this stream
        q, db = q_src.clone(), db_src.clone()
        scores, idx = plm.search(q, db, k=25)  # must be ordered after the copies
    side.synchronize()
    check(scores, idx, reference(q_src, db_src, "cosine"), 25, 1e-5)


def test_does_not_synchronise(rng):
    q, db = make(rng, (8, 256), "float32"), make(rng, (20000, 256), "float16")
    q[5, 2] = float("nan")  # the NaN check must not wait for the GPU either
    plm.search(q, db, k=10)  # warm-up: module loading, workspaces
    torch.cuda.synchronize()
    torch.cuda._sleep(20 * SLEEP_CYCLES)  # about half a second of GPU work ahead of the search
    scores, idx = plm.search(q, db, k=10)
    assert not torch.cuda.current_stream().query(), "search waited for the GPU to finish"
    torch.cuda.synchronize()
    rows = torch.tensor([0, 1, 2, 3, 4, 6, 7], device="cuda")
    check(scores[rows], idx[rows], reference(q[rows], db, "cosine"), 10, 1e-5)


def test_requires_grad_tensors_are_accepted(rng):
    q = make(rng, (3, 48), "float32").requires_grad_()
    db = make(rng, (500, 48), "float32").requires_grad_()
    scores, _ = run_and_check(q, db, 4)
    assert not scores.requires_grad


def test_cupy_inputs_on_a_cupy_stream(rng):
    cupy = pytest.importorskip("cupy")
    q_np = make(rng, (12, 96), "float32", device="cpu").numpy()
    db_np = make(rng, (20000, 96), "float16", device="cpu").numpy()
    q_src, db_src = cupy.asarray(q_np), cupy.asarray(db_np)
    cupy.cuda.Device().synchronize()
    with cupy.cuda.Stream(non_blocking=True) as side:
        with torch.cuda.stream(torch.cuda.ExternalStream(side.ptr)):
            torch.cuda._sleep(SLEEP_CYCLES)  # the copies below land late on the cupy stream
        q, db = q_src.copy(), db_src.copy()
        scores, idx = plm.search(q, db, k=30)
    side.synchronize()
    assert isinstance(scores, cupy.ndarray) and isinstance(idx, cupy.ndarray)
    assert scores.device == idx.device == q.device
    assert scores.dtype == cupy.float32 and idx.dtype == cupy.int64
    ref = reference(torch.from_numpy(q_np), torch.from_numpy(db_np), "cosine")
    check(torch.from_numpy(cupy.asnumpy(scores)), torch.from_numpy(cupy.asnumpy(idx)), ref, 30, 1e-5)


def test_mixed_devices_are_rejected(rng):
    q, db = make(rng, (2, 16), "float32"), make(rng, (50, 16), "float16")
    for a, b in ((q, db.cpu()), (q.cpu(), db)):
        with pytest.raises(ValueError, match="same device"):
            plm.search(a, b, k=3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device(rng):
    q, db = make(rng, (20, 64), "float32", "cuda:1"), make(rng, (5000, 64), "bfloat16", "cuda:1")
    assert torch.cuda.current_device() == 0
    side = torch.cuda.Stream(device="cuda:1")
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        q2, db2 = q.clone(), db.clone()
        scores, idx = plm.search(q2, db2, k=17)
    side.synchronize()
    assert scores.device == idx.device == torch.device("cuda:1")
    check(scores, idx, reference(q, db, "cosine"), 17, tolerance("float32", "bfloat16"))
    run_and_check(q, db, 17, "ip")
    with pytest.raises(ValueError, match="same device"):
        plm.search(q.to("cuda:0"), db, k=3)


# A prepared db on the GPU (int8 codes on the device, tensor-core code scan, rescoring of the
# listed rows): the plain GPU search's scores and indices, bit for bit.
PREPARED = [
    (1, 50000, 1024, 5, "float16", "float16", "cosine"), (1, 50000, 1024, 100, "float32", "float16", "ip"),
    (64, 30000, 256, 5, "float16", "bfloat16", "cosine"), (1024, 20000, 128, 100, "bfloat16", "float16", "cosine"),
    (70, 4099, 72, 33, "float32", "float16", "cosine"), (3, 1000, 17, 5, "float16", "float16", "cosine"),
    (5, 2000, 64, 5, "float32", "float32", "ip"),
]


@pytest.mark.parametrize("Q,N,D,k,qdtype,dbdtype,metric", PREPARED)
def test_prepared_db_gives_the_plain_search_bit_for_bit(rng, Q, N, D, k, qdtype, dbdtype, metric):
    q, db = make(rng, (Q, D), qdtype), make_db(rng, (N, D), dbdtype, metric)
    db[7] = db[N // 2]  # a tie across splits
    prepared = plm.prepare(db, metric)
    if dbdtype == "float32":  # searched as it is
        assert prepared.device_codes is None
    else:
        assert prepared.device_codes[0].device == db.device
    scores, idx = plm.search(q, prepared, k, metric)
    ref_scores, ref_idx = plm.search(q, db, k, metric)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(scores.view(torch.int32), ref_scores.view(torch.int32))


def test_prepared_db_near_ties_and_hostile_rows(rng):
    base = make(rng, (1, 256), "float32")
    db = (base + 1e-3 * make(rng, (70000, 256), "float32")).to(torch.float16)  # the bound cannot prune
    db[5] = 0
    db[9, 3] = float("nan")
    q = torch.cat([base.half(), make(rng, (3, 256), "float16")])
    q[2, 0] = float("inf")
    prepared = plm.prepare(db)
    scores, idx = plm.search(q, prepared, 10)
    ref_scores, ref_idx = plm.search(q, db, 10)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(scores.nan_to_num().view(torch.int32), ref_scores.nan_to_num().view(torch.int32))
