"""CSPDarknet-53 / ResNet / LandmarkNet: key names, shapes, parameter counts, forward passes
against hand-written functional references, and checkpoint round trips."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pylandmark as plm
from pylandmark.models import (CSPDarknet, CSPDarknet53, CspDarknetCfg, LandmarkNet, LandmarkNetConfig,
                               ResNet, ResNetCfg, fold_batchnorm)

TINY_CSP = {"depths": [1, 2, 1, 1, 1], "out_chs": [8, 16, 16, 24, 32]}


def randomize_bn(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so that eval-mode BN matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)


# ----------------------------------------------------------------------------- CSPDarknet-53

def test_cspdarknet53_keys_and_shapes_match_timm(timm_keys):
    assert len(timm_keys) == 404
    sd = CSPDarknet53(num_classes=1000).state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == timm_keys
    backbone = CSPDarknet53().state_dict()
    assert [(k, tuple(v.shape)) for k, v in backbone.items()] == [
        (k, s) for k, s in timm_keys if not k.startswith("head.")]


def test_cspdarknet53_parameter_count(timm_keys):
    m = CSPDarknet53()
    n = sum(p.numel() for p in m.parameters())
    assert n == 26_617_184
    # independent count from the reference list: conv weights and BN affine params are parameters
    ref = sum(int(np.prod(s)) for k, s in timm_keys
              if not k.startswith("head.") and k.endswith((".conv.weight", ".bn.weight", ".bn.bias")))
    assert n == ref
    head = sum(p.numel() for p in CSPDarknet53(num_classes=1000).parameters()) - n
    assert head == 1024 * 1000 + 1000
    assert m.num_features == 1024 and m.feature_stride == 32


def _ref_cna(sd, prefix, x, stride=1):
    w = sd[f"{prefix}.conv.weight"]
    y = F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2)
    y = F.batch_norm(y, sd[f"{prefix}.bn.running_mean"], sd[f"{prefix}.bn.running_var"],
                     sd[f"{prefix}.bn.weight"], sd[f"{prefix}.bn.bias"], training=False, eps=1e-5)
    return F.leaky_relu(y, 0.01)


def reference_csp_features(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """CSPDarknet forward written from REFERENCE.md section 5 with functional ops only; the
    stage and block structure is read from the key names."""
    x = _ref_cna(sd, "stem.conv1", x)
    n_stages = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("stages."))
    for i in range(n_stages):
        p = f"stages.{i}"
        depth = len({k.split(".")[3] for k in sd if k.startswith(f"{p}.blocks.")})
        x = _ref_cna(sd, f"{p}.conv_exp", _ref_cna(sd, f"{p}.conv_down", x, stride=2))
        half = x.shape[1] // 2
        first, second = x[:, :half], x[:, half:]
        for j in range(depth):
            inner = _ref_cna(sd, f"{p}.blocks.{j}.conv1", second)
            second = second + _ref_cna(sd, f"{p}.blocks.{j}.conv2", inner)
        second = _ref_cna(sd, f"{p}.conv_transition_b", second)
        x = _ref_cna(sd, f"{p}.conv_transition", torch.cat([first, second], dim=1))
    return x


def test_cspdarknet53_features_match_functional_reference():
    torch.manual_seed(1)
    m = CSPDarknet53().double().eval()
    randomize_bn(m, 1)
    x = torch.randn(2, 3, 71, 45, dtype=torch.float64)
    with torch.no_grad():
        got = m.forward_features(x)
        ref = reference_csp_features({k: v for k, v in m.state_dict().items()}, x)
    # 71 -> 36 -> 18 -> 9 -> 5 -> 3 ; 45 -> 23 -> 12 -> 6 -> 3 -> 2
    assert got.shape == (2, 1024, 3, 2)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    # forward without a head is the feature map; with a head it is avgpool + fc
    mh = CSPDarknet53(num_classes=7).double().eval()
    mh.load_state_dict({**m.state_dict(), "head.fc.weight": torch.randn(7, 1024, dtype=torch.float64),
                        "head.fc.bias": torch.randn(7, dtype=torch.float64)})
    with torch.no_grad():
        logits = mh(x)
    sd = mh.state_dict()
    torch.testing.assert_close(logits, ref.mean((2, 3)) @ sd["head.fc.weight"].T + sd["head.fc.bias"])


def test_cspdarknet_custom_config_and_bad_configs():
    m = CSPDarknet(CspDarknetCfg(**TINY_CSP))
    assert m.num_features == 32
    y = m.forward_features(torch.randn(1, 3, 33, 65))
    assert y.shape == (1, 32, 2, 3)
    with pytest.raises(ValueError, match="out_chs"):
        CspDarknetCfg(depths=(1, 1), out_chs=(8, 16, 32))
    with pytest.raises(ValueError, match="expand_ratio"):
        CspDarknetCfg(depths=(1,), out_chs=(7,), expand_ratio=(1.0,), bottle_ratio=(1.0,))
    with pytest.raises(ValueError, match="cfg: unknown preset"):
        CSPDarknet("cspdarknet999")
    with pytest.raises(ValueError, match="num_classes"):
        CSPDarknet53(num_classes=-1)


# ----------------------------------------------------------------------------- ResNet

def torchvision_resnet_keys(layers: tuple[int, ...], with_fc: bool) -> list[str]:
    """torchvision's ResNet state-dict key order, generated from its naming scheme."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight"] + [f"bn1.{b}" for b in bn]
    for i, n in enumerate(layers, start=1):
        for j in range(n):
            p = f"layer{i}.{j}"
            for c in (1, 2, 3):
                keys += [f"{p}.conv{c}.weight"] + [f"{p}.bn{c}.{b}" for b in bn]
            if j == 0:
                keys += [f"{p}.downsample.0.weight"] + [f"{p}.downsample.1.{b}" for b in bn]
    if with_fc:
        keys += ["fc.weight", "fc.bias"]
    return keys


