"""Index: float16 descriptors with ids, labels and paths; exact search; one self-describing file.

File layout (little endian), version 2 (version 1 lacks the codes; such files load, and get codes
on their first search or save):

    0   8 bytes  magic b"PLMINDEX"
    8   u32      format version
    12  u32      header length in bytes (H)
    16  u32      CRC-32 of the header
    20  u32      reserved (0)
    24  H bytes  header: UTF-8 JSON (dim, count, metric, dtype, metadata, sections)
    ... sections at the offsets the header gives: the (count, dim) float16 matrix aligned to 4096
        bytes for memory mapping, then int64 ids, then JSON labels and paths, then the compact codes
        of :func:`pylandmark.prepare` (``codes``: (ceil(count/16), 16 * Dc) uint8, 64-byte aligned,
        memory-mapped like the matrix; ``code_meta``: (ceil(count/16), 3, 16) float32).

Each section carries a checksum (CRC-32; for the matrix a 64-bit word sum, fast enough to
check a multi-GB file on open). Files are written to a temporary name (``.<name>.<random>.tmp``,
locked by its writer) and renamed, so a crash never leaves a half-written index under the real
name; the next save or load of that index deletes temporary files whose writer died. A load
reads everything through one open file, so it sees one whole version even while another
process saves.
"""
from __future__ import annotations

import io
import json
import logging
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .._checks import check_int, framework_of
from .._files import remove_stale_temps, replaced_atomically, writer_lock
from .._version import __version__
from ..ops import CODE_BLOCK, CODE_FIELDS, METRICS, PreparedDatabase, build_codes, search
from .codes import read_codes
from .format import (
    FORMAT_VERSION,
    MAGIC,
    PREFIX,
    IndexFormatError,
    header_crc,
    open_index,
    parse_json,
    read_array,
    read_prefix,
    register_format,
    sum64,
)

log = logging.getLogger(__name__)

_MATRIX_ALIGN = 4096
_ADD_CHUNK = 1 << 16  # rows normalised at once in float64, bounds the temporary memory
_MAX_HEADER = 64 << 20  # bytes; real headers hold a few KB of metadata
_MAX_DIM = 1 << 20


