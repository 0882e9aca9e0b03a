"""Downloads with resume and integrity checks, and the local cache directory.

``download_url`` streams to ``<dest>.part``, resumes an interrupted download with an HTTP Range
request, checks the size the server announced and the expected hashes, and only then renames
the file into place. Every download is bounded: by its expected size when one is known, else by
``max_bytes`` (default 2 GiB), checked against the announced size before the body and while it
streams, and in time: a transfer slower than ``min_rate`` bytes/s over a minute stops (the part
is kept, so a run on a better connection resumes). Without network access it fails with a
message naming the URL and the path where the file can be put by hand. ``extract_tar`` bounds
what an archive may expand to the same way.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import numbers
import os
import re
import shutil
import stat
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = ["cache_dir", "download_url", "extract_tar", "DownloadError", "ChecksumError", "DEFAULT_MAX_BYTES",
           "URL_SCHEMES", "file_digests", "sha256sum", "digest_mismatch"]

_CHUNK = 1 << 20
_SCHEMES = ("http", "https", "ftp", "file")
#: the prefixes that make a weights source (``--weights``, ``load_backbone_weights``) a URL to
#: download rather than a local path or a preset name
URL_SCHEMES = ("http://", "https://", "file://")
#: largest download accepted when the caller knows no size (checkpoints are ~100-600 MB)
DEFAULT_MAX_BYTES = 2 << 30
DEFAULT_MIN_RATE = 16 << 10  # bytes/s: a 2 GiB file at this rate takes 36 h
RATE_WINDOW_S = 60.0  # the rate is checked over each such stretch of the transfer
#: an archive may expand to this many times its own size (JPEG archives barely compress) ...
ARCHIVE_RATIO = 4
#: ... plus this much
ARCHIVE_SLACK = 64 << 20


class DownloadError(OSError):
    """A file could not be fetched (no network, HTTP error, interrupted transfer)."""


class ChecksumError(ValueError):
    """A downloaded file does not have the expected size or hash; it was deleted."""


def cache_dir() -> Path:
    """The pylandmark cache: ``$PYLANDMARK_CACHE`` if set, else ``~/.cache/pylandmark``.

    The directory is not created here.
    """
    env = os.environ.get("PYLANDMARK_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "pylandmark"


def _check_hex(value: str | None, length: int, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(rf"[0-9a-fA-F]{{{length}}}", value):
        raise ValueError(f"{name} must be a {length}-character hex digest, got {value!r}")
    return value.lower()


def file_digests(path: str | os.PathLike, algorithms: Iterable[str] = ("sha256",),
                 chunk: int = _CHUNK) -> dict[str, str]:
    """Hex digests of a file's contents, ``{algorithm: hex}``, all from one read of the file
    (``algorithms``: hashlib names, e.g. "sha256", "md5")."""
    hashers = {name: hashlib.new(name, usedforsecurity=name != "md5") for name in algorithms}
    with open(path, "rb") as f:
        while block := f.read(chunk):
            for h in hashers.values():
                h.update(block)
    return {name: h.hexdigest() for name, h in hashers.items()}


def sha256sum(path: str | os.PathLike, chunk: int = _CHUNK) -> str:
    """Hex SHA-256 of a file."""
    return file_digests(path, ("sha256",), chunk)["sha256"]


def digest_mismatch(path: str | os.PathLike, expected: Mapping[str, str | None]) -> str | None:
    """Checks a file against expected hex digests, ``{algorithm: hex or None}`` (None: not
    checked; a prefix of a digest, e.g. torch.hub's file-name hash, matches the digest it
    starts with; case is ignored).

    Returns None when every given digest matches, else one line naming the file, the
    algorithm and both digests: ``"<path> has sha256 <actual>, expected <expected>"``
    (``expected one starting with <prefix>`` for a prefix). Callers raise their own error
    with it. The file is read once, whatever the number of algorithms."""
    wanted = {name: value.lower() for name, value in expected.items() if value}
    if not wanted:
        return None
    actual = file_digests(path, wanted)
    for name, want in wanted.items():
        got = actual[name]
        if not got.startswith(want):
            prefix = "one starting with " if len(want) < len(got) else ""
            return f"{path} has {name} {got}, expected {prefix}{want}"
    return None


def _hint(url: str, dest: Path, expected: dict[str, str | None]) -> str:
    sums = ", ".join(f"{k} {v}" for k, v in expected.items() if v)
    return (f"Without network access, fetch {url} by other means and put it at {dest}"
            + (f" ({sums})" if sums else ""))


def download_url(url: str, dest: str | Path, *, sha256: str | None = None, md5: str | None = None,
                 size: int | None = None, max_bytes: int = DEFAULT_MAX_BYTES, progress: bool = True,
                 timeout: float = 60, min_rate: float = DEFAULT_MIN_RATE) -> Path:
    """Download ``url`` to ``dest`` unless a verified copy is already there.

    Args:
        url: http(s), ftp or file URL (a file URL must name a regular file).
        dest: the file to write (its folder is created). An existing directory means
            ``dest/<last part of the URL>``.
        sha256, md5: expected hex digests (either, both or none).
        size: the expected size in bytes, when known: any other size is an error.
        max_bytes: without ``size``, the most bytes accepted (default 2 GiB); a larger
            announced size is refused before the body, and a transfer that grows past it stops.
        progress: show a tqdm progress bar.
        timeout: seconds to wait for the connection and for each read.
        min_rate: the slowest transfer accepted, in bytes/s averaged over each minute (default
            16 KiB/s); a server that drips bytes cannot hold the download open for days.

    Returns:
        the path of the verified file.

    Behaviour:
        An existing ``dest`` that matches the given hashes (or any existing ``dest`` when no hash
        is given) is returned without a request; one that does not match is downloaded again.
        Data go to ``<dest>.part``; an existing part is resumed with ``Range: bytes=<size>-``
        (servers that ignore the range send the whole file, which is then written from the
        start). A 206 must carry the asked range (Content-Range ``bytes <size>-<end>/<total>``
        matching its Content-Length), else the download starts again from zero; a 206 to a
        request without Range is an error. The size is checked against the server's
        Content-Length / Content-Range (and ``size``) and the hashes against the expected ones
        before an atomic rename to ``dest``: an incomplete file never takes its place.

    Raises:
        DownloadError: the URL could not be fetched or the transfer broke off (the part is kept,
            so running again resumes), or the file is larger than ``max_bytes`` (the part is
            deleted); the message names the URL and where to put the file.
        ChecksumError: the complete file has the wrong hash or size (the part is deleted).
        ValueError: a malformed url, sha256, md5, size or max_bytes.
    """
    if not isinstance(url, str):
        raise TypeError(f"url must be a str, got {type(url).__name__}")
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(f"url must be an http(s), ftp or file URL, got {url!r}")
    if not isinstance(dest, (str, os.PathLike)):
        raise TypeError(f"dest must be a path, got {type(dest).__name__}")
    expected = {"sha256": _check_hex(sha256, 64, "sha256"), "md5": _check_hex(md5, 32, "md5")}
    if not timeout or timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    if isinstance(min_rate, bool) or not isinstance(min_rate, numbers.Real) or not min_rate >= 0:
        raise ValueError(f"min_rate must be bytes/s >= 0 (0: no floor), got {min_rate!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 0):
        raise ValueError(f"size must be a byte count >= 0 or None, got {size!r}")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, numbers.Integral) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a byte count >= 1, got {max_bytes!r}")
    limit = _Limit(int(size) if size is not None else int(max_bytes), size is not None, float(min_rate))
    dest = Path(dest).expanduser()
    if dest.is_dir():
        name = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
        if not name:
            raise ValueError(f"dest {dest} is a directory and url {url!r} names no file; "
                             "pass the file path as dest")
        dest = dest / name

    if dest.is_file() and limit.exact and dest.stat().st_size != limit.bytes:
        logger.warning("%s exists but has %d bytes, expected %d; downloading it again", dest,
                       dest.stat().st_size, limit.bytes)
    elif dest.is_file():
        if not any(expected.values()):
            logger.debug("%s exists (no hash given to check); not downloading", dest)
            return dest
        bad = digest_mismatch(dest, expected)
        if bad is None:
            logger.debug("%s exists and matches its hash; not downloading", dest)
            return dest
        logger.warning("%s exists but does not match (%s); downloading it again", dest, bad)

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if scheme == "file":
        _check_local_source(url)
    total: int | None = None
    for attempt in range(2):
        try:
            restart, total = _fetch(url, dest, part, expected, limit, progress, timeout)
        except (_TooLarge, ChecksumError):
            part.unlink(missing_ok=True)
            raise
        if not restart:
            break
        if attempt:
            raise DownloadError(f"could not resume {url}: the server's answers to a range "
                                f"request do not fit {part}. {_hint(url, dest, expected)}")
        part.unlink(missing_ok=True)

    if total is not None and part.stat().st_size != total:  # never move an incomplete file into place
        raise DownloadError(f"the download of {url} is incomplete: {part} has {part.stat().st_size} of the "
                            f"{total} bytes the server announced; run again to resume. "
                            f"{_hint(url, dest, expected)}")
    bad = digest_mismatch(part, expected)
    if bad is None and limit.exact and part.stat().st_size != limit.bytes:
        bad = f"{part} has {part.stat().st_size} bytes, expected {limit.bytes}"
    if bad is not None:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"the file downloaded from {url} is not the expected one: {bad}; deleted "
                            "that partial file. The server may serve a different version or the transfer "
                            "was corrupted; run again, or check the URL and the expected hash")
    os.replace(part, dest)
    logger.info("downloaded %s to %s", url, dest)
    return dest


class _Limit:
    """The most bytes a download may have (``exact``: the size it must have) and the slowest
    rate it may go at."""

    def __init__(self, nbytes: int, exact: bool, min_rate: float = 0.0):
        self.min_rate = min_rate
        self.bytes, self.exact = nbytes, exact

    def check(self, total: int | None, url: str, dest: Path) -> None:
        if total is None:
            return
        if self.exact and total != self.bytes:
            raise ChecksumError(f"{url} has {total} bytes, expected {self.bytes}; not the expected file")
        if total > self.bytes:
            raise _TooLarge(f"{url} is {total} bytes, more than max_bytes={self.bytes}; pass a larger "
                            f"max_bytes if that is expected (nothing was written to {dest})")


class _TooLarge(DownloadError):
    pass


def _check_local_source(url: str) -> None:
    """A file:// URL must name a regular file (not /dev/zero, a pipe or a folder)."""
    path = urllib.request.url2pathname(urllib.parse.urlsplit(url).path)
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise DownloadError(f"could not download {url}: {err.strerror}: {path}") from err
    if not stat.S_ISREG(mode):
        raise DownloadError(f"could not download {url}: {path} is not a regular file")