@pytest.mark.parametrize("name,layers,n_params,n_keys", [
    ("resnet50", (3, 4, 6, 3), 23_508_032, 320),
    ("resnet101", (3, 4, 23, 3), 42_500_160, 626),
])
def test_resnet_keys_and_parameter_counts(name, layers, n_params, n_keys):
    m = ResNet(name, num_classes=1000)
    sd = m.state_dict()
    assert list(sd) == torchvision_resnet_keys(layers, with_fc=True)
    assert len(sd) == n_keys
    assert sum(p.numel() for p in ResNet(name).parameters()) == n_params
    assert tuple(sd["layer4.0.downsample.0.weight"].shape) == (2048, 1024, 1, 1)
    assert tuple(sd["layer2.0.conv2.weight"].shape) == (128, 128, 3, 3)
    assert tuple(sd["fc.weight"].shape) == (1000, 2048)


def reference_resnet_features(sd, x, layers):
    def bn(p, y):
        return F.batch_norm(y, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                            sd[f"{p}.bias"], training=False, eps=1e-5)

    x = F.relu(bn("bn1", F.conv2d(x, sd["conv1.weight"], stride=2, padding=3)))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    for i, n in enumerate(layers, start=1):
        for j in range(n):
            p = f"layer{i}.{j}"
            stride = 2 if (i > 1 and j == 0) else 1
            y = F.relu(bn(f"{p}.bn1", F.conv2d(x, sd[f"{p}.conv1.weight"])))
            y = F.relu(bn(f"{p}.bn2", F.conv2d(y, sd[f"{p}.conv2.weight"], stride=stride, padding=1)))
            y = bn(f"{p}.bn3", F.conv2d(y, sd[f"{p}.conv3.weight"]))
            sc = x
            if f"{p}.downsample.0.weight" in sd:
                sc = bn(f"{p}.downsample.1", F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride))
            x = F.relu(y + sc)
    return x


def test_resnet_features_match_functional_reference():
    torch.manual_seed(2)
    layers = (2, 1, 2, 1)
    m = ResNet(ResNetCfg(layers=layers, width=8)).double().eval()
    randomize_bn(m, 2)
    x = torch.randn(2, 3, 77, 51, dtype=torch.float64)
    with torch.no_grad():
        got = m.forward_features(x)
        ref = reference_resnet_features(m.state_dict(), x, layers)
    assert got.shape == (2, 256, 3, 2)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_fold_batchnorm_keeps_outputs():
    torch.manual_seed(3)
    for model in (CSPDarknet(CspDarknetCfg(**TINY_CSP)), ResNet(ResNetCfg(layers=(1, 2, 1, 1), width=8))):
        model = model.double().eval()
        randomize_bn(model, 3)
        x = torch.randn(2, 3, 45, 39, dtype=torch.float64)
        with torch.no_grad():
            ref = model.forward_features(x)
            fused = fold_batchnorm(model)
            assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
            torch.testing.assert_close(fused.forward_features(x), ref, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- LandmarkNet

def test_landmarknet_default_is_the_papers_network():
    net = LandmarkNet()
    cfg = net.config
    assert cfg == LandmarkNetConfig() == plm.models.LANDMARKNET_PRESETS["cspdarknet53-gem"]
    assert isinstance(net.backbone, CSPDarknet) and net.backbone.num_features == 1024
    assert net.dim == 1024 and net.whiten is None
    assert isinstance(net.pool.p, torch.nn.Parameter) and float(net.pool.p.detach()) == 3.0
    assert net.multiscale_p == 3.0
    assert sum(p.numel() for p in net.backbone.parameters()) == 26_617_184
    assert not any(k.startswith("whiten") for k in net.state_dict())
    r = LandmarkNet("resnet101-gem")
    assert isinstance(r.backbone, ResNet) and r.dim == 2048


def numpy_gem_l2n(fmap: np.ndarray, p: float) -> np.ndarray:
    """Reference GeM then L2N of a (B, C, H, W) feature map, in float64 numpy."""
    g = (np.maximum(fmap, 1e-6) ** p).mean(axis=(2, 3)) ** (1 / p)
    return g / (np.linalg.norm(g, axis=1, keepdims=True) + 1e-6)


def test_landmarknet_forward_matches_numpy_reference():
    torch.manual_seed(4)
    net = LandmarkNet(backbone_args=TINY_CSP, p=2.7).double().eval()
    randomize_bn(net, 4)
    x = torch.randn(3, 3, 70, 97, dtype=torch.float64)
    with torch.no_grad():
        fmap = net.forward_features(x).numpy()
        got = net(x).numpy()
    ref = numpy_gem_l2n(fmap, 2.7)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9)
    assert got.shape == (3, 32)


