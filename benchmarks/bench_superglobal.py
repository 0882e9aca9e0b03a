"""SuperGlobal re-ranking's cost over the plain search it follows (issue 29's speed target).

    python benchmarks/bench_superglobal.py                 # Q = 70, N = 1,000,000, D = 1024, M = 400
    python benchmarks/bench_superglobal.py --n 200000 --repeat 3

Times ``pylandmark.search(q, db, k=M)`` (float16 rows) and
``pylandmark.retrieval.rerank.superglobal(q, db, k=M, m=M, ranks=...)`` given that search's
ranking (the re-ranking's own work: gathering the top M rows, the (M, M) similarities, the
augmentation and the expansion), median of --repeat, and prints the added time as a share of
the search.
"""
from __future__ import annotations

import argparse
import platform
import time

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
    print("| search k=M s | re-ranking s | search + re-ranking / search |")
    print("|---:|---:|---:|")
    print(f"| {p:.3f} | {r:.3f} | {(p + r) / p:.2f} |")


if __name__ == "__main__":
    main()
