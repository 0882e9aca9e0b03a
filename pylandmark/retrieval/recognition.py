"""Landmark recognition by voting over the top-k retrieved database images.

``recognize`` searches a labelled database and lets the k nearest neighbours of each query vote:

- ``vote="majority"``: one vote per neighbour; ties between labels go to the larger summed
  similarity, then to the label of the nearer neighbour. Confidence = winning votes / voters.
- ``vote="weighted"``: each neighbour votes with its similarity; the label with the largest
  summed similarity wins (ties: more votes, then the nearer neighbour). Confidence = winning
  summed similarity / voters.

With ``min_score``, a query whose best similarity is below it is answered ``unknown``.
"""
from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .._checks import check_int, framework_of, to_numpy
from ..ops import METRICS, search

logger = logging.getLogger(__name__)

__all__ = ["recognize", "Recognition", "LabelledIndex", "VOTES"]

VOTES = ("majority", "weighted")
_VOTE_CELLS = 1 << 22  # (chunk, k, k) comparison cells per chunk of queries


@runtime_checkable
class LabelledIndex(Protocol):
    """What ``recognize`` needs from an index: descriptors, one label per row, and top-k search.

    ``search(queries, k)`` returns ``(scores, indices)``, each (Q, k), best first, -1 for
    padding, as :func:`pylandmark.search` does. If the index also has
    ``search_rows(queries, k)`` (row positions, when ``search`` returns ids that may differ from
    them) and ``ids`` (one id per row), ``recognize`` uses the rows to look up labels and reports
    the ids too.
    """

    descriptors: Any
    labels: Any

    def search(self, queries: Any, k: int) -> tuple[Any, Any]: ...


@dataclass
class Recognition:
    """The answer of :func:`recognize` for Q queries and k neighbours.

    Attributes:
        labels: (Q,) predicted labels (database label dtype, widened or object where the
            ``unknown`` label does not fit it).
        confidences: (Q,) float64 confidence of each prediction (see :func:`recognize`).
        known: (Q,) bool, False where the query was rejected as ``unknown``.
        neighbors: (Q, k) int64 database rows that voted (positions into the labels / the
            descriptors), best first (-1 pads when k > N).
        scores: (Q, k) float32 similarities of those rows (-inf on padding).
        neighbor_labels: (Q, k) labels of those rows (None on padding).
        votes: (Q,) number of neighbours that voted for the predicted label.
        neighbor_ids: (Q, k) int64 ids of the neighbours when the index has ``ids`` and
            ``search_rows`` (-1 on padding), else None.
    """

    labels: np.ndarray
    confidences: np.ndarray
    known: np.ndarray
    neighbors: np.ndarray
    scores: np.ndarray
    neighbor_labels: np.ndarray
    votes: np.ndarray
    neighbor_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


