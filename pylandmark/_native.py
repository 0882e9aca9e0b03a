"""Finds the compiled extension ``pylandmark._C``.

Normally it sits next to this file. When Python runs from a source checkout (the repository
root is on sys.path, so ``import pylandmark`` finds the sources, which hold no compiled
module) and pylandmark is also installed, the installed copy's extension is used; without one
the import fails with one line saying what to do.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from typing import Any

_PACKAGE_DIR = Path(__file__).resolve().parent


def _installed_extensions():
    for entry in sys.path:
        folder = Path(entry or ".").resolve() / "pylandmark"
        if folder == _PACKAGE_DIR or not folder.is_dir():
            continue
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            candidate = folder / f"_C{suffix}"
            if candidate.is_file():
                yield candidate


def load_native() -> None:
    """Makes ``pylandmark._C`` importable (see the module docstring); raises ImportError with the
    fix when no compiled extension exists."""
    if "pylandmark._C" in sys.modules or importlib.util.find_spec("pylandmark._C") is not None:
        return
    for path in _installed_extensions():
        spec = importlib.util.spec_from_file_location("pylandmark._C", path)
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["pylandmark._C"] = module
        sys.modules["pylandmark"]._C = module  # type: ignore[attr-defined]
        return
    raise ImportError(
        f"pylandmark's compiled extension is missing: Python imported the source tree {_PACKAGE_DIR}, which "
        "is not built. Run `pip install .` and start Python outside this folder, or develop with "
        "`pip install -e . --no-build-isolation`.")


def extension() -> Any:
    """The compiled extension module ``pylandmark._C`` (:func:`load_native` first). Modules take
    it from here rather than from the package, so importing it never runs the package's
    ``__init__`` from below."""
    load_native()
    return importlib.import_module("pylandmark._C")
