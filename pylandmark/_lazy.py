"""Names a module exports but imports on first use (PEP 562), so that ``import pylandmark``
and its light subpackages do not import torch, PIL or matplotlib before they are needed."""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(module: str, namespace: dict[str, Any], exports: Mapping[str, tuple[str, str | None]],
                 package: str | None = None) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``exports``: name -> (submodule relative to ``package``,
    attribute, or None for the submodule itself). The value is imported on first access and
    kept in ``namespace`` (the module's globals), so later accesses cost nothing.

    ``module`` is the module's own name (for the error message); ``package`` defaults to it,
    which is right for a package's ``__init__``."""
    anchor = package or module

    def __getattr__(name: str) -> Any:
        if name in exports:
            submodule, attr = exports[name]
            imported = importlib.import_module(f".{submodule}", anchor)
            value = imported if attr is None else getattr(imported, attr)
            namespace[name] = value
            return value
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