def _as_rows(x: Any, dim: int) -> np.ndarray:
    """(n, dim) float array of any float dtype, without copying numpy input."""
    if type(x).__module__.split(".")[0] == "torch":
        x = x.detach().resolve_conj().resolve_neg()  # .numpy() refuses views with those bits
        if not x.is_floating_point():
            raise TypeError(f"descriptors must hold real floating-point values, got {x.dtype}")
        x = (x.float() if str(x.dtype) == "torch.bfloat16" else x).cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind != "f" and arr.dtype.name != "bfloat16":
        raise TypeError(f"descriptors must hold floating-point values, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"descriptors must be (n, {dim}), got shape {arr.shape}")
    return arr


def _encode(x: np.ndarray, cosine: bool) -> np.ndarray:
    """(n, D) float rows -> float16 rows: unit length for cosine (normalised in float64 before
    the cast, so neither 1e20 nor 1e-30 rows lose their direction), as given for ip."""
    out = np.empty(x.shape, np.float16)
    for start in range(0, len(x), _ADD_CHUNK):
        block = x[start:start + _ADD_CHUNK].astype(np.float64)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            bad = start + int(np.flatnonzero(~finite)[0])
            raise ValueError(f"descriptors row {bad} holds NaN or inf; drop or fix it before adding")
        if cosine:
            # scale by the largest element first: float64 squares of float64 input could overflow too
            peak = np.abs(block).max(axis=1, keepdims=True, initial=0.0)
            np.divide(block, peak, out=block, where=peak > 0)
            norms = np.sqrt(np.einsum("ij,ij->i", block, block))[:, None]
            np.divide(block, norms, out=block, where=norms > 0)
        elif np.abs(block).max(initial=0) > 65504:
            raise ValueError("descriptors exceed the float16 range (65504); scale them first")
        out[start:start + len(block)] = block
    return out


class Index:
    """Descriptors stored once as float16 (unit rows for cosine), searched exactly.

    Args:
        dim: descriptor length D.
        metric: "cosine" (rows L2-normalised on add) or "ip".
        metadata: JSON-serialisable facts kept with the index (model, image size, ...).
    """

    def __init__(self, dim: int, metric: str = "cosine", metadata: dict | None = None):
        dim = check_int(dim, "dim", minimum=1)
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.dim = int(dim)
        self.metric = metric
        self.metadata: dict = dict(metadata or {})
        json.dumps(self.metadata)  # fail early on what could not be saved
        self._matrix = np.empty((0, self.dim), np.float16)  # (N, D), or a read-only memmap
        self._ids = np.empty(0, np.int64)
        self._labels: list | None = None
        self._paths: list | None = None
        self._column_cache: dict[str, tuple[list, Any]] = {}  # column -> (the list it was built from, view)
        self._source: tuple[str, int] | None = None  # (file, header CRC) this index was loaded from or saved to
        self._device = "cpu"
        self._gpu_matrix: Any = None  # a torch tensor once .to(device) put the matrix there
        # (the matrix they describe, codes, meta): a reader that sees a matrix from before or after a
        # concurrent add / remove and codes of the other one rebuilds instead of mixing them
        self._codes: tuple[Any, np.ndarray, np.ndarray] | None = None

    # ---- contents ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._matrix.shape[0])

    def __repr__(self) -> str:
        return (f"Index(dim={self.dim}, metric={self.metric!r}, count={len(self)}, "
                f"labelled={self._labels is not None}, device={self._device!r})")

    @property
    def descriptors(self) -> np.ndarray:
        """(N, D) float16, read-only view."""
        view = self._matrix.view()
        view.flags.writeable = False
        return view

    @property
    def ids(self) -> np.ndarray:
        """(N,) int64 ids, a read-only view (no copy per access)."""
        view = self._ids.view()
        view.flags.writeable = False
        return view

    @property
    def labels(self) -> np.ndarray | None:
        """(N,) per row label (a read-only object array built once per change of the index),
        or None when the index has none."""
        if self._labels is None:
            return None
        cached = self._column_cache.get("labels")
        if cached is None or cached[0] is not self._labels:
            column = np.array(self._labels, dtype=object)
            column.flags.writeable = False
            cached = self._column_cache["labels"] = (self._labels, column)
        return cached[1]

    @property
    def paths(self) -> list | None:
        """(N,) per row image path (a read-only list, no copy per access), or None."""
        if self._paths is None:
            return None
        cached = self._column_cache.get("paths")
        if cached is None or cached[0] is not self._paths:
            cached = self._column_cache["paths"] = (self._paths, ReadOnlyList(self._paths))
        return cached[1]

    def add(self, descriptors: Any, labels: Sequence | None = None, ids: Sequence[int] | None = None,
            paths: Sequence[str] | None = None) -> np.ndarray:
        """Appends (n, D) descriptors; returns their int64 ids (consecutive after the largest
        existing id unless given). Labels and paths are all-or-none across the index.

        All or nothing: every argument is checked before the index changes, so a call that
        raises leaves the index as it was."""
        rows = _encode(_as_rows(descriptors, self.dim), self.metric == "cosine")
        n = len(rows)
        new_ids = self._new_ids(ids, n)
        labels = self._check_column(labels, n, "labels", self._labels, _label_value)
        paths = self._check_column(paths, n, "paths", self._paths, _path_value)
        matrix = np.concatenate([np.asarray(self._matrix), rows])
        old = self._codes if self._codes is not None and self._codes[0] is self._matrix else None
        codes = None if old is None else (matrix, *build_codes(matrix, self.metric, old[1:], len(self)))
        all_ids = np.concatenate([self._ids, new_ids])
        all_labels = self._labels if labels is None else (self._labels or []) + labels
        all_paths = self._paths if paths is None else (self._paths or []) + paths
        # nothing below can fail
        self._matrix, self._ids, self._labels, self._paths = matrix, all_ids, all_labels, all_paths
        self._gpu_matrix, self._codes = None, codes
        return new_ids

    def _new_ids(self, ids: Sequence[int] | None, n: int) -> np.ndarray:
        if ids is None:
            start = int(self._ids.max()) + 1 if len(self._ids) else 0
            return np.arange(start, start + n, dtype=np.int64)
        arr = int64_array(ids, "ids")
        if arr.shape != (n,):
            raise ValueError(f"ids must be {n} integers, got shape {arr.shape}")
        if (arr < 0).any():
            raise ValueError("ids must be >= 0 (-1 marks missing results)")
        if len(np.unique(arr)) != n or np.isin(arr, self._ids).any():
            raise ValueError("ids must be unique, also against the ids already in the index")
        return arr

    def _check_column(self, values, n: int, name: str, existing, convert: Callable[[Any, str], Any]) -> list | None:
        """The column's new entries, converted; raises before anything changes."""
        if values is None:
            if existing is not None and n:
                raise ValueError(f"this index has {name} for every row; pass {name} for the new rows too")
            return None
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise TypeError(f"{name} must be a sequence with one entry per descriptor, got {type(values).__name__}")
        values = [convert(v, name) for v in values]
        if len(values) != n:
            raise ValueError(f"{name} must have one entry per descriptor ({n}), got {len(values)}")
        if existing is None and len(self):
            raise ValueError(f"this index has no {name}; it cannot get them for only some rows")
        return values

    def remove(self, ids: Sequence[int]) -> int:
        """Removes the rows with these ids; returns how many. Unknown ids are an error, and then nothing is removed."""
        wanted = int64_array(ids, "ids").reshape(-1)
        missing = wanted[~np.isin(wanted, self._ids)]
        if len(missing):
            raise KeyError(f"ids not in the index: {missing[:10].tolist()}")
        keep = ~np.isin(self._ids, wanted)
        matrix = np.asarray(self._matrix)[keep]
        labels = None if self._labels is None else [v for v, k in zip(self._labels, keep) if k]
        paths = None if self._paths is None else [v for v, k in zip(self._paths, keep) if k]
        self._matrix, self._ids, self._labels, self._paths = matrix, self._ids[keep], labels, paths
        self._gpu_matrix, self._codes = None, None
        return int((~keep).sum())

    # ---- search -----------------------------------------------------------------------------

    def search_rows(self, queries: Any, k: int = 5) -> tuple[Any, Any]:
        """Like ``search`` but returns row positions (0..len-1, -1 padding) instead of ids."""
        if len(self) == 0:
            raise ValueError("the index is empty; add descriptors before searching")
        db = self._gpu_matrix if self._gpu_matrix is not None else self.prepared()
        return search(queries, db, k=k, metric=self.metric)

    def prepared(self) -> PreparedDatabase:
        """The matrix with its compact codes (:func:`pylandmark.prepare`), which CPU searches
        scan first: from the file, kept up to date by ``add``, or built here on first use."""
        matrix, codes, meta = self._code_arrays()
        return PreparedDatabase(matrix, self.metric, codes, meta)

    def _code_arrays(self) -> tuple[Any, np.ndarray, np.ndarray]:
        """(matrix, codes, meta), one consistent snapshot."""
        matrix, entry = self._matrix, self._codes
        if entry is None or entry[0] is not matrix:
            entry = (matrix, *build_codes(matrix, self.metric))
            if self._matrix is matrix:
                self._codes = entry
        return entry

    def row_vectors(self, rows: Any) -> np.ndarray:
        """The stored float16 rows at positions in [0, N): rows' shape + (D,) (a memory map reads only those)."""
        return np.asarray(self._matrix[int64_array(rows, "rows", below=len(self))])

    def search(self, queries: Any, k: int = 5) -> tuple[Any, Any]:
        """queries (Q, D) or (D,) -> scores (Q, k) float32 and ids (Q, k) int64 (-1: none)."""
        return with_ids(self._ids, *self.search_rows(queries, k))

    def to(self, device: str) -> Index:
        """Keeps the matrix on a torch device ("cuda", "cuda:1") for searches; "cpu" drops it."""
        if str(device) == "cpu":
            self._gpu_matrix, self._device = None, "cpu"
            return self
        import torch

        self._gpu_matrix = torch.from_numpy(np.ascontiguousarray(self._matrix)).to(device)
        self._device = str(device)
        return self

    # ---- files ------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the index atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        ids = np.ascontiguousarray(self._ids, dtype="<i8")
        source, codes, code_meta = self._code_arrays()  # the matrix and its codes, one snapshot
        matrix = np.ascontiguousarray(source, dtype=np.float16)
        blobs = {
            "labels": None if self._labels is None else json.dumps(self._labels).encode(),
            "paths": None if self._paths is None else json.dumps(self._paths).encode(),
        }
        sections: dict[str, Any] = {}
        # offsets depend on the header length, which depends on the offsets: iterate to a fixpoint
        header_bytes = b""
        for _ in range(4):
            offset = _align(PREFIX.size + len(header_bytes), _MATRIX_ALIGN)
            sections = {"matrix": {"offset": offset, "nbytes": matrix.nbytes, "sum64": sum64(matrix)}}
            offset += matrix.nbytes
            offset = _align(offset, 8)
            sections["ids"] = {"offset": offset, "nbytes": ids.nbytes, "crc32": zlib.crc32(ids.tobytes())}
            offset += ids.nbytes
            for name, blob in blobs.items():
                if blob is not None:
                    sections[name] = {"offset": offset, "nbytes": len(blob), "crc32": zlib.crc32(blob)}
                    offset += len(blob)
            offset = _align(offset, 64)
            sections["codes"] = {"offset": offset, "nbytes": codes.nbytes, "sum64": sum64(codes)}
            offset += codes.nbytes
            sections["code_meta"] = {"offset": offset, "nbytes": code_meta.nbytes,
                                     "crc32": zlib.crc32(np.ascontiguousarray(code_meta, "<f4").tobytes())}
            header = {"dim": self.dim, "count": len(self), "metric": self.metric, "dtype": "float16",
                      "metadata": self.metadata, "sections": sections,
                      "created_by": f"pylandmark {__version__}"}
            new_bytes = json.dumps(header, sort_keys=True).encode()
            stable = _align(PREFIX.size + len(new_bytes), _MATRIX_ALIGN) == sections["matrix"]["offset"]
            header_bytes = new_bytes
            if stable:
                break
        else:
            raise RuntimeError("index header layout did not settle")  # cannot happen: offsets grow monotonically
        path.parent.mkdir(parents=True, exist_ok=True)
        with writer_lock(path):  # one writer at a time; a reader sees the old file or the new one
            self._check_unchanged_since_load(path)
            remove_stale_temps(path)
            self._write(path, header_bytes, sections, matrix, ids, {**blobs, "codes": codes, "code_meta": code_meta})
            self._source = (str(path.resolve()), zlib.crc32(header_bytes))
        log.info("saved %d descriptors to %s", len(self), path)
        return path

    def _check_unchanged_since_load(self, path: Path) -> None:
        """Refuses to replace the file this index was loaded from when another writer has
        changed it since (the save would drop that writer's rows)."""
        if self._source is None or self._source[0] != str(path.resolve()) or not path.is_file():
            return
        try:
            now = header_crc(path)
        except (IndexFormatError, OSError):
            now = None
        if now != self._source[1]:
            raise IndexChangedError(f"{path} was changed by another writer since this index was loaded; saving would "
                                    "drop its rows: load the index again and repeat the change")

    @staticmethod
    def _write(path: Path, header_bytes: bytes, sections: dict, matrix: np.ndarray, ids: np.ndarray,
               blobs: dict) -> None:
        # locked temporary file, fsync, rename, folder fsync; removed on any failure
        with replaced_atomically(path, durable=True) as tmp, open(tmp, "r+b") as f:
            f.write(PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes), zlib.crc32(header_bytes), 0))
            f.write(header_bytes)
            f.seek(sections["matrix"]["offset"])
            f.write(matrix.reshape(-1).view(np.uint8).data)  # no copy of a matrix that may be GBs
            f.seek(sections["ids"]["offset"])
            f.write(ids.tobytes())
            for name, blob in blobs.items():
                if blob is not None:
                    f.seek(sections[name]["offset"])
                    f.write(blob.reshape(-1).view(np.uint8).data if isinstance(blob, np.ndarray) else blob)
            f.truncate(max(sec["offset"] + sec["nbytes"] for sec in sections.values()))

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True, verify: bool = True) -> Index:
        """Opens an index file. With mmap the matrix stays on disk (read-only, shared by
        processes) and is paged in by searches. verify checks the matrix checksum too (one
        read of the file); the header and small sections are always checked. A shard manifest
        (written by a distributed build) opens as one read-only
        :class:`~pylandmark.retrieval.manifest.ShardedIndex` (:func:`.format.open_index`).

        Everything is read through one open file, so a load that races a save sees either the
        old file or the new one, never a mix. A damaged or crafted file raises
        IndexFormatError, never an index whose parts disagree."""
        return open_index(path, mmap=mmap, verify=verify)

    @classmethod
    def _read(cls, path: Path, f: io.BufferedReader, *, mmap: bool, verify: bool) -> Index:
        """The index file open as ``f`` (at its start): the opener :func:`.format.open_index`
        uses for ``PLMINDEX`` files."""
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(PREFIX.size)
        version, hlen, hcrc = read_prefix(prefix, path, MAGIC)
        if version < 1:
            raise IndexFormatError(f"{path}: invalid format version {version}")
        if PREFIX.size + hlen > size:
            raise IndexFormatError(f"{path} is truncated (header incomplete)")
        if hlen > _MAX_HEADER:
            raise IndexFormatError(f"{path} has an invalid header ({hlen} bytes, at most {_MAX_HEADER})")
        header_bytes = f.read(hlen)
        if len(header_bytes) != hlen:
            raise IndexFormatError(f"{path} is truncated (header incomplete)")
        if zlib.crc32(header_bytes) != hcrc:
            raise IndexFormatError(f"{path} is damaged (header checksum mismatch)")
        try:
            dim, count, metric, metadata, sections = _parse_header(header_bytes, PREFIX.size + hlen)
        except ValueError as err:
            raise IndexFormatError(f"{path} has an invalid header ({err})") from None
        end = max(s["offset"] + s["nbytes"] for s in sections.values())
        if size < end:
            raise IndexFormatError(f"{path} is truncated ({size} bytes, the header says {end})")

        def small(name: str) -> bytes | None:
            if name not in sections:
                return None
            f.seek(sections[name]["offset"])
            data = f.read(sections[name]["nbytes"])
            if zlib.crc32(data) != sections[name]["crc32"]:
                raise IndexFormatError(f"{path} is damaged ({name} checksum mismatch)")
            return data

        try:
            id_bytes = small("ids")
            if id_bytes is None:
                raise ValueError("the ids section is missing")
            ids = _check_ids(np.frombuffer(id_bytes, dtype="<i8").astype(np.int64))
            labels = _column(small("labels"), count, "labels", _label_value)
            paths = _column(small("paths"), count, "paths", _path_value)
        except (ValueError, TypeError) as err:
            raise IndexFormatError(f"{path} is damaged or crafted ({err})") from None
        moff = sections["matrix"]["offset"]
        if count == 0:
            matrix = np.empty((0, dim), np.float16)
        else:
            matrix = read_array(f, path, moff, np.float16, (count, dim), mmap=mmap, what="descriptor matrix")
        if verify and sum64(matrix) != sections["matrix"]["sum64"]:
            raise IndexFormatError(f"{path} is damaged (descriptor matrix checksum mismatch)")
        index = cls(dim, metric, metadata)
        index._matrix, index._ids, index._labels, index._paths = matrix, ids, labels, paths
        if "codes" in sections and count:
            codes = read_codes(path, f, sections, matrix, metric, mmap=mmap, verify=verify)
            index._codes = None if codes is None else (matrix, *codes)
        index._source = (str(path.resolve()), hcrc)
        return index

    def info(self) -> dict:
        """Summary for display: count, dim, metric, labels, metadata."""
        labels = self.labels
        classes = sorted({str(v) for v in labels}) if labels is not None else []
        return {"count": len(self), "dim": self.dim, "metric": self.metric, "dtype": "float16",
                "labelled": labels is not None, "classes": len(classes),
                "memory_mapped": isinstance(self._matrix, np.memmap),
                "codes": self._codes is not None and self._codes[0] is self._matrix,
                "metadata": self.metadata}


