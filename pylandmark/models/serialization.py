"""Reading checkpoint files (torch.save and safetensors) without running code from them.

``torch.load(weights_only=True)`` rebuilds tensors and plain containers only. Retrieval
checkpoints (cirtorch's) also hold numpy arrays (the precomputed whitening), so exactly the
globals that rebuild a numpy array are allowed on top: ``_reconstruct`` (under its numpy 1 and
numpy 2 module names), ``ndarray``, ``dtype`` and the float dtype classes. Nothing else that a
file names is ever imported or called.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["safe_torch_load", "numpy_safe_globals", "read_state_dict", "looks_like_safetensors"]


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


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads ``{name: tensor}`` from a ``.safetensors`` file or a torch.save file, never
    unpickling arbitrary objects (``weights_only=True``)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or looks_like_safetensors(head):
        try:
            from safetensors.torch import load_file
        except ImportError as err:  # pragma: no cover
            raise ImportError(f"{path} is a safetensors file; pip install safetensors") from err
        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"cannot read {path} as safetensors: {str(err).splitlines()[0][:200]}") from None
    obj = safe_torch_load(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a dict of tensors")
    return dict(obj)


def _named_tensors(state: Mapping[str, Any], path: Path) -> Mapping[str, torch.Tensor]:
    """A LandmarkNet weights file holds a flat state_dict: names and tensors only."""
    bad = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ValueError(f"{path} holds {type(state[bad]).__name__} under {str(bad)[:80]!r}; expected only "
                         "named tensors (a state_dict)")
    return state


def looks_like_safetensors(head: bytes) -> bool:
    """Whether the first bytes of a file (at least 9) look like a safetensors header."""
    # 8-byte little-endian header length followed by a JSON object
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30
