"""Fine-tuning on SfM-120k (unsupervised: Radenovic, Tolias, Chum, TPAMI 2018, as the paper
trains), on a team's own labelled photos, or on its own COLMAP model (:mod:`.data`): one loop.

Every epoch:

1. **Mining** (:func:`pylandmark.training.mining.mine_tuples`): ``query_size`` (query, positive) pairs
   and a pool of ``pool_size`` images are drawn; the current network (eval mode) describes them
   and every query takes ``negatives`` hard negatives from its ranking of the pool, one per
   cluster, none from its own cluster.
2. **Training**: tuples are forwarded in steps of ``batch_size`` tuples; every image keeps its
   own size (longer side ``image_size``, never upscaled, no augmentation). Images of one step
   that happen to share a shape run as one batch: with BatchNorm frozen (eval mode) every image
   is processed independently, so this is the same computation as one forward per image, only
   faster. The loss (contrastive, or triplet) is summed over the pairs and tuples of the step;
   Adam (weight decay on every parameter but GeM's p, which gets ``p_lr_mult`` x the learning
   rate) updates the network, and the learning rate is multiplied by ``exp(-lr_decay)`` after
   every epoch. ``accumulation`` splits a step into micro-batches (gradients add up: the same
   update with less memory). On the GPU: float16 autocast with loss scaling (or bfloat16) and
   channels_last.
3. **Bookkeeping**: an atomic checkpoint ``<out>/checkpoints/last.pt`` (model, optimizer,
   scheduler, loss scaler, RNG states, epoch, config, history), one log line (console,
   ``log.csv``, ``log.jsonl``, optionally TensorBoard), validation every ``validate_every``
   epochs (revisited Oxford / Paris when present under ``test_root``, otherwise mAP and
   recall@k on the SfM-120k val split, or accuracy and mAP of the held-out labelled photos)
   keeping ``checkpoints/best.pt``.

All the randomness of an epoch (pairs, pool) comes from ``numpy.random.default_rng([seed,
epoch])``, and the torch / numpy / Python generators are checkpointed, so on the CPU a resumed
run reproduces the uninterrupted one bit for bit.

After the last epoch the network is exported as a LandmarkNet directory (``<out>/model``, and
``<out>/model_best`` when validation ran); with ``whitening="lw"`` (learned, from the
whitening pairs) or ``"pca"`` the whitening is computed on the exported network and installed
as its whitening layer (the matrices are also saved, ``whitening_<kind>.safetensors``).

Several processes: run under ``torchrun`` (``torchrun --nproc_per_node 2 -m pylandmark.training
--data-root ... --out ...``); mining is split across the ranks, each step's tuples are dealt
to the ranks, and DistributedDataParallel sums the gradients (NCCL on GPUs, gloo on CPUs).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import runtime as dist_utils
from .._files import replaced_atomically
from ..nn.losses import CLASSIFICATION_LOSSES, ArcFaceHead, make_loss
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import RUNTIME_FIELDS, TrainConfig, autocast_dtype, resolve_device
from .data import describe_clusters, load_training_data
from .export import export
from .mining import Tuples, mine_tuples
from .runlog import RunLog, format_row
from .validation import has_revisited, validate

if TYPE_CHECKING:
    from ..models import LandmarkNet

__all__ = ["train", "build_model", "build_optimizer", "train_step", "freeze_batchnorm"]

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"


# ------------------------------------------------------------------------------------ building


def build_model(cfg: TrainConfig) -> LandmarkNet:
    """The LandmarkNet of ``cfg`` (preset + ``model_args``), initialised from ``pretrained``."""
    from ..models import LandmarkNet, LandmarkNetConfig, load_backbone_weights

    if cfg.pretrained and (Path(cfg.pretrained) / "config.json").is_file():
        model = LandmarkNet.from_pretrained(cfg.pretrained)
        logger.info("starting from the LandmarkNet in %s", cfg.pretrained)
        return model
    model = LandmarkNet(LandmarkNetConfig.from_preset(cfg.model, **cfg.model_args))
    if cfg.pretrained:
        report = load_backbone_weights(model, cfg.pretrained, progress=cfg.progress)
        logger.info("backbone weights from %s: %d tensors", cfg.pretrained, len(report.loaded))
    else:
        logger.warning("training %s from random weights: the paper starts from ImageNet weights "
                       "(pass pretrained=<backbone weights file or URL>)", cfg.model)
    return model


def build_optimizer(model: nn.Module, cfg: TrainConfig, head: nn.Module | None = None
                    ) -> tuple[torch.optim.Optimizer, Any]:
    """Adam with two groups (network and classification head: lr, weight decay; GeM p:
    ``p_lr_mult`` x lr, no decay) and the exponential decay ``lr x exp(-lr_decay)`` per epoch."""
    p_params = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("pool.")]
    others = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("pool.")]
    others += [] if head is None else list(head.parameters())
    groups = [{"params": others, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if p_params:
        groups.append({"params": p_params, "lr": cfg.lr * cfg.p_lr_mult, "weight_decay": 0.0})
    optimizer = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=math.exp(-cfg.lr_decay))
    return optimizer, scheduler


def freeze_batchnorm(model: nn.Module) -> nn.Module:
    """Puts every BatchNorm layer in eval mode (running statistics frozen; affine still trains)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


