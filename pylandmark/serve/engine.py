"""What one service worker holds: the network (loaded once), the memory-mapped index, the
batcher in front of the network, and the thumbnail cache. No HTTP here: the app calls these
methods from its thread pool, tests and benchmarks call them directly."""
from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .._version import __version__
from ..retrieval.index import IndexLike
from .batching import Batcher
from .config import ServeConfig

__all__ = ["Engine"]

log = logging.getLogger(__name__)

_THUMB_CACHE = 4096  # thumbnails kept in memory per worker (about 15 KB each at 256 px)
_INFO_LABELS = 1000  # label counts listed by GET /info


class Engine:
    """The network and the index of one worker.

    Args:
        config: the service settings.
        verify: check the index's matrix checksum on open (one read of the file; the parent
            process does it once before starting several workers).
        on_step: called with a short description after each start-up step (progress display).
    """

    def __init__(self, config: ServeConfig, *, verify: bool = True, on_step=None):
        import torch

        from ..extraction import DEFAULT_SCALES_MS, check_pooling, multiscale_p_of, prepare_inference_model
        from ..models.pretrained import RANDOM, load_network
        from ..models.whitening import select_whitening
        from ..ops import set_num_threads
        from ..pipelines import index_options, network_weights
        from ..retrieval.index import Index

        step = on_step or (lambda what: None)
        self.config = config
        threads = config.torch_threads()
        torch.set_num_threads(threads)
        set_num_threads(threads)
        t0 = time.perf_counter()
        self.index = Index.load(config.index, verify=verify)
        self.index_path = Path(config.index)
        step("index opened")
        weights = network_weights(config.weights, self.index)  # an index's URL is never fetched
        self.weights = weights
        dev = torch.device(config.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {config.device} but torch sees no CUDA device; pass --device cpu")
        if weights == RANDOM:
            torch.manual_seed(0)  # every worker gets the same random network
        network = load_network(weights, device=str(dev), progress=False)
        self.opts = index_options(self.index, image_size=config.image_size, device=str(dev),
                                  scales=DEFAULT_SCALES_MS if config.multiscale else None)
        cfg = getattr(network, "config", None)
        from ..data.images import IMAGENET_MEAN, IMAGENET_STD

        self.mean = tuple(getattr(cfg, "mean", IMAGENET_MEAN))
        self.std = tuple(getattr(cfg, "std", IMAGENET_STD))
        self.pooling = check_pooling(network, self.opts.pooling, "the index's pooling")
        self.multiscale_p = multiscale_p_of(network, self.pooling)
        self.dim = int(getattr(network, "dim", self.index.dim))
        if self.dim != self.index.dim:
            raise ValueError(f"the network makes {self.dim}-d descriptors but the index holds {self.index.dim}-d "
                             "ones; pass the --weights the index was built with")
        self.device = dev
        self.use_amp = dev.type == "cuda"
        self.whitening = select_whitening(network, self.opts.whitening, multiscale=len(self.opts.scales) > 1)
        self.net = prepare_inference_model(network, dev)
        del network
        step("network loaded")
        self._forward([torch.zeros(3, self.opts.image_size, self.opts.image_size * 3 // 4)])  # first-call set-up
        step("network warmed up")
        self.batcher = Batcher(self._forward, max_batch=config.max_batch, max_wait=config.batch_wait,
                               key=lambda x: tuple(x.shape), name="pylandmark-network")
        self.view: IndexLike = _ServedIndex(self.index, config.superglobal)
        self._row_of = {int(i): r for r, i in enumerate(self.view.ids)}
        self._paths = self.view.paths
        self._thumbs: OrderedDict[tuple[int, int], bytes | None] = OrderedDict()
        self._thumb_lock = threading.Lock()
        labels = self.view.labels
        self._label_counts = Counter(map(str, labels)) if labels is not None else Counter()
        self._facts = self.index.info()  # O(N) over the labels: once, the index does not change
        self.started = time.time()
        self.summary = (f"worker {os.getpid()} ready in {time.perf_counter() - t0:.1f} s: {len(self.index)} images "
                        f"({self.index_path.name}), network {_name(weights)} on {dev}, image size "
                        f"{self.opts.image_size}, scales {list(self.opts.scales)}"
                        + ("" if self.pooling is None else f", pooling {self.pooling}")
                        + ("" if config.superglobal is None else f", re-ranking the top {config.rerank_m}"))

    # ---- the network ------------------------------------------------------------------------

    def prepare(self, data: bytes, name: str = "image"):
        """Image bytes -> (3, H, W) float32 tensor, exactly as ``extract`` prepares a file.

        Raises ImageTooLarge / ImageLoadError naming ``name``."""
        from ..data.decode import decode_image
        from ..data.images import prepare_image

        im = decode_image(data, max_pixels=self.config.max_pixels, name=name)
        return prepare_image(im, self.opts.image_size, None, self.mean, self.std)

    def _forward(self, images: list) -> list[np.ndarray]:
        """(3, H, W) tensors of one shape -> their (D,) float16 descriptors: one batch of
        :func:`pylandmark.extract` (:func:`~pylandmark.extraction.describe_batch`)."""
        import torch

        from ..extraction import describe_batch

        x = torch.stack(images).to(self.device, non_blocking=True)
        v = describe_batch(self.net, x, self.opts.scales, multiscale_p=self.multiscale_p, whitening=self.whitening,
                           amp=self.use_amp, pooling=self.pooling)
        return list(v.to(torch.float16).cpu().numpy())

    def describe(self, images: Sequence) -> np.ndarray:
        """Prepared image tensors -> (Q, D) float16, through the batcher (blocks; for threads)."""
        futures = [self.batcher.submit(x) for x in images]
        return np.stack([f.result() for f in futures])

    # ---- answers ----------------------------------------------------------------------------

    def recognize(self, desc: np.ndarray, names: Sequence[str], k: int = 5, vote: str = "majority",
                  min_score: float | None = None) -> list[dict]:
        """The JSON of ``pylandmark recognize --json`` for (Q, D) descriptors."""
        from ..pipelines import recognition_results

        return recognition_results(self.view, desc, names, k=k, vote=vote, min_score=min_score)

    def search(self, desc: np.ndarray, names: Sequence[str], k: int = 5) -> list[dict]:
        """The JSON of ``pylandmark search --json`` for (Q, D) descriptors."""
        from ..pipelines import search_results

        return search_results(self.view, desc, names, k=k)

    # ---- thumbnails and facts ---------------------------------------------------------------

    @property
    def has_paths(self) -> bool:
        return self._paths is not None

    def has_image(self, image_id: int) -> bool:
        return self._paths is not None and image_id in self._row_of

    def thumbnail(self, image_id: int, size: int) -> bytes | None:
        """JPEG thumbnail of the indexed photo with this id (None: unknown id, or unreadable).

        Only files the index names are read; relative names are looked up from the working
        folder, then from the index file's folder."""
        from ..report.thumbs import resolve_image, thumbnail_jpeg

        if not self.has_image(image_id):
            return None
        key = (image_id, size)
        with self._thumb_lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        path = resolve_image(self._paths[self._row_of[image_id]], [self.index_path.parent])
        jpeg = None if path is None else thumbnail_jpeg(path, size, max_pixels=self.config.max_pixels)
        with self._thumb_lock:
            self._thumbs[key] = jpeg
            while len(self._thumbs) > _THUMB_CACHE:
                self._thumbs.popitem(last=False)
        return jpeg

    def info(self) -> dict:
        """The facts GET /info returns."""
        c = self.config
        labels = sorted(self._label_counts.items())
        facts = dict(self._facts)
        facts["metadata"] = {k: (_name(v) if k == "weights" and isinstance(v, str) else v)
                             for k, v in facts["metadata"].items()}
        return {"index": {**facts, "file": self.index_path.name,
                          "labels": dict(labels[:_INFO_LABELS]), "labels_truncated": len(labels) > _INFO_LABELS,
                          "has_paths": self.has_paths},
                "network": {"weights": _name(self.weights),
                            "device": str(self.device), "dim": self.dim, "image_size": self.opts.image_size,
                            "scales": list(self.opts.scales), "pooling": str(self.pooling or "gem"),
                            "rerank": c.superglobal},
                "limits": {"max_upload_bytes": c.max_upload_bytes, "max_pixels": c.max_pixels,
                           "max_images": c.max_images, "max_k": c.max_k},
                "worker": {"pid": os.getpid(), "workers": c.workers, "threads": c.torch_threads(),
                           "uptime_s": round(time.time() - self.started, 1), "batching": self.batcher.stats()},
                "version": __version__}

    def close(self) -> None:
        self.batcher.close()


class _ServedIndex:
    """The index as the service answers from it (an :class:`~pylandmark.retrieval.index.IndexLike`):
    string labels held once as a numpy str array, for vectorised comparisons in recognize.
    Read-only; searches go to the index (with ``superglobal``, its re-ranking view)."""

    def __init__(self, index, superglobal: dict | None = None):
        from ..pipelines import reranked

        if callable(getattr(index, "prepared", None)) and len(index):
            index.prepared()  # the compact codes now (an older file lacks them), not in the first request
        self._index = reranked(index, superglobal)  # searches re-rank their top M with superglobal
        labels = index.labels
        if labels is not None and len(labels) and all(isinstance(v, str) for v in labels):
            labels = np.asarray(labels.tolist(), dtype=str)  # vectorised comparisons in recognize
        self.labels = labels
        self.ids = index.ids
        self.paths = index.paths
        self.metric = index.metric

    @property
    def descriptors(self):
        return self._index.descriptors

    def __len__(self) -> int:
        return len(self._index)

    def search_rows(self, queries, k: int = 5):
        return self._index.search_rows(queries, k)

    def search(self, queries, k: int = 5):
        return self._index.search(queries, k)


def _name(weights: str) -> str:
    """The last part of a weights path or URL (the service does not show where its files live)."""
    return Path(weights.split("?")[0].rstrip("/")).name or weights
