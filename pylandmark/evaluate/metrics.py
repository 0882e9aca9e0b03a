"""Retrieval and recognition metrics.

- :func:`revisited`: mAP and mP@k on revisited Oxford / Paris under the Easy, Medium and Hard
  protocols (Radenovic et al., CVPR 2018), vectorised over queries.
- :func:`compute_ap`: the trapezoid-rule average precision of one query.
- :func:`gap`, :func:`accuracy`, :func:`recognition_metrics`: landmark recognition scores
  (GAP as in the Google Landmark Recognition challenge).
- :func:`format_table`: the usual E / M / H table of mAP and mP@k, in percent;
  :func:`format_comparison`: the mAP of several settings side by side.

Only numpy is needed; torch tensors are accepted where arrays are.
"""
from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .._checks import check_int, framework_of, to_numpy

logger = logging.getLogger(__name__)

__all__ = ["PROTOCOLS", "revisited", "compute_ap", "format_table", "format_comparison",
           "gap", "accuracy", "confusion", "format_confusion",
           "confusion_summary", "format_confused_pairs", "CONFUSION_TABLE_MAX",
           "recognition_metrics"]

PROTOCOLS = ("easy", "medium", "hard")

# category codes in the per-query label rows
_EASY, _HARD, _JUNK = 1, 2, 3
# protocol -> (categories counted as positives, categories ignored as junk)
_PROTOCOL_CATS = {
    "easy": ((_EASY,), (_HARD, _JUNK)),
    "medium": ((_EASY, _HARD), (_JUNK,)),
    "hard": ((_HARD,), (_EASY, _JUNK)),
}
# at most this many int8 label cells per chunk of queries (bounds memory with 1M distractors)
_CHUNK_CELLS = 1 << 26


def _check_kappas(kappas: Any) -> tuple[int, ...]:
    if isinstance(kappas, numbers.Integral):
        kappas = (kappas,)
    try:
        ks = tuple(kappas)
    except TypeError as err:
        raise TypeError(f"kappas must be a sequence of ints such as (1, 5, 10), got "
                        f"{type(kappas).__name__}") from err
    return tuple(check_int(k, "kappas", minimum=1, hint=f" in {kappas!r}; pass ints such as (1, 5, 10)")
                 for k in ks)


