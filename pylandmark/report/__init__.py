"""Results a person can look at: self-contained HTML pages and evaluation figures.

- :mod:`.results`: pages of recognize / search results (``pylandmark report``, ``--html``).
- :mod:`.plots`: per-query AP and precision-recall figures, and the worst queries page
  (``pylandmark evaluate --plots``; figures need ``pip install "pylandmark[plots]"``).
- :mod:`.html`, :mod:`.thumbs`: the page building blocks and bounded thumbnailing.
"""
from __future__ import annotations

from .._lazy import lazy_exports

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


__getattr__ = lazy_exports(__name__, globals(), {name: (module, name) for name, module in _EXPORTS.items()})
