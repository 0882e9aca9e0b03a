"""Image loading for descriptor extraction: decode, orient, convert to RGB, crop, resize, normalise.

The test protocol of the reference method: the longer side is resized to ``image_size``
(LANCZOS, never upscaled); a query is first cropped to its bounding box and resized so that the
crop keeps its scale relative to the full image (target ``image_size * max(crop side) /
max(full side)``). Pixels are scaled to [0, 1] and normalised with the ImageNet mean / std.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .._checks import check_number
from .folders import IMAGE_EXTENSIONS

__all__ = ["ImageLoadError", "RASTER_FORMATS", "open_raster", "open_image", "to_rgb", "crop_box", "resized_size",
           "resize_image", "to_tensor", "prepare_image", "load_image", "ImageList", "LoadFailure", "list_images",
           "IMAGE_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD"]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BBox = Sequence[float]

#: the only formats decoded, by PIL plugin name ("PPM" also reads PGM and PBM); the one list, used
#: by :func:`open_raster`. Every other plugin stays untried, whatever the bytes claim: PIL would
#: hand PostScript (EPS) to Ghostscript, a program. ``folders.IMAGE_EXTENSIONS`` names files of
#: these formats only.
RASTER_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM")


class ImageLoadError(OSError):
    """An image file exists but cannot be decoded (corrupt, truncated, not an image)."""


def _check_size(image_size: Any, name: str = "image_size") -> float | None:
    check_number(image_size, name, minimum=1, none_ok=True, hint=" (pixels)")
    return image_size


def open_raster(fp: str | os.PathLike | IO[bytes], name: str) -> Image.Image:
    """``PIL.Image.open`` restricted to :data:`RASTER_FORMATS`: the one place pylandmark opens an
    image (files, uploads, thumbnails). Lazy as PIL is: only the header has been read.

    Raises:
        ImageLoadError: the data is not in one of those formats (the message names ``name``).
    """
    try:
        return Image.open(fp, formats=RASTER_FORMATS)
    except UnidentifiedImageError:
        raise ImageLoadError(f"{name} is not an image in a supported format "
                             f"({', '.join(RASTER_FORMATS)})") from None


def open_image(path: str | os.PathLike) -> Image.Image:
    """Decodes an image file into an RGB PIL image, upright per its EXIF orientation.

    Raises:
        FileNotFoundError: no file at ``path``.
        ImageLoadError: the file is corrupt, truncated or not an image (the message names it).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image file not found: {p}")
    try:
        with open_raster(p, str(p)) as im:
            im.load()  # decodes fully: truncated data raises here, not later
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except ImageLoadError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        reason = str(err).replace(f"'{p}'", "it").replace(str(p), "it") or type(err).__name__
        raise ImageLoadError(f"cannot read image {p}: {reason}") from err  # names the file once


