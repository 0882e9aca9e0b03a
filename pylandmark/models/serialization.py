"""Reading torch checkpoint files without running code from them.

``torch.load(weights_only=True)`` rebuilds tensors and plain containers only. Retrieval
checkpoints (cirtorch's) also hold numpy arrays (the precomputed whitening), so exactly the
globals that rebuild a numpy array are allowed on top: ``_reconstruct`` (under its numpy 1 and
numpy 2 module names), ``ndarray``, ``dtype`` and the float dtype classes. Nothing else that a
file names is ever imported or called.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["safe_torch_load", "numpy_safe_globals"]


def numpy_safe_globals() -> list[Any]:
    """The numpy globals a pickled float ndarray needs, as ``torch.serialization.safe_globals``
    takes them (``(object, "module.name")`` pairs where numpy 1 files spell the name differently)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    reconstruct = core.multiarray._reconstruct
    out: list[Any] = [(reconstruct, "numpy.core.multiarray._reconstruct"),
                      (reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: a class per dtype
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in ("Float16DType", "Float32DType", "Float64DType")
                if hasattr(dtypes, n)]
    return out


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU with numpy float arrays allowed.

    Raises:
        ValueError: the file is not such a checkpoint (the message names the file; a file that
            needs other globals is refused, never unpickled in full).
    """
    try:
        with torch.serialization.safe_globals(numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure of an untrusted file is a bad file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        detail = next((ln.strip() for ln in str(err).splitlines()
                       if "Unsupported global" in ln or "allowlisted" in ln), first)
        raise ValueError(f"cannot read {path} as a tensors-only torch checkpoint: {detail}") from err
