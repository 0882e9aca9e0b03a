"""The HTTP service (FastAPI on uvicorn).

Endpoints:

- ``POST /recognize?k=5&vote=majority&min_score=0.5`` and ``POST /search?k=10``: photos as
  multipart field ``image`` (repeat it for several) or one photo as the raw request body;
  the answer is the JSON of ``pylandmark recognize --json`` / ``search --json``, with each
  query named by its upload's file name.
- ``GET /health``: ``{"status": "ok"}`` once the worker is ready.
- ``GET /info``: the index's facts, the network, the limits, this worker's batching counts.
- ``GET /images/{id}?size=256``: a JPEG thumbnail of the indexed photo with that id (only
  files the index names; never a path from the request).
- ``GET /``: the web page (drop or pick a photo, see the landmark and its neighbours).

Errors are JSON ``{"error": "...", "status": n}``: 400 bad parameters, not an image or a
truncated one; 404 unknown id or path; 413 upload or image too large; 503 too many waiting.
Decoding, the network and the search run off the event loop (thread pool and batcher thread).
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import re
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..data.decode import ImageTooLarge
from ..data.images import ImageLoadError
from ..retrieval.recognition import VOTES
from .batching import Overloaded
from .config import ServeConfig
from .engine import Engine
from .hosts import HostCheck, allowed_hosts

__all__ = ["create_app", "create_app_from_env"]

log = logging.getLogger("pylandmark.serve")

STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8"}
# the page loads only its own script and style, and images from here or picked by the user
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class ApiError(Exception):
    """An error the client can fix; becomes ``{"error": message}`` with this status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class UploadTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than the {limit:,} bytes this service accepts "
                              "(start it with a larger --max-upload-mb, or send a smaller photo)")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


