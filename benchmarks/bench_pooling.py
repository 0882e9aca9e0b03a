"""What SuperGlobal's extraction-time pooling costs over the network's own GeM (issue 29).

    python benchmarks/bench_pooling.py                       # CSPDarknet-53, 4 images of 768 x 576, 3 scales
    python benchmarks/bench_pooling.py --network resnet101-gem --size 1024 --repeat 3

Times :func:`pylandmark.extraction.describe_batch` (the forward pass of ``extract`` and of the
service: every scale through the network, pooled, combined) on one batch of random images with
``pooling="gem"`` (the network's own GeM, scales combined by its power mean) and with
``pooling="superglobal"`` (regional GeM, GeM+, scale GeM's maximum), at the reference's scales
(1/sqrt 2, 1, sqrt 2), alternated, median of --repeat after one warm-up round; prints both and their ratio. Random
weights: the cost does not depend on them.
"""
from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np
import torch

from pylandmark import _C
from pylandmark.extraction import check_pooling, describe_batch, multiscale_p_of, prepare_inference_model
from pylandmark.models import LandmarkNet
from pylandmark.retrieval.bench import cpu_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--network", default="cspdarknet53-gem", help="a LandmarkNet preset")
    ap.add_argument("--size", type=int, default=768, help="longer image side")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = LandmarkNet(args.network)
    dev = torch.device(args.device)
    net = prepare_inference_model(model, dev)
    x = torch.randn(args.batch, 3, args.size * 3 // 4, args.size, device=dev)
    scales = (1 / math.sqrt(2), 1.0, math.sqrt(2))
    poolings = {spec: check_pooling(model, spec) for spec in ("gem", "superglobal")}
    runs: dict[str, list[float]] = {spec: [] for spec in poolings}
    for i in range(args.repeat + 1):  # alternated, so that drift in the machine's speed hits both
        for spec, pooling in poolings.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            describe_batch(net, x, scales, multiscale_p=multiscale_p_of(model, pooling), pooling=pooling,
                           amp=dev.type == "cuda")
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first round warms up
                runs[spec].append(time.perf_counter() - t0)
    times = {spec: float(np.median(r)) for spec, r in runs.items()}
    print(f"machine: {cpu_name()} ({platform.machine()}), ISA {_C.cpu_isa()}, torch threads "
          f"{torch.get_num_threads()}, device {dev}, {args.network}, {args.batch} images of {args.size * 3 // 4} x "
          f"{args.size}, scales 1/sqrt 2, 1, sqrt 2, median of {args.repeat}")
    print("| pooling gem s | pooling superglobal s | superglobal / gem |")
    print("|---:|---:|---:|")
    print(f"| {times['gem']:.3f} | {times['superglobal']:.3f} | {times['superglobal'] / times['gem']:.3f} |")


if __name__ == "__main__":
    main()
