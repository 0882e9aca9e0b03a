"""Settings of the web service (one dataclass; the CLI fills it, workers read it from the
environment as JSON)."""
from __future__ import annotations

import ipaddress
import json
import math
import os
from dataclasses import dataclass

from .._checks import check_image_size, check_number
from ..config import JsonConfig
from ..data.decode import DEFAULT_MAX_PIXELS

__all__ = ["ServeConfig", "ENV_VAR", "is_loopback"]

ENV_VAR = "PYLANDMARK_SERVE_CONFIG"


@dataclass
class ServeConfig(JsonConfig):
    """What ``pylandmark serve`` runs.

    Attributes:
        index: the index file (memory-mapped, shared by the worker processes).
        weights: the network (see ``--weights``); None: the one the index was built with.
        device: "cpu" or "cuda[:n]" for the network.
        image_size, multiscale: extraction settings; None / False keep the index's.
        host, port: where to listen; 127.0.0.1 (this machine only) unless told otherwise.
        workers: server processes, each with its own network.
        threads: torch CPU threads per worker (None: the cores divided by the workers).
        max_batch, batch_wait_ms: dynamic batching of concurrent requests for the network
            (batch_wait_ms None: 2 ms on a GPU, 0 on the CPU, see serve.batching).
        max_upload_mb: largest request body accepted (413 beyond).
        max_pixels: largest image accepted, in pixels (decompression bombs get 413).
        max_images: most photos in one request.
        max_k: largest k a request may ask for.
        thumb_size: default thumbnail size of GET /images/{id}.
        quiet: no progress bars, warnings and errors only in the log.
        allowed_hosts: Host header names answered besides the bound address and this machine's
            loopback names (``*``: any; see :mod:`pylandmark.serve.hosts`).
        rerank: "none", or "superglobal": every answer's top ``rerank_m`` re-ranked
            (:func:`pylandmark.retrieval.rerank.superglobal` with ``rerank_neighbours`` and
            ``rerank_beta``).
    """

    index: str = ""
    weights: str | None = None
    device: str = "cpu"
    image_size: int | None = None
    multiscale: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    threads: int | None = None
    max_batch: int = 16
    batch_wait_ms: float | None = None
    max_upload_mb: float = 20.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_images: int = 16
    max_k: int = 100
    thumb_size: int = 256
    quiet: bool = False
    allowed_hosts: tuple[str, ...] = ()
    rerank: str = "none"
    rerank_m: int = 400
    rerank_neighbours: int = 9
    rerank_beta: float = 0.15

    def __post_init__(self) -> None:
        if not self.index:
            raise ValueError("index is required: the .plmi file to serve")
        for name, lo, hi in (("port", 1, 65535), ("workers", 1, 64), ("max_batch", 1, 1024),
                             ("max_images", 1, 1024), ("max_k", 1, 100_000), ("thumb_size", 32, 1024),
                             ("max_pixels", 1, 1 << 31), ("rerank_m", 1, 100_000), ("rerank_neighbours", 0, 100_000)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {v!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be an int >= 1, got {self.threads!r}")
        check_image_size(self.image_size, "image_size", none_ok=True)
        if not (isinstance(self.max_upload_mb, (int, float)) and math.isfinite(self.max_upload_mb)
                and self.max_upload_mb > 0):
            raise ValueError(f"max_upload_mb must be a number > 0, got {self.max_upload_mb!r}")
        if self.batch_wait_ms is not None and not 0 <= self.batch_wait_ms <= 1000:
            raise ValueError(f"batch_wait_ms must be in [0, 1000], got {self.batch_wait_ms!r}")
        if self.rerank not in ("none", "superglobal"):
            raise ValueError(f"rerank must be 'none' or 'superglobal', got {self.rerank!r}")
        check_number(self.rerank_beta, "rerank_beta", minimum=0)

    @property
    def superglobal(self) -> dict | None:
        """The re-ranking's settings (:func:`pylandmark.pipelines.reranked`), or None."""
        if self.rerank != "superglobal":
            return None
        return {"m": self.rerank_m, "neighbours": self.rerank_neighbours, "beta": float(self.rerank_beta)}

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * (1 << 20))

    @property
    def batch_wait(self) -> float:
        """Seconds the batcher waits for batch mates."""
        if self.batch_wait_ms is not None:
            return self.batch_wait_ms / 1000.0
        return 0.002 if self.device.startswith("cuda") else 0.0

    def torch_threads(self) -> int:
        if self.threads is not None:
            return self.threads
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        return max(1, cores // self.workers)

    def to_env(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_env(cls) -> ServeConfig:
        raw = os.environ.get(ENV_VAR)
        if not raw:
            raise RuntimeError(f"{ENV_VAR} is not set; start the service with `pylandmark serve INDEX`")
        return cls.from_dict(json.loads(raw))


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
