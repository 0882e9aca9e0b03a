"""Bounded load test of `pylandmark serve` on the loopback interface, next to the same work done
by calling the library in one process.

    python benchmarks/bench_serve.py [--clients 4] [--requests 48] [--image-size 256] [--weights tiny|random|DIR]

Builds an index of the PNU database photos (../shared/data/pnu_landmarks/train) with the
network, starts the real service in a subprocess on a free 127.0.0.1 port, sends a fixed number
of POST /recognize requests (the PNU query photos, round robin, raw body) from N concurrent
clients with keep-alive connections, and checks every answer (HTTP 200, the label and the
neighbour ids of the library's answer for the same photo are compared). Then, with the service stopped, the
library does the same recognitions in this process: one `recognize_images` call per photo (what
a script calling the library per request does), and one call for all photos (batch throughput).
The timed part (load test and library runs) is bounded (--budget seconds, default 60; the set-up
before it is reported separately) and the script fails loudly on any error.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def percentiles(lat: list[float]) -> tuple[float, float]:
    a = np.asarray(lat) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="tiny",
                    help="network: 'tiny' (default; a 5-stage CSPDarknet 48 channels wide, so the service's own "
                         "costs show), 'random' (CSPDarknet-53, speed only) or a trained network")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds the whole run may take")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()
    t_start = time.monotonic()

    t_timed = None  # the budget covers the timed part: the load test and the library runs

    def check_budget(stage: str) -> None:
        if t_timed is not None and time.monotonic() - t_timed > args.budget:
            raise SystemExit(f"over the {args.budget:.0f} s budget during {stage}; use fewer --requests")

    import torch

    import pylandmark as plm
    from pylandmark.models.pretrained import load_network
    from pylandmark.pipelines import build_index, index_options, recognize_images

    from serve_util import Server

    pnu = REPO.parent / "shared" / "data" / "pnu_landmarks"
    if not pnu.is_dir():
        raise SystemExit(f"needs the PNU photos at {pnu}")
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    plm.set_num_threads(threads)
    import warnings

    from pylandmark.pipelines import ExtractOptions

    from serve_util import tiny_weights

    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    weights = str(tiny_weights(tmp)) if args.weights == "tiny" else args.weights
    torch.manual_seed(0)  # the service seeds the same way for --weights random
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = load_network(weights)
    opts = ExtractOptions(image_size=args.image_size, progress=False)
    index, _ = build_index(net, pnu / "train", opts, weights=weights)
    index_path = index.save(tmp / "pnu.plmi")
    index = plm.Index.load(index_path)
    photos = sorted((pnu / "test").rglob("*.png"))
    bodies = [p.read_bytes() for p in photos]
    qopts = index_options(index, progress=False)
    expected = {p: recognize_images(index, net, [p], qopts)[0] for p in photos}  # names repeat across folders

    srv = Server(index_path, "--workers", str(args.workers), "--threads", str(max(1, threads // args.workers)),
                 "--quiet", log=tmp / "server.log")
    latencies: list[float] = []
    errors: list[str] = []
    answers: list[tuple[Path, dict]] = []
    lock = threading.Lock()
    counter = iter(range(args.requests))

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            photo = photos[i % len(photos)]
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/recognize?k=5", body=bodies[i % len(bodies)],
                             headers={"Content-Type": "image/png", "X-Filename": photo.name})
                resp = conn.getresponse()
                payload = resp.read()
                dt = time.perf_counter() - t0
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}: {payload[:200]!r}")
                (got,) = json.loads(payload)
                if got["query"] != photo.name or len(got["neighbours"]) != 5 or not got["known"]:
                    raise RuntimeError(f"{photo.name}: malformed answer {got!r:.200}")
            except Exception as err:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(f"{type(err).__name__}: {err}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
                continue
            with lock:
                latencies.append(dt)
                answers.append((photo, got))
        conn.close()

    try:
        for b in bodies[:3]:  # warm-up, not timed
            c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
            c.request("POST", "/recognize", body=b, headers={"Content-Type": "image/png"})
            c.getresponse().read()
            c.close()
        setup_s = time.monotonic() - t_start
        t_timed = time.monotonic()
        t0 = time.perf_counter()
        pool = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in pool:
            t.start()
        for t in pool:
            t.join(max(1.0, args.budget - (time.monotonic() - t_timed)))
        wall = time.perf_counter() - t0
        c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        c.request("GET", "/info")
        batching = json.loads(c.getresponse().read())["worker"]["batching"]
        c.close()
    finally:
        srv.stop()
    if any(t.is_alive() for t in pool):
        raise SystemExit("clients still running at the end of the budget")
    check_budget("the load test")

    # the same recognitions through the library, one process, no HTTP
    lib_lat = []
    t1 = time.perf_counter()
    for i in range(args.requests):
        s = time.perf_counter()
        recognize_images(index, net, [photos[i % len(photos)]], qopts)
        lib_lat.append(time.perf_counter() - s)
    lib_wall = time.perf_counter() - t1
    check_budget("the library loop")
    n_batch = min(args.requests, len(photos))
    s = time.perf_counter()
    recognize_images(index, net, photos[:n_batch], qopts)
    batch_wall = time.perf_counter() - s
    check_budget("the library batch")

    # the service's answers against the library's for the same photo: identical neighbours, or
    # scores within float16 rounding of the query descriptor (batched and single forward passes
    # may round the last bits differently)
    same = sum([h["id"] for h in a["neighbours"]] == [h["id"] for h in expected[p]["neighbours"]]
               and a["label"] == expected[p]["label"] for p, a in answers)
    score_diff = max((abs(h["score"] - w["score"]) for p, a in answers
                      for h, w in zip(a["neighbours"], expected[p]["neighbours"])), default=0.0)
    p50, p99 = percentiles(latencies)
    l50, l99 = percentiles(lib_lat)
    rows = [
        (f"service, {args.clients} concurrent clients, {args.workers} worker(s)", len(latencies), len(errors),
         p50, p99, len(latencies) / wall),
        ("library, one recognize_images call per photo", args.requests, 0, l50, l99, args.requests / lib_wall),
        ("library, one recognize_images call for all photos", n_batch, 0, None, None, n_batch / batch_wall),
    ]
    print(f"| setting | requests | errors | p50 ms | p99 ms | requests/s |\n|---|---|---|---|---|---|")
    for name, n, e, a, b, rps in rows:
        fmt = (lambda v: "-" if v is None else f"{v:.0f}")
        print(f"| {name} | {n} | {e} | {fmt(a)} | {fmt(b)} | {rps:.2f} |")
    print(f"service batching: {batching}")
    print(f"answers identical to the library's: {same} of {len(answers)}; largest score difference {score_diff:.2e}")
    print(f"set-up {setup_s:.1f} s (index, server start), timed part {time.monotonic() - t_timed:.1f} s; "
          f"{platform.processor() or platform.machine()}, "
          f"{threads} threads, image size {args.image_size}, weights {args.weights}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "batching": batching, "errors": errors[:20],
                                               "identical": same, "max_score_diff": score_diff,
                                               "args": vars(args)}, indent=1))
    if errors:
        print("errors:", *errors[:10], sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
