"""A class-per-folder image dataset: ``<root>/<class>/<image>``.

Used for recognition benchmarks such as a database from ``train/<class>/`` and queries from
``test/<class>/``.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["LabelledFolder", "IMAGE_EXTENSIONS"]

#: the file name endings read as images (their one definition; data.images lists folders with it);
#: each names a format in data.images.RASTER_FORMATS, the only formats decoded
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class LabelledFolder:
    """Image paths and class labels from ``<root>/<class>/*.<image extension>``.

    Classes are the sub-folders of ``root`` (sorted by name); images are the files directly
    inside each class folder whose extension (any case) is in ``extensions``, sorted by name.
    Hidden files and folders (starting with ".") and files directly under ``root`` are ignored;
    class folders without images are left out (with a warning). The order is deterministic:
    by class, then by file name.

    Args:
        root: the folder holding one sub-folder per class.
        extensions: accepted file extensions (with the dot, any case).
        loader: optional callable ``path -> image``; when given, ``dataset[i]`` returns
            ``(loader(path), label)`` instead of ``(path, label)``.

    Attributes:
        root: the root folder.
        classes: sorted class names that have images.
        class_to_idx: class name -> index into ``classes``.
        paths: (N,) image paths.
        labels: (N,) class name of each image.
        targets: (N,) int64 class index of each image.
    """

    def __init__(self, root: str | os.PathLike, *, extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
                 loader: Callable[[Path], Any] | None = None) -> None:
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a path, got {type(root).__name__}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"root {self.root} is not a directory; pass the folder that "
                                    "holds one sub-folder per class")
        if isinstance(extensions, str) or not extensions:
            raise ValueError(f"extensions must be a non-empty tuple such as ('.jpg', '.png'), got "
                             f"{extensions!r}")
        exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
        if loader is not None and not callable(loader):
            raise TypeError(f"loader must be callable (path -> image), got {type(loader).__name__}")
        self.loader = loader

        paths: list[Path] = []
        labels: list[str] = []
        classes: list[str] = []
        for class_dir in sorted(p for p in self.root.iterdir()
                                if p.is_dir() and not p.name.startswith(".")):
            files = sorted(f for f in class_dir.iterdir()
                           if not f.name.startswith(".") and f.suffix.lower() in exts
                           and f.is_file())
            if not files:
                logger.warning("LabelledFolder: class folder %s has no images; leaving it out",
                               class_dir)
                continue
            classes.append(class_dir.name)
            paths.extend(files)
            labels.extend([class_dir.name] * len(files))
        if not paths:
            raise FileNotFoundError(f"no images found under {self.root}/<class>/ (extensions "
                                    f"{sorted(exts)})")
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.paths = paths
        self.labels = labels
        self.targets = np.array([self.class_to_idx[c] for c in labels], dtype=np.int64)
        logger.debug("LabelledFolder %s: %d images in %d classes", self.root, len(paths),
                     len(classes))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, str]:
        path = self.paths[i]
        label = self.labels[i]
        return (self.loader(path) if self.loader is not None else path), label

    def __iter__(self) -> Iterator[tuple[Any, str]]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return (f"LabelledFolder(root={str(self.root)!r}, images={len(self)}, "
                f"classes={len(self.classes)})")
