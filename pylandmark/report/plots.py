"""Figures and a page of the worst queries for a revisited Oxford / Paris evaluation
(``pylandmark evaluate ... --plots DIR``).

For each dataset, into ``DIR``:

- ``<name>_ap.png``: per-query AP under the Easy, Medium and Hard protocols (skipped queries
  marked), with the mAP as a line;
- ``<name>_pr.png``: precision-recall curves per query (thin) and their mean interpolated
  precision (thick), per protocol;
- ``<name>_worst.html``: the queries with the lowest Medium AP, each with its top-10
  (positives green, junk grey, negatives red) and the query's box drawn on it.

The figures need matplotlib (``pip install "pylandmark[plots]"``); the page does not.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._files import replaced_atomically
from .html import ThumbStore, esc, legend, page, tile, write_page

__all__ = ["require_matplotlib", "protocol_lists", "pr_curve", "interpolated_precision",
           "write_evaluation_plots", "worst_queries_page", "PROTOCOLS"]

log = logging.getLogger(__name__)

PROTOCOLS = ("easy", "medium", "hard")
PLOTS_HINT = 'pip install "pylandmark[plots]"'
_RECALL_GRID = np.linspace(0.0, 1.0, 101)


def require_matplotlib() -> None:
    """Raises ImportError naming the extra when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError(f"--plots needs matplotlib: {PLOTS_HINT}")


