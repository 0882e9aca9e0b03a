"""One parser for device names, shared by the CLI, extraction, network loading and training."""
from __future__ import annotations

import re
from typing import Any

__all__ = ["resolve_device", "DEVICE_HELP"]

DEVICE_HELP = "auto (CUDA when available), cpu, cuda or cuda:N"
_SPEC = re.compile(r"(cpu|cuda)(?::(\d{1,4}))?")


def resolve_device(spec: Any, *, cuda_index: int | None = None) -> Any:
    """The torch.device named by ``spec``, checked against this machine.

    Args:
        spec: "auto" (CUDA when torch sees a device, else the CPU), "cpu", "cuda", "cuda:N",
            or a torch.device.
        cuda_index: the device "auto" and a bare "cuda" mean (e.g. the local rank under
            torchrun); None: torch's current device.

    Raises:
        ValueError: (one line) an unknown name, CUDA asked for where torch has none, or a CUDA
            index beyond the devices present.
    """
    import torch

    text = str(spec) if isinstance(spec, torch.device) else spec
    if not isinstance(text, str):
        raise TypeError(f"device must be a string ({DEVICE_HELP}), got {type(spec).__name__}")
    name = text.strip().lower()
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        name = "cuda"
    m = _SPEC.fullmatch(name)
    if m is None:
        hint = "; for the GPU use cuda" if name in ("gpu", "nvidia", "cuda:", "gpu:0") else ""
        raise ValueError(f"device must be {DEVICE_HELP}, got {text!r}{hint}")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        if index not in (None, "0"):
            raise ValueError(f"device {text!r}: there is one CPU device, cpu")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = ("this torch was built without CUDA" if torch.version.cuda is None
               else "torch sees no CUDA device (no GPU, no driver, or CUDA_VISIBLE_DEVICES hides them)")
        raise ValueError(f"device {text!r}: {why}; use cpu or auto")
    count = torch.cuda.device_count()
    if index is not None:
        if int(index) >= count:
            raise ValueError(f"device {text!r}: this machine has {count} CUDA device(s), cuda:0 .. cuda:{count - 1}")
        return torch.device("cuda", int(index))
    return torch.device("cuda", cuda_index) if cuda_index is not None else torch.device("cuda")
