"""The HTTP service: ``pylandmark serve INDEX`` (needs ``pip install "pylandmark[serve]"``).

- :mod:`.config`: :class:`ServeConfig`, the settings.
- :mod:`.batching`: :class:`Batcher`, dynamic batching of concurrent requests for the network.
- :mod:`.engine`: :class:`Engine`, one worker's network, index and thumbnail cache.
- :mod:`.app`: the FastAPI app and its endpoints; ``static/`` holds the web page.
- :mod:`.run`: :func:`serve`, start-up and uvicorn.
"""
from __future__ import annotations

from .batching import Batcher, Overloaded
from .config import ServeConfig
from .run import require_extras, serve

__all__ = ["Batcher", "Overloaded", "ServeConfig", "require_extras", "serve", "create_app"]


def create_app(*args, **kwargs):
    """The ASGI app (see :func:`pylandmark.serve.app.create_app`); imports FastAPI."""
    require_extras()
    from .app import create_app as _create

    return _create(*args, **kwargs)
