"""Out-of-core exact search: a database in host memory (a numpy array, an ``np.memmap`` of an
index file, a torch CPU tensor) streamed through one device in chunks of rows.

On a GPU, two host buffers in pinned memory and two device buffers form a ring: while the
compute stream searches chunk i, the host copies chunk i+1 into a pinned buffer (page faults of
a memory map included) and a second CUDA stream copies it to the device, so the PCIe transfer
overlaps the search. CUDA events order the three: a pinned buffer is refilled only after its
previous upload finished, a device buffer only after the search that read it. Each chunk's
top-k (rows shifted by the chunk's start) is merged into a running top-k on the device, exactly
(:func:`~pylandmark.retrieval.topk.merge_topk_torch`), so the result equals one search of the
whole database.

On the CPU the same loop runs with chunks that are views of the database (no copies): this is
the fallback where there is no GPU, and what the tests check. :func:`pylandmark.search` alone
already streams a memory map on the CPU with bounded memory; chunking there only serves to run
the GPU path's logic.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from .._array import framework_of
from .._checks import check_int
from ..ops import METRICS, search
from .topk import merge_topk_torch

__all__ = ["search_chunked", "default_chunk_rows"]

log = logging.getLogger(__name__)

_GPU_CHUNK_BYTES = 512 << 20  # per device buffer (two of them): large enough to keep the GPU busy
_CPU_CHUNK_ROWS = 1 << 18


def default_chunk_rows(dim: int, itemsize: int, device_type: str) -> int:
    """Rows per chunk: 512 MiB of rows on a GPU (two such buffers on the device and two pinned on
    the host), 262144 rows on the CPU."""
    if device_type == "cuda":
        return max(1, _GPU_CHUNK_BYTES // max(1, dim * itemsize))
    return _CPU_CHUNK_ROWS


def search_chunked(queries: Any, db: Any, k: int = 5, metric: str = "cosine", *, device: Any = None,
                   chunk_rows: int | None = None) -> tuple[Any, Any]:
    """Exact top-k of ``queries`` against a host-resident ``db``, streamed through ``device``.

    Args:
        queries: (Q, D) or (D,) float16/bfloat16/float32, numpy or torch (any device; moved to
            ``device``).
        db: (N, D) float16/bfloat16/float32 in host memory: numpy array, ``np.memmap``, or torch
            CPU tensor (pinned tensors are uploaded without the staging copy). Rows contiguous.
        k: neighbours (>= 1; at most 1024 on the GPU).
        metric: "cosine" or "ip".
        device: "cuda", "cuda:1", ... (streamed through that GPU) or "cpu"/None (the CPU
            fallback of the same chunked loop).
        chunk_rows: rows per chunk (default :func:`default_chunk_rows`).

    Returns:
        scores (Q, k) float32 best first and rows (Q, k) int64 into ``db`` (-1 / -inf padding
        when k > N), ties to the lower row: equal to ``pylandmark.search(queries, db, k)`` on the
        same device type. numpy queries give numpy results; torch queries give tensors on
        ``device``. 1-d queries give 1-d results.
    """
    import torch

    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    k = check_int(k, "k", minimum=1)
    dev = torch.device(device if device is not None else "cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or a CUDA device, got {device!r}")
    host = _host_rows(db)
    n, d = int(host.shape[0]), int(host.shape[1])
    if n == 0:
        raise ValueError("db is empty (N=0); add descriptors before searching")
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(d, host.element_size(), dev.type)
    chunk_rows = min(check_int(chunk_rows, "chunk_rows", minimum=1), n)

    fw = framework_of(queries)
    q = queries if fw == "torch" else torch.from_numpy(np.ascontiguousarray(queries))
    one = q.dim() == 1
    if one:
        q = q[None]
    if q.dim() != 2 or q.shape[1] != d:
        raise ValueError(f"queries must be (Q, {d}) or ({d},) like the db rows, got shape {tuple(q.shape)}")
    q = q.to(dev)

    chunks = _CudaRing(host, chunk_rows, dev) if dev.type == "cuda" else _HostChunks(host, chunk_rows)
    best_s = torch.full((q.shape[0], k), -torch.inf, dtype=torch.float32, device=dev)
    best_r = torch.full((q.shape[0], k), -1, dtype=torch.int64, device=dev)
    for start, chunk in chunks:
        s, r = search(q, chunk, k=k, metric=metric)
        r = r.where(r < 0, r + start)
        best_s, best_r = merge_topk_torch(torch.cat([best_s, s], 1), torch.cat([best_r, r], 1), k)
    if one:
        best_s, best_r = best_s[0], best_r[0]
    if fw != "torch":
        return best_s.cpu().numpy(), best_r.cpu().numpy()
    return best_s, best_r


def _host_rows(db: Any):
    import torch

    if framework_of(db) == "torch":
        if db.device.type != "cpu":
            raise ValueError(f"db must be in host memory for a chunked search, got a tensor on {db.device}; "
                             "search it with pylandmark.search instead")
        t = db
    else:
        arr = np.asarray(db)
        if arr.dtype.name == "bfloat16":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                t = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        else:
            if arr.dtype not in (np.float16, np.float32):
                raise TypeError(f"db has dtype {arr.dtype}; supported are float16, bfloat16 and float32")
            with warnings.catch_warnings():  # read-only memory maps: nothing here writes to them
                warnings.simplefilter("ignore", UserWarning)
                t = torch.from_numpy(arr)
    if t.dim() != 2:
        raise ValueError(f"db must be (N, D), got shape {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError("db: the last axis must be contiguous (element stride 1)")
    return t


class _HostChunks:
    """Chunks of the host db as views: the CPU fallback."""

    def __init__(self, host, rows: int):
        self.host, self.rows = host, rows

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        n = self.host.shape[0]
        for start in range(0, n, self.rows):
            yield start, self.host[start:start + self.rows]


class _CudaRing:
    """Two pinned host buffers and two device buffers; uploads on a side stream overlap the
    searches on the caller's current stream (GPU path; see the module docstring)."""

    def __init__(self, host, rows: int, device):
        import torch

        self.torch = torch
        self.host, self.rows, self.device = host, rows, device
        d = host.shape[1]
        self.direct = host.is_pinned()  # pinned db: upload slices, no staging copy
        self.pinned = [] if self.direct else [torch.empty((rows, d), dtype=host.dtype, pin_memory=True)
                                              for _ in range(2)]
        with torch.cuda.device(device):
            self.compute = torch.cuda.current_stream(device)
            self.copy = torch.cuda.Stream(device)
            self.buffers = [torch.empty((rows, d), dtype=host.dtype, device=device) for _ in range(2)]
            for b in self.buffers:
                b.record_stream(self.copy)
        self.uploaded = [torch.cuda.Event() for _ in range(2)]
        self.consumed = [torch.cuda.Event() for _ in range(2)]

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        torch = self.torch
        n = self.host.shape[0]
        for i, start in enumerate(range(0, n, self.rows)):
            slot, m = i % 2, min(self.rows, n - start)
            src = self.host[start:start + m]
            if not self.direct:
                if i >= 2:
                    self.uploaded[slot].synchronize()  # the pinned buffer's last upload is done
                staged = self.pinned[slot][:m]
                staged.copy_(src)  # host copy (and page faults), overlapping the GPU's work
                src = staged
            with torch.cuda.stream(self.copy):
                if i >= 2:
                    self.copy.wait_event(self.consumed[slot])  # the search that read it is done
                self.buffers[slot][:m].copy_(src, non_blocking=True)
                self.uploaded[slot].record(self.copy)
            self.compute.wait_event(self.uploaded[slot])
            yield start, self.buffers[slot][:m]
            self.consumed[slot].record(self.compute)
