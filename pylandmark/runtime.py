"""Where the work runs: device names, the torchrun launch, and the torch.distributed helpers
every layer uses (the bottom of the torch stack; torch is imported on first use, so the CLI can
name devices and read the launch without it).

``torchrun --nproc_per_node N ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT``; :func:`init_from_env` joins the process group (NCCL on the GPU, gloo on the
CPU). Without them everything runs in one process and the collectives are no-ops. The public
face of these helpers, with the sharded search, is :mod:`pylandmark.distributed`.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["resolve_device", "DEVICE_HELP", "launched_world_size", "launched_rank", "launched_local_rank",
           "rank_device", "is_distributed", "world_size", "rank", "local_rank", "is_main", "init_from_env",
           "barrier", "all_gather_rows", "broadcast_object", "all_reduce_sum", "all_gather_objects",
           "broadcast_tensor", "share_bounds", "share_range", "gather_shares", "comm_device"]

logger = logging.getLogger(__name__)


def _dist() -> Any:
    import torch.distributed as dist

    return dist


# ---- the launch: torchrun's environment, read in this one place ----------------------------

def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, str(default)))
    except ValueError:
        return default


def launched_world_size() -> int:
    """Processes of the torchrun launch running this one (``WORLD_SIZE``; 1 outside torchrun),
    known before the process group is joined."""
    return max(1, _env_int("WORLD_SIZE", 1))


def launched_rank() -> int:
    """This process's rank in the launch (``RANK``; 0 outside torchrun)."""
    return _env_int("RANK", 0) if launched_world_size() > 1 else 0


def launched_local_rank() -> int:
    """This process's rank on its host (``LOCAL_RANK``; 0 outside torchrun): the GPU it drives."""
    return _env_int("LOCAL_RANK", 0) if launched_world_size() > 1 else 0


def rank_device(spec: Any) -> Any:
    """The torch.device ``spec`` names for this process: as :func:`resolve_device`, where "auto"
    and a bare "cuda" mean the GPU of this rank (cuda:LOCAL_RANK) under torchrun."""
    return resolve_device(spec, cuda_index=launched_local_rank() if launched_world_size() > 1 else None)


# ---- device names --------------------------------------------------------------------------

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


# ---- torch.distributed ---------------------------------------------------------------------

def is_distributed() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Ranks in the joined process group (1 when none is joined)."""
    return _dist().get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the joined process group (0 when none is joined)."""
    return _dist().get_rank() if is_distributed() else 0


