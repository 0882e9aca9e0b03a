"""Images are decoded only as the raster formats pylandmark lists (issue 26): a file whose bytes are
another format, such as PostScript named .jpg (which PIL would hand to Ghostscript), is refused
with a one-line ImageLoadError naming it, by the one opener that every reader goes through:
extraction (index build), report thumbnails and the service's uploads (400, never 500)."""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import EpsImagePlugin, Image

import pylandmark as plm
from pylandmark.data import ImageLoadError, LoadFailure, open_image
from pylandmark.data.decode import decode_image
from pylandmark.data.folders import IMAGE_EXTENSIONS
from pylandmark.data.images import RASTER_FORMATS, open_raster
from pylandmark.models import LandmarkNet
from pylandmark.report.thumbs import thumbnail_jpeg

# a valid EPS file: PIL identifies it as EPS and would run Ghostscript to draw it
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
       b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n")
ALLOWED = "(JPEG, PNG, WEBP, BMP, TIFF, GIF, PPM)"
TINY = {"depths": [1, 1, 1, 1, 1], "out_chs": [8, 16, 24, 32, 48]}


@pytest.fixture(autouse=True)
def no_ghostscript(monkeypatch):
    """Any attempt to find or run Ghostscript fails the test, whether or not it is installed."""
    def refuse(*args, **kwargs):
        raise AssertionError("Ghostscript was asked for: a PostScript file got to PIL's EPS decoder")

    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", refuse)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", refuse)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", "/nonexistent/gs")  # never found, never run


@pytest.fixture
def eps_jpg(tmp_path) -> Path:
    p = tmp_path / "photo.jpg"
    p.write_bytes(EPS)
    with Image.open(p) as im:  # unrestricted PIL takes it for what the bytes claim
        assert im.format == "EPS"
    return p


def photo(path: Path, fmt: str = "PNG", size=(40, 30), mode: str = "RGB") -> Path:
    rng = np.random.default_rng(len(str(path)))
    a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a, "RGB").convert(mode).save(path, fmt)
    return path


# ---- the one opener -------------------------------------------------------------------------

def test_the_list_is_the_raster_formats_and_every_extension_maps_into_it():
    assert RASTER_FORMATS == ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM")
    Image.init()
    assert set(RASTER_FORMATS) <= set(Image.OPEN), "a listed format is not a PIL plugin name"
    by_ext = Image.registered_extensions()
    assert {by_ext[e] for e in IMAGE_EXTENSIONS} <= set(RASTER_FORMATS)


def test_the_opener_refuses_eps_with_one_line_naming_the_file(eps_jpg):
    with pytest.raises(ImageLoadError) as err:
        open_raster(eps_jpg, str(eps_jpg))
    msg = str(err.value)
    assert str(eps_jpg) in msg and ALLOWED in msg and "\n" not in msg, msg
    with pytest.raises(ImageLoadError, match=r"photo\.jpg is not an image in a supported format"):
        open_image(eps_jpg)
    with pytest.raises(ImageLoadError, match=r"upload\.jpg is not an image in a supported format"):
        decode_image(EPS, name="upload.jpg")
    with pytest.raises(ImageLoadError, match=r"photo\.jpg is not an image in a supported format"):
        decode_image(eps_jpg, name=str(eps_jpg))


@pytest.mark.parametrize("fmt", ["ICO", "TGA", "PCX", "SGI", "IM"])
def test_other_formats_pil_reads_are_refused(tmp_path, fmt):
    p = photo(tmp_path / "photo.png", fmt)
    with Image.open(p) as im:
        assert im.format == fmt
    with pytest.raises(ImageLoadError, match="not an image in a supported format"):
        open_image(p)
    with pytest.raises(ImageLoadError, match="not an image in a supported format"):
        decode_image(p.read_bytes(), name="x")


