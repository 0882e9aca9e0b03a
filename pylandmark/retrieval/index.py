"""Index: float16 descriptors with ids, labels and paths; exact search; one self-describing file.

File layout (little endian), version 1:

    0   8 bytes  magic b"PLMINDEX"
    8   u32      format version
    12  u32      header length in bytes (H)
    16  u32      CRC-32 of the header
    20  u32      reserved (0)
    24  H bytes  header: UTF-8 JSON (dim, count, metric, dtype, metadata, sections)
    ... sections at the offsets the header gives: the (count, dim) float16 matrix aligned to 4096
        bytes for memory mapping, then int64 ids, then JSON labels and paths.

Each section carries a checksum (CRC-32; for the matrix a 64-bit word sum, fast enough to
check a multi-GB file on open). Files are written to a temporary name and renamed, so a crash
never leaves a half-written index under the real name.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._version import __version__
from ..ops import METRICS, search

log = logging.getLogger(__name__)

MAGIC = b"PLMINDEX"
MANIFEST_MAGIC = b"PLMSHARD"  # a manifest of index shards (retrieval/manifest.py)
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIIII")
_MATRIX_ALIGN = 4096
_SUM_CHUNK = 1 << 24  # words per checksum chunk, bounds the temporary memory


class IndexFormatError(ValueError):
    """The file is not a pylandmark index, is damaged, or is from a newer version."""


def _sum64(buf: np.ndarray) -> int:
    """Wrapping sum of the bytes as uint64 words (zero padded): detects any single flipped bit."""
    raw = np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
    whole = raw.size // 8
    words = raw[: whole * 8].view(np.uint64)
    total = np.uint64(0)
    with np.errstate(over="ignore"):
        for start in range(0, whole, _SUM_CHUNK):
            total += np.add.reduce(words[start:start + _SUM_CHUNK], dtype=np.uint64)
        if raw.size % 8:
            tail = np.zeros(8, np.uint8)
            tail[: raw.size % 8] = raw[whole * 8:]
            total += tail.view(np.uint64)[0]
    return int(total)


def _to_float32(x: Any, name: str) -> np.ndarray:
    if type(x).__module__.split(".")[0] == "torch":
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind != "f" and arr.dtype.name != "bfloat16":
        raise TypeError(f"{name} must hold floating-point values, got dtype {arr.dtype}")
    return arr.astype(np.float32, copy=False)


class Index:
    """Descriptors stored once as float16 (unit rows for cosine), searched exactly.

    Args:
        dim: descriptor length D.
        metric: "cosine" (rows L2-normalised on add) or "ip".
        metadata: JSON-serialisable facts kept with the index (model, image size, ...).
    """

    def __init__(self, dim: int, metric: str = "cosine", metadata: dict | None = None):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
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
        self._device = "cpu"
        self._gpu_matrix = None

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
        return self._ids.copy()

    @property
    def labels(self) -> np.ndarray | None:
        """Per row label (object array), or None when the index has none."""
        return None if self._labels is None else np.array(self._labels, dtype=object)

    @property
    def paths(self) -> list | None:
        return None if self._paths is None else list(self._paths)

    def add(self, descriptors: Any, labels: Sequence | None = None, ids: Sequence[int] | None = None,
            paths: Sequence[str] | None = None) -> np.ndarray:
        """Appends (n, D) descriptors; returns their int64 ids (consecutive after the largest
        existing id unless given). Labels and paths are all-or-none across the index."""
        x = _to_float32(descriptors, "descriptors")
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"descriptors must be (n, {self.dim}), got shape {x.shape}")
        n = x.shape[0]
        if not np.isfinite(x).all():
            bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
            raise ValueError(f"descriptors row {bad} holds NaN or inf; drop or fix it before adding")
        if self.metric == "cosine":
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
        elif np.abs(x).max(initial=0) > 65504:
            raise ValueError("descriptors exceed the float16 range (65504); scale them first")
        new_ids = self._new_ids(ids, n)
        labels = self._check_column(labels, n, "labels", self._labels)
        paths = self._check_column(paths, n, "paths", self._paths)
        if paths is not None:
            paths = [str(p) for p in paths]
        self._matrix = np.concatenate([np.asarray(self._matrix), x.astype(np.float16)])
        self._ids = np.concatenate([self._ids, new_ids])
        if labels is not None:
            self._labels = (self._labels or []) + [_json_value(v, "labels") for v in labels]
        if paths is not None:
            self._paths = (self._paths or []) + paths
        self._gpu_matrix = None
        return new_ids

    def _new_ids(self, ids: Sequence[int] | None, n: int) -> np.ndarray:
        if ids is None:
            start = int(self._ids.max()) + 1 if len(self._ids) else 0
            return np.arange(start, start + n, dtype=np.int64)
        arr = np.asarray(ids)
        if arr.shape != (n,) or arr.dtype.kind not in "iu":
            raise ValueError(f"ids must be {n} integers, got {arr.shape} {arr.dtype}")
        arr = arr.astype(np.int64)
        if (arr < 0).any():
            raise ValueError("ids must be >= 0 (-1 marks missing results)")
        if len(np.unique(arr)) != n or np.isin(arr, self._ids).any():
            raise ValueError("ids must be unique, also against the ids already in the index")
        return arr

    def _check_column(self, values, n: int, name: str, existing) -> list | None:
        if values is None:
            if existing is not None and n:
                raise ValueError(f"this index has {name} for every row; pass {name} for the new rows too")
            return None
        values = list(values)
        if len(values) != n:
            raise ValueError(f"{name} must have one entry per descriptor ({n}), got {len(values)}")
        if existing is None and len(self):
            raise ValueError(f"this index has no {name}; it cannot get them for only some rows")
        return values

    def remove(self, ids: Sequence[int]) -> int:
        """Removes the rows with these ids; returns how many were removed (unknown ids: error)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        missing = ids[~np.isin(ids, self._ids)]
        if len(missing):
            raise KeyError(f"ids not in the index: {missing[:10].tolist()}")
        keep = ~np.isin(self._ids, ids)
        self._matrix = np.asarray(self._matrix)[keep]
        self._ids = self._ids[keep]
        if self._labels is not None:
            self._labels = [v for v, k in zip(self._labels, keep) if k]
        if self._paths is not None:
            self._paths = [v for v, k in zip(self._paths, keep) if k]
        self._gpu_matrix = None
        return int((~keep).sum())

    # ---- search -----------------------------------------------------------------------------

    def search_rows(self, queries: Any, k: int = 5) -> tuple[Any, Any]:
        """Like ``search`` but returns row positions (0..len-1, -1 padding) instead of ids."""
        if len(self) == 0:
            raise ValueError("the index is empty; add descriptors before searching")
        db = self._gpu_matrix if self._gpu_matrix is not None else self._matrix
        return search(queries, db, k=k, metric=self.metric)

    def search(self, queries: Any, k: int = 5) -> tuple[Any, Any]:
        """queries (Q, D) or (D,) -> scores (Q, k) float32 and ids (Q, k) int64 (-1: none)."""
        scores, rows = self.search_rows(queries, k)
        if type(rows).__module__.split(".")[0] == "torch":
            import torch

            table = torch.as_tensor(self._ids, device=rows.device)
            return scores, torch.where(rows >= 0, table[rows.clamp(min=0)], rows)
        rows = np.asarray(rows)
        return scores, np.where(rows >= 0, self._ids[np.maximum(rows, 0)], -1)

    def to(self, device: str) -> "Index":
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
        matrix = np.ascontiguousarray(self._matrix, dtype=np.float16)
        ids = np.ascontiguousarray(self._ids, dtype="<i8")
        blobs = {
            "labels": None if self._labels is None else json.dumps(self._labels).encode(),
            "paths": None if self._paths is None else json.dumps(self._paths).encode(),
        }
        sections: dict[str, Any] = {}
        # offsets depend on the header length, which depends on the offsets: iterate to a fixpoint
        header_bytes = b""
        for _ in range(4):
            offset = _align(_PREFIX.size + len(header_bytes), _MATRIX_ALIGN)
            sections = {"matrix": {"offset": offset, "nbytes": matrix.nbytes, "sum64": _sum64(matrix)}}
            offset += matrix.nbytes
            offset = _align(offset, 8)
            sections["ids"] = {"offset": offset, "nbytes": ids.nbytes, "crc32": zlib.crc32(ids.tobytes())}
            offset += ids.nbytes
            for name, blob in blobs.items():
                if blob is not None:
                    sections[name] = {"offset": offset, "nbytes": len(blob), "crc32": zlib.crc32(blob)}
                    offset += len(blob)
            header = {"dim": self.dim, "count": len(self), "metric": self.metric, "dtype": "float16",
                      "metadata": self.metadata, "sections": sections,
                      "created_by": f"pylandmark {__version__}"}
            new_bytes = json.dumps(header, sort_keys=True).encode()
            stable = _align(_PREFIX.size + len(new_bytes), _MATRIX_ALIGN) == sections["matrix"]["offset"]
            header_bytes = new_bytes
            if stable:
                break
        else:
            raise RuntimeError("index header layout did not settle")  # cannot happen: offsets grow monotonically
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes), zlib.crc32(header_bytes), 0))
                f.write(header_bytes)
                f.seek(sections["matrix"]["offset"])
                f.write(matrix.tobytes())
                f.seek(sections["ids"]["offset"])
                f.write(ids.tobytes())
                for name, blob in blobs.items():
                    if blob is not None:
                        f.seek(sections[name]["offset"])
                        f.write(blob)
                f.truncate(max(sec["offset"] + sec["nbytes"] for sec in sections.values()))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        log.info("saved %d descriptors to %s", len(self), path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True, verify: bool = True) -> "Index":
        """Opens an index file. With mmap the matrix stays on disk (read-only, shared by
        processes) and is paged in by searches. verify checks the matrix checksum too (one
        read of the file); the header and small sections are always checked. A shard manifest
        (written by a distributed build) opens as one read-only
        :class:`~pylandmark.retrieval.manifest.ShardedIndex`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no index file at {path}")
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(_PREFIX.size)
            if prefix[:8] == MANIFEST_MAGIC:  # shards + manifest: opened as one ShardedIndex
                from .manifest import load_manifest

                return load_manifest(path, f, mmap=mmap, verify=verify)
            if len(prefix) < _PREFIX.size or prefix[:8] != MAGIC:
                raise IndexFormatError(f"{path} is not a pylandmark index (bad magic)")
            _, version, hlen, hcrc, _ = _PREFIX.unpack(prefix)
            if version > FORMAT_VERSION:
                raise IndexFormatError(f"{path} uses index format version {version}, newer than this "
                                       f"pylandmark ({__version__}) reads ({FORMAT_VERSION}); upgrade pylandmark")
            if version < 1:
                raise IndexFormatError(f"{path}: invalid format version {version}")
            header_bytes = f.read(hlen)
            if len(header_bytes) != hlen:
                raise IndexFormatError(f"{path} is truncated (header incomplete)")
            if zlib.crc32(header_bytes) != hcrc:
                raise IndexFormatError(f"{path} is damaged (header checksum mismatch)")
            try:
                header = json.loads(header_bytes)
                dim, count, metric = int(header["dim"]), int(header["count"]), header["metric"]
                sections = header["sections"]
                if header["dtype"] != "float16" or metric not in METRICS or dim < 1 or count < 0:
                    raise ValueError("unsupported values")
                if sections["matrix"]["nbytes"] != count * dim * 2 or sections["ids"]["nbytes"] != count * 8:
                    raise ValueError("section sizes disagree with count and dim")
            except (ValueError, KeyError, TypeError) as err:
                raise IndexFormatError(f"{path} has an invalid header ({err})") from err
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

            ids = np.frombuffer(small("ids"), dtype="<i8").astype(np.int64)
            labels_raw, paths_raw = small("labels"), small("paths")
        index = cls(dim, metric, header.get("metadata") or {})
        moff = sections["matrix"]["offset"]
        if count == 0:
            matrix = np.empty((0, dim), np.float16)
        elif mmap:
            matrix = np.memmap(path, dtype=np.float16, mode="r", offset=moff, shape=(count, dim))
        else:
            matrix = np.fromfile(path, dtype=np.float16, count=count * dim, offset=moff).reshape(count, dim)
        if verify and _sum64(matrix) != sections["matrix"]["sum64"]:
            raise IndexFormatError(f"{path} is damaged (descriptor matrix checksum mismatch)")
        index._matrix, index._ids = matrix, ids
        index._labels = None if labels_raw is None else json.loads(labels_raw)
        index._paths = None if paths_raw is None else json.loads(paths_raw)
        return index

    def info(self) -> dict:
        """Summary for display: count, dim, metric, labels, metadata."""
        labels = self.labels
        classes = sorted({str(v) for v in labels}) if labels is not None else []
        return {"count": len(self), "dim": self.dim, "metric": self.metric, "dtype": "float16",
                "labelled": labels is not None, "classes": len(classes),
                "memory_mapped": isinstance(self._matrix, np.memmap), "metadata": self.metadata}


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def _json_value(v: Any, name: str) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if not isinstance(v, (str, int, float, bool)) and v is not None:
        raise TypeError(f"{name} entries must be str or int, got {type(v).__name__}")
    return v
