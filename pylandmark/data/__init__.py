"""Datasets and image loading. Names load on first use (torch/PIL are imported only then)."""
from __future__ import annotations

from .._lazy import lazy_exports

# public name -> submodule of pylandmark.data that defines it; add one line per export
_EXPORTS: dict[str, str] = {
    "load_image": "images",
    "open_image": "images",
    "to_rgb": "images",
    "resize_image": "images",
    "resized_size": "images",
    "crop_box": "images",
    "to_tensor": "images",
    "prepare_image": "images",
    "list_images": "images",
    "ImageList": "images",
    "ImageLoadError": "images",
    "LoadFailure": "images",
    "RevisitedDataset": "revisited",
    "download_revisited": "revisited",
    "load_gnd": "revisited",
    "LabelledFolder": "folders",
    "SfM120k": "sfm120k",
    "WhiteningPairs": "sfm120k",
    "download_sfm120k": "sfm120k",
    "load_sfm_pickle": "sfm120k",
    "ColmapPairs": "colmap",
    "colmap_pairs": "colmap",
    "write_sfm_database": "colmap",
    "colmap_to_sfm": "colmap",
    "make_sfm_dataset": "synthetic",
    "make_revisited_dataset": "synthetic",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, globals(), {name: (module, name) for name, module in _EXPORTS.items()})
