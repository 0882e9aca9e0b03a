"""pylandmark.extract on the PNU photos: against a direct per-image forward of the model,
multi-scale combination against a direct float64 computation, batching by shape, workers,
datasets, bounding boxes and unreadable files."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import pylandmark as plm
from pylandmark.data import ImageLoadError, LoadFailure, load_image, open_image
from pylandmark.models import LandmarkNet

TINY_CSP = {"depths": [1, 1, 1, 1, 1], "out_chs": [8, 16, 24, 32, 48]}
MS = (1.0, 1.0 / math.sqrt(2.0), 0.5)


@pytest.fixture(scope="module")
def pnu_paths(shared_data):
    paths = sorted((shared_data / "pnu_landmarks").rglob("*.png"))
    assert len(paths) == 50
    return paths


def tiny_net(seed: int = 0, **kw) -> LandmarkNet:
    torch.manual_seed(seed)
    net = LandmarkNet(backbone_args=TINY_CSP, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial BN statistics so that folding them is exercised
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net


# The library's float32 descriptors (BN folded into the convolutions, images batched, scales
# combined and rows L2-normalised in float32) and direct()'s (the plain model, one image at a time,
# combined in float64) differ by the rounding of float32 sums taken in other orders: relative to
# the unit row, a few u = 2^-24 (at most 4u measured over 10 network seeds and the full network
# at 1024; a network's forward error has no closed form here, so F32_ROW = 32u bounds it with an
# 8x margin: the one constant below not derived). The rest is rounding to float16: at most half
# its spacing at the element. (The old atol=1e-3 was 4x the largest such half spacing, 2^-12 at
# 0.5..1, and 30x that of a typical element.)
F32_ROW = 2.0 ** -19


def float16_bound(ref: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Elementwise bound on |float16(v) - ref| for float32 values v within delta of ref."""
    near = (np.abs(ref) + delta).astype(np.float16)
    return np.spacing(near).astype(np.float64) / 2 + delta


def assert_float16_of(d: np.ndarray, ref: np.ndarray, delta=None) -> np.ndarray:
    """d (float16 descriptors) equals ref (float64) rounded to float16, the float32 parts within
    delta (default F32_ROW of the row's norm); returns the bound."""
    ref = np.asarray(ref, dtype=np.float64)
    if delta is None:
        delta = F32_ROW * np.linalg.norm(ref, axis=-1, keepdims=True)
    bound = float16_bound(ref, delta)
    err = np.abs(d.astype(np.float64) - ref)
    assert (err <= bound).all(), f"max error {err.max():.3g}; excess {(err - bound).max():.3g} over the bound"
    return bound


def assert_float16_agree(a, b) -> None:
    """Two float16 descriptor arrays, each float32 values rounded to nearest, where the float32
    values differ only by sums taken in another order (F32_ROW of the unit row): each element
    within half a float16 spacing at a, plus half at b (one float16 ulp), plus F32_ROW."""
    a, b = np.asarray(a, dtype=np.float16), np.asarray(b, dtype=np.float16)
    half = (np.spacing(np.abs(a)).astype(np.float64) + np.spacing(np.abs(b)).astype(np.float64)) / 2
    err = np.abs(a.astype(np.float64) - b.astype(np.float64))
    bound = half + F32_ROW
    assert (err <= bound).all(), f"max difference {err.max():.3g}; excess {(err - bound).max():.3g} over the bound"


def scale_descriptors(net: LandmarkNet, x: torch.Tensor, scales, pooling=None) -> np.ndarray:
    """(S, D) float64: the eval-mode model's descriptor of one (3, H, W) image at each scale
    (bilinear, align_corners=False), pooled as ``pooling`` says (None: its own GeM)."""
    vs = []
    with torch.no_grad():
        for s in scales:
            xs = x[None] if s == 1 else F.interpolate(x[None], scale_factor=s, mode="bilinear", align_corners=False)
            vs.append((net(xs) if pooling is None else net(xs, pooling))[0].double().numpy())
    return np.array(vs)


