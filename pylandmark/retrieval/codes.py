"""The compact codes' sections of an index file (format version 2): read and checked against
the descriptor matrix they were built from (:func:`pylandmark.prepare` builds them)."""
from __future__ import annotations

import io
import logging
import zlib
from pathlib import Path

import numpy as np

from ..ops import CODE_BLOCK, CODE_FIELDS, build_codes
from .format import IndexFormatError, read_array, sum64

log = logging.getLogger(__name__)


def read_codes(path: Path, f: io.BufferedReader, sections: dict, matrix: np.ndarray, metric: str, *,
                mmap: bool, verify: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """The codes and their metadata from the file, checked: checksums, and the codes of a few
    rows (first, last and 6 spread between) built again from the matrix and compared, so that
    codes from another matrix (a crafted or mismatched file) are dropped (None: built again on
    the first search) instead of pruning wrongly."""
    blocks = -(-len(matrix) // CODE_BLOCK)
    width = sections["codes"]["nbytes"] // blocks
    off = sections["codes"]["offset"]
    codes = read_array(f, path, off, np.uint8, (blocks, width), mmap=mmap, what="codes")
    f.seek(sections["code_meta"]["offset"])
    raw = f.read(sections["code_meta"]["nbytes"])
    if zlib.crc32(raw) != sections["code_meta"]["crc32"]:
        raise IndexFormatError(f"{path} is damaged (code_meta checksum mismatch)")
    meta = np.frombuffer(raw, "<f4").astype(np.float32).reshape(blocks, CODE_FIELDS, CODE_BLOCK)
    if verify and sum64(codes) != sections["codes"]["sum64"]:
        raise IndexFormatError(f"{path} is damaged (codes checksum mismatch)")
    for b in sorted({int(x) for x in np.linspace(0, blocks - 1, 8)}):
        rows = matrix[b * CODE_BLOCK:(b + 1) * CODE_BLOCK]
        c, m = build_codes(np.ascontiguousarray(rows), metric)
        if not (np.array_equal(c[0], codes[b]) and np.array_equal(m[0].view(np.uint32), meta[b].view(np.uint32))):
            log.warning("%s: its codes do not match its descriptors (block %d); ignoring them, they are built "
                        "again on the first search (save the index to store them)", path, b)
            return None
    return codes, meta
