"""`torchrun -m pylandmark ...` on 2 and 3 gloo ranks against the same command in one process:
index build / add and extract give the same rows, ids, labels, paths and descriptors; search,
recognize and evaluate print the same results; only rank 0 prints; a rank that dies leaves no
complete index and the re-run resumes from the shards already written.

Against one process as users run it (torch's default thread count), what README.md promises:
the same rows (ids, labels, paths, order) and descriptors equal up to float16 rounding, each
element within one float16 ulp (the ranks run one thread, as torchrun sets OMP_NUM_THREADS=1, so
oneDNN sums in other orders; the float32 values rounded differ by a few float32 ulps of the unit
row, test_extraction.F32_ROW), and search results the same except near-ties.

Against one process that also runs one thread, descriptors and printed results are compared bit
for bit: every rank then runs each image through the same computation as the single process (the
same network, one image per forward pass with ``--batch-size 1``, one thread), so no reduction
runs in another order."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pylandmark as plm
from pylandmark.cli import main
from pylandmark.models import LandmarkNet
from pylandmark.retrieval.manifest import ShardedIndex, shard_dir

TINY = {"depths": [1, 1, 1, 1, 1], "out_chs": [8, 16, 24, 32, 48]}
NET_ARGS = ["--image-size", "96", "--batch-size", "1", "--quiet"]


def torchrun(n: int, *args, cwd: Path, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           *[str(a) for a in args]]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@contextlib.contextmanager
def one_thread_in(folder: Path, threads: int | None = 1):
    """Like a rank: one torch thread (threads=None: torch's default, as a user's one process),
    and the work folder as the current directory (relative arguments, such as --weights net, are
    recorded as given)."""
    before, cwd = torch.get_num_threads(), os.getcwd()
    if threads is not None:
        torch.set_num_threads(threads)
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(cwd)
        torch.set_num_threads(before)


def one_process(capsys, work: Path, *argv, threads: int | None = 1) -> str:
    """The same command in this process, as one rank would run it (threads=None: as a user's
    one process runs it)."""
    with one_thread_in(work, threads):
        capsys.readouterr()
        assert main([str(a) for a in argv]) == 0
        return capsys.readouterr().out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Class folders of small photos (one unreadable file in rank 0's share), query photos and a
    tiny seeded network."""
    root = tmp_path_factory.mktemp("dist_cli")
    rng = np.random.default_rng(5)
    for c in range(3):
        folder = root / "db" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(4 + c):
            a = (rng.random((60 + 7 * i, 80, 3)) * 255).astype(np.uint8)
            a[..., c] = 200
            Image.fromarray(a).save(folder / f"im{i}.png")
    (root / "db" / "class0" / "broken.png").write_bytes(b"not a png")
    (root / "q").mkdir()
    for i in range(3):
        a = (rng.random((70, 90, 3)) * 255).astype(np.uint8)
        a[..., i] = 200
        Image.fromarray(a).save(root / "q" / f"q{i}.png")
    torch.manual_seed(0)
    LandmarkNet(backbone_args=TINY).save(root / "net")
    return root


@pytest.fixture(scope="module")
def reference(work) -> Path:
    """The single-process build (one thread), the reference of every comparison."""
    with one_thread_in(work):
        assert main(["index", "build", "db", "--labels-from-folders", "--weights", "net", "--out", "single.plmi",
                     *NET_ARGS]) == 0
    return work / "single.plmi"


@pytest.fixture(scope="module")
def plain_reference(work) -> Path:
    """The single-process build as users run it: torch's default thread count."""
    with one_thread_in(work, threads=None):
        assert main(["index", "build", "db", "--labels-from-folders", "--weights", "net", "--out", "plain.plmi",
                     *NET_ARGS]) == 0
    return work / "plain.plmi"


def assert_same_rows(a, b):
    """What README.md promises of a torchrun build against one process: the same rows (ids,
    labels, paths, metadata, in order), descriptors equal up to float16 rounding."""
    from test_extraction import assert_float16_agree

    assert len(a) == len(b)
    np.testing.assert_array_equal(a.ids, b.ids)
    assert list(a.labels) == list(b.labels) and a.paths == b.paths and a.metadata == b.metadata
    assert_float16_agree(a.descriptors, b.descriptors)