def direct(net: LandmarkNet, tensors: list[torch.Tensor], scales=(1.0,), p: float = 1.0) -> np.ndarray:
    """One image at a time through the eval-mode model, multi-scale combined in float64."""
    net = net.eval()
    out = []
    for x in tensors:
        v = (np.mean(np.power(scale_descriptors(net, x, scales), p), axis=0)) ** (1.0 / p)
        out.append(v / (np.linalg.norm(v) + 1e-6))  # L2N as extract defines it
    return np.array(out)


def test_single_scale_matches_direct_forward(pnu_paths):
    net = tiny_net(1).train()  # extract must use eval mode and leave the model as it was
    before = {k: v.clone() for k, v in net.state_dict().items()}
    d = plm.extract(net, pnu_paths, image_size=161, batch_size=5, progress=False)
    assert net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert isinstance(d, np.ndarray) and d.dtype == np.float16 and d.shape == (50, 48)
    ref = direct(net, [load_image(p, 161) for p in pnu_paths])
    bound = assert_float16_of(d, ref)
    # unit rows: | |d| - |ref| = 1 | <= |d - ref| <= |bound|
    norms = np.linalg.norm(d.astype(np.float64), axis=1)
    assert (np.abs(norms - 1.0) <= np.linalg.norm(bound, axis=1)).all()
    # distinct images give distinct descriptors (a constant output would not pass this)
    assert np.abs(ref[0] - ref[30]).max() > 1e-2


def test_folder_input_deterministic_and_workers(pnu_paths, shared_data):
    net = tiny_net(2)
    sub = pnu_paths[:20]  # folder order = sorted paths: test/ then train/
    a = plm.extract(net, shared_data / "pnu_landmarks", image_size=128, batch_size=4, progress=False)
    b = plm.extract(net, sub, image_size=128, batch_size=4, num_workers=2, progress=False)
    c = plm.extract(net, sub, image_size=128, batch_size=4, num_workers=0, progress=False)
    assert a.shape == (50, 48)
    np.testing.assert_array_equal(b, c)
    np.testing.assert_array_equal(a[:20], c)
    t = plm.extract(net, sub, image_size=128, batch_size=4, output="torch", progress=False)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float16 and t.device.type == "cpu"
    np.testing.assert_array_equal(t.numpy(), c)


def test_multiscale_combination_uses_learned_p(pnu_paths):
    net = tiny_net(3)
    with torch.no_grad():
        net.pool.p.fill_(2.5)
    paths = pnu_paths[::9]
    d = plm.extract(net, paths, image_size=151, scales=MS, batch_size=2, progress=False)
    tensors = [load_image(p, 151) for p in paths]
    ref = direct(net, tensors, MS, p=2.5)
    assert_float16_of(d, ref)
    single = direct(net, tensors)
    wrong_p = direct(net, tensors, MS, p=1.0)
    assert np.abs(ref - single).max() > 5e-3 and np.abs(ref - wrong_p).max() > 5e-3


def test_multiscale_with_whitening_uses_p_1(pnu_paths):
    net = tiny_net(4, whitening=True, whiten_dim=20)
    with torch.no_grad():
        net.whiten.weight.normal_()
        net.whiten.bias.normal_()
    paths = pnu_paths[5:9]
    d = plm.extract(net, paths, image_size=99, scales=MS, progress=False)
    assert d.shape == (4, 20)
    ref = direct(net, [load_image(p, 99) for p in paths], MS, p=1.0)
    assert_float16_of(d, ref)


class _Recorder(torch.nn.Module):
    """Descriptor = a few pixels of the image, and a record of every batch shape seen."""

    calls: list[tuple[int, ...]] = []  # class-level: shared with the inference copy

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        _Recorder.calls.append(tuple(x.shape))
        return x[:, :, 0, :3].flatten(1).abs() * self.w + 0.1


