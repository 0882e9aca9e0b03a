"""Exact merge of top-k candidate lists (from shards, ranks or db chunks) into one top-k.

Every list is an exact top-k of its own rows under the order "higher score first, then lower
row"; the rows are global (shard offset already added), -1 marking padding. The merged list is
then the exact top-k of the union under the same order, which is the order a single
:func:`pylandmark.search` over all the rows gives (ties to the lower row).
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["merge_topk", "merge_topk_torch", "empty_topk"]


def empty_topk(q: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, k) float32 -inf scores and int64 -1 rows: the answer of a search over no rows."""
    return np.full((q, k), -np.inf, np.float32), np.full((q, k), -1, np.int64)


def merge_topk(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best k of (Q, M) candidates.

    Args:
        scores: (Q, M) float32 candidate scores.
        rows: (Q, M) int64 global rows, -1 for padding (its score is ignored).
        k: how many to keep (M < k pads with -inf / -1).

    Returns:
        (Q, k) float32 scores, best first, and (Q, k) int64 rows; equal scores are ordered by
        the lower row, padding comes last.
    """
    scores = np.asarray(scores, np.float32)
    rows = np.asarray(rows, np.int64)
    if scores.shape != rows.shape or scores.ndim != 2:
        raise ValueError(f"scores and rows must be two (Q, M) arrays, got {scores.shape} and {rows.shape}")
    q, m = scores.shape
    valid = rows >= 0
    # lexsort keys, last one primary: valid first, then higher score, then lower row
    order = np.lexsort((np.where(valid, rows, np.iinfo(np.int64).max),
                        np.where(valid, -scores, np.inf), ~valid), axis=-1)[:, :k]
    out_s, out_r = empty_topk(q, k)
    take = min(k, m)
    got_r = np.take_along_axis(rows, order, axis=1)
    got_s = np.take_along_axis(scores, order, axis=1)
    ok = got_r >= 0
    out_s[:, :take] = np.where(ok, got_s, -np.inf)
    out_r[:, :take] = np.where(ok, got_r, -1)
    return out_s, out_r


def merge_topk_torch(scores: Any, rows: Any, k: int) -> tuple[Any, Any]:
    """:func:`merge_topk` for torch tensors on any device (the GPU paths merge where the
    candidates are, without a copy to the host). Same arguments, same result."""
    import torch

    if scores.shape != rows.shape or scores.dim() != 2:
        raise ValueError(f"scores and rows must be two (Q, M) tensors, got {tuple(scores.shape)} and "
                         f"{tuple(rows.shape)}")
    q, m = scores.shape
    valid = rows >= 0
    big = torch.iinfo(torch.int64).max
    key_rows = torch.where(valid, rows, torch.full_like(rows, big))
    key_scores = torch.where(valid, scores.float(), torch.full_like(scores, -torch.inf, dtype=torch.float32))
    # two stable sorts: by row, then by score (descending); equal scores keep the row order,
    # and padding (-inf, largest row key) sorts after every real candidate
    by_row = torch.sort(key_rows, dim=1, stable=True).indices
    s1 = torch.gather(key_scores, 1, by_row)
    by_score = torch.sort(s1, dim=1, descending=True, stable=True).indices[:, :k]
    order = torch.gather(by_row, 1, by_score)
    got_r = torch.gather(rows, 1, order)
    got_s = torch.gather(key_scores, 1, order)
    ok = got_r >= 0
    out_s = torch.full((q, k), -torch.inf, dtype=torch.float32, device=scores.device)
    out_r = torch.full((q, k), -1, dtype=torch.int64, device=rows.device)
    take = min(k, m)
    out_s[:, :take] = torch.where(ok, got_s, torch.full_like(got_s, -torch.inf))
    out_r[:, :take] = torch.where(ok, got_r, torch.full_like(got_r, -1))
    return out_s, out_r