def _index_list(entry: Any, key: str, q: int) -> np.ndarray:
    try:
        values = entry[key]
    except (KeyError, TypeError, IndexError) as err:
        raise ValueError(f"gnd[{q}] must be a dict with 'easy', 'hard' and 'junk' index lists "
                         f"(as in gnd_<dataset>.pkl); missing {key!r}") from err
    arr = to_numpy(values, f"gnd[{q}][{key!r}]").reshape(-1)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise TypeError(f"gnd[{q}][{key!r}] must hold integer database indices, "
                            f"got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.min() < 0:
        raise ValueError(f"gnd[{q}][{key!r}] holds a negative database index ({arr.min()})")
    return arr


def _check_ranks(ranks: Any, n_queries: int) -> np.ndarray:
    r = to_numpy(ranks, "ranks")
    if r.dtype == np.bool_ or r.dtype.kind not in "iu":
        raise TypeError(f"ranks must hold integer database indices (best first), got dtype "
                        f"{r.dtype}; pass the index output of search(), not the scores")
    if r.ndim != 2:
        raise ValueError(f"ranks must be (Q, n): one row of database indices per query, "
                         f"got shape {r.shape}")
    if r.shape[0] != n_queries:
        if r.shape[1] == n_queries:
            raise ValueError(f"ranks has shape {r.shape} but gnd has {n_queries} queries: ranks "
                             "must be (Q, n) with one row per query; pass ranks.T (the official "
                             "revisitop code uses (n, Q))")
        raise ValueError(f"ranks has {r.shape[0]} rows but gnd has {n_queries} queries; "
                         "pass one row of database indices per query")
    r = r.astype(np.int64, copy=False)
    if r.size and r.min() < -1:
        raise ValueError(f"ranks holds {r.min()}: database indices must be >= 0 (-1 is allowed "
                         "only as trailing padding, as search() returns for k > N)")
    if r.size and r.shape[1] > 1:
        pad = r < 0
        # padding must be trailing: no valid entry after a -1
        if np.any(pad[:, :-1] & ~pad[:, 1:]):
            q = int(np.nonzero(np.any(pad[:, :-1] & ~pad[:, 1:], axis=1))[0][0])
            raise ValueError(f"ranks[{q}] has -1 before a valid index; -1 may only pad the end "
                             "of a row")
    return r


def revisited(ranks: Any, gnd: Sequence[Mapping[str, Any]], kappas: Sequence[int] = (1, 5, 10), *,
              protocols: Sequence[str] = PROTOCOLS) -> dict[str, dict[str, Any]]:
    """Revisited Oxford / Paris evaluation (Easy, Medium, Hard protocols).

    Per query and protocol (Easy: positives easy, junk junk + hard; Medium: positives
    easy + hard, junk junk; Hard: positives hard, junk junk + easy) junk images are removed from
    the ranking, AP is the trapezoid rule over the adjusted positive ranks (positives missing from
    a truncated ranking add 0) and P@k uses ``kq = min(largest adjusted 1-based positive rank, k)``
    as denominator (0 when no positive is ranked). Queries without positives under a protocol
    are skipped (NaN, left out of the means).

    Args:
        ranks: (Q, N) or truncated (Q, n) integer database indices, best first, one row per
            query (numpy, torch or a nested list). -1 entries may pad the end of a row (as
            ``search`` returns for k > N) and count as absent.
        gnd: the ``'gnd'`` list of the ground-truth file: Q dicts with ``'easy'``, ``'hard'``
            and ``'junk'`` lists of database indices (disjoint, without repeats).
        kappas: the k of mP@k.
        protocols: the protocols to evaluate (a subset of :data:`PROTOCOLS`). With only
            ``"easy"`` lists (``"hard"`` empty) the ``"medium"`` protocol is plain AP with junk
            removed, as used for the SfM-120k validation.

    Returns:
        ``{"easy" | "medium" | "hard": {"map": float, "mp": {k: float}, "ap": (Q,) float64,
        "pr": {k: (Q,) float64}, "n_queries": int}}``: mAP and mP@k as fractions (means over
        the evaluated queries, NaN when there are none), per-query AP and P@k with NaN where
        the query was skipped, and the number of queries evaluated.

    Raises:
        ValueError / TypeError: malformed ``ranks`` (wrong shape, non-integer, a database index
            ranked twice among a query's positives and junk) or ``gnd``.
    """
    if isinstance(gnd, Mapping) and "gnd" in gnd:
        raise TypeError("gnd must be the list under the 'gnd' key of the ground-truth file, "
                        "not the whole dict; pass cfg['gnd']")
    if isinstance(gnd, (str, bytes)) or not isinstance(gnd, Sequence):
        raise TypeError(f"gnd must be a list of per-query dicts, got {type(gnd).__name__}")
    ks = _check_kappas(kappas)
    if isinstance(protocols, str) or not set(protocols) <= set(PROTOCOLS) or not len(protocols):
        raise ValueError(f"protocols must be a non-empty subset of {PROTOCOLS}, got {protocols!r}")
    protos = [p for p in PROTOCOLS if p in protocols]
    n_q = len(gnd)
    r = _check_ranks(ranks, n_q)
    n = r.shape[1]

    lists = [tuple(_index_list(g, key, q) for key in ("easy", "hard", "junk"))
             for q, g in enumerate(gnd)]
    max_gnd = max((int(a.max()) for triple in lists for a in triple if a.size), default=-1)
    M = max(int(r.max()) if r.size else -1, max_gnd) + 1  # label row width (+1 padding column)

    ap = {p: np.full(n_q, np.nan) for p in protos}
    pr = {p: np.full((n_q, len(ks)), np.nan) for p in protos}
    kq_arr = np.asarray(ks, dtype=np.float64)
    chunk = max(1, _CHUNK_CELLS // (M + 1))
    for q0 in range(0, n_q, chunk):
        q1 = min(n_q, q0 + chunk)
        c = q1 - q0
        labels = np.zeros((c, M + 1), dtype=np.int8)
        n_listed = np.zeros(c, dtype=np.int64)
        for cat, which in ((_EASY, 0), (_HARD, 1), (_JUNK, 2)):
            rows = np.concatenate([np.full(lists[q][which].size, q - q0, dtype=np.int64)
                                   for q in range(q0, q1)])
            cols = np.concatenate([lists[q][which] for q in range(q0, q1)])
            labels[rows, cols] = cat
            n_listed += np.bincount(rows, minlength=c)
        bad = np.count_nonzero(labels, axis=1) != n_listed
        if np.any(bad):
            q = q0 + int(np.nonzero(bad)[0][0])
            raise ValueError(f"gnd[{q}]: 'easy', 'hard' and 'junk' must be disjoint lists of "
                             "distinct database indices")
        count = {cat: np.array([lists[q][which].size for q in range(q0, q1)])
                 for cat, which in ((_EASY, 0), (_HARD, 1), (_JUNK, 2))}

        rc = r[q0:q1]
        cat_of = np.take_along_axis(labels, np.where(rc < 0, M, rc), axis=1)  # (c, n) int8
        qs, pos = np.nonzero(cat_of)  # row-major: sorted by query, then by position
        cats = cat_of[qs, pos]
        keys = qs * (M + 1) + rc[qs, pos]
        if np.unique(keys).size != keys.size:
            sorted_keys = np.sort(keys)
            dup = int(sorted_keys[np.nonzero(sorted_keys[1:] == sorted_keys[:-1])[0][0]])
            raise ValueError(f"ranks[{q0 + dup // (M + 1)}] lists database index "
                             f"{dup % (M + 1)} more than once; each row must be a ranking "
                             "without repeats")

        for proto in protos:
            ok_cats, junk_cats = _PROTOCOL_CATS[proto]
            n_pos: np.ndarray = sum(count[cat] for cat in ok_cats)  # type: ignore[assignment]
            is_ok = np.isin(cats, ok_cats)
            is_junk = np.isin(cats, junk_cats)
            keep = is_ok | is_junk
            q_k, pos_k, ok_k, junk_k = qs[keep], pos[keep], is_ok[keep], is_junk[keep]
            start = np.searchsorted(q_k, q_k, side="left")  # first entry of each query's run
            cj: np.ndarray = np.cumsum(junk_k) - junk_k  # junk strictly before, over the whole chunk
            co: np.ndarray = np.cumsum(ok_k) - ok_k
            junk_before = cj - cj[start]
            ok_before = co - co[start]
            q_ok = q_k[ok_k]
            r_adj = (pos_k - junk_before)[ok_k].astype(np.float64)  # 0-based, junk removed
            j: np.ndarray = ok_before[ok_k].astype(np.float64)
            prec_before = np.where(r_adj == 0, 1.0, j / np.maximum(r_adj, 1.0))
            prec_after = (j + 1.0) / (r_adj + 1.0)
            ap_sum = np.bincount(q_ok, weights=(prec_before + prec_after) / 2.0, minlength=c)
            evaluated = n_pos > 0
            ap[proto][q0:q1][evaluated] = ap_sum[evaluated] / n_pos[evaluated]

            rank1 = r_adj + 1.0
            max_rank = np.zeros(c)
            np.maximum.at(max_rank, q_ok, rank1)
            kq = np.minimum(max_rank[:, None], kq_arr[None, :])  # (c, K), 0 if nothing ranked
            hits = (rank1[:, None] <= kq[q_ok]).astype(np.float64)  # (n_ok, K)
            n_hits = np.zeros((c, len(ks)))
            np.add.at(n_hits, q_ok, hits)
            prec = np.divide(n_hits, kq, out=np.zeros_like(n_hits), where=kq > 0)
            pr[proto][q0:q1][evaluated] = prec[evaluated]

    out: dict[str, dict[str, Any]] = {}
    for proto in protos:
        done = ~np.isnan(ap[proto])
        n_done = int(done.sum())
        if n_done == 0:
            logger.warning("revisited: no query has positives under the %s protocol", proto)
        mean_ap = float(ap[proto][done].mean()) if n_done else math.nan
        mp = {k: (float(pr[proto][done, i].mean()) if n_done else math.nan)
              for i, k in enumerate(ks)}
        out[proto] = {"map": mean_ap, "mp": mp, "ap": ap[proto],
                      "pr": {k: pr[proto][:, i] for i, k in enumerate(ks)}, "n_queries": n_done}
    logger.debug("revisited: %d queries, ranking length %d, mAP %s", n_q, n,
                 " ".join(f"{p} {out[p]['map']:.4f}" for p in protos))
    return out


def compute_ap(positive_ranks: Any, n_positives: int) -> float:
    """Average precision of one query by the trapezoid rule.

    Args:
        positive_ranks: (P,) 0-based ranks of the positives found in the ranking, after junk
            removal (any order; sorted here).
        n_positives: total number of positives of the query (>= P); those not ranked add 0.

    Returns:
        AP in [0, 1]: ``sum_j (p_before_j + p_after_j) / 2 / n_positives`` with, for the j-th
        positive at rank r, ``p_before = j / r`` (1 when r = 0) and ``p_after = (j + 1) / (r + 1)``.
    """
    ranks = np.sort(to_numpy(positive_ranks, "positive_ranks").reshape(-1)).astype(np.float64)
    n_positives = check_int(n_positives, "n_positives", minimum=1,
                            hint="; queries without positives have no AP and are skipped")
    if ranks.size > n_positives:
        raise ValueError(f"positive_ranks has {ranks.size} entries but n_positives is "
                         f"{n_positives}; it cannot exceed the number of positives")
    if ranks.size and (ranks[0] < 0 or np.any(ranks[1:] == ranks[:-1])):
        raise ValueError("positive_ranks must be distinct ranks >= 0")
    j = np.arange(ranks.size, dtype=np.float64)
    before = np.where(ranks == 0, 1.0, j / np.maximum(ranks, 1.0))
    after = (j + 1.0) / (ranks + 1.0)
    return float(((before + after) / 2.0).sum() / n_positives)


def format_table(results: Mapping[str, Mapping[str, Any]], *, title: str | None = None,
                 digits: int = 2) -> str:
    """The standard table of a :func:`revisited` result: one row per protocol (E, M, H), columns
    mAP and mP@k, in percent.

    Args:
        results: the dict :func:`revisited` returns (protocols it lacks are left out).
        title: optional first line (e.g. the dataset name).
        digits: decimals of the percentages.

    Returns:
        the table as a multi-line string (no trailing newline).
    """
    if not isinstance(results, Mapping):
        raise TypeError(f"results must be the dict revisited() returns, got {type(results).__name__}")
    protos = [p for p in PROTOCOLS if p in results]
    if not protos:
        raise ValueError("results has none of the protocols 'easy', 'medium', 'hard'; pass the "
                         "dict revisited() returns")
    ks = sorted({int(k) for p in protos for k in results[p].get("mp", {})})
    header = ["", "mAP"] + [f"mP@{k}" for k in ks]
    rows = []
    for p in protos:
        res = results[p]
        cells = [_pct(res["map"], digits)] + [_pct(res.get("mp", {}).get(k, math.nan), digits)
                                              for k in ks]
        rows.append([p.capitalize()] + cells)
    return _grid([header] + rows, title)


def _grid(rows: list[list[str]], title: str | None) -> str:
    """Rows of cells as aligned text: the first column left-aligned, the others right."""
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [title] if title else []
    lines += ["  ".join([r[0].ljust(width[0])] + [c.rjust(w) for c, w in zip(r[1:], width[1:])]).rstrip()
              for r in rows]
    return "\n".join(lines)


def format_comparison(settings: Mapping[str, Mapping[str, Any]], *, title: str | None = None,
                      digits: int = 2) -> str:
    """Several :func:`revisited` results side by side: one row per setting (e.g. plain search and
    a re-ranking), columns the mAP of each protocol (E, M, H), in percent.

    Args:
        settings: ``{name: the dict revisited() returns}``, in the order to print.
        title: optional first line.
        digits: decimals of the percentages.
    """
    if not isinstance(settings, Mapping) or not settings:
        raise ValueError("settings must be a non-empty {name: revisited() result} dict")
    protos = [p for p in PROTOCOLS if all(p in r for r in settings.values())]
    if not protos:
        raise ValueError("the settings share none of the protocols 'easy', 'medium', 'hard'")
    rows = [["", *(f"mAP {p.capitalize()}" for p in protos)]]
    rows += [[str(name), *(_pct(res[p]["map"], digits) for p in protos)] for name, res in settings.items()]
    return _grid(rows, title)


def _pct(value: Any, digits: int) -> str:
    v = float(value)
    return "-" if math.isnan(v) else f"{100.0 * v:.{digits}f}"


# ---------------------------------------------------------------------------------- recognition


def _labels_list(x: Any, name: str) -> list[Any]:
    if framework_of(x) in ("torch", "cupy"):
        x = to_numpy(x, name)
    if isinstance(x, np.ndarray):
        if x.ndim != 1:
            raise ValueError(f"{name} must be 1-d (one label per query), got shape {x.shape}")
        return x.tolist()
    if isinstance(x, (str, bytes)) or not isinstance(x, Sequence):
        raise TypeError(f"{name} must be a sequence of labels, got {type(x).__name__}")
    return list(x)


def _is_absent(label: Any, unknown: Any) -> bool:
    if label is None:
        return True
    try:
        return bool(label == unknown)
    except (TypeError, ValueError):
        return False


def accuracy(predictions: Any, truth: Any) -> float:
    """Fraction of queries whose predicted label equals the true one.

    Args:
        predictions: (Q,) predicted labels (an "unknown" prediction simply counts as wrong).
        truth: (Q,) true labels.

    Returns:
        accuracy in [0, 1] (NaN for Q = 0).
    """
    p = _labels_list(predictions, "predictions")
    t = _labels_list(truth, "truth")
    if len(p) != len(t):
        raise ValueError(f"predictions has {len(p)} labels but truth has {len(t)}; pass one per "
                         "query")
    if not p:
        return math.nan
    return sum(bool(a == b) for a, b in zip(p, t)) / len(p)


def gap(predictions: Any, confidences: Any, truth: Any, *, unknown: Any = "unknown") -> float:
    """Global Average Precision (micro AP) as in the Google Landmark Recognition challenge.

    Predictions are sorted by confidence, highest first (ties keep query order), and
    ``GAP = 1/M * sum_i P(i) rel(i)`` where ``P(i)`` is the precision over the first i
    predictions, ``rel(i)`` is 1 when prediction i is right, and M counts the queries that
    have a landmark.

    Args:
        predictions: (Q,) predicted labels; ``None`` or ``unknown`` means no prediction (the
            query is left out of the sorted list but still counts in M if it has a landmark).
        confidences: (Q,) finite scores of the predictions.
        truth: (Q,) true labels; ``None`` or ``unknown`` marks a query without a landmark (not
            counted in M; any prediction on it is wrong).
        unknown: the label that means "no prediction" / "no landmark".

    Returns:
        GAP in [0, 1] (NaN when no query has a landmark).
    """
    p = _labels_list(predictions, "predictions")
    t = _labels_list(truth, "truth")
    conf = to_numpy(confidences, "confidences").astype(np.float64).reshape(-1)
    if not (len(p) == len(t) == conf.size):
        raise ValueError(f"predictions, confidences and truth must have one entry per query, got "
                         f"{len(p)}, {conf.size} and {len(t)}")
    made = np.array([not _is_absent(a, unknown) for a in p], dtype=bool)
    if not np.all(np.isfinite(conf[made])):
        raise ValueError("confidences must be finite for every prediction made")
    has_landmark = [not _is_absent(b, unknown) for b in t]
    m = sum(has_landmark)
    if m == 0:
        logger.warning("gap: no query has a landmark; GAP is undefined")
        return math.nan
    order = [int(i) for i in np.argsort(-conf, kind="stable") if made[i]]
    correct = np.array([has_landmark[i] and bool(p[i] == t[i]) for i in order], dtype=np.float64)
    if correct.size == 0:
        return 0.0
    precision = np.cumsum(correct) / np.arange(1, correct.size + 1)
    return float((precision * correct).sum() / m)


def recognition_metrics(result: Any, truth: Any, *, unknown: Any = "unknown") -> dict[str, Any]:
    """Accuracy and GAP of a recognition result.

    Args:
        result: a :class:`pylandmark.retrieval.recognition.Recognition` (anything with ``labels`` and
            ``confidences`` of length Q).
        truth: (Q,) true labels.
        unknown: the label ``recognize`` used for rejected queries.

    Returns:
        ``{"accuracy": float, "gap": float, "n_queries": int, "n_unknown": int}``.
    """
    if not hasattr(result, "labels") or not hasattr(result, "confidences"):
        raise TypeError("result must be a Recognition (with .labels and .confidences), got "
                        f"{type(result).__name__}")
    labels = _labels_list(result.labels, "result.labels")
    return {
        "accuracy": accuracy(labels, truth),
        "gap": gap(labels, result.confidences, truth, unknown=unknown),
        "n_queries": len(labels),
        "n_unknown": sum(_is_absent(a, unknown) for a in labels),
    }


def confusion(predictions: Any, truth: Any) -> tuple[list[Any], np.ndarray]:
    """Confusion counts of a recognition run.

    Args:
        predictions: (Q,) predicted labels (may include labels absent from truth, e.g. "unknown").
        truth: (Q,) true labels.

    Returns:
        (classes, counts): the sorted union of labels (by their string form), and an int64
        (C, C) matrix where counts[i, j] is the number of queries of class classes[i] predicted
        as classes[j].
    """
    p = _labels_list(predictions, "predictions")
    t = _labels_list(truth, "truth")
    if len(p) != len(t):
        raise ValueError(f"predictions has {len(p)} labels but truth has {len(t)}; pass one per query")
    classes = sorted({*p, *t}, key=str)
    pos = {c: i for i, c in enumerate(classes)}
    counts = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for a, b in zip(t, p):
        counts[pos[a], pos[b]] += 1
    return classes, counts


#: most classes shown as a whole confusion table (text or page); beyond, the most confused pairs
CONFUSION_TABLE_MAX = 30
#: confused pairs listed when there are too many classes for a table
CONFUSED_PAIRS = 20


def confusion_summary(predictions: Any, truth: Any, *, table_max: int = CONFUSION_TABLE_MAX,
                      top: int = CONFUSED_PAIRS) -> dict[str, Any]:
    """Per-class counts of a recognition run in O(queries) memory, with the confusion table only
    when it is small: with C classes a (C, C) table needs C^2 cells (30,000 classes: 9e8), which
    neither memory nor a page holds.

    Returns:
        ``{"classes": the sorted union of labels, "per_class": {label: {"queries", "right"}}
        (true classes only), "confusion": the (C, C) counts of :func:`confusion` as lists, or None
        when C > table_max, "confused_pairs": the ``top`` most frequent [true, predicted, count]
        with true != predicted, most first (then by label)}``.
    """
    p = _labels_list(predictions, "predictions")
    t = _labels_list(truth, "truth")
    if len(p) != len(t):
        raise ValueError(f"predictions has {len(p)} labels but truth has {len(t)}; pass one per query")
    classes = sorted({*p, *t}, key=str)
    pairs: dict[tuple[Any, Any], int] = {}
    per_class: dict[str, dict[str, int]] = {}
    for a, b in zip(t, p):
        pairs[(a, b)] = pairs.get((a, b), 0) + 1
        row = per_class.setdefault(str(a), {"queries": 0, "right": 0})
        row["queries"] += 1
        row["right"] += int(a == b)
    confused = sorted(((a, b, n) for (a, b), n in pairs.items() if a != b), key=lambda e: (-e[2], str(e[0]), str(e[1])))
    table = None
    if len(classes) <= table_max:
        table = confusion(p, t)[1].tolist()
    return {"classes": classes, "per_class": per_class, "confusion": table,
            "confused_pairs": [[a, b, n] for a, b, n in confused[:top]]}


def format_confused_pairs(pairs: Sequence[Sequence[Any]]) -> str:
    """The most confused pairs as text lines: ``count  true -> predicted``."""
    return "\n".join(f"{n:>6}  {a} -> {b}" for a, b, n in pairs) or "(none)"


def format_confusion(classes: Sequence[Any], counts: np.ndarray) -> str:
    """A plain-text confusion table: one row per true class, one column per prediction, and
    each row's correct / total."""
    names = [str(c) for c in classes]
    width = max([len(n) for n in names] + [5])
    cell = max(len(str(int(counts.max()))) if counts.size else 1, 3)
    head = " " * width + " " + " ".join(n[:cell].rjust(cell) for n in names) + "   right"
    rows = [head]
    for i, name in enumerate(names):
        total = int(counts[i].sum())
        if total == 0:
            continue
        cells = " ".join(str(int(v)).rjust(cell) if v else ".".rjust(cell) for v in counts[i])
        rows.append(f"{name.rjust(width)} {cells}   {int(counts[i, i])}/{total}")
    return "\n".join(rows)
