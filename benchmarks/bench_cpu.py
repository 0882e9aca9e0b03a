"""CPU benchmark: pylandmark search and GeM against the baselines a user would pick, in one run.

    python benchmarks/bench_cpu.py                 # the issue's sizes (N=200,000, D=1024)
    python benchmarks/bench_cpu.py --n 20000 --quick
    python benchmarks/bench_cpu.py --json out.json

Search: float16 db of unit rows; pylandmark reads it as float16 (metric cosine, norms computed
on the fly); the baselines get what they need (float32 copies for numpy, torch and faiss Flat,
faiss's own fp16 scalar quantizer). Every method's top-k is checked against an exact float64
reference on a sample of queries. The methods run interleaved (one call of each per round,
A B C A B C ...; median and min/max of the rounds) so that a shared machine's drift hits them
alike. Two machine probes (benchmarks/probe.cpp, compiled here with -march=native) give the
floors: "streaming read" reads the float16 db's bytes once on the same threads (Python threads
around a native loop: starting them costs ~0.1 ms, so the floor means little for dbs of a few
MB), as one sequential stream per thread and as 4 at once (faster on some cores: the read floor
is the faster of the two), and a peak float32 FMA rate turns each search time into GFLOP/s, a
fraction of the peak, and an arithmetic floor (Q + 1 multiply-adds per db element for cosine:
the Q dot products and the row's norm), which is the larger floor from about 8 queries up.
GeM: (64, 1024, 32, 24) float32 forward and forward+backward against eager torch and
torch.compile. The table prints last; ratio = baseline time / ours.
"""
from __future__ import annotations

import argparse
import itertools
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
from pylandmark.retrieval.bench import median_ms, numpy_topk  # noqa: E402


def exact_topk(q, db, k):
    s = q.astype(np.float64) @ db.astype(np.float64).T
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def recall(idx, ref):
    idx = np.asarray(idx)
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(idx.tolist(), ref.tolist())]))


