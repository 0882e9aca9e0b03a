"""The on-disk format shared by index files and shard manifests: the 24-byte prefix, the magics
and versions, the checksums, and :func:`open_index`, which opens either kind of file by its
magic. The bottom of the retrieval stage: it imports nothing from it.

Prefix (little endian): 8 bytes magic, u32 format version, u32 header length (H), u32 CRC-32
of the header, u32 reserved (0); then the H-byte UTF-8 JSON header. ``PLMINDEX`` files
(:mod:`.index`) hold the descriptors after their header; ``PLMSHARD`` manifests
(:mod:`.manifest`) list the index files of a sharded index.
"""
from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .._files import MAX_JSON_DEPTH, remove_stale_temps
from .._files import parse_json as bounded_json
from .._version import __version__

__all__ = ["MAGIC", "MANIFEST_MAGIC", "FORMAT_VERSION", "MANIFEST_VERSION", "PREFIX", "IndexFormatError",
           "read_prefix", "parse_json", "header_crc", "sum64", "read_array", "register_format", "open_index",
           "is_manifest"]

MAGIC = b"PLMINDEX"
MANIFEST_MAGIC = b"PLMSHARD"
FORMAT_VERSION = 2  # 2: compact codes beside the matrix (issue 27); version 1 files still load
MANIFEST_VERSION = 1
PREFIX = struct.Struct("<8sIIII")
_SUM_CHUNK = 1 << 24  # words per checksum chunk, bounds the temporary memory

#: what each magic is called in messages: (kind, version name, newest version this code reads)
_KINDS = {MAGIC: ("index", "index format version", FORMAT_VERSION),
          MANIFEST_MAGIC: ("shard manifest", "manifest version", MANIFEST_VERSION)}


class IndexFormatError(ValueError):
    """The file is not a pylandmark index, is damaged, or is from a newer version."""


def read_prefix(prefix: bytes, path: Path, magic: bytes) -> tuple[int, int, int]:
    """(version, header length, header CRC-32) of a file's 24-byte prefix, after checking its
    magic and that this pylandmark reads the version."""
    kind, version_name, newest = _KINDS[magic]
    if len(prefix) < PREFIX.size or prefix[:8] != magic:
        raise IndexFormatError(f"{path} is not a pylandmark {kind} (bad magic)")
    _, version, hlen, hcrc, _ = PREFIX.unpack(prefix[:PREFIX.size])
    if version > newest:
        raise IndexFormatError(f"{path} uses {version_name} {version}, newer than this pylandmark "
                               f"({__version__}) reads ({newest}); upgrade pylandmark")
    return version, hlen, hcrc


def parse_json(raw: bytes, what: str, max_bytes: int | None, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The JSON of an index header, an index's labels or paths section, or a manifest, parsed with
    bounded work (:func:`pylandmark._files.parse_json`: at most ``max_bytes`` bytes, None when
    the caller bounded its read, and ``max_depth`` levels of nesting, checked before parsing).
    Raises IndexFormatError with a one-line message that names ``what``."""
    return bounded_json(raw, what=what, max_bytes=max_bytes, max_depth=max_depth, error=IndexFormatError)


def header_crc(path: str | os.PathLike, magic: bytes | None = None) -> int:
    """The header CRC-32 in the prefix of an index file or manifest (``magic``: only that kind).
    It identifies the file's contents: the header holds the checksum of every section."""
    with open(path, "rb") as f:
        prefix = f.read(PREFIX.size)
    if magic is None:
        magic = prefix[:8] if prefix[:8] in _KINDS else MAGIC
    return read_prefix(prefix, Path(path), magic)[2]


def read_array(f: Any, path: Path, offset: int, dtype: Any, shape: tuple[int, ...], *, mmap: bool,
               what: str) -> np.ndarray:
    """A large section of the open file ``f``: memory-mapped read-only (``mmap``), or read in
    full; IndexFormatError names ``what`` when the file ends first."""
    if mmap:
        return np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=shape)
    out = np.empty(shape, dtype)
    f.seek(offset)
    if f.readinto(out.data.cast("B")) != out.nbytes:
        raise IndexFormatError(f"{path} is truncated ({what} incomplete)")
    return out


def sum64(buf: np.ndarray) -> int:
    """Wrapping sum of the bytes as uint64 words (zero padded): detects any single flipped bit;
    the descriptor matrix's checksum (fast enough to check a multi-GB file on open)."""
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


#: magic -> opener(path, open file, mmap=, verify=); filled by the modules that define the kinds
_OPENERS: dict[bytes, Callable[..., Any]] = {}


def register_format(magic: bytes, opener: Callable[..., Any]) -> None:
    """Makes :func:`open_index` open files starting with ``magic`` with ``opener(path, f, *,
    mmap, verify)`` (``f``: the file, open for reading). Called by :mod:`.index` and
    :mod:`.manifest` when they are imported (the package's ``__init__`` imports both)."""
    _OPENERS[magic] = opener


def open_index(path: str | os.PathLike, *, mmap: bool = True, verify: bool = True) -> Any:
    """The index stored at ``path``: an :class:`~pylandmark.retrieval.index.Index` for an index
    file, a :class:`~pylandmark.retrieval.manifest.ShardedIndex` for a manifest, chosen by the
    magic. Temporary files of writers that died are removed first. Everything is read through
    one open file, so a load that races a save sees the old file or the new one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no index file at {path}")
    remove_stale_temps(path)
    with open(path, "rb") as f:
        opener = _OPENERS.get(f.read(8))
        if opener is None:
            raise IndexFormatError(f"{path} is not a pylandmark index (bad magic)")
        f.seek(0)
        return opener(path, f, mmap=mmap, verify=verify)


def is_manifest(path: str | os.PathLike) -> bool:
    """Whether the file at ``path`` starts with the shard manifest's magic."""
    with open(path, "rb") as f:
        return f.read(len(MANIFEST_MAGIC)) == MANIFEST_MAGIC