class _ShapesDataset(torch.utils.data.Dataset):
    shapes = [(3, 20, 30), (3, 30, 20), (3, 17, 17)]

    def __init__(self, n, order=None):
        self.n = n
        self.order = order or [self.shapes[(i * i + i // 3) % 3] for i in range(n)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(self.order[i], generator=g), i  # tuples: the first element is the image


def test_batches_hold_one_shape_and_stay_dense():
    _Recorder.calls.clear()
    ds = _ShapesDataset(23)
    d = plm.extract(_Recorder(), ds, batch_size=4, progress=False)
    calls = list(_Recorder.calls)
    assert sum(c[0] for c in calls) == 23
    counts = {s: sum(1 for i in range(23) if tuple(ds[i][0].shape) == s) for s in ds.shapes}
    for s, n in counts.items():
        sizes = [c[0] for c in calls if c[1:] == s]
        assert sum(sizes) == n  # every batch had one image shape: no padding, no mixing
        assert sorted(sizes, reverse=True) == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    # the recorder's own float32 values, L2-normalised as the library defines it (+ 1e-6)
    ref = np.array([(ds[i][0][:, 0, :3].flatten().abs() + 0.1).double().numpy() for i in range(23)])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True) + 1e-6
    # no network here: the only float32 error is that L2N's, of 9 positive elements: each is off
    # by the sum of squares' gamma_9, halved by the sqrt, plus the sqrt, + 1e-6 and / (u each)
    u = 2.0 ** -24
    g9 = 9 * u / (1 - 9 * u)
    eta = g9 / (2 * (1 - g9))
    assert_float16_of(d, ref, delta=(eta + 3 * u + 3 * eta * u) * np.abs(ref))
    # a small buffer forces partial batches but never mixes shapes
    _Recorder.calls.clear()
    d2 = plm.extract(_Recorder(), ds, batch_size=4, max_buffered=5, progress=False)
    assert sum(c[0] for c in _Recorder.calls) == 23 and max(c[0] for c in _Recorder.calls) <= 4
    assert all(c[1:] in ds.shapes for c in _Recorder.calls)
    np.testing.assert_array_equal(d2, d)


def test_odd_shapes_do_not_break_up_the_common_shape():
    """Landmark photos: one common shape and many odd ones. With a small buffer the odd ones
    run alone while the common shape still fills whole batches."""
    common = (3, 24, 32)
    order = []
    for i in range(12):
        order += [common, (3, 10 + i, 13)]
    ds = _ShapesDataset(len(order), order)
    _Recorder.calls.clear()
    plm.extract(_Recorder(), ds, batch_size=4, max_buffered=5, progress=False)
    assert [c[0] for c in _Recorder.calls if c[1:] == common] == [4, 4, 4]
    assert sorted(c[1:] for c in _Recorder.calls if c[1:] != common) == sorted(order[1::2])


def test_dataset_of_pil_images_and_tensors(pnu_paths):
    net = tiny_net(5)
    paths = pnu_paths[10:16]

    class PILs(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return open_image(paths[i]), "label"

    tensors = [load_image(p, 120) for p in paths]
    from_paths = plm.extract(net, paths, image_size=120, progress=False)
    from_pil = plm.extract(net, PILs(), image_size=120, progress=False)
    from_tensors = plm.extract(net, tensors_dataset(tensors), progress=False)
    np.testing.assert_array_equal(from_pil, from_paths)
    np.testing.assert_array_equal(from_tensors, from_paths)


def tensors_dataset(tensors):
    class T(torch.utils.data.Dataset):
        def __len__(self):
            return len(tensors)

        def __getitem__(self, i):
            return tensors[i]

    return T()


def test_bounding_boxes(pnu_paths):
    net = tiny_net(6)
    paths = pnu_paths[:3]
    sizes = [Image.open(p).size for p in paths]
    bboxes = [(w * 0.1, h * 0.2, w * 0.7, h * 0.9) for w, h in sizes]
    bboxes[1] = None
    d = plm.extract(net, paths, image_size=200, bboxes=bboxes, progress=False)
    ref = direct(net, [load_image(p, 200, bbox=b) for p, b in zip(paths, bboxes)])
    assert_float16_of(d, ref)
    full = direct(net, [load_image(paths[0], 200)])
    assert np.abs(full[0] - ref[0]).max() > 1e-2
    with pytest.raises(ValueError, match="bboxes"):
        plm.extract(net, paths, bboxes=[None], progress=False)


@pytest.fixture
def paths_with_bad_files(pnu_paths, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    missing = tmp_path / "missing.jpg"
    return [pnu_paths[0], corrupt, pnu_paths[1], missing, pnu_paths[2]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_unreadable_files_raise_naming_the_file(paths_with_bad_files, num_workers):
    net = tiny_net(7)
    with pytest.raises(ImageLoadError, match="corrupt.png"):
        plm.extract(net, paths_with_bad_files, image_size=64, num_workers=num_workers, progress=False)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        plm.extract(net, [paths_with_bad_files[3]], image_size=64, num_workers=num_workers, progress=False)


def test_unreadable_files_skipped_with_warning(paths_with_bad_files):
    net = tiny_net(7)
    with pytest.warns(RuntimeWarning, match=r"skipped 2 of 5 .*corrupt.png.*missing.jpg"):
        d, skipped = plm.extract(net, paths_with_bad_files, image_size=64, on_error="skip", progress=False)
    assert [s.index for s in skipped] == [1, 3] and all(isinstance(s, LoadFailure) for s in skipped)
    assert skipped[0].source.endswith("corrupt.png") and skipped[1].source.endswith("missing.jpg")
    clean = plm.extract(net, [paths_with_bad_files[i] for i in (0, 2, 4)], image_size=64, progress=False)
    np.testing.assert_array_equal(d, clean)


def test_bad_arguments(pnu_paths, tmp_path):
    net = tiny_net(8)
    few = pnu_paths[:1]
    with pytest.raises(ValueError, match="scales"):
        plm.extract(net, few, scales=(), progress=False)
    with pytest.raises(ValueError, match="scales"):
        plm.extract(net, few, scales=(1.0, -0.5), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        plm.extract(net, few, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="num_workers"):
        plm.extract(net, few, num_workers=-1, progress=False)
    with pytest.raises(ValueError, match="output"):
        plm.extract(net, few, output="list", progress=False)
    with pytest.raises(ValueError, match="on_error"):
        plm.extract(net, few, on_error="ignore", progress=False)
    with pytest.raises(ValueError, match="image_size"):
        plm.extract(net, few, image_size=0, progress=False)
    with pytest.raises(TypeError, match="images"):
        plm.extract(net, 42, progress=False)
    with pytest.raises(TypeError, match="images"):
        plm.extract(net, [1, 2], progress=False)
    with pytest.raises(TypeError, match="single file"):
        plm.extract(net, few[0], progress=False)
    with pytest.raises(ValueError, match="no image files"):
        plm.extract(net, tmp_path, progress=False)
    with pytest.raises(ValueError, match="empty"):
        plm.extract(net, [], progress=False)
    with pytest.raises(TypeError, match="model"):
        plm.extract("cspdarknet53", few, progress=False)


def test_numpy_integers_are_integers(pnu_paths):
    """batch_size / num_workers take numpy integers as every other integer argument does."""
    net = tiny_net(3)
    few = pnu_paths[:3]
    want = plm.extract(net, few, image_size=64, batch_size=2, progress=False)
    got = plm.extract(net, few, image_size=np.int64(64), batch_size=np.int64(2), num_workers=np.int32(0),
                      progress=False)
    np.testing.assert_array_equal(got, want)  # same arithmetic, bit for bit
    with pytest.raises(TypeError, match="batch_size must be an int >= 1, got 2.0"):
        plm.extract(net, few, batch_size=2.0, progress=False)


def test_full_cspdarknet53_at_1024(pnu_paths):
    """The paper's network at the test resolution on two photos of different shapes."""
    torch.manual_seed(9)
    net = LandmarkNet()
    paths = [p for p in pnu_paths if max(Image.open(p).size) >= 1024][:2]
    tensors = [load_image(p, 1024) for p in paths]
    assert {max(t.shape[1:]) for t in tensors} == {1024} and tensors[0].shape != tensors[1].shape
    d = plm.extract(net, paths, progress=False)
    assert d.shape == (2, 1024) and d.dtype == np.float16
    assert_float16_of(d, direct(net, tensors))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_matches_cpu(pnu_paths):
    net = tiny_net(10)
    paths = pnu_paths[:8]
    cpu = plm.extract(net, paths, image_size=256, progress=False)
    gpu = plm.extract(net, paths, image_size=256, device="cuda", output="torch", progress=False)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float16
    cos = (gpu.float().cpu().numpy() * cpu.astype(np.float32)).sum(1)
    assert cos.min() > 0.999
