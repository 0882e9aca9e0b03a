"""Extraction-time pooling (GeM+, regional GeM, scale GeM; pylandmark.models.pooling): the spec
syntax, the network's pooling against the formulas in float64, extract() against a direct
per-image computation, and the index, CLI and service keeping the pooling an index was built
with."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_extraction import F32_ROW, TINY_CSP, assert_float16_of, scale_descriptors, tiny_net
from test_superglobal_pooling import regional_reference

import pylandmark as plm
from pylandmark.cli import main
from pylandmark.data import load_image
from pylandmark.models import LandmarkNet
from pylandmark.models.pooling import POOLING_PRESETS, Pooling

SUPERGLOBAL_SCALES = (1 / math.sqrt(2), 1.0, math.sqrt(2))  # the reference's three scales
U = 2.0 ** -24
# regional GeM in float32, per element: a sum of size^2 = 25 powers ((25 - 1) u), the powers and
# the division by 25 (u each), the root (the sum's relative error divided by p = 2.5, plus u) and
# the half-and-half mix (u): under 13 u. The library and the direct computation each make it on
# inputs that already differ by F32_ROW, and GeM passes a relative error through unchanged
# (x -> x^p -> mean -> root p): their descriptors differ by at most F32_ROW + 2 x 13 u of the row.
F32_ROW_RGEM = F32_ROW + 26 * U


@pytest.fixture(scope="module")
def pnu_paths(shared_data):
    return sorted((shared_data / "pnu_landmarks").rglob("*.png"))


def test_specs_parse_print_and_refuse_with_one_line():
    assert Pooling.parse(None) == Pooling() == Pooling.parse("gem") and Pooling().is_default
    sg = Pooling.parse("superglobal")
    assert (sg.gem_p, sg.regional_p, sg.regional_size, sg.scale_p) == (4.6, 2.5, 5, math.inf)  # the reference's
    assert str(sg) == "rgem:2.5:5,gem+:4.6,sgem:inf" and Pooling.parse(str(sg)) == sg
    assert Pooling.parse("sgem,gem+,rgem") == sg == Pooling.parse(" SuperGlobal ")
    assert Pooling.parse("gem+:5,rgem:3:3") == Pooling(gem_p=5.0, regional_p=3.0, regional_size=3)
    for name, preset in POOLING_PRESETS.items():
        assert Pooling.parse(str(preset)) == preset, name
    for bad, words in [("foo", "unknown part 'foo'"), ("gem+:x", "must be a number"), ("rgem:2:4", "odd"),
                       ("rgem:2:5:1", "at most 2 value"), ("gem+:4,gem+:5", "sets gem_p twice"),
                       ("sgem:0", "scale_p must be"), ("gem+:nan", "gem_p must be"), ("x" * 300, "pooling spec"),
                       (3, "pooling spec")]:
        with pytest.raises(ValueError, match=words) as err:
            Pooling.parse(bad)
        assert "\n" not in str(err.value)


def pooled_reference(net: LandmarkNet, features: np.ndarray, pooling: Pooling) -> np.ndarray:
    """The formula in float64: regional GeM on the map, GeM (clamped at the network's eps),
    L2N, the whitening layer, L2N; (B, C, h, w) -> (B, D). CSPDarknet's maps end in a Mish,
    which can be negative: the window's power mean takes those as 0 (a negative power is
    undefined), the mix keeps them."""
    x = features
    if pooling.regional_p is not None:
        pos = np.maximum(x, 0)
        x = regional_reference(pos, pooling.regional_p, pooling.regional_size) - 0.5 * pos + 0.5 * x
    p = float(net.pool.p) if pooling.gem_p is None else pooling.gem_p
    v = np.mean(np.maximum(x, net.pool.eps) ** p, axis=(2, 3)) ** (1 / p)
    v = v / (np.linalg.norm(v, axis=1, keepdims=True) + net.norm_eps)
    if net.whiten is not None:
        v = v @ net.whiten.weight.detach().double().numpy().T + net.whiten.bias.detach().double().numpy()
        v = v / (np.linalg.norm(v, axis=1, keepdims=True) + net.norm_eps)
    return v


@pytest.mark.parametrize("spec", ["gem", "gem+", "rgem", "superglobal", "gem+:3.3,rgem:2:3"])
@pytest.mark.parametrize("whitening", [False, True])
def test_the_networks_pooling_is_the_formula(spec, whitening):
    net = tiny_net(11, whitening=whitening, whiten_dim=20 if whitening else None).eval().double()
    if whitening:
        with torch.no_grad():
            net.whiten.weight.normal_()
    x = torch.randn(2, 3, 97, 131, dtype=torch.float64, generator=torch.Generator().manual_seed(3))  # a 4 x 5 map
    pooling = Pooling.parse(spec)
    with torch.no_grad():
        got = net(x, pooling).numpy()
        ref = pooled_reference(net, net.forward_features(x).numpy(), pooling)
    # float64 throughout: the same formula in another order, a few 2^-53 of the unit row
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    if not pooling.is_default:  # the pooling changes the descriptor (the test could fail)
        with torch.no_grad():
            assert np.abs(net(x).numpy() - ref).max() > 1e-3


@pytest.mark.parametrize("backbone", ["resnet50", "vgg16"])
def test_any_backbone_pools_by_the_formula(backbone):
    # ReLU maps (ResNet, VGG: the reference's kind) as well as CSPDarknet's Mish maps above
    torch.manual_seed(5)
    net = LandmarkNet(backbone=backbone, whitening=True).eval().double()
    x = torch.randn(1, 3, 161, 129, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    pooling = Pooling.parse("superglobal")
    with torch.no_grad():
        features = net.forward_features(x)
        assert features.min() >= 0  # after a ReLU
        np.testing.assert_allclose(net(x, pooling).numpy(), pooled_reference(net, features.numpy(), pooling),
                                   rtol=0, atol=1e-12)


def direct_pooled(net: LandmarkNet, tensors, scales, pooling: Pooling) -> np.ndarray:
    """One image at a time through the eval-mode model with ``pooling``, the scales combined in
    float64 by scale GeM's maximum of the unit per-scale descriptors, or the power mean."""
    net = net.eval()
    out = []
    for x in tensors:
        vs = scale_descriptors(net, x, scales, pooling)
        if pooling.scale_p == math.inf:
            v = np.max(vs / np.linalg.norm(vs, axis=1, keepdims=True), axis=0)
        else:
            p = pooling.multiscale_p(float(net.pool.p), net.whiten is not None)
            v = np.mean(np.maximum(vs, 0) ** p, axis=0) ** (1 / p)
        out.append(v / (np.linalg.norm(v) + 1e-6))
    return np.array(out)


