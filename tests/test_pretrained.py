"""cirtorch retrieval checkpoints -> LandmarkNet: the VGG16 / ResNet layouts, GeM p, end-to-end
whitening and precomputed Lw, against the independent reference in ``cirtorch_ref`` (plain
torch / numpy float64 written from the published method); safe loading; the safetensors round
trip; and the descriptors of ``extract`` (single- and multi-scale, up-scales, odd and
non-square image sizes)."""
from __future__ import annotations

import builtins
import copy
import math

import cirtorch_ref as ref
import numpy as np
import pytest
import torch
from PIL import Image

import pylandmark as plm
from pylandmark.models import VGG, LandmarkNet, from_cirtorch, load_cirtorch
from pylandmark.models.whitening import select_whitening
from pylandmark.nn.whiten import Whitening

LW = "retrieval-SfM-120k"
MS_HALF = (1.0, 1.0 / math.sqrt(2.0), 0.5)
MS_UP = (1.0, math.sqrt(2.0), 1.0 / math.sqrt(2.0))
IMAGE_SIZE = 64
#: (W, H) of the test photos: larger and smaller than IMAGE_SIZE, odd, portrait and landscape;
#: two share a size so that one batch holds two images
PHOTO_SIZES = [(97, 71), (50, 83), (61, 45), (97, 71)]
RESNET_CHILDREN = {0: "conv1", 1: "bn1", 4: "layer1", 5: "layer2", 6: "layer3", 7: "layer4"}


@pytest.fixture(scope="module")
def vgg_ckpt():
    return ref.make_checkpoint("vgg16", seed=3, p=3.3, lw_names=(LW, "retrieval-SfM-30k"))


@pytest.fixture(scope="module")
def r50_ckpt():
    """ResNet-50 with a whitening layer, Lw, and mean/std other than ImageNet's (read from meta)."""
    ckpt = ref.make_checkpoint("resnet50", seed=9, p=2.9, whitening=True, lw_names=(LW, "retrieval-SfM-30k"))
    ckpt["meta"]["mean"], ckpt["meta"]["std"] = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
    return ckpt


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return ref.write_photos(tmp_path_factory.mktemp("photos"), PHOTO_SIZES)


