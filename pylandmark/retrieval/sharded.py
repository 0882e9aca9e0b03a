"""Sharded search on torch.distributed: every rank holds one share of the rows of an index.

A search is collective (every rank calls it): the queries are broadcast from one rank (or
given to every rank alike), each rank searches its rows with :func:`pylandmark.search`, and the
per-rank top-k lists, (score, global row), are all-gathered and merged exactly
(:func:`~pylandmark.retrieval.topk.merge_topk_torch`). Every rank then holds the same answer,
equal to a single-process search of the whole index: same scores (a row's score does not depend
on which other rows share its search), same rows, ties to the lower global row.

Which rows a rank holds: for a manifest with as many shards as ranks, rank r holds shard r (the
shards of a distributed build); otherwise (a single index file, or other shard counts) the rows
are split into contiguous, balanced ranges, a range possibly spanning several shard files. Rows
stay memory-mapped on the CPU, or are copied to the rank's GPU (``device="cuda"``: cuda:LOCAL_RANK),
or are streamed through it from host memory when they do not fit (``resident=False``,
:func:`~pylandmark.retrieval.chunked.search_chunked`).

Traffic per search: the queries (Q x D values) from the source rank, and (Q x k) float32 scores
plus int64 rows from every rank to every rank: 12 Q k W bytes received per rank.

A re-ranking (``rerank=``, e.g. SuperGlobal's,
:func:`~pylandmark.retrieval.rerank.superglobal`) runs on every rank over the same search and
reads the top rows' descriptors from the ranks that hold them (:meth:`DistributedIndex.row_vectors`:
each distinct row's float16 bits once, about 2 D bytes per row received per rank), so the
re-ranked answer too equals the single-process one.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import runtime as du
from .._array import framework_of
from .._checks import check_int
from ..ops import CODE_BLOCK, METRICS, PreparedDatabase, build_codes
from ..ops import search as _search
from .format import is_manifest
from .index import Index, int64_array
from .manifest import ShardedIndex, load_shard, read_manifest
from .topk import merge_topk_torch

__all__ = ["DistributedIndex", "search", "recognize", "rank_rows"]

log = logging.getLogger(__name__)

Rerank = Callable[..., tuple[Any, Any]]  # rerank(queries, index, k) -> (scores, rows): superglobal's signature


@dataclass
class _Segment:
    """Rows [start, start + len) of the logical index held by this rank."""

    start: int
    matrix: Any  # (n, D): float16 numpy (memory map) or torch tensor on the device
    ids: np.ndarray
    labels: list | None
    paths: list | None
    codes: tuple | None = None  # (codes, meta) of a CPU matrix (pylandmark.prepare), built on first use

    def __len__(self) -> int:
        return int(self.matrix.shape[0])

    def database(self, metric: str) -> Any:
        """What the search reads: the matrix with its compact codes on the CPU, else the matrix."""
        if isinstance(self.matrix, torch.Tensor) and self.matrix.device.type != "cpu":
            return self.matrix
        if self.codes is None:
            self.codes = build_codes(self.matrix, metric)
        return PreparedDatabase(self.matrix, metric, *self.codes)


def rank_rows(counts: Sequence[int], world: int) -> list[int]:
    """Row bounds of the ranks for shards of ``counts`` rows: the shard boundaries when there is
    one shard per rank, else balanced contiguous ranges. Returns ``world + 1`` bounds."""
    if len(counts) == world:
        return [0, *np.cumsum(counts).astype(int).tolist()]
    return du.share_bounds(int(sum(counts)), world)


class DistributedIndex:
    """This rank's rows of an index, searched together with every other rank's.

    Every method that searches or looks rows up is collective: all ranks call it, in the same
    order, with the same ``k``. Without a process group (one process) it holds every row and
    behaves like the index itself.

    Build one with :meth:`open` (an index file or manifest), :meth:`from_index` (an index every
    rank has loaded) or :meth:`from_rows` (each rank's own descriptors).

    Attributes:
        dim, metric, metadata: of the whole index.
        bounds: (W + 1,) global row bounds; this rank holds ``[bounds[rank], bounds[rank + 1])``.
        labelled: whether the rows carry labels.
        row_dtype: what :meth:`row_vectors` returns: float16 (the stored bits), or float32 where
            some rank's rows (:meth:`from_rows`) are of another dtype.
    """

    def __init__(self, segments: Sequence[_Segment], bounds: Sequence[int], dim: int, metric: str,
                 metadata: dict | None = None, *, device: Any = None, resident: bool = True):
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.dim, self.metric, self.metadata = int(dim), metric, dict(metadata or {})
        self.bounds = [int(b) for b in bounds]
        self.rank, self.world = du.rank(), du.world_size()
        if len(self.bounds) != self.world + 1:
            raise ValueError(f"bounds must have world + 1 = {self.world + 1} entries, got {len(self.bounds)}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", du.local_rank() if du.is_distributed() else torch.cuda.current_device())
        self.resident = bool(resident)
        self._label_set: list | None = None  # label_set(), gathered once
        self.segments = [s for s in segments if len(s)]
        if self.device.type == "cuda" and self.resident:
            for s in self.segments:
                s.matrix = torch.from_numpy(np.ascontiguousarray(s.matrix)).to(self.device)
        flags = du.all_gather_objects((self._local_flags(), self._local_half()))
        seen = {f for f, _ in flags if f is not None}
        # what row_vectors returns: the stored float16 bits, or float32 (exact) where some rank's
        # rows (from_rows) are of another dtype
        self.row_dtype = np.dtype(np.float16 if all(half for _, half in flags) else np.float32)
        if len(seen) > 1:
            raise ValueError(f"the ranks' rows disagree on labels/paths/dim ({sorted(seen)}); "
                             "every shard must come from the same index")
        self.labelled: bool
        self.has_paths: bool
        self.labelled, self.has_paths, dim_seen = seen.pop() if seen else (False, False, self.dim)
        if dim_seen != self.dim:
            raise ValueError(f"rows have D={dim_seen} but the index says D={self.dim}")

    def _local_flags(self) -> tuple | None:
        if not self.segments:
            return None
        got = {(s.labels is not None, s.paths is not None, int(s.matrix.shape[1])) for s in self.segments}
        if len(got) > 1:
            raise ValueError(f"this rank's shards disagree on labels/paths/dim: {sorted(got)}")
        return got.pop()

    def _local_half(self) -> bool:
        return all(str(s.matrix.dtype).replace("torch.", "") == "float16" for s in self.segments)

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike, *, device: Any = None, resident: bool = True,
             verify: bool = True) -> DistributedIndex:
        """Opens this rank's rows of an index file or shard manifest (collective).

        Only the shard files holding this rank's rows are opened (memory-mapped; ``verify``
        checks their descriptor checksums, each rank its own shards; for a single file, rank 0
        checks the whole file); ``device="cuda"`` keeps them on this rank's GPU, and with
        ``resident=False`` they stay in host memory and are streamed through the GPU."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no index file at {path}")
        if not is_manifest(path):
            # one file: its checksum covers every row, so one rank reading it all is enough
            index = Index.load(path, mmap=True, verify=verify and du.rank() == 0)
            return cls.from_index(index, device=device, resident=resident)
        header = read_manifest(path)
        counts = [s["count"] for s in header["shards"]]
        bounds = rank_rows(counts, du.world_size())
        lo, hi = bounds[du.rank()], bounds[du.rank() + 1]
        segments, start = [], 0
        for i, (entry, n) in enumerate(zip(header["shards"], counts)):
            a, b = max(lo, start), min(hi, start + n)
            if a < b:
                shard = load_shard(path, header, i, verify=verify)
                segments.append(_slice(shard, a - start, b - start, a, entry["id_offset"]))
            start += n
        return cls(segments, bounds, header["dim"], header["metric"], header.get("metadata") or {},
                   device=device, resident=resident)

    @classmethod
    def from_index(cls, index: Any, *, device: Any = None, resident: bool = True) -> DistributedIndex:
        """This rank's range of an :class:`~pylandmark.Index` or
        :class:`~pylandmark.retrieval.manifest.ShardedIndex` that every rank has opened."""

        if isinstance(index, ShardedIndex):
            counts = [len(s) for s in index.shards]
            bounds = rank_rows(counts, du.world_size())
            lo, hi = bounds[du.rank()], bounds[du.rank() + 1]
            segments = []
            for shard, start, off in zip(index.shards, index.row_offsets[:-1], index.id_offsets):
                a, b = max(lo, int(start)), min(hi, int(start) + len(shard))
                if a < b:
                    segments.append(_slice(shard, a - int(start), b - int(start), a, int(off)))
        elif isinstance(index, Index):
            bounds = du.share_bounds(len(index))
            lo, hi = bounds[du.rank()], bounds[du.rank() + 1]
            segments = [_slice(index, lo, hi, lo, 0)]
        else:
            raise TypeError(f"index must be an Index or ShardedIndex, got {type(index).__name__}")
        return cls(segments, bounds, index.dim, index.metric, index.metadata, device=device, resident=resident)

    @classmethod
    def from_rows(cls, descriptors: Any, *, metric: str = "cosine", ids: Any = None, labels: Sequence | None = None,
                  paths: Sequence[str] | None = None, device: Any = None,
                  resident: bool = True) -> DistributedIndex:
        """Each rank passes its own (n_r, D) rows (collective): global rows follow rank order.
        The rows are searched as given (no normalisation; cosine normalises on the fly).

        Args:
            descriptors: (n_r, D) float16/bfloat16/float32 numpy array or CPU tensor.
            ids: (n_r,) int64 ids (default: the global row).
            labels, paths: n_r entries each, or None (on every rank alike).
        """
        if framework_of(descriptors) == "torch":
            descriptors = descriptors.detach().cpu().numpy()
        x = np.asarray(descriptors)
        if x.ndim != 2:
            raise ValueError(f"descriptors must be (n, D), got shape {x.shape}")
        counts = [int(c) for c in du.all_gather_objects(int(x.shape[0]))]
        dims = {int(d) for d, c in zip(du.all_gather_objects(int(x.shape[1])), counts)}
        if len(dims) != 1:
            raise ValueError(f"the ranks' descriptors have different D: {sorted(dims)}")
        bounds = [0, *np.cumsum(counts).astype(int).tolist()]
        lo = bounds[du.rank()]
        ids = np.arange(lo, lo + x.shape[0], dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
        if ids.shape != (x.shape[0],):
            raise ValueError(f"ids must have one entry per row ({x.shape[0]}), got shape {ids.shape}")
        for name, col in (("labels", labels), ("paths", paths)):
            if col is not None and len(col) != x.shape[0]:
                raise ValueError(f"{name} must have one entry per row ({x.shape[0]}), got {len(col)}")
        seg = _Segment(lo, x, ids, None if labels is None else list(labels), None if paths is None else list(paths))
        return cls([seg], bounds, dims.pop(), metric, {}, device=device, resident=resident)

    # ---- contents ---------------------------------------------------------------------------

    def __len__(self) -> int:
        """Rows of the whole index (all ranks)."""
        return self.bounds[-1]

    @property
    def local_rows(self) -> tuple[int, int]:
        """``(start, end)``: the global rows this rank holds."""
        return self.bounds[self.rank], self.bounds[self.rank + 1]

    def __repr__(self) -> str:
        lo, hi = self.local_rows
        return (f"DistributedIndex(dim={self.dim}, metric={self.metric!r}, count={len(self)}, "
                f"rank={self.rank} of {self.world} holding rows [{lo}, {hi}), device={str(self.device)!r})")

    # ---- search -----------------------------------------------------------------------------

    def search_rows(self, queries: Any, k: int = 5, *, src: int | None = 0,
                    rerank: Rerank | None = None) -> tuple[Any, Any]:
        """Collective exact search of the whole index.

        Args:
            queries: (Q, D) or (D,) float16/bfloat16/float32, numpy or torch, on rank ``src``
                (other ranks may pass None); with ``src=None`` every rank passes the same queries
                and nothing is broadcast.
            k: neighbours (>= 1).
            src: the rank whose queries are searched, or None.
            rerank: None, or a re-ranking ``rerank(queries, index, k) -> (scores, rows)`` that
                every rank runs on the (broadcast) queries as float32 numpy, with ``index`` this
                index's collective, exact search and rows (``search_rows``, ``row_vectors``):
                :func:`~pylandmark.retrieval.rerank.superglobal` or a ``functools.partial`` of
                it. Every rank computes the same bits: ``superglobal`` of the numpy queries in
                one process.

        Returns:
            scores (Q, k) float32, best first, and global rows (Q, k) int64 (-1 / -inf padding
            when k exceeds the rows), identical on every rank; numpy unless this rank passed
            torch queries (then tensors on this rank's device). 1-d queries give 1-d results.
        """
        k = check_int(k, "k", minimum=1)
        if len(self) == 0:
            raise ValueError("the index is empty; add descriptors before searching")
        fw = framework_of(queries) if queries is not None else "numpy"
        q = self._queries(queries, src)
        one = q.dim() == 1
        if one:
            q = q[None]
        if q.dim() != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}) or ({self.dim},), got shape {tuple(q.shape)}")
        if rerank is None:
            scores, rows = self._global_topk(q, k)
        else:
            s, r = rerank(q.float().cpu().numpy(), _Replicated(self), k)
            scores, rows = torch.as_tensor(np.asarray(s)), torch.as_tensor(np.asarray(r))
        if one:
            scores, rows = scores[0], rows[0]
        if fw == "torch":
            out_dev = queries.device if queries is not None else self.device
            return scores.to(out_dev), rows.to(out_dev)
        return scores.cpu().numpy(), rows.cpu().numpy()

    def search(self, queries: Any, k: int = 5, *, src: int | None = 0,
               rerank: Rerank | None = None) -> tuple[Any, Any]:
        """Like :meth:`search_rows`, with ids instead of rows (-1 for padding)."""
        scores, rows = self.search_rows(queries, k, src=src, rerank=rerank)
        r = rows.cpu().numpy() if framework_of(rows) == "torch" else rows
        ids = self.lookup_ids(r)
        if framework_of(rows) == "torch":
            return scores, torch.as_tensor(ids, device=rows.device)
        return scores, ids

    def _queries(self, queries: Any, src: int | None) -> torch.Tensor:
        def as_tensor(x: Any) -> torch.Tensor:
            if x is None:
                raise ValueError("queries is None on a rank that must provide them")
            if framework_of(x) == "torch":
                return x.detach()
            arr = np.asarray(x)
            if arr.dtype.name == "bfloat16":
                return torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
            return torch.from_numpy(np.ascontiguousarray(arr))

        if src is None or du.world_size() == 1:
            return as_tensor(queries)
        return du.broadcast_tensor(as_tensor(queries) if du.rank() == src else None, src)

    def _global_topk(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, k) float32 scores and global rows of the whole index: every rank's top k, merged."""
        scores, rows = self._local_topk(q, k)
        if du.world_size() > 1 and q.shape[0]:
            dev = du.comm_device()
            s_all = [torch.empty_like(scores, device=dev) for _ in range(du.world_size())]
            r_all = [torch.empty_like(rows, device=dev) for _ in range(du.world_size())]
            torch.distributed.all_gather(s_all, scores.to(dev).contiguous())
            torch.distributed.all_gather(r_all, rows.to(dev).contiguous())
            scores, rows = merge_topk_torch(torch.cat(s_all, 1), torch.cat(r_all, 1), k)
        return scores, rows

    def _local_topk(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, k) float32 scores and global rows of this rank's rows, on the search device."""
        from .chunked import search_chunked

        dev = self.device
        q = q.to(dev)
        parts_s, parts_r = [], []
        for seg in self.segments:
            if dev.type == "cpu" or self.resident:
                s, r = _search(q, seg.database(self.metric), k=k, metric=self.metric)
            else:
                s, r = search_chunked(q, seg.matrix, k=k, metric=self.metric, device=dev)
            parts_s.append(s)
            parts_r.append(r.where(r < 0, r + seg.start))
        if not parts_s:
            return (torch.full((q.shape[0], k), -torch.inf, dtype=torch.float32, device=dev),
                    torch.full((q.shape[0], k), -1, dtype=torch.int64, device=dev))
        if len(parts_s) == 1:
            return parts_s[0], parts_r[0]
        return merge_topk_torch(torch.cat(parts_s, 1), torch.cat(parts_r, 1), k)

    # ---- row contents -----------------------------------------------------------------------

    def _owned(self, rows: np.ndarray) -> list[tuple[int, _Segment, int]]:
        """(position in rows, segment, row within it) for the rows this rank holds."""
        out = []
        flat = rows.reshape(-1)
        for seg in self.segments:
            sel = np.flatnonzero((flat >= seg.start) & (flat < seg.start + len(seg)))
            out += [(int(i), seg, int(flat[i] - seg.start)) for i in sel]
        return out

    def row_vectors(self, rows: Any) -> np.ndarray:
        """The stored rows at global positions in [0, N), from the ranks holding them (collective:
        every rank passes the same rows and gets the same array): rows' shape + (D,), of
        :attr:`row_dtype` (float16: the stored bits).

        Each distinct row travels once, from the rank holding it, as raw bytes: one all-gather
        of every rank's share of the distinct rows, padded to the largest share (bit-exact on
        gloo and NCCL, which lack some half-precision collectives). For U distinct rows spread
        evenly that is about U x D x 2 bytes received per rank (at worst, all on one rank,
        W x U x D x 2)."""
        rows = int64_array(rows, "rows", below=len(self))
        uniq, inverse = np.unique(rows, return_inverse=True)
        cuts = np.searchsorted(uniq, self.bounds)  # rank r holds uniq[cuts[r]:cuts[r + 1]]
        mine = self._stored_rows(uniq[cuts[self.rank]:cuts[self.rank + 1]])
        got = du.all_gather_rows(torch.from_numpy(mine.view(np.uint8)).to(du.comm_device()), np.diff(cuts).tolist())
        return got.cpu().numpy().view(self.row_dtype)[inverse.reshape(-1)].reshape(*rows.shape, self.dim)

    def _stored_rows(self, rows: np.ndarray) -> np.ndarray:
        """(c, D) rows of :attr:`row_dtype` for global ``rows`` that this rank holds."""
        out = np.empty((len(rows), self.dim), self.row_dtype)
        for seg in self.segments:
            sel = (rows >= seg.start) & (rows < seg.start + len(seg))
            local = rows[sel] - seg.start
            if isinstance(seg.matrix, torch.Tensor):
                out[sel] = seg.matrix[torch.from_numpy(local).to(seg.matrix.device)].float().cpu().numpy()
            elif sel.any():
                out[sel] = seg.matrix[local]
        return out

    def lookup_ids(self, rows: Any) -> np.ndarray:
        """ids of global ``rows`` (any shape, -1 -> -1), from the ranks that hold them (collective;
        every rank passes the same rows)."""
        rows = np.asarray(rows, np.int64)
        ids = np.zeros(rows.size, np.int64)
        for i, seg, j in self._owned(rows):
            ids[i] = seg.ids[j] + 1  # + 1: a zero marks "not mine" in the sum below
        if du.world_size() > 1 and rows.size:
            t = torch.from_numpy(ids).to(du.comm_device())
            torch.distributed.all_reduce(t)
            ids = t.cpu().numpy()
        return (ids - 1).reshape(rows.shape)

    def lookup(self, rows: Any) -> dict[str, Any]:
        """ids, labels and paths of global ``rows`` (collective; every rank passes the same rows).

        Returns ``{"ids": int64 array like rows, "labels": object array like rows or None,
        "paths": object array like rows or None}`` (-1 / None where rows is -1)."""
        rows = np.asarray(rows, np.int64)
        ids = self.lookup_ids(rows)
        mine = {}
        for i, seg, j in self._owned(rows):
            mine[i] = (None if seg.labels is None else seg.labels[j], None if seg.paths is None else seg.paths[j])
        merged: dict[int, tuple] = {}
        for part in du.all_gather_objects(mine):
            merged.update(part)
        labels = np.full(rows.size, None, dtype=object)
        paths = np.full(rows.size, None, dtype=object)
        for i, (lab, p) in merged.items():
            labels[i], paths[i] = lab, p
        return {"ids": ids, "labels": labels.reshape(rows.shape) if self.labelled else None,
                "paths": paths.reshape(rows.shape) if self.has_paths else None}

    def label_set(self) -> list:
        """The distinct labels of the whole index (collective the first time; the rows never
        change, so later calls return the same list without gathering), sorted by their string
        form."""
        if self._label_set is None:
            mine = set()
            for seg in self.segments:
                if seg.labels is not None:
                    mine.update(seg.labels)
            out = set()
            for part in du.all_gather_objects(mine):
                out |= part
            self._label_set = sorted(out, key=str)
        return list(self._label_set)

    def recognize(self, queries: Any, k: int = 5, vote: str = "majority", min_score: float | None = None, *,
                  src: int | None = 0, unknown: Any = "unknown", rerank: Rerank | None = None):
        """Collective :func:`pylandmark.recognize` over the whole index: the sharded top-k
        (re-ranked by ``rerank``, see :meth:`search_rows`), then the vote (see
        :mod:`pylandmark.retrieval.recognition`) on every rank.

        Returns a :class:`~pylandmark.retrieval.recognition.Recognition` whose ``neighbors``
        are global rows and ``neighbor_ids`` their ids, identical on every rank."""
        from .recognition import _equal_to
        from .recognition import recognize as _recognize

        if not self.labelled:
            raise ValueError("this index has no labels; build it with --labels-from-folders or add labels")
        labels = self.label_set()
        table = np.empty(len(labels), dtype=object)
        table[:] = labels
        if np.any(_equal_to(table, unknown)):
            raise ValueError(f"unknown={unknown!r} is also a database label; pass another unknown=")
        scores, rows = self.search_rows(queries, k, src=src, rerank=rerank)
        scores = np.atleast_2d(np.asarray(scores.cpu() if framework_of(scores) == "torch" else scores))
        rows = np.atleast_2d(np.asarray(rows.cpu() if framework_of(rows) == "torch" else rows))
        uniq = np.unique(rows[rows >= 0])
        found = self.lookup(uniq)
        compact = np.where(rows >= 0, np.searchsorted(uniq, np.maximum(rows, 0)), -1)
        res = _recognize(_Found(scores, compact, found["labels"], found["ids"]), None, k=k, vote=vote,
                         min_score=min_score, unknown=unknown)
        res.neighbors = rows
        return res


