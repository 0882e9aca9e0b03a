"""GPU benchmark: fused GeM against eager torch and torch.compile, and exact top-k search against
torch matmul + topk (one command, tables last, search table at the very end).

    python benchmarks/gpu_bench.py [--only gem|search] [--json out.json] [--no-compile] [--smoke]

GeM: each case is first checked against an eager float64 reference; times are CUDA-event medians
after warm-up. Effective bandwidth counts one read of x (forward) or a read of x plus a write of
dx (forward+backward reads x twice: once forward, once backward).

Search: a float16 db of N unit rows x D=1024 generated on the GPU in chunks, float16 unit
queries; pylandmark.search (cosine) against what a user writes today, torch.topk(q @ db.T, k) in
float16, chunked over queries where the (Q, N) float16 score matrix would pass 4 GiB (marked *).
Each case is first checked on a few queries against float32 torch scores: the scores of the
returned rows and the j-th best scores, of pylandmark and of the baseline (whose own scores are
float16), must agree within 1e-3. GB/s counts one read of the db, TFLOP/s 2*Q*N*D; ratio = torch
ms / pylandmark ms. Cases with Q*N > 2^30 are timed as the median of 5 calls after one warm-up.

--smoke runs every code path at tiny sizes on the device there is (CUDA, else the CPU with
wall-clock timing and no torch.compile); its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import torch

import pylandmark as plm
from pylandmark import _C
from pylandmark.nn.functional import HAVE_CUDA_KERNELS
from pylandmark.ops import search_kernel
from pylandmark.retrieval.bench import cuda_median_ms, median_ms

SHAPES = [(64, 1024, 32, 24), (256, 1024, 12, 12), (8, 2048, 64, 48)]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.5e-2}

SEARCH_D = 1024
SEARCH_ATOL = 1e-3
CHECK_QUERIES = 8           # queries checked against float32 scores in each search case
CHUNK_ROWS = 1 << 18        # db rows generated or converted to float32 per step
HEAVY = 1 << 30             # Q * N above which a search case is timed with fewer repeats


@dataclass(frozen=True)
class Plan:
    """What to run, where, and how many timed calls."""

    device: str
    gem_shapes: list[tuple[int, int, int, int]]
    ns: tuple[int, ...]
    qs: tuple[int, ...]
    ks: tuple[int, ...]
    compile: bool
    score_budget: int = 4 << 30  # bytes of float16 (Q, N) scores the torch baseline holds at once
    repeat: int = 30
    warmup: int = 5

    def time(self, fn, heavy: bool = False) -> float:
        """Median ms of fn(): CUDA events on the GPU, wall clock on the CPU; heavy cases get at
        most 5 timed calls after one warm-up."""
        repeat, warmup = (min(self.repeat, 5), 1) if heavy else (self.repeat, self.warmup)
        if self.device == "cuda":
            return cuda_median_ms(fn, repeat, warmup)
        return median_ms(fn, repeat, warmup)


def make_plan(smoke: bool, use_compile: bool) -> Plan:
    """The full GPU plan, or tiny sizes on the available device for --smoke (with a score budget
    small enough that the torch baseline's chunked path runs too)."""
    if not smoke:
        return Plan("cuda", SHAPES, (1_000_000, 10_000_000), (1, 64, 1024, 8192), (5, 100), use_compile)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return Plan(device, [(4, 64, 9, 7)], (5000,), (1, 64), (5, 100), use_compile and device == "cuda",
                score_budget=2 * 5000 * 16, repeat=3, warmup=1)


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- GeM ----------------------------------------------------------------------------------------

def eager(x, p, eps=1e-6):
    return x.float().clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p).to(x.dtype)


def time_gem(plan: Plan, f, x, p, ref, mode: str) -> tuple[float, float, int]:
    """(ms, max relative error or NaN, bytes moved) of one GeM candidate in one mode."""
    nbytes = x.numel() * x.element_size()
    if mode == "forward":
        with torch.no_grad():
            err = ((f(x, p).double() - ref).abs() / ref.abs()).max().item()
            return plan.time(lambda: f(x, p)), err, nbytes
    xg = x.detach().requires_grad_()

    def step():
        f(xg, p).float().sum().backward()

    return plan.time(step), float("nan"), 3 * nbytes