def test_vgg16_has_torchvision_layout():
    """Our VGG16 holds exactly the convolutions of torchvision's vgg16.features (indices and
    shapes listed independently in cirtorch_ref), 14,714,688 parameters."""
    own = VGG().state_dict()
    theirs = ref.backbone_state("vgg16", torch.Generator().manual_seed(0))
    assert {k: tuple(v.shape) for k, v in own.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert sum(v.numel() for v in own.values()) == 14_714_688 and len(own) == 26
    assert VGG().feature_stride == 16
    x = torch.randn(1, 3, 47, 61)
    assert VGG().forward_features(x).shape == (1, 512, 2, 3)  # four max-pools, each floored


@pytest.mark.parametrize("arch,whitening,tracked", [("vgg16", False, True), ("resnet50", True, True),
                                                    ("resnet101", False, False)])
def test_network_equals_reference_in_float64(arch, whitening, tracked, vgg_ckpt):
    """The converted network computes the published descriptor: float64 forward against the
    functional reference (same operations, so the only differences are float64 summation-order
    rounding: ~1e-16 per op on unit-norm outputs, far below 1e-12). Files of old torch versions
    lack BatchNorm's num_batches_tracked (``tracked=False``)."""
    ckpt = vgg_ckpt if arch == "vgg16" else ref.make_checkpoint(arch, seed=7, p=2.6, whitening=whitening,
                                                                 with_tracked=tracked)
    # not multiples of 32, landscape and portrait (one image for the deep ResNet-101, for time)
    shapes = [(1, 3, 70, 37)] if arch == "resnet101" else [(2, 3, 45, 61), (1, 3, 70, 37)]
    net = from_cirtorch(ckpt).double().eval()
    p = float(ckpt["state_dict"]["pool.p"])
    assert net.config.backbone == arch and net.dim == ref.DIMS[arch]
    assert net.config.p == pytest.approx(p) and float(net.pool.p.detach()) == pytest.approx(p)
    assert net.multiscale_p == (1.0 if whitening else pytest.approx(p))
    assert (net.whiten is not None) == whitening
    gen = torch.Generator().manual_seed(1)
    for shape in shapes:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            ours = net(x)
        expected = ref.descriptor(ckpt, x)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    # the comparison is sensitive: one misplaced BatchNorm statistic or bias changes the output
    bad = copy.deepcopy(ckpt)
    key = "features.10.bias" if arch == "vgg16" else "features.5.0.bn2.running_mean"
    bad["state_dict"][key] = bad["state_dict"][key] + 0.5
    assert (ref.descriptor(bad, x) - ours).abs().max() > 1e-4


def test_resnet152_loads_every_tensor_in_place():
    """ResNet-152: every cirtorch tensor lands at torchvision's name (children 0, 1, 4..7 of the
    ResNet = conv1, bn1, layer1..4), nothing missing; the forward is checked in the slow test."""
    ckpt = ref.make_checkpoint("resnet152", seed=2, whitening=True)
    net = from_cirtorch(ckpt)
    own = net.state_dict()
    for key, value in ckpt["state_dict"].items():
        if key.startswith("features."):
            _, i, rest = key.split(".", 2)
            target = f"backbone.{RESNET_CHILDREN[int(i)]}.{rest}"
        else:
            target = key
        assert torch.equal(own[target], value.to(own[target].dtype)), key
    assert len(own) == len(ckpt["state_dict"])
    assert tuple(net.backbone.cfg.layers) == (3, 8, 36, 3) and net.dim == 2048


@pytest.mark.slow
def test_resnet152_equals_reference():
    ckpt = ref.make_checkpoint("resnet152", seed=4, p=3.1, whitening=True)
    net = from_cirtorch(ckpt).double().eval()
    x = torch.randn(1, 3, 53, 41, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref.descriptor(ckpt, x), rtol=0, atol=1e-12)


def _reference_descriptors(ckpt, paths, scales, lw_name):
    """(with the whitening, without it) for image files: (N, D) float64 each."""
    meta = ckpt["meta"]
    raw = np.stack([ref.multiscale(ckpt, ref.load_image(p, IMAGE_SIZE, meta["mean"], meta["std"]), scales)
                    for p in paths])
    if lw_name is None:
        return raw, raw
    return ref.apply_lw(raw, meta["Lw"][lw_name]["ms" if len(scales) > 1 else "ss"]), raw


def _assert_fp16_descriptors_close(ours: np.ndarray, expected: np.ndarray) -> None:
    """extract returns float16, whose unit roundoff is u = 2^-11: each component moves by at most
    u |x_i| <= 2^-11 (|x_i| <= 1), and the error vector e has ||e|| <= u, so 1 - cos <= ||e||^2 / 2
    ~ 1.2e-7. The float32 network adds ~1e-6 per component at most (measured 2e-7 for VGG16 and
    ResNet-50). Hence 2^-11 + 1e-5 per component and 1e-6 on the cosine; the photos themselves are
    checked to be more than 100x that apart, so descriptors of the wrong input cannot pass."""
    assert ours.dtype == np.float16 and ours.shape == expected.shape
    o = ours.astype(np.float64)
    assert np.abs(o - expected).max() <= 2 ** -11 + 1e-5
    cos = (o * expected).sum(1) / np.linalg.norm(o, axis=1) / np.linalg.norm(expected, axis=1)
    assert (1 - cos).max() <= 1e-6
    gram = expected @ expected.T / np.outer(*(2 * [np.linalg.norm(expected, axis=1)]))
    assert (1 - gram[np.triu_indices(len(gram), 1)]).min() > 1e-4


@pytest.mark.parametrize("arch,scales,lw_name,legacy,which", [
    ("vgg16", (1.0,), LW, False, slice(None)),                   # single scale + Lw 'ss'; a batch of 2
    ("vgg16", MS_HALF, LW, True, slice(None)),                   # multi-scale (GeM p) + Lw 'ms'; legacy file
    ("vgg16", MS_UP, "retrieval-SfM-30k", False, slice(1, 3)),   # up-scale combined with GeM p + other Lw
    ("resnet50-w", MS_UP, None, False, slice(1, 3)),             # end-to-end whitening, up-scale, p = 1
], ids=["vgg16-ss-lw", "vgg16-ms-lw-legacy", "vgg16-ms-up-lw", "r50w-ms-up"])
def test_extract_equals_reference(arch, scales, lw_name, legacy, which, photos, vgg_ckpt, r50_ckpt, tmp_path):
    """From a checkpoint file to float16 descriptors of image files: decoding, thumbnail resize,
    normalisation with the file's mean/std, scales, combination, Lw. (Fewer photos for the
    costlier cases: each image shape and scale is a new shape for the CPU convolutions.)"""
    ckpt = vgg_ckpt if arch == "vgg16" else r50_ckpt
    photos = photos[which]
    path = tmp_path / f"{arch}.pth"
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy)
    net = LandmarkNet.from_pretrained(path)
    assert net.config.mean == tuple(ckpt["meta"]["mean"]) and sorted(net.whitenings) == sorted(ckpt["meta"]["Lw"])
    ours = plm.extract(net, photos, image_size=IMAGE_SIZE, scales=scales, whitening=lw_name, batch_size=2,
                       progress=False)
    expected, plain = _reference_descriptors(ckpt, photos, scales, lw_name)
    _assert_fp16_descriptors_close(ours, expected)
    if lw_name is not None:  # the whitening matters: without it the descriptors are far off
        assert np.abs(ours.astype(np.float64) - plain).max() > 0.05