def assert_same_index(a, b):
    """... and bit for bit where the one process also ran one thread."""
    assert_same_rows(a, b)
    np.testing.assert_array_equal(a.descriptors, b.descriptors)


@pytest.fixture(scope="module")
def built(work, reference):
    """`torchrun --nproc-per-node 2 -m pylandmark index build ...` and what it printed."""
    proc = torchrun(2, "-m", "pylandmark", "index", "build", "db", "--labels-from-folders", "--weights", "net",
                    "--out", "dist.plmi", "--json", *NET_ARGS, cwd=work)
    return work / "dist.plmi", proc


def test_build_equals_one_process(built, reference, plain_reference):
    out, proc = built
    info = json.loads(proc.stdout)  # one JSON document: only rank 0 printed
    # 16 files sorted by class then name: rank 0 describes 8 (one unreadable), rank 1 the other 8
    assert info["ranks"] == [{"rank": 0, "images": 8, "indexed": 7, "resumed": False},
                             {"rank": 1, "images": 8, "indexed": 8, "resumed": False}]
    assert info["count"] == 15 and info["shards"] == [7, 8] and len(info["skipped"]) == 1
    index = plm.Index.load(out)
    assert isinstance(index, ShardedIndex)
    assert_same_rows(index, plm.Index.load(plain_reference))
    assert_same_index(index, plm.Index.load(reference))
    assert sorted(p.name.split("-", 1)[1] for p in shard_dir(out).iterdir()) == ["00000-of-00002.plmi",
                                                                                 "00001-of-00002.plmi"]


def score_tolerance(dim: int) -> float:
    """How far a cosine of two float16 descriptors can move when each descriptor element moves
    as assert_float16_agree allows: by at most one float16 spacing (<= 2^-10 |x_i|, or 2^-24 below
    float16's normal range) plus F32_ROW, so a unit row by |e| <= 2^-10 + sqrt(D) (2^-24 + F32_ROW);
    x -> <x, r>/(|x||r|) has gradient norm <= 1/|x|, so a query and a row moving so change the
    cosine by <= 2 |e| / (1 - |e|); each side's float32 search errs by < (2D + 5) u more
    (tests/test_search.py score_bounds)."""
    from test_extraction import F32_ROW

    u = 2.0 ** -24
    e = 2.0 ** -10 + np.sqrt(dim) * (u + F32_ROW)
    return 2 * e / (1 - e) + 2 * (2 * dim + 5) * u / (1 - (2 * dim + 5) * u)


def assert_same_hits_up_to_ties(a: list, b: list, tol: float) -> None:
    """Two searches whose scores may differ by tol: the same queries and hit counts, the j-th
    scores within tol (the j-th best of a score vector moves at most as far as its scores), and
    the same row at every rank whose score is more than 2 tol from its neighbours' (near-ties may
    swap)."""
    assert [r["query"] for r in a] == [r["query"] for r in b]
    for ra, rb in zip(a, b):
        ha, hb = ra["neighbours"], rb["neighbours"]
        assert len(ha) == len(hb)
        sa = np.array([h["score"] for h in ha])
        assert np.abs(sa - np.array([h["score"] for h in hb])).max() <= tol
        gaps = np.abs(np.diff(sa))
        for j, (x, y) in enumerate(zip(ha, hb)):
            left = gaps[j - 1] if j > 0 else np.inf
            right = gaps[j] if j < len(gaps) else np.inf
            if min(left, right) > 2 * tol:
                assert (x["id"], x["label"], x["path"]) == (y["id"], y["label"], y["path"]), (ra["query"], j)


