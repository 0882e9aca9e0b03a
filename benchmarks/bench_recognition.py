"""Recognition latency on the CPU, end to end (decode + extract + search), and index search on a
1M x 1024 index, memory-mapped vs in memory, each next to the baseline a user would write.

    python benchmarks/bench_recognition.py [--pnu ../shared/data/pnu_landmarks] [--n 1000000]

Baselines: the same photo through an eager torch CSPDarknet-53 + GeM (no BatchNorm folding,
default threads) and a numpy float32 matmul + argsort over the database.
The network is randomly initialised: latency does not depend on the weights.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import pylandmark as plm
from pylandmark.models import LandmarkNet
from pylandmark.pipelines import ExtractOptions, build_index, recognize_images
from pylandmark.retrieval.bench import median_ms, numpy_topk

HERE = Path(__file__).resolve().parent


def pnu_rows(pnu: Path, image_size: int) -> list[tuple]:
    torch.manual_seed(0)
    net = LandmarkNet().eval()
    opts = ExtractOptions(image_size=image_size, progress=False)
    t0 = time.perf_counter()
    index, _ = build_index(net, pnu / "train", opts, labels_from_folders=True, weights="random")
    build_s = time.perf_counter() - t0
    queries = sorted((pnu / "test").rglob("*.png"))
    ours = [median_ms(lambda q=q: recognize_images(index, net, [q], opts), repeat=3) for q in queries]

    db32 = index.descriptors.astype(np.float32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

    def baseline(path):
        with Image.open(path) as im:  # what a user writes: PIL decode + thumbnail, normalise
            im = im.convert("RGB")
            im.thumbnail((image_size, image_size), Image.LANCZOS)
            x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)
        x = ((x - mean) / std)[None]
        with torch.no_grad():
            f = net.backbone.forward_features(x)
            v = f.clamp(min=1e-6).pow(3).mean((-2, -1)).pow(1 / 3)
            v = torch.nn.functional.normalize(v).numpy()
        return np.argsort(-(v @ db32.T)[0])[:5]

    theirs = [median_ms(lambda q=q: baseline(q), repeat=3) for q in queries]
    return [("PNU index build (35 photos)", f"{image_size}px", build_s * 1e3, float("nan")),
            ("recognize one photo (decode+extract+search)", f"{image_size}px, index of 35",
             statistics.median(ours), statistics.median(theirs))]


def big_index_rows(n: int, dim: int) -> list[tuple]:
    rng = np.random.default_rng(0)
    index = plm.Index(dim)
    for start in range(0, n, 100_000):  # add in chunks to bound the float32 temporaries
        index.add(rng.standard_normal((min(100_000, n - start), dim), dtype=np.float32))
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("PLM_BENCH_TMP")) as tmp:
        path = index.save(Path(tmp) / "big.plmi")
        t0 = time.perf_counter()
        mm = plm.Index.load(path, mmap=True, verify=False)
        open_ms = (time.perf_counter() - t0) * 1e3
        mem = plm.Index.load(path, mmap=False, verify=False)
        q = rng.standard_normal((1, dim), dtype=np.float32)
        mm.search(q, 5)  # warm the page cache
        t_mm = median_ms(lambda: mm.search(q, 5), repeat=10)
        t_mem = median_ms(lambda: mem.search(q, 5), repeat=10)
        db32 = mem.descriptors.astype(np.float32)
        t_np = median_ms(lambda: numpy_topk(q, db32, 5), repeat=5)
        rows.append((f"open {n // 1000}k x {dim} index (mmap)", "", open_ms, float("nan")))
        rows.append(("search 1 query, in memory", f"N={n}", t_mem, t_np))
        rows.append(("search 1 query, memory-mapped (warm cache)", f"N={n}", t_mm, t_mem))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pnu", type=Path, default=HERE.parents[1] / "shared" / "data" / "pnu_landmarks")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1024)
    args = ap.parse_args(argv)
    rows = []
    if args.pnu.is_dir():
        rows += pnu_rows(args.pnu, args.image_size)
    else:
        print(f"no PNU photos at {args.pnu}: skipping the photo rows")
    rows += big_index_rows(args.n, args.dim)
    env = {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    print(f"\n{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, pylandmark threads "
          f"{plm.get_num_threads()} ({plm._C.cpu_isa()}), env {env}")
    print(f"{'what':<46}{'size':<24}{'ms':>10}{'baseline ms':>13}{'baseline/ours':>15}")
    for what, size, ms, base in rows:
        ratio = "" if base != base else f"{base / ms:.2f}"
        b = "" if base != base else f"{base:.1f}"
        print(f"{what:<46}{size:<24}{ms:>10.1f}{b:>13}{ratio:>15}")
    print("(memory-mapped row: its baseline is the in-memory search; ratio >= 0.83 means within 1.2x)")


if __name__ == "__main__":
    main()
