"""Several processes on torch.distributed (launched by ``torchrun``): training, extraction,
index building and sharded search.

``torchrun --nproc_per_node N -m pylandmark.training ...`` (or ``-m pylandmark <command>``,
or any script calling these functions) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env` then joins the process group (NCCL on
the GPU, gloo on the CPU). Without those variables everything runs in one process and these
helpers are no-ops.

Sharded search (every rank holds one shard of an index; see
:mod:`pylandmark.retrieval.sharded`) is re-exported here::

    import pylandmark as plm
    plm.distributed.init_from_env("cpu")
    index = plm.distributed.DistributedIndex.open("big.plmi")     # this rank's rows only
    scores, ids = index.search(queries, k=5)    # (Q, k) on every rank, = one search of all rows
    result = index.recognize(queries, k=5)      # a Recognition, on every rank
"""
from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from ._lazy import lazy_exports

if TYPE_CHECKING:  # imported on first use by __getattr__ below
    from .retrieval.sharded import DistributedIndex, recognize, search  # noqa: F401

__all__ = ["is_distributed", "world_size", "rank", "local_rank", "is_main", "init_from_env", "barrier",
           "all_gather_rows", "broadcast_object", "all_reduce_sum", "all_gather_objects", "broadcast_tensor",
           "share_bounds", "comm_device", "DistributedIndex", "search", "recognize"]

logger = logging.getLogger(__name__)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device_type: str, timeout_s: float = 1800) -> bool:
    """Joins the process group described by torchrun's environment variables.

    Returns True when this call initialised it (the caller should destroy it when done), False
    when there is nothing to do (single process, or already initialised).
    """
    if is_distributed():
        return False
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    logger.info("joined process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_gather_rows(x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Concatenates every rank's (n_r, D) rows in rank order; ``counts[r]`` = n_r (known to all).

    Rows are padded to the largest share for the collective (gloo and NCCL need equal sizes).
    """
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
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: Sequence[float], device: torch.device | str = "cpu") -> list[float]:
    """Sums a few numbers over the ranks (float64)."""
    if not is_distributed():
        return [float(v) for v in values]
    dev = torch.device("cpu") if dist.get_backend() == "gloo" else torch.device(device)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return [float(v) for v in t.cpu()]


def all_gather_objects(obj: Any) -> list:
    """Every rank's ``obj`` (picklable, small), in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def comm_device() -> torch.device:
    """Where collective tensors live: the CPU for gloo, the current CUDA device for NCCL."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_tensor(x: torch.Tensor | None, src: int = 0) -> torch.Tensor:
    """The tensor rank ``src`` passes (others pass None or anything), on every rank, on
    :func:`comm_device`. Shape and dtype travel first, then the raw bytes (bit-exact for every
    dtype, and gloo has no collectives for some, such as float16 or int16)."""
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


# the sharded-search API lives in retrieval/sharded.py; re-exported on first use
__getattr__ = lazy_exports(__name__, globals(), {name: ("retrieval.sharded", name)
                                                 for name in ("DistributedIndex", "search", "recognize")},
                           package=__package__)