@pytest.mark.slow
def test_search_and_recognize_under_torchrun(built, reference, plain_reference, work, capsys):
    out, _ = built
    # 3 ranks over the 2 shards: row ranges that cut through a shard; k = 20 > any rank's rows
    proc = torchrun(3, "-m", "pylandmark", "search", out, "q", "db/class1", "-k", "20", "--json", *NET_ARGS,
                    cwd=work)
    dist_hits = json.loads(proc.stdout)
    single = json.loads(one_process(capsys, work, "search", reference, "q", "db/class1", "-k", "20", "--json",
                                    *NET_ARGS))
    assert dist_hits == single and len(single[0]["neighbours"]) == 15
    # one process as users run it (default threads, its own build): the same except near-ties
    plain = json.loads(one_process(capsys, work, "search", plain_reference, "q", "db/class1", "-k", "20", "--json",
                                   *NET_ARGS, threads=None))
    assert_same_hits_up_to_ties(dist_hits, plain, score_tolerance(plm.Index.load(out).dim))
    proc = torchrun(2, "-m", "pylandmark", "recognize", out, "db/class1", "db/class2", "--json", *NET_ARGS,
                    cwd=work)
    single = json.loads(one_process(capsys, work, "recognize", reference, "db/class1", "db/class2", "--json",
                                    *NET_ARGS))
    assert json.loads(proc.stdout) == single and all("truth" in r for r in single)


@pytest.mark.slow
def test_rerank_superglobal_under_torchrun(built, reference, work, capsys):
    out, _ = built
    rr = ("--rerank", "superglobal", "--rerank-m", "9", "--rerank-neighbours", "3")
    # 3 ranks: the top 9 spread over every rank's rows; the re-ranked answer is the one process's
    proc = torchrun(3, "-m", "pylandmark", "search", out, "q", "db/class1", "-k", "12", "--json", *rr, *NET_ARGS,
                    cwd=work)
    single = json.loads(one_process(capsys, work, "search", reference, "q", "db/class1", "-k", "12", "--json", *rr,
                                    *NET_ARGS))
    plain = json.loads(one_process(capsys, work, "search", reference, "q", "db/class1", "-k", "12", "--json",
                                   *NET_ARGS))
    assert json.loads(proc.stdout) == single
    assert [[h["id"] for h in r["neighbours"]] for r in single] != [[h["id"] for h in r["neighbours"]] for r in plain]
    for r, p in zip(single, plain):  # beyond the top 9: the plain ranking and its scores
        assert r["neighbours"][9:] == p["neighbours"][9:]
        assert sorted(h["id"] for h in r["neighbours"][:9]) == sorted(h["id"] for h in p["neighbours"][:9])
    proc = torchrun(2, "-m", "pylandmark", "recognize", out, "db/class1", "db/class2", "--json", *rr, *NET_ARGS,
                    cwd=work)
    single = json.loads(one_process(capsys, work, "recognize", reference, "db/class1", "db/class2", "--json", *rr,
                                    *NET_ARGS))
    assert json.loads(proc.stdout) == single


@pytest.mark.slow
def test_add_and_extract_under_torchrun(built, reference, work, capsys, tmp_path):
    out, _ = built
    single_add = shutil.copy(reference, tmp_path / "single_add.plmi")
    one_process(capsys, work, "index", "add", single_add, "q", "--label", "new", *NET_ARGS)
    expected = plm.Index.load(single_add)
    # onto the sharded index: new shards appended; onto a single file: it becomes shard 0
    file_add = shutil.copy(reference, tmp_path / "file_add.plmi")
    for target in (out, file_add):
        proc = torchrun(2, "-m", "pylandmark", "index", "add", target, "q", "--label", "new", "--json", *NET_ARGS,
                        cwd=work)
        res = json.loads(proc.stdout)
        assert res["added"] == 3 and res["count"] == 18 and [r["images"] for r in res["ranks"]] == [2, 1]
        assert_same_index(plm.Index.load(target), expected)
    assert plm.Index.load(file_add).info()["shards"] == [15, 2, 1]

    proc = torchrun(2, "-m", "pylandmark", "extract", "db/class2", "q", "--out", tmp_path / "d2.npy", "--json",
                    "--weights", "net", *NET_ARGS, cwd=work)
    assert [r["images"] for r in json.loads(proc.stdout)["ranks"]] == [5, 4]
    one_process(capsys, work, "extract", "db/class2", "q", "--out", tmp_path / "d1.npy", "--weights", "net",
                *NET_ARGS)
    assert (tmp_path / "d1.npy").read_bytes() == (tmp_path / "d2.npy").read_bytes()
    assert (tmp_path / "d1.paths.txt").read_text() == (tmp_path / "d2.paths.txt").read_text()
    assert not (tmp_path / "d2.npy.parts").exists()  # the parts are gone once the .npy is whole


