"""Results a person can look at: self-contained HTML pages and evaluation figures.

- :mod:`.results`: pages of recognize / search results (``pylandmark report``, ``--html``).
- :mod:`.plots`: per-query AP and precision-recall figures, and the worst queries page
  (``pylandmark evaluate --plots``; figures need ``pip install "pylandmark[plots]"``).
- :mod:`.html`, :mod:`.thumbs`: the page building blocks and bounded thumbnailing.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_results": "results",
    "render_report": "results",
    "write_report": "results",
    "summarize": "results",
    "truth_from_folders": "results",
    "write_evaluation_plots": "plots",
    "pr_curve": "plots",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pylandmark.report' has no attribute {name!r}")
