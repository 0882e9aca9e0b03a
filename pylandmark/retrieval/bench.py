"""Search speed on this machine next to numpy's, on generated unit-norm descriptors."""
from __future__ import annotations

import logging
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..ops import get_num_threads, search

log = logging.getLogger(__name__)


def cpu_name() -> str:
    """The CPU model, for benchmark tables ("AMD EPYC 7B13"; Linux /proc/cpuinfo, else platform)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


@dataclass
class BenchConfig:
    n: int = 200_000          # database rows
    dim: int = 1024           # descriptor length
    queries: tuple[int, ...] = (1, 64, 1024)
    k: int = 5
    repeat: int = 5
    seed: int = 0


@dataclass
class BenchRow:
    queries: int
    k: int
    pylandmark_ms: float
    numpy_ms: float
    same_results: bool
    speedup: float = field(init=False)

    def __post_init__(self):
        self.speedup = self.numpy_ms / self.pylandmark_ms


def median_ms(fn, repeat: int, warmup: int = 1) -> float:
    """Median wall time of fn() in milliseconds after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def cuda_median_ms(fn, repeat: int = 30, warmup: int = 5) -> float:
    """Median time of fn() on the current CUDA stream in milliseconds (CUDA events), after
    `warmup` untimed calls."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def numpy_topk(q: np.ndarray, db32: np.ndarray, k: int) -> np.ndarray:
    """What a numpy user writes: float32 matmul, argpartition, then sort the k (indices (Q, k))."""
    s = q @ db32.T
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(s, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def run_bench(cfg: BenchConfig, progress: bool = False) -> list[BenchRow]:
    """Times pylandmark (float16 db, cosine) and numpy (float32 copy, matmul + argpartition);
    `progress` shows a bar over the query batch sizes."""
    from tqdm.auto import tqdm

    if cfg.n < 1 or cfg.dim < 1 or cfg.k < 1 or not cfg.queries or min(cfg.queries) < 1:
        raise ValueError("n, dim, k and every queries value must be >= 1")
    if cfg.k > cfg.n:
        raise ValueError(f"k={cfg.k} must not exceed n={cfg.n}")
    rng = np.random.default_rng(cfg.seed)
    db = rng.standard_normal((cfg.n, cfg.dim), dtype=np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    db16 = db.astype(np.float16)
    db32 = db16.astype(np.float32)
    rows = []
    bar = tqdm(cfg.queries, desc="bench", unit="batch size", disable=not progress)
    for nq in bar:
        bar.set_postfix_str(f"Q={nq}")
        q = rng.standard_normal((nq, cfg.dim), dtype=np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        ours = median_ms(lambda q=q: search(q, db16, k=cfg.k), cfg.repeat)
        theirs = median_ms(lambda q=q: numpy_topk(q, db32, cfg.k), cfg.repeat)
        _, idx = search(q, db16, k=cfg.k)
        same = bool(np.array_equal(idx, numpy_topk(q, db32, cfg.k)))
        rows.append(BenchRow(nq, cfg.k, ours, theirs, same))
        log.debug("bench Q=%d: %s", nq, asdict(rows[-1]))
    return rows


def format_rows(cfg: BenchConfig, rows: list[BenchRow]) -> str:
    lines = [f"exact top-{cfg.k} search, N={cfg.n} x D={cfg.dim} float16 db, {get_num_threads()} threads",
             f"{'Q':>6} {'pylandmark ms':>14} {'numpy ms':>10} {'speed-up':>9} {'queries/s':>11}  same top-k"]
    for r in rows:
        lines.append(f"{r.queries:>6} {r.pylandmark_ms:>14.2f} {r.numpy_ms:>10.2f} {r.speedup:>8.2f}x "
                     f"{r.queries / r.pylandmark_ms * 1e3:>11.0f}  {'yes' if r.same_results else 'no'}")
    lines += ["",
              "Q: queries searched together; pylandmark ms: median time of plm.search (cosine, float16 db);",
              "numpy ms: median time of q @ db.T on a float32 copy + argpartition + sort (what a numpy user",
              "writes); speed-up: numpy ms / pylandmark ms; queries/s: Q per second with pylandmark; same",
              f"top-k: whether both returned the same {cfg.k} rows. Medians of {cfg.repeat} runs after one warm-up."]
    return "\n".join(lines)