DYING = textwrap.dedent('''
    """Rank 1 dies (as if killed) once rank 0's shard is on disk; rank 0 is killed by torchrun."""
    import os, sys, time
    from pathlib import Path
    import torch
    from pylandmark import distributed as du
    from pylandmark.pipelines import shards
    from pylandmark.models import LandmarkNet
    from pylandmark.pipelines import ExtractOptions

    du.init_from_env("cpu")
    net = LandmarkNet.from_pretrained("net")

    class Dying(LandmarkNet):
        def forward(self, x):
            if du.rank() == 1:
                while not list(Path("dist2.plmi.shards").glob("*-00000-of-00002.plmi")):
                    time.sleep(0.05)
                os._exit(17)
            return super().forward(x)

    net.__class__ = Dying  # same weights, so the re-run's job key is the same
    shards.build_index(net, "db", ExtractOptions(image_size=96, batch_size=1, progress=False),
                                 "dist2.plmi", labels_from_folders=True, weights="net")
''')


@pytest.mark.slow
def test_dying_rank_leaves_no_complete_index_and_the_rerun_resumes(work, reference, capsys):
    # an earlier, different index at the same path must survive the failed build untouched
    one_process(capsys, work, "index", "build", "db/class2", "--weights", "net", "--out", "dist2.plmi", *NET_ARGS)
    before = (work / "dist2.plmi").read_bytes()
    (work / "dying.py").write_text(DYING)
    proc = torchrun(2, "dying.py", cwd=work, check=False)
    assert proc.returncode != 0
    assert (work / "dist2.plmi").read_bytes() == before
    assert len(plm.Index.load(work / "dist2.plmi")) == 6  # still the old class2-only index
    left = sorted(p.name for p in shard_dir(work / "dist2.plmi").iterdir() if p.suffix == ".plmi")
    assert len(left) == 1 and left[0].endswith("-00000-of-00002.plmi")  # rank 0's finished shard only

    proc = torchrun(2, "-m", "pylandmark", "index", "build", "db", "--labels-from-folders", "--weights", "net",
                    "--out", "dist2.plmi", "--json", *NET_ARGS, cwd=work)
    ranks = json.loads(proc.stdout)["ranks"]
    assert [(r["resumed"], r["indexed"]) for r in ranks] == [(True, 7), (False, 8)]
    assert_same_index(plm.Index.load(work / "dist2.plmi"), plm.Index.load(reference))


@pytest.mark.slow
def test_evaluate_under_torchrun(work, capsys, tmp_path):
    from pylandmark.data import make_revisited_dataset

    make_revisited_dataset(tmp_path, "roxford5k", n_clusters=3, db_per_cluster=4, image_size=64, seed=1)
    for extra in ([], ["--qe", "2", "--dba", "2"]):
        args = ["evaluate", "roxford5k", "--weights", "net", "--data-root", tmp_path, "--image-size", "64", "--quiet",
                *extra]
        one_process(capsys, work, *args, "--out", tmp_path / "one.json")
        torchrun(3, "-m", "pylandmark", *args, "--out", tmp_path / "three.json", cwd=work)
        assert json.loads((tmp_path / "one.json").read_text()) == json.loads((tmp_path / "three.json").read_text())


LEAVING = textwrap.dedent('''
    """A command under torchrun, then the threads left in this rank: none of gloo's may outlive
    the command, or one finishing its last collective after the interpreter starts to shut down
    aborts the process ("terminate called without an active exception", a rare exit code -6)."""
    import os, sys
    from pylandmark.cli import main

    assert main(sys.argv[1:]) == 0
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    left = [n for n in names if "gloo" in n]
    print(f"rank {os.environ['RANK']}: gloo threads left {left}", file=sys.stderr)
    sys.exit(3 if left else 0)
''')


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the threads from /proc (Linux)")
def test_a_command_leaves_no_process_group_behind(built, work):
    # building the network on the meta device makes torch import torch.distributed.nn, whose
    # functions keep the process group as a default argument: before the fix its threads lived
    # on past destroy_process_group
    out, _ = built
    (work / "leaving.py").write_text(LEAVING)
    proc = torchrun(2, "leaving.py", "search", out, "q", "-k", "3", "--json", *NET_ARGS, cwd=work, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("gloo threads left []") == 2
