"""CPU benchmark: pylandmark search and GeM against the baselines a user would pick, in one run.

    python benchmarks/bench_cpu.py                 # the issue's sizes (N=200,000, D=1024)
    python benchmarks/bench_cpu.py --n 20000 --quick
    python benchmarks/bench_cpu.py --json out.json

Search: float16 db of unit rows; pylandmark reads it as float16 (metric cosine, norms computed
on the fly); the baselines get what they need (float32 copies for numpy, torch and faiss Flat,
faiss's own fp16 scalar quantizer). Every method's top-k is checked against an exact float64
reference on a sample of queries. GeM: (64, 1024, 32, 24) float32 forward and forward+backward
against eager torch and torch.compile. The table prints last; ratio = baseline time / ours.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable

# Idle OpenMP threads of faiss and torch otherwise spin on both cores between calls and slow
# whichever library runs next; passive waiting barely changes the baselines' own times.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

import pylandmark as plm  # noqa: E402
from pylandmark.bench import median_ms, numpy_topk  # noqa: E402


def exact_topk(q, db, k):
    s = q.astype(np.float64) @ db.astype(np.float64).T
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def recall(idx, ref):
    idx = np.asarray(idx)
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(idx.tolist(), ref.tolist())]))


def search_rows(args, rng):
    import torch

    N, D = args.n, args.d
    db = rng.standard_normal((N, D), dtype=np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    db16 = db.astype(np.float16)
    db32 = db16.astype(np.float32)  # the same values for every method
    tdb = torch.from_numpy(db32)
    methods: dict[str, Callable] = {
        "pylandmark fp16": lambda q, k: plm.search(q, db16, k=k, metric="cosine"),
        "numpy fp32 matmul+argpartition": lambda q, k: (None, numpy_topk(q, db32, k)),
        "torch fp32 matmul+topk": lambda q, k: torch.topk(torch.from_numpy(q) @ tdb.T, k, dim=1),
    }
    try:
        import faiss

        flat = faiss.IndexFlatIP(D)
        flat.add(db32)
        sq = faiss.IndexScalarQuantizer(D, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        sq.train(db32[:1000])
        sq.add(db32)
        methods["faiss IndexFlatIP fp32"] = lambda q, k: flat.search(q, k)
        methods["faiss SQ fp16"] = lambda q, k: sq.search(q, k)
    except ImportError:
        print("faiss-cpu not installed: its rows are skipped (pip install faiss-cpu)")

    rows = []
    for Q in args.queries:
        q = rng.standard_normal((Q, D), dtype=np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        sample = q[: min(Q, 16)]
        for k in args.k:
            ref = exact_topk(sample, db32, k)
            repeat = max(2, min(20, int(2000 / (Q * N / 2e5 + 1))) // (4 if args.quick else 1))
            times = {}
            for name, fn in methods.items():
                time.sleep(0.5)  # let the previous library's OpenMP threads stop spinning
                _, idx = fn(sample, k)
                rec = recall(idx.numpy() if hasattr(idx, "numpy") else idx, ref)
                times[name] = (median_ms(lambda fn=fn, q=q, k=k: fn(q, k), repeat=repeat), rec)
            ours = times["pylandmark fp16"][0]
            for name, (ms, rec) in times.items():
                rows.append(dict(op="search", N=N, D=D, Q=Q, k=k, method=name, ms=ms,
                                 qps=Q / ms * 1e3, recall=rec, ratio=ms / ours))
            print(f"  search Q={Q} k={k} done")
    return rows


def gem_rows(args):
    import torch

    shape = tuple(args.gem_shape)
    x = torch.rand(shape) * 2
    p = torch.nn.Parameter(torch.tensor([3.0]))
    eps = 1e-6

    def eager(t, pp):
        return t.clamp(min=eps).pow(pp).mean(dim=(-2, -1)).pow(1.0 / pp)

    def fwd_bwd(f):
        def run():
            t = x.detach().requires_grad_()
            f(t, p).sum().backward()
        return run

    candidates = {
        "pylandmark": lambda t, pp: plm.nn.gem_torch(t, pp, eps),
        "torch eager": eager,
    }
    if not args.no_compile:
        try:
            compiled = torch.compile(eager)
            compiled(x, p.detach())
            fwd_bwd(compiled)()
            candidates["torch.compile"] = compiled
        except Exception as err:  # inductor needs a working C++ toolchain
            print(f"torch.compile unavailable: {type(err).__name__}: {err}")
    ref = eager(x.double(), p.detach().double())
    rows = []
    gbytes = x.numel() * 4 / 1e9
    for mode in ("forward", "forward+backward"):
        times = {}
        for name, f in candidates.items():
            if mode == "forward":
                with torch.no_grad():
                    err = (f(x, p.detach()).double() - ref).abs().max().item()
                    ms = median_ms(lambda f=f: f(x, p.detach()), repeat=10, warmup=2)
            else:
                err = float("nan")
                ms = median_ms(fwd_bwd(f), repeat=5, warmup=2)
            times[name] = (ms, err)
        ours = times["pylandmark"][0]
        for name, (ms, err) in times.items():
            rows.append(dict(op=f"gem {mode}", shape=shape, method=name, ms=ms,
                             gbps=gbytes / ms * 1e3, max_abs_err=err, ratio=ms / ours))
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    env = {k: os.environ.get(k)
           for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    return (f"{cpu}, {os.cpu_count()} cores, pylandmark isa {plm._C.cpu_isa()}, "
            f"threads {plm.get_num_threads()}, numpy {np.__version__}, env {env}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 64, 1024])
    ap.add_argument("--k", type=int, nargs="+", default=[5, 100])
    ap.add_argument("--gem-shape", type=int, nargs=4, default=[64, 1024, 32, 24])
    ap.add_argument("--no-gem", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--json", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = search_rows(args, rng)
    if not args.no_gem:
        rows += gem_rows(args)
    info = machine()
    print(f"\nmachine: {info}")
    print(f"{'op':<22}{'size':<24}{'method':<34}{'ms':>10}{'rate':>14}{'check':>10}{'x slower than ours':>20}")
    for r in rows:
        if r["op"] == "search":
            size = f"N={r['N']} Q={r['Q']} k={r['k']}"
            rate, check = f"{r['qps']:.0f} q/s", f"{r['recall']:.3f}"
        else:
            size = "x".join(map(str, r["shape"]))
            rate = f"{r['gbps']:.1f} GB/s"
            check = "" if np.isnan(r["max_abs_err"]) else f"{r['max_abs_err']:.1e}"
        print(f"{r['op']:<22}{size:<24}{r['method']:<34}{r['ms']:>10.2f}{rate:>14}{check:>10}{r['ratio']:>20.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
