"""The native operators: exact top-k search and GeM pooling.

Input checks and output allocation live here; the loops live in ``pylandmark._C``.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from ._array import (
    CUDA,
    Array,
    as_array,
    contiguous,
    current_stream,
    empty_like_framework,
    gem_layout,
    require_float,
    to_device_of,
    to_host,
)
from ._checks import check_int, check_number, gem_p, is_torch
from ._native import extension

_C = extension()

METRICS = ("cosine", "ip")
SEARCH_CUDA_MAX_K = getattr(_C, "SEARCH_CUDA_MAX_K", 1024)  # largest k of the GPU search
MAX_THREADS = 4096  # set_num_threads accepts 0 .. MAX_THREADS
MAX_K = 2 ** 31 - 1


CODE_BLOCK = 16  # rows per block of compact codes (csrc/cpu/codes.h)
CODE_FIELDS = 3  # metadata per row: scale factor, error term, dequantised norm


class PreparedDatabase:
    """A database prepared for repeated exact searches (:func:`prepare`): the rows as given
    (never copied, so memory-mapped rows stay on disk) and, beside them, an int8 code per row
    with a proved bound on its error. :func:`search` scans the codes (half the bytes of
    float16 rows) and scores exactly only the rows whose bound says they can still be among
    the top k: the same scores and indices as searching ``rows``, bit for bit.

    Attributes:
        rows: (N, D) the database (numpy, or a CPU torch tensor); it must not change while
            prepared (the codes describe it as it was).
        metric: "cosine" or "ip": the metric the codes were built for.
        codes: (ceil(N / 16), 16 * Dc) uint8, Dc = D rounded up to 4 (layout: csrc/cpu/codes.h);
            None for rows on a GPU.
        meta: (ceil(N / 16), 3, 16) float32 per-row scale, error term and norm, or None.
        device_codes: for rows on a GPU, (codes (N, Dg) uint8 holding int8 codes, Dg = D rounded
            up to 16; meta (3, N) float32) on the rows' device (:func:`device_codes`); else None.
        last_stats: of the most recent CPU search: "rescored" (query, row) pairs scored exactly
            and "fallback_queries" (queries searched in full because the bound could not prune).
    """

    def __init__(self, rows: Any, metric: str, codes: np.ndarray | None, meta: np.ndarray | None,
                 device_codes: tuple[Any, Any] | None = None):
        self.rows, self.metric, self.codes, self.meta = rows, metric, codes, meta
        self.device_codes = device_codes
        self.last_stats: dict[str, int] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.rows.shape)

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __repr__(self) -> str:
        return (f"PreparedDatabase(N={len(self)}, D={self.shape[1]}, metric={self.metric!r}, "
                f"codes={self.codes is not None or self.device_codes is not None})")


def prepare(db: Any, metric: str = "cosine") -> PreparedDatabase:
    """Prepares ``db`` (N, D) float16/bfloat16/float32 for repeated exact searches with
    :func:`search`: builds the compact codes (about a second per million 1024-d rows and
    core). numpy arrays (memory-mapped ones included) and CPU torch tensors get codes beside
    them; float16/bfloat16 CUDA arrays get codes on their device (built from a host copy of the
    rows, which is then dropped), scanned by the GPU's int8 tensor cores (float32 CUDA arrays
    are searched as they are).

    >>> prepared = pylandmark.prepare(db)            # once
    >>> scores, idx = pylandmark.search(q, prepared, k=5)  # equal to search(q, db, k=5)
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if isinstance(db, PreparedDatabase):
        db = db.rows
    d = as_array(db, "db")
    require_float(d)
    if d.ndim != 2:
        raise ValueError(f"db must be (N, D), got shape {d.shape}")
    if not _unit_last_stride(d):
        raise ValueError("db: the last axis must be contiguous (element stride 1); pass a "
                         "contiguous copy (np.ascontiguousarray / .contiguous())")
    if d.device[0] == CUDA:
        if d.dtype == "float32":  # the GPU scans codes beside float16/bfloat16 rows only
            return PreparedDatabase(db, metric, None, None)
        codes, meta = build_codes(to_host(d), metric)
        on_host = device_codes(codes, meta, d.shape[0], d.shape[1], metric)
        return PreparedDatabase(db, metric, None, None, tuple(to_device_of(x, d) for x in on_host))
    codes, meta = build_codes(d, metric)
    return PreparedDatabase(db, metric, codes, meta)