class _GroupForward(nn.Module):
    """Runs the network on a list of same-shape image batches in one call (one DDP forward per
    micro-batch, whatever the number of shapes), and the classification head when there is one
    (inside the DDP module, so that its gradients are summed over the ranks as well)."""

    def __init__(self, model: nn.Module, head: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, groups: list[torch.Tensor], order: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> Any:
        """The (B_g, D) descriptors of every group; with a head, ``order`` (the image of each
        descriptor row, concatenated) and ``labels`` (B,) of the images in their own order, the
        head's summed loss instead."""
        outs = [self.model(x) for x in groups]
        if self.head is None or labels is None or order is None:
            return outs
        return self.head(_in_image_order(outs, order), labels) * labels.numel()


def _in_image_order(outs: Sequence[torch.Tensor], order: torch.Tensor) -> torch.Tensor:
    """The (B, D) descriptors of the shape groups' outputs, concatenated (``order[r]``: the image
    of row r), back in image order, half precision widened to float32."""
    desc = torch.cat([o.float() if o.dtype in (torch.float16, torch.bfloat16) else o for o in outs])
    return desc[torch.argsort(order)]


# ------------------------------------------------------------------------------------ one step


def _group_by_shape(images: Sequence[torch.Tensor]) -> list[list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(images):
        groups.setdefault(tuple(x.shape), []).append(i)
    return list(groups.values())


def _micro_loss(net: nn.Module, tuples: Sequence[Sequence[torch.Tensor]], loss_fn: nn.Module | None,
                dev: torch.device, amp_dtype: torch.dtype | None, channels_last: bool,
                labels: Sequence[int] | None = None) -> torch.Tensor:
    flat = [x for t in tuples for x in t]
    groups = _group_by_shape(flat)
    batches = []
    for g in groups:
        x = torch.stack([flat[i] for i in g]).to(dev, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        batches.append(x)
    perm = torch.as_tensor([i for g in groups for i in g], device=dev)
    with torch.autocast(dev.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        if labels is not None:  # classification: one image per "tuple", the head's loss
            return net(batches, perm, torch.as_tensor(labels, dtype=torch.int64, device=dev))
        outs = net(batches)
    assert loss_fn is not None
    desc = _in_image_order(outs, perm)
    dim = desc.shape[1]
    starts = np.cumsum([0] + [len(t) for t in tuples])
    n_max = max(len(t) - 2 for t in tuples)
    b = len(tuples)
    q = desc[torch.as_tensor(starts[:-1], device=dev)]
    p = desc[torch.as_tensor(starts[:-1] + 1, device=dev)]
    neg_rows = np.zeros((b, max(n_max, 1)), dtype=np.int64)
    mask = np.zeros((b, max(n_max, 1)), dtype=bool)
    for i, t in enumerate(tuples):
        k = len(t) - 2
        neg_rows[i, :k] = np.arange(starts[i] + 2, starts[i] + 2 + k)
        mask[i, :k] = True
    negs = desc[torch.as_tensor(neg_rows, device=dev).reshape(-1)].reshape(b, neg_rows.shape[1], dim)
    return loss_fn(q, p, negs, torch.as_tensor(mask, device=dev))


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer,
               micro_batches: Sequence[Sequence[Sequence[torch.Tensor]]], loss_fn: nn.Module | None, *,
               device: torch.device | str = "cpu", amp_dtype: torch.dtype | None = None,
               scaler: Any = None, channels_last: bool = False, world_size: int = 1,
               labels: Sequence[Sequence[int]] | None = None, head: nn.Module | None = None) -> float:
    """One optimiser step over this process's share of a batch of tuples, with the network in
    training mode and its BatchNorm layers in eval mode (frozen statistics).

    Args:
        net: the network (a LandmarkNet), or a ``DistributedDataParallel`` wrapping
            ``_GroupForward(model)`` when several processes train together.
        optimizer: its optimizer.
        micro_batches: ``accumulation`` lists of tuples; a tuple is a list of (3, H, W) images
            ``[query, positive, negative, ...]``.
        loss_fn: a tuple loss module (sum over pairs and tuples); None with ``labels``.
        device, amp_dtype, scaler, channels_last: runtime settings (``scaler``: a
            ``torch.amp.GradScaler`` for float16).
        world_size: processes in the DDP group: the loss is scaled by it so that DDP's gradient
            average becomes the sum over all tuples of the step.
        labels, head: classification (``--loss arcface``): every tuple is one image, ``labels``
            holds each micro-batch's classes, and the loss is ``head``'s summed over the images
            (with DDP the head is inside ``net``, a ``_GroupForward(model, head)``).

    Returns:
        the summed loss of this process's tuples (a float).
    """
    dev = torch.device(device)
    ddp = isinstance(net, nn.parallel.DistributedDataParallel)
    fwd = net if ddp else _GroupForward(net, head)
    freeze_batchnorm(fwd.train())  # the recipe: BatchNorm statistics stay frozen
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i, mb in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        ctx = net.no_sync() if (isinstance(net, nn.parallel.DistributedDataParallel) and not last) \
            else contextlib.nullcontext()
        with ctx:
            loss = _micro_loss(fwd, mb, loss_fn, dev, amp_dtype, channels_last, None if labels is None else labels[i])
            scaled = loss * world_size if ddp else loss
            if scaler is not None:
                scaler.scale(scaled).backward()
            else:
                scaled.backward()
        total += float(loss.detach())
    if scaler is not None:
        scaler.step(optimizer)  # skips the step (and lowers the scale) on inf / NaN gradients
        scaler.update()
    else:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not math.isfinite(total) or (grads and not torch.isfinite(
                torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads])).all()):
            raise FloatingPointError(
                f"train_step: the loss ({total}) or a gradient is not finite; lower the learning rate "
                "(a large GeM p, e.g. from a high lr, underflows x^p for channels that are all below eps)")
        optimizer.step()
    return total


# ------------------------------------------------------------------------------------ data


class _Singles:
    """A classification epoch's images as one-image tuples (what :class:`_TupleImages` reads).

    Attributes:
        idx: (T,) image indices; classes: (T,) their class in [0, C).
    """

    def __init__(self, idx: np.ndarray, classes: np.ndarray):
        self.idx, self.classes = idx, classes
        self.stats: dict[str, float] = {}

    def __len__(self) -> int:
        return int(self.idx.size)

    def images(self, i: int) -> list[int]:
        return [int(self.idx[i])]


class _TupleImages(torch.utils.data.Dataset):
    """Tuple ``order[i]`` of an epoch as a list of (3, H, W) training images."""

    def __init__(self, paths: Sequence[Path], tuples: Tuples | _Singles, order: Sequence[int], image_size: int,
                 mean: Sequence[float], std: Sequence[float]):
        self.paths, self.tuples, self.order = paths, tuples, list(order)
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        from ..data.images import load_image

        return [load_image(self.paths[j], self.image_size, mean=self.mean, std=self.std)
                for j in self.tuples.images(self.order[i])]


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def _collate_one(x: Any) -> Any:
    return x


def _epoch_schedule(n_tuples: int, cfg: TrainConfig, world: int, rank: int) -> tuple[list[list[list[int]]], int]:
    """This rank's tuples: a list of steps, each a list of ``accumulation`` micro-batches of
    tuple indices. Tuple j of a step goes to slot j % (world x accumulation); slot s belongs to
    rank s % world, micro-batch s // world. An incomplete last step is dropped when it cannot
    give every slot a tuple (all ranks must take part in every step)."""
    slots = world * cfg.accumulation
    if cfg.batch_size < slots:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be >= accumulation x processes ({slots})")
    steps = []
    dropped = 0
    for s0 in range(0, n_tuples, cfg.batch_size):
        ids = list(range(s0, min(s0 + cfg.batch_size, n_tuples)))
        if len(ids) < slots:
            dropped = len(ids)
            break
        micro: list[list[int]] = [[] for _ in range(cfg.accumulation)]
        for j, t in enumerate(ids):
            s = j % slots
            if s % world == rank:
                micro[s // world].append(t)
        steps.append(micro)
    return steps, dropped


# ------------------------------------------------------------------------------------ training


def _check_resume_config(saved: Mapping[str, Any], cfg: TrainConfig) -> None:
    """Raises unless ``cfg``'s recipe is the checkpoint's. A field the checkpoint lacks (a run
    started before the field existed) had the field's default."""
    now = cfg.to_dict()
    saved = {**TrainConfig().to_dict(), **saved}
    diff = [k for k in now if k not in RUNTIME_FIELDS and saved.get(k) != now[k]]
    if diff:
        details = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in diff)
        raise ValueError(f"resume: the configuration differs from the checkpoint's ({details}); "
                         "use the same recipe, or a new out_dir to start over")


def _unwrap_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _p_value(model: LandmarkNet) -> float:
    return float(model.pool.p.detach().reshape(-1)[0])


def train(config: TrainConfig | Mapping[str, Any] | None = None, **overrides: Any) -> Path:
    """Fine-tunes a LandmarkNet on the data ``data_root`` (or ``data_csv``, ``colmap``) names
    (:mod:`pylandmark.training.data`) as :mod:`pylandmark.training.loop` describes.

    Args:
        config: a :class:`TrainConfig`, a dict of its fields, or None (defaults); ``overrides``
            replace fields (e.g. ``train(cfg, epochs=5)``). ``resume=True`` among the overrides
            continues the run in ``out_dir`` from ``checkpoints/last.pt``.

    Returns:
        the exported LandmarkNet directory (``<out_dir>/model_best`` when validation ran, else
        ``<out_dir>/model``); load it with ``LandmarkNet.from_pretrained``.

    Raises:
        ValueError: bad configuration, a non-empty ``out_dir`` without ``resume``, or a resume
            whose recipe differs from the checkpoint's.
    """
    resume = bool(overrides.pop("resume", False))
    if config is None:
        cfg = TrainConfig(**overrides)
    elif isinstance(config, TrainConfig):
        cfg = dataclasses.replace(config, **overrides)
    elif isinstance(config, Mapping):
        cfg = TrainConfig.from_dict({**config, **overrides})
    else:
        raise TypeError(f"config must be a TrainConfig, a dict or None, got {type(config).__name__}")
    if not cfg.data_root:
        raise ValueError("data_root is empty: give the training photos (class folders <root>/<landmark>/<image>, "
                         "or an SfM-120k folder from pylandmark.data.download_sfm120k)")
    dev = resolve_device(cfg.device)
    own_group = dist_utils.init_from_env(dev.type)
    try:
        return _train(cfg, dev, resume)
    finally:
        if own_group:
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, dev: torch.device, resume: bool) -> Path:
    world, rank = dist_utils.world_size(), dist_utils.rank()
    main_rank = rank == 0
    out = Path(cfg.out_dir)
    ckpt_dir = out / CHECKPOINT_DIR
    last_path, best_path = ckpt_dir / LAST, ckpt_dir / BEST
    if not resume and last_path.exists():
        raise ValueError(f"out_dir {out} already holds a training checkpoint; pass resume=True (--resume) "
                         "to continue it, or choose another out_dir")
    if resume and not last_path.exists():
        raise ValueError(f"resume: no checkpoint at {last_path}; run without resume to start training")
    dist_utils.barrier()
    if main_rank:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    amp_dtype = autocast_dtype(cfg, dev)
    channels_last = dev.type == "cuda" if cfg.channels_last is None else bool(cfg.channels_last)
    progress = cfg.progress and main_rank

    data = load_training_data(cfg)
    train_ds, val_ds = data.train, data.val
    train_paths = list(train_ds.images)
    logger.info("training on %s (%s: %s), %d process(es) on %s, amp %s", cfg.data_csv or cfg.colmap or cfg.data_root,
                data.layout, describe_clusters(train_ds), world, dev, amp_dtype)
    validating = bool(cfg.validate_every) and (val_ds is not None or has_revisited(cfg))

    model = build_model(cfg).to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing from the stubs
    head, classes = None, None
    if cfg.loss in CLASSIFICATION_LOSSES:  # the classes: the landmarks (or SfM clusters), numbered 0..C-1
        classes = np.unique(train_ds.clusters, return_inverse=True)[1].astype(np.int64)
        head = ArcFaceHead(model.dim, int(classes.max()) + 1, cfg.arcface_scale, cfg.margin).to(dev)
    optimizer, scheduler = build_optimizer(model, cfg, head)
    scaler = torch.amp.GradScaler("cuda") if (amp_dtype == torch.float16 and dev.type == "cuda") else None
    loss_fn = None if head is not None else make_loss(cfg.loss, cfg.margin)

    start_epoch = 0
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"score": None, "epoch": None}
    if resume:
        contents, meta = load_checkpoint(last_path)
        _check_resume_config(meta["config"], cfg)
        model.load_state_dict(contents["model"])
        if head is not None:
            head.load_state_dict(contents["head"])
        optimizer.load_state_dict(contents["optimizer"])
        scheduler.load_state_dict(contents["scheduler"])
        if scaler is not None and contents.get("scaler"):
            scaler.load_state_dict(contents["scaler"])
        set_rng_state(contents["rng"])
        start_epoch, history, best = int(meta["epoch"]), list(meta["history"]), dict(meta["best"])
        logger.info("resuming %s after epoch %d", out, start_epoch)

    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            _GroupForward(model, head), device_ids=[dev.index] if dev.type == "cuda" else None,
            broadcast_buffers=False)
    log = RunLog(out, cfg.tensorboard, main_rank)
    log.write(history)

    def checkpoint_meta(epoch: int) -> dict[str, Any]:
        return {"epoch": epoch, "config": cfg.to_dict(), "history": history, "best": best, "world_size": world,
                "torch_version": torch.__version__}

    def save(epoch: int, is_best: bool) -> None:
        if not main_rank:
            return
        contents = {"model": _unwrap_state(model), "optimizer": optimizer.state_dict(),
                    **({} if head is None else {"head": _unwrap_state(head)}),
                    "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else {},
                    "rng": rng_state()}
        save_checkpoint(last_path, contents, checkpoint_meta(epoch))
        if is_best:
            with replaced_atomically(best_path, durable=True) as tmp:
                shutil.copyfile(last_path, tmp)

    try:
        if cfg.validate_initial and start_epoch == 0 and not history and validating:
            metrics = validate(model, cfg, val_ds, dev)
            row = {"epoch": 0, **{k: v for k, v in metrics.items() if k != "score"}}
            history.append(row)
            if main_rank:
                logger.info(format_row(row))
            log.write(history)

        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            rng = np.random.default_rng([cfg.seed, epoch])
            tuples: Tuples | _Singles
            if classes is not None:  # classification: query_size images of the epoch, no mining
                picks = rng.permutation(classes.size)[: cfg.query_size]
                tuples = _Singles(picks, classes[picks])
            else:
                tuples = mine_tuples(model, train_ds, query_size=cfg.query_size, pool_size=cfg.pool_size,
                                     negatives=cfg.negatives, image_size=cfg.image_size, rng=rng,
                                     batch_size=cfg.mining_batch_size, num_workers=cfg.workers, device=dev,
                                     amp=amp_dtype is not None and dev.type == "cuda", progress=progress)
            t1 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            loss_sum, n_tuples, n_images = _train_epoch(net, model, tuples, train_paths, cfg, optimizer, scaler,
                                                         loss_fn, dev, amp_dtype, channels_last, world, rank,
                                                         progress, epoch, head)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t2 = time.perf_counter()
            scheduler.step()
            row = {"epoch": epoch + 1, "loss": loss_sum / max(n_tuples, 1), "lr": lr, "p": _p_value(model),
                   "epoch_s": t2 - t0, "mining_s": t1 - t0, "train_s": t2 - t1,
                   "images_per_s": n_images / max(t2 - t1, 1e-9), "tuples_per_s": n_tuples / max(t2 - t1, 1e-9),
                   "n_tuples": n_tuples, "neg_similarity": tuples.stats.get("neg_similarity", float("nan"))}
            is_best = False
            last_epoch = epoch + 1 == cfg.epochs
            if validating and ((epoch + 1) % cfg.validate_every == 0 or last_epoch):
                metrics = validate(model, cfg, val_ds, dev)
                score = metrics.pop("score")
                row.update(metrics)
                if best["score"] is None or score > best["score"]:
                    best = {"score": score, "epoch": epoch + 1}
                    is_best = True
            history.append(row)
            save(epoch + 1, is_best)
            if main_rank:
                logger.info(format_row(row))
            log.write(history)
            dist_utils.barrier()
    finally:
        log.close()

    return export(model, cfg, out, best_path, main_rank, dev, data)


