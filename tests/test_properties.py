"""Property-based tests (hypothesis, issue 26): exact search, GeM and the index file's round trip
against float64 / numpy references on inputs hypothesis chooses (odd shapes, k beyond N, ties,
tiny and huge magnitudes, labels and paths of any text), with the tolerances the suite derives
from the arithmetic (test_search.score_bounds, test_gem.gem_bound). Bounded: a fixed number of
examples each, no deadline (the first call of a kernel pays for thread start-up)."""
from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import pylandmark as plm  # noqa: E402
from pylandmark.retrieval.index import Index  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                    derandomize=True)


@st.composite
def search_problems(draw):
    q, n, d = draw(st.integers(1, 6)), draw(st.integers(1, 40)), draw(st.integers(1, 70))
    k = draw(st.integers(1, 48))
    dtype = draw(st.sampled_from(["float32", "float16"]))
    metric = draw(st.sampled_from(["cosine", "ip"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    db = rng.standard_normal((n, d)).astype(dtype)
    if n > 2 and draw(st.booleans()):  # exact copies: ties must go to the lower index
        db[rng.integers(0, n)] = db[rng.integers(0, n)]
    queries = rng.standard_normal((q, d)).astype(np.float32)
    if metric == "cosine":  # cosine ignores the scale, within the float32 range
        queries *= np.float32(10.0 ** draw(st.integers(-30, 30)))
    return queries, db, k, metric


@SETTINGS
@given(search_problems())
def test_search_is_the_exact_top_k(problem):
    from test_search import check_topk, reference_scores, tolerance

    queries, db, k, metric = problem
    scores, idx = plm.search(queries, db, k=k, metric=metric)
    check_topk(scores, idx, reference_scores(queries, db, metric), k, tolerance(queries, db, metric))


@st.composite
def gem_problems(draw):
    import torch

    b, c, h, w = (draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 7)),
                  draw(st.integers(1, 7)))
    p = draw(st.sampled_from([1.0, 2.0, 3.0, 4.5, 6.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.random((b, c, h, w)) * 10.0 ** draw(st.integers(-3, 2))
    if draw(st.booleans()):  # negative activations and zeros clamp to eps
        x -= x.mean()
    return torch.from_numpy(x.astype(np.float32)), p


@SETTINGS
@given(gem_problems())
def test_gem_equals_the_float64_reference(problem):
    import torch
    from test_gem import gem_bound

    x, p = problem
    eps = 1e-6
    got = plm.gem(x, p=p, eps=eps).double()
    ref = x.double().clamp(min=eps).pow(p).mean((-2, -1)).pow(1.0 / p)
    assert got.shape == ref.shape
    assert torch.all((got - ref).abs() <= gem_bound(x, p, eps)), (got - ref).abs().max()


labels_st = st.one_of(st.text(max_size=12), st.integers(-2**40, 2**40))
path_st = st.text(min_size=1, max_size=30).filter(lambda s: "\x00" not in s)


@st.composite
def index_contents(draw):
    n, d = draw(st.integers(0, 12)), draw(st.integers(1, 24))
    metric = draw(st.sampled_from(["cosine", "ip"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * 10.0 ** draw(st.integers(-20, 20) if metric == "cosine" else st.integers(-3, 3))
    with_labels = draw(st.booleans())
    labels = [draw(labels_st) for _ in range(n)] if with_labels else None
    if labels is not None and not all(isinstance(v, int) for v in labels):
        labels = [str(v) for v in labels]  # one type per column, as an index keeps them
    paths = [draw(path_st) for _ in range(n)] if draw(st.booleans()) else None
    ids = draw(st.lists(st.integers(0, 2**62), min_size=n, max_size=n, unique=True)) if draw(st.booleans()) else None
    return x, metric, labels, paths, ids


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture],
          derandomize=True)
@given(index_contents(), st.booleans())
def test_index_round_trip(tmp_path, contents, mmap):
    """What goes in comes back: ids, labels, paths as given, and the rows as float16 of the float64
    reference (unit rows for cosine: normalised in float64 before the one rounding, so the only
    error is that rounding, compared exactly)."""
    x, metric, labels, paths, ids = contents
    index = Index(x.shape[1], metric)
    if len(x):
        index.add(x, labels=labels, ids=ids, paths=paths)
    path = index.save(tmp_path / "prop.plmi")
    loaded = Index.load(path, mmap=mmap, verify=True)
    assert len(loaded) == len(x) and loaded.metric == metric
    want = x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "cosine" and len(x) else x
    np.testing.assert_array_equal(loaded.descriptors, np.asarray(want, np.float64).astype(np.float16))
    np.testing.assert_array_equal(loaded.ids, ids if ids is not None else np.arange(len(x)))
    if len(x):
        assert (None if loaded.labels is None else list(loaded.labels)) == labels
        assert loaded.paths == paths
