"""Bounded decoding of untrusted image data (uploads, files named by result or index files).

``decode_image`` reads only the header before checking the pixel count, so a decompression
bomb (a small file that claims a huge image) is refused before any pixel is decoded; truncated
or non-image data, and data in a format outside
:data:`~pylandmark.data.images.RASTER_FORMATS` (opened by
:func:`~pylandmark.data.images.open_raster`, so no other PIL plugin is tried) raise
:class:`~pylandmark.data.images.ImageLoadError`. The decoded image goes
through the same steps as :func:`pylandmark.data.images.open_image` (full decode, EXIF
orientation, RGB), so descriptors of uploaded bytes equal those of the same file on disk.
"""
from __future__ import annotations

import io
import os
import struct
import warnings
from pathlib import Path
from typing import IO

from PIL import Image, ImageOps

from .images import ImageLoadError, open_raster, to_rgb

__all__ = ["ImageTooLarge", "decode_image", "DEFAULT_MAX_PIXELS"]

DEFAULT_MAX_PIXELS = 64_000_000  # a 64-megapixel photo; 256 MB of RGBA at most while decoding


class ImageTooLarge(ImageLoadError):
    """The image claims more pixels than allowed (a decompression bomb, or simply too big)."""


def decode_image(source: bytes | str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 name: str = "image", draft: int | None = None) -> Image.Image:
    """Decodes image bytes or a file into an upright 8-bit RGB PIL image.

    Args:
        source: the encoded bytes, or a path to a regular file.
        max_pixels: most width * height accepted (checked from the header, before decoding).
        name: how error messages name the image (an upload's file name, a path).
        draft: for thumbnails only: lets JPEG decoding skip detail finer than this many pixels
            on the longer side (much faster on large photos; never use it for descriptors).

    Raises:
        ImageTooLarge: more than ``max_pixels`` pixels.
        ImageLoadError: not an image in one of ``RASTER_FORMATS``, truncated, or corrupt (the
            message names ``name``).
        FileNotFoundError: ``source`` is a path and no regular file is there.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be an int >= 1, got {max_pixels!r}")
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageLoadError(f"{name} is empty (0 bytes); send the image file's contents")
        stream: IO[bytes] = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        stream = open(path, "rb")  # noqa: SIM115 - closed below, PIL reads lazily
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit; ours is checked below and may be larger
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_raster(stream, name) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageTooLarge(f"{name} is {w} x {h} pixels, more than the {max_pixels:,} allowed")
                if draft is not None and im.format == "JPEG":
                    im.draft("RGB", (draft, draft))
                im.load()
                im = ImageOps.exif_transpose(im)
                return to_rgb(im)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"{name} is too large to decode ({err})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, ZeroDivisionError,
            struct.error) as err:
        raise ImageLoadError(f"{name} is unreadable ({err})") from None
    finally:
        stream.close()