def local_rank() -> int:
    """This process's rank on its host in the joined process group (0 when none is joined)."""
    return launched_local_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device_type: str, timeout_s: float = 1800) -> bool:
    """Joins the process group described by torchrun's environment variables.

    Returns True when this call initialised it (the caller should destroy it when done), False
    when there is nothing to do (single process, or already initialised).
    """
    import torch
    dist = _dist()
    if is_distributed() or launched_world_size() <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(launched_local_rank())
    # torch.distributed.nn's functions take ``group=group.WORLD`` as a default argument, read
    # when the module is imported; torch imports it lazily (torch._dynamo, on the first
    # meta-device model build), and imported after this call those defaults would hold the
    # process group past destroy_process_group: its gloo threads then outlive the interpreter,
    # and one dropping its last collective during shutdown aborts the process. Imported now,
    # the defaults are None.
    import torch.distributed.nn  # noqa: F401
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    logger.info("joined process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def barrier() -> None:
    if is_distributed():
        _dist().barrier()


def all_gather_rows(x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Concatenates every rank's (n_r, D) rows in rank order; ``counts[r]`` = n_r (known to all).

    Rows are padded to the largest share for the collective (gloo and NCCL need equal sizes).
    """
    import torch
    dist = _dist()
    if not is_distributed():
        return x
    ws = world_size()
    if len(counts) != ws:
        raise ValueError(f"counts must have one entry per rank ({ws}), got {len(counts)}")
    if x.shape[0] != counts[rank()]:
        raise ValueError(f"this rank holds {x.shape[0]} rows but counts says {counts[rank()]}")
    n_max = max(max(counts), 1)
    dev = x.device
    comm_dev = dev if dist.get_backend() != "gloo" else torch.device("cpu")
    pad = torch.zeros((n_max,) + tuple(x.shape[1:]), dtype=x.dtype, device=comm_dev)
    pad[: x.shape[0]] = x.to(comm_dev)
    if pad.dtype in (torch.float16, torch.bfloat16) and dist.get_backend() == "gloo":
        pad = pad.float()  # gloo lacks some half-precision collectives
    parts = [torch.empty_like(pad) for _ in range(ws)]
    dist.all_gather(parts, pad)
    out = torch.cat([p[:c] for p, c in zip(parts, counts)])
    return out.to(dtype=x.dtype, device=dev)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (picklable, small; rank-local objects only)."""
    dist = _dist()
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """Sums a few numbers over the ranks (float64)."""
    import torch
    dist = _dist()
    if not is_distributed():
        return [float(v) for v in values]
    dev = torch.device("cpu") if dist.get_backend() == "gloo" else torch.device(device)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return [float(v) for v in t.cpu()]


def all_gather_objects(obj: Any) -> list:
    """Every rank's ``obj`` (picklable, small), in rank order, on every rank."""
    dist = _dist()
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def comm_device() -> torch.device:
    """Where collective tensors live: the CPU for gloo, the current CUDA device for NCCL."""
    import torch
    dist = _dist()
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_tensor(x: torch.Tensor | None, src: int = 0) -> torch.Tensor:
    """The tensor rank ``src`` passes (others pass None or anything), on every rank, on
    :func:`comm_device`. Shape and dtype travel first, then the raw bytes (bit-exact for every
    dtype, and gloo has no collectives for some, such as float16 or int16)."""
    import torch
    dist = _dist()
    if not is_distributed():
        if x is None:
            raise ValueError("broadcast_tensor: the source rank must pass a tensor")
        return x
    here = None if rank() != src or x is None else (tuple(x.shape), str(x.dtype).replace("torch.", ""))
    meta = broadcast_object(here, src)
    if meta is None:
        raise ValueError(f"broadcast_tensor: rank {src} passed no tensor")
    shape, dtype_name = meta
    dtype = getattr(torch, dtype_name)
    dev = comm_device()
    nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
    if rank() == src:
        assert x is not None  # meta would be None otherwise
        buf = x.detach().to(dev).contiguous().reshape(-1).view(torch.uint8)
    else:
        buf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    if nbytes:
        dist.broadcast(buf, src)
    return buf.view(dtype).reshape(shape)


def share_bounds(n: int, world: int | None = None) -> list[int]:
    """Contiguous, balanced shares of ``n`` items over the ranks: rank r takes
    ``[bounds[r], bounds[r + 1])`` (sizes differ by at most one, larger shares first)."""
    world = world_size() if world is None else int(world)
    if world < 1 or n < 0:
        raise ValueError(f"share_bounds needs n >= 0 and world >= 1, got {n}, {world}")
    base, extra = divmod(int(n), world)
    bounds = [0]
    for r in range(world):
        bounds.append(bounds[-1] + base + (1 if r < extra else 0))
    return bounds


def share_range(n: int) -> tuple[int, int]:
    """This rank's share ``[lo, hi)`` of ``n`` items (:func:`share_bounds`)."""
    bounds = share_bounds(n)
    r = rank()
    return bounds[r], bounds[r + 1]


def gather_shares(rows: Any, n: int) -> Any:
    """All ``n`` rows on every rank, from each rank's share (``rows``: the (n_r, ...) rows of
    its :func:`share_range` ``(n)``), in order, as ``rows``' type (numpy, or torch on its
    device). Exact for every dtype. In one process: ``rows``."""
    if world_size() == 1:
        return rows
    import torch

    is_tensor = isinstance(rows, torch.Tensor)
    t = rows if is_tensor else torch.from_numpy(np.ascontiguousarray(rows))
    bounds = share_bounds(n)
    counts = [bounds[r + 1] - bounds[r] for r in range(world_size())]
    out = all_gather_rows(t.to(comm_device()), counts)
    return out.to(t.device) if is_tensor else out.cpu().numpy()
