"""HTML result pages: structure, frames, accuracy and confusion counts against hand counts,
embedded thumbnails, escaping, untrusted input, and the CLI (`report`, `recognize --html`)."""
from __future__ import annotations

import base64
import io
import json
import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pylandmark.report.results import ResultsFormatError, load_results, render_report, summarize, truth_from_folders


class Page(HTMLParser):
    """Rows, tiles (frame class, thumbnail class, caption text) and the embedded thumbnails."""

    def __init__(self, text: str):
        super().__init__()
        self.rows: list[list[dict]] = []
        self.tags: list[str] = []
        self.srcs: list[str] = []
        self.style = ""
        self._in_style = False
        self._tile: dict | None = None
        self._caption = False
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None
        self.feed(text)
        self.thumbs = dict(re.findall(r"\.(t\d+)\{background-image:url\(data:image/jpeg;base64,([A-Za-z0-9+/=]+)\)\}",
                                      self.style))

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        self.tags.append(tag)
        if "src" in a or "href" in a:
            self.srcs.append(a.get("src") or a.get("href"))
        if tag == "style":
            self._in_style = True
        if tag == "div" and "row" in cls:
            self.rows.append([])
        if tag == "figure" and "tile" in cls:
            self._tile = {"frame": cls[1], "big": "big" in cls, "caption": ""}
        if tag == "div" and "thumb" in cls and self._tile is not None:
            self._tile["thumb"] = cls[1]
        if tag == "figcaption":
            self._caption = True
        if tag == "table":
            self.tables.append([])
        if tag == "tr" and self.tables:
            self.tables[-1].append([])
        if tag in ("td", "th") and self.tables:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "style":
            self._in_style = False
        if tag == "figcaption":
            self._caption = False
        if tag == "figure" and self._tile is not None:
            self.rows[-1].append(self._tile)
            self._tile = None
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._in_style:
            self.style += data
        if self._caption and self._tile is not None:
            self._tile["caption"] += data
        if self._cell is not None:
            self._cell.append(data)


@pytest.fixture(scope="module")
def pnu(shared_data) -> Path:
    return shared_data / "pnu_landmarks"


def fake_results(pnu: Path, rng: np.random.Generator, n: int = 9, k: int = 5) -> list[dict]:
    """Recognition results in the CLI's format over real PNU files, with random neighbours."""
    train = sorted((pnu / "train").rglob("*.png"))
    queries = sorted((pnu / "test").rglob("*.png"))[:n]
    out = []
    for q in queries:
        rows = rng.choice(len(train), size=k, replace=False)
        scores = np.sort(rng.uniform(0.3, 0.99, k))[::-1]
        hits = [{"score": float(s), "id": int(r), "label": train[r].parent.name, "path": str(train[r])}
                for s, r in zip(scores, rows)]
        labels = [h["label"] for h in hits]
        label, votes = Counter(labels).most_common(1)[0]
        out.append({"query": str(q), "label": label, "known": True, "confidence": votes / k, "votes": votes,
                    "neighbours": hits})
    return out


def test_summary_counts_are_hand_counts(pnu, rng):
    results = fake_results(pnu, rng, n=15)
    results[3]["label"], results[3]["known"] = "unknown", False
    truth = truth_from_folders(results)
    assert truth == [Path(r["query"]).parent.name for r in results]
    s = summarize(results, truth)
    pairs = Counter((t, r["label"]) for t, r in zip(truth, results))
    correct = sum(c for (t, p), c in pairs.items() if t == p)
    assert s["n_correct"] == correct and s["accuracy"] == pytest.approx(correct / 15)
    assert s["truth_labels"] == sorted(set(truth)) and "unknown" in s["predicted_labels"]
    for i, t in enumerate(s["truth_labels"]):
        for j, p in enumerate(s["predicted_labels"]):
            assert s["confusion"][i][j] == pairs.get((t, p), 0)
    assert sum(map(sum, s["confusion"])) == 15
    assert np.isnan(summarize(results, None)["accuracy"])
    with pytest.raises(ValueError, match="one per query"):
        summarize(results, truth[:-1])


def test_search_results_use_the_nearest_label(pnu, rng):
    results = [{"query": r["query"], "neighbours": [{**h, "rank": j + 1} for j, h in enumerate(r["neighbours"])]}
               for r in fake_results(pnu, rng)]
    truth = truth_from_folders(results)
    s = summarize(results, truth)
    assert s["kind"] == "search"
    assert s["n_correct"] == sum(r["neighbours"][0]["label"] == t for r, t in zip(results, truth))