def device_codes(codes: np.ndarray, meta: np.ndarray, n_rows: int, dim: int,
                 metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The codes of :func:`build_codes` in the GPU scan's layout (csrc/cuda/code_kernels.cuh):
    ((N, Dg) uint8 holding each row's int8 code, zero-padded to Dg = D rounded up to 16;
    (3, N) float32 scale, error term widened for tensor-core sums, norm)."""
    out_codes = np.empty((n_rows, -(-dim // 16) * 16), np.uint8)
    out_meta = np.empty((3, n_rows), np.float32)
    _C.device_codes(as_array(codes, "codes").spec(), as_array(meta, "meta").spec(), n_rows, dim,
                    metric == "cosine", as_array(out_codes, "out_codes").spec(), as_array(out_meta, "out_meta").spec())
    return out_codes, out_meta


def build_codes(rows: Any, metric: str, previous: tuple[np.ndarray, np.ndarray] | None = None,
                start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(codes, meta) for the CPU rows (N, D): codes of rows [start, N) are built, those of
    rows [0, start) come from ``previous`` (the codes of the first ``start`` rows)."""
    d = rows if isinstance(rows, Array) else as_array(rows, "rows")
    n, dim = d.shape
    blocks = -(-n // CODE_BLOCK)
    width = CODE_BLOCK * (-(-dim // 4) * 4)
    codes = np.empty((blocks, width), np.uint8)
    meta = np.empty((blocks, CODE_FIELDS, CODE_BLOCK), np.float32)
    if previous is not None and start:
        keep = -(-start // CODE_BLOCK)
        codes[:keep], meta[:keep] = previous[0][:keep], previous[1][:keep]
    if n > start:
        part = as_array(d.obj[start:], "rows")
        _C.build_codes(part.spec(), as_array(codes, "codes").spec(), as_array(meta, "meta").spec(), start,
                       metric == "cosine")
    return codes, meta


def search(queries: Any, db: Any, k: int = 5, metric: str = "cosine") -> tuple[Any, Any]:
    """Exact top-k search of ``queries`` against the rows of ``db``.

    Args:
        queries: (Q, D) or (D,) float16/bfloat16/float32; numpy, torch or cupy.
        db: (N, D) float16/bfloat16/float32, in the same framework family and on the same device.
            Rows may be strided (e.g. ``db[::2]``) and read-only or memory-mapped. Or a
            :class:`PreparedDatabase` (:func:`prepare`): the same results, from a scan of
            compact codes that scores only the rows that can still win (its metric must be
            ``metric``).
        k: number of neighbours (>= 1; at most 1024 on the GPU). Beyond N the result is padded
            with index -1, score -inf.
        metric: "cosine" (norms computed on the fly; zero vectors score 0) or "ip".

    Returns:
        scores (Q, k) float32, best first, and indices (Q, k) int64 into db, ties going to the
        lower index; in the framework and on the device of ``queries``. 1-d queries give 1-d
        results.

    CUDA arrays are searched on their device, on the caller's current stream, without
    synchronising: a query holding NaN raises on the CPU, but on the GPU its row comes back as
    NaN scores and index -1.
    """
    prepared = db if isinstance(db, PreparedDatabase) else None
    if prepared is not None:
        if prepared.metric != metric:
            raise ValueError(f"db was prepared for metric {prepared.metric!r}, not {metric!r}; pass "
                             f"metric={prepared.metric!r} or prepare(rows, metric={metric!r})")
        db = prepared.rows
    q, d, k, one = _operands(queries, db, k, metric)
    scores = as_array(empty_like_framework(q, (q.shape[0], k), "float32"), "scores")
    indices = as_array(empty_like_framework(q, (q.shape[0], k), "int64"), "indices")
    if prepared is not None and prepared.codes is not None and q.device[0] != CUDA:
        rescored, fallback = _C.search_codes(q.spec(), d.spec(), as_array(prepared.codes, "codes").spec(),
                                             as_array(prepared.meta, "meta").spec(), scores.spec(),
                                             indices.spec(), k, metric == "cosine")
        prepared.last_stats = {"rescored": rescored, "fallback_queries": fallback}
    elif q.device[0] == CUDA:
        codes = prepared.device_codes if prepared is not None else None
        _search_cuda(q, d, scores, indices, k, metric == "cosine", codes)
    else:
        _C.search(q.spec(), d.spec(), scores.spec(), indices.spec(), k, metric == "cosine")
    if one:
        return scores.obj[0], indices.obj[0]
    return scores.obj, indices.obj


def _operands(queries: Any, db: Any, k: Any, metric: str) -> tuple[Array, Array, int, bool]:
    """Checks the arguments of a search; returns (queries as (Q, D) with unit element stride,
    db, k, whether queries was 1-d)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    k = check_int(k, "k", minimum=1, maximum=MAX_K)
    q = as_array(queries, "queries")
    d = as_array(db, "db")
    require_float(q)
    require_float(d)
    if q.ndim not in (1, 2):
        raise ValueError(f"queries must be (Q, D) or (D,), got shape {q.shape}")
    if d.ndim != 2:
        raise ValueError(f"db must be (N, D), got shape {d.shape}")
    if q.device != d.device:
        raise ValueError(f"queries are on {q.device_str()} but db is on {d.device_str()}; "
                         "move both to the same device")
    one = q.ndim == 1
    if one:
        q = Array(q.obj.reshape(1, -1), q.framework, q.name)
    if q.shape[1] != d.shape[1]:
        raise ValueError(f"queries have D={q.shape[1]} but db has D={d.shape[1]}")
    if d.shape[0] == 0:
        raise ValueError("db is empty (N=0); add descriptors before searching")
    if q.shape[1] == 0:
        raise ValueError("queries: D must be at least 1")
    _check_result_size(q.shape[0], k, d.shape[0])
    if q.shape[0] and not _unit_last_stride(q):
        q = contiguous(q)
    if not _unit_last_stride(d):
        raise ValueError("db: the last axis must be contiguous (element stride 1); pass a "
                         "contiguous copy (np.ascontiguousarray / .contiguous())")
    return q, d, k, one


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not POSIX
        return None


def _check_result_size(n_queries: int, k: int, n_rows: int) -> None:
    """Refuses results that cannot fit: (Q, k) float32 scores + int64 indices beyond half the
    machine's memory would be killed by the OS midway, not raise."""
    need = n_queries * k * 12
    memory = _physical_memory()
    if memory and need > memory // 2:
        hint = f" (the db has only N={n_rows} rows; beyond them the result is padding)" if k > n_rows else ""
        raise ValueError(f"k={k} for {n_queries} queries needs {need / 2**30:.1f} GiB of results, more than half "
                         f"of this machine's {memory / 2**30:.0f} GiB; pass a smaller k{hint} or search fewer "
                         "queries per call")


def _search_cuda(q: Array, d: Array, scores: Array, indices: Array, k: int, cosine: bool,
                 codes: tuple[Any, Any] | None = None) -> None:
    """Queues the GPU search (from the device codes of a prepared db where given) on the
    caller's current stream of the data's device."""
    if not hasattr(_C, "search_cuda"):
        raise ValueError("queries and db are on a CUDA device, but this build of pylandmark has no "
                         "CUDA kernels; reinstall with nvcc available (PYLANDMARK_CUDA=ON) or search "
                         "CPU copies")
    if k > SEARCH_CUDA_MAX_K:
        raise ValueError(f"k must be at most {SEARCH_CUDA_MAX_K} on the GPU, got {k}; search CPU "
                         "copies for larger k")
    if q.shape[0] == 0:
        return
    def alloc(nbytes: int) -> tuple[Any, tuple]:
        workspace = as_array(empty_like_framework(q, (max(nbytes, 1),), "uint8"), "workspace")
        return workspace.obj, workspace.spec()

    if codes is not None:
        c, m = (as_array(x, name) for x, name in zip(codes, ("codes", "code metadata")))
        if c.device != d.device or m.device != d.device:
            raise ValueError("the prepared db's codes are not on the rows' device; prepare() it again "
                             "after moving the rows")
        _C.search_codes_cuda(q.spec(), d.spec(), c.spec(), m.spec(), scores.spec(), indices.spec(), alloc, k,
                             cosine, current_stream(q))
        return
    _C.search_cuda(q.spec(), d.spec(), scores.spec(), indices.spec(), alloc, k, cosine, current_stream(q))


def search_kernel(queries: Any, db: Any, k: int = 5, metric: str = "cosine") -> str:
    """Which GPU scan kernel :func:`search` runs for these CUDA arrays: "mma_small" or
    "mma_wide" (tensor cores; float16/bfloat16 db with rows 16-byte aligned, compute capability
    8.0+) or "simt" (everything else)."""
    q, d, k, _ = _operands(queries, db, k, metric)
    if q.device[0] != CUDA or not hasattr(_C, "search_cuda_kernel"):
        raise ValueError("search_kernel() describes the GPU search; pass CUDA arrays to a CUDA build")
    return _C.search_cuda_kernel(q.spec(), d.spec(), k, metric == "cosine")


def _unit_last_stride(a: Array) -> bool:
    return a.shape[-1] <= 1 or a.strides()[-1] == 1


def gem(x: Any, p: Any = 3.0, eps: float = 1e-6) -> Any:
    """Generalized-mean pooling: ``(mean_hw max(x, eps)^p)^(1/p)``.

    Args:
        x: (B, C, H, W), NCHW or channels_last; float16/bfloat16/float32 (float32 accumulation)
            or float64. numpy arrays or torch tensors.
        p: float, or a 0-d / 1-element torch tensor (learnable: gradients flow to it).
        eps: clamp floor, > 0.

    Returns:
        (B, C) in x's dtype and framework. Differentiable for torch inputs (x and p).
    """
    eps = check_number(eps, "eps", minimum=0, above=True)
    if is_torch(x):
        from .nn.functional import gem_torch

        return gem_torch(x, p, eps)
    a = as_array(x, "x")
    pf = gem_p(p)
    a = gem_layout(a)
    if a.framework == "cupy":
        return _gem_cupy(a, pf, eps)
    out_dtype = "float64" if a.dtype == "float64" else "float32"
    y = as_array(np.empty(a.shape[:2], dtype=out_dtype), "y")
    _C.gem_forward(a.spec(), y.spec(), pf, eps)
    return y.obj.astype(a.obj.dtype, copy=False)


def _gem_cupy(a: Array, p: float, eps: float) -> Any:
    import cupy

    if not hasattr(_C, "gem_forward_cuda"):
        raise ValueError("x is a cupy array, but this build of pylandmark has no CUDA kernels; "
                         "reinstall with nvcc available (PYLANDMARK_CUDA=ON)")
    with cupy.cuda.Device(a.device[1]):
        y = cupy.empty(a.shape[:2], dtype=cupy.float32)
        p_dev = cupy.full((1,), p, dtype=cupy.float32)
        _C.gem_forward_cuda(a.spec(), as_array(y, "y").spec(), as_array(p_dev, "p").spec(), eps,
                            current_stream(a))
    return y.astype(a.obj.dtype, copy=False)


def get_num_threads() -> int:
    """Threads the CPU kernels use (all cores this process may run on, unless set)."""
    return _C.get_num_threads()


def set_num_threads(n: int) -> None:
    """Sets the CPU kernels' thread count (1 .. MAX_THREADS); 0 restores the default (all cores)."""
    _C.set_num_threads(check_int(n, "n", minimum=0, maximum=MAX_THREADS, hint="(0: all cores)"))


def cuda_available() -> bool:
    """True when this build has CUDA and the runtime sees at least one device."""
    count, _ = _C.cuda_device_count()
    return count > 0
