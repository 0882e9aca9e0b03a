"""The README's snippets run as written: its Python blocks are executed, and the Quickstart's
shell commands are run, in a folder holding the files they name (labelled photos, a network
directory, query photos), and their results are checked against independent computations."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

README = (REPO / "README.md").read_text()


def _blocks(lang: str, after: str) -> list[str]:
    """Fenced blocks of `lang` in the README section whose heading starts with `after`."""
    section = README[README.index(f"## {after}"):]
    section = section[:section.find("\n## ", 4)] if "\n## " in section[4:] else section
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


@pytest.fixture
def quickstart_dir(tmp_path, shared_data, monkeypatch):
    """landmarks/<class>/*.jpg (PNU photos, shrunk to 160 px so the test is quick), query.jpg,
    more_queries/, new_photos/, photos/ and runs/csp/best (a saved, randomly initialised
    LandmarkNet standing in for a trained one)."""
    import torch
    from PIL import Image

    from pylandmark.models import LandmarkNet

    src = shared_data / "pnu_landmarks"

    def shrink(image: Path, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(image) as im:
            im = im.convert("RGB")
            im.thumbnail((160, 160))
            im.save(dest, quality=90)

    for cls in ("cse", "wb"):
        for image in sorted((src / "train" / cls).iterdir())[:3]:
            shrink(image, tmp_path / "landmarks" / cls / f"{image.stem}.jpg")
    tests = sorted((src / "test" / "cse").iterdir()) + sorted((src / "test" / "wb").iterdir())
    shrink(tests[0], tmp_path / "query.jpg")
    shrink(tests[1], tmp_path / "more_queries" / "q1.jpg")
    shrink(tests[3], tmp_path / "new_photos" / "n1.jpg")
    shrink(tests[4], tmp_path / "photos" / "p1.jpg")
    torch.manual_seed(0)
    LandmarkNet().save(tmp_path / "runs" / "csp" / "best")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_python_blocks_quickstart(quickstart_dir):
    (code,) = _blocks("python", "Quickstart")
    scope: dict = {}
    exec(compile(code, "README.md:Quickstart", "exec"), scope)
    index, result = scope["index"], scope["result"]
    assert len(index) == 6 and sorted(set(index.labels)) == ["cse", "wb"]
    # independent check of the recognition: majority label of the top 5 by float64 cosine
    db = np.asarray(index.descriptors, dtype=np.float64)
    q = np.asarray(scope["q"], dtype=np.float64)
    sims = (q @ db.T)[0] / (np.linalg.norm(q) * np.linalg.norm(db, axis=1))
    top = np.argsort(-sims, kind="stable")[:5]
    votes = [index.labels[i] for i in top]
    assert result.labels[0] == max(sorted(set(votes)), key=votes.count)


def test_readme_python_blocks_api():
    (code,) = _blocks("python", "API")
    scope: dict = {}
    exec(compile(code, "README.md:API", "exec"), scope)
    queries, db, scores, idx = scope["queries"], scope["db"], scope["scores"], scope["idx"]
    assert scores.shape == (64, 5) and idx.shape == (64, 5) and idx.dtype == np.int64
    # float64 cosine over the whole db for four of the queries: the same top 5 (up to float32
    # accumulation: the scores agree to 1e-5, far below the gaps between neighbours here)
    qd = queries[:4].astype(np.float64)
    dd = db.astype(np.float64)
    ref = (qd @ dd.T) / np.linalg.norm(qd, axis=1, keepdims=True) / np.linalg.norm(dd, axis=1)
    ref_idx = np.argsort(-ref, axis=1, kind="stable")[:, :5]
    np.testing.assert_allclose(scores[:4], np.take_along_axis(ref, ref_idx, 1), atol=1e-5)
    assert np.array_equal(idx[:4], ref_idx)
    x, y = scope["x"], scope["y"]
    ref_gem = x.detach().double().clamp(min=1e-6).pow(3).mean((-2, -1)).pow(1 / 3)
    np.testing.assert_allclose(y.detach().double().numpy(), ref_gem.numpy(), rtol=1e-5)
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.slow
def test_readme_quickstart_commands(quickstart_dir):
    commands = _blocks("bash", "Quickstart")[0]  # the second block (training) needs SfM-120k
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    outputs = []
    for line in commands.strip().splitlines():
        line = line.split("  #")[0].strip()
        argv = shlex.split(line)
        assert argv[0] == "pylandmark", line
        # the shell expands new_photos/*.jpg; do the same without a shell
        args = [str(p) for a in argv[1:] for p in (sorted(quickstart_dir.glob(a)) if "*" in a else [a])]
        proc = subprocess.run([sys.executable, "-m", "pylandmark", *args, "--quiet"], capture_output=True,
                              text=True, env=env, timeout=600)
        assert proc.returncode == 0, (line, proc.stderr[-2000:])
        outputs.append(proc.stdout)
    assert "indexed 6 images (2 classes)" in outputs[0]
    assert re.search(r"^(count|size|rows): 6$", outputs[1], re.M), outputs[1]
    assert re.search(r"query\.jpg: (cse|wb) \(confidence", outputs[2])
    assert "now holds 7" in outputs[5]
    assert np.load(quickstart_dir / "descriptors.npy").shape == (1, 1024)


def test_readme_training_commands_parse():
    """The "Train on your own photos" commands name real options (tests/test_train_labelled.py
    runs each source; these need the photos they name)."""
    from pylandmark.cli import build_parser

    lines = [ln.split("  #")[0].strip() for block in _blocks("bash", "Train on your own photos")
             for ln in block.strip().splitlines()]
    assert [shlex.split(ln)[1] for ln in lines] == ["train", "train", "train", "whiten"]
    for line in lines:
        argv = shlex.split(line)[1:]
        args = build_parser(with_training=argv[0] == "train").parse_args(argv)
        assert args.command == argv[0]
