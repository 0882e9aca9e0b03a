"""The files the pipelines read and write: image inputs given on the command line, image paths
as an index stores them, and the descriptor files of ``pylandmark extract``."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._files import replaced_atomically

__all__ = ["expand_images", "stored_paths", "descriptor_files", "save_descriptors"]


def expand_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given and image files found under folders (sorted); errors on missing paths."""
    from ..data.images import list_images

    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = list_images(p)
            if not found:
                raise FileNotFoundError(f"no images (.jpg, .png, ...) under {p}")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such image or folder: {p}")
    if not out:
        raise ValueError("no images given")
    return out


def stored_paths(paths: Sequence[Path]) -> list[str]:
    """Image paths as an index stores them: absolute, so they resolve from any directory."""
    return [str(Path(p).resolve()) for p in paths]


def descriptor_files(out: str | Path) -> tuple[Path, Path]:
    """The two files ``pylandmark extract --out OUT`` writes: the array where ``np.save(OUT)``
    would put it (``.npy`` appended when missing) and the listing ``<OUT>.paths.txt``."""
    out = Path(out)
    return (out if out.suffix == ".npy" else out.with_name(out.name + ".npy")), out.with_suffix(".paths.txt")


def save_descriptors(out: str | Path, descriptors: np.ndarray, paths: Sequence[Any]) -> tuple[Path, Path]:
    """Writes ``pylandmark extract``'s outputs: the (N, D) array as ``.npy`` and one path per
    line in ``<out>.paths.txt``, each through a temporary file (a failure keeps the old pair).
    Returns both paths."""
    target, listing = descriptor_files(out)
    with replaced_atomically(target) as tmp, replaced_atomically(listing) as tmp_list:
        with open(tmp, "wb") as f:
            np.save(f, descriptors)
        tmp_list.write_text("".join(f"{p}\n" for p in paths))
    return target, listing