class Probe:
    """benchmarks/probe.cpp compiled for this machine (-O2 -march=native) and loaded with
    ctypes: a peak float32 FMA rate and a plain streaming read, each run on `threads` Python
    threads at once (ctypes releases the GIL). None where no C++ compiler is available."""

    @classmethod
    def load(cls):
        import ctypes
        import hashlib
        import shutil
        import subprocess
        import tempfile

        src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "probe.cpp")
        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if cxx is None:
            print("no C++ compiler: the FMA peak and streaming-read rows are skipped")
            return None
        with open(src, "rb") as f:
            tag = hashlib.sha1(f.read()).hexdigest()[:12]
        lib = os.path.join(tempfile.gettempdir(), f"plm_probe_{os.getuid()}_{tag}.so")
        if not os.path.exists(lib):
            tmp = lib + f".{os.getpid()}"
            cmd = [cxx, "-O2", "-march=native", "-shared", "-fPIC", src, "-o", tmp]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"probe build failed ({' '.join(cmd)}): {res.stderr.strip()[:300]}")
                return None
            os.replace(tmp, lib)
        return cls(ctypes.CDLL(lib))

    def __init__(self, lib):
        import ctypes

        lib.plm_probe_fma.restype = ctypes.c_double
        lib.plm_probe_fma.argtypes = [ctypes.c_longlong]
        lib.plm_probe_read.restype = ctypes.c_ulonglong
        lib.plm_probe_read.argtypes = [ctypes.c_void_p, ctypes.c_longlong]
        lib.plm_probe_read_streams.restype = ctypes.c_ulonglong
        lib.plm_probe_read_streams.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int]
        self.lib = lib
        self.vector_bytes = lib.plm_probe_vector_bytes()

    @staticmethod
    def _on_threads(threads, fn):
        import threading

        out = [None] * threads
        pool = [threading.Thread(target=lambda i=i: out.__setitem__(i, fn(i))) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        return out

    def fma_gflops(self, threads: int, seconds: float = 0.3) -> float:
        """Best of 3 float32 FMA rates (GFLOP/s) of `threads` cores working at once."""
        iters = max(1, int(seconds * 3e9 / 12))  # ~0.3 s at 12 chains x 1 FMA/cycle
        best = 0.0
        for _ in range(3):
            t0 = time.perf_counter()
            flops = self._on_threads(threads, lambda i: self.lib.plm_probe_fma(iters))
            best = max(best, sum(flops) / (time.perf_counter() - t0) / 1e9)
        return best

    def read(self, arr: np.ndarray, threads: int, streams: int = 1) -> None:
        """Reads every byte of the contiguous `arr` once, split in `threads` equal ranges, each
        read as `streams` sequential runs at once."""
        base, n = arr.ctypes.data, arr.nbytes
        chunk = -(-n // threads) // 64 * 64 + 64

        def one(i):
            lo, hi = min(n, i * chunk), min(n, (i + 1) * chunk)
            if streams == 1:
                return self.lib.plm_probe_read(base + lo, max(0, hi - lo))
            return self.lib.plm_probe_read_streams(base + lo, max(0, hi - lo), streams)

        self._on_threads(threads, one)


READ_STREAMS = (1, 4)  # the streaming-read rows: sequential streams per thread


def interleaved_ms(fns: dict[str, Callable], repeat: int) -> dict[str, list[float]]:
    """Times each fn once per round, in turn (A B C A B C ...) so that the machine's drift hits
    every method alike; returns each method's list of `repeat` times in ms (after one warm-up
    round)."""
    times = {name: [] for name in fns}
    for r in range(repeat + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            dt = (time.perf_counter() - t0) * 1e3
            if r > 0:
                times[name].append(dt)
    return times


def spread(ts: list[float]) -> tuple[float, float, float]:
    """(median, min %, max %) of times: the min and max as percent off the median."""
    med = float(np.median(ts))
    return med, (min(ts) / med - 1) * 100, (max(ts) / med - 1) * 100


def load_native(path: str):
    """Another build's pylandmark/_C extension (e.g. main's, for a before/after table in one run),
    loaded under its own name beside the installed one."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plm_baseline_build._C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def search_with_native(mod, q, db, k):
    """plm.search with pylandmark.ops calling `mod` instead of the installed extension."""
    from pylandmark import ops

    installed, ops._C = ops._C, mod
    try:
        return plm.search(q, db, k=k, metric="cosine")
    finally:
        ops._C = installed


def search_rows(args, rng, probe):
    import torch

    N, D = args.n, args.d
    db = rng.standard_normal((N, D), dtype=np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    db16 = db.astype(np.float16)
    db32 = db16.astype(np.float32)  # the same values for every method
    tdb = torch.from_numpy(db32)
    threads = plm.get_num_threads()
    methods: dict[str, Callable] = {
        "pylandmark fp16": lambda q, k: plm.search(q, db16, k=k, metric="cosine"),
    }
    if args.baseline_native:
        other = load_native(args.baseline_native)
        methods[f"pylandmark baseline build ({other.cpu_isa()})"] = (
            lambda q, k: search_with_native(other, q, db16, k))
    methods |= {
        "numpy fp32 matmul+argpartition": lambda q, k: (None, numpy_topk(q, db32, k)),
        "torch fp32 matmul+topk": lambda q, k: torch.topk(torch.from_numpy(q) @ tdb.T, k, dim=1),
    }
    try:
        import faiss

        flat = faiss.IndexFlatIP(D)
        flat.add(db32)
        methods["faiss IndexFlatIP fp32"] = lambda q, k: flat.search(q, k)
        if not args.no_sq:
            sq = faiss.IndexScalarQuantizer(D, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
            sq.train(db32[:1000])
            sq.add(db32)
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
            repeat = args.repeat or max(3, min(20, int(2000 / (Q * N / 2e5 + 1))) // (4 if args.quick else 1))
            recalls = {}
            for name, fn in methods.items():
                _, idx = fn(sample, k)
                recalls[name] = recall(idx.numpy() if hasattr(idx, "numpy") else idx, ref)
            fns = {name: (lambda fn=fn, q=q, k=k: fn(q, k)) for name, fn in methods.items()}
            if probe is not None:
                for streams in READ_STREAMS:
                    name = f"streaming read, {streams} stream{'s' * (streams > 1)}"
                    fns[name] = lambda s=streams: probe.read(db16, threads, s)
                    recalls[name] = float("nan")
            times = interleaved_ms(fns, repeat)
            ours = float(np.median(times["pylandmark fp16"]))
            for name, ts in times.items():
                ms, lo, hi = spread(ts)
                rows.append(dict(op="search", N=N, D=D, Q=Q, k=k, method=name, ms=ms, lo=lo, hi=hi,
                                 repeat=repeat, qps=Q / ms * 1e3, recall=recalls[name], ratio=ms / ours,
                                 gflops=2.0 * Q * N * D / ms / 1e6, gbps=db16.nbytes / ms / 1e6))
            print(f"  search Q={Q} k={k} done ({repeat} interleaved rounds)")
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
    env = {k: v for k, v in sorted(os.environ.items())
           if k.startswith(("OPENBLAS_", "OMP_", "MKL_", "GOTO"))}
    return (f"{cpu}, {os.cpu_count()} cores, pylandmark isa {plm._C.cpu_isa()}, "
            f"threads {plm.get_num_threads()}, numpy {np.__version__}, env {env}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--queries", type=int, nargs="+", default=[1, 64, 1024])
    ap.add_argument("--k", type=int, nargs="+", default=[5, 100])
    ap.add_argument("--repeat", type=int, default=0, help="interleaved rounds (default: by size)")
    ap.add_argument("--baseline-native", metavar="SO",
                    help="also time this other build of pylandmark/_C*.so (e.g. main's) in the same run")
    ap.add_argument("--no-sq", action="store_true", help="skip faiss SQ fp16 (20 s a call at Q = 1024)")
    ap.add_argument("--no-probe", action="store_true", help="skip the FMA peak and streaming-read rows")
    ap.add_argument("--gem-shape", type=int, nargs=4, default=[64, 1024, 32, 24])
    ap.add_argument("--no-gem", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--json", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    probe = None if args.no_probe else Probe.load()
    threads = plm.get_num_threads()
    peak = {}
    if probe is not None:
        peak = {"1 core": probe.fma_gflops(1), f"{threads} threads": probe.fma_gflops(threads)}
    rows = search_rows(args, rng, probe)
    if probe is not None:  # again after the search: the machine drifts, so say both
        peak[f"{threads} threads, after"] = probe.fma_gflops(threads)
    if not args.no_gem:
        rows += gem_rows(args)
    info = machine()
    print(f"\nmachine: {info}")
    if peak:
        print(f"float32 FMA peak ({probe.vector_bytes * 8}-bit vectors, GFLOP/s): "
              + ", ".join(f"{k} {v:.1f}" for k, v in peak.items()))
    all_peak = max((v for k, v in peak.items() if "threads" in k), default=float("nan"))
    print(f"{'op':<22}{'size':<24}{'method':<34}{'ms':>10}{'min/max %':>14}{'rate':>14}"
          f"{'GFLOP/s':>9}{'% peak':>8}{'check':>8}{'x slower than ours':>20}")
    for r in rows:
        if r["op"] == "search":
            size = f"N={r['N']} Q={r['Q']} k={r['k']}"
            sp = f"{r['lo']:+.0f}/{r['hi']:+.0f}"
            if r["method"].startswith("streaming read"):
                rate, gf, pk, check = f"{r['gbps']:.1f} GB/s", "", "", ""
            else:
                rate, check = f"{r['qps']:.0f} q/s", f"{r['recall']:.3f}"
                gf, pk = f"{r['gflops']:.1f}", f"{100 * r['gflops'] / all_peak:.0f}"
        else:
            size = "x".join(map(str, r["shape"]))
            rate, sp, gf, pk = f"{r['gbps']:.1f} GB/s", "", "", ""
            check = "" if np.isnan(r["max_abs_err"]) else f"{r['max_abs_err']:.1e}"
        print(f"{r['op']:<22}{size:<24}{r['method']:<34}{r['ms']:>10.2f}{sp:>14}{rate:>14}"
              f"{gf:>9}{pk:>8}{check:>8}{r['ratio']:>20.2f}")
    for (Q, k), group in itertools.groupby((r for r in rows if r["op"] == "search"),
                                           key=lambda r: (r["Q"], r["k"])):
        group = list(group)
        reads = [r for r in group if r["method"].startswith("streaming read")]
        if not reads:
            continue
        ours = next(r for r in group if r["method"] == "pylandmark fp16")
        read = min(reads, key=lambda r: r["ms"])
        line = (f"Q={Q} k={k}: pylandmark takes {ours['ms'] / read['ms']:.2f}x the read floor "
                f"({read['method']}: {read['gbps']:.1f} GB/s over {read['N'] * read['D'] * 2 / 1e6:.0f} MB)")
        if all_peak == all_peak:  # not NaN
            arith = 2.0 * (Q + 1) * read["N"] * read["D"] / all_peak / 1e6
            line += (f"; arithmetic floor {arith:.1f} ms ({Q + 1} multiply-adds per element at "
                     f"{all_peak:.0f} GFLOP/s): {ours['ms'] / max(arith, read['ms']):.2f}x the larger")
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "fma_peak_gflops": peak, "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
