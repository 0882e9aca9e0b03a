"""Image loading: sizes against PIL's thumbnail rule, LANCZOS pixels, EXIF orientation, every PIL
mode to RGB (values computed independently with numpy), the bounding-box protocol, ImageNet
normalisation, and errors for corrupt, truncated and missing files."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pylandmark.data import (
    ImageList,
    ImageLoadError,
    LoadFailure,
    crop_box,
    list_images,
    load_image,
    open_image,
    resize_image,
    resized_size,
    to_rgb,
    to_tensor,
)

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def normalise(rgb_uint8: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float64 ImageNet-normalised."""
    return ((rgb_uint8.astype(np.float64) / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def smooth_image(rng, w, h) -> np.ndarray:
    """A smooth-ish RGB test image (gradients plus noise), uint8 (h, w, 3)."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255.0 / max(w - 1, 1), y * 255.0 / max(h - 1, 1), (x + y) % 256], axis=2)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- resizing

def test_resized_size_follows_pil_thumbnail(rng):
    for _ in range(300):
        w, h = (int(v) for v in rng.integers(1, 2500, size=2))
        if rng.random() < 0.2:
            w, h = int(rng.integers(2000, 6000)), int(rng.integers(1, 8))  # extreme aspect ratios
        target = float(rng.choice([1024, 362, 777, 409.6, 1023.9, 3.0]))
        im = Image.new("1", (w, h))
        im.thumbnail((target, target), Image.Resampling.NEAREST, reducing_gap=None)
        assert resized_size((w, h), target) == im.size, (w, h, target)
    assert resized_size((640, 480), 1024) == (640, 480)  # never upscaled
    assert resized_size((640, 480), None) == (640, 480)


def test_resize_image_is_lanczos_without_reducing_gap(rng):
    a = smooth_image(rng, 1283, 611)
    im = Image.fromarray(a)
    ref = im.copy()
    ref.thumbnail((1024, 1024), Image.Resampling.LANCZOS, reducing_gap=None)
    out = resize_image(im, 1024)
    assert out.size == ref.size == (1024, 488)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    small = Image.fromarray(smooth_image(rng, 300, 201))
    assert resize_image(small, 1024) is small


def test_load_image_tensor_matches_numpy(tmp_path, rng):
    a = smooth_image(rng, 517, 1301)  # portrait, odd sizes
    p = tmp_path / "portrait.png"
    Image.fromarray(a).save(p)
    x = load_image(p, image_size=333)
    ref_im = Image.fromarray(a)
    ref_im.thumbnail((333, 333), Image.Resampling.LANCZOS, reducing_gap=None)
    assert x.dtype == torch.float32 and x.shape == (3, 333, ref_im.size[0]) == (3, 333, 132)
    np.testing.assert_allclose(x.numpy(), normalise(np.asarray(ref_im)), rtol=0, atol=1e-5)
    y = load_image(p, image_size=None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    ref = (a.astype(np.float64) / 255 - 0.5) / np.array([0.25, 0.5, 1.0])
    np.testing.assert_allclose(y.numpy(), ref.transpose(2, 0, 1), atol=1e-5)


def test_to_tensor_requires_rgb():
    with pytest.raises(ValueError, match="RGB"):
        to_tensor(Image.new("L", (4, 4)))


# ----------------------------------------------------------------------------- orientation

@pytest.mark.parametrize("orientation,expect", [
    (1, lambda a: a), (2, lambda a: a[:, ::-1]), (3, lambda a: np.rot90(a, 2)),
    (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1)),
])
def test_exif_orientation(tmp_path, rng, orientation, expect):
    a = rng.integers(0, 256, size=(5, 9, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / f"o{orientation}.png"
    Image.fromarray(a).save(p, exif=exif)
    got = np.asarray(open_image(p))
    np.testing.assert_array_equal(got, expect(a))


# ----------------------------------------------------------------------------- modes

def _roundtrip(tmp_path, im: Image.Image, ext: str) -> Image.Image:
    p = tmp_path / f"img_{im.mode.replace(';', '_')}.{ext}"
    im.save(p)
    with Image.open(p) as check:
        assert check.mode == im.mode or (im.mode == "I;16B" and check.mode.startswith("I;16"))
    return open_image(p)


def test_mode_L_and_1(tmp_path, rng):
    g = rng.integers(0, 256, size=(7, 11), dtype=np.uint8)
    out = np.asarray(_roundtrip(tmp_path, Image.fromarray(g, "L"), "png"))
    np.testing.assert_array_equal(out, np.repeat(g[..., None], 3, axis=2))
    bits = rng.random((6, 13)) > 0.5
    out = np.asarray(_roundtrip(tmp_path, Image.fromarray(bits), "png"))
    np.testing.assert_array_equal(out, np.repeat((bits * 255).astype(np.uint8)[..., None], 3, axis=2))


def test_mode_P_with_and_without_transparency(tmp_path, rng):
    palette = rng.integers(0, 256, size=(256, 3), dtype=np.uint8)
    idx = rng.integers(0, 256, size=(9, 10), dtype=np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette(palette.tobytes())
    out = np.asarray(_roundtrip(tmp_path, im, "png"))
    np.testing.assert_array_equal(out, palette[idx])
    im.info["transparency"] = int(idx[0, 0])
    p = tmp_path / "ptrans.png"
    im.save(p, transparency=int(idx[0, 0]))
    out = np.asarray(open_image(p))
    expect = palette[idx].copy()
    expect[idx == idx[0, 0]] = 255  # transparent -> white background
    np.testing.assert_array_equal(out, expect)


def _composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return rgb.astype(np.float64) * a + 255.0 * (1 - a)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_modes_with_alpha_are_composited_on_white(tmp_path, rng, mode):
    h, w = 8, 13
    alpha = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    if mode == "RGBA":
        rgb = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        im = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    else:
        g = rng.integers(0, 256, size=(h, w), dtype=np.uint8)
        rgb = np.repeat(g[..., None], 3, axis=2)
        im = Image.fromarray(np.dstack([g, alpha]), "LA")
    out = np.asarray(_roundtrip(tmp_path, im, "png")).astype(np.float64)
    np.testing.assert_allclose(out, _composite(rgb, alpha), atol=1.0)
    assert (out[0, 0] == 255).all() and (out[0, 1] == rgb[0, 1]).all()


def test_mode_PA(tmp_path, rng):
    palette = rng.integers(0, 256, size=(256, 3), dtype=np.uint8)
    idx = rng.integers(0, 256, size=(5, 6), dtype=np.uint8)
    alpha = rng.integers(0, 256, size=(5, 6), dtype=np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette(palette.tobytes())
    pa = im.convert("PA")
    pa.putalpha(Image.fromarray(alpha, "L"))
    out = np.asarray(to_rgb(pa)).astype(np.float64)
    np.testing.assert_allclose(out, _composite(palette[idx], alpha), atol=1.0)


def test_mode_CMYK(tmp_path, rng):
    cmyk = rng.integers(0, 256, size=(6, 9, 4), dtype=np.uint8)
    out = np.asarray(_roundtrip(tmp_path, Image.fromarray(cmyk, "CMYK"), "tiff")).astype(np.float64)
    k = cmyk[..., 3:].astype(np.float64)
    expect = (255.0 - cmyk[..., :3]) * (255.0 - k) / 255.0
    np.testing.assert_allclose(out, expect, atol=1.0)


@pytest.mark.parametrize("mode,ext", [("I;16", "png"), ("I;16B", "tiff")])
def test_16_bit_modes_are_scaled_not_clipped(tmp_path, rng, mode, ext):
    v = rng.integers(0, 65536, size=(7, 5)).astype(np.uint16)
    v[0, 0], v[0, 1] = 0, 65535
    im = Image.frombytes(mode, (5, 7), v.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    out = np.asarray(_roundtrip(tmp_path, im, ext))
    expect = np.rint(v / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(out, np.repeat(expect[..., None], 3, axis=2))
    assert out[0, 0, 0] == 0 and out[0, 1, 0] == 255


def test_modes_I_and_F(tmp_path, rng):
    v = rng.integers(0, 65536, size=(4, 6)).astype(np.int32)
    out = np.asarray(_roundtrip(tmp_path, Image.fromarray(v, "I"), "tiff"))
    np.testing.assert_array_equal(out[..., 1], np.rint(v / 257.0).astype(np.uint8))
    f = rng.random((4, 6)).astype(np.float32)
    out = np.asarray(_roundtrip(tmp_path, Image.fromarray(f, "F"), "tiff"))
    np.testing.assert_array_equal(out[..., 2], np.rint(f.astype(np.float64) * 255).astype(np.uint8))


def test_mode_YCbCr(tmp_path, rng):
    ycc = rng.integers(16, 240, size=(5, 7, 3), dtype=np.uint8)
    out = np.asarray(_roundtrip(tmp_path, Image.fromarray(ycc, "YCbCr"), "tiff")).astype(np.float64)
    y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))
    expect = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                       y + 1.772 * (cb - 128)], axis=2)
    np.testing.assert_allclose(out, np.clip(expect, 0, 255), atol=1.5)


# ----------------------------------------------------------------------------- bounding boxes

def test_bbox_crop_keeps_its_scale(tmp_path, rng):
    a = smooth_image(rng, 2001, 1003)
    p = tmp_path / "query.png"
    Image.fromarray(a).save(p)
    bbox = (100.4, 50.6, 901.7, 650.2)
    # the reference recipe, with PIL: crop, then thumbnail to 1024 * max(crop) / max(full)
    full = Image.fromarray(a)
    crop = full.crop(bbox)
    target = 1024 * max(crop.size) / max(full.size)
    crop.thumbnail((target, target), Image.Resampling.LANCZOS, reducing_gap=None)
    x = load_image(p, 1024, bbox=bbox)
    # crop (100, 51, 902, 650): 802 x 599; target 1024 * 802 / 2001 = 410.4 -> 410 x 306
    assert crop.size == (410, 306)
    assert x.shape == (3, 306, 410)
    np.testing.assert_allclose(x.numpy(), normalise(np.asarray(crop)), atol=1e-5)
    # the crop's content is the same region as the resized full image shows
    whole = load_image(p, 1024)
    assert whole.shape == (3, 513, 1024)


def test_bbox_small_image_is_not_upscaled_and_bad_bboxes(tmp_path, rng):
    a = smooth_image(rng, 300, 200)
    p = tmp_path / "small.png"
    Image.fromarray(a).save(p)
    x = load_image(p, 1024, bbox=[10, 20, 110, 90])
    np.testing.assert_allclose(x.numpy(), normalise(a[20:90, 10:110]), atol=1e-5)
    # clipped to the image
    assert crop_box((300, 200), (-5, -5, 400, 50)) == (0, 0, 300, 50)
    with pytest.raises(ValueError, match="bbox"):
        load_image(p, 1024, bbox=(50, 50, 40, 60))
    with pytest.raises(ValueError, match="bbox"):
        load_image(p, 1024, bbox=(400, 10, 500, 60))
    with pytest.raises(ValueError, match="bbox"):
        load_image(p, 1024, bbox=(1, 2, 3))
    with pytest.raises(TypeError, match="bbox"):
        load_image(p, 1024, bbox="0,0,10,10x")


# ----------------------------------------------------------------------------- errors

@pytest.fixture
def bad_files(tmp_path, rng):
    good = tmp_path / "good.png"
    Image.fromarray(smooth_image(rng, 120, 90)).save(good)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    buf = io.BytesIO()
    Image.fromarray(smooth_image(rng, 300, 200)).save(buf, "JPEG", quality=95)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    missing = tmp_path / "missing.png"
    return good, corrupt, truncated, missing


def test_corrupt_truncated_missing_files_name_the_file(bad_files):
    good, corrupt, truncated, missing = bad_files
    assert load_image(good, 64).shape == (3, 48, 64)
    with pytest.raises(ImageLoadError, match="corrupt.jpg"):
        load_image(corrupt)
    with pytest.raises(ImageLoadError, match="truncated.jpg"):
        load_image(truncated)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(missing)


def test_image_list_raise_and_skip(bad_files):
    good, corrupt, truncated, missing = bad_files
    paths = [good, corrupt, truncated, missing]
    ds = ImageList(paths, image_size=100)
    idx, x = ds[0]
    assert idx == 0 and x.shape == (3, 75, 100)
    with pytest.raises(ImageLoadError, match="corrupt.jpg"):
        ds[1]
    skip = ImageList(paths, image_size=100, on_error="skip")
    for i, name in [(1, "corrupt.jpg"), (2, "truncated.jpg"), (3, "missing.png")]:
        idx, item = skip[i]
        assert idx == i and isinstance(item, LoadFailure) and item.index == i
        assert item.source.endswith(name) and name in item.message
    torch.testing.assert_close(skip[0][1], ds[0][1], rtol=0, atol=0)


def test_image_list_and_loader_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="bboxes"):
        ImageList(["a.png", "b.png"], bboxes=[None])
    with pytest.raises(ValueError, match="on_error"):
        ImageList(["a.png"], on_error="ignore")
    with pytest.raises(TypeError, match="paths"):
        ImageList("folder")
    with pytest.raises(ValueError, match="image_size"):
        ImageList(["a.png"], image_size=0)
    with pytest.raises(TypeError, match="image_size"):
        load_image(tmp_path / "a.png", image_size="1024")


def test_list_images(tmp_path):
    (tmp_path / "b").mkdir()
    for name in ["b/2.PNG", "a.jpg", "b/1.jpeg", "notes.txt", "c.webp"]:
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)] == [
        "a.jpg", "b/1.jpeg", "b/2.PNG", "c.webp"]
    with pytest.raises(NotADirectoryError, match="folder"):
        list_images(tmp_path / "a.jpg")


def test_pnu_photos_load(shared_data):
    paths = sorted((shared_data / "pnu_landmarks").rglob("*.png"))
    assert len(paths) == 50
    for p in paths[::7]:
        with Image.open(p) as im:
            w, h = im.size
        x = load_image(p, 1024)
        assert x.shape == (3, *reversed(resized_size((w, h), 1024)))
        assert max(x.shape[1:]) == min(1024, max(w, h))
        assert torch.isfinite(x).all()
