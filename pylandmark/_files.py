"""Writing files so that a crash or an exception never leaves a half-written one behind.

Every output file of the package (descriptor arrays, listings, pages, figures, whitening,
checkpoints, run logs) is written to a temporary name in the target's folder and renamed over
the target when complete: readers see the old file or the new one, never a mix, and a failed
write leaves the old file untouched and no temporary file. On POSIX the writer holds a lock on
its temporary file for as long as it lives, so another process can tell a dead writer's file
(``retrieval/index.py`` removes those) from a live one's.
"""
from __future__ import annotations

import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:  # POSIX: a writer holds a lock on its temporary file, so a dead writer's file is recognisable
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

FRESH_TEMP_S = 10.0  # an empty unlocked temporary file younger than this may be a writer starting


def create_temp(path: Path) -> tuple[int, Path]:
    """A new file ``.<name>.<random>.tmp`` next to ``path``, open for writing and locked for as
    long as the descriptor stays open (where the platform has locks), created with mode 0666 so
    that the umask gives it the mode of any new file (mkstemp's 0600 would stay)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        if fcntl is None or _lock_own_temp(fd, tmp):
            return fd, tmp
        os.close(fd)  # a cleaner removed it before it was locked (the writer stalled): take another


def _lock_own_temp(fd: int, tmp: Path) -> bool:
    """Locks a just-created temporary file; False when the name no longer refers to it.

    The lock blocks rather than failing: a cleaner in another process may hold it for a
    moment while it looks at the (still empty) file, and a writer that went on unlocked
    would later look abandoned and have its file deleted under it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        return True  # a file system without locks: the file is still removed on any exception
    try:
        return os.stat(tmp, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


@contextmanager
def replaced_atomically(path: str | os.PathLike, *, durable: bool = False) -> Iterator[Path]:
    """Yields a temporary path next to ``path`` (locked, see :func:`create_temp`) for the caller
    to write; when the block ends
    without an exception the file replaces ``path`` (with the umask's mode), otherwise it is
    removed. ``durable`` also flushes the data and the rename to disk (for files that training
    resumes from)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; name the file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp(path)
    try:  # fd stays open, holding the lock, until the rename: the file is never left unlocked
        yield tmp
        if durable:
            os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    if durable:
        fsync_folder(path.parent)


def remove_stale_temps(path: Path) -> None:
    """Deletes temporary files of ``path`` left by writers that died (kill -9, power loss), and
    their :func:`writer_lock` file: a live writer holds a lock on its file (:func:`create_temp`),
    so a file that can be locked has no writer."""
    if fcntl is None:
        return
    prefix = f".{path.name}."
    try:
        names = [e.name for e in os.scandir(path.parent)
                 if e.name.startswith(prefix) and (e.name.endswith(".tmp") or e.name == f"{prefix}lock")]
    except OSError:
        return
    for name in names:
        full = path.parent / name
        try:
            fd = os.open(full, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                continue
            if name.endswith(".tmp") and st.st_size == 0 and time.time() - st.st_mtime < FRESH_TEMP_S:
                continue  # may be a writer between creating its file and locking it
            # (a writer_lock file needs no such care: a writer that locks a removed one retries)
            if os.stat(full, follow_symlinks=False).st_ino != st.st_ino:
                continue
            os.unlink(full)
            log.info("removed %s, left by a write that did not finish", full)
        except OSError:
            continue  # locked by a live writer, gone already, or not ours to delete
        finally:
            os.close(fd)


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


_held = threading.local()  # per thread: lock-file path -> (fd, depth) of the writer locks it holds


@contextmanager
def writer_lock(path: str | os.PathLike) -> Iterator[None]:
    """Serialises every process (and thread) that changes the file at ``path``: an exclusive
    lock on ``.<name>.lock`` beside it, held for the block and removed at its end. Readers never
    take it (they see one whole version through the atomic rename). The lock belongs to the open
    file, so a writer that dies, even by SIGKILL, releases it (its file stays until the next
    writer's block ends); a waiting writer says so in the log and goes on when the holder is
    done. Re-entrant within a thread. (Without POSIX locks: no serialisation.)"""
    path = Path(path)
    lock_file = path.with_name(f".{path.name}.lock")
    key = str(lock_file.resolve())
    held: dict = _held.__dict__.setdefault("locks", {})
    if key in held:  # this thread holds it already: nest
        fd, depth = held[key]
        held[key] = (fd, depth + 1)
        try:
            yield
        finally:
            held[key] = (fd, held[key][1] - 1)
        return
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process writing %s", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # the holder before us removed the file it locked: lock the one there now
            if os.stat(lock_file, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    held[key] = (fd, 1)
    try:
        yield
    finally:
        del held[key]
        # removed while still locked, so no file is left beside the index; a writer waiting on
        # this file finds it gone once it gets the lock, and takes a new one
        try:
            os.unlink(lock_file)
        except OSError:
            pass
        os.close(fd)