class IndexChangedError(RuntimeError):
    """``Index.save`` onto the file the index was loaded from, which another writer changed since."""


class ReadOnlyList(list):
    """A list that refuses changes: an index column handed out without a copy per access
    (compares equal to a list of the same items; ``list(x)`` gives a changeable copy)."""

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("this list is an index's column and read-only; change the index, or copy it with list(...)")

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse


@runtime_checkable
class IndexLike(Protocol):
    """What recognition and the JSON of ``search`` / ``recognize`` need of an index; satisfied by
    :class:`Index`, :class:`~pylandmark.retrieval.manifest.ShardedIndex` and the service's view
    (``search_rows`` gives (Q, k) scores and row numbers, -1 past the end; ``ids`` / ``labels``
    / ``paths`` are per row, read-only, and cost nothing per access)."""

    metric: str

    @property
    def ids(self) -> np.ndarray: ...

    @property
    def labels(self) -> np.ndarray | None: ...

    @property
    def paths(self) -> list | None: ...

    def __len__(self) -> int: ...

    def search_rows(self, queries: Any, k: int = 5) -> tuple[Any, Any]: ...


def with_ids(ids: np.ndarray, scores: Any, rows: Any) -> tuple[Any, Any]:
    """A search's (scores, rows) as (scores, ids[rows]), -1 kept; torch rows give ids on their device."""
    r = np.asarray(rows.cpu() if framework_of(rows) == "torch" else rows)
    out = np.where(r >= 0, ids[np.maximum(r, 0)], -1)
    return scores, (rows.new_tensor(out) if framework_of(rows) == "torch" else out)


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _label_value(v: Any, name: str) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if not isinstance(v, (str, int, float, bool)) and v is not None:
        raise TypeError(f"{name} entries must be str or int, got {type(v).__name__}")
    return v


