"""Batched, multi-scale global descriptor extraction.

Images are decoded and resized in DataLoader worker processes and grouped by their resized
shape, so that every batch holds images of one shape (never padded: padding would change GeM).
The network runs on an inference copy of the model (BatchNorm folded into the convolutions,
channels_last; float16 autocast on the GPU), so the caller's model is left as it was.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import runtime
from ._checks import check_int, check_number, check_scales
from .data.images import IMAGENET_MEAN, IMAGENET_STD, ImageList, LoadFailure, list_images, prepare_image, to_rgb
from .models.layers import fold_batchnorm, l2n
from .models.pooling import Pooling
from .nn.functional import scale_gem
from .runtime import resolve_device

__all__ = ["extract", "extract_shared", "describe", "describe_batch", "ExtractOptions", "compute_whitening",
           "LoadFailure", "SkippedImages", "multiscale_combine", "prepare_inference_model", "DEFAULT_SCALES_MS",
           "check_pooling", "multiscale_p_of"]

logger = logging.getLogger(__name__)

class SkippedImages(RuntimeWarning):
    """``extract(..., on_error="skip")`` left out images it could not read (one warning per call)."""

DEFAULT_SCALES_MS = (1.0, 1.0 / math.sqrt(2.0), 0.5)


@dataclass
class ExtractOptions:
    """How images become descriptors (kept in an index's metadata so later queries match)."""

    image_size: int = 1024
    scales: tuple[float, ...] = (1.0,)
    batch_size: int = 16
    num_workers: int = 0
    device: str = "cpu"
    progress: bool = True
    whitening: str | None = None  # a whitening the network holds, or a Whitening.save() file
    amp: bool | None = None  # autocast; None: on for CUDA, off for the CPU
    pooling: str = "gem"  # a models.pooling.Pooling spec ("gem": the network's own GeM)

    def metadata(self) -> dict:
        return {"image_size": self.image_size, "scales": list(self.scales), "whitening": self.whitening,
                "pooling": str(Pooling.parse(self.pooling))}


class _DatasetAdapter(torch.utils.data.Dataset):
    """Wraps a user Dataset: items may be a (3, H, W) tensor, a PIL image, or a tuple whose
    first element is one of those; yields ``(index, tensor | LoadFailure)``."""

    def __init__(self, dataset: Any, image_size: float | None, mean: Sequence[float],
                 std: Sequence[float], on_error: str):
        self.dataset, self.image_size, self.mean, self.std = dataset, image_size, mean, std
        self.on_error = on_error

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | LoadFailure]:
        try:
            item = self.dataset[index]
            if isinstance(item, (tuple, list)):
                item = item[0]
            if isinstance(item, torch.Tensor):
                if item.dim() != 3 or item.shape[0] != 3 or not item.is_floating_point():
                    raise ValueError(f"dataset item {index} must be a float (3, H, W) tensor, got "
                                     f"{item.dtype} {tuple(item.shape)}")
                return index, item
            from PIL import Image

            if isinstance(item, Image.Image):
                return index, prepare_image(to_rgb(item), self.image_size, None, self.mean, self.std)
            raise TypeError(f"dataset item {index} is a {type(item).__name__}; expected a (3, H, W) "
                            "tensor, a PIL image, or a tuple starting with one")
        except Exception as err:  # noqa: BLE001 - reported per item in skip mode
            if self.on_error == "raise":
                raise
            return index, LoadFailure(index, f"{type(self.dataset).__name__}[{index}]", str(err))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding and resizing do not need intra-op threads


def prepare_inference_model(model: nn.Module, device: torch.device, channels_last: bool = True) -> nn.Module:
    """An eval-mode copy of ``model`` on ``device`` with BatchNorm folded into the convolutions
    (same outputs up to float rounding; the caller's model is not modified)."""
    m = copy.deepcopy(model).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    fold_batchnorm(m)
    m = m.to(device)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # missing from torch's stubs
    return m


