"""Evaluation figures and the worst-queries page (`pylandmark evaluate --plots`): the PR curves
against the revisited AP on the real rOxford ground truth, the files written, and the CLI."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from pylandmark.evaluate import revisited
from pylandmark.report.plots import interpolated_precision, pr_curve, protocol_lists

PROTOCOLS = ("easy", "medium", "hard")


@pytest.fixture(scope="module")
def roxford(shared_data):
    from pylandmark.data import RevisitedDataset

    return RevisitedDataset("roxford5k", shared_data / "revisited")


def trapezoid_ap(recall: np.ndarray, precision: np.ndarray, n_pos: int) -> float:
    """The revisited AP from PR points: precision_j = (j+1)/(r_j+1) gives each positive's rank r_j;
    then sum_j (j / r_j (1 at r_j = 0) + (j+1)/(r_j+1)) / 2 / n_pos (REFERENCE.md section 3)."""
    total = 0.0
    for j, p in enumerate(precision):
        r = round((j + 1) / p - 1)
        before = 1.0 if r == 0 else j / r
        total += (before + p) / 2
    return total / n_pos


def test_pr_curves_integrate_to_the_revisited_ap(roxford, rng):
    n = len(roxford.imlist)
    ranks = np.stack([rng.permutation(n) for _ in range(roxford.n_queries)])
    ranks[:5] = np.arange(n)  # a few queries in imlist order as well
    res = revisited(ranks, roxford.gnd)
    for proto in PROTOCOLS:
        for q, g in enumerate(roxford.gnd):
            ok, junk = protocol_lists(g, proto)
            rec, prec = pr_curve(ranks[q], ok, junk)
            if ok.size == 0:
                assert np.isnan(res[proto]["ap"][q]) and rec.size == 0
                continue
            assert rec.size == ok.size and rec[-1] == pytest.approx(1.0)
            assert np.all(np.diff(rec) > 0) and np.all((prec > 0) & (prec <= 1))
            assert trapezoid_ap(rec, prec, ok.size) == pytest.approx(res[proto]["ap"][q], abs=1e-12)


def test_imlist_order_gives_the_official_known_answer(roxford):
    """REFERENCE.md: listing the database in imlist order gives mAP E 0.9472, M 1.7114, H 0.8679 %."""
    n = len(roxford.imlist)
    ranks = np.tile(np.arange(n), (roxford.n_queries, 1))
    for proto, want in zip(PROTOCOLS, (0.9472, 1.7114, 0.8679)):
        aps = []
        for q, g in enumerate(roxford.gnd):
            ok, junk = protocol_lists(g, proto)
            if ok.size:
                aps.append(trapezoid_ap(*pr_curve(ranks[q], ok, junk), ok.size))
        assert 100 * np.mean(aps) == pytest.approx(want, abs=5e-5)


def test_interpolated_precision_is_the_best_precision_at_higher_recall(rng):
    for _ in range(20):
        n_pos = int(rng.integers(1, 12))
        ranking = rng.permutation(60)
        rec, prec = pr_curve(ranking, rng.choice(60, n_pos, replace=False), rng.choice(60, 5, replace=False))
        grid = np.linspace(0, 1, 37)
        got = interpolated_precision(rec, prec, grid)
        want = [max((p for r, p in zip(rec, prec) if r >= t - 1e-12), default=0.0) for t in grid]
        np.testing.assert_allclose(got, want, rtol=0, atol=0)


def test_pr_curve_ignores_padding_and_junk():
    rec, prec = pr_curve([7, 3, 9, 1, -1, -1], positives=[3, 1, 5], junk=[7])
    # without junk: 3 (rank 0), 9, 1 (rank 2); positive 5 never ranked
    np.testing.assert_allclose(rec, [1 / 3, 2 / 3])
    np.testing.assert_allclose(prec, [1.0, 2 / 3])
    assert pr_curve([1, 2], [], [])[0].size == 0


def test_files_and_worst_page_on_the_real_ground_truth(roxford, rng, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from pylandmark.report.plots import write_evaluation_plots

    n = len(roxford.imlist)
    ranks = np.stack([rng.permutation(n) for _ in range(roxford.n_queries)])
    res = revisited(ranks, roxford.gnd)
    files = write_evaluation_plots({**res, "ranks": ranks}, roxford, tmp_path / "plots", progress=False)
    assert [f.name for f in files] == ["roxford5k_ap.png", "roxford5k_pr.png", "roxford5k_worst.html"]
    for f in files[:2]:
        with Image.open(f) as im:
            assert im.format == "PNG" and im.size[0] >= 800 and im.size[1] >= 400
            # not blank: a figure has many colours
            assert len(im.convert("RGB").getcolors(1 << 20) or []) > 50

    html = files[2].read_text()
    ap = res["medium"]["ap"]
    worst = [int(q) for q in np.argsort(ap, kind="stable")[:10]]
    shown = re.findall(r"<b>([^<]+)</b><br><span class=\"name\">query (\d+)</span>", html)
    assert [int(q) for _, q in shown] == worst
    assert [name for name, _ in shown] == [roxford.qimlist[q] for q in worst]
    rows = html.split('<div class="row">')[1:]
    for q, row in zip(worst, rows):
        frames = re.findall(r'<figure class="tile (pos|neg|junk)"', row)
        g = roxford.gnd[q]
        want = ["pos" if i in set(g["easy"]) | set(g["hard"]) else "junk" if i in set(g["junk"]) else "neg"
                for i in ranks[q][:10]]
        assert frames == want
    assert "could not be read" in html  # this copy of the data has no images: placeholders, no crash


@pytest.mark.slow
def test_evaluate_plots_end_to_end(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from pylandmark.cli import main
    from pylandmark.data import make_revisited_dataset

    from serve_util import tiny_weights

    weights = tiny_weights(tmp_path)
    make_revisited_dataset(tmp_path / "data", "roxford5k", n_clusters=3, db_per_cluster=4, image_size=64, seed=2)
    out = tmp_path / "res.json"
    assert main(["evaluate", "roxford5k", "--weights", str(weights), "--data-root", str(tmp_path / "data"),
                 "--image-size", "64", "--out", str(out), "--plots", str(tmp_path / "figs"), "--quiet"]) == 0
    saved = json.loads(out.read_text())["roxford5k"]
    assert "ranks" not in saved and [Path(p).name for p in saved["plots"]] == [
        "roxford5k_ap.png", "roxford5k_pr.png", "roxford5k_worst.html"]
    html = (tmp_path / "figs" / "roxford5k_worst.html").read_text()
    # every query and retrieved image embedded (each distinct file once: 3 queries + >= 10 db images)
    assert "thumb missing" not in html and html.count("base64,") >= 13
    assert 'class="box"' in html  # the query region drawn on the query
    assert "mAP" in capsys.readouterr().out


def test_missing_matplotlib_is_named_before_the_work(monkeypatch, capsys, tmp_path):
    import importlib.util

    from pylandmark.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    # no weights are loaded and no data read: the check comes first
    assert main(["evaluate", "roxford5k", "--weights", "does-not-exist", "--data-root", str(tmp_path),
                 "--plots", str(tmp_path / "p"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "pylandmark[plots]"' in err and err.count("\n") == 1
