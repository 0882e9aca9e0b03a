"""Measuring: the metrics (:mod:`.metrics`, numpy only) and the one revisited Oxford / Paris
evaluation loop (:mod:`.protocol`: describe, optionally re-rank, search, score), which the CLI,
the torchrun jobs and training's validation all run."""
from __future__ import annotations

from .._lazy import lazy_exports
from .metrics import (
    CONFUSION_TABLE_MAX,
    PROTOCOLS,
    accuracy,
    compute_ap,
    confusion,
    confusion_summary,
    format_comparison,
    format_confused_pairs,
    format_confusion,
    format_table,
    gap,
    recognition_metrics,
    revisited,
)

__all__ = ["PROTOCOLS", "revisited", "compute_ap", "format_table", "format_comparison", "gap", "accuracy", "confusion",
           "format_confusion", "confusion_summary", "format_confused_pairs", "CONFUSION_TABLE_MAX",
           "recognition_metrics", "evaluate_revisited"]

# the loop needs torch and the network stack: imported on first use
__getattr__ = lazy_exports(__name__, globals(), {"evaluate_revisited": ("protocol", "evaluate_revisited")})