def to_rgb(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Converts any PIL mode to 8-bit RGB.

    - modes with alpha (RGBA, LA, PA, P with transparency, ...) are composited over
      ``background`` (the colour of fully transparent pixels is undefined, so it must not leak);
    - 16/32-bit integer modes (I;16*, I) are scaled from 0..65535 to 0..255; float mode F is
      taken as 0..1 when its maximum is <= 1, else as 0..255;
    - everything else (L, 1, P, CMYK, YCbCr, LAB, HSV) goes through PIL's conversion.
    """
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        if mode == "F":
            a = a * 255.0 if (a.size and np.nanmax(a) <= 1.0) else a
        else:
            a = a / 257.0
        a = np.clip(np.nan_to_num(a), 0, 255)
        g = np.rint(a).astype(np.uint8)
        return Image.fromarray(np.repeat(g[..., None], 3, axis=2), "RGB")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def crop_box(size: tuple[int, int], bbox: BBox) -> tuple[int, int, int, int]:
    """Integer crop box (x1, y1, x2, y2) for a (W, H) image: coordinates rounded as PIL's
    ``crop`` rounds them, then clipped to the image. Raises ValueError if it is empty."""
    try:
        vals = [float(v) for v in bbox]
    except (TypeError, ValueError) as err:
        raise TypeError(f"bbox must be 4 numbers (x1, y1, x2, y2), got {bbox!r}") from err
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"bbox must be 4 finite numbers (x1, y1, x2, y2), got {bbox!r}")
    w, h = size
    x1, y1, x2, y2 = (int(round(v)) for v in vals)
    x1, x2 = max(0, min(x1, w)), max(0, min(x2, w))
    y1, y2 = max(0, min(y1, h)), max(0, min(y2, h))
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"bbox {tuple(vals)} leaves no pixels of a {w}x{h} image; it must satisfy "
                         "x1 < x2, y1 < y2 and overlap the image")
    return x1, y1, x2, y2


def resized_size(size: tuple[int, int], image_size: float | None) -> tuple[int, int]:
    """(W, H) after fitting the longer side into ``image_size`` without upscaling.

    Same rule as PIL's ``thumbnail``: the target is ``floor(image_size)``; the shorter side is
    the floor or ceiling of its scaled length, whichever keeps the aspect ratio best.
    """
    w, h = size
    if image_size is None:
        return w, h
    t = int(math.floor(image_size))
    if max(w, h) <= t:
        return w, h
    aspect = w / h
    if w >= h:
        exact = t / aspect
        nh = min((math.floor(exact), math.ceil(exact)), key=lambda n: abs(aspect - t / n) if n else math.inf)
        return t, max(nh, 1)
    exact = t * aspect
    nw = min((math.floor(exact), math.ceil(exact)), key=lambda n: abs(aspect - n / t))
    return max(nw, 1), t


def resize_image(im: Image.Image, image_size: float | None) -> Image.Image:
    """Fits the longer side into ``image_size`` (LANCZOS on the full-resolution pixels, no
    reducing gap); images already small enough are returned unchanged."""
    new = resized_size(im.size, image_size)
    if new == im.size:
        return im
    return im.resize(new, Image.Resampling.LANCZOS)


def _target_size(full: tuple[int, int], crop: tuple[int, int, int, int] | None,
                 image_size: float | None) -> tuple[tuple[int, int], float | None]:
    """(size before resizing, resize target) for an image of size ``full`` and a crop."""
    if crop is None:
        return full, image_size
    cw, ch = crop[2] - crop[0], crop[3] - crop[1]
    if image_size is None:
        return (cw, ch), None
    return (cw, ch), image_size * max(cw, ch) / max(full)


def to_tensor(im: Image.Image, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """RGB PIL image -> normalised float32 tensor (3, H, W): ``(pixel / 255 - mean) / std``."""
    if im.mode != "RGB":
        raise ValueError(f"im must be an RGB image, got mode {im.mode!r}; convert it with to_rgb()")
    a = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor([float(v) for v in mean]).view(3, 1, 1)
    s = torch.tensor([float(v) for v in std]).view(3, 1, 1)
    return a.sub_(m).div_(s)


def prepare_image(im: Image.Image, image_size: float | None = 1024, bbox: BBox | None = None,
                  mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) tensor: optional bbox crop (scale kept), resize, normalise."""
    image_size = _check_size(image_size)
    full = im.size
    crop = crop_box(full, bbox) if bbox is not None else None
    if crop is not None:
        im = im.crop(crop)
    _, target = _target_size(full, crop, image_size)
    return to_tensor(resize_image(im, target), mean, std)


def load_image(path: str | os.PathLike, image_size: float | None = 1024, bbox: BBox | None = None, *,
               mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Reads an image file into a normalised (3, H, W) float32 tensor.

    Args:
        path: image file (one of :data:`RASTER_FORMATS`; EXIF orientation applied; any mode -> RGB).
        image_size: longer side after resizing (never upscaled); None keeps the size.
        bbox: optional (x1, y1, x2, y2) crop in pixels of the upright image; the crop is resized
            to ``image_size * max(crop side) / max(full side)`` so it keeps its scale.
        mean, std: per-channel normalisation (RGB, 0..1 scale).

    Returns:
        (3, H, W) float32 with max(H, W) <= image_size.

    Raises:
        FileNotFoundError / ImageLoadError naming the file.
    """
    image_size = _check_size(image_size)
    return prepare_image(open_image(path), image_size, bbox, mean, std)


def list_images(folder: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by path; matched by extension."""
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"folder: not a directory: {root}")
    exts = {e.lower() for e in extensions}
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)


class LoadFailure:
    """Returned by :class:`ImageList` in place of an image when ``on_error="skip"``."""

    __slots__ = ("index", "source", "message")

    def __init__(self, index: int, source: str, message: str):
        self.index, self.source, self.message = index, source, message

    def __repr__(self) -> str:
        return f"LoadFailure(index={self.index}, source={self.source!r}, message={self.message!r})"


class ImageList(torch.utils.data.Dataset):
    """Image files as a dataset of ``(index, (3, H, W) tensor)`` pairs.

    Args:
        paths: image files.
        image_size: longer side after resizing (never upscaled); None keeps the size.
        bboxes: None, or one (x1, y1, x2, y2) or None per image (query crops).
        mean, std: normalisation.
        on_error: "raise" (default) raises FileNotFoundError / ImageLoadError naming the file;
            "skip" returns a :class:`LoadFailure` in place of the tensor.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], image_size: float | None = 1024,
                 bboxes: Sequence[BBox | None] | None = None, *, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, on_error: str = "raise"):
        if isinstance(paths, (str, os.PathLike)):
            raise TypeError("paths must be a sequence of files; for a folder use list_images(folder)")
        self.paths = [Path(p) for p in paths]
        self.image_size = _check_size(image_size)
        if bboxes is not None and len(bboxes) != len(self.paths):
            raise ValueError(f"bboxes has {len(bboxes)} entries but there are {len(self.paths)} paths; "
                             "give one bbox (or None) per image")
        self.bboxes = list(bboxes) if bboxes is not None else None
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.on_error = on_error
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | LoadFailure]:
        bbox = self.bboxes[index] if self.bboxes is not None else None
        try:
            return index, load_image(self.paths[index], self.image_size, bbox, mean=self.mean, std=self.std)
        except (OSError, ValueError) as err:
            if self.on_error == "raise":
                raise
            return index, LoadFailure(index, str(self.paths[index]), str(err))
