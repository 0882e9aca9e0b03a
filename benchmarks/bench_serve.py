"""Bounded load test of `pylandmark serve` on the loopback interface, next to the same work done
by calling the library in one process.

    python benchmarks/bench_serve.py [--clients 4] [--requests 32] [--image-size 256] [--weights tiny|random|DIR]

Builds an index of the PNU database photos (../shared/data/pnu_landmarks/train) with the
network, starts the real service in a subprocess on a free 127.0.0.1 port, sends one untimed
pass over the 15 PNU query photos, then a fixed number of POST /recognize requests (the query
photos round robin, raw body) from N concurrent clients with keep-alive connections, and checks
every answer (HTTP 200, well formed; the neighbours are compared with the library's answer for
the same photo). Then, with the service stopped, the same recognitions in this process: the
service's engine without HTTP (network prepared once), `pipelines.recognize_images` once per
photo (what a script calling the library per request gets), and once for all photos.
The load test is bounded (--budget seconds, default 60; set-up and the library runs are
reported separately, their work is fixed) and the script fails on any error.
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
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--budget", type=float, default=60.0, help="seconds the load test may take")
    ap.add_argument("--one-photo", action="store_true",
                    help="send one photo over and over (one shape: overlapping requests share network calls)")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()
    t_start = time.monotonic()

    t_timed = None  # the budget covers the load test

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
    if args.one_photo:
        photos = photos[4:5] * len(photos)
    bodies = [p.read_bytes() for p in photos]
    qopts = index_options(index, progress=False)

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
        for b in bodies:  # warm-up, not timed: one pass, so every photo's shape has run once
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
    load_s = time.monotonic() - t_timed

    # the same recognitions in this process, no HTTP, each over the 15 photos once after a warm pass
    from pylandmark.serve.config import ServeConfig
    from pylandmark.serve.engine import Engine

    def timed(fn, items, warm: bool) -> tuple[list, list[float], float]:
        if warm:  # every shape once (the service had its warm pass too)
            for it in items:
                fn(it)
        out, lat, t = [], [], time.perf_counter()
        for it in items:
            s0 = time.perf_counter()
            out.append(fn(it))
            lat.append(time.perf_counter() - s0)
        return out, lat, time.perf_counter() - t

    eng = Engine(ServeConfig(index=str(index_path), threads=threads, max_batch=1), verify=False)
    _, eng_lat, eng_wall = timed(lambda i: eng.recognize(eng.describe([eng.prepare(bodies[i], photos[i].name)]),
                                                         [photos[i].name]), range(len(photos)), warm=True)
    eng.close()
    # recognize_images makes a fresh inference copy of the network on every call, so a warm pass
    # would change nothing: what a script calling it per request gets
    res, pipe_lat, pipe_wall = timed(lambda i: recognize_images(index, net, [photos[i]], qopts)[0],
                                     range(len(photos)), warm=False)
    expected = dict(zip(photos, res))  # by path: file names repeat across the class folders
    _, _, batch_wall = timed(lambda _: recognize_images(index, net, photos, qopts), [0], warm=False)

    # the service's answers against the library's for the same photo: identical neighbours, or
    # scores within float16 rounding of the query descriptor (batched and single forward passes
    # may round the last bits differently)
    same = sum([h["id"] for h in a["neighbours"]] == [h["id"] for h in expected[p]["neighbours"]]
               and a["label"] == expected[p]["label"] for p, a in answers)
    score_diff = max((abs(h["score"] - w["score"]) for p, a in answers
                      for h, w in zip(a["neighbours"], expected[p]["neighbours"])), default=0.0)
    p50, p99 = percentiles(latencies)
    n = len(photos)
    rows = [
        (f"service: {args.clients} concurrent clients, HTTP, {args.workers} worker(s)", len(latencies), len(errors),
         p50, p99, len(latencies) / wall),
        ("library: serve.Engine in-process (network prepared once), one photo at a time", n, 0,
         *percentiles(eng_lat), n / eng_wall),
        ("library: pipelines.recognize_images, one call per photo", n, 0, *percentiles(pipe_lat), n / pipe_wall),
        (f"library: pipelines.recognize_images, one call for all {n} photos", n, 0, None, None, n / batch_wall),
    ]
    print("| setting | requests | errors | p50 ms | p99 ms | requests/s |\n|---|---|---|---|---|---|")
    for name, cnt, e, a, b, rps in rows:
        fmt = (lambda v: "-" if v is None else f"{v:.0f}")
        print(f"| {name} | {cnt} | {e} | {fmt(a)} | {fmt(b)} | {rps:.2f} |")
    print(f"service batching: {batching}")
    print(f"answers identical to the library's: {same} of {len(answers)}; largest score difference {score_diff:.2e}")
    print(f"set-up {setup_s:.1f} s (index, server start, warm pass), load test {load_s:.1f} s, "
          f"library runs {time.monotonic() - t_timed - load_s:.1f} s; "
          f"{platform.processor() or platform.machine()}, "
          f"{threads} threads, image size {args.image_size}, weights {args.weights}"
          f"{', one photo' if args.one_photo else ''}")
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