class BodyLimit:
    """ASGI middleware: refuses request bodies over ``limit`` bytes, by Content-Length before
    reading, and by counting while reading (chunked uploads)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                if not value.isdigit():
                    return await _error(400, "Content-Length must be a number of bytes")(scope, receive, send)
                if int(value) > self.limit:
                    return await _error(413, UploadTooLarge(self.limit).message)(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise UploadTooLarge(self.limit)
            return message

        return await self.app(scope, limited_receive, send)


# ---- request parameters ---------------------------------------------------------------------

def _int_in(lo: int, hi: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            v = int(raw)
        except ValueError:
            raise ApiError(400, f"{name} must be an integer, got {raw!r}") from None
        if not lo <= v <= hi:
            raise ApiError(400, f"{name} must be in [{lo}, {hi}], got {v}")
        return v
    return parse


def _vote(name: str, raw: str) -> str:
    if raw not in VOTES:
        raise ApiError(400, f"{name} must be one of {', '.join(VOTES)}, got {raw!r}")
    return raw


def _score(name: str, raw: str) -> float:
    try:
        v = float(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be a number (a cosine similarity), got {raw!r}") from None
    if not math.isfinite(v):
        raise ApiError(400, f"{name} must be finite, got {raw!r}")
    return v


def _params(request: Request, spec: dict[str, Callable[[str, str], Any]], defaults: dict[str, Any]) -> dict:
    """Query parameters by ``spec`` (name -> parser); unknown or repeated names are errors."""
    out = dict(defaults)
    seen = set()
    for name, raw in request.query_params.multi_items():
        key = name.replace("-", "_")
        if key not in spec:
            raise ApiError(400, f"unknown query parameter {name!r}; this endpoint takes {', '.join(spec)}")
        if key in seen:
            raise ApiError(400, f"query parameter {name!r} given twice")
        seen.add(key)
        out[key] = spec[key](name, raw)
    return out


_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def _upload_name(filename: str | None, i: int) -> str:
    name = os.path.basename((filename or "").replace("\\", "/"))
    name = _UNSAFE.sub("", name)[:200]
    return name or f"image{i}"


async def _read_images(request: Request, config: ServeConfig) -> list[tuple[str, bytes]]:
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        form = await request.form(max_files=config.max_images, max_fields=config.max_images + 8)
        try:
            extra = sorted(set(form.keys()) - {"image"})
            if extra:
                raise ApiError(400, f"unexpected form field {extra[0]!r}: send photos as field 'image' "
                                    "and k, vote, min_score in the query string")
            images = []
            for i, item in enumerate(form.getlist("image")):
                if isinstance(item, str):
                    raise ApiError(400, "form field 'image' must be a file upload, not text")
                images.append((_upload_name(item.filename, i), await item.read()))
        finally:
            await form.close()
    else:  # any other type is the photo itself (curl --data-binary says x-www-form-urlencoded)
        body = await request.body()
        images = [(_upload_name(request.headers.get("x-filename"), 0), body)] if body else []
    if not images:
        raise ApiError(400, "no image: send the photo as multipart field 'image' (repeat it for several) "
                            "or as the raw request body")
    if len(images) > config.max_images:
        raise ApiError(400, f"{len(images)} images in one request; at most {config.max_images}")
    return images


async def _describe(engine: Engine, images: list[tuple[str, bytes]]) -> np.ndarray:
    tensors = await asyncio.gather(*(run_in_threadpool(engine.prepare, data, name) for name, data in images))
    futures = [engine.batcher.submit(t) for t in tensors]
    rows = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
    return np.stack(rows)


# ---- the app --------------------------------------------------------------------------------

def create_app(config: ServeConfig, engine: Engine | None = None) -> FastAPI:
    """The ASGI app. Without ``engine``, the worker builds its own when it starts (network loaded
    once per worker, index memory-mapped and shared through the page cache)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        own = engine is None
        app.state.engine = engine if engine is not None else await run_in_threadpool(
            Engine, config, verify=False)
        if own:
            log.info("%s", app.state.engine.summary)
        try:
            yield
        finally:
            if own:
                app.state.engine.close()

    app = FastAPI(title="pylandmark", summary="Landmark recognition by image search", lifespan=lifespan,
                  redoc_url=None)
    app.add_middleware(BodyLimit, limit=config.max_upload_bytes)
    app.add_middleware(HostCheck, allowed=allowed_hosts(config.host, config.allowed_hosts), error=_error)
    static = {name: resources.files(__package__).joinpath("static").joinpath(name).read_bytes() for name in STATIC}

    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        return _error(err.status, err.message)

    @app.exception_handler(ImageTooLarge)
    async def _too_large(request, err):
        return _error(413, str(err))

    @app.exception_handler(ImageLoadError)
    async def _bad_image(request, err):
        return _error(400, str(err))

    @app.exception_handler(Overloaded)
    async def _overloaded(request, err):
        return JSONResponse({"error": str(err), "status": 503}, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, err: StarletteHTTPException):
        message = err.detail if isinstance(err.detail, str) else str(err.detail)
        if err.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}; see GET /docs"
        return _error(err.status_code, message)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or "request"
        return _error(400, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(ClientDisconnect)
    async def _gone(request, err):  # the client left mid-upload: nobody reads the answer
        log.debug("client disconnected during %s %s", request.method, request.url.path)
        return _error(400, "the client disconnected before the upload was complete")

    @app.exception_handler(Exception)
    async def _internal(request, err: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(err).__name__}); the service log has the details")

    @app.get("/", include_in_schema=False)
    async def home():
        return Response(static["index.html"], media_type=STATIC["index.html"],
                        headers={"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff"})

    @app.get("/static/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in STATIC or name == "index.html":
            raise ApiError(404, f"no such file: /static/{name}")
        return Response(static[name], media_type=STATIC[name], headers={"X-Content-Type-Options": "nosniff",
                                                                        "Cache-Control": "no-cache"})

    @app.get("/health", summary="readiness")
    async def health():
        return {"status": "ok"}

    @app.get("/info", summary="the index, the network and the limits")
    async def info(request: Request):
        _params(request, {}, {})
        return request.app.state.engine.info()

    @app.get("/images/{image_id}", summary="thumbnail of an indexed photo")
    async def image(image_id: int, request: Request):
        eng: Engine = request.app.state.engine
        p = _params(request, {"size": _int_in(32, 1024)}, {"size": config.thumb_size})
        if not eng.has_image(image_id):
            raise ApiError(404, f"no indexed photo with id {image_id}"
                                + ("" if eng.has_paths else " (this index stores no paths)"))
        jpeg = await run_in_threadpool(eng.thumbnail, image_id, p["size"])
        if jpeg is None:
            raise ApiError(404, f"the photo with id {image_id} cannot be read on the server")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})

    @app.post("/recognize", summary="name the landmark in each photo (top-k vote)")
    async def recognize(request: Request):
        eng: Engine = request.app.state.engine
        if eng.view.labels is None:
            raise ApiError(400, "this index has no labels, so it cannot recognise; use POST /search")
        p = _params(request, {"k": _int_in(1, config.max_k), "vote": _vote, "min_score": _score},
                    {"k": 5, "vote": "majority", "min_score": None})
        images = await _read_images(request, config)
        desc = await _describe(eng, images)
        return await run_in_threadpool(eng.recognize, desc, [n for n, _ in images], p["k"], p["vote"],
                                       p["min_score"])

    @app.post("/search", summary="the k most similar indexed photos of each photo")
    async def search(request: Request):
        eng: Engine = request.app.state.engine
        p = _params(request, {"k": _int_in(1, config.max_k)}, {"k": 5})
        images = await _read_images(request, config)
        desc = await _describe(eng, images)
        return await run_in_threadpool(eng.search, desc, [n for n, _ in images], p["k"])

    return app


def create_app_from_env() -> FastAPI:
    """The app of one uvicorn worker process (``--workers`` > 1): settings from the environment."""
    config = ServeConfig.from_env()
    logging.basicConfig(level=logging.WARNING if config.quiet else logging.INFO, format="%(message)s")
    return create_app(config)
