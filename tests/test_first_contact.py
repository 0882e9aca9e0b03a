"""What a new user meets first: the seeded random network, absolute index paths, the recognise
summary, warnings when queries are described unlike the index, an atomic LandmarkNet.save,
importing from a source checkout, and the build's CUDA choice."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pylandmark as plm
from conftest import REPO
from pylandmark.cli import main
from pylandmark.models import LandmarkNet
from pylandmark.models.pretrained import load_network

TINY = {"depths": [1, 1, 1, 1, 1], "out_chs": [8, 16, 24, 32, 48]}


def test_random_weights_are_the_same_network_every_time():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    with pytest.warns(UserWarning, match="random"):
        a = load_network("random")
    with pytest.warns(UserWarning, match="random"):
        b = load_network("random")
    # the caller's RNG is untouched, and the two networks are identical tensor by tensor
    assert torch.equal(torch.random.get_rng_state(), before)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # and not a trivial network: weights differ from a differently seeded init
    torch.manual_seed(1)
    other = LandmarkNet().state_dict()
    assert not torch.equal(sa["backbone.stem.conv1.conv.weight"], other["backbone.stem.conv1.conv.weight"])


@pytest.fixture(scope="module")
def tiny_net(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return LandmarkNet(backbone_args=TINY).save(tmp_path_factory.mktemp("net") / "tiny")


def _build(pnu: Path, weights: Path, out: Path, size: int = 96) -> None:
    assert main(["index", "build", str(pnu / "train"), "--labels-from-folders", "--out", str(out),
                 "--weights", str(weights), "--image-size", str(size), "--quiet"]) == 0


def test_index_paths_are_absolute_and_resolve_elsewhere(shared_data, tiny_net, tmp_path, monkeypatch):
    pnu = shared_data / "pnu_landmarks"
    # build from a relative path, then look at the index from another directory
    monkeypatch.chdir(pnu.parent)
    out = tmp_path / "pnu.plmi"
    _build(Path("pnu_landmarks"), tiny_net, out)
    monkeypatch.chdir(tmp_path)
    paths = plm.Index.load(out).paths
    assert len(paths) == 35 and all(Path(p).is_absolute() and Path(p).is_file() for p in paths)
    assert sorted(paths) == sorted(str(p.resolve()) for p in (pnu / "train").rglob("*.png"))


def test_recognize_ends_with_a_summary_when_queries_sit_in_class_folders(shared_data, tiny_net, tmp_path, capsys):
    pnu = shared_data / "pnu_landmarks"
    out = tmp_path / "pnu.plmi"
    _build(pnu, tiny_net, out)
    capsys.readouterr()
    assert main(["recognize", str(out), str(pnu / "test"), "--json", "--quiet"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 15 and all(r["truth"] == Path(r["query"]).parent.name for r in results)
    right = sum(r["label"] == r["truth"] for r in results)
    assert main(["recognize", str(out), str(pnu / "test"), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert f"recognised {right} of 15 query images (accuracy {100 * right / 15:.1f}%" in text
    # the confusion table: one row per true class whose "right" column counts that class's hits
    for cls in ("cse", "hh", "rg", "wb", "wjj"):
        mine = [r for r in results if r["truth"] == cls]
        row = [line for line in text.splitlines() if line.strip().startswith(cls + " ")][-1]
        assert row.rstrip().endswith(f"{sum(r['label'] == cls for r in mine)}/{len(mine)}")
    # queries outside class folders get no truth and no summary
    single = next((pnu / "test" / "cse").iterdir())
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(single, flat / single.name)
    assert main(["recognize", str(out), str(flat), "--json", "--quiet"]) == 0
    assert "truth" not in json.loads(capsys.readouterr().out)[0]


def test_queries_described_unlike_the_index_warn_once(shared_data, tiny_net, tmp_path, capsys):
    pnu = shared_data / "pnu_landmarks"
    out = tmp_path / "pnu.plmi"
    _build(pnu, tiny_net, out)
    query = str(next((pnu / "test" / "cse").iterdir()))
    capsys.readouterr()
    assert main(["search", str(out), query, "--image-size", "128", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("--image-size 128 differs from the index's 96") == 1
    torch.manual_seed(5)
    other = LandmarkNet(backbone_args=TINY).save(tmp_path / "other")
    assert main(["recognize", str(out), query, "--weights", str(other), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("differs from the weights this index was built with") == 1
    # the index's own settings: no warning
    assert main(["search", str(out), query, "--quiet"]) == 0
    assert "differ" not in capsys.readouterr().err


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    import safetensors.torch

    net = LandmarkNet(backbone_args=TINY)

    def broken(*args, **kwargs):
        Path(args[1]).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    target = tmp_path / "new" / "net"
    with pytest.raises(OSError, match="disk full"):
        net.save(target)
    assert not target.exists()
    # into an existing directory holding an earlier save: the earlier files stay as they were
    monkeypatch.undo()
    kept = net.save(tmp_path / "kept")
    before = {p.name: p.read_bytes() for p in kept.iterdir()}
    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        LandmarkNet(backbone_args=TINY).save(kept)
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before


def test_import_from_a_source_checkout(tmp_path):
    """Python started in a folder holding the unbuilt sources imports them with the installed
    extension; with no extension anywhere it fails with one line saying what to do."""
    src = tmp_path / "checkout"
    shutil.copytree(REPO / "pylandmark", src / "pylandmark",
                    ignore=shutil.ignore_patterns("_C*.so", "_C*.pyd", "__pycache__"))
    # (an editable install's import hook would win over the current folder: drop it, so the
    # sources in the folder are imported as they would be next to a regular install)
    code = ("import sys; sys.meta_path = [f for f in sys.meta_path if not type(f).__module__.startswith('_editable')]; "
            "import numpy as np, pylandmark as p; print(p.__file__); "
            "print(p.search(np.eye(3, dtype='float32'), np.eye(3, dtype='float16'), k=1)[1].ravel().tolist())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == str(src / "pylandmark" / "__init__.py") and lines[1] == "[0, 1, 2]"
    # no installed copy reachable: -S leaves site-packages off sys.path
    bare = subprocess.run([sys.executable, "-S", "-c", "import sys; sys.path.insert(0, '.'); import pylandmark"],
                          cwd=src, capture_output=True, text=True, timeout=120)
    assert bare.returncode != 0
    last = bare.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: pylandmark's compiled extension is missing") and "pip install" in last


def _configure(tmp_path: Path, env_extra: dict, *defines: str) -> str:
    import pybind11

    env = {k: v for k, v in os.environ.items() if k not in ("CUDAARCHS", "PYLANDMARK_CUDA")}
    env.update(env_extra)
    proc = subprocess.run(["cmake", "-S", str(REPO), "-B", str(tmp_path / "build"), "-G", "Ninja",
                           f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", f"-DPython_EXECUTABLE={sys.executable}",
                           *defines], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("cmake") is None, reason="needs nvcc and cmake")
def test_build_chooses_cuda_by_the_gpus_present(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has a GPU; the test fakes nvidia-smi to choose")
    # nvcc but no GPU: CPU only, saying how to get CUDA
    out = _configure(tmp_path / "a", {})
    assert "nvcc found but no GPU detected: building the CPU extension only" in out and "CUDAARCHS" in out
    # a GPU reported by nvidia-smi: CUDA for its architecture only
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 8.6\necho 8.6\n")
    (fake / "nvidia-smi").chmod(0o755)
    out = _configure(tmp_path / "b", {"PATH": f"{fake}:{os.environ['PATH']}"})
    assert "CUDA on" in out and "architectures 86)" in out
    # explicit architectures win
    out = _configure(tmp_path / "c", {"CUDAARCHS": "80"})
    assert "architectures 80)" in out
    out = _configure(tmp_path / "d", {}, "-DPYLANDMARK_CUDA=ON")
    assert "architectures 75-real;80-real;86-real;89-real;90-real;100-real;120)" in out
