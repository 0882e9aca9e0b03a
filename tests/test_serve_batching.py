"""The batcher in front of the network (on the CPU; the service uses the same code on a GPU), and
the service engine's descriptors against plm.extract."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pylandmark.serve.batching import Batcher, Overloaded


def test_results_come_back_to_their_callers_in_order():
    calls = []

    def fn(items):
        calls.append(list(items))
        return [x * x for x in items]

    b = Batcher(fn, max_batch=4)
    futures = [b.submit(i) for i in range(23)]
    assert [f.result(5) for f in futures] == [i * i for i in range(23)]
    b.close()
    assert all(1 <= len(c) <= 4 for c in calls)
    assert [x for c in calls for x in c] == list(range(23))  # FIFO, nothing lost or repeated
    assert b.stats()["items"] == 23


def test_concurrent_submissions_share_calls_and_never_mix_keys():
    """While the function is busy, submissions from many threads queue up; the next calls take
    them in batches of at most max_batch, one key (shape) per call."""
    gate = threading.Event()
    calls = []

    def fn(items):
        if not calls:
            gate.wait(5)  # hold the first call so that the others queue up behind it
        calls.append(list(items))
        return [(k, v + 1) for k, v in items]

    b = Batcher(fn, max_batch=5, key=lambda item: item[0])
    first = b.submit(("a", -1))
    time.sleep(0.05)  # the worker is now inside the first call
    items = [("a" if i % 3 else "b", i) for i in range(20)]
    with ThreadPoolExecutor(8) as pool:
        futures = list(pool.map(b.submit, items))
    gate.set()
    assert first.result(5) == ("a", 0)
    assert [f.result(5) for f in futures] == [(k, v + 1) for k, v in items]
    b.close()
    later = calls[1:]
    assert all(len({k for k, _ in c}) == 1 for c in later), later
    assert all(len(c) <= 5 for c in later)
    assert max(len(c) for c in later) > 1  # batching happened
    assert sum(len(c) for c in later) == 20


def test_max_wait_gathers_items_that_arrive_shortly_after():
    calls = []
    b = Batcher(lambda xs: calls.append(len(xs)) or xs, max_batch=8, max_wait=0.5)
    futures = []
    for i in range(3):
        futures.append(b.submit(i))
        time.sleep(0.02)
    assert [f.result(5) for f in futures] == [0, 1, 2]
    b.close()
    assert calls == [3]


def test_a_failing_call_fails_only_its_items():
    def fn(items):
        if "bad" in items:
            raise ValueError("cannot do bad")
        return [s.upper() for s in items]

    b = Batcher(fn, max_batch=8, key=lambda s: s == "bad")
    gate = b.submit("x")  # probably alone; the rest may batch
    futures = {s: b.submit(s) for s in ("good", "bad", "fine")}
    assert gate.result(5) == "X"
    assert futures["good"].result(5) == "GOOD" and futures["fine"].result(5) == "FINE"
    with pytest.raises(ValueError, match="cannot do bad"):
        futures["bad"].result(5)
    assert b.submit("again").result(5) == "AGAIN"  # the worker thread survived
    b.close()


def test_wrong_result_count_is_an_error_not_a_hang():
    b = Batcher(lambda xs: xs[:-1], max_batch=4)
    with pytest.raises(RuntimeError, match="returned 0 results for 1 items"):
        b.submit(1).result(5)
    b.close()


def test_a_full_queue_refuses_instead_of_growing():
    gate = threading.Event()
    b = Batcher(lambda xs: gate.wait(5) and xs, max_batch=1, max_queue=2)
    first = b.submit(0)
    time.sleep(0.05)  # taken by the worker, which now waits on the gate
    b.submit(1), b.submit(2)
    with pytest.raises(Overloaded, match="waiting"):
        b.submit(3)
    gate.set()
    assert first.result(5) == 0
    b.close()
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(4)


@pytest.mark.parametrize("kw,words", [({"max_batch": 0}, "max_batch"), ({"max_wait": -1}, "max_wait"),
                                      ({"max_queue": 0}, "max_queue")])
def test_bad_settings_name_the_argument(kw, words):
    with pytest.raises(ValueError, match=words):
        Batcher(lambda xs: xs, **kw)


# ---- the engine: the network behind the batcher -------------------------------------------

@pytest.fixture(scope="module")
def engine(shared_data, tmp_path_factory):
    import torch
    from serve_util import build_index, tiny_weights

    from pylandmark.serve.config import ServeConfig
    from pylandmark.serve.engine import Engine

    threads_before = torch.get_num_threads()
    d = tmp_path_factory.mktemp("engine")
    weights = tiny_weights(d)
    index = build_index(shared_data / "pnu_landmarks", weights, d / "pnu.plmi")
    eng = Engine(ServeConfig(index=str(index), max_batch=8, batch_wait_ms=20, threads=1))
    yield eng, weights
    eng.close()
    import torch

    from pylandmark import set_num_threads

    set_num_threads(0)  # the engine set this process's threads, as a server worker's own
    torch.set_num_threads(threads_before)


def test_engine_descriptors_equal_extract_batched_or_not(engine, shared_data):
    """Concurrent requests for photos of one shape run as batches; every descriptor still equals
    plm.extract's for the same file up to one float16 step (batched float32 convolutions may
    round differently in the last bits; one float16 ulp of a unit vector's entry is <= 2^-11 for
    |v| < 1, so 1e-3 bounds it)."""
    import pylandmark as plm
    from pylandmark.models import LandmarkNet

    eng, weights = engine
    photos = sorted((shared_data / "pnu_landmarks" / "test").rglob("*.png"))[:4]
    ref = plm.extract(LandmarkNet.from_pretrained(weights), [str(p) for p in photos], image_size=128, progress=False)
    before = eng.batcher.stats()["calls"]
    jobs = [p for p in photos for _ in range(4)]  # each photo four times: four same-shape items
    tensors = [eng.prepare(p.read_bytes(), p.name) for p in jobs]
    with ThreadPoolExecutor(16) as pool:
        rows = list(pool.map(lambda t: eng.describe([t])[0], tensors))
    for p, row in zip(jobs, rows):
        np.testing.assert_allclose(row.astype(np.float32), ref[photos.index(p)].astype(np.float32), atol=1e-3)
    stats = eng.batcher.stats()
    assert stats["items"] - 0 >= 16 and stats["calls"] - before < 16  # some calls carried several photos


def test_engine_results_are_the_cli_json(engine, shared_data):
    from pylandmark.pipelines import index_options, recognize_images

    eng, weights = engine
    from pylandmark.models import LandmarkNet

    photo = shared_data / "pnu_landmarks" / "test" / "wb" / "00000001.png"
    desc = eng.describe([eng.prepare(photo.read_bytes(), photo.name)])
    got = eng.recognize(desc, [str(photo)], k=5)
    want = recognize_images(eng.index, LandmarkNet.from_pretrained(weights), [photo],
                            index_options(eng.index, progress=False), k=5)
    # the CLI adds "truth" when the photo sits in a class folder; an upload has no folder
    assert got[0].keys() == want[0].keys() - {"truth"} and got[0]["query"] == want[0]["query"]
    assert [h["id"] for h in got[0]["neighbours"]] == [h["id"] for h in want[0]["neighbours"]]
    assert got[0]["label"] == want[0]["label"] and got[0]["votes"] == want[0]["votes"]


def test_engine_applies_the_index_whitening(shared_data, tmp_path):
    """An index built with --whitening records it, and the service describes uploads as the index's
    photos were described: whitened (it was not: the engine's forward skipped the whitening, so
    POST /search and `pylandmark search` answered differently for the same photo). Tolerance as
    in the test above: one float16 step (<= 2^-11 for |v| < 1) bounded by 1e-3; the un-whitened
    descriptor is far outside it (checked, so the test can tell the two apart)."""
    import torch
    from serve_util import SIZE, tiny_weights

    import pylandmark as plm
    from pylandmark.cli import main
    from pylandmark.models import LandmarkNet
    from pylandmark.nn.whiten import pca_whitening
    from pylandmark.serve.config import ServeConfig
    from pylandmark.serve.engine import Engine

    pnu = shared_data / "pnu_landmarks"
    weights = tiny_weights(tmp_path)
    whitening = pca_whitening(np.random.default_rng(0).standard_normal((200, 48)))
    wfile = whitening.save(tmp_path / "pca.safetensors")
    index = tmp_path / "white.plmi"
    assert main(["index", "build", str(pnu / "train"), "--labels-from-folders", "--out", str(index), "--weights",
                 str(weights), "--image-size", str(SIZE), "--whitening", str(wfile), "--quiet"]) == 0
    threads_before = torch.get_num_threads()
    eng = Engine(ServeConfig(index=str(index), threads=1))
    try:
        photos = sorted((pnu / "test").rglob("*.png"))[:3]
        got = eng.describe([eng.prepare(p.read_bytes(), p.name) for p in photos]).astype(np.float32)
    finally:
        eng.close()
        plm.set_num_threads(0)
        torch.set_num_threads(threads_before)
    net = LandmarkNet.from_pretrained(weights)
    paths = [str(p) for p in photos]
    want = plm.extract(net, paths, image_size=SIZE, whitening=str(wfile), progress=False).astype(np.float32)
    plain = plm.extract(net, paths, image_size=SIZE, progress=False).astype(np.float32)
    assert np.abs(plain - want).max() > 0.1  # whitening changes the descriptors a lot
    np.testing.assert_allclose(got, want, atol=1e-3)


def test_engine_never_fetches_a_url_the_index_names(shared_data, tmp_path, monkeypatch):
    """An index file may come from anyone: one that names its network by URL makes the service
    refuse to start without --weights, as the CLI does, and download nothing (on 2229dde the
    service fetched that URL); an explicit --weights is used as given."""
    from serve_util import build_index, tiny_weights

    import pylandmark.data.download as download
    from pylandmark.retrieval.index import Index
    from pylandmark.serve.config import ServeConfig
    from pylandmark.serve.engine import Engine

    def no_download(*a, **k):
        raise AssertionError("the service tried to download")

    weights = tiny_weights(tmp_path)
    index = Index.load(build_index(shared_data / "pnu_landmarks", weights, tmp_path / "pnu.plmi"), mmap=False)
    index.metadata["weights"] = "https://example.com/evil/model.safetensors"
    url_index = index.save(tmp_path / "url.plmi")
    monkeypatch.setattr(download, "download_url", no_download)
    with pytest.raises(ValueError, match="never makes pylandmark download.*--weights"):
        Engine(ServeConfig(index=str(url_index), threads=1))
    import torch

    from pylandmark import set_num_threads

    threads_before = torch.get_num_threads()
    eng = Engine(ServeConfig(index=str(url_index), weights=str(weights), threads=1))
    try:
        assert eng.dim == 48 and eng.weights == str(weights)
    finally:
        eng.close()
        set_num_threads(0)  # the engine set this process's threads, as a server worker's own
        torch.set_num_threads(threads_before)


def test_engine_with_rerank_answers_superglobals_top_k(shared_data, tmp_path):
    """`pylandmark serve --rerank superglobal`: the engine's search and recognize answer from the
    re-ranked top k, equal to superglobal() on the stored float16 matrix (itself tested against
    float64 loops) for the same descriptors."""
    from serve_util import build_index, tiny_weights

    from pylandmark.retrieval.rerank import superglobal
    from pylandmark.serve.config import ServeConfig
    from pylandmark.serve.engine import Engine

    weights = tiny_weights(tmp_path)
    index = build_index(shared_data / "pnu_landmarks", weights, tmp_path / "pnu.plmi")
    with pytest.raises(ValueError, match="rerank must be 'none' or 'superglobal'"):
        ServeConfig(index=str(index), rerank="qe")
    with pytest.raises(ValueError, match="rerank_beta must be"):
        ServeConfig(index=str(index), rerank="superglobal", rerank_beta=-0.1)
    eng = Engine(ServeConfig(index=str(index), threads=1, rerank="superglobal", rerank_m=11, rerank_neighbours=4))
    try:
        photos = sorted((shared_data / "pnu_landmarks" / "test").rglob("*.png"))[:6]
        desc = eng.describe([eng.prepare(p.read_bytes(), p.name) for p in photos])
        db = np.asarray(eng.index.descriptors)
        scores, rows = superglobal(desc, db, k=13, m=11, neighbours=4)
        ids = eng.index.ids
        for r, srow, rrow in zip(eng.search(desc, [p.name for p in photos], k=13), scores, rows):
            assert [h["id"] for h in r["neighbours"]] == ids[rrow].tolist()
            assert [h["score"] for h in r["neighbours"]] == srow.tolist()
        for r, rrow in zip(eng.recognize(desc, [p.name for p in photos], k=5), rows):
            assert [h["id"] for h in r["neighbours"]] == ids[rrow[:5]].tolist()
        assert eng.info()["network"]["rerank"] == {"m": 11, "neighbours": 4, "beta": 0.15}
    finally:
        eng.close()
