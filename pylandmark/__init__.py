"""pylandmark: landmark recognition by image search.

``search`` and ``gem`` run native kernels; the torch-based parts load on first use, so
``import pylandmark`` stays light (no torch import).
"""
from __future__ import annotations

import importlib
from typing import Any

from ._native import load_native as _load_native

_load_native()
from ._version import __version__  # noqa: E402
from .ops import cuda_available, gem, get_num_threads, search, set_num_threads  # noqa: E402

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

__all__ = ["__version__", "search", "gem", "cuda_available", "get_num_threads", "set_num_threads",
           *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = importlib.import_module(f".{module_name}", __name__)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pylandmark' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