def protocol_lists(g: dict, protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """(positives, junk) database indices of one query under a protocol (as the revisited
    protocol defines them: Easy ok = easy, junk = junk + hard; Medium ok = easy + hard, junk =
    junk; Hard ok = hard, junk = junk + easy)."""
    easy, hard, junk = (np.asarray(g.get(key, []), dtype=np.int64).reshape(-1) for key in ("easy", "hard", "junk"))
    if protocol == "easy":
        return easy, np.concatenate([junk, hard])
    if protocol == "medium":
        return np.concatenate([easy, hard]), junk
    if protocol == "hard":
        return hard, np.concatenate([junk, easy])
    raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")


def pr_curve(ranking: Any, positives: Any, junk: Any = ()) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at each ranked positive, junk removed from the ranking.

    Args:
        ranking: (n,) database indices, best first (-1 padding ignored).
        positives: database indices that count as correct.
        junk: database indices removed from the ranking before counting.

    Returns:
        (recall, precision), each (P,) float64 for the P positives found, in rank order:
        recall_j = (j + 1) / n_positives and precision_j = (j + 1) / (r_j + 1) for the j-th
        positive at 0-based rank r_j among the non-junk images. Empty without positives.
    """
    r = np.asarray(ranking, dtype=np.int64).reshape(-1)
    r = r[r >= 0]
    pos = np.unique(np.asarray(positives, dtype=np.int64))
    if pos.size == 0:
        return np.zeros(0), np.zeros(0)
    r = r[~np.isin(r, np.asarray(junk, dtype=np.int64))]
    at = np.flatnonzero(np.isin(r, pos))
    j = np.arange(1, at.size + 1, dtype=np.float64)
    return j / pos.size, j / (at + 1.0)


def interpolated_precision(recall: np.ndarray, precision: np.ndarray, grid: np.ndarray = _RECALL_GRID) -> np.ndarray:
    """max precision at recall >= t, for each t of ``grid`` (0 beyond the last positive found)."""
    out = np.zeros(grid.shape)
    if recall.size == 0:
        return out
    best_after = np.maximum.accumulate(precision[::-1])[::-1]  # best precision from each point on
    idx = np.searchsorted(recall, grid - 1e-12, side="left")
    ok = idx < recall.size
    out[ok] = best_after[idx[ok]]
    return out


def _savefig(fig, path: Path) -> Path:
    with replaced_atomically(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path


def _ap_figure(result: dict, name: str, path: Path) -> Path:
    from matplotlib.figure import Figure

    n_q = len(np.asarray(result["easy"]["ap"]))
    fig = Figure(figsize=(max(8.0, 0.14 * n_q + 2.5), 7.2), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    x = np.arange(n_q)
    colors = {"easy": "#2da44e", "medium": "#0969da", "hard": "#bf3989"}
    for ax, proto in zip(axes, PROTOCOLS):
        ap = np.asarray(result[proto]["ap"], dtype=np.float64) * 100
        done = ~np.isnan(ap)
        ax.bar(x[done], ap[done], color=colors[proto], width=0.8)
        if (~done).any():
            ax.plot(x[~done], np.full((~done).sum(), 2.0), "x", color="#8c959f", label="skipped (no positives)")
            ax.legend(loc="upper right", fontsize=8, frameon=False)
        m = result[proto]["map"] * 100
        if np.isfinite(m):
            ax.axhline(m, color="#1f2328", lw=1, ls="--")
        ax.set_ylim(0, 100)
        ax.set_ylabel("AP (%)")
        ax.set_title(f"{proto.capitalize()}: mAP {m:.2f}%  ({int(done.sum())} queries)", loc="left", fontsize=10)
        ax.grid(axis="y", color="#d8dee4", lw=0.6)
        ax.set_axisbelow(True)
    axes[-1].set_xlabel("query")
    axes[-1].set_xlim(-0.7, n_q - 0.3)
    fig.suptitle(f"{name}: average precision per query", fontsize=12)
    return _savefig(fig, path)


def _pr_figure(ranks: np.ndarray, gnd: Sequence[dict], result: dict, name: str, path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.4), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    for ax, proto in zip(axes, PROTOCOLS):
        curves = []
        for q, g in enumerate(gnd):
            ok, junk = protocol_lists(g, proto)
            if ok.size == 0:
                continue
            rec, prec = pr_curve(ranks[q], ok, junk)
            if rec.size:
                ax.plot(np.r_[0.0, rec], np.r_[prec[0], prec], color="#8c959f", lw=0.6, alpha=0.45)
            curves.append(interpolated_precision(rec, prec))
        if curves:
            ax.plot(_RECALL_GRID, np.mean(curves, axis=0), color="#0969da", lw=2.2, label="mean interpolated")
            ax.legend(loc="upper right", fontsize=8, frameon=False)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_title(f"{proto.capitalize()}: mAP {result[proto]['map'] * 100:.2f}%", fontsize=10)
        ax.grid(color="#d8dee4", lw=0.6)
    axes[0].set_ylabel("precision")
    fig.suptitle(f"{name}: precision-recall per query", fontsize=12)
    return _savefig(fig, path)


def _box_overlay(path: Path | None, bbox: Sequence[float] | None, box: int) -> str:
    """An absolutely placed rectangle marking ``bbox`` on a thumbnail shown in a ``box`` px square."""
    if path is None or bbox is None:
        return ""
    from ..data.images import open_raster

    try:
        with open_raster(path, str(path)) as im:  # the header only, of the formats read on purpose
            w, h = im.size
    except (OSError, ValueError, SyntaxError):
        return ""
    s = box / max(w, h)
    ox, oy = (box - w * s) / 2, (box - h * s) / 2
    x1, y1, x2, y2 = (float(v) for v in bbox)
    x1, x2 = sorted((min(max(x1, 0), w), min(max(x2, 0), w)))
    y1, y2 = sorted((min(max(y1, 0), h), min(max(y2, 0), h)))
    pct = [100 * (ox + x1 * s) / box, 100 * (oy + y1 * s) / box, 100 * (x2 - x1) * s / box, 100 * (y2 - y1) * s / box]
    return ('<span class="box" style="left:{:.2f}%;top:{:.2f}%;width:{:.2f}%;height:{:.2f}%"></span>'
            .format(*pct))


def worst_queries_page(ranks: np.ndarray, dataset, result: dict, *, n_worst: int = 10, top: int = 10,
                       protocol: str = "medium", thumb_size: int = 160, progress: bool = True) -> str:
    """The HTML page of the ``n_worst`` queries by AP under ``protocol``, each with its ``top``
    retrieved images framed: positives (easy or hard) green, junk grey, negatives red."""
    from .thumbs import resolve_image

    ap = np.asarray(result[protocol]["ap"], dtype=np.float64)
    order = [int(q) for q in np.argsort(np.where(np.isnan(ap), np.inf, ap), kind="stable") if not np.isnan(ap[q])]
    chosen = order[:n_worst]
    store = ThumbStore(thumb_size, max_images=(top + 1) * max(1, len(chosen)))
    qpaths = dataset.query_paths
    store.load([str(qpaths[q]) for q in chosen]
               + [str(dataset.image_path(int(i))) for q in chosen for i in ranks[q][:top] if i >= 0], progress=progress)
    rows = []
    for q in chosen:
        g = dataset.gnd[q]
        easy, hard, junk = (set(np.asarray(g.get(key, []), dtype=np.int64).tolist())
                            for key in ("easy", "hard", "junk"))
        qpath = str(qpaths[q])
        overlay = _box_overlay(resolve_image(qpath), g.get("bbx"), thumb_size)
        aps = " &middot; ".join(f"{p[0].upper()} {100 * float(result[p]['ap'][q]):.1f}"
                                if not np.isnan(result[p]["ap"][q]) else f"{p[0].upper()} -" for p in PROTOCOLS)
        qcap = f'<b>{esc(dataset.qimlist[q])}</b><br><span class="name">query {q}</span>'
        info = (f'<div class="sub">AP (%)</div><div class="lab">{100 * ap[q]:.1f}</div>'
                f'<div class="sub">{aps}</div><div class="sub">{len(easy)} easy, {len(hard)} hard, '
                f"{len(junk)} junk</div>")
        hits = []
        for rank, i in enumerate(ranks[q][:top]):
            i = int(i)
            if i < 0:
                break
            kind, frame = (("easy", "pos") if i in easy else ("hard", "pos") if i in hard
                           else ("junk", "junk") if i in junk else ("negative", "neg"))
            name = dataset.imlist[i] if i < len(dataset.imlist) else dataset.image_path(i).name
            cap = f'<span class="rank">{rank + 1}.</span>{esc(kind)}<br><span class="name">{esc(name)}</span>'
            hits.append(f"<li>{tile(store, str(dataset.image_path(i)), cap, frame, title=name)}</li>")
        rows.append(f'<div class="row">{tile(store, qpath, qcap, big=True, title=qpath, overlay=overlay)}'
                    f'<div class="answer">{info}</div><ol class="hits">{"".join(hits)}</ol></div>')
    m = result[protocol]["map"] * 100
    body = (f'<section class="card"><div class="stats"><span class="stat"><b>{m:.2f}%</b>mAP ({esc(protocol)})</span>'
            f'<span class="stat"><b>{len(chosen)}</b>worst of {len(order)} queries</span></div>'
            f'{legend(["pos", "junk", "neg"])}<p class="note">Frames follow the {esc(protocol)} protocol '
            "(positives: easy and hard images). The yellow box is the query region.</p></section>"
            f'<section class="card"><h2>Worst queries, top {top}</h2>{"".join(rows)}</section>')
    return page(f"{dataset.name}: worst queries", f"lowest {esc(protocol)} AP first", body, store)


def write_evaluation_plots(result: dict, dataset, out_dir: str | os.PathLike, *, n_worst: int = 10, top: int = 10,
                           progress: bool = True) -> list[Path]:
    """Writes ``<name>_ap.png``, ``<name>_pr.png`` and ``<name>_worst.html`` into ``out_dir``.

    Args:
        result: one dataset's entry of ``evaluate_revisited(..., keep_ranks=True)`` (or of
            :func:`pylandmark.evaluate.revisited` with ``"ranks"`` added): per-protocol ``ap``
            and ``map``, and ``ranks``, the (Q, n) ranking.
        dataset: the :class:`~pylandmark.data.RevisitedDataset` it was computed on.
        out_dir: folder for the files (created).

    Returns:
        the paths written.
    """
    require_matplotlib()
    ranks = np.asarray(result.get("ranks") if isinstance(result, dict) else None)
    if ranks.ndim != 2 or ranks.shape[0] != dataset.n_queries:
        raise ValueError(f"result must hold 'ranks', the ({dataset.n_queries}, n) ranking; "
                         "evaluate with keep_ranks=True")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--plots {out} is a file; name a folder")
    out.mkdir(parents=True, exist_ok=True)
    name = dataset.name
    files = [_ap_figure(result, name, out / f"{name}_ap.png"),
             _pr_figure(ranks, dataset.gnd, result, name, out / f"{name}_pr.png")]
    html = worst_queries_page(ranks, dataset, result, n_worst=n_worst, top=top, progress=progress)
    files.append(write_page(out / f"{name}_worst.html", html))
    log.info("wrote %s", ", ".join(str(f) for f in files))
    return files