def test_round_trip_through_safetensors_directory(vgg_ckpt, photos, tmp_path):
    """cirtorch file -> LandmarkNet.save (config.json + safetensors, Lw included) -> from_pretrained:
    the same tensors, whitenings and descriptors, bit for bit."""
    net = from_cirtorch(vgg_ckpt)
    out = net.save(tmp_path / "vgg")
    assert sorted(f.name for f in out.iterdir()) == ["config.json", "model.safetensors", "whitenings.safetensors"]
    back = LandmarkNet.from_pretrained(out)
    assert back.config == net.config
    for k, v in net.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert sorted(back.whitenings) == sorted(net.whitenings)
    for name, kinds in net.whitenings.items():
        for kind, w in kinds.items():
            assert np.array_equal(back.whitenings[name][kind].projection, w.projection)
            assert np.array_equal(back.whitenings[name][kind].mean, w.mean)
    for scales in [(1.0,), MS_HALF]:
        a = plm.extract(net, photos[:2], image_size=IMAGE_SIZE, scales=scales, whitening=LW, progress=False)
        b = plm.extract(back, photos[:2], image_size=IMAGE_SIZE, scales=scales, whitening=LW, progress=False)
        assert np.array_equal(a, b)
    # saving a network without whitenings into the same directory drops the stale file
    net.whitenings = {}
    net.save(out)
    assert not (out / "whitenings.safetensors").exists() and LandmarkNet.from_pretrained(out).whitenings == {}


def test_whitening_selection_and_errors(tmp_path):
    net = LandmarkNet(backbone_args={"depths": [1, 1, 1, 1, 1], "out_chs": [8, 8, 8, 8, 16]})
    rng = np.random.default_rng(0)
    ss, ms = Whitening(rng.standard_normal(16), rng.standard_normal((16, 16))), \
        Whitening(rng.standard_normal(16), rng.standard_normal((12, 16)))
    net.whitenings = {"set": {"ss": ss, "ms": ms}, "only-ss": {"ss": ss}}
    assert select_whitening(net, "set", multiscale=False) is ss
    assert select_whitening(net, "set", multiscale=True) is ms
    assert select_whitening(net, None, multiscale=True) is None
    with pytest.raises(ValueError, match=r"no 'ms' \(multi-scale\) variant"):
        select_whitening(net, "only-ss", multiscale=True)
    with pytest.raises(ValueError, match="it has: only-ss, set"):
        select_whitening(net, "retrieval-SfM-120k", multiscale=False)
    f = ss.save(tmp_path / "w.safetensors")
    loaded = select_whitening(net, str(f), multiscale=True)
    assert np.array_equal(loaded.projection, ss.projection)
    with pytest.raises(ValueError, match="D=8 descriptors but the network gives D=16"):
        select_whitening(net, Whitening(np.zeros(8), np.eye(8)), multiscale=False)
    with pytest.raises(TypeError, match="whitening must be"):
        select_whitening(net, 3, multiscale=False)