def _path_value(v: Any, name: str) -> str:
    if isinstance(v, os.PathLike):
        v = os.fspath(v)
    if not isinstance(v, str):
        raise TypeError(f"{name} entries must be str or os.PathLike, got {type(v).__name__}")
    return v


def int64_array(ids: Any, name: str, below: int | None = None) -> np.ndarray:
    """int64 ids (each in [0, below) if given); floats, strings, other non-integers are an error (never truncated)."""
    arr = np.asarray(ids)
    if arr.size == 0:
        return arr.astype(np.int64).reshape(arr.shape)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{name} must fit in int64")
    if below is not None and not 0 <= arr.min() <= arr.max() < below:
        raise ValueError(f"{name} must lie in [0, {below}), got values in [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int64)


# ---- the file format's checks -------------------------------------------------------------------

def _int(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _parse_header(raw: bytes, data_start: int) -> tuple[int, int, str, dict, dict]:
    """(dim, count, metric, metadata, sections) from the header JSON; ValueError names what is
    wrong. Sections must lie after the header (data_start) with integer offsets and sizes."""
    header = parse_json(raw, "the header", _MAX_HEADER)
    if not isinstance(header, dict):
        raise ValueError("not a JSON object")
    dim = _int(header.get("dim"), "dim", 1, _MAX_DIM)
    count = _int(header.get("count"), "count", 0, 1 << 48)
    metric = header.get("metric")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if header.get("dtype") != "float16":
        raise ValueError(f"dtype must be float16, got {header.get('dtype')!r}")
    metadata = header.get("metadata", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise ValueError(f"metadata must be an object, got {type(metadata).__name__}")
    sections = header.get("sections")
    if not isinstance(sections, dict) or "matrix" not in sections or "ids" not in sections:
        raise ValueError("sections must be an object with 'matrix' and 'ids'")
    known = {"matrix": "sum64", "ids": "crc32", "labels": "crc32", "paths": "crc32", "codes": "sum64",
             "code_meta": "crc32"}
    checked = {}
    for name, sec in sections.items():
        if name not in known:
            continue  # a later minor addition this version does not read
        if not isinstance(sec, dict):
            raise ValueError(f"section {name!r} must be an object")
        checked[name] = {"offset": _int(sec.get("offset"), f"{name} offset", data_start, 1 << 62),
                         "nbytes": _int(sec.get("nbytes"), f"{name} nbytes", 0, 1 << 62),
                         known[name]: _int(sec.get(known[name]), f"{name} {known[name]}", 0, (1 << 64) - 1)}
    if checked["matrix"]["nbytes"] != count * dim * 2 or checked["ids"]["nbytes"] != count * 8:
        raise ValueError("section sizes disagree with count and dim")
    if ("codes" in checked) != ("code_meta" in checked):
        raise ValueError("codes and code_meta come together")
    blocks = -(-count // CODE_BLOCK)
    if "codes" in checked and (checked["codes"]["nbytes"] != blocks * CODE_BLOCK * (-(-dim // 4) * 4)
                               or checked["code_meta"]["nbytes"] != blocks * CODE_FIELDS * CODE_BLOCK * 4
                               or checked["codes"]["offset"] % 64):
        raise ValueError("code section sizes disagree with count and dim")
    return dim, count, metric, metadata, checked


def _check_ids(ids: np.ndarray) -> np.ndarray:
    if len(ids) and ids.min() < 0:
        raise ValueError("negative ids (-1 marks missing results)")
    increasing = len(ids) < 2 or bool((ids[1:] > ids[:-1]).all())  # the usual case, O(n)
    if not increasing and len(np.unique(ids)) != len(ids):
        raise ValueError("duplicate ids")
    return ids


def _column(raw: bytes | None, count: int, name: str, convert: Callable[[Any, str], Any]) -> list | None:
    """A labels or paths section: a JSON list of count entries of the column's type."""
    if raw is None:
        return None
    values = parse_json(raw, f"the {name} section", None, max_depth=1)  # a list of scalars
    if not isinstance(values, list) or len(values) != count:
        got = f"{len(values)} entries" if isinstance(values, list) else type(values).__name__
        raise ValueError(f"the {name} section must be a list of {count} entries, got {got}")
    return [convert(v, name) for v in values]


register_format(MAGIC, Index._read)