def gem_rows(plan: Plan) -> list[dict]:
    """One row per shape, dtype, mode and method; raises SystemExit on a forward mismatch."""
    candidates = {"pylandmark": lambda x, p: plm.nn.gem_torch(x, p), "torch eager": eager}
    if plan.compile:
        candidates["torch.compile"] = torch.compile(eager)
    rows = []
    for shape in plan.gem_shapes:
        for dname, dtype in DTYPES.items():
            x = (torch.rand(shape, device=plan.device) * 2).to(dtype)
            p = torch.nn.Parameter(torch.tensor([3.0], device=plan.device))
            ref = x.double().clamp(min=1e-6).pow(3.0).mean(dim=(-2, -1)).pow(1 / 3.0)
            for mode in ("forward", "forward+backward"):
                progress(f"gem {mode} {shape} {dname}")
                res = {name: time_gem(plan, f, x, p, ref, mode) for name, f in candidates.items()}
                ours = res["pylandmark"][0]
                for name, (ms, err, moved) in res.items():
                    if mode == "forward" and not err < TOL[dname]:
                        raise SystemExit(f"{name} {shape} {dname}: relative error {err:.2e} over {TOL[dname]}")
                    rows.append({"op": f"gem {mode}", "shape": list(shape), "dtype": dname, "method": name,
                                 "ms": ms, "tb_per_s": moved / ms / 1e9, "rel_err": err, "x_vs_ours": ms / ours})
    return rows


def format_gem(rows: list[dict]) -> str:
    lines = [f"{'op':<22}{'shape':<20}{'dtype':<10}{'method':<15}{'ms':>9}{'TB/s':>8}{'rel err':>10}{'x ours':>8}"]
    for r in rows:
        err = "" if r["rel_err"] != r["rel_err"] else f"{r['rel_err']:.1e}"
        lines.append(f"{r['op']:<22}{'x'.join(map(str, r['shape'])):<20}{r['dtype']:<10}{r['method']:<15}"
                     f"{r['ms']:>9.3f}{r['tb_per_s']:>8.2f}{err:>10}{r['x_vs_ours']:>8.2f}")
    return "\n".join(lines)


# ---- search -------------------------------------------------------------------------------------

def unit_rows(n: int, d: int, device: str, gen: torch.Generator) -> torch.Tensor:
    """(n, d) float16 rows of unit norm, generated CHUNK_ROWS at a time to bound float32 memory."""
    out = torch.empty((n, d), dtype=torch.float16, device=device)
    for start in range(0, n, CHUNK_ROWS):
        x = torch.randn((min(CHUNK_ROWS, n - start), d), generator=gen, device=device)
        out[start:start + len(x)] = torch.nn.functional.normalize(x, dim=1)
    return out


