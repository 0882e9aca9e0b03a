"""pylandmark: landmark recognition by image search.

``search`` and ``gem`` run native kernels; the torch-based parts load on first use, so
``import pylandmark`` stays light (no torch import).
"""
from __future__ import annotations

from ._lazy import lazy_exports
from ._native import load_native as _load_native

_load_native()
from ._version import __version__  # noqa: E402
from .ops import PreparedDatabase, cuda_available, gem, get_num_threads, prepare, search, set_num_threads  # noqa: E402

# name -> (module, attribute or None for the module itself), imported on first access
_LAZY = {
    "nn": ("nn", None),
    "models": ("models", None),
    "data": ("data", None),
    "evaluate": ("evaluate", None),
    "extract": ("extraction", "extract"),
    "recognize": ("retrieval.recognition", "recognize"),
    "Index": ("retrieval.index", "Index"),
    "retrieval": ("retrieval", None),
    "training": ("training", None),
    "distributed": ("distributed", None),
    "train": ("training", "train"),
}

__all__ = ["__version__", "search", "prepare", "PreparedDatabase", "gem", "cuda_available", "get_num_threads",
           "set_num_threads", *_LAZY]


__getattr__ = lazy_exports(__name__, globals(), _LAZY)


def __dir__() -> list[str]:
    return sorted(__all__)
