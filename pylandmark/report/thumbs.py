"""JPEG thumbnails of image files, for HTML pages and the web service.

Files come from result files and indexes, which may come from elsewhere: only regular files are
read, at most ``max_bytes`` of them, decoding is bounded by ``max_pixels`` (see
:func:`pylandmark.data.decode.decode_image`), and a file that cannot be read yields None, never
an exception.
"""
from __future__ import annotations

import base64
import io
import logging
import os
from pathlib import Path
from typing import Sequence

from ..data.decode import DEFAULT_MAX_PIXELS, decode_image
from ..data.images import ImageLoadError

__all__ = ["thumbnail_jpeg", "data_uri", "resolve_image", "MAX_FILE_BYTES"]

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 64 << 20  # larger files are not photos we thumbnail


def resolve_image(path: str | os.PathLike | None, bases: Sequence[Path] = ()) -> Path | None:
    """The regular file ``path`` names: as given (absolute, or relative to the working folder),
    else relative to each of ``bases`` in turn; None when there is none."""
    if not path:
        return None
    p = Path(path)
    candidates = [p] if p.is_absolute() else [p, *(Path(b) / p for b in bases)]
    for c in candidates:
        try:
            if c.is_file():
                return c
        except OSError:  # name too long, permission denied on a parent, ...
            continue
    return None


def thumbnail_jpeg(source: bytes | str | os.PathLike, size: int = 160, *, quality: int = 85,
                   max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = MAX_FILE_BYTES) -> bytes | None:
    """JPEG bytes of the image fitted into a ``size`` x ``size`` box (aspect kept, never
    upscaled), or None when the source is missing, too large, or not a readable image."""
    if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 2048:
        raise ValueError(f"size must be an int in [8, 2048] (pixels), got {size!r}")
    from PIL import Image

    name = "image"
    if not isinstance(source, (bytes, bytearray, memoryview)):
        name = str(source)
        try:
            st = Path(source).stat()
        except OSError:
            return None
        if st.st_size > max_bytes:
            log.warning("not thumbnailing %s: %d bytes, more than %d", name, st.st_size, max_bytes)
            return None
    try:
        im = decode_image(source, max_pixels=max_pixels, name=name, draft=2 * size)
    except (ImageLoadError, FileNotFoundError) as err:
        log.warning("no thumbnail: %s", err)
        return None
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def data_uri(jpeg: bytes) -> str:
    """A data: URI embedding JPEG bytes (for self-contained HTML)."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
