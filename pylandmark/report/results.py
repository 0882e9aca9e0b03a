"""HTML pages of recognition and search results: one row per query (the query, its top-k with
scores, green / red frames where the true labels are known, the vote), and a summary with the
accuracy and a confusion table.

The input is what ``pylandmark recognize --json`` or ``pylandmark search --json`` prints (and
what the web service returns): a list of ``{"query", "neighbours": [{"score", "id", "label",
"path"}, ...]}`` with ``"label"``, ``"known"``, ``"confidence"``, ``"votes"`` for recognition.
"""
from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._files import inside, parse_json
from ..evaluate.metrics import CONFUSION_TABLE_MAX, confusion_summary
from .html import ThumbStore, esc, legend, page, tile, write_page

__all__ = ["load_results", "check_results", "truth_from_folders", "summarize", "render_report",
           "write_report", "MAX_RESULTS_BYTES"]

log = logging.getLogger(__name__)

MAX_RESULTS_BYTES = 256 << 20
MAX_QUERIES = 100_000
MAX_NEIGHBOURS = 1000


class ResultsFormatError(ValueError):
    """The results are not what `pylandmark recognize/search --json` writes."""


def load_results(path: str | os.PathLike) -> list[dict]:
    """Reads and checks a results JSON file (see :func:`check_results`), a file that may come
    from elsewhere: its JSON is parsed with bounded work (:func:`pylandmark._files.parse_json`),
    and every relative image name in it (queries, neighbour paths) must stay inside the folder
    it is looked up in (the working folder, then the results file's): no ``..``. Absolute
    paths are what ``recognize`` and ``search`` write (an index stores them so) and stay."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no results file at {p}; write one with `pylandmark recognize ... --json > {p}`")
    size = p.stat().st_size
    if size > MAX_RESULTS_BYTES:
        raise ResultsFormatError(f"{p} is {size:,} bytes, more than the {MAX_RESULTS_BYTES:,} a results file may have")
    data = parse_json(p.read_bytes(), what=str(p), max_bytes=MAX_RESULTS_BYTES, error=ResultsFormatError)
    check_results(data, str(p))
    for q, r in enumerate(data):
        _check_image_name(r["query"], p, f"{p}[{q}]['query']")
        for j, h in enumerate(r["neighbours"]):
            _check_image_name(h.get("path"), p, f"{p}[{q}]['neighbours'][{j}]['path']")
    return data


def _check_image_name(name: str | None, results_file: Path, where: str) -> None:
    """A relative image name of a results file must not climb out of the folders the page
    looks it up in (:func:`pylandmark._files.inside`); absolute names are left as they are."""
    if name and not Path(name).is_absolute():
        inside(results_file.parent, name, where, error=ResultsFormatError)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_results(results: Any, name: str = "results") -> str:
    """Checks the structure; returns "recognize" or "search" (which command made them)."""
    if not isinstance(results, list):
        raise ResultsFormatError(f"{name} must be a JSON list of per-query results as `pylandmark recognize "
                                 f"--json` or `search --json` print, got {type(results).__name__}")
    if not results:
        raise ResultsFormatError(f"{name} holds no queries")
    if len(results) > MAX_QUERIES:
        raise ResultsFormatError(f"{name} holds {len(results)} queries, more than the {MAX_QUERIES} a page shows")
    kinds = set()
    for q, r in enumerate(results):
        where = f"{name}[{q}]"
        if not isinstance(r, dict) or not isinstance(r.get("query"), str) or not isinstance(r.get("neighbours"), list):
            raise ResultsFormatError(f"{where} must be an object with a 'query' string and a 'neighbours' list")
        if len(r["neighbours"]) > MAX_NEIGHBOURS:
            raise ResultsFormatError(f"{where} has {len(r['neighbours'])} neighbours, more than {MAX_NEIGHBOURS}")
        for j, h in enumerate(r["neighbours"]):
            if not isinstance(h, dict) or not _is_number(h.get("score")):
                raise ResultsFormatError(f"{where}['neighbours'][{j}] must be an object with a numeric 'score'")
            if not isinstance(h.get("path"), (str, type(None))) or not _is_plain(h.get("label")):
                raise ResultsFormatError(f"{where}['neighbours'][{j}]: 'path' must be a string or null and "
                                         "'label' a string, number or null")
        recognition = "confidence" in r
        if recognition and (not _is_number(r["confidence"]) or not _is_plain(r.get("label"))):
            raise ResultsFormatError(f"{where}: 'confidence' must be a number and 'label' a string or number")
        kinds.add("recognize" if recognition else "search")
    if len(kinds) > 1:
        raise ResultsFormatError(f"{name} mixes recognition and search results; write one page per command")
    return kinds.pop()


def _is_plain(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float)) and not isinstance(v, bool)


def truth_from_folders(results: Sequence[dict]) -> list[str]:
    """Each query's true label = the name of the folder holding it (``test/<label>/q.jpg``)."""
    return [Path(r["query"]).parent.name for r in results]


