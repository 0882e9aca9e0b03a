"""Helpers for training on several processes (torch.distributed; launched by ``torchrun``).

``torchrun --nproc_per_node N -m pylandmark.training ...`` (or any script calling
:func:`pylandmark.train`) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init_from_env` then joins the process group (NCCL on the GPU, gloo on
the CPU). Without those variables everything runs in one process and these helpers are no-ops.
"""
from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "world_size", "rank", "local_rank", "is_main", "init_from_env", "barrier",
           "all_gather_rows", "broadcast_object", "all_reduce_sum"]

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