def _fetch(url: str, dest: Path, part: Path, expected: dict[str, str | None], limit: _Limit,
           progress: bool, timeout: float) -> tuple[bool, int | None]:
    """Fill ``part`` with the whole file. Returns (restart, total): restart is True when the part
    must be discarded and the download restarted from zero; total is the file's size as the
    server announced it (None: not announced), which ``part`` then has."""
    offset = part.stat().st_size if part.is_file() else 0
    if offset > limit.bytes:
        logger.info("%s: the partial file is larger than the file may be; starting again", part)
        part.unlink()
        offset = 0
    headers = {"User-Agent": "pylandmark", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            total = _content_range_total(err.headers.get("Content-Range"))
            err.close()
            if total == offset:
                logger.debug("%s: the partial file is already complete", part)
                return False, total
            logger.info("%s: the server cannot resume from byte %d; starting again", url, offset)
            return True, None
        err.close()
        raise DownloadError(f"could not download {url}: HTTP {err.code} {err.reason}. "
                            f"{_hint(url, dest, expected)}") from err
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"could not download {url}: {reason}. "
                            f"{_hint(url, dest, expected)}") from err

    with response:
        status = getattr(response, "status", None) or 200
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        # the bytes this response must carry: Content-Length, or the end of its Content-Range
        body_end: int | None
        if status == 206:
            content_range = response.headers.get("Content-Range")
            got = f"Content-Range {content_range!r}" if content_range else "no Content-Range"
            if not offset:
                raise DownloadError(
                    f"could not download {url}: the server answered 206 Partial Content ({got}, "
                    f"Content-Length {length}) to a request for the whole file, expected 200 with all "
                    f"of it; nothing was saved. {_hint(url, dest, expected)}")
            start, end, total = _content_range(content_range)
            if start != offset or end is None or (length is not None and length != end + 1 - start):
                logger.info("%s: asked for the bytes from %d on, the server answered 206 with %s and "
                            "Content-Length %s; starting again", url, offset, got, length)
                return True, None
            body_end, mode = end + 1, "ab"
            logger.info("resuming %s at byte %d", url, offset)
        else:
            if offset:
                logger.info("%s: the server ignored the range request; downloading from the "
                            "start", url)
            offset, total, body_end, mode = 0, length, length, "wb"
        limit.check(total if total is not None else body_end, url, dest)
        done = offset
        window_start, window_done = time.monotonic(), done
        read = getattr(response, "read1", response.read)
        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=dest.name, disable=not progress, leave=False)
        try:
            with open(part, mode) as f:
                while True:
                    try:
                        # at most one byte past the limit: enough to know it was passed; read1
                        # returns what has arrived, so a slow server cannot stall one call
                        block = read(min(_CHUNK, limit.bytes + 1 - done))
                    except (OSError, http.client.HTTPException) as err:
                        raise DownloadError(
                            f"the download of {url} broke off after {done} bytes ({err!r}); "
                            f"run again to resume from {part}. {_hint(url, dest, expected)}"
                        ) from err
                    if not block:
                        break
                    f.write(block)
                    done += len(block)
                    bar.update(len(block))
                    elapsed = time.monotonic() - window_start
                    if elapsed >= RATE_WINDOW_S:
                        if (done - window_done) / elapsed < limit.min_rate:
                            raise DownloadError(
                                f"the download of {url} is too slow ({(done - window_done) / elapsed:.0f} "
                                f"bytes/s over {elapsed:.0f} s, less than min_rate={limit.min_rate:.0f}); "
                                f"stopped after {done} bytes, run again to resume from {part}. "
                                f"{_hint(url, dest, expected)}")
                        window_start, window_done = time.monotonic(), done
                    if done > limit.bytes:
                        if limit.exact:
                            raise ChecksumError(f"{url} sent more than the expected {limit.bytes} bytes; "
                                                "not the expected file")
                        raise _TooLarge(f"{url} sent more than max_bytes={limit.bytes} bytes; stopped "
                                        "and deleted the partial file (pass a larger max_bytes if expected)")
        finally:
            bar.close()
    announced = [n for n in (body_end, total) if n is not None]
    if any(done > n for n in announced):
        raise ChecksumError(f"{url} sent {done - offset} bytes from byte {offset} on, more than it announced "
                            f"(Content-Length {length}, total {total}); not a file that can be trusted")
    if any(done < n for n in announced):
        raise DownloadError(f"the download of {url} is incomplete ({done} of {max(announced)} bytes); run "
                            f"again to resume from {part}. {_hint(url, dest, expected)}")
    return False, total