class _Replicated:
    """A DistributedIndex as a re-ranking sees it once every rank holds the same queries: its
    searches broadcast nothing (``src=None``); its rows and length are the index's."""

    def __init__(self, index: DistributedIndex):
        self._index, self.metric, self.dim = index, index.metric, index.dim

    def __len__(self) -> int:
        return len(self._index)

    def search_rows(self, queries: Any, k: int) -> tuple[Any, Any]:
        return self._index.search_rows(queries, k, src=None)

    def row_vectors(self, rows: Any) -> np.ndarray:
        return self._index.row_vectors(rows)


class _Found:
    """A finished search dressed as a labelled index, so that recognition's vote runs unchanged
    on the rows the sharded search found (compact rows 0..u-1 into their labels)."""

    def __init__(self, scores: np.ndarray, rows: np.ndarray, labels: np.ndarray, ids: np.ndarray):
        self._scores, self._rows = scores, rows
        self.labels, self.ids = labels, ids
        self.descriptors = None

    def search_rows(self, _queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._scores, self._rows

    search = search_rows


def _slice(index: Index, a: int, b: int, start: int, id_offset: int) -> _Segment:
    """Rows [a, b) of a loaded index (a view of its memory map) as a segment at global ``start``."""
    cols = {}
    for name in ("labels", "paths"):
        col = getattr(index, f"_{name}")
        cols[name] = None if col is None or len(index) == 0 else list(col[a:b])
    codes = None
    entry = index._codes
    if entry is not None and entry[0] is index._matrix and a % CODE_BLOCK == 0:
        blocks = slice(a // CODE_BLOCK, -(-b // CODE_BLOCK))  # whole blocks: the scan masks rows past b
        codes = (entry[1][blocks], entry[2][blocks])
    return _Segment(start, index._matrix[a:b], index._ids[a:b].astype(np.int64) + int(id_offset),
                    cols["labels"], cols["paths"], codes)


def search(index: DistributedIndex, queries: Any, k: int = 5, *, src: int | None = 0,
           rerank: Rerank | None = None) -> tuple[Any, Any]:
    """``index.search(queries, k, src=src, rerank=rerank)``: (Q, k) scores and ids on every rank
    (collective)."""
    return index.search(queries, k, src=src, rerank=rerank)


def recognize(index: DistributedIndex, queries: Any, k: int = 5, vote: str = "majority",
              min_score: float | None = None, *, src: int | None = 0, rerank: Rerank | None = None):
    """``index.recognize(...)``: a Recognition of the queries on every rank (collective)."""
    return index.recognize(queries, k, vote, min_score, src=src, rerank=rerank)
