"""Several writers on one index at once (issue 26, data loss): `pylandmark index add` runs that
overlap on a single-file or a sharded index all land, in some order, with unique ids; a stale
in-memory index cannot overwrite rows another writer saved; a writer killed with SIGKILL, at any
point, neither leaves the lock held nor a damaged index."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pylandmark._files import writer_lock
from pylandmark.cli import main
from pylandmark.retrieval.index import Index, IndexChangedError
from pylandmark.retrieval.manifest import ShardedIndex

REPO = Path(__file__).resolve().parents[1]
SIZE = 160  # large enough that describing takes seconds: the runs overlap
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file locks")


def _photos(folder: Path, n: int, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"{seed:03d}_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE + 8 * (i % 3), 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch

    from pylandmark.models import LandmarkNet

    d = tmp_path_factory.mktemp("writers")
    torch.manual_seed(0)
    weights = LandmarkNet(backbone_args={"depths": [1, 1, 1, 1, 1], "out_chs": [16, 32, 32, 32, 32]}).save(d / "net")
    _photos(d / "db" / "base", 6, 0)
    return d, weights


def _build(setup, name: str) -> Path:
    d, weights = setup
    out = d / name
    assert main(["index", "build", str(d / "db"), "--labels-from-folders", "--out", str(out), "--weights",
                 str(weights), "--image-size", str(SIZE), "--quiet"]) == 0
    return out


def _adder(index: Path, images: list[Path], label: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "pylandmark", "index", "add", str(index), *map(str, images),
                             "--label", label, "--batch-size", "2", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)


def _all_rows_present(index: Path, batches: dict[str, list[Path]], base_rows: int) -> None:
    loaded = Index.load(index, verify=True)  # checksums; a manifest also checks that ids are unique
    assert len(loaded) == base_rows + sum(len(v) for v in batches.values())
    assert len(np.unique(loaded.ids)) == len(loaded)
    stored = dict(zip(loaded.paths, loaded.labels))
    for label, images in batches.items():
        for p in images:
            assert stored[str(p.resolve())] == label


@pytest.mark.parametrize("kind", ["file", "sharded"])
def test_overlapping_adds_all_land(setup, kind):
    """Three `index add` processes started together on one index while this process keeps loading
    it: each exits 0, every load sees whole runs only, and the index ends with every row of every
    run (on 4de196b: the last writer's save dropped the others' rows on a single file, and a
    manifest ended with duplicate ids and no longer loaded)."""
    d, _ = setup
    index = _build(setup, f"overlap_{kind}.plmi")
    if kind == "sharded":  # a first add by torchrun's shard job turns the file into a manifest
        first = _photos(d / f"first_{kind}", 2, 9)
        from pylandmark.extraction import ExtractOptions
        from pylandmark.models import LandmarkNet
        from pylandmark.pipelines import shards

        shards.add_images(index, LandmarkNet.from_pretrained(setup[1]), first,
                          ExtractOptions(image_size=SIZE, progress=False), label="first")
        assert isinstance(Index.load(index), ShardedIndex)
    base_rows = len(Index.load(index))
    batches = {f"run{i}": _photos(d / f"add_{kind}_{i}", 8 + i, 10 + i) for i in range(3)}
    procs = [_adder(index, images, label) for label, images in batches.items()]
    # a reader loads the index all along: every load is one whole version (whole runs only)
    whole = {base_rows + sum(len(v) for v, take in zip(batches.values(), mask) if take)
             for mask in np.ndindex(*(2,) * len(batches))}
    loads, deadline = 0, time.monotonic() + 300
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        loaded = Index.load(index, verify=True)
        assert len(loaded) in whole and len(np.unique(loaded.ids)) == len(loaded)
        assert len(loaded.labels) == len(loaded.paths) == len(loaded)
        loads += 1
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    assert loads >= 1
    _all_rows_present(index, batches, base_rows)


def test_a_stale_index_cannot_overwrite_a_newer_save(tmp_path, rng):
    """Two programs load the same file and both add rows: the second save would drop the first's
    rows, so it is refused with a message that says what to do (on 4de196b it succeeded)."""
    path = tmp_path / "x.plmi"
    index = Index(8)
    index.add(rng.standard_normal((4, 8)), labels=list("abcd"))
    index.save(path)
    first, second = Index.load(path, mmap=False), Index.load(path, mmap=False)
    first.add(rng.standard_normal((2, 8)), labels=["e", "f"])
    first.save(path)
    second.add(rng.standard_normal((1, 8)), labels=["g"])
    with pytest.raises(IndexChangedError, match="changed by another writer.*load the index again"):
        second.save(path)
    assert list(Index.load(path).labels) == list("abcdef")
    first.add(rng.standard_normal((1, 8)), labels=["h"])  # the writer that saved last goes on saving
    first.save(path)
    second.save(tmp_path / "copy.plmi")  # and the stale one may still be saved elsewhere
    assert len(Index.load(path)) == 7 and len(Index.load(tmp_path / "copy.plmi")) == 5
    fresh = Index(8)  # an index built in memory replaces the file on purpose (index build)
    fresh.add(rng.standard_normal((1, 8)))
    fresh.save(path)
    assert len(Index.load(path)) == 1


_HOLD = """
import sys, time
from pylandmark._files import writer_lock
with writer_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_writer_killed_holding_the_lock_releases_it(tmp_path):
    path = tmp_path / "x.plmi"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == b"locked"
        import fcntl

        probe = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # held by the live writer
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(probe)
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
        start = time.monotonic()
        with writer_lock(path), writer_lock(path):  # re-entrant in one thread
            assert time.monotonic() - start < 10
    finally:
        holder.kill()
        holder.wait(30)


def test_adders_killed_at_random_points_leave_a_whole_index(setup):
    """`index add` runs killed with SIGKILL after random delays (while describing, appending,
    writing or renaming) next to runs that finish: the index always loads with its checksums,
    holds the base rows and, for every run that finished, all of its rows."""
    d, _ = setup
    index = _build(setup, "killed.plmi")
    base_rows = len(Index.load(index))
    rng = np.random.default_rng(5)
    finished: dict[str, list[Path]] = {}
    for i in range(4):
        victim_images = _photos(d / f"victim_{i}", 4, 40 + i)
        keep_images = _photos(d / f"keeper_{i}", 2, 60 + i)
        victim = _adder(index, victim_images, f"victim{i}")
        keeper = _adder(index, keep_images, f"keeper{i}")
        time.sleep(float(rng.uniform(1.0, 6.0)))
        victim.send_signal(signal.SIGKILL)
        victim.wait(60)
        out, err = keeper.communicate(timeout=300)
        assert keeper.returncode == 0, err.decode()[-2000:]
        finished[f"keeper{i}"] = keep_images
        loaded = Index.load(index, verify=True)
        labels = list(loaded.labels)
        victim_rows = labels.count(f"victim{i}")
        assert victim_rows in (0, len(victim_images))  # all of a run's rows or none
        finished_rows = sum(len(v) for v in finished.values())
        assert len(loaded) == base_rows + finished_rows + sum(
            labels.count(f"victim{j}") for j in range(i + 1))
    stored = dict(zip(Index.load(index).paths, Index.load(index).labels))
    assert all(stored[str(p.resolve())] == label for label, images in finished.items() for p in images)