def _same(a: Any, b: Any) -> bool:
    """Label equality as the index stores labels: 3 and "3" differ; None matches nothing."""
    return a is not None and b is not None and isinstance(a, str) == isinstance(b, str) and a == b


def _prediction(r: dict, kind: str) -> Any:
    if kind == "recognize":
        return r.get("label")
    return r["neighbours"][0].get("label") if r["neighbours"] else None


def summarize(results: Sequence[dict], truth: Sequence[Any] | None) -> dict:
    """Accuracy and confusion counts against the true labels.

    The prediction is the recognised label, or for search results the nearest neighbour's label.

    Returns:
        ``{"kind", "n_queries", "n_correct", "accuracy" (NaN without truth), "truth_labels",
        "predicted_labels", "confusion", "confused_pairs", "n_classes"}`` where
        ``confusion[i][j]`` counts queries of true label ``truth_labels[i]`` predicted as
        ``predicted_labels[j]`` (the true labels first, in sorted order, then any other
        prediction such as "unknown"), filled only up to
        :data:`~pylandmark.evaluate.metrics.CONFUSION_TABLE_MAX` labels (empty beyond: a page
        stays a size a browser opens); ``confused_pairs``: the most frequent [true, predicted,
        count] confusions.
    """
    kind = check_results(list(results))
    n = len(results)
    out: dict[str, Any] = {"kind": kind, "n_queries": n, "n_correct": 0, "accuracy": math.nan,
                           "truth_labels": [], "predicted_labels": [], "confusion": []}
    if truth is None:
        return out
    truth = list(truth)
    if len(truth) != n:
        raise ValueError(f"truth has {len(truth)} labels but there are {n} queries; give one per query")
    preds = [_prediction(r, kind) for r in results]
    rows = sorted({str(t) for t in truth})
    cols = rows + sorted({str(p) for p in preds} - set(rows))
    correct = sum(_same(p, t) for p, t in zip(preds, truth))
    out.update(n_correct=correct, accuracy=correct / n)
    # the table only when it is small (30,000 classes would be 9e8 cells); else the worst pairs.
    # The page's table has its own layout (true labels first), built below: the pairs only here.
    summary = confusion_summary([str(p) for p in preds], [str(t) for t in truth], table_max=0)
    out["confused_pairs"] = summary["confused_pairs"]
    out["n_classes"] = len(rows)
    if len(cols) <= CONFUSION_TABLE_MAX:
        row_of, col_of = {c: i for i, c in enumerate(rows)}, {c: j for j, c in enumerate(cols)}
        counts = [[0] * len(cols) for _ in rows]
        for t, p in zip(truth, preds):
            counts[row_of[str(t)]][col_of[str(p)]] += 1
        out.update(truth_labels=rows, predicted_labels=cols, confusion=counts)
    return out


def _confusion_html(s: dict) -> str:
    if not s["confusion"]:  # too many classes for a table: the most confused pairs
        rows = "".join(f'<tr><td>{n}</td><th>{esc(a)}</th><td class="off">{esc(b)}</td></tr>'
                       for a, b, n in s.get("confused_pairs", []))
        return (f'<p class="note">{s.get("n_classes", 0)} classes: too many for a confusion table; the most '
                f'confused pairs:</p><table class="confusion"><tr><th>queries</th><th>true</th><th>predicted</th>'
                f"</tr>{rows}</table>")
    head = "".join(f"<th>{esc(c)}</th>" for c in s["predicted_labels"])
    body = []
    for i, lab in enumerate(s["truth_labels"]):
        cells = []
        for j, c in enumerate(s["confusion"][i]):
            cls = "diag" if s["predicted_labels"][j] == lab and c else ("off" if c else "zero")
            cells.append(f'<td class="{cls}">{c}</td>')
        body.append(f"<tr><th>{esc(lab)}</th>{''.join(cells)}</tr>")
    return (f'<table class="confusion"><tr><th class="corner">true \\ predicted</th>{head}</tr>'
            f"{''.join(body)}</table>")


def _frame(label: Any, truth: Any, has_truth: bool) -> str:
    if not has_truth or label is None:
        return "none"
    return "pos" if _same(label, truth) else "neg"


