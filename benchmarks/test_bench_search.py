"""pytest-benchmark suites: `pytest benchmarks --benchmark-enable` (sizes from the issue).

Each group holds pylandmark and its baselines for one size, so the comparison table reads
side by side; `--benchmark-json out.json` keeps the numbers.
"""
from __future__ import annotations

import numpy as np
import pytest

import pylandmark as plm
from pylandmark.retrieval.bench import numpy_topk

N, D = 200_000, 1024


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    db = rng.standard_normal((N, D), dtype=np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    db16 = db.astype(np.float16)
    return db16, db16.astype(np.float32), rng


def make_method(name, db16, db32):
    if name == "pylandmark":
        return lambda q, k: plm.search(q, db16, k=k)[1]
    if name == "numpy":
        return lambda q, k: numpy_topk(q, db32, k)
    if name == "torch":
        torch = pytest.importorskip("torch")
        t = torch.from_numpy(db32)
        return lambda q, k: torch.topk(torch.from_numpy(q) @ t.T, k, dim=1).indices
    faiss = pytest.importorskip("faiss")
    if name == "faiss-flat":
        index = faiss.IndexFlatIP(D)
    else:
        index = faiss.IndexScalarQuantizer(D, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        index.train(db32[:1000])
    index.add(db32)
    return lambda q, k: index.search(q, k)[1]


@pytest.mark.parametrize("method", ["pylandmark", "numpy", "torch", "faiss-flat", "faiss-sq-fp16"])
@pytest.mark.parametrize("k", [5, 100])
@pytest.mark.parametrize("Q", [1, 64, 1024])
def test_search(benchmark, data, method, Q, k):
    db16, db32, rng = data
    q = rng.standard_normal((Q, D), dtype=np.float32)
    fn = make_method(method, db16, db32)
    benchmark.group = f"search N={N} Q={Q} k={k}"
    idx = benchmark.pedantic(fn, args=(q, k), rounds=3 if Q == 1024 else 10, warmup_rounds=1)
    ref = numpy_topk(q[:4], db32, k)
    got = np.asarray(idx)[:4]
    assert np.mean([len(set(a) & set(b)) / k for a, b in zip(got.tolist(), ref.tolist())]) > 0.99


@pytest.mark.parametrize("method", ["pylandmark", "torch-eager"])
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_gem(benchmark, method, mode):
    torch = pytest.importorskip("torch")
    x = torch.rand(64, 1024, 32, 24) * 2
    p = torch.nn.Parameter(torch.tensor([3.0]))

    def eager(t, pp):
        return t.clamp(min=1e-6).pow(pp).mean(dim=(-2, -1)).pow(1.0 / pp)

    f = (lambda t, pp: plm.nn.gem_torch(t, pp)) if method == "pylandmark" else eager
    benchmark.group = f"gem {mode} (64, 1024, 32, 24) float32"
    if mode == "forward":
        with torch.no_grad():
            y = benchmark.pedantic(f, args=(x, p), rounds=10, warmup_rounds=2)
        torch.testing.assert_close(y, eager(x, p.detach()), rtol=1e-5, atol=1e-6)
    else:
        def run():
            t = x.detach().requires_grad_()
            f(t, p).sum().backward()
        benchmark.pedantic(run, rounds=5, warmup_rounds=1)