def test_page_rows_frames_and_confusion_table(pnu, rng):
    results = fake_results(pnu, rng, n=9, k=5)
    truth = truth_from_folders(results)
    text = render_report(results, truth=truth, progress=False, thumb_size=96)
    page = Page(text)
    assert len(page.rows) == 9
    for r, t, row in zip(results, truth, page.rows):
        query, hits = row[0], row[1:]
        assert query["big"] and len(hits) == 5
        assert [h["frame"] for h in hits] == ["pos" if n["label"] == t else "neg" for n in r["neighbours"]]
        assert [f"{n['score']:.4f}" in h["caption"] for n, h in zip(r["neighbours"], hits)] == [True] * 5
    (table,) = page.tables
    header, body = table[0], table[1:]
    pairs = Counter((t, r["label"]) for t, r in zip(truth, results))
    for row in body:
        for p, cell in zip(header[1:], row[1:]):
            assert int(cell) == pairs.get((row[0], p), 0)
    correct = sum(r["label"] == t for r, t in zip(results, truth))
    assert f"{100 * correct / 9:.1f}%" in text and f"({correct} of 9)" in text


def test_thumbnails_are_embedded_once_and_are_the_photos(pnu, rng):
    results = fake_results(pnu, rng, n=6)
    page = Page(render_report(results, progress=False, thumb_size=64))
    # self-contained: no external sources at all
    assert page.srcs == [] and "http" not in "".join(page.style.split("base64,")[0::2])
    sources = {r["query"] for r in results} | {h["path"] for r in results for h in r["neighbours"]}
    assert len(page.thumbs) == len(sources)  # each file once, however often shown
    tiles = {(t["thumb"], t["caption"]) for row in page.rows for t in row}
    assert {t for t, _ in tiles} == set(page.thumbs)
    # the query of row 0 is its file: decode the embedded JPEG and compare with the original
    cls = page.rows[0][0]["thumb"]
    thumb = Image.open(io.BytesIO(base64.b64decode(page.thumbs[cls])))
    assert thumb.format == "JPEG" and max(thumb.size) == 64
    with Image.open(results[0]["query"]) as im:
        ref = im.convert("RGB")
    ref.thumbnail((64, 64))
    diff = np.abs(np.asarray(thumb, np.float32) - np.asarray(ref.resize(thumb.size), np.float32)).mean()
    assert diff < 12  # JPEG at quality 85 plus resampling differences; a different photo is > 30 off


def test_without_truth_frames_are_neutral(pnu, rng):
    page = Page(render_report(fake_results(pnu, rng, n=3), progress=False))
    assert {t["frame"] for row in page.rows for t in row} == {"none"} and page.tables == []


def test_labels_and_paths_cannot_inject_markup(pnu, rng, tmp_path):
    results = fake_results(pnu, rng, n=2)
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    results[0]["label"] = evil
    results[0]["neighbours"][0]["label"] = evil
    results[1]["query"] = str(tmp_path / '"><script>alert(2)</script>.png')
    text = render_report(results, truth=["a", evil], progress=False)
    page = Page(text)
    assert "script" not in page.tags and "img" not in page.tags and page.srcs == []
    assert "&lt;script&gt;" in text


def test_missing_and_unreadable_images_show_placeholders(pnu, rng, tmp_path):
    results = fake_results(pnu, rng, n=2)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    results[0]["neighbours"][0]["path"] = str(tmp_path / "broken.png")
    results[0]["neighbours"][1]["path"] = str(tmp_path / "gone.png")
    results[1]["neighbours"][0]["path"] = "/etc/hostname"
    page = Page(render_report(results, progress=False))
    assert [t["thumb"] for t in page.rows[0][1:3]] == ["missing", "missing"] and page.rows[1][1]["thumb"] == "missing"
    assert "3 image(s) could not be read" in render_report(results, progress=False)


def test_relative_paths_resolve_next_to_the_results_file(pnu, rng, tmp_path, monkeypatch):
    import shutil

    results = fake_results(pnu, rng, n=1)
    shutil.copy(results[0]["neighbours"][0]["path"], tmp_path / "local.png")
    results[0]["neighbours"][0]["path"] = "local.png"
    monkeypatch.chdir("/")
    page = Page(render_report(results, progress=False, bases=[tmp_path]))
    assert page.rows[0][1]["thumb"] != "missing"


@pytest.mark.parametrize("content,words", [
    ("{not json", "not valid JSON"), ('{"query": 1}', "must be a JSON list"), ("[]", "holds no queries"),
    ('[{"query": "a"}]', "'neighbours' list"),
    ('[{"query": "a", "neighbours": [{"score": "high"}]}]', "numeric 'score'"),
    ('[{"query": "a", "neighbours": [], "confidence": 1, "label": "x"}, {"query": "b", "neighbours": []}]', "mixes"),
    ("[" * 100_000 + "]" * 100_000, "nested more than 100 levels"),
])
def test_bad_results_files_are_one_line_errors(tmp_path, content, words):
    p = tmp_path / "r.json"
    p.write_text(content)
    with pytest.raises(ResultsFormatError, match=re.escape(words)) as info:
        load_results(p)
    assert "\n" not in str(info.value)


# ---- the CLI --------------------------------------------------------------------------------

