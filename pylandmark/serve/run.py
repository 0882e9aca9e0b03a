"""``pylandmark serve``: checks, start-up progress, then uvicorn."""
from __future__ import annotations

import importlib.util
import logging
import os
import socket
import warnings
from typing import Any

from tqdm.auto import tqdm

from .config import ENV_VAR, ServeConfig, is_loopback

__all__ = ["serve", "require_extras"]

log = logging.getLogger("pylandmark.serve")

EXTRA_HINT = 'pip install "pylandmark[serve]"'


class ExposedService(UserWarning):
    """The service listens on an address other machines can reach (it has no authentication)."""


def require_extras() -> None:
    """Raises ImportError naming the extra when FastAPI, uvicorn or python-multipart is missing."""
    needed = {"fastapi": ("fastapi",), "uvicorn": ("uvicorn",), "python-multipart": ("python_multipart", "multipart")}
    missing = [name for name, modules in needed.items()
               if not any(importlib.util.find_spec(m) is not None for m in modules)]
    if missing:
        raise ImportError(f"the web service needs {', '.join(missing)}: {EXTRA_HINT}")


def _check_port(host: str, port: int) -> None:
    """Fails now, in one line, if the address cannot be bound (uvicorn would exit with a traceback-y log)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise OSError(f"--host {host!r} is not an address this machine can listen on ({err.strerror})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as err:
            raise OSError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port") from None


def announce(config: ServeConfig) -> str:
    url = f"http://{'[' + config.host + ']' if ':' in config.host else config.host}:{config.port}/"
    if is_loopback(config.host):
        where = (f"listening on {config.host} only: other machines cannot connect "
                 "(pass --host 0.0.0.0 to serve them)")
        log.info("pylandmark serve: %s (web page; API: POST /recognize, POST /search, GET /info, /health, /docs); %s",
                 url, where)
    else:  # a warning, not progress: --quiet keeps it
        warnings.warn(f"pylandmark serve: {url} is reachable from other machines on this network, without "
                      "authentication; bind --host 127.0.0.1 unless that is intended", ExposedService, stacklevel=2)
    return url


def serve(config: ServeConfig) -> int:
    """Runs the service until interrupted. One worker: the network and index load here, with a
    progress bar; several: the index is verified once here, then each worker loads its own
    network and maps the same index file."""
    require_extras()
    import uvicorn

    from .app import create_app

    _check_port(config.host, config.port)
    quiet = config.quiet
    target: Any  # the app itself (one worker) or its factory's import path (workers import it)
    if config.workers == 1:
        from .engine import Engine

        with tqdm(total=3, desc="serve start-up", unit="step", disable=quiet, leave=False) as bar:
            def step(what: str) -> None:
                bar.set_postfix_str(what)
                bar.update()
            engine = Engine(config, on_step=step)
        log.info("%s", engine.summary)
        target, factory = create_app(config, engine), False
    else:
        from ..models.pretrained import load_network
        from ..pipelines import network_weights
        from ..retrieval.index import Index

        with tqdm(total=2, desc="serve start-up", unit="step", disable=quiet, leave=False) as bar:
            index = Index.load(config.index, verify=True)
            bar.update()
            weights = network_weights(config.weights, index)  # an index's URL is never fetched
            del index
            # a bad --weights fails here in one line, not in every worker over and over
            load_network(weights, device="cpu", progress=not quiet)  # dropped at once; workers load their own
            bar.update()
        os.environ[ENV_VAR] = config.to_env()
        target, factory = "pylandmark.serve.app:create_app_from_env", True
    announce(config)
    uvicorn.run(target, host=config.host, port=config.port, workers=config.workers if factory else None,
                factory=factory, log_level="warning" if quiet else "info", access_log=not quiet,
                timeout_graceful_shutdown=5)
    return 0
