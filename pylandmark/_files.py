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
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def give_default_mode(path: str | os.PathLike) -> None:
    """Gives a temporary file the mode of any new file, 0666 less the umask (mkstemp makes 0600)."""
    os.chmod(path, 0o666 & ~_umask())


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
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        give_default_mode(tmp)
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
