"""The run log of a training run: one row per epoch to the console, ``log.csv``, ``log.jsonl`` and
optionally TensorBoard."""
from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._files import replaced_atomically

__all__ = ["RunLog", "format_row"]

logger = logging.getLogger(__name__)


class RunLog:
    """Console / CSV / JSON-lines / TensorBoard log of the epochs (rank 0 only)."""

    def __init__(self, out: Path, tensorboard: bool, enabled: bool):
        self.out, self.enabled = out, enabled
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                logger.warning("tensorboard=True but the 'tensorboard' package is not installed "
                               "(pip install tensorboard); logging to CSV / JSON only")

    def write(self, history: Sequence[Mapping[str, Any]]) -> None:
        if not self.enabled:
            return
        keys: list[str] = []
        for row in history:
            keys.extend(k for k in row if k not in keys)
        with replaced_atomically(self.out / "log.csv") as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for row in history:
                w.writerow({k: row.get(k, "") for k in keys})
        with replaced_atomically(self.out / "log.jsonl") as tmp, open(tmp, "w") as f:
            for row in history:
                f.write(json.dumps(row) + "\n")
        if self.writer is not None and history:
            row = history[-1]
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k, v, int(row["epoch"]))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_row(row: Mapping[str, Any]) -> str:
    parts = [f"epoch {row['epoch']}"]
    if "loss" in row:
        parts.append(f"loss {row['loss']:.4f}  lr {row['lr']:.3g}  p {row['p']:.3f}  time {row['epoch_s']:.1f}s "
                     f"(mining {row['mining_s']:.1f}s)  {row['images_per_s']:.1f} img/s")
    for k, v in row.items():
        if k.startswith(("val_", "roxford", "rparis")):
            parts.append(f"{k} {100 * v:.2f}")
    return "  ".join(parts)