@pytest.mark.slow
def test_recognize_html_and_report_command(pnu, tmp_path, capsys):
    from serve_util import build_index, tiny_weights

    from pylandmark.cli import main

    weights = tiny_weights(tmp_path)
    index = build_index(pnu, weights, tmp_path / "pnu.plmi")
    capsys.readouterr()
    html = tmp_path / "out" / "rec.html"
    assert main(["recognize", str(index), str(pnu / "test"), "--json", "--quiet", "--html", str(html),
                 "--truth-from-folders"]) == 0
    results = json.loads(capsys.readouterr().out)
    page = Page(html.read_text())
    assert len(page.rows) == 15 and len(page.tables) == 1
    correct = sum(r["label"] == Path(r["query"]).parent.name for r in results)
    assert f"({correct} of 15)" in html.read_text()
    frames = [[t["frame"] for t in row[1:]] for row in page.rows]
    assert frames == [["pos" if h["label"] == Path(r["query"]).parent.name else "neg" for h in r["neighbours"]]
                      for r in results]

    shtml = tmp_path / "search.html"
    assert main(["search", str(index), str(pnu / "test" / "wb"), "-k", "3", "--quiet", "--html", str(shtml),
                 "--truth-from-folders"]) == 0
    capsys.readouterr()
    spage = Page(shtml.read_text())
    assert len(spage.rows) == 3 and all(len(row) == 4 for row in spage.rows) and "top-1 accuracy" in shtml.read_text()

    res_file = tmp_path / "res.json"
    res_file.write_text(json.dumps(results))
    out = tmp_path / "report.html"
    assert main(["report", str(res_file), "--out", str(out), "--quiet", "--title", "PNU <test>"]) == 0
    assert "wrote" in capsys.readouterr().out
    text = out.read_text()
    # recognize --truth-from-folders put each photo's class into its result, so the report has the
    # confusion matrix too: counted here from the JSON
    assert "<title>PNU &lt;test&gt;</title>" in text and len(Page(text).rows) == 15
    (table,) = Page(text).tables
    classes, truths = table[0][1:], [row[0] for row in table[1:]]
    assert truths == sorted({r["truth"] for r in results})
    assert [[int(c) for c in row[1:]] for row in table[1:]] == [
        [sum(r["truth"] == t and r["label"] == c for r in results) for c in classes] for t in truths]
    assert out.stat().st_mode & 0o044  # readable like any new file, not mkstemp's 0600
    assert main(["report", str(tmp_path / "nope.json"), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no results file" in err and err.count("\n") == 1


def test_many_classes_give_the_most_confused_pairs_not_a_table(tmp_path):
    """--truth-from-folders with thousands of classes: no C x C table is built (30,000 classes were
    9e8 cells and ran out of memory on 4de196b), the page lists the most confused pairs and stays a
    size a browser opens. Counts against a hand count."""
    n_classes = 3000
    results = []
    truth = []
    for i in range(n_classes):  # class i's two queries: one right, one taken for class (i + 1)
        for predicted in (f"c{i:04d}", f"c{(i + 1) % n_classes:04d}" if i % 3 else "c0000"):
            results.append({"query": str(tmp_path / f"c{i:04d}" / f"{len(results)}.jpg"), "label": predicted,
                            "known": True, "confidence": 1.0, "votes": 1,
                            "neighbours": [{"score": 0.5, "id": 0, "label": predicted, "path": None}]})
            truth.append(f"c{i:04d}")
    s = summarize(results, truth)
    assert s["confusion"] == [] and s["n_classes"] == n_classes and s["n_correct"] == n_classes + 1
    # each wrong query is its own (true, predicted) pair, once: the list is the first 20 by label
    assert s["confused_pairs"][0][2] == 1 and len(s["confused_pairs"]) == 20
    want = sorted(((f"c{i:04d}", f"c{(i + 1) % n_classes:04d}" if i % 3 else "c0000") for i in range(1, n_classes)),
                  key=lambda e: (e[0], e[1]))[:20]
    assert [tuple(p[:2]) for p in s["confused_pairs"]] == want
    from pylandmark.report.results import _confusion_html

    html = render_report(results, truth=truth, progress=False, max_images=0)
    table = _confusion_html(s)
    # the summary grows with the 20 pairs listed (a row of two labels and a count each), not with C^2
    assert table in html and "too many for a confusion table" in table and len(table) < 20 * 200
    small = summarize(results[:8], truth[:8])  # few classes: the whole table, as before
    assert len(small["confusion"]) == len(small["truth_labels"]) == 4 and small["confused_pairs"]


def test_recognize_prints_pairs_when_classes_are_many():
    from pylandmark.pipelines import recognition_summary

    results = [{"label": f"p{i % 40}", "truth": f"t{i % 50}"} for i in range(200)]
    s = recognition_summary(results)
    assert s["confusion"] is None and len(s["classes"]) == 90 and s["right"] == 0
    assert s["confused_pairs"][0] == ["t0", "p0", 1] and sum(c["queries"] for c in s["per_class"].values()) == 200
    few = recognition_summary([{"label": "a", "truth": "a"}, {"label": "b", "truth": "a"}])
    assert few["confusion"] == [[1, 1], [0, 0]] and few["confused_pairs"] == [["a", "b", 1]]
