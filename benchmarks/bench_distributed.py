"""Past one process: distributed extraction and sharded search on this machine (gloo, CPU).

1. Extraction: images/s of ``pipelines.shards.extract_to_file`` (the job behind
   ``torchrun -m pylandmark extract``: describe each rank's share, write its part, rank 0 writes
   the .npy) on 1 process (all cores for torch) and on 2 torchrun ranks (cores split between
   them), random-init CSPDarknet-53 + GeM on the PNU photos. Timed between barriers, after the
   network is loaded and has described one photo (process start-up is not part of it);
   rounds alternate 1, 2, 1, 2 ... and the best round of each counts.
2. Search: one index file of N random unit float16 rows; the same queries searched by one
   process (``Index.search``, all cores) and by W gloo ranks (``DistributedIndex`` over row
   ranges; each rank's kernels get cores / W threads). Median over repeats, measured on rank
   0 between barriers: "total" is the whole collective call (broadcast, local search, all-gather,
   merge), "local" this rank's own search alone.

    python benchmarks/bench_distributed.py [--n 200000] [--queries 1 64 1024] [--ranks 1 2 3]
                                           [--images DIR] [--image-size 512] [--json FILE]

3. With ``--gpu-stream`` (needs a GPU): out-of-core search of a host-resident db streamed through
   the GPU (``search_chunked``) against the pinned host-to-device copy bandwidth and against the
   same db resident on the GPU, CUDA-event timed.

    python benchmarks/bench_distributed.py --gpu-stream [--gpu-rows 8000000] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---- workers (run under torchrun, or in this process for one rank) --------------------------

def extract_worker(args: argparse.Namespace) -> dict:
    import torch

    from pylandmark import distributed as du
    from pylandmark.models import LandmarkNet
    from pylandmark.pipelines import ExtractOptions, shards

    du.init_from_env("cpu")
    torch.set_num_threads(args.torch_threads or max(1, cores() // du.world_size()))
    torch.manual_seed(0)
    net = LandmarkNet()
    images = sorted(Path(args.images).rglob("*.png"))[: args.limit or None]
    opts = ExtractOptions(image_size=args.image_size, batch_size=16, progress=False)
    out = Path(args.out) / f"desc-{du.world_size()}.npy"
    from pylandmark.pipelines import describe

    describe(net, images[:1], opts)  # warm: allocator, oneDNN set-up
    du.barrier()
    t0 = time.perf_counter()
    res = shards.extract_to_file(net, images, opts, out)
    du.barrier()
    seconds = time.perf_counter() - t0
    return {"ranks": du.world_size(), "images": res["count"], "seconds": seconds,
            "images_per_s": res["count"] / seconds, "torch_threads": torch.get_num_threads(),
            "per_rank": [r["images"] for r in res["ranks"]]}


def search_worker(args: argparse.Namespace) -> dict:
    import torch

    import pylandmark as plm
    from pylandmark import distributed as du
    from pylandmark.retrieval.sharded import DistributedIndex

    du.init_from_env("cpu")
    threads = max(1, cores() // du.world_size())
    plm.set_num_threads(threads)
    torch.set_num_threads(threads)
    index = DistributedIndex.open(args.index, verify=False)
    rng = np.random.default_rng(1)
    out = {"ranks": du.world_size(), "threads_per_rank": threads, "rows_per_rank": index.bounds, "rows": []}
    local = index.segments[0].matrix if index.segments else None
    for q in args.queries:
        queries = rng.normal(size=(q, index.dim)).astype(np.float32)
        index.search(queries, args.k)  # warm: page cache, allocator
        totals, locals_ = [], []
        for _ in range(args.repeat):
            du.barrier()
            t0 = time.perf_counter()
            plm.search(queries, local, k=args.k)
            locals_.append(time.perf_counter() - t0)
            du.barrier()
            t0 = time.perf_counter()
            index.search(queries if du.rank() == 0 else None, args.k)
            totals.append(time.perf_counter() - t0)
        out["rows"].append({"Q": q, "total_ms": 1e3 * statistics.median(totals),
                            "local_ms": 1e3 * statistics.median(locals_)})
    return out


def bench_gpu_stream(args: argparse.Namespace) -> dict:
    """GB/s of search_chunked over a pageable and a pinned host db, next to the pinned copy
    bandwidth (the ceiling when Q is small) and the resident-db search."""
    import torch

    import pylandmark as plm
    from pylandmark.retrieval.bench import cuda_median_ms
    from pylandmark.retrieval.chunked import search_chunked

    if not plm.cuda_available():
        raise SystemExit("--gpu-stream needs a GPU and a CUDA build of pylandmark")
    n, d = args.gpu_rows, args.dim
    host = torch.empty((n, d), dtype=torch.float16)
    for start in range(0, n, 1 << 20):  # random unit-ish rows without a float32 copy of all of them
        block = torch.randn((min(1 << 20, n - start), d))
        host[start:start + block.shape[0]] = (block / block.norm(dim=1, keepdim=True)).half()
    pinned = host.pin_memory()
    gbytes = host.numel() * 2 / 1e9
    dev_buf = torch.empty_like(pinned, device="cuda")
    copy_ms = cuda_median_ms(lambda: dev_buf.copy_(pinned, non_blocking=True), repeat=args.repeat)
    out = {"rows": n, "dim": d, "gbytes": gbytes, "h2d_pinned_gb_s": gbytes / copy_ms * 1e3, "search": []}
    resident = dev_buf
    for q in args.queries:
        queries = torch.randn((q, d), device="cuda")
        row = {"Q": q}
        for name, db in (("pageable", host), ("pinned", pinned)):
            ms = cuda_median_ms(lambda q=queries, db=db: search_chunked(q, db, k=args.k, device="cuda"),
                                repeat=args.repeat)
            row[f"{name}_ms"], row[f"{name}_gb_s"] = ms, gbytes / ms * 1e3
        row["resident_ms"] = cuda_median_ms(lambda q=queries: plm.search(q, resident, k=args.k), repeat=args.repeat)
        out["search"].append(row)
    print(f"\nout-of-core GPU search, {n:,} x {d} float16 ({gbytes:.1f} GB) in host memory, k = {args.k}; "
          f"pinned host-to-device copy {out['h2d_pinned_gb_s']:.1f} GB/s")
    print("| Q | pageable db ms (GB/s) | pinned db ms (GB/s) | db resident on the GPU ms |")
    print("|---|---|---|---|")
    for r in out["search"]:
        print(f"| {r['Q']} | {r['pageable_ms']:.1f} ({r['pageable_gb_s']:.1f}) | {r['pinned_ms']:.1f} "
              f"({r['pinned_gb_s']:.1f}) | {r['resident_ms']:.1f} |")
    return out


def run_worker(args: argparse.Namespace) -> None:
    from pylandmark import distributed as du

    result = extract_worker(args) if args.worker == "extract" else search_worker(args)
    if du.rank() == 0:
        Path(args.result).write_text(json.dumps(result))
    if du.is_distributed():
        import torch.distributed as dist

        dist.destroy_process_group()


def launch(ranks: int, worker: str, args: argparse.Namespace, result: Path, extra: list[str],
           threads: int = 0) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads or max(1, cores() // ranks)), PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           __file__, "--worker", worker, "--result", str(result), "--torch-threads", str(threads), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{worker} on {ranks} ranks failed:\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


# ---- driver ----------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--queries", type=int, nargs="+", default=[1, 64, 1024])
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--images", default=str(REPO.parent / "shared" / "data" / "pnu_landmarks"))
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--limit", type=int, default=0, help="use only the first N photos")
    p.add_argument("--skip-extract", action="store_true")
    p.add_argument("--rounds", type=int, default=2, help="alternating extraction rounds (best of each)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--gpu-stream", action="store_true", help="only the out-of-core GPU search (needs a GPU)")
    p.add_argument("--gpu-rows", type=int, default=8_000_000, help="host db rows for --gpu-stream (16 GB)")
    # worker mode (internal)
    p.add_argument("--worker", choices=("extract", "search"))
    p.add_argument("--result")
    p.add_argument("--torch-threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--index")
    p.add_argument("--out")
    args = p.parse_args()
    if args.worker:
        return run_worker(args)
    if args.gpu_stream:
        res = bench_gpu_stream(args)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
        return None

    import pylandmark as plm
    from pylandmark.retrieval.bench import cpu_name

    print(f"CPU: {cpu_name()}, {cores()} cores, kernels {plm._C.cpu_isa()}, load average "
          f"{os.getloadavg()[0]:.1f} (shared machine)")
    report: dict = {"cpu": cpu_name(), "cores": cores(), "isa": plm._C.cpu_isa(), "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_extract:
            common = ["--images", args.images, "--image-size", str(args.image_size), "--out", str(tmp),
                      "--limit", str(args.limit)]
            # alternating rounds, best of each: background load from other users hits all alike.
            # (ranks, torch threads per rank): one process on all cores, one on one core, one
            # rank per core
            configs = [(1, 0), (1, 1), (2, 0)]
            runs = [launch(r, "extract", args, tmp / f"extract-{r}-{t}.json", common, threads=t)
                    for _ in range(args.rounds) for r, t in configs]
            rows = [max((x for x in runs[i::len(configs)]), key=lambda x: x["images_per_s"])
                    for i in range(len(configs))]
            report["extract"] = runs
            print(f"\nextraction, {rows[0]['images']} PNU photos at {args.image_size} px, random-init CSPDarknet-53, "
                  f"best of {args.rounds} alternating rounds")
            print("| processes | torch threads each | images per rank | seconds | images/s | speed-up |")
            print("|---|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['ranks']} | {r['torch_threads']} | {r['per_rank']} | {r['seconds']:.1f} | "
                      f"{r['images_per_s']:.2f} | {r['images_per_s'] / rows[0]['images_per_s']:.2f}x |")

        rng = np.random.default_rng(0)
        index = plm.Index(args.dim, metric="ip")  # rows normalised here, so both paths read the same bytes
        x = rng.normal(size=(args.n, args.dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        index.add(x)
        del x
        path = index.save(tmp / "bench.plmi")
        single = plm.Index.load(path, verify=False)
        single_rows = []
        for q in args.queries:
            queries = np.random.default_rng(1).normal(size=(q, args.dim)).astype(np.float32)
            single.search(queries, args.k)
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                single.search(queries, args.k)
                times.append(time.perf_counter() - t0)
            single_rows.append({"Q": q, "ms": 1e3 * statistics.median(times)})
        extra = ["--index", str(path), "--queries", *map(str, args.queries), "--repeat", str(args.repeat)]
        dist_rows = [launch(r, "search", args, tmp / f"search-{r}.json", extra) for r in args.ranks]
        report["search"] = {"n": args.n, "dim": args.dim, "k": args.k, "single": single_rows, "ranks": dist_rows}
    report["load_after"] = os.getloadavg()

    print(f"\nsearch, N = {args.n:,} x D = {args.dim} float16, k = {args.k}, median of {args.repeat}, ms")
    head = " | ".join(f"{r['ranks']} rank{'s' if r['ranks'] > 1 else ''} total (local)" for r in dist_rows)
    print(f"| Q | one process | {head} |")
    print("|---|---|" + "---|" * len(dist_rows))
    for i, q in enumerate(args.queries):
        cells = " | ".join(f"{r['rows'][i]['total_ms']:.1f} ({r['rows'][i]['local_ms']:.1f})" for r in dist_rows)
        print(f"| {q} | {single_rows[i]['ms']:.1f} | {cells} |")
    print(f"\nload average after: {report['load_after'][0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
