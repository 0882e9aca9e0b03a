"""Several processes on torch.distributed (launched by ``torchrun``): the public face of the
helpers in :mod:`pylandmark.runtime` and of the sharded search in
:mod:`pylandmark.retrieval.sharded`.

``torchrun --nproc_per_node N -m pylandmark.training ...`` (or ``-m pylandmark <command>``,
or any script calling these functions) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env` then joins the process group (NCCL on
the GPU, gloo on the CPU). Without those variables everything runs in one process and these
helpers are no-ops::

    import pylandmark as plm
    plm.distributed.init_from_env("cpu")
    index = plm.distributed.DistributedIndex.open("big.plmi")     # this rank's rows only
    scores, ids = index.search(queries, k=5)    # (Q, k) on every rank, = one search of all rows
    result = index.recognize(queries, k=5)      # a Recognition, on every rank
"""
from __future__ import annotations

from ._lazy import lazy_exports
from .runtime import (
    all_gather_objects,
    all_gather_rows,
    all_reduce_sum,
    barrier,
    broadcast_object,
    broadcast_tensor,
    comm_device,
    init_from_env,
    is_distributed,
    is_main,
    local_rank,
    rank,
    share_bounds,
    world_size,
)

# the sharded search (torch imported on first use)
_SHARDED = ("DistributedIndex", "search", "recognize")

__all__ = ["is_distributed", "world_size", "rank", "local_rank", "is_main", "init_from_env", "barrier",
           "all_gather_rows", "broadcast_object", "all_reduce_sum", "all_gather_objects", "broadcast_tensor",
           "share_bounds", "comm_device", *_SHARDED]

__getattr__ = lazy_exports(__name__, globals(), {name: ("retrieval.sharded", name) for name in _SHARDED},
                           package=__package__)