def _train_epoch(net: nn.Module, model: LandmarkNet, tuples: Tuples | _Singles, paths: Sequence[Path],
                 cfg: TrainConfig, optimizer: torch.optim.Optimizer, scaler: Any, loss_fn: nn.Module | None,
                 dev: torch.device, amp_dtype: torch.dtype | None, channels_last: bool, world: int, rank: int,
                 progress: bool, epoch: int, head: nn.Module | None = None) -> tuple[float, int, int]:
    steps, dropped = _epoch_schedule(len(tuples), cfg, world, rank)
    if dropped:
        logger.info("epoch %d: the last %d tuples do not fill a step across %d process(es) x %d micro-batches; "
                    "they are skipped", epoch + 1, dropped, world, cfg.accumulation)
    order = [t for step in steps for micro in step for t in micro]
    model.train()
    freeze_batchnorm(model)
    ds = _TupleImages(paths, tuples, order, cfg.image_size, model.config.mean, model.config.std)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=cfg.workers,
                                         collate_fn=_collate_one, pin_memory=dev.type == "cuda",
                                         worker_init_fn=_worker_init if cfg.workers > 0 else None,
                                         prefetch_factor=4 if cfg.workers > 0 else None)
    it: Iterator[list[torch.Tensor]] = iter(loader)
    loss_sum = 0.0
    n_images = 0
    bar = tqdm(total=len(steps), disable=not progress, desc=f"epoch {epoch + 1}", unit="step", leave=False)
    try:
        for s, step in enumerate(steps):
            micro = [[next(it) for _ in mb] for mb in step]
            n_images += sum(len(t) for mb in micro for t in mb)
            labels = [[int(tuples.classes[t]) for t in mb] for mb in step] if isinstance(tuples, _Singles) else None
            loss = train_step(net, optimizer, micro, loss_fn, device=dev, amp_dtype=amp_dtype, scaler=scaler,
                              channels_last=channels_last, world_size=world, labels=labels, head=head)
            loss_sum += loss
            bar.update(1)
            if cfg.log_every and (s + 1) % cfg.log_every == 0:
                logger.debug("epoch %d step %d/%d loss %.4f", epoch + 1, s + 1, len(steps), loss)
    finally:
        bar.close()
    if world > 1:  # sums over the ranks, as float64 (exact for these counts)
        loss_sum, total_tuples, total_images = dist_utils.all_reduce_sum([loss_sum, len(order), n_images], dev)
        return loss_sum, int(total_tuples), int(total_images)
    return loss_sum, len(order), n_images
