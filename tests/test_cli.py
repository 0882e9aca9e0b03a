"""End-to-end `pylandmark` commands on the PNU landmark photos, checked against the Python API
and a float64 brute-force search."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import pylandmark as plm
from pylandmark.cli import main
from pylandmark.models import LandmarkNet

TINY = {"depths": [1, 1, 1, 1, 1], "out_chs": [8, 16, 24, 32, 48]}
SIZE = "160"


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return LandmarkNet(backbone_args=TINY).save(tmp_path_factory.mktemp("net") / "tiny")


@pytest.fixture(scope="module")
def pnu(shared_data) -> Path:
    return shared_data / "pnu_landmarks"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def built(pnu, weights, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "pnu.plmi"
    assert main(["index", "build", str(pnu / "train"), "--labels-from-folders", "--out", str(out),
                 "--weights", str(weights), "--image-size", SIZE, "--quiet", "--json"]) == 0
    return out


def brute_force(weights, index_path, queries):
    """float64 cosine scores of the query photos against the stored index rows, (Q, N)."""
    net = LandmarkNet.from_pretrained(weights)
    db = plm.Index.load(index_path).descriptors.astype(np.float64)
    q = plm.extract(net, [str(p) for p in queries], image_size=int(SIZE), progress=False).astype(np.float64)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q @ db.T


def check_topk(hits, srow, paths, k):
    """hits hold an exact top-k of srow (ties within float32 rounding may swap places)."""
    best = np.sort(srow)[::-1][:k]
    rows = [paths.index(h["path"]) for h in hits]
    assert len(set(rows)) == k
    np.testing.assert_allclose([h["score"] for h in hits], best, atol=1e-5)
    np.testing.assert_allclose(srow[rows], best, atol=1e-5)
    return rows


def test_index_build_and_info(built, capsys):
    code, out, _ = run(capsys, "index", "info", built, "--json")
    info = json.loads(out)
    assert code == 0 and info["count"] == 35 and info["classes"] == 5 and info["labelled"]
    assert info["metadata"]["image_size"] == int(SIZE)


def test_search_json_matches_brute_force(built, weights, pnu, capsys):
    queries = sorted((pnu / "test").rglob("*.png"))
    code, out, _ = run(capsys, "search", built, pnu / "test", "-k", 4, "--json", "--quiet")
    results = json.loads(out)
    assert code == 0 and [r["query"] for r in results] == [str(p) for p in queries]
    paths = list(plm.Index.load(built).paths)
    s = brute_force(weights, built, queries)
    for r, srow in zip(results, s):
        check_topk(r["neighbours"], srow, paths, 4)
        assert [h["label"] for h in r["neighbours"]] == [Path(h["path"]).parent.name for h in r["neighbours"]]


def test_recognize_json_is_the_majority_of_the_top5(built, weights, pnu, capsys):
    queries = sorted((pnu / "test").rglob("*.png"))
    code, out, _ = run(capsys, "recognize", built, *queries, "--json", "--quiet")
    results = json.loads(out)
    assert code == 0 and len(results) == 15
    paths = list(plm.Index.load(built).paths)
    s = brute_force(weights, built, queries)
    for r, srow in zip(results, s):
        check_topk(r["neighbours"], srow, paths, 5)
        labels = [Path(h["path"]).parent.name for h in r["neighbours"]]
        scores = [h["score"] for h in r["neighbours"]]
        counts = Counter(labels)
        best = max(counts.values())
        tied = {lab for lab, c in counts.items() if c == best}
        # ties: larger summed similarity, then the nearer neighbour
        sums = {lab: sum(sc for sc, l2 in zip(scores, labels) if l2 == lab) for lab in tied}
        top = max(sums.values())
        expected = next(lab for lab in labels if lab in tied and sums[lab] == top)
        assert r["label"] == expected and r["known"]
        assert r["votes"] == best and r["confidence"] == pytest.approx(best / 5)
    code, text, _ = run(capsys, "recognize", built, queries[0], "--quiet")
    assert code == 0 and text.splitlines()[0].startswith(f"{queries[0]}: ")


def test_search_and_recognize_rerank_superglobal(built, weights, pnu, capsys):
    from pylandmark.retrieval.rerank import superglobal

    queries = sorted((pnu / "test").rglob("*.png"))
    rr = ("--rerank", "superglobal", "--rerank-m", 12, "--rerank-neighbours", 3, "--rerank-beta", 0.5)
    code, out, _ = run(capsys, "search", built, pnu / "test", "-k", 15, "--json", "--quiet", *rr)
    assert code == 0
    index = plm.Index.load(built)
    paths = list(index.paths)
    q = plm.extract(LandmarkNet.from_pretrained(weights), [str(p) for p in queries], image_size=int(SIZE),
                    progress=False)
    # the reference: the re-ranking of the stored float16 matrix (tested against float64 loops)
    scores, rows = superglobal(q, np.asarray(index.descriptors), k=15, m=12, neighbours=3, beta=0.5)
    plain = plm.search(q, np.asarray(index.descriptors), k=15)[1]
    assert (rows[:, :12] != plain[:, :12]).any()  # it re-ranked
    for r, srow, rrow in zip(json.loads(out), scores, rows):
        assert [paths.index(h["path"]) for h in r["neighbours"]] == rrow.tolist()
        assert [h["score"] for h in r["neighbours"]] == pytest.approx(srow.tolist(), abs=0, rel=0)
    code, out, _ = run(capsys, "recognize", built, *queries, "--json", "--quiet", *rr)
    for r, rrow in zip(json.loads(out), rows):  # the vote is over the re-ranked top 5
        assert [paths.index(h["path"]) for h in r["neighbours"]] == rrow[:5].tolist()
        counts = Counter(Path(paths[i]).parent.name for i in rrow[:5])
        if list(counts.values()).count(max(counts.values())) == 1:
            assert r["label"] == counts.most_common(1)[0][0]
    for bad, words in (("--rerank-m=0", "--rerank-m"), ("--rerank-beta=-1", "--rerank-beta must be")):
        err = one_line_error(capsys, "search", built, queries[0], "--rerank", "superglobal", bad)
        assert words in err


def test_index_add_grows_the_file(built, pnu, tmp_path, capsys):
    path = tmp_path / "grow.plmi"
    shutil.copy(built, path)
    code, out, _ = run(capsys, "index", "add", path, pnu / "test" / "hh", "--label", "hh", "--json", "--quiet")
    assert code == 0 and json.loads(out)["added"] == 3
    index = plm.Index.load(path)
    assert len(index) == 38 and list(index.labels[-3:]) == ["hh"] * 3
    assert index.paths[-1].endswith("hh/00000002.png")


def test_extract_writes_npy_equal_to_the_api(weights, pnu, tmp_path, capsys):
    out = tmp_path / "d.npy"
    code, text, _ = run(capsys, "extract", pnu / "test" / "rg", "--out", out, "--weights", weights,
                        "--image-size", SIZE, "--json", "--quiet")
    assert code == 0 and json.loads(text)["count"] == 3
    got = np.load(out)
    paths = (tmp_path / "d.paths.txt").read_text().split()
    ref = plm.extract(LandmarkNet.from_pretrained(weights), paths, image_size=int(SIZE), progress=False)
    assert got.dtype == np.float16 and got.shape == (3, 48)
    np.testing.assert_array_equal(got, ref)


def test_extract_skips_bad_files_when_asked(weights, pnu, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    good = pnu / "test" / "wb" / "00000000.png"
    code, _, err = run(capsys, "extract", good, bad, "--out", tmp_path / "x.npy", "--weights", weights,
                       "--image-size", SIZE, "--quiet")
    assert code == 2 and "broken.jpg" in err and err.count("\n") == 1
    code, text, _ = run(capsys, "extract", good, bad, "--out", tmp_path / "x.npy", "--weights", weights,
                        "--image-size", SIZE, "--skip-bad", "--json", "--quiet")
    payload = json.loads(text)
    assert code == 0 and payload["count"] == 1 and "broken.jpg" in payload["skipped"][0]


@pytest.mark.parametrize("argv,words", [
    (["search", "missing.plmi", "x.jpg"], "no index file"),
    (["index", "info", "{bad}"], "not a pylandmark index"),
    (["extract", "{pnu}/test/cse", "--out", "o.npy", "--weights", "cspdarknet53-gem"], "pylandmark train"),
    (["extract", "{pnu}/test/cse", "--out", "o.npy"], "--weights is required"),
    (["extract", "no/such/dir", "--out", "o.npy", "--weights", "random"], "no such image or folder"),
])
def test_errors_are_one_line_with_nonzero_exit(argv, words, pnu, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PYLANDMARK_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.plmi"
    bad.write_bytes(b"GIF89a" + b"\0" * 100)
    argv = [a.format(bad=bad, pnu=pnu) for a in argv]
    code, _, err = run(capsys, *argv, "--quiet")
    assert code == 2 and words in err and err.count("\n") == 1, err


def test_random_weights_warn(pnu, tmp_path, capsys):
    with pytest.warns(UserWarning, match="results mean nothing"):
        from pylandmark.models.pretrained import load_network

        net = load_network("random")
    assert isinstance(net, LandmarkNet) and not net.training


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "pylandmark", "--help"], capture_output=True, text=True,
                         check=True, cwd="/").stdout
    for name in ("extract", "index", "search", "recognize", "evaluate", "train", "bench", "whiten"):
        assert name in out
    sub = subprocess.run([sys.executable, "-m", "pylandmark", "recognize", "--help"], capture_output=True,
                         text=True, check=True, cwd="/").stdout
    assert "examples:" in sub and "--min-score" in sub


def test_index_codes_runs_from_the_command_line(built, capsys, tmp_path):
    """`index codes` (not a torchrun job) finds its job in this process like every command
    (it failed with AttributeError: no args.jobs)."""
    copy = tmp_path / "copy.plmi"
    shutil.copyfile(built, copy)
    capsys.readouterr()
    code, out, err = run(capsys, "index", "codes", copy, "--json")
    assert code == 0, err
    assert json.loads(out) == {"count": len(plm.Index.load(built)), "updated": False}


def test_evaluate_on_a_revisited_layout_matches_the_api(weights, tmp_path, capsys):
    """`pylandmark evaluate` on data in the real revisited layout equals extract + search +
    evaluate.revisited done by hand; with QE and DBA too."""
    from pylandmark.data import RevisitedDataset, make_revisited_dataset
    from pylandmark.evaluate import revisited
    from pylandmark.retrieval.rerank import rerank

    make_revisited_dataset(tmp_path, "roxford5k", n_clusters=3, db_per_cluster=4, image_size=64, seed=1)
    out = tmp_path / "res.json"
    code, text, _ = run(capsys, "evaluate", "roxford5k", "--weights", weights, "--data-root", tmp_path,
                        "--image-size", 64, "--out", out, "--quiet")
    assert code == 0 and "mAP" in text
    saved = json.loads(out.read_text())["roxford5k"]

    ds = RevisitedDataset("roxford5k", tmp_path / "roxford5k")
    net = LandmarkNet.from_pretrained(weights)
    db = plm.extract(net, [str(p) for p in ds.images], image_size=64, progress=False)
    q = plm.extract(net, [str(p) for p in ds.query_paths], image_size=64, progress=False,
                    bboxes=[ds.query_bbox(i) for i in range(ds.n_queries)])
    ref = revisited(np.argsort(-(q.astype(np.float64) @ db.astype(np.float64).T), axis=1, kind="stable"), ds.gnd)
    for proto in ("easy", "medium", "hard"):
        assert saved[proto]["map"] == pytest.approx(ref[proto]["map"], abs=1e-9)

    code, _, _ = run(capsys, "evaluate", "roxford5k", "--weights", weights, "--data-root", tmp_path,
                     "--image-size", 64, "--qe", 2, "--dba", 2, "--out", out, "--quiet")
    q2, db2 = rerank(q, db, qe_k=2, dba_k=2)
    ref2 = revisited(np.argsort(-(np.asarray(q2, np.float64) @ np.asarray(db2, np.float64).T), axis=1,
                                kind="stable"), ds.gnd)
    saved2 = json.loads(out.read_text())["roxford5k"]
    assert code == 0 and saved2["medium"]["map"] == pytest.approx(ref2["medium"]["map"], abs=1e-9)

    # --rerank superglobal: the plain table and the re-ranked one, side by side
    code, text, _ = run(capsys, "evaluate", "roxford5k", "--weights", weights, "--data-root", tmp_path,
                        "--image-size", 64, "--rerank", "superglobal", "--rerank-m", 7, "--out", out, "--quiet")
    from pylandmark.retrieval.rerank import superglobal

    saved3 = json.loads(out.read_text())["roxford5k"]
    plain = np.asarray(plm.search(q, db, k=len(db))[1])
    ref3 = revisited(np.asarray(superglobal(q, db, k=len(db), m=7, ranks=plain)[1]), ds.gnd)
    assert code == 0 and "SuperGlobal re-ranking of the top 7" in text and text.count("\nMedium") == 2
    # and the mAPs side by side: plain search's row and the re-ranking's, E / M / H in percent
    side = text[text.index("roxford5k: mAP"):].splitlines()
    assert side[1].split() == ["mAP", "Easy", "mAP", "Medium", "mAP", "Hard"]
    for line, res in ((side[2], saved3), (side[3], ref3)):
        assert line.split()[-3:] == [f"{100 * res[p]['map']:.2f}" for p in ("easy", "medium", "hard")]
    assert side[2].startswith("plain search") and side[3].startswith("SuperGlobal M=7")
    assert saved3["medium"]["map"] == pytest.approx(saved["medium"]["map"], abs=1e-9)  # the plain one
    for proto in ("easy", "medium", "hard"):
        assert saved3["superglobal"][proto]["map"] == pytest.approx(ref3[proto]["map"], abs=1e-9)


# ---- one line, exit code 2, for every user mistake ------------------------------------------------

def one_line_error(capsys, *argv, code=2):
    got, out, err = run(capsys, *argv)
    assert got == code, (got, out, err)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("device,words", [
    ("foo", "device must be auto"), ("meta", "device must be auto"), ("gpu", "use cuda"),
    ("cuda", "without CUDA"), ("cuda:7", "without CUDA"), ("cpu:3", "one CPU device"),
])
def test_bad_devices_are_one_line_for_every_command(weights, pnu, tmp_path, capsys, device, words):
    if torch.cuda.is_available():
        pytest.skip("the messages differ where CUDA is present")
    img = pnu / "test" / "rg" / "00000000.png"
    for argv in (["extract", img, "--out", tmp_path / "o.npy", "--weights", weights],
                 ["index", "build", pnu / "train", "--out", tmp_path / "i.plmi", "--weights", weights],
                 ["train", "--data-root", tmp_path, "--out", tmp_path / "run"]):
        err = one_line_error(capsys, *argv, "--device", device, "--quiet")
        assert words in err, err
    assert not (tmp_path / "o.npy").exists() and not (tmp_path / "i.plmi").exists()


def test_device_auto_runs_where_cuda_is_missing(weights, pnu, tmp_path, capsys):
    code, text, _ = run(capsys, "extract", pnu / "test" / "rg", "--out", tmp_path / "d.npy", "--weights", weights,
                        "--image-size", SIZE, "--device", "auto", "--json", "--quiet")
    assert code == 0 and json.loads(text)["count"] == 3


def test_training_resolves_devices_with_the_shared_parser(tmp_path):
    from pylandmark.runtime import resolve_device
    from pylandmark.training.loop import TrainConfig, train

    if torch.cuda.is_available():
        pytest.skip("needs a torch without CUDA")
    with pytest.raises(ValueError) as shared:
        resolve_device("cuda:1")
    with pytest.raises(ValueError) as trained:
        train(TrainConfig(data_root=str(tmp_path), out_dir=str(tmp_path / "run"), device="cuda:1"))
    assert str(trained.value) == str(shared.value)
    assert str(resolve_device("auto")) == "cpu"


@pytest.mark.parametrize("argv", [
    ["extract", "{img}", "--out", "{tmp}/o.npy", "--weights", "{w}", "--image-size", "0"],
    ["extract", "{img}", "--out", "{tmp}/o.npy", "--weights", "{w}", "--batch-size", "-3"],
    ["search", "{tmp}/x.plmi", "{img}", "-k", "0"],
    ["bench", "--n", "zero"],
])
def test_bad_numbers_are_argument_errors(argv, weights, pnu, tmp_path, capsys):
    argv = [a.format(img=pnu / "test" / "rg" / "00000000.png", tmp=tmp_path, w=weights) for a in argv]
    err = one_line_error(capsys, *argv)
    assert "error: argument" in err and "see pylandmark" in err, err
    assert not (tmp_path / "o.npy").exists()


@pytest.fixture
def bad_weights(weights, tmp_path):
    """Copies of the tiny network: one with a wrong-shaped tensor, one with a string boolean."""
    from safetensors.torch import load_file, save_file

    shapes = tmp_path / "shapes"
    shutil.copytree(weights, shapes)
    state = load_file(str(shapes / "model.safetensors"))
    state["backbone.stem.conv1.conv.weight"] = torch.zeros(3, 3, 3, 3)
    save_file(state, str(shapes / "model.safetensors"))
    config = tmp_path / "config"
    shutil.copytree(weights, config)
    meta = json.loads((config / "config.json").read_text())
    meta["config"]["learn_p"] = "false"
    (config / "config.json").write_text(json.dumps(meta))
    return shapes, config


def test_bad_weight_directories_are_one_line(bad_weights, pnu, tmp_path, capsys):
    shapes, config = bad_weights
    img = pnu / "test" / "rg" / "00000000.png"
    err = one_line_error(capsys, "extract", img, "--out", tmp_path / "o.npy", "--weights", shapes, "--quiet")
    assert "other shapes" in err
    err = one_line_error(capsys, "extract", img, "--out", tmp_path / "o.npy", "--weights", config, "--quiet")
    assert "learn_p must be true or false" in err


@pytest.mark.parametrize("content", [b"\x80\x04not a pickle", b"cos\nsystem\n(S'true'\ntR.",
                                     b"\x80\x02]q\x00(]q\x01h\x01ae."])
def test_a_corrupt_or_hostile_ground_truth_in_evaluate_is_one_line(weights, tmp_path, capsys, content):
    folder = tmp_path / "roxford5k"
    folder.mkdir()
    (folder / "gnd_roxford5k.pkl").write_bytes(content)
    err = one_line_error(capsys, "evaluate", "roxford5k", "--weights", weights, "--data-root", tmp_path, "--quiet")
    assert "gnd_roxford5k.pkl" in err


def test_crafted_indexes_are_one_line(built, pnu, tmp_path, capsys):
    from test_index import _craft

    crafted = tmp_path / "crafted.plmi"
    shutil.copy(built, crafted)
    _craft(crafted, sections={"labels": json.dumps(["a"] * 3).encode()})
    img = pnu / "test" / "rg" / "00000000.png"
    for argv in (["index", "info", crafted], ["search", crafted, img], ["recognize", crafted, img],
                 ["index", "add", crafted, img, "--label", "x"]):
        err = one_line_error(capsys, *argv, "--quiet")
        assert "labels section" in err, err


def test_an_index_never_makes_the_cli_download(built, pnu, tmp_path, capsys, monkeypatch):
    """metadata.weights = a URL: search/recognize refuse to follow it (an index file may come
    from anyone); an explicit --weights is used as given."""
    import pylandmark.data.download as download

    def no_download(*a, **k):
        raise AssertionError("the CLI tried to download")

    monkeypatch.setattr(download, "download_url", no_download)
    index = plm.Index.load(built, mmap=False)
    weights = index.metadata["weights"]
    index.metadata["weights"] = "https://example.com/evil/model.safetensors"
    url_index = index.save(tmp_path / "url.plmi")
    img = pnu / "test" / "rg" / "00000000.png"
    for command in ("search", "recognize"):
        err = one_line_error(capsys, command, url_index, img, "--quiet")
        assert "never makes pylandmark download" in err and "--weights" in err
        code, _, _ = run(capsys, command, url_index, img, "--weights", weights, "--quiet")
        assert code == 0
    index.metadata["weights"] = weights  # a local path is followed
    code, _, _ = run(capsys, "search", index.save(tmp_path / "local.plmi"), img, "--quiet")
    assert code == 0


def test_nothing_useful_produced_is_an_error(weights, tmp_path, capsys):
    folder = tmp_path / "photos" / "cls"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    err = one_line_error(capsys, "index", "build", tmp_path / "photos", "--labels-from-folders", "--out",
                         tmp_path / "x.plmi", "--weights", weights, "--quiet")
    assert "none of the 3 images could be read" in err and not (tmp_path / "x.plmi").exists()
    err = one_line_error(capsys, "extract", folder, "--skip-bad", "--out", tmp_path / "x.npy", "--weights",
                         weights, "--quiet")
    assert "none of the 3 images" in err and not (tmp_path / "x.npy").exists()


def test_each_skipped_image_is_reported_once_and_quiet_silences_it(weights, pnu, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    good = pnu / "test" / "wb" / "00000000.png"
    argv = ["extract", good, bad, "--out", tmp_path / "x.npy", "--weights", weights, "--image-size", SIZE,
            "--skip-bad"]
    code, out, err = run(capsys, *argv)
    assert code == 0 and (out + err).count("broken.jpg") == 1, out + err
    code, out, err = run(capsys, *argv, "--quiet")
    assert code == 0 and "broken.jpg" not in err


def test_an_unexpected_failure_is_one_line_too(weights, pnu, tmp_path, capsys, monkeypatch):
    import pylandmark.pipelines.local as local_jobs

    def boom(*a, **k):
        raise RuntimeError("something inside broke\nwith a second line")

    monkeypatch.setattr(local_jobs, "describe", boom)
    err = one_line_error(capsys, "extract", pnu / "test" / "rg", "--out", tmp_path / "o.npy", "--weights", weights,
                         "--quiet", code=1)
    assert "RuntimeError: something inside broke" in err and "PYLANDMARK_DEBUG" in err
