"""SuperGlobal re-ranking's cost over the plain search it follows (issue 29's speed target).

    python benchmarks/bench_superglobal.py                 # Q = 70, N = 1,000,000, D = 1024, M = 400
    python benchmarks/bench_superglobal.py --n 200000 --repeat 3
    python benchmarks/bench_superglobal.py --n 200000 --index-n 200000   # and over an index file

Times ``pylandmark.search(q, db, k=M)`` (float16 rows) and
``pylandmark.retrieval.rerank.superglobal(q, db, k=M, m=M, ranks=...)`` given that search's
ranking (the re-ranking's own work: gathering the top M rows, the (M, M) similarities, the
augmentation and the expansion), median of --repeat, and prints the added time as a share of
the search. With ``--index-n`` the first that many rows are also saved as an index file and
loaded memory-mapped (after one warm-up search, so its pages are cached): its own search
``index.search_rows(q, M)`` (from the compact codes) against ``superglobal(q, index, k=M, m=M)``
(that search, the top rows read through ``index.row_vectors``, the re-ranking).
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

import pylandmark as plm
from pylandmark import _C
from pylandmark.retrieval.bench import cpu_name
from pylandmark.retrieval.rerank import superglobal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--queries", type=int, default=70)
    ap.add_argument("--m", type=int, default=400)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--index-n", type=int, default=0, help="rows of the memory-mapped index measured too (0: none)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    db = np.empty((args.n, args.dim), np.float16)
    for r0 in range(0, args.n, 65536):  # unit rows, written in chunks
        x = rng.standard_normal((min(65536, args.n - r0), args.dim), dtype=np.float32)
        db[r0:r0 + x.shape[0]] = x / np.linalg.norm(x, axis=1, keepdims=True)
    q = db[rng.choice(args.n, args.queries, replace=False)].astype(np.float32)
    q += 0.5 * rng.standard_normal(q.shape, dtype=np.float32) / np.sqrt(args.dim)
    plain, rerank = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        _, idx = plm.search(q, db, k=args.m)
        t1 = time.perf_counter()
        superglobal(q, db, k=args.m, m=args.m, ranks=idx)
        t2 = time.perf_counter()
        plain.append(t1 - t0)
        rerank.append(t2 - t1)
    p, r = float(np.median(plain)), float(np.median(rerank))
    print(f"machine: {cpu_name()} ({platform.machine()}), ISA {_C.cpu_isa()}, N {args.n}, D {args.dim}, "
          f"Q {args.queries}, M {args.m}, median of {args.repeat}")
    env = ", ".join(f"{v}={os.environ.get(v, 'unset')}" for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"))
    print(f"threads: native search {_C.get_num_threads()}, {os.cpu_count()} CPUs, {env}")
    print("| db | search k=M s | re-ranking s | search + re-ranking / search |")
    print("|---|---:|---:|---:|")
    print(f"| array, N {args.n} | {p:.3f} | {r:.3f} | {(p + r) / p:.2f} |")
    if args.index_n:
        p, t = time_index(db[:args.index_n], q, args.m, args.repeat)
        print(f"| memory-mapped Index, N {args.index_n} | {p:.3f} | {t - p:.3f} | {t / p:.2f} |")


def time_index(rows: np.ndarray, q: np.ndarray, m: int, repeat: int) -> tuple[float, float]:
    """Median seconds of the memory-mapped index's own search (k = m) and of superglobal over it."""
    with tempfile.TemporaryDirectory() as tmp:
        index = plm.Index(rows.shape[1])
        index.add(rows)
        index = plm.Index.load(index.save(Path(tmp) / "bench.plmi"), mmap=True)
        index.search_rows(q, m)  # pages in the rows and codes, as a served index has them
        plain, total = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            index.search_rows(q, m)
            t1 = time.perf_counter()
            superglobal(q, index, k=m, m=m)
            t2 = time.perf_counter()
            plain.append(t1 - t0)
            total.append(t2 - t1)
    return float(np.median(plain)), float(np.median(total))


if __name__ == "__main__":
    main()