@pytest.mark.parametrize("spec", ["superglobal", "gem+", "rgem,sgem"])
def test_extract_pools_as_asked_at_every_scale(pnu_paths, spec):
    net = tiny_net(12)
    paths = pnu_paths[::7]
    pooling = Pooling.parse(spec)
    d = plm.extract(net, paths, image_size=121, scales=SUPERGLOBAL_SCALES, batch_size=3, pooling=spec,
                    progress=False)
    tensors = [load_image(p, 121) for p in paths]
    ref = direct_pooled(net, tensors, SUPERGLOBAL_SCALES, pooling)
    assert_float16_of(d, ref, F32_ROW_RGEM * np.linalg.norm(ref, axis=-1, keepdims=True))
    plain = plm.extract(net, paths, image_size=121, scales=SUPERGLOBAL_SCALES, progress=False)
    assert np.abs(plain.astype(np.float64) - ref).max() > 5e-3
    # one scale: scale GeM of one descriptor is that descriptor
    one = plm.extract(net, paths[:2], image_size=121, pooling=spec, progress=False)
    assert_float16_of(one, direct_pooled(net, tensors[:2], (1.0,), pooling), F32_ROW_RGEM)


def test_whitening_learned_with_a_pooling_is_learned_from_those_descriptors(pnu_paths):
    net = tiny_net(13)
    paths = pnu_paths[:30]
    w = plm.extraction.compute_whitening(net, paths, "pca", image_size=96, pooling="superglobal", progress=False)
    ref = plm.nn.whiten.pca_whitening(plm.extract(net, paths, image_size=96, pooling="superglobal", progress=False))
    np.testing.assert_array_equal(w.projection, ref.projection)
    np.testing.assert_array_equal(w.mean, ref.mean)