def multiscale_combine(descriptors: torch.Tensor, p: float) -> torch.Tensor:
    """Combines per-scale descriptors (S, B, D) -> (B, D): ``L2N((mean_s v_s^p)^(1/p))``."""
    if descriptors.dim() != 3:
        raise ValueError(f"descriptors must be (S, B, D), got shape {tuple(descriptors.shape)}")
    if not p > 0:
        raise ValueError(f"p must be > 0, got {p}")
    v = descriptors.float()
    if p != 1.0:
        v = v.clamp(min=0).pow(p).mean(0).pow(1.0 / p)
    else:
        v = v.mean(0)
    return l2n(v)


def multiscale_p_of(model: nn.Module, pooling: Pooling | None = None) -> float:
    """The power of the mean over scales for ``model`` with ``pooling`` (when its ``scale_p`` is
    None): the GeM p in use, or 1 after a whitening layer (cirtorch's rule); any other module:
    its ``multiscale_p`` attribute, else 1 (a pooling of its own is for a LandmarkNet only,
    :func:`check_pooling`)."""
    if pooling is None or pooling.is_default:
        return float(getattr(model, "multiscale_p", 1.0))
    pool: Any = model.pool
    whitened = getattr(model, "whiten", None) is not None
    return pooling.multiscale_p(float(pool.p.detach().reshape(-1)[0]), whitened)


def check_pooling(model: nn.Module, pooling: Any, name: str = "pooling") -> Pooling | None:
    """``pooling`` parsed, or None for the network's own; a pooling other than the network's own
    needs a :class:`~pylandmark.models.LandmarkNet` (its feature map and GeM)."""
    spec = Pooling.parse(pooling, name)
    if spec.is_default:
        return None
    from .models.landmarknet import LandmarkNet

    if not isinstance(model, LandmarkNet):
        raise TypeError(f"{name}={str(spec)!r} re-pools a LandmarkNet's feature map; got a "
                        f"{type(model).__name__}: pass a LandmarkNet or pooling='gem'")
    return spec


def describe_batch(net: nn.Module, x: torch.Tensor, scales: Sequence[float], *, multiscale_p: float = 1.0,
                   whitening: Any = None, amp: bool = False, pooling: Pooling | None = None) -> torch.Tensor:
    """One batch through the network: the forward pass of :func:`extract`, of the service and
    of anything else that describes prepared images.

    Args:
        net: the inference network (:func:`prepare_inference_model`), mapping (B, 3, H, W) to
            (B, D).
        x: (B, 3, H, W) prepared images (one shape), on the network's device.
        scales: image scales; with several, the per-scale descriptors are combined as
            ``L2N((mean_s v_s^p)^(1/p))`` with ``p = multiscale_p``, or by the scale GeM of
            ``pooling``.
        whitening: a :class:`~pylandmark.nn.whiten.Whitening` applied last, in float64 (the
            projection can amplify float32 rounding), or None.
        amp: autocast (float16 on CUDA, bfloat16 on the CPU).
        pooling: a :class:`~pylandmark.models.pooling.Pooling` other than the network's own
            (:func:`check_pooling`), passed to a LandmarkNet's forward; None: ``net(x)``.

    Returns:
        (B, D) unit descriptors on ``x``'s device: float32, or float64 when whitened.
    """
    x = x.contiguous(memory_format=torch.channels_last)
    amp_dtype = torch.float16 if x.device.type == "cuda" else torch.bfloat16
    per_scale = []
    with torch.inference_mode():
        with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp):
            for s in scales:
                v = net(_scaled(x, s)) if pooling is None else net(_scaled(x, s), pooling)
                if v.dim() != 2 or v.shape[0] != x.shape[0]:
                    raise ValueError(f"model must return (B, D) descriptors, got shape {tuple(v.shape)}")
                per_scale.append(v.float())
        if pooling is not None and pooling.scale_p is not None:
            v = l2n(scale_gem(torch.stack(per_scale), pooling.scale_p))
        else:
            v = multiscale_combine(torch.stack(per_scale), multiscale_p if len(scales) > 1 else 1.0)
        return v if whitening is None else whitening.apply(v.double())