def _content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """``bytes start-end/total`` -> (start, end, total); (None, None, None) when malformed or
    inconsistent (end before start, or not inside the total); total is None for ``*``."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None, None
    start, end = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if end < start or (total is not None and end >= total):
        return None, None, None
    return start, end, total


def _content_range_total(value: str | None) -> int | None:
    m = re.fullmatch(r"\s*bytes\s+\*/(\d+)\s*", value or "")
    return int(m.group(1)) if m else None


def extract_tar(archive: str | Path, out: str | Path,
                target: Callable[[PurePosixPath], PurePosixPath | None], *,
                max_bytes: int | None = None) -> int:
    """Extracts regular files of a tar archive under ``out``, resumably and safely.

    ``target(member_path)`` says where each member goes, relative to ``out`` (None: skip it).
    Absolute paths, ``..``, links and devices are skipped with a warning; files already present
    with the member's size are kept; each file is written under a temporary name and renamed, so
    an interrupted extraction never leaves a truncated file under the real name. The members
    taken may add up to ``max_bytes`` (default: 4 x the archive's size + 64 MiB; image archives
    barely compress), so a small compressed archive cannot fill the disk. Returns the number of
    files written.

    Raises:
        ValueError: the archive expands past ``max_bytes`` (files extracted so far are kept).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if max_bytes is None:
        max_bytes = ARCHIVE_RATIO * os.path.getsize(archive) + ARCHIVE_SLACK
    written = 0
    total = 0
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            if not member.isreg():
                continue
            path = PurePosixPath(member.name)
            if path.is_absolute() or ".." in path.parts or not path.parts:
                logger.warning("%s: skipping unsafe member %r", archive, member.name)
                continue
            rel = target(path)
            if rel is None or not rel.parts:
                continue
            dest = out.joinpath(*rel.parts)
            total += member.size
            if total > max_bytes:
                raise ValueError(f"{archive} expands to more than {max_bytes} bytes (at {member.name!r}); "
                                 "not the expected archive, or pass a larger max_bytes")
            if dest.is_file() and dest.stat().st_size == member.size:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            if src is None:
                continue
            tmp = dest.with_name(dest.name + ".tmp")
            try:
                with src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.replace(tmp, dest)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            written += 1
    return written