def _labels_array(labels: Any, name: str) -> np.ndarray:
    if labels is None:
        raise ValueError(f"{name} is required: one label per database row")
    fw = framework_of(labels)
    if fw in ("torch", "cupy"):
        arr = to_numpy(labels, name)
    elif isinstance(labels, np.ndarray):
        arr = labels
    elif isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise TypeError(f"{name} must be a sequence or 1-d array of labels, got "
                        f"{type(labels).__name__}")
    else:
        arr = np.empty(len(labels), dtype=object)
        arr[:] = list(labels)
        # keep a plain dtype for homogeneous ints or strs
        if len(labels) and all(isinstance(v, str) for v in labels):
            arr = np.asarray(list(labels), dtype=str)
        elif len(labels) and all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                 for v in labels):
            arr = np.asarray(list(labels), dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-d (one label per database row), got shape {arr.shape}")
    return arr


def _factorize(values: np.ndarray) -> np.ndarray:
    """Integer codes, equal exactly where the labels are equal."""
    try:
        _, codes = np.unique(values, return_inverse=True)
        return codes.reshape(values.shape)
    except TypeError:  # mixed, unorderable objects
        table: dict[Any, int] = {}
        flat = [table.setdefault(v, len(table)) for v in values.reshape(-1).tolist()]
        return np.asarray(flat, dtype=np.int64).reshape(values.shape)


def _vote(codes: np.ndarray, scores: np.ndarray, valid: np.ndarray, weighted: bool
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Winning column per row of (c, k) codes/scores. Returns (column, votes, summed score)."""
    c, k = codes.shape
    same = (codes[:, :, None] == codes[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    count = same.sum(axis=2)  # (c, k): votes of the label at column i
    s = np.where(valid, scores, 0.0).astype(np.float64)
    total = (same * s[:, None, :]).sum(axis=2)  # summed similarity of the label at column i
    cand = valid.copy()
    first, second = (total, count) if weighted else (count, total)
    for key in (first, second):
        best = np.where(cand, key, -np.inf).max(axis=1, keepdims=True)
        cand &= key == best
    # the nearer neighbour: the first remaining column is the first occurrence of its label
    col = np.argmax(cand, axis=1)
    rows = np.arange(c)
    return col, count[rows, col], total[rows, col]


def _result_labels(winners: np.ndarray, unknown_mask: np.ndarray, unknown: Any) -> np.ndarray:
    out = winners
    if not unknown_mask.any():
        return out
    u = np.asarray(unknown)
    if out.dtype.kind == "U" and u.dtype.kind == "U":
        out = out.astype(np.result_type(out.dtype, u.dtype))
    elif out.dtype.kind in "iu" and u.dtype.kind in "iu" and np.can_cast(u, out.dtype):
        out = out.copy()
    else:
        out = out.astype(object)
    out[unknown_mask] = unknown
    return out


def recognize(index_or_db: Any, queries: Any, k: int = 5, vote: str = "majority",
              min_score: float | None = None, *, labels: Any = None, metric: str = "cosine",
              unknown: Any = "unknown") -> Recognition:
    """Recognise queries by voting among their k nearest labelled database images.

    Args:
        index_or_db: a labelled index (:class:`LabelledIndex`: ``.labels`` and
            ``.search(queries, k)``), or a database (N, D) of descriptors (numpy or torch) with
            ``labels=``, or a tuple ``(db, labels)``.
        queries: (Q, D) or (D,) query descriptors (a single query gives Q = 1).
        k: neighbours that vote (>= 1).
        vote: "majority" (one vote each; ties: larger summed similarity, then nearer
            neighbour) or "weighted" (votes weighted by similarity; ties: more votes, then nearer
            neighbour).
        min_score: answer ``unknown`` when the best similarity is below it (None: never).
        labels: (N,) database labels (str or int). Required for a plain database; overrides an
            index's own labels.
        metric: "cosine" or "ip", for a plain database (an index searches its own way).
        unknown: the label of rejected queries; must not be a database label.

    Returns:
        a :class:`Recognition`: predicted labels, confidences (majority: winning votes / voters;
        weighted: winning summed similarity / voters), the known mask, and the neighbours that
        voted with their similarities and labels.
    """
    k = check_int(k, "k", minimum=1)
    if vote not in VOTES:
        raise ValueError(f"vote must be one of {VOTES}, got {vote!r}")
    if min_score is not None:
        try:
            min_score = float(min_score)
        except (TypeError, ValueError) as err:
            raise TypeError(f"min_score must be a number or None, got {type(min_score).__name__}") from err
        if np.isnan(min_score):
            raise ValueError("min_score must not be NaN; pass None to accept every query")

    if isinstance(index_or_db, tuple):
        if len(index_or_db) != 2:
            raise ValueError("index_or_db as a tuple must be (db, labels)")
        if labels is not None:
            raise ValueError("labels given twice: in the (db, labels) tuple and as labels=")
        index_or_db, labels = index_or_db
    row_ids = None
    if framework_of(index_or_db) == "other" and callable(getattr(index_or_db, "search", None)):
        lab = labels if labels is not None else getattr(index_or_db, "labels", None)
        if lab is None:
            raise ValueError("the index has no labels; pass labels= with one label per row")
        lab = _labels_array(lab, "labels")
        search_rows = getattr(index_or_db, "search_rows", None)
        if callable(search_rows):
            q_scores, q_idx = search_rows(queries, k)
            row_ids = getattr(index_or_db, "ids", None)
        else:
            q_scores, q_idx = index_or_db.search(queries, k)
        n_rows = None
    else:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if framework_of(index_or_db) == "other":
            raise TypeError("index_or_db must be an index with .search(queries, k) and .labels, "
                            "a (N, D) numpy array / torch tensor with labels=, or a (db, labels) "
                            f"tuple; got {type(index_or_db).__name__}")
        if labels is None:
            raise ValueError("labels is required with a plain database: pass labels= with one "
                             "label per database row (or use an index that carries labels)")
        lab = _labels_array(labels, "labels")
        n_rows = int(index_or_db.shape[0]) if index_or_db.ndim >= 1 else 0
        if len(lab) != n_rows:
            raise ValueError(f"labels has {len(lab)} entries but the database has {n_rows} rows")
        q_scores, q_idx = search(queries, index_or_db, k=k, metric=metric)

    scores = to_numpy(q_scores, "scores").astype(np.float32, copy=False)
    idx = to_numpy(q_idx, "indices").astype(np.int64, copy=False)
    if scores.ndim == 1:
        scores, idx = scores[None, :], idx[None, :]
    if scores.ndim != 2 or scores.shape != idx.shape:
        raise ValueError(f"search returned scores {scores.shape} and indices {idx.shape}; "
                         "expected two (Q, k) arrays")
    n_lab = len(lab)
    if idx.size and (idx.max() >= n_lab or idx.min() < -1):
        raise ValueError(f"search returned row indices outside [0, {n_lab}) but there are "
                         f"{n_lab} labels; labels must have one entry per database row")
    if n_lab == 0:
        raise ValueError("labels is empty; the database needs one label per row")
    if np.any(_equal_to(lab, unknown)):
        raise ValueError(f"unknown={unknown!r} is also a database label; pass another unknown=")

    valid = idx >= 0
    nb_labels = lab[np.where(valid, idx, 0)]
    if not valid.all():
        nb_labels = nb_labels.astype(object)
        nb_labels[~valid] = None
    q, kk = idx.shape
    col = np.zeros(q, dtype=np.int64)
    votes = np.zeros(q, dtype=np.int64)
    total = np.zeros(q, dtype=np.float64)
    if q and kk:
        codes = _neighbour_codes(lab, idx, valid)
        chunk = max(1, _VOTE_CELLS // (kk * kk))
        for r0 in range(0, q, chunk):
            r1 = min(q, r0 + chunk)
            c_, v_, t_ = _vote(codes[r0:r1], scores[r0:r1], valid[r0:r1], vote == "weighted")
            col[r0:r1], votes[r0:r1], total[r0:r1] = c_, v_, t_
    n_voters = valid.sum(axis=1)
    if vote == "majority":
        confidences = np.divide(votes, n_voters, out=np.zeros(q), where=n_voters > 0)
    else:
        confidences = np.divide(total, n_voters, out=np.zeros(q), where=n_voters > 0)
    winners = lab[idx[np.arange(q), col].clip(min=0)]
    best = scores[:, 0] if kk else np.full(q, -np.inf, dtype=np.float32)
    unknown_mask = (n_voters == 0) | (best < min_score if min_score is not None else False)
    out_labels = _result_labels(winners, np.asarray(unknown_mask, dtype=bool), unknown)
    if n_rows is not None and k > n_rows:
        logger.debug("recognize: k=%d exceeds the %d database rows; %d vote", k, n_rows, n_rows)
    neighbor_ids = None
    if row_ids is not None:
        row_ids = to_numpy(row_ids, "ids").astype(np.int64, copy=False).reshape(-1)
        if row_ids.shape[0] != n_lab:
            raise ValueError(f"the index has {row_ids.shape[0]} ids but {n_lab} labels")
        neighbor_ids = np.where(valid, row_ids[np.where(valid, idx, 0)], -1)
    return Recognition(labels=out_labels, confidences=confidences,
                       known=~np.asarray(unknown_mask, dtype=bool), neighbors=idx, scores=scores,
                       neighbor_labels=nb_labels, votes=votes, neighbor_ids=neighbor_ids)


def _neighbour_codes(lab: np.ndarray, idx: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Label codes of the neighbours (-1 on padding), without touching unused labels."""
    codes = np.full(idx.shape, -1, dtype=np.int64)
    if valid.any():
        codes[valid] = _factorize(lab[idx[valid]])
    return codes


def _equal_to(lab: np.ndarray, value: Any) -> np.ndarray:
    """Elementwise ``lab == value`` that never matches a str against a number."""
    is_str = isinstance(value, (str, np.str_))
    if lab.dtype.kind == "U":
        return lab == value if is_str else np.zeros(lab.shape, dtype=bool)
    if lab.dtype.kind in "iub":
        if is_str or not isinstance(value, numbers.Number):
            return np.zeros(lab.shape, dtype=bool)
        return lab == value
    try:  # object labels: one set lookup decides the common case (hashable, not present)
        if value not in set(lab.tolist()):
            return np.zeros(lab.shape, dtype=bool)
    except TypeError:
        pass
    out = np.zeros(lab.shape, dtype=bool)
    for i, v in enumerate(lab.tolist()):
        if isinstance(v, str) == is_str:
            try:
                out[i] = bool(v == value)
            except (TypeError, ValueError):
                pass
    return out