def _scaled(x: torch.Tensor, s: float) -> torch.Tensor:
    if s == 1.0:
        return x
    h, w = x.shape[-2:]
    if math.floor(h * s) >= 1 and math.floor(w * s) >= 1:
        return F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
    size = (max(1, math.floor(h * s)), max(1, math.floor(w * s)))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _as_dataset(images: Any, image_size: float | None, bboxes: Any, mean: Sequence[float],
                std: Sequence[float], on_error: str) -> torch.utils.data.Dataset:
    if isinstance(images, torch.utils.data.Dataset) and not isinstance(images, ImageList):
        if bboxes is not None:
            raise ValueError("bboxes applies to paths and folders; crop inside your Dataset instead")
        return _DatasetAdapter(images, image_size, mean, std, on_error)
    if isinstance(images, ImageList):
        return images
    if isinstance(images, (str, os.PathLike)):
        p = Path(images)
        if p.is_dir():
            paths = list_images(p)
            if not paths:
                raise ValueError(f"images: no image files found under the folder {p}")
        elif p.is_file():
            raise TypeError(f"images is a single file ({p}); pass a list of paths, e.g. [{str(p)!r}]")
        else:
            raise FileNotFoundError(f"images: no folder or file at {p}")
    elif isinstance(images, Sequence) or (hasattr(images, "__iter__")
                                          and not isinstance(images, (bytes, dict))):
        paths = list(images)
        bad = next((x for x in paths if not isinstance(x, (str, os.PathLike))), None)
        if bad is not None:
            raise TypeError(f"images must be file paths (str or Path), a folder or a Dataset; got an "
                            f"item of type {type(bad).__name__}")
    else:
        raise TypeError(f"images must be a list of paths, a folder or a torch Dataset, got "
                        f"{type(images).__name__}")
    return ImageList(paths, image_size, bboxes, mean=mean, std=std, on_error=on_error)