def test_a_pooling_needs_a_landmarknet(pnu_paths):
    class Flat(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    with pytest.raises(TypeError, match="re-pools a LandmarkNet's feature map; got a Flat"):
        plm.extract(Flat(), pnu_paths[:1], image_size=64, pooling="gem+", progress=False)
    plm.extract(Flat(), pnu_paths[:1], image_size=64, pooling="gem", progress=False)  # its own: fine
    with pytest.raises(ValueError, match="unknown part"):
        plm.extract(tiny_net(1), pnu_paths[:1], image_size=64, pooling="avg", progress=False)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    return LandmarkNet(backbone_args=TINY_CSP).save(tmp_path_factory.mktemp("net") / "tiny")


def test_an_index_keeps_its_pooling_for_queries_cli_and_service(shared_data, weights, tmp_path, capsys):
    from pylandmark.pipelines import check_against_index, index_options
    from pylandmark.serve.config import ServeConfig
    from pylandmark.serve.engine import Engine

    pnu = shared_data / "pnu_landmarks"
    out = tmp_path / "sg.plmi"
    assert main(["index", "build", str(pnu / "train"), "--labels-from-folders", "--out", str(out), "--weights",
                 str(weights), "--image-size", "96", "--scales", "1,sqrt(2)", "--pooling", "superglobal",
                 "--quiet"]) == 0
    index = plm.Index.load(out)
    assert index.metadata["pooling"] == "rgem:2.5:5,gem+:4.6,sgem:inf"
    net = LandmarkNet.from_pretrained(weights)
    photos = sorted((pnu / "train").rglob("*.png"))
    rows = plm.extract(net, photos, image_size=96, scales=(1, math.sqrt(2)), pooling="superglobal", progress=False)
    np.testing.assert_array_equal(np.sort(index.descriptors.view(np.uint16), axis=0),
                                  np.sort(rows.view(np.uint16), axis=0))
    # a query is described as the index was: its own photo is its best match, at score 1
    capsys.readouterr()
    assert main(["search", str(out), str(photos[3]), "--json", "--quiet", "-k", "1"]) == 0
    hit = json.loads(capsys.readouterr().out)[0]["neighbours"][0]
    assert hit["path"].endswith(photos[3].name) and hit["score"] == pytest.approx(1.0, abs=1e-3)
    opts = index_options(index)
    assert opts.pooling == "rgem:2.5:5,gem+:4.6,sgem:inf"
    assert index_options(index, pooling="gem").pooling == "gem"
    with pytest.warns(UserWarning, match="--pooling gem differs from the index's rgem"):
        check_against_index(index, None, index_options(index, pooling="gem"))
    # the service describes an upload as extract does with the index's pooling
    engine = Engine(ServeConfig(index=str(out), threads=1))
    try:
        assert engine.info()["network"]["pooling"] == "rgem:2.5:5,gem+:4.6,sgem:inf"
        got = engine.describe([engine.prepare(photos[3].read_bytes(), "photo")])
        np.testing.assert_array_equal(got, rows[3:4])
    finally:
        engine.close()


def test_an_index_recording_a_hostile_pooling_is_one_line(tmp_path):
    from pylandmark.pipelines import index_options

    index = plm.Index(8, metadata={"pooling": "rgem:2.5:5" + ",gem" * 100})
    with pytest.raises(ValueError, match="the index's pooling must be a pooling spec"):
        index_options(index)
    index = plm.Index(8, metadata={"pooling": "__import__('os')"})
    with pytest.raises(ValueError, match="the index's pooling: unknown part"):
        index_options(index)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pooling_on_cuda_matches_the_formula(pnu_paths, monkeypatch):
    net = tiny_net(14)
    paths = pnu_paths[:6]
    tensors = [load_image(p, 121) for p in paths]
    ref = direct_pooled(net, tensors, SUPERGLOBAL_SCALES, Pooling.parse("superglobal"))
    # float32 convolutions in float32 (cuDNN would use TF32, 10-bit mantissas, by default): then
    # the CPU's bound holds
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    gpu = plm.extract(net, paths, image_size=121, scales=SUPERGLOBAL_SCALES, pooling="superglobal", device="cuda",
                      amp=False, output="torch", progress=False)
    assert gpu.device.type == "cuda"
    assert_float16_of(gpu.cpu().numpy(), ref, F32_ROW_RGEM)
    # the default, float16 autocast: the same answer within float16 arithmetic (cosine as the
    # float16 extraction test measures it)
    half = plm.extract(net, paths, image_size=121, scales=SUPERGLOBAL_SCALES, pooling="superglobal", device="cuda",
                       progress=False).astype(np.float64)
    cos = (half * ref).sum(1) / np.linalg.norm(half, axis=1)
    assert cos.min() > 0.999