def test_safe_loading_refuses_code_and_reads_numpy_1_files(vgg_ckpt, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return builtins.open, (str(marker), "w")

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "meta": {"architecture": "vgg16", "x": Evil()}}, path)
    with pytest.raises(ValueError, match="evil.pth.*tensors-only"):
        load_cirtorch(path)
    with pytest.raises(ValueError, match="evil.pth"):
        LandmarkNet.from_pretrained(path)
    assert not marker.exists()
    # a file pickled by numpy 1 names numpy.core.multiarray._reconstruct; the legacy (non-zip)
    # format is a plain pickle stream, so the module name can be rewritten in place
    small = {"state_dict": dict(vgg_ckpt["state_dict"]), "meta": copy.deepcopy(vgg_ckpt["meta"])}
    legacy = tmp_path / "np1.pth"
    torch.save(small, legacy, _use_new_zipfile_serialization=False)
    data = legacy.read_bytes()
    assert b"numpy._core.multiarray" in data
    legacy.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    net = load_cirtorch(legacy)
    assert np.array_equal(net.whitenings[LW]["ms"].projection, vgg_ckpt["meta"]["Lw"][LW]["ms"]["P"])


def _mutated(ckpt, where, key, value):
    out = {"state_dict": dict(ckpt["state_dict"]), "meta": dict(ckpt["meta"])}
    if value is None:
        del out[where][key]
    else:
        out[where][key] = value
    return out


@pytest.mark.parametrize("where,key,value,words", [
    ("meta", "architecture", "alexnet", "architecture 'alexnet' is not supported"),
    ("meta", "pooling", "mac", "pooling 'mac' is not supported"),
    ("meta", "regional", True, "regional"),
    ("meta", "local_whitening", True, "local whitening"),
    ("meta", "whitening", True, "meta['whitening'] is True but the state_dict has no whiten.weight"),
    ("meta", "outputdim", 2048, "outputdim"),
    ("meta", "mean", [0.5, 0.5], "meta['mean'] must be 3 numbers"),
    ("meta", "Lw", {LW: {"ss": {"m": np.zeros((511, 1)), "P": np.eye(512)}}}, "expected m of size 512"),
    ("meta", "Lw", {LW: {"ss": {"m": [0.0] * 512, "P": np.eye(512)}}}, "numpy arrays 'm' and 'P'"),
    ("state_dict", "features.0.weight", None, "missing 1: backbone.features.0.weight"),
    ("state_dict", "features.40.weight", torch.zeros(3), "unexpected 1: features.40.weight"),
    ("state_dict", "features.2.weight", torch.zeros(64, 64, 5, 5), "shape mismatch 1: features.2.weight"),
    ("state_dict", "pool.p", torch.tensor([-1.0]), "must be a finite number > 0"),
    ("state_dict", "pool.p", torch.ones(512), "GeM exponent (one float)"),
])
def test_bad_checkpoints_are_rejected_clearly(vgg_ckpt, where, key, value, words):
    with pytest.raises(ValueError) as info:
        from_cirtorch(_mutated(vgg_ckpt, where, key, value), source="net.pth")
    msg = str(info.value)
    assert words in msg and msg.startswith("net.pth") and "\n" not in msg, msg


def test_images_too_small_for_the_backbone_are_reported(vgg_ckpt, tmp_path):
    net = from_cirtorch(vgg_ckpt)
    path = tmp_path / "tiny.png"
    Image.new("RGB", (40, 20), (200, 10, 10)).save(path)
    with pytest.raises(ValueError, match=r"too small for the vgg16 backbone \(at least 16"):
        plm.extract(net, [path], image_size=64, scales=MS_HALF, progress=False)  # 20 px at 1/2 -> 10