def render_report(results: Sequence[dict], *, truth: Sequence[Any] | None = None, title: str | None = None,
                  thumb_size: int = 160, bases: Sequence[str | os.PathLike] = (), progress: bool = True,
                  max_images: int = 2000, query_images: dict[str, str] | None = None) -> str:
    """The HTML page of recognition or search results.

    Args:
        results: the list `pylandmark recognize/search --json` prints.
        truth: one true label per query (None: unknown; frames stay neutral, no accuracy).
        title: page title (default from the kind of results).
        thumb_size: thumbnail size in pixels.
        bases: folders where relative image paths are also looked for (after the working folder).
        progress: progress bar while thumbnailing.
        max_images: most distinct images embedded.
        query_images: optional query name -> image file, for queries whose name is not a path.

    Returns:
        the page, a complete HTML document with every image embedded.
    """
    summary = summarize(results, truth)
    kind = summary["kind"]
    has_truth = truth is not None
    truth = list(truth) if truth is not None else [None] * len(results)
    query_images = query_images or {}
    store = ThumbStore(thumb_size, bases, max_images)
    store.load([query_images.get(r["query"], r["query"]) for r in results]
               + [h.get("path") for r in results for h in r["neighbours"]], progress=progress)
    k = max((len(r["neighbours"]) for r in results), default=0)

    rows = []
    for r, t in zip(results, truth):
        qcap = (f'<span class="name">{esc(_short(r["query"]))}</span>'
                + (f"<br>true: <b>{esc(t)}</b>" if has_truth else ""))
        query = tile(store, query_images.get(r["query"], r["query"]), qcap, big=True, title=r["query"])
        pred = _prediction(r, kind)
        if kind == "recognize":
            n_nb = len(r["neighbours"])
            sub = f'confidence {float(r["confidence"]):.2f}'
            if "votes" in r:
                sub += f' &middot; {esc(r["votes"])}/{n_nb} votes'
            answer = f'<div class="lab">{esc(pred)}</div><div class="sub">{sub}</div>'
        else:
            answer = ('<div class="sub">nearest label</div>'
                      f'<div class="lab">{esc(pred if pred is not None else "-")}</div>')
        if has_truth:
            ok = _same(pred, t)
            answer += f'<span class="verdict {"pos" if ok else "neg"}">{"correct" if ok else "wrong"}</span>'
        hits = []
        for j, h in enumerate(r["neighbours"]):
            rank = h.get("rank", j + 1)
            cap = (f'<span class="rank">{esc(rank)}.</span><span class="score">{float(h["score"]):.4f}</span> '
                   f'{esc(h.get("label") if h.get("label") is not None else "-")}')
            name = h.get("path") or f'id {h.get("id")}'
            hits.append(f"<li>{tile(store, h.get('path'), cap, _frame(h.get('label'), t, has_truth), title=name)}</li>")
        rows.append(f'<div class="row">{query}<div class="answer">{answer}</div>'
                    f'<ol class="hits">{"".join(hits)}</ol></div>')

    stats = [f'<span class="stat"><b>{summary["n_queries"]}</b>queries</span>',
             f'<span class="stat"><b>{k}</b>neighbours shown</span>']
    body = []
    if has_truth:
        what = "accuracy" if kind == "recognize" else "top-1 accuracy"
        stats.insert(0, f'<span class="stat"><b>{100 * summary["accuracy"]:.1f}%</b>{what} '
                        f'({summary["n_correct"]} of {summary["n_queries"]})</span>')
        body.append(f'<section class="card"><h2>Summary</h2><div class="stats">{"".join(stats)}</div>'
                    f'{_confusion_html(summary)}{legend(["pos", "neg", "none"])}</section>')
    else:
        body.append(f'<section class="card"><div class="stats">{"".join(stats)}</div>'
                    '<p class="note">True labels unknown: pass --truth-from-folders (query folders named '
                    'after their landmark) for green / red frames, the accuracy and the confusion table.</p></section>')
    body.append(f'<section class="card"><h2>Queries</h2>{"".join(rows)}</section>')
    default = "Landmark recognition" if kind == "recognize" else "Image search"
    sub = f"{summary['n_queries']} queries &middot; {kind} &middot; top-{k}"
    return page(title or default, sub, "".join(body), store)


def _short(name: str) -> str:
    """The last two parts of a path (folder / file), enough to tell queries apart on the page."""
    parts = Path(name).parts
    return "/".join(parts[-2:]) if len(parts) > 1 else name


def write_report(results: Sequence[dict], out: str | os.PathLike, **kwargs: Any) -> Path:
    """Renders :func:`render_report` into ``out`` (written to a temporary file, then renamed)."""
    text = render_report(results, **kwargs)
    return write_page(out, text)
