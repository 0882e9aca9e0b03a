"""Hard-negative mining on labelled photos against SfM-120k mining, per image (issue 28).

    python benchmarks/bench_mining.py                   # the reference sizes: 2000 queries, pool 20000, D 1024
    python benchmarks/bench_mining.py --queries 500 --pool 5000 --repeat 3

Mining an epoch = describing the queries and the pool (the same extraction, per image, whatever
the source: not timed here) + ranking the pool for every query and walking each ranking for
negatives of other clusters (``pylandmark.training.mining.mine_negatives``: what the source's
cluster structure changes). This times the second part on unit descriptors with each source's
structure, and reports it per mined image (queries + pool):

  sfm120k    91,642 images in 551 clusters (SfM-120k train's counts), lognormal cluster sizes;
  gldv2      the same number of images in 4,600 landmarks of ~20 photos (Google Landmarks v2's
             shape, scaled down);
  campus     the same in 20 landmarks (a team's own campus or city);
  few        the same in 5 landmarks (the PNU photos' shape): with 5 negatives wanted, every query
             runs out of other landmarks.

Descriptors: a unit Gaussian centre per cluster plus noise (within-cluster cosine ~0.6), queries
drawn among the images of clusters with two or more images. Median of --repeat runs; the table
goes last.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from pylandmark import _C
from pylandmark.retrieval.bench import cpu_name
from pylandmark.training.mining import mine_negatives

N_IMAGES = 91642
SOURCES = {"sfm120k": 551, "gldv2": 4600, "campus": 20, "few": 5}


def cluster_sizes(n_images: int, n_clusters: int, rng: np.random.Generator) -> np.ndarray:
    """Lognormal sizes (sigma 0.8) summing to ``n_images``, each >= 1."""
    w = rng.lognormal(0.0, 0.8, n_clusters)
    sizes = np.maximum(1, np.floor(w / w.sum() * n_images)).astype(np.int64)
    sizes[np.argmax(sizes)] += n_images - sizes.sum()
    return sizes


def scenario(n_clusters: int, queries: int, pool: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    clusters = np.repeat(np.arange(n_clusters), cluster_sizes(N_IMAGES, n_clusters, rng))
    sizes = np.bincount(clusters)
    q_img = rng.choice(np.flatnonzero(sizes[clusters] >= 2), size=queries, replace=False)
    p_img = rng.choice(N_IMAGES, size=pool, replace=False)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def describe(images: np.ndarray) -> np.ndarray:
        x = centres[clusters[images]] + 0.8 * rng.standard_normal((images.size, dim)).astype(np.float32) / dim ** 0.5
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return describe(q_img), describe(p_img), clusters[q_img], clusters[p_img]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--pool", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--negatives", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    rows = []
    for name, n_clusters in SOURCES.items():
        qd, pd, qc, pc = scenario(n_clusters, args.queries, args.pool, args.dim, seed=1)
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            pos, _ = mine_negatives(qd, pd, qc, pc, args.negatives)
            times.append(time.perf_counter() - t0)
        t = float(np.median(times))
        short = int((pos < 0).any(axis=1).sum())
        rows.append({"source": name, "clusters": n_clusters, "seconds": t,
                     "us_per_image": 1e6 * t / (args.queries + args.pool), "short_queries": short})
        print(f"{name}: {t:.3f} s, {short} short queries", flush=True)
    base = rows[0]["seconds"]
    print(f"\nmachine: {cpu_name()} ({platform.machine()}), ISA {_C.cpu_isa()}, {args.queries} queries, "
          f"pool {args.pool}, D {args.dim}, {args.negatives} negatives, median of {args.repeat}")
    print("| source | clusters | mining selection s | us per mined image | x sfm120k | queries short of negatives |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['source']} | {r['clusters']} | {r['seconds']:.3f} | {r['us_per_image']:.1f} | "
              f"{r['seconds'] / base:.2f} | {r['short_queries']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
