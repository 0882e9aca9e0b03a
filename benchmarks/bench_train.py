"""Training speed: mining time per epoch and tuples / images per second of the training loop.

Runs the library's own epoch pieces (``pylandmark.training.mining.mine_tuples`` and the training loop of
``pylandmark.training.loop``) on a synthetic SfM-120k-format dataset written to a temporary folder,
and prints one table row per network:

    python benchmarks/bench_train.py                      # CPU: the tiny test preset, 96 px
    python benchmarks/bench_train.py --presets test cspdarknet53-gem --image-size 362 --tuples 10
    python benchmarks/bench_train.py --device cuda        # GPU: CSPDarknet-53 vs ResNet-101, 362 px

On the GPU the default compares the paper's network (``cspdarknet53-gem``) with the reference
ResNet-101 (``resnet101-gem``) at 362 px with float16 autocast and channels_last, using exactly
the same loop. Mining is timed for ``--query-size`` queries and a ``--pool-size`` pool (the
reference uses 2000 and 20000; scale the figure by the ratio of images described).
"""
from __future__ import annotations

import argparse
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pylandmark.data import SfM120k, make_sfm_dataset
from pylandmark.nn.losses import make_loss
from pylandmark.training.config import TrainConfig, autocast_dtype
from pylandmark.training.loop import _train_epoch, build_model, build_optimizer
from pylandmark.training.mining import mine_tuples


def bench_one(preset: str, root: Path, args: argparse.Namespace, dev: torch.device) -> dict:
    cfg = TrainConfig.from_preset(preset, data_root=str(root), image_size=args.image_size or
                                  TrainConfig.from_preset(preset).image_size,
                                  query_size=args.query_size, pool_size=args.pool_size, negatives=args.negatives,
                                  batch_size=args.batch_size, workers=args.workers, device=str(dev), progress=False,
                                  mining_batch_size=args.mining_batch_size)
    ds = SfM120k(root, "train")
    torch.manual_seed(0)
    model = build_model(cfg).to(dev)
    channels_last = dev.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = autocast_dtype(cfg, dev)
    optimizer, _ = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    loss_fn = make_loss(cfg.loss, cfg.margin)

    amp = amp_dtype is not None and dev.type == "cuda"
    # warm-up mining (allocator, kernel selection), then timed
    mine_tuples(model, ds, query_size=min(8, cfg.query_size), pool_size=min(16, cfg.pool_size),
                negatives=cfg.negatives, image_size=cfg.image_size, rng=np.random.default_rng(1),
                batch_size=cfg.mining_batch_size, num_workers=cfg.workers, device=dev, amp=amp, progress=False)
    tuples = mine_tuples(model, ds, query_size=cfg.query_size, pool_size=cfg.pool_size, negatives=cfg.negatives,
                         image_size=cfg.image_size, rng=np.random.default_rng(0), batch_size=cfg.mining_batch_size,
                         num_workers=cfg.workers, device=dev, amp=amp, progress=False)
    n_described = int(tuples.stats["n_described"])

    # training: a short warm-up epoch on the first tuples, then the timed one on args.tuples
    from pylandmark.training.mining import Tuples

    def subset(n: int) -> Tuples:
        return Tuples(tuples.qidxs[:n], tuples.pidxs[:n], tuples.nidxs[:n])

    warm = min(cfg.batch_size * 2, len(tuples))
    _train_epoch(model, model, subset(warm), ds.images, cfg, optimizer, scaler, loss_fn, dev, amp_dtype,
                 channels_last, 1, 0, False, 0)
    n = min(args.tuples, len(tuples))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    _, n_tuples, n_images = _train_epoch(model, model, subset(n), ds.images, cfg, optimizer, scaler, loss_fn, dev,
                                         amp_dtype, channels_last, 1, 0, False, 0)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    dt = time.perf_counter() - t0
    return {"preset": preset, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "image_size": cfg.image_size, "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
            "mined": f"{len(tuples)}q/{cfg.pool_size}p", "mining_s": tuples.stats["mining_s"],
            "mining_img_s": n_described / tuples.stats["extract_s"], "search_s": tuples.stats["search_s"],
            "tuples": n_tuples, "tuples_s": n_tuples / dt, "images_s": n_images / dt,
            # the reference epoch: 2000 queries + a 20000-image pool described, 2000 tuples trained
            "epoch_ref_s": 22000 / (n_described / tuples.stats["extract_s"]) + 2000 / (n_tuples / dt)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--presets", nargs="+", help="training presets (default: test on the CPU, "
                                                "cspdarknet53-gem and resnet101-gem on the GPU)")
    p.add_argument("--image-size", type=int, help="training image size (default: the preset's; 362 on the GPU)")
    p.add_argument("--data-size", type=int, help="size of the synthetic images written (default: image size)")
    p.add_argument("--clusters", type=int, default=40)
    p.add_argument("--per-cluster", type=int, default=8)
    p.add_argument("--query-size", type=int, default=64)
    p.add_argument("--pool-size", type=int, default=256)
    p.add_argument("--negatives", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=5)
    p.add_argument("--tuples", type=int, default=40, help="tuples in the timed training pass")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--mining-batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("bench_train: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    presets = args.presets or (["cspdarknet53-gem", "resnet101-gem"] if dev.type == "cuda" else ["test"])
    if dev.type == "cuda" and args.image_size is None:
        args.image_size = 362
    size = args.data_size or args.image_size or max(TrainConfig.from_preset(pr).image_size for pr in presets)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        root = make_sfm_dataset(Path(tmp), n_clusters=args.clusters, images_per_cluster=args.per_cluster,
                                image_size=size, seed=0, val_clusters=2)
        gen_s = time.perf_counter() - t0
        rows = [bench_one(pr, root, args, dev) for pr in presets]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{platform.processor() or 'CPU'}, " \
                                                                         f"{torch.get_num_threads()} threads"
    print(f"# training speed on {name}; torch {torch.__version__}; synthetic data {args.clusters}x"
          f"{args.per_cluster} images at {size} px (written in {gen_s:.1f} s); {args.negatives} negatives, "
          f"{args.batch_size} tuples/step")
    print()
    head = ["preset", "params (M)", "px", "amp", "mined", "mining s", "mining img/s", "search s", "tuples",
            "tuples/s", "train img/s", "ref epoch s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print(f"| {r['preset']} | {r['params_m']:.2f} | {r['image_size']} | {r['amp']} | {r['mined']} | "
              f"{r['mining_s']:.2f} | {r['mining_img_s']:.1f} | {r['search_s']:.3f} | {r['tuples']} | "
              f"{r['tuples_s']:.2f} | {r['images_s']:.1f} | {r['epoch_ref_s']:.0f} |")
    print()
    print("ref epoch s: an epoch at the reference sizes (describe 2000 queries + 20000 pool images, train "
          "2000 tuples), estimated from the measured rates (search time excluded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
