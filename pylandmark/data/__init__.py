"""Datasets and image loading. Names load on first use (torch/PIL are imported only then)."""
from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule of pylandmark.data that defines it; add one line per export
_EXPORTS: dict[str, str] = {
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pylandmark.data' has no attribute {name!r}")