def _run_device(model: nn.Module, device: Any) -> torch.device:
    """Where :func:`extract` runs the network: ``device`` when given, else the model's."""
    if device is not None:
        return resolve_device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def extract(model: nn.Module, images: Any, *, image_size: float | None = 1024,
            scales: Sequence[float] = (1.0,), bboxes: Sequence[Any] | None = None, batch_size: int = 16,
            num_workers: int = 0, device: str | torch.device | None = None, amp: bool | None = None,
            output: str = "numpy", on_error: str = "raise", progress: bool = True,
            max_buffered: int | None = None, whitening: Any = None, pooling: Any = None) -> Any:
    """Global descriptors of a set of images, (N, D) float16, unit L2 norm.

    Args:
        model: a :class:`~pylandmark.models.LandmarkNet` (or any module mapping normalised
            (B, 3, H, W) images to (B, D) descriptors). It is not modified: an eval-mode copy
            with BatchNorm folded runs on ``device``.
        images: a list of image paths, a folder (searched recursively, sorted by path), an
            :class:`~pylandmark.data.ImageList`, or a torch Dataset whose items are (3, H, W)
            normalised tensors or PIL images (or tuples starting with one).
        image_size: longer side after resizing (LANCZOS, never upscaled); None keeps the size.
            Not applied to tensors coming from a Dataset.
        scales: image scales (bilinear resize, align_corners=False; up-scales such as sqrt(2)
            work too); the descriptors are combined as ``(mean_s v_s^p)^(1/p)`` with p the
            model's ``multiscale_p`` (its GeM p; 1 with a whitening layer), then L2-normalised.
            The paper's multi-scale setting is ``(1, 1/sqrt(2), 1/2)``.
        bboxes: one (x1, y1, x2, y2) or None per path: the query crop, resized so it keeps its
            scale relative to the full image.
        batch_size: images per forward pass; a batch only ever holds images of one shape.
        num_workers: DataLoader worker processes for decoding and resizing (0: in-process).
        device: where the network runs ("auto", "cpu", "cuda", "cuda:N" or a torch.device);
            default the model's device.
        amp: autocast (float16 on CUDA, bfloat16 on CPU); default on for CUDA, off for CPU.
        output: "numpy" (a float16 numpy array) or "torch" (a float16 tensor on ``device``).
        on_error: "raise" (default): an unreadable image raises FileNotFoundError /
            ImageLoadError naming the file. "skip": unreadable images are left out with a
            warning, and the result becomes ``(descriptors, skipped)``, ``skipped`` being a list
            of :class:`~pylandmark.data.LoadFailure` (index, source, message) and the
            descriptors holding the kept images in input order.
        progress: show a tqdm progress bar.
        max_buffered: most images held while waiting for same-shape batch mates (default
            ``2 * batch_size``); beyond that the emptiest group is run as a partial batch.
        whitening: a post-hoc whitening ``L2N(P (x - m))`` applied (in float64) to the final
            descriptors: the name of one the model holds (``model.whitenings``, e.g. the Lw of a
            cirtorch network; its multi-scale variant when there are several scales), a
            :class:`~pylandmark.nn.whiten.Whitening`, or a file written by ``Whitening.save``.
        pooling: how a LandmarkNet pools: a :class:`~pylandmark.models.pooling.Pooling` or its
            spec, e.g. ``"superglobal"`` (regional GeM, GeM+ and, over several scales, scale
            GeM's maximum; the reference uses scales ``(1/sqrt(2), 1, sqrt(2))``); None or
            ``"gem"``: the network's own GeM.

    Returns:
        (N, D) float16 descriptors, or ``(descriptors, skipped)`` with ``on_error="skip"``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    scales = check_scales(scales)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    num_workers = check_int(num_workers, "num_workers", minimum=0)
    if max_buffered is None:
        max_buffered = 2 * batch_size
    max_buffered = check_int(max_buffered, "max_buffered", minimum=batch_size)
    if output not in ("numpy", "torch"):
        raise ValueError(f"output must be 'numpy' or 'torch', got {output!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    check_number(image_size, "image_size", minimum=1, none_ok=True)
    dev = _run_device(model, device)
    use_amp = (dev.type == "cuda") if amp is None else bool(amp)

    cfg = getattr(model, "config", None)
    mean = tuple(getattr(cfg, "mean", IMAGENET_MEAN))
    std = tuple(getattr(cfg, "std", IMAGENET_STD))
    dataset = _as_dataset(images, image_size, bboxes, mean, std, on_error)
    n = len(dataset)  # type: ignore[arg-type]  # every dataset _as_dataset returns has a length
    if n == 0:
        raise ValueError("images is empty: nothing to extract")
    spec = check_pooling(model, pooling)
    ms_p = multiscale_p_of(model, spec)
    from .models.whitening import select_whitening

    lw = select_whitening(model, whitening, multiscale=len(scales) > 1)
    net = prepare_inference_model(model, dev)

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=num_workers,
        pin_memory=dev.type == "cuda", worker_init_fn=_worker_init if num_workers > 0 else None)
    results: dict[int, torch.Tensor] = {}
    skipped: list[LoadFailure] = []
    buckets: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
    buffered = 0
    bar = tqdm(total=n, disable=not progress, unit="img", desc="extract", leave=False)

    def run(shape: tuple[int, int]) -> None:
        nonlocal buffered
        items = buckets.pop(shape)
        buffered -= len(items)
        x = torch.stack([t for _, t in items]).to(dev, non_blocking=True)
        v = describe_batch(net, x, scales, multiscale_p=ms_p, whitening=lw, amp=use_amp, pooling=spec)
        for (i, _), row in zip(items, v):
            results[i] = row
        bar.update(len(items))

    batches = iter(loader)
    try:
        with torch.inference_mode():
            for index, item in batches:
                if isinstance(item, LoadFailure):
                    skipped.append(item)
                    bar.update(1)
                    continue
                shape = (int(item.shape[-2]), int(item.shape[-1]))
                buckets.setdefault(shape, []).append((int(index), item))
                buffered += 1
                if len(buckets[shape]) >= batch_size:
                    run(shape)
                elif buffered > max_buffered:
                    # the emptiest group (oldest first on ties): the full-ish ones keep filling
                    run(min(buckets, key=lambda k: len(buckets[k])))
            for shape in sorted(buckets, key=lambda k: -len(buckets[k])):
                run(shape)
    finally:
        bar.close()
        # stop the workers now: an exception's traceback keeps the iterator alive in a reference
        # cycle, and shutting down from the garbage collector takes seconds per worker
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    if skipped:  # the one report of the skipped images (the caller also gets the list)
        names = ", ".join(f.message if f.source in f.message else f"{f.source} ({f.message})"
                          for f in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        msg = f"extract: skipped {len(skipped)} of {n} images that could not be read: {names}{more}"
        warnings.warn(msg, SkippedImages, stacklevel=2)
    kept = sorted(results)
    if kept:
        desc = torch.stack([results[i] for i in kept]).to(torch.float16)
    else:
        dim = int(getattr(model, "dim", 0))
        desc = torch.empty((0, dim), dtype=torch.float16, device=dev)
    out: Any = desc if output == "torch" else desc.cpu().numpy()
    logger.info("extracted %d descriptors of size %d (%d skipped)", len(kept), desc.shape[1], len(skipped))
    if on_error == "skip":
        return out, skipped
    return out


def extract_shared(model: nn.Module, images: Sequence[Any], *, gather: bool = True,
                   bboxes: Sequence[Any] | None = None, **kwargs: Any) -> Any:
    """:func:`extract` with the work split over the torch.distributed ranks: rank r describes
    the contiguous share :func:`pylandmark.runtime.share_bounds` gives it. In one process (no
    process group joined) this is :func:`extract` of every image.

    Args:
        model, kwargs: as :func:`extract` (``on_error="skip"`` only with ``gather=False``).
        images: the same list of paths on every rank.
        gather: True: the (N, D) float16 descriptors of all images, in order, on every rank
            (exact: float16 rows travel as they are). False: this rank's (n_r, D) share only.
            (:func:`describe` gathers nothing with ``skip_bad``.)
        bboxes: one crop (or None) per image, as :func:`extract`.

    Returns:
        What :func:`extract` returns for the rows described above (a torch tensor with
        ``output="torch"``, on the extraction device).
    """
    images = list(images)
    if gather and kwargs.get("on_error", "raise") != "raise":
        raise ValueError("extract_shared: gather needs on_error='raise' (every rank must know every row count)")
    lo, hi = runtime.share_range(len(images))
    if kwargs.get("progress", True) and runtime.rank() != 0:
        kwargs["progress"] = False  # one bar, on rank 0
    crops = None if bboxes is None else list(bboxes)[lo:hi]
    if hi > lo:
        out = extract(model, images[lo:hi], bboxes=crops, **kwargs)
    else:  # an empty share (more ranks than images)
        dim = int(getattr(model, "dim", 0))
        empty = torch.empty((0, dim), dtype=torch.float16, device=_run_device(model, kwargs.get("device")))
        out = empty if kwargs.get("output") == "torch" else empty.cpu().numpy()
        if kwargs.get("on_error") == "skip":
            out = (out, [])
    return runtime.gather_shares(out, len(images)) if gather else out


def describe(network: nn.Module, images: Sequence[Any], opts: ExtractOptions, *, skip_bad: bool = False,
             bboxes: Sequence[Any] | None = None, gather: bool = True) -> tuple[Any, list[Any], list[str]]:
    """The descriptors of image files with ``opts``: the one describe step of the pipelines, the
    torchrun jobs and the evaluation, split over the ranks as :func:`extract_shared`.

    Returns:
        ``(descriptors, kept, skipped)``: (n, D) float16 numpy descriptors of the images that
        could be read (with ``gather=False``: of this rank's share), those images, and one
        message per skipped image (empty unless ``skip_bad``; extraction warns once about them).

    Raises:
        ValueError: with ``skip_bad``, when none of the (non-empty) share could be read.
    """
    images = list(images)
    gather = gather and not skip_bad  # with skip_bad, the rows other ranks skipped are unknown here
    result = extract_shared(network, [str(p) for p in images], gather=gather, bboxes=bboxes,
                            image_size=opts.image_size, scales=opts.scales, batch_size=opts.batch_size,
                            num_workers=opts.num_workers, device=opts.device, amp=opts.amp,
                            progress=opts.progress, on_error="skip" if skip_bad else "raise",
                            whitening=opts.whitening, pooling=opts.pooling)
    mine = images if gather else images[slice(*runtime.share_range(len(images)))]
    if not skip_bad:
        return result, mine, []
    desc, failures = result
    bad = {f.index for f in failures}
    kept = [p for i, p in enumerate(mine) if i not in bad]
    if mine and not kept:  # nothing useful: an error, not an empty result
        raise ValueError(f"none of the {len(mine)} images could be read (first: {failures[0].source}: "
                         f"{failures[0].message})")
    return desc, kept, [f"{f.source}: {f.message}" for f in failures]


def compute_whitening(model: nn.Module, images: Sequence[Any], kind: str = "lw", *, qidxs: Any = None,
                      pidxs: Any = None, image_size: float | None = 1024, scales: Sequence[float] = (1.0,),
                      batch_size: int = 16, num_workers: int = 0, device: Any = None, amp: bool | None = None,
                      progress: bool = True, strip: bool = True, on_error: str = "raise", pooling: Any = None) -> Any:
    """Describes ``images`` with ``model`` (without its whitening layer, unless ``strip=False``)
    and learns a whitening from them (:func:`~pylandmark.nn.whiten.learn_whitening` or
    :func:`~pylandmark.nn.whiten.pca_whitening`); under torch.distributed every rank describes
    its share and every rank gets the same whitening.

    Args:
        model: a LandmarkNet.
        images: image paths (e.g. ``WhiteningPairs(root).images``).
        kind: "lw" (needs ``qidxs`` / ``pidxs``, the matching pairs) or "pca".
        image_size, scales, batch_size, num_workers, device, amp, progress, pooling: as
            :func:`extract` (a whitening learned with one pooling fits descriptors of that one).
        strip: True: the descriptors of the model without its whitening layer (the whitening
            to install in that layer's place, :func:`~pylandmark.models.whitening.install_whitening`).
            False: the model's descriptors as :func:`extract` gives them (a post-hoc whitening,
            ``extract(model, ..., whitening=w)``; any nn.Module). The same without a layer.
        on_error: "raise" (default) or "skip" (one process only): unreadable images are left
            out with :func:`extract`'s warning, and so are the pairs that hold one; the result
            becomes ``(whitening, skipped)``, ``skipped`` a list of
            :class:`~pylandmark.data.LoadFailure`.

    Returns:
        a :class:`~pylandmark.nn.whiten.Whitening` for the (D,) descriptors described, or
        ``(whitening, skipped)`` with ``on_error="skip"``.
    """
    from .models.whitening import strip_whitening
    from .nn.whiten import KINDS, as_indices, learn_whitening, pca_whitening

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "lw" and (qidxs is None or pidxs is None):
        raise ValueError("kind='lw' needs qidxs and pidxs (the matching pairs); use kind='pca' without pairs")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if on_error == "skip" and runtime.world_size() > 1:
        raise ValueError("compute_whitening: on_error='skip' works in one process only (every rank must "
                         "know which images were left out)")
    images = list(images)
    if kind == "lw":  # checked before the long extraction
        qidxs, pidxs = as_indices(qidxs, "qidxs", len(images)), as_indices(pidxs, "pidxs", len(images))
        if qidxs.size != pidxs.size:
            raise ValueError(f"qidxs ({qidxs.size}) and pidxs ({pidxs.size}) must have the same length")
    base = strip_whitening(model).eval() if strip else model
    kwargs = dict(image_size=image_size, scales=scales, batch_size=batch_size, num_workers=num_workers,
                  device=device, amp=amp, progress=progress, pooling=pooling)
    skipped: list[LoadFailure] = []
    with torch.random.fork_rng(devices=[]):
        if on_error == "skip":
            x, skipped = extract(base, images, on_error="skip", **kwargs)
        else:
            x = extract_shared(base, images, **kwargs)
    if skipped:
        if x.shape[0] < 2:
            raise ValueError(f"only {x.shape[0]} of the {len(images)} images could be read; a whitening needs "
                             "at least 2")
        bad = np.zeros(len(images), dtype=bool)
        bad[[f.index for f in skipped]] = True
        if kind == "lw":
            kept = ~(bad[qidxs] | bad[pidxs])
            if not kept.any():
                raise ValueError(f"every matching pair holds one of the {len(skipped)} unreadable images: no pair "
                                 "is left to learn from")
            row = np.cumsum(~bad) - 1  # image index -> row of x
            qidxs, pidxs = row[qidxs[kept]], row[pidxs[kept]]
    logger.info("learning %s whitening from %d descriptors", kind, x.shape[0])
    w = learn_whitening(x, qidxs, pidxs) if kind == "lw" else pca_whitening(x)
    return (w, skipped) if on_error == "skip" else w