@pytest.mark.parametrize("fmt,ext,mode", [("JPEG", ".jpg", "RGB"), ("PNG", ".png", "RGB"), ("WEBP", ".webp", "RGB"),
                                          ("BMP", ".bmp", "RGB"), ("TIFF", ".tif", "RGB"), ("GIF", ".gif", "P"),
                                          ("PPM", ".ppm", "RGB"), ("PPM", ".pgm", "L"), ("PPM", ".pbm", "1")])
def test_the_listed_formats_still_decode(tmp_path, fmt, ext, mode):
    p = photo(tmp_path / f"photo{ext}", fmt, mode=mode)
    a = open_image(p)
    b = decode_image(p.read_bytes(), name=p.name)
    assert a.mode == b.mode == "RGB" and a.size == b.size == (40, 30)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- every reader goes through it -----------------------------------------------------------

def test_extract_raises_on_eps_and_skips_it_on_request(tmp_path, eps_jpg):
    torch.manual_seed(0)
    net = LandmarkNet(backbone_args=TINY)
    good = [photo(tmp_path / "a.png"), photo(tmp_path / "b.jpg", "JPEG")]
    paths = [good[0], eps_jpg, good[1]]
    with pytest.raises(ImageLoadError, match=r"photo\.jpg is not an image in a supported format"):
        plm.extract(net, paths, image_size=64, progress=False)
    with pytest.warns(RuntimeWarning, match=r"skipped 1 of 3 .*photo\.jpg"):
        d, skipped = plm.extract(net, paths, image_size=64, on_error="skip", progress=False)
    assert [s.index for s in skipped] == [1] and isinstance(skipped[0], LoadFailure)
    assert "not an image in a supported format" in skipped[0].message
    np.testing.assert_array_equal(d, plm.extract(net, good, image_size=64, progress=False))


def test_report_thumbnails_refuse_eps(tmp_path, eps_jpg, caplog):
    with caplog.at_level(logging.WARNING, logger="pylandmark.report.thumbs"):
        assert thumbnail_jpeg(eps_jpg) is None
        assert thumbnail_jpeg(EPS) is None
    assert "not an image in a supported format" in caplog.text
    assert thumbnail_jpeg(photo(tmp_path / "ok.png")) is not None


@pytest.fixture
def service(tmp_path):
    """The service app in this process (so the Ghostscript guard holds), on a tiny index."""
    pytest.importorskip("fastapi")
    pytest.importorskip("multipart")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient
    from serve_util import build_index, tiny_weights

    from pylandmark.serve.app import create_app
    from pylandmark.serve.config import ServeConfig
    from pylandmark.serve.engine import Engine

    for label in ("a", "b"):
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(2):
            photo(tmp_path / "train" / label / f"{i}.png", size=(48 + i, 36))
    index = build_index(tmp_path, tiny_weights(tmp_path), tmp_path / "tiny.plmi", size=64)
    threads_before = torch.get_num_threads()
    config = ServeConfig(index=str(index), threads=1)
    eng = Engine(config)
    try:
        with TestClient(create_app(config, eng), base_url="http://127.0.0.1") as client:
            yield client
    finally:
        eng.close()
        plm.set_num_threads(0)
        torch.set_num_threads(threads_before)


def test_the_service_answers_400_to_an_eps_upload(service, tmp_path):
    for kwargs in ({"files": [("image", ("photo.jpg", EPS, "image/jpeg"))]},
                   {"content": EPS, "headers": {"content-type": "image/jpeg"}}):
        r = service.post("/recognize", **kwargs)
        assert r.status_code == 400, r.text
        body = r.json()
        assert body["status"] == 400 and "is not an image in a supported format" in body["error"], body
        assert ALLOWED in body["error"] and "\n" not in body["error"]
    buf = io.BytesIO()
    Image.open(photo(tmp_path / "q.png")).save(buf, "PNG")
    r = service.post("/search", files=[("image", ("q.png", buf.getvalue(), "image/png"))])
    assert r.status_code == 200, r.text
