"""Sharded indexes: a small manifest file plus one ordinary index file per shard.

A distributed build (``torchrun ... -m pylandmark index build FOLDER --out X``) writes each
rank's rows as an index file of its own in the folder ``X.shards/`` and, once every shard is
on disk, the manifest at ``X``. :meth:`pylandmark.Index.load` opens a manifest as one
:class:`ShardedIndex`: its rows are the shards' rows in manifest order, each shard's stored ids
shifted by the shard's ``id_offset``.

Manifest layout (little endian): the 24-byte prefix of an index file with the magic
``b"PLMSHARD"`` (magic, format version, header length, CRC-32 of the header, 0), then the
header, UTF-8 JSON::

    {"dim": D, "metric": "cosine", "count": N, "metadata": {...},
     "shards": [{"file": "<name>.plmi", "count": n, "id_offset": o, "header_crc": c}, ...]}

``file`` is a plain file name inside ``X.shards/`` (no folders: a manifest cannot point
anywhere else); ``header_crc`` is the CRC-32 of that shard's own header, so a shard replaced
after the manifest was written is detected on load. The manifest is written last and
atomically, so a build that dies leaves the previous index (or none) at ``X``, never a manifest
naming missing or partial shards.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .._array import framework_of
from .._files import replaced_atomically
from .._version import __version__
from ..ops import METRICS
from .format import (
    MANIFEST_MAGIC,
    MANIFEST_VERSION,
    PREFIX,
    IndexFormatError,
    header_crc,
    parse_json,
    read_prefix,
    register_format,
)
from .index import MAGIC, Index, IndexLike, ReadOnlyList, int64_array, with_ids
from .topk import merge_topk, merge_topk_torch

__all__ = ["ShardedIndex", "ShardEntry", "write_manifest", "read_manifest", "load_manifest", "load_shard", "shard_dir",
           "shard_header_crc", "remove_stale_shards", "MANIFEST_VERSION"]

log = logging.getLogger(__name__)

_MAX_MANIFEST = 64 << 20  # bytes of JSON; a million shards fit in far less
_MAX_SHARDS = 1 << 20
_MAX_ID = (1 << 62)
SHARD_FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.plmi")
# the names pylandmark's own jobs give shards (only these are ever deleted)
OWN_SHARD_RE = re.compile(r"(?:[0-9a-f]{16}-\d{5}-of-\d{5}|base-[0-9a-f]{8})\.plmi")


def shard_dir(path: str | os.PathLike) -> Path:
    """Where the shards of the manifest at ``path`` live: ``<path>.shards/`` next to it."""
    p = Path(path)
    return p.parent / f"{p.name}.shards"


class ShardEntry(dict):
    """One shard of a manifest: ``file``, ``count``, ``id_offset``, ``header_crc``."""

    def __init__(self, file: str, count: int, id_offset: int, header_crc: int):
        super().__init__(file=str(file), count=int(count), id_offset=int(id_offset), header_crc=int(header_crc))


def remove_stale_shards(path: str | os.PathLike, keep: set[str] | frozenset = frozenset()) -> int:
    """Deletes shard files in :func:`shard_dir` ``(path)`` that pylandmark's jobs wrote (by their
    names) and that ``keep`` does not name: shards of earlier builds, once the manifest that
    replaced theirs is in place. Removes the folder when it ends up empty. Returns how many."""
    folder = shard_dir(path)
    if not folder.is_dir():
        return 0
    removed = 0
    for f in folder.iterdir():
        if f.name not in keep and OWN_SHARD_RE.fullmatch(f.name) and f.is_file() and not f.is_symlink():
            f.unlink(missing_ok=True)
            removed += 1
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty: kept shards, or files that are not ours
    if removed:
        log.info("removed %d shard files of earlier builds from %s", removed, folder)
    return removed


def shard_header_crc(path: str | os.PathLike) -> int:
    """The header CRC-32 of the index file (a shard) at ``path`` (identifies its contents)."""
    return header_crc(path, MAGIC)


def write_manifest(path: str | os.PathLike, *, dim: int, metric: str, metadata: dict,
                   shards: Sequence[dict]) -> Path:
    """Writes the manifest atomically (locked temporary file in the same folder, fsync, rename).

    Every shard file must already be in :func:`shard_dir` ``(path)``; its count and header
    CRC are taken from the entries as given (the caller wrote the shards)."""
    path = Path(path)
    entries = [ShardEntry(s["file"], s["count"], s["id_offset"], s["header_crc"]) for s in shards]
    for e in entries:
        if not SHARD_FILE_RE.fullmatch(e["file"]):
            raise ValueError(f"shard file name {e['file']!r} must be a plain *.plmi name")
    header = {"dim": int(dim), "metric": metric, "count": sum(e["count"] for e in entries),
              "metadata": metadata, "shards": entries, "created_by": f"pylandmark {__version__}"}
    body = json.dumps(header, sort_keys=True).encode()
    data = PREFIX.pack(MANIFEST_MAGIC, MANIFEST_VERSION, len(body), zlib.crc32(body), 0) + body
    # locked while written: an Index.load of the same path in another process removes only the
    # temporary files of writers that died
    with replaced_atomically(path, durable=True) as tmp:
        tmp.write_bytes(data)
    log.info("wrote the manifest of %d shards (%d rows) to %s", len(entries), header["count"], path)
    return path


def read_manifest(path: str | os.PathLike, f: BinaryIO | None = None) -> dict:
    """Parses and checks a manifest (from the open file ``f`` when given, positioned anywhere).

    Returns the header dict; raises IndexFormatError for anything damaged or crafted."""
    path = Path(path)
    own = f is None
    if f is None:
        f = open(path, "rb")
    try:
        f.seek(0)
        version, hlen, hcrc = read_prefix(f.read(PREFIX.size), path, MANIFEST_MAGIC)
        if version < 1 or hlen > _MAX_MANIFEST:
            raise IndexFormatError(f"{path} has an invalid manifest prefix (version {version}, {hlen} bytes)")
        body = f.read(hlen)
    finally:
        if own:
            f.close()
    if len(body) != hlen:
        raise IndexFormatError(f"{path} is truncated (manifest incomplete)")
    if zlib.crc32(body) != hcrc:
        raise IndexFormatError(f"{path} is damaged (manifest checksum mismatch)")
    try:
        header = parse_json(body, "the manifest JSON", _MAX_MANIFEST)
        _check_header(header)
    except (ValueError, TypeError, KeyError) as err:
        raise IndexFormatError(f"{path} has an invalid manifest ({err})") from None
    return header


def _int(v: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {v!r}")
    return v


def _check_header(h: Any) -> None:
    if not isinstance(h, dict):
        raise ValueError("the manifest must be a JSON object")
    _int(h["dim"], "dim", 1, 1 << 20)
    if h["metric"] not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}")
    if not isinstance(h.get("metadata", {}), dict):
        raise ValueError("metadata must be an object")
    shards = h["shards"]
    if not isinstance(shards, list) or not 1 <= len(shards) <= _MAX_SHARDS:
        raise ValueError(f"shards must be a list of 1 to {_MAX_SHARDS} entries")
    names = set()
    total = 0
    for i, s in enumerate(shards):
        if not isinstance(s, dict):
            raise ValueError(f"shard {i} must be an object")
        if not isinstance(s["file"], str) or not SHARD_FILE_RE.fullmatch(s["file"]):
            raise ValueError(f"shard {i}: file must be a plain *.plmi file name, got {s['file']!r}")
        if s["file"] in names:
            raise ValueError(f"shard {i}: file {s['file']!r} is listed twice")
        names.add(s["file"])
        total += _int(s["count"], f"shard {i} count", 0, _MAX_ID)
        _int(s["id_offset"], f"shard {i} id_offset", 0, _MAX_ID)
        _int(s["header_crc"], f"shard {i} header_crc", 0, 0xFFFFFFFF)
    if _int(h["count"], "count", 0, _MAX_ID) != total:
        raise ValueError(f"count {h['count']} is not the sum of the shard counts ({total})")


def load_shard(path: str | os.PathLike, header: dict, i: int, *, mmap: bool = True, verify: bool = True) -> Index:
    """Shard ``i`` of the manifest at ``path`` (``header`` from :func:`read_manifest`), checked
    against its manifest entry (the same file, count, dim and metric)."""
    entry = header["shards"][i]
    file = shard_dir(path) / entry["file"]
    if not file.is_file():
        raise IndexFormatError(f"{path}: shard {i} ({file}) is missing; the index is incomplete")
    if shard_header_crc(file) != entry["header_crc"]:
        raise IndexFormatError(f"{path}: shard {i} ({file}) is not the file this manifest was written "
                               "with (header checksum differs)")
    index = Index.load(file, mmap=mmap, verify=verify)
    if len(index) != entry["count"] or index.dim != header["dim"] or index.metric != header["metric"]:
        raise IndexFormatError(f"{path}: shard {i} ({file}) holds {len(index)} x {index.dim} {index.metric} "
                               f"rows, the manifest says {entry['count']} x {header['dim']} {header['metric']}")
    if len(index) and int(index._ids.max()) + entry["id_offset"] >= (1 << 63) - 1:
        raise IndexFormatError(f"{path}: shard {i} ids overflow int64 after the id offset")
    return index


def load_manifest(path: str | os.PathLike, f: BinaryIO | None = None, *, mmap: bool = True,
                  verify: bool = True) -> ShardedIndex:
    """Opens a manifest and every shard it lists (memory-mapped with ``mmap``; ``verify`` also
    checks each shard's descriptor checksum and that the global ids are unique)."""
    path = Path(path)
    header = read_manifest(path, f)
    shards = [load_shard(path, header, i, mmap=mmap, verify=verify) for i in range(len(header["shards"]))]
    offsets = [s["id_offset"] for s in header["shards"]]
    out = ShardedIndex(path, header["dim"], header["metric"], header.get("metadata") or {}, shards, offsets)
    if verify and len(out) and len(np.unique(out.ids)) != len(out):
        raise IndexFormatError(f"{path}: the shards' ids are not unique")
    return out


class ShardedIndex:
    """Several index files searched as one (what :meth:`pylandmark.Index.load` returns for a
    manifest). Read-only: grow it with ``pylandmark index add`` (which appends shards), or
    take :meth:`merged` for an in-memory :class:`~pylandmark.Index`.

    Attributes:
        dim, metric, metadata: as :class:`~pylandmark.Index`.
        shards: the shard indexes, in row order.
        id_offsets: (S,) added to each shard's stored ids.
        row_offsets: (S + 1,) int64 global row where each shard starts (last: the total).
    """

    def __init__(self, path: str | os.PathLike | None, dim: int, metric: str, metadata: dict,
                 shards: Sequence[Index], id_offsets: Sequence[int]):
        if len(shards) != len(id_offsets) or not shards:
            raise ValueError("shards and id_offsets must be non-empty and of equal length")
        self.path = None if path is None else Path(path)
        self.dim, self.metric, self.metadata = int(dim), metric, dict(metadata)
        self.shards = tuple(shards)
        self.id_offsets = np.asarray(id_offsets, np.int64)
        self.row_offsets = np.concatenate([[0], np.cumsum([len(s) for s in shards])]).astype(np.int64)
        self._check_columns()

    def _check_columns(self) -> None:
        for name in ("labels", "paths"):
            have = {getattr(s, f"_{name}") is not None for s in self.shards if len(s)}
            if len(have) > 1:
                raise IndexFormatError(f"{self.path}: some shards have {name} and others do not")

    def __len__(self) -> int:
        return int(self.row_offsets[-1])

    def __repr__(self) -> str:
        return (f"ShardedIndex(dim={self.dim}, metric={self.metric!r}, count={len(self)}, "
                f"shards={len(self.shards)}, labelled={self.labels is not None})")

    @property
    def descriptors(self) -> np.ndarray:
        """(N, D) float16, the shards' rows concatenated (a copy: reads every shard)."""
        out = np.concatenate([s.descriptors for s in self.shards])
        out.flags.writeable = False
        return out

    @functools.cached_property
    def ids(self) -> np.ndarray:
        """(N,) int64 global ids (each shard's stored ids plus its id offset; read-only, built once)."""
        out = np.concatenate([s._ids + o for s, o in zip(self.shards, self.id_offsets)]).astype(np.int64)
        out.flags.writeable = False
        return out

    def _column(self, name: str) -> list | None:
        parts = [getattr(s, f"_{name}") for s in self.shards if len(s)]
        if not parts or parts[0] is None:
            return None
        return [v for p in parts for v in p]

    @functools.cached_property
    def labels(self) -> np.ndarray | None:
        """(N,) labels (read-only object array, built once), or None when the index has none."""
        col = self._column("labels")
        if col is None:
            return None
        out = np.array(col, dtype=object)
        out.flags.writeable = False
        return out

    @functools.cached_property
    def paths(self) -> list | None:
        """(N,) image paths (read-only, built once), or None."""
        col = self._column("paths")
        return None if col is None else ReadOnlyList(col)

    def search_rows(self, queries: Any, k: int = 5) -> tuple[Any, Any]:
        """queries (Q, D) or (D,) -> scores (Q, k) float32 and global rows (Q, k) int64 (-1: none),
        equal to a search of the concatenated rows (every shard searched, lists merged exactly)."""
        if len(self) == 0:
            raise ValueError("the index is empty; add descriptors before searching")
        parts_s, parts_r = [], []
        for shard, start in zip(self.shards, self.row_offsets[:-1]):
            if len(shard) == 0:
                continue
            s, r = shard.search_rows(queries, k)
            if r.ndim == 1:
                s, r = s[None], r[None]
            parts_s.append(s)
            parts_r.append(_shift(r, int(start)))
        one = getattr(queries, "ndim", None) == 1 or (not hasattr(queries, "ndim") and np.ndim(queries) == 1)
        if framework_of(parts_r[0]) == "torch":
            import torch

            s, r = merge_topk_torch(torch.cat(parts_s, 1), torch.cat(parts_r, 1), k)
        else:
            s, r = merge_topk(np.concatenate(parts_s, 1), np.concatenate(parts_r, 1), k)
        return (s[0], r[0]) if one else (s, r)

    def search(self, queries: Any, k: int = 5) -> tuple[Any, Any]:
        """queries (Q, D) or (D,) -> scores (Q, k) float32 and global ids (Q, k) int64 (-1: none)."""
        return with_ids(self.ids, *self.search_rows(queries, k))

    def row_vectors(self, rows: Any) -> np.ndarray:
        """The stored float16 rows at global positions in [0, N), from the shards holding them:
        rows' shape + (D,) (memory-mapped shards read only those rows)."""
        rows = int64_array(rows, "rows", below=len(self))
        flat = rows.reshape(-1)
        shard = np.searchsorted(self.row_offsets, flat, side="right") - 1  # empty shards are skipped
        out = np.empty((len(flat), self.dim), np.float16)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.shards[s].row_vectors(flat[sel] - self.row_offsets[s])
        return out.reshape(*rows.shape, self.dim)

    def to(self, device: str) -> ShardedIndex:
        """Keeps every shard's matrix on a torch device (see :meth:`Index.to`)."""
        for s in self.shards:
            s.to(device)
        return self

    def merged(self) -> Index:
        """An in-memory :class:`~pylandmark.Index` with the same rows, ids, labels and paths."""
        out = Index(self.dim, self.metric, self.metadata)
        out._matrix = np.ascontiguousarray(self.descriptors).copy()
        out._ids = self.ids
        out._labels = self._column("labels")
        out._paths = self._column("paths")
        return out

    def _read_only(self, *_, **__):
        raise NotImplementedError("a sharded index is read-only: add images with `pylandmark index add` "
                                  "(it appends shards), or edit ShardedIndex.merged() and save that")

    add = remove = save = _read_only

    def info(self) -> dict:
        """Summary for display: count, dim, metric, labels, metadata, shard sizes."""
        labels = self.labels
        classes = sorted({str(v) for v in labels}) if labels is not None else []
        return {"count": len(self), "dim": self.dim, "metric": self.metric, "dtype": "float16",
                "labelled": labels is not None, "classes": len(classes),
                "memory_mapped": all(isinstance(s._matrix, np.memmap) or not len(s) for s in self.shards),
                "metadata": self.metadata, "shards": [len(s) for s in self.shards]}


def _shift(rows: Any, start: int) -> Any:
    if framework_of(rows) == "torch":
        return rows.where(rows < 0, rows + start)
    rows = np.asarray(rows)
    return np.where(rows >= 0, rows + start, -1)


register_format(MANIFEST_MAGIC, load_manifest)

# the index contract, checked by mypy: both kinds of index file open as an IndexLike
_INDEX_KINDS: tuple[type[IndexLike], ...] = (Index, ShardedIndex)