def baseline_chunk(n: int, score_budget: int) -> int:
    """Queries per torch baseline call so that its float16 (chunk, n) scores fit score_budget bytes."""
    return max(1, score_budget // (2 * n))


def torch_topk(q: torch.Tensor, db: torch.Tensor, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a user writes today: float16 scores q @ db.T and torch.topk, `chunk` queries at a time."""
    if chunk >= len(q):
        return torch.topk(q @ db.T, k)
    parts = [torch.topk(q[i:i + chunk] @ db.T, k) for i in range(0, len(q), chunk)]
    return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])


def float32_cosine(q: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    """(Q, N) float32 cosine scores, converting CHUNK_ROWS db rows to float32 at a time."""
    qn = torch.nn.functional.normalize(q.float(), dim=1)
    out = torch.empty((len(q), len(db)), dtype=torch.float32, device=q.device)
    for start in range(0, len(db), CHUNK_ROWS):
        block = torch.nn.functional.normalize(db[start:start + CHUNK_ROWS].float(), dim=1)
        out[:, start:start + len(block)] = qn @ block.T
    return out


def check_search(q: torch.Tensor, db: torch.Tensor, k: int, chunk: int) -> tuple[float, float]:
    """Max score error of pylandmark and of the torch baseline on the first CHECK_QUERIES queries
    against float32 scores (returned rows' scores and j-th best scores); SystemExit over 1e-3."""
    qs = q[:CHECK_QUERIES]
    ref = float32_cosine(qs, db)
    best = torch.topk(ref, k).values
    errs = []
    for name, (scores, idx) in (("pylandmark", plm.search(qs, db, k)), ("torch", torch_topk(qs, db, k, chunk))):
        scores = scores.float()
        err = max((scores - ref.gather(1, idx)).abs().max().item(), (scores - best).abs().max().item())
        if not err <= SEARCH_ATOL:
            raise SystemExit(f"search N={len(db)} Q={len(q)} k={k}: {name} score error {err:.2e} over {SEARCH_ATOL}")
        errs.append(err)
    return errs[0], errs[1]


def search_case(plan: Plan, q: torch.Tensor, db: torch.Tensor, k: int) -> dict:
    """Checks, then times pylandmark.search and the torch baseline on one (N, Q, k)."""
    (n, d), nq = db.shape, len(q)
    chunk = baseline_chunk(n, plan.score_budget)
    err, torch_err = check_search(q, db, k, chunk)
    heavy = nq * n > HEAVY
    ours = plan.time(lambda: plm.search(q, db, k), heavy)
    theirs = plan.time(lambda: torch_topk(q, db, k, chunk), heavy)
    return {"op": "search", "n": n, "d": d, "q": nq, "k": k, "pylandmark_ms": ours, "torch_ms": theirs,
            "ratio": theirs / ours, "queries_per_s": nq / ours * 1e3, "gb_per_s": n * d * 2 / ours / 1e6,
            "tflop_per_s": 2 * nq * n * d / ours / 1e9, "max_err": err, "torch_max_err": torch_err,
            "torch_chunk": min(chunk, nq), "kernel": search_kernel(q, db, k) if q.is_cuda else "cpu"}


def search_rows(plan: Plan) -> list[dict]:
    """One row per (N, Q, k); the db of each N is generated once and freed before the next."""
    gen = torch.Generator(device=plan.device).manual_seed(0)
    rows = []
    for n in plan.ns:
        db = unit_rows(n, SEARCH_D, plan.device, gen)
        for nq in plan.qs:
            q = unit_rows(nq, SEARCH_D, plan.device, gen)
            for k in plan.ks:
                progress(f"search N={n} Q={nq} k={k}")
                rows.append(search_case(plan, q, db, k))
        del db
    return rows


def format_search(rows: list[dict], score_budget: int) -> str:
    lines = [(f"exact top-k search, D={SEARCH_D}, float16 unit-norm db, float16 queries, cosine; "
              "torch = torch.topk(q @ db.T, k) in float16"),
             (f"{'N':>11}{'Q':>6}{'k':>5}{'pylandmark ms':>15}{'torch ms':>11}{'ratio':>8}{'queries/s':>12}"
              f"{'GB/s':>9}{'TFLOP/s':>9}{'max err':>9}  kernel")]
    chunked = {}
    for r in rows:
        mark = "*" if r["torch_chunk"] < r["q"] else " "
        if mark == "*":
            chunked[r["n"]] = r["torch_chunk"]
        lines.append(f"{r['n']:>11}{r['q']:>6}{r['k']:>5}{r['pylandmark_ms']:>15.3f}{r['torch_ms']:>10.3f}{mark}"
                     f"{r['ratio']:>8.2f}{r['queries_per_s']:>12.0f}{r['gb_per_s']:>9.1f}"
                     f"{r['tflop_per_s']:>9.2f}{r['max_err']:>9.1e}  {r['kernel']}")
    if chunked:
        lines.append(f"* torch baseline chunked over queries to keep its float16 scores within {score_budget:,} "
                     "bytes: " + "; ".join(f"N={n}: {c} queries per call" for n, c in chunked.items()))
    return "\n".join(lines)


# ---- driver -------------------------------------------------------------------------------------

def unavailable(plan: Plan, only: str | None) -> str | None:
    """Why the selected parts cannot run on plan.device, or None."""
    if plan.device != "cuda":
        return None
    if not torch.cuda.is_available():
        return "no CUDA device: nothing to benchmark (--smoke runs on the CPU)"
    if only != "search" and not HAVE_CUDA_KERNELS:
        return "pylandmark was built without CUDA kernels"
    if only != "gem" and not hasattr(_C, "search_cuda"):
        return "pylandmark was built without the CUDA search kernel"
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--only", choices=("gem", "search"), help="run one part (default: both)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CUDA or the CPU: checks code paths only")
    args = ap.parse_args(argv)
    plan = make_plan(args.smoke, not args.no_compile)
    reason = unavailable(plan, args.only)
    if reason:
        print(reason, file=sys.stderr)
        return 1
    gem = gem_rows(plan) if args.only != "search" else []
    search = search_rows(plan) if args.only != "gem" else []
    device = torch.cuda.get_device_name() if plan.device == "cuda" else f"CPU, {plm.get_num_threads()} threads"
    print(f"\n{device}, torch {torch.__version__}, pylandmark {plm.__version__}"
          f"{' (smoke run: tiny sizes, numbers mean nothing)' if args.smoke else ''}")
    if gem:
        print(format_gem(gem))
    if search:
        print(("\n" if gem else "") + format_search(search, plan.score_budget))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "smoke": args.smoke, "rows": gem, "search": search}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
