"""Exact search from compact codes (issue 27) against our float16 search and faiss, in one run.

    python benchmarks/bench_codes.py                        # N=1,000,000, D=1024, Q 1/64/1024, k 5/100
    python benchmarks/bench_codes.py --n 100000 --queries 1 64 --repeat 3
    python benchmarks/bench_codes.py --json out.json
    python benchmarks/bench_codes.py --device cuda --no-faiss  # torch CUDA tensors (tools/device_check.sh)

Three data sets of unit float16 rows, each searched by fresh queries:
  gaussian   rows and queries i.i.d. Gaussian (top-k scores barely above the bulk: the hard
             realistic case for a bound);
  landmark   non-negative, GeM-like rows (gamma-distributed, as pooled ReLU features are) in
             clusters of 20 near-duplicates; queries are new members of random clusters (top-k
             scores high, the bulk around 0.7);
  near-tie   every row the same vector plus noise of 1e-4: all scores within the bound of each
             other, so it cannot prune (the fallback's cost).
Methods: pylandmark.search on the float16 rows ("f16"), on pylandmark.prepare(rows) ("codes";
checked equal to f16, bit for bit, every call), faiss IndexScalarQuantizer QT_8bit inner product
("faiss sq8", approximate: its recall@k against f16 is printed) and, with --faiss-flat,
IndexFlatIP on a float32 copy. Methods run interleaved (one call of each per round; median of
the rounds). Ratio = the method's time / codes. Prints the table last. With --device cuda the
rows and queries are torch tensors on the GPU (timed to torch.cuda.synchronize()), and "read"
is the time to read the int8 codes once (a max over them): the floor of a code scan.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

import pylandmark as plm  # noqa: E402
from pylandmark import _C  # noqa: E402
from pylandmark.retrieval.bench import cpu_name  # noqa: E402

CHUNK = 65536


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def make_set(name: str, n: int, dim: int, nq: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(db (n, dim) float16 unit rows, queries (nq, dim) float32) of one data set."""
    db = np.empty((n, dim), np.float16)
    if name == "gaussian":
        for s in range(0, n, CHUNK):
            db[s:s + CHUNK] = unit_rows(rng.standard_normal((min(CHUNK, n - s), dim), dtype=np.float32))
        return db, rng.standard_normal((nq, dim), dtype=np.float32)
    if name == "landmark":
        centers = rng.gamma(0.5, 1.0, size=(-(-n // 20), dim)).astype(np.float32)

        def members(c: np.ndarray) -> np.ndarray:
            noise = rng.gamma(0.5, 1.0, size=c.shape).astype(np.float32)
            return np.maximum(c * rng.uniform(0.7, 1.0, size=(len(c), 1)).astype(np.float32) + 0.3 * noise, 0)

        for s in range(0, n, CHUNK):
            m = min(CHUNK, n - s)
            db[s:s + m] = unit_rows(members(centers[(np.arange(s, s + m)) // 20]))
        return db, members(centers[rng.integers(0, len(centers), nq)])
    if name == "near-tie":
        base = rng.standard_normal(dim).astype(np.float32)
        for s in range(0, n, CHUNK):
            m = min(CHUNK, n - s)
            db[s:s + m] = unit_rows(base + 1e-4 * rng.standard_normal((m, dim), dtype=np.float32))
        return db, base + 1e-4 * rng.standard_normal((nq, dim), dtype=np.float32)
    raise ValueError(name)


def interleaved(fns: dict, repeat: int, warmup: bool = True) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(0 if warmup else 1, repeat + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: float(np.median(t)) for name, t in times.items()}


def run_set(args: argparse.Namespace, name: str, rng: np.random.Generator, faiss) -> list[dict]:
    """One data set: every (Q, k) timed; returns the table rows."""
    t0 = time.perf_counter()
    db, queries = make_set(name, args.n, args.dim, max(args.queries), rng)
    gpu = args.device == "cuda"
    if gpu:
        import torch

        db, queries = (torch.from_numpy(x).cuda() for x in (db, queries))
    t1 = time.perf_counter()
    prepared = plm.prepare(db)
    print(f"{name}: made in {t1 - t0:.1f} s, codes built in {time.perf_counter() - t1:.2f} s", flush=True)
    sq = flat = None
    if faiss is not None:
        sq = faiss.IndexScalarQuantizer(args.dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        sq.train(db[rng.integers(0, args.n, min(args.n, 100_000))].astype(np.float32))
        for s in range(0, args.n, CHUNK):
            sq.add(db[s:s + CHUNK].astype(np.float32))
        if args.faiss_flat:
            flat = faiss.IndexFlatIP(args.dim)
            for s in range(0, args.n, CHUNK):
                flat.add(db[s:s + CHUNK].astype(np.float32))
    rows = []
    def timed(fn):  # on the GPU: to the end of the queued work
        if not gpu:
            return fn
        return lambda: (fn(), torch.cuda.synchronize())

    for nq in args.queries:
        q = queries[:nq]
        qn = None if gpu else q / np.linalg.norm(q, axis=1, keepdims=True)
        for k in args.k:
            ref_s, ref_i = plm.search(q, db, k)
            got_s, got_i = plm.search(q, prepared, k)
            if gpu:
                ref_s, ref_i, got_s, got_i = (x.cpu().numpy() for x in (ref_s, ref_i, got_s, got_i))
            if not (np.array_equal(ref_i, got_i) and np.array_equal(ref_s.view(np.uint32), got_s.view(np.uint32))):
                raise SystemExit(f"{name} Q={nq} k={k}: codes differ from the float16 search")
            stats = dict(prepared.last_stats)  # the CPU search's (the GPU one keeps none)
            fns = {"f16": timed(lambda q=q, k=k: plm.search(q, db, k)),
                   "codes": timed(lambda q=q, k=k: plm.search(q, prepared, k))}
            if gpu:
                fns["read"] = timed(lambda c=prepared.device_codes[0]: c.view(torch.int32).max())
            recall = None
            if sq is not None and (nq < 1024 or not args.faiss_big_once or (name, k) == (args.sets[0], args.k[0])):
                fns["faiss sq8"] = lambda qn=qn, k=k: sq.search(qn, k)
                _, fi = sq.search(qn, k)
                recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(fi.tolist(), ref_i.tolist())]))
            if flat is not None:
                fns["faiss flat"] = lambda qn=qn, k=k: flat.search(qn, k)
            ms = interleaved(fns, 1 if nq >= 1024 else args.repeat, warmup=nq < 1024)
            rescored = None if gpu else stats["rescored"] / (nq * args.n)
            row = {"set": name, "Q": nq, "k": k, "ms": ms, "rescored_fraction": rescored,
                   "fallback_queries": None if gpu else stats["fallback_queries"], "sq8_recall": recall}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 64, 1024])
    ap.add_argument("--k", type=int, nargs="+", default=[5, 100])
    ap.add_argument("--sets", nargs="+", default=["gaussian", "landmark", "near-tie"])
    ap.add_argument("--repeat", type=int, default=3, help="rounds per (Q, k) after a warm-up one; Q >= 1024 gets "
                    "one round and no warm-up (the equality check before it warms up)")
    ap.add_argument("--faiss-flat", action="store_true", help="also faiss IndexFlatIP on a float32 copy")
    ap.add_argument("--no-faiss", action="store_true")
    ap.add_argument("--faiss-big-once", action="store_true",
                    help="faiss at Q >= 1024 for the first set and k only (its scan takes the same time on any data)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--code-kernel", default="", help="run this CPU code kernel (pylandmark._C.code_kernels()) "
                    "for every search, even where the search would not pick it (e.g. avx2 on a CPU with AVX-VNNI)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    faiss = None
    if not args.no_faiss and args.device == "cpu":
        import faiss
    if args.code_kernel:
        _C.set_code_kernel(args.code_kernel)
    threads = plm.get_num_threads()
    machine = (f"{cpu_name()}, {os.cpu_count()} logical CPUs, {threads} threads, isa {_C.cpu_isa()}, code kernel "
               f"{_C.code_kernel()}, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '-')}, "
               f"Python {platform.python_version()}, faiss {getattr(faiss, '__version__', '-')}")
    if args.device == "cuda":
        import torch

        machine += f"; GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    print(machine, flush=True)
    rng = np.random.default_rng(0)
    rows = []
    for name in args.sets:
        rows += run_set(args, name, rng, faiss)
    print(f"\nN={args.n:,}, D={args.dim}; {machine}\n")
    cols = ["f16", "codes", "faiss sq8"] + (["faiss flat"] if args.faiss_flat else []) + \
        (["read"] if args.device == "cuda" else [])
    print("| set | Q | k | " + " | ".join(f"{c} ms" for c in cols) +
          " | f16 / codes | sq8 / codes | rescored | fallback | sq8 recall |")
    print("|" + "---|" * (len(cols) + 8))
    for r in rows:
        ms = r["ms"]
        cells = [f"{ms[c]:.1f}" if c in ms else "-" for c in cols]
        sq8 = f"{ms['faiss sq8'] / ms['codes']:.2f}x" if "faiss sq8" in ms else "-"
        rec = f"{r['sq8_recall']:.3f}" if r["sq8_recall"] is not None else "-"
        if "read" in ms:
            sq8 = f"codes / read {ms['codes'] / ms['read']:.2f}x"
        print(f"| {r['set']} | {r['Q']} | {r['k']} | " + " | ".join(cells) +
              f" | **{ms['f16'] / ms['codes']:.2f}x** | {sq8} | " +
              ("- | - |" if r["rescored_fraction"] is None else
               f"{r['rescored_fraction']:.2e} | {r['fallback_queries']}/{r['Q']} |") + f" {rec} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "n": args.n, "dim": args.dim, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
