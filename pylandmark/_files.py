"""Writing files so that a crash or an exception never leaves a half-written one behind.

Every output file of the package (descriptor arrays, listings, pages, figures, whitening,
checkpoints, run logs) is written to a temporary name in the target's folder and renamed over
the target when complete: readers see the old file or the new one, never a mix, and a failed
write leaves the old file untouched and no temporary file. (Index files have their own variant
in ``retrieval/index.py``: a lock marks a live writer so other processes can remove a dead one's
temporary file.)
"""
from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def create_temp(path: Path) -> tuple[int, Path]:
    """A new file ``.<name>.<random>.tmp`` next to ``path``, open for writing, created with mode
    0666 so that the umask gives it the mode of any new file (mkstemp's 0600 would stay)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


@contextmanager
def replaced_atomically(path: str | os.PathLike, *, durable: bool = False) -> Iterator[Path]:
    """Yields a temporary path next to ``path`` for the caller to write; when the block ends
    without an exception the file replaces ``path`` (with the umask's mode), otherwise it is
    removed. ``durable`` also flushes the data and the rename to disk (for files that training
    resumes from)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; name the file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp(path)
    os.close(fd)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Makes a rename in ``folder`` durable (POSIX); best effort where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # folders cannot be opened on some platforms; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
