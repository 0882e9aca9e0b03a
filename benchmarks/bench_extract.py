"""Descriptor extraction speed: pylandmark.extract vs a naive eager-torch loop.

CPU: images per second of the whole extraction (decode, resize, forward, GeM, L2N) of the PNU
photos at 1024 px, against the same network in plain eager torch, one image at a time (the
baseline runs in the same process, on the same weights). GPU (only when CUDA is available):
ms per image of the network alone, batch 16 at 1024x768, float16 autocast, channels_last, for
our inference model (BatchNorm folded) against the eager model, CSPDarknet-53 and ResNet-101.

    python benchmarks/bench_extract.py [--data ../shared/data/pnu_landmarks] [--limit N]
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import pylandmark as plm
from pylandmark.extraction import prepare_inference_model
from pylandmark.models import LandmarkNet
from pylandmark.retrieval.bench import cpu_name, cuda_median_ms

REPO = Path(__file__).resolve().parents[1]
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def naive_extract(model: torch.nn.Module, paths: list[Path], image_size: int) -> np.ndarray:
    """The baseline: one image at a time, PIL thumbnail, eager NCHW float32 forward."""
    model.eval()
    out = []
    with torch.no_grad():
        for p in paths:
            im = Image.open(p).convert("RGB")
            im.thumbnail((image_size, image_size), Image.Resampling.LANCZOS)
            x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255.0
            x = (x - MEAN) / STD
            out.append(model(x[None])[0])
    return torch.stack(out).numpy()


def bench_cpu(args: argparse.Namespace) -> None:
    paths = sorted(Path(args.data).rglob("*.png"))[: args.limit or None]
    if not paths:
        raise SystemExit(f"no PNG images under {args.data}")
    torch.manual_seed(0)
    model = LandmarkNet().eval()
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '-')}, "
          f"OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE', '-')}")
    print(f"{len(paths)} PNU photos at {args.image_size} px, random-init CSPDarknet-53 + GeM (1024-d)\n")

    # warm up both paths on one image (allocator, oneDNN primitive caches)
    naive_extract(model, paths[:1], args.image_size)
    plm.extract(model, paths[:1], image_size=args.image_size, progress=False)

    # The pipelines alternate chunk by chunk, so that load from other processes on a shared
    # machine falls on both alike; each pipeline's time is the sum over its chunks (ours pays
    # its start-up, model copy and worker start, once per chunk).
    chunks = [paths[i::args.chunks] for i in range(args.chunks)]
    names = ["eager torch, one image at a time (baseline)"] + [
        f"pylandmark.extract (batch {args.batch_size}, {w} workers)" for w in args.num_workers]
    seconds = [0.0] * len(names)
    ref_parts, ours_parts = [], [[] for _ in args.num_workers]
    for chunk in chunks:
        t0 = time.perf_counter()
        ref_parts.append(naive_extract(model, chunk, args.image_size))
        seconds[0] += time.perf_counter() - t0
        for j, workers in enumerate(args.num_workers):
            t0 = time.perf_counter()
            ours_parts[j].append(plm.extract(model, chunk, image_size=args.image_size,
                                             batch_size=args.batch_size, num_workers=workers,
                                             progress=False))
            seconds[1 + j] += time.perf_counter() - t0
    ref = np.concatenate(ref_parts)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    cos = [(ref * np.concatenate(parts).astype(np.float32)).sum(1).min() for parts in ours_parts]
    t_naive = seconds[0]
    rows = list(zip(names, seconds))
    print("| pipeline | images | seconds | images/s | speed-up |")
    print("|---|---|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {len(paths)} | {t:.1f} | {len(paths) / t:.2f} | {t_naive / t:.2f}x |")
    print(f"\nagreement with the baseline: min cosine {min(cos):.5f} (float16 output)")


def bench_gpu(args: argparse.Namespace) -> None:
    dev = torch.device("cuda")
    print(f"\nGPU: {torch.cuda.get_device_name(dev)}, batch {args.gpu_batch} at 1024x768, float16 "
          "autocast, channels_last; ms per image (median of "
          f"{args.reps} runs), network incl. GeM + L2N\n")
    x = torch.randn(args.gpu_batch, 3, 768, 1024, device=dev).contiguous(memory_format=torch.channels_last)
    print("| network | eager (ms/img) | pylandmark inference model (ms/img) | speed-up |")
    print("|---|---|---|---|")
    for preset in ("cspdarknet53-gem", "resnet101-gem"):
        torch.manual_seed(0)
        net = LandmarkNet(preset).eval()
        eager = net.to(dev).to(memory_format=torch.channels_last)
        ours = prepare_inference_model(net, dev)
        res = []
        for m in (eager, ours):
            def run(m=m):
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
                    m(x)
            res.append(cuda_median_ms(run, repeat=args.reps, warmup=3) / args.gpu_batch)
        print(f"| {preset} | {res[0]:.3f} | {res[1]:.3f} | {res[0] / res[1]:.2f}x |")
        del eager, ours, net
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "pnu_landmarks"))
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N photos (0: all)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-workers", type=lambda v: [int(x) for x in v.split(",")], default=[0, 2],
                    help="comma-separated DataLoader worker counts to time, e.g. 0,2")
    ap.add_argument("--chunks", type=int, default=5, help="alternate the pipelines over this many chunks")
    ap.add_argument("--gpu-batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--skip-cpu", action="store_true")
    args = ap.parse_args()
    if not args.skip_cpu:
        bench_cpu(args)
    if torch.cuda.is_available():
        bench_gpu(args)
    else:
        print("\nGPU section skipped: no CUDA device")


if __name__ == "__main__":
    main()
