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
from typing import Any

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


# ---- files from elsewhere: JSON with bounded work, names that stay inside their folder ----------

MAX_JSON_DEPTH = 100  # levels of [ and {; pylandmark's own files nest a few
_DEPTH_CHUNK = 1 << 22  # bytes scanned at once by json_depth, bounds its temporary memory


def json_depth(data: bytes | bytearray | memoryview, stop: int | None = None) -> int:
    """The deepest nesting of ``[`` and ``{`` outside strings in UTF-8 JSON text, found by a
    vectorised scan (no recursion, a few passes over the bytes); counting ends once it passes
    ``stop``. Exact for valid JSON and for the part of invalid text a parser reads before its
    first error (outside strings a backslash is such an error, so a quote counts as escaped
    exactly when an odd run of backslashes precedes it)."""
    import numpy as np

    buf = np.frombuffer(data, np.uint8)
    depth = deepest = 0
    in_string = 0  # parity of the unescaped quotes before the chunk
    run = 0  # backslashes just before the chunk
    for start in range(0, buf.size, _DEPTH_CHUNK):
        a = buf[start:start + _DEPTH_CHUNK]
        quotes = np.flatnonzero(a == 0x22)
        if quotes.size and (run or (a == 0x5C).any()):
            quotes = quotes[~_escaped(a, quotes, run)]
        opens = (a == 0x5B) | (a == 0x7B)
        brackets = np.flatnonzero(opens | (a == 0x5D) | (a == 0x7D))
        if brackets.size:
            toggles = np.zeros(a.size, bool)
            toggles[quotes] = True
            in_strings = np.logical_xor.accumulate(toggles)[brackets]  # odd count of quotes before
            brackets = brackets[in_strings if in_string else ~in_strings]
            levels = np.cumsum(np.where(opens[brackets], 1, -1))
            if levels.size:
                deepest = max(deepest, depth + int(levels.max()))
                depth += int(levels[-1])
        in_string = (in_string + quotes.size) & 1
        if a[-1] == 0x5C:
            plain = np.flatnonzero(a != 0x5C)
            run = a.size - 1 - int(plain[-1]) if plain.size else run + a.size
        else:
            run = 0
        if stop is not None and deepest > stop:
            break
    return deepest


def _escaped(a: Any, quotes: Any, run: int) -> Any:
    """Which of the quotes at positions ``quotes`` of the bytes ``a`` follow an odd run of
    backslashes (``run`` more precede ``a``): runs are followed back a byte at a time while
    short, the usual case, then found for the rest at once."""
    import numpy as np

    odd = np.zeros(quotes.size, bool)
    active = np.arange(quotes.size)
    for k in range(1, 33):  # is byte quote - k a backslash too?
        if not active.size:
            return odd
        pos = quotes[active] - k
        first = pos < 0  # every byte before the quote is a backslash
        odd[active[first]] = (k - 1 + run) & 1
        active, pos = active[~first], pos[~first]
        more = a[pos] == 0x5C
        odd[active[~more]] = (k - 1) & 1
        active = active[more]
    if active.size:  # long runs (crafted text): the last plain byte before each quote
        plain = np.flatnonzero(a != 0x5C)
        k = np.searchsorted(plain, quotes[active])
        last = np.where(k > 0, plain[np.maximum(k - 1, 0)], -1 - run)
        odd[active] = (quotes[active] - 1 - last) & 1
    return odd


def parse_json(data: bytes | bytearray | memoryview | str, *, what: str, max_bytes: int | None,
               max_depth: int = MAX_JSON_DEPTH, error: type[ValueError] = ValueError) -> Any:
    """JSON read from a file from elsewhere, with bounded work: at most ``max_bytes`` bytes of
    text (None: the caller bounded its read) nested at most ``max_depth`` levels, checked by
    :func:`json_depth` before parsing, so a deeply nested file is refused instead of
    exhausting the parser's stack. Anything else wrong raises ``error`` (a ValueError), with a
    one-line message that names ``what``; bytes may be UTF-8, -16 or -32, as ``json.loads``
    reads them."""
    import json

    if isinstance(data, str):
        text, raw = data, data.encode("utf-8", "surrogatepass")
    else:
        raw = bytes(data)
        if max_bytes is not None and len(raw) > max_bytes:
            raise error(f"{what} is {len(raw):,} bytes, more than the {max_bytes:,} it may have")
        encoding = json.detect_encoding(raw)
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError as err:
            raise error(f"{what} is not {encoding} text ({err.reason} at byte {err.start})") from None
        if encoding != "utf-8":
            raw = text.encode("utf-8", "surrogatepass")
    if max_bytes is not None and len(raw) > max_bytes:
        raise error(f"{what} is {len(raw):,} bytes, more than the {max_bytes:,} it may have")
    if json_depth(raw, max_depth) > max_depth:
        raise error(f"{what} is nested more than {max_depth} levels deep")
    try:
        return json.loads(text)
    except RecursionError:  # not reached after the scan; kept so the error stays one line
        raise error(f"{what} is nested too deeply") from None
    except ValueError as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise error(f"{what} is not valid JSON ({first[:200]})") from None


def inside(root: str | os.PathLike, name: Any, what: str = "name", *,
           error: type[ValueError] = ValueError) -> Path:
    """``root / name`` for a relative ``name`` read from a file from elsewhere, after checking
    that it stays inside ``root``: a non-empty string, not absolute, no drive, no ``..`` part
    (``/`` and ``\\`` both separate parts, as on Windows), no NUL. Checked on the name alone,
    so a folder under ``root`` may be a link to another disk. Raises ``error`` (a ValueError)
    with a one-line message naming ``what``."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise error(f"{what} must be a non-empty path string, got {name!r:.80}")
    parts = (name.replace("\\", "/") if "\\" in name else name).split("/")
    if not parts[0] or ".." in parts or name[1:2] == ":":
        raise error(f"{what} must be a relative path inside {root} (not absolute, no '..'), got {name!r:.80}")
    return Path(root) / name