def test_landmarknet_whitening_layer():
    torch.manual_seed(5)
    net = LandmarkNet(backbone_args=TINY_CSP, whitening=True, whiten_dim=20).double().eval()
    assert net.dim == 20 and net.multiscale_p == 1.0
    sd = net.state_dict()
    assert tuple(sd["whiten.weight"].shape) == (20, 32) and tuple(sd["whiten.bias"].shape) == (20,)
    with torch.no_grad():
        net.whiten.weight.normal_()
        net.whiten.bias.normal_()
    x = torch.randn(2, 3, 64, 41, dtype=torch.float64)
    with torch.no_grad():
        fmap = net.forward_features(x).numpy()
        got = net(x).numpy()
    g = numpy_gem_l2n(fmap, 3.0)
    w = g @ net.whiten.weight.detach().numpy().T + net.whiten.bias.detach().numpy()
    ref = w / (np.linalg.norm(w, axis=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-9)


def test_landmarknet_gradients_reach_p_and_backbone():
    torch.manual_seed(6)
    net = LandmarkNet(backbone_args=TINY_CSP).train()
    out = net(torch.randn(2, 3, 40, 56))
    (out[0] @ out[1]).backward()
    assert net.pool.p.grad is not None and net.pool.p.grad.abs().item() > 0
    assert net.backbone.stem.conv1.conv.weight.grad.abs().sum().item() > 0


def test_landmarknet_bad_arguments():
    with pytest.raises(ValueError, match="backbone"):
        LandmarkNet(backbone="vgg19")  # vgg16 is a backbone since the cirtorch presets
    with pytest.raises(ValueError, match="whiten_dim"):
        LandmarkNetConfig(whiten_dim=128)
    with pytest.raises(ValueError, match="backbone_args"):
        LandmarkNet(backbone_args={"depth": [1, 1, 1, 1, 1]})
    with pytest.raises(ValueError, match="name: unknown preset"):
        LandmarkNet("resnet18-gem")
    with pytest.raises(TypeError, match="config"):
        LandmarkNet(42)
    net = LandmarkNet(backbone_args=TINY_CSP)
    with pytest.raises(ValueError, match=r"x must be \(B, 3, H, W\)"):
        net(torch.randn(1, 4, 32, 32))


@pytest.mark.parametrize("fmt,weights", [("safetensors", "model.safetensors"), ("torch", "model.pt")])
def test_landmarknet_save_load_round_trip(tmp_path, fmt, weights):
    torch.manual_seed(7)
    net = LandmarkNet(backbone_args=TINY_CSP, whitening=True, whiten_dim=24, p=3.0).eval()
    randomize_bn(net, 7)
    with torch.no_grad():
        net.pool.p.fill_(2.31)
        net.whiten.weight.normal_()
    out_dir = net.save(tmp_path / "ckpt", format=fmt)
    assert sorted(f.name for f in out_dir.iterdir()) == sorted(["config.json", weights])
    meta = json.loads((out_dir / "config.json").read_text())
    assert meta["config"]["whiten_dim"] == 24 and meta["config"]["backbone_args"] == TINY_CSP
    # weights hold only tensors (no pickled objects): readable with weights_only / safetensors
    if fmt == "torch":
        raw = torch.load(out_dir / weights, weights_only=True)
    else:
        from safetensors.torch import load_file
        raw = load_file(str(out_dir / weights))
    assert set(raw) == set(net.state_dict()) and all(isinstance(v, torch.Tensor) for v in raw.values())

    loaded = LandmarkNet.from_pretrained(out_dir).eval()
    assert loaded.config == net.config
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(2, 3, 53, 67)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
    assert float(loaded.pool.p.detach()) == pytest.approx(2.31)
    assert loaded.multiscale_p == 1.0  # whitening on


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LandmarkNet.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"something": 1}))
    with pytest.raises(ValueError, match="not a LandmarkNet config"):
        LandmarkNet.from_pretrained(tmp_path)
    d = LandmarkNet(backbone_args=TINY_CSP).save(tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        LandmarkNet.from_pretrained(d)
    with pytest.raises(ValueError, match="format"):
        LandmarkNet(backbone_args=TINY_CSP).save(tmp_path / "x", format="pickle")
