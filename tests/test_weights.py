"""load_backbone_weights: timm / torchvision / cirtorch checkpoints, prefixes, classifier keys,
missing / unexpected keys, hashes, and the URL path (file:// and a local HTTP server only)."""
from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading

import pytest
import torch

from pylandmark.models import CSPDarknet53, LandmarkNet, ResNet, ResNetCfg, load_backbone_weights

TINY_CSP = {"depths": [1, 1, 1, 1, 1], "out_chs": [8, 16, 16, 24, 32]}


@pytest.fixture(scope="module")
def timm_checkpoint(timm_keys) -> dict[str, torch.Tensor]:
    """A checkpoint built only from the published key/shape list (not from our model), with
    distinct random values so a misplaced tensor is caught."""
    g = torch.Generator().manual_seed(11)
    sd = {}
    for key, shape in timm_keys:
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(1234, dtype=torch.int64)
        elif key.endswith("running_var"):
            sd[key] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[key] = torch.randn(shape, generator=g)
    assert len(sd) == 404
    return sd


def save_safetensors(sd, path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def assert_backbone_equals(model, sd):
    own = model.state_dict()
    for key, value in sd.items():
        if key.startswith("head."):
            continue
        assert torch.equal(own[key], value.to(own[key].dtype)), key


def test_strict_load_of_timm_checkpoint(tmp_path, timm_checkpoint):
    path = save_safetensors(timm_checkpoint, tmp_path / "model.safetensors")
    model = CSPDarknet53()
    report = load_backbone_weights(model, path)
    assert report.ok and len(report.loaded) == 402
    assert sorted(report.dropped) == ["head.fc.bias", "head.fc.weight"]
    assert report.missing == [] and report.unexpected == []
    assert_backbone_equals(model, timm_checkpoint)
    assert "loaded 402 tensors" in str(report) and "head.fc.weight" in str(report)
    # with the classifier the head loads too
    full = CSPDarknet53(num_classes=1000)
    report = load_backbone_weights(full, path)
    assert len(report.loaded) == 404 and report.dropped == []
    assert torch.equal(full.head.fc.weight, timm_checkpoint["head.fc.weight"])
    # plain torch loading of the same dict is strict too (our names are timm's names)
    CSPDarknet53(num_classes=1000).load_state_dict(timm_checkpoint, strict=True)


def test_loaded_features_match_reference_forward(timm_checkpoint):
    """After loading, the network computes what the checkpoint prescribes: compare the stem and
    the first stage with a functional forward written from the checkpoint alone."""
    import torch.nn.functional as F

    sd = timm_checkpoint
    model = CSPDarknet53().double().eval()
    load_backbone_weights(model, sd)

    def cna(prefix, x, stride=1):
        w = sd[f"{prefix}.conv.weight"].double()
        y = F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2)
        bn = {n: sd[f"{prefix}.bn.{n}"].double() for n in ("running_mean", "running_var", "weight", "bias")}
        y = F.batch_norm(y, bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"], False, 0.0, 1e-5)
        return F.leaky_relu(y, 0.01)

    x = torch.randn(1, 3, 37, 29, dtype=torch.float64)
    ref = cna("stem.conv1", x)
    ref = cna("stages.0.conv_exp", cna("stages.0.conv_down", ref, stride=2))
    a, b = ref[:, :64], ref[:, 64:]
    b = b + cna("stages.0.blocks.0.conv2", cna("stages.0.blocks.0.conv1", b))
    ref = cna("stages.0.conv_transition", torch.cat([a, cna("stages.0.conv_transition_b", b)], 1))
    with torch.no_grad():
        got = model.stages[0](model.stem(x))
    assert got.shape == (1, 64, 19, 15)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prefix", ["module.", "backbone.", "module.backbone.", "model."])
def test_prefixed_checkpoints(tmp_path, timm_checkpoint, prefix):
    sd = {prefix + k: v for k, v in timm_checkpoint.items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": sd, "epoch": 3, "arch": "cspdarknet53"}, path)  # nested, as trainers do
    net = LandmarkNet()  # loads into net.backbone
    report = load_backbone_weights(net, path)
    assert report.ok and report.renamed == 402
    assert sorted(report.dropped) == sorted(prefix + k for k in ("head.fc.weight", "head.fc.bias"))
    assert_backbone_equals(net.backbone, timm_checkpoint)
    assert float(net.pool.p.detach()) == 3.0  # untouched


def test_landmarknet_checkpoint_round_trip_into_backbone(tmp_path):
    torch.manual_seed(0)
    src = LandmarkNet(backbone_args=TINY_CSP, whitening=True)
    state = src.state_dict()
    dst = LandmarkNet(backbone_args=TINY_CSP)
    report = load_backbone_weights(dst, state)
    assert report.ok
    assert sorted(report.dropped) == ["pool.p", "whiten.bias", "whiten.weight"]
    for k, v in src.backbone.state_dict().items():
        assert torch.equal(dst.backbone.state_dict()[k], v)


def test_torchvision_and_cirtorch_resnet_keys(tmp_path):
    torch.manual_seed(1)
    cfg = ResNetCfg(layers=(1, 2, 1, 1), width=8)
    src = ResNet(cfg, num_classes=10)
    tv = src.state_dict()  # torchvision names, with fc
    dst = ResNet(cfg)
    report = load_backbone_weights(dst, tv)
    assert report.ok and sorted(report.dropped) == ["fc.bias", "fc.weight"]
    # cirtorch: features = [conv1, bn1, relu, maxpool, layer1..layer4], plus GeM p and whitening
    index = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
    cir = {}
    for k, v in tv.items():
        head, rest = k.split(".", 1)
        if head in index:
            cir[f"features.{index[head]}.{rest}"] = v
    cir["pool.p"] = torch.tensor([3.1])
    cir["whiten.weight"] = torch.randn(4, 32)
    cir["whiten.bias"] = torch.randn(4)
    path = tmp_path / "retrievalSfM120k-resnet.pth"
    torch.save({"state_dict": cir, "meta": {"architecture": "resnet101", "pooling": "gem"}}, path)
    dst2 = ResNet(cfg)
    report = load_backbone_weights(dst2, path)
    assert report.ok and len(report.loaded) == len(dst2.state_dict())
    assert sorted(report.dropped) == ["pool.p", "whiten.bias", "whiten.weight"]
    x = torch.randn(1, 3, 45, 61)
    src.eval(), dst2.eval()
    with torch.no_grad():
        torch.testing.assert_close(dst2.forward_features(x), src.forward_features(x), rtol=0, atol=0)


def test_missing_unexpected_and_mismatched_keys(timm_checkpoint):
    sd = dict(timm_checkpoint)
    del sd["stages.2.blocks.3.conv1.conv.weight"]
    sd["stages.9.extra.weight"] = torch.zeros(3)
    sd["stem.conv1.bn.weight"] = torch.zeros(31)
    model = CSPDarknet53()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        load_backbone_weights(model, sd)
    msg = str(info.value)
    assert "stages.2.blocks.3.conv1.conv.weight" in msg and "stages.9.extra.weight" in msg
    assert "stem.conv1.bn.weight checkpoint (31,) vs model (32,)" in msg and "strict=False" in msg
    for k, v in model.state_dict().items():  # strict failure loads nothing
        assert torch.equal(v, before[k]), k
    report = load_backbone_weights(model, sd, strict=False)
    assert report.missing == ["stem.conv1.bn.weight", "stages.2.blocks.3.conv1.conv.weight"]  # model order
    assert report.unexpected == ["stages.9.extra.weight"]
    assert report.mismatched == [("stem.conv1.bn.weight", (31,), (32,))]
    assert torch.equal(model.state_dict()["stages.4.conv_transition.conv.weight"],
                       timm_checkpoint["stages.4.conv_transition.conv.weight"])
    assert torch.equal(model.state_dict()["stages.2.blocks.3.conv1.conv.weight"],
                       before["stages.2.blocks.3.conv1.conv.weight"])


def test_missing_num_batches_tracked_is_tolerated(timm_checkpoint):
    sd = {k: v for k, v in timm_checkpoint.items() if not k.endswith("num_batches_tracked")}
    report = load_backbone_weights(CSPDarknet53(), sd)
    assert report.ok and len(report.loaded) == 402 - 67  # 67 ConvNormAct layers


def test_wrong_architecture_is_rejected(timm_checkpoint):
    with pytest.raises(ValueError, match="no key .* matches ResNet"):
        load_backbone_weights(ResNet(ResNetCfg(layers=(1, 1, 1, 1), width=8)), timm_checkpoint, strict=False)


def test_sha256_checks_and_local_file_errors(tmp_path, timm_checkpoint):
    path = save_safetensors(timm_checkpoint, tmp_path / "w.safetensors")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_backbone_weights(CSPDarknet53(), path, sha256=digest).ok
    assert load_backbone_weights(CSPDarknet53(), path, sha256=digest[:10].upper()).ok
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    with pytest.raises(ValueError, match="sha256 mismatch"):
        load_backbone_weights(CSPDarknet53(), path, sha256=wrong)
    with pytest.raises(ValueError, match="sha256 must be a hex digest"):
        load_backbone_weights(CSPDarknet53(), path, sha256="xyz")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_backbone_weights(CSPDarknet53(), tmp_path / "nope.safetensors")
    with pytest.raises(TypeError, match="source"):
        load_backbone_weights(CSPDarknet53(), 123)
    with pytest.raises(TypeError, match="model"):
        load_backbone_weights("cspdarknet53", path)
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_backbone_weights(CSPDarknet53(), bad)


def test_file_url_is_downloaded_once_into_cache(tmp_path, timm_checkpoint, monkeypatch):
    import pylandmark.data.download as download
    from pylandmark.models.weights import url_cache_path

    src = save_safetensors(timm_checkpoint, tmp_path / "cspdarknet53_ra.safetensors")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    monkeypatch.setattr(download, "cache_dir", lambda: cache)
    calls = []
    real = download.download_url
    monkeypatch.setattr(download, "download_url", lambda *a, **k: calls.append(a) or real(*a, **k))
    url = src.as_uri()
    model = CSPDarknet53()
    assert load_backbone_weights(model, url, sha256=digest, progress=False).ok
    cached = url_cache_path(url)  # one folder per URL under <cache>/checkpoints/by-url
    assert cached.name == "cspdarknet53_ra.safetensors" and cached.parent.parent == cache / "checkpoints" / "by-url"
    assert cached.is_file() and hashlib.sha256(cached.read_bytes()).hexdigest() == digest
    assert len(calls) == 1
    src.unlink()  # second time the cache is used, no download
    report = load_backbone_weights(CSPDarknet53(), url, sha256=digest, progress=False)
    assert report.source == str(cached) and len(calls) == 1
    assert_backbone_equals(model, timm_checkpoint)


class FileServer:
    """Serves the files under ``root`` on 127.0.0.1; counts the GET requests."""

    def __init__(self, root):
        self.root, self.gets = root, 0
        outer = self

        class Quiet(http.server.SimpleHTTPRequestHandler):  # no request logging on stderr
            def log_message(self, *args):
                pass

            def do_GET(self):
                outer.gets += 1
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     functools.partial(Quiet, directory=str(root)))
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def file_servers(tmp_path):
    """``start()`` -> a new FileServer on its own port, serving its own folder."""
    servers = []

    def start():
        root = tmp_path / f"www{len(servers)}"
        root.mkdir()
        servers.append(FileServer(root))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def http_server(file_servers):
    server = file_servers()
    return server.root, server.base


def test_http_url_and_offline_error(tmp_path, http_server):
    from pylandmark.models.weights import url_cache_path

    root, base = http_server
    torch.manual_seed(2)
    src = ResNet(ResNetCfg(layers=(1, 1, 1, 1), width=8), num_classes=5)
    torch.save(src.state_dict(), root / "resnet_tiny.pth")
    dst = ResNet(ResNetCfg(layers=(1, 1, 1, 1), width=8))
    url = f"{base}/resnet_tiny.pth"
    report = load_backbone_weights(dst, url, cache_dir=tmp_path / "c", progress=False)
    assert report.ok and url_cache_path(url, tmp_path / "c").is_file()
    assert url_cache_path(url, tmp_path / "c").is_relative_to(tmp_path / "c")
    for k, v in dst.state_dict().items():
        assert torch.equal(v, src.state_dict()[k])
    # nothing listens on this port: the error says where to put the file by hand
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/weights.pth"
    dest = url_cache_path(url, tmp_path / "c")
    with pytest.raises(OSError) as info:
        load_backbone_weights(dst, url, cache_dir=tmp_path / "c", progress=False)
    assert str(dest) in str(info.value) and "put it at" in str(info.value)


# ---- the download cache is keyed by the URL, not by the file name (issue 26) ------------------

TINY_RESNET = ResNetCfg(layers=(1, 1, 1, 1), width=8)


def tiny_state(seed):
    torch.manual_seed(seed)
    return ResNet(TINY_RESNET).state_dict()


def assert_state(model, sd):
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_two_urls_with_the_same_file_name_are_cached_apart(file_servers, tmp_path, monkeypatch):
    """Two hosts serve different weights under one file name: each URL gets its own bytes (the
    old cache, keyed by the file name, gave the second URL the first one's file)."""
    import pylandmark.data.download as download
    import pylandmark.models.pretrained as pretrained
    from pylandmark.models.weights import _resolve, url_cache_path

    monkeypatch.setattr(download, "cache_dir", lambda: tmp_path / "cache")
    one, two = file_servers(), file_servers()
    sd1, sd2 = tiny_state(1), tiny_state(2)
    torch.save(sd1, one.root / "weights.pth")
    torch.save(sd2, two.root / "weights.pth")
    url1, url2 = f"{one.base}/weights.pth", f"{two.base}/weights.pth"

    first, second = ResNet(TINY_RESNET), ResNet(TINY_RESNET)
    assert load_backbone_weights(first, url1, progress=False).ok
    assert load_backbone_weights(second, url2, progress=False).ok
    assert_state(first, sd1)
    assert_state(second, sd2)
    assert one.gets == 1 and two.gets == 1
    path1, path2 = _resolve(url1, None, None, False), _resolve(url2, None, None, False)
    assert path1 != path2 and path1.name == path2.name == "weights.pth"
    assert path1.read_bytes() == (one.root / "weights.pth").read_bytes()
    assert path2.read_bytes() == (two.root / "weights.pth").read_bytes()
    assert path1 == url_cache_path(url1) and path1.is_relative_to(tmp_path / "cache" / "checkpoints")
    # another path on the same host is another file too
    (one.root / "v2").mkdir()
    torch.save(sd2, one.root / "v2" / "weights.pth")
    assert _resolve(f"{one.base}/v2/weights.pth", None, None, False).read_bytes() == path2.read_bytes()
    # each is then used from the cache, without a request (offline: the servers are gone)
    gets = one.gets, two.gets
    one.close(), two.close()
    again = ResNet(TINY_RESNET)
    assert load_backbone_weights(again, url2, progress=False).source == str(path2)
    assert_state(again, sd2)
    assert (one.gets, two.gets) == gets
    # --weights URL goes through the same cache
    seen = []
    monkeypatch.setattr(pretrained, "_from_file", lambda path, source, progress: seen.append(path))
    pretrained.load_pretrained(url1, progress=False)
    pretrained.load_pretrained(url2, progress=False)
    assert seen == [path1, path2]


def test_a_url_whose_name_carries_a_hash_is_cached_by_name_and_checked(file_servers, tmp_path, monkeypatch):
    """``name-<sha256 prefix>.pth`` (torch.hub, cirtorch): the bytes are checked against the name,
    so the name alone keys the cache (shared with the presets' files); bytes that do not match
    the name are refused and never cached."""
    import pylandmark.data.download as download
    import pylandmark.models.pretrained as pretrained
    from pylandmark.models.weights import url_cache_path

    cache = tmp_path / "cache"
    monkeypatch.setattr(download, "cache_dir", lambda: cache)
    good, bad = file_servers(), file_servers()
    torch.save(tiny_state(3), good.root / "tmp.pth")
    digest = hashlib.sha256((good.root / "tmp.pth").read_bytes()).hexdigest()
    name = f"tiny-{digest[:8]}.pth"
    (good.root / "tmp.pth").rename(good.root / name)
    torch.save(tiny_state(4), bad.root / name)  # other bytes under the same hashed name
    url_good, url_bad = f"{good.base}/{name}", f"{bad.base}/{name}"
    assert url_cache_path(url_good) == url_cache_path(url_bad) == cache / "checkpoints" / name

    # the wrong bytes first: refused by the hash in the name, nothing cached
    seen = []
    monkeypatch.setattr(pretrained, "_from_file", lambda path, source, progress: seen.append(path))
    with pytest.raises(ValueError, match="sha256") as err:
        pretrained.load_pretrained(url_bad, progress=False)
    assert url_bad in str(err.value) and digest[:8] in str(err.value)
    assert not (cache / "checkpoints" / name).exists() and seen == []
    with pytest.raises(ValueError, match="sha256"):
        load_backbone_weights(ResNet(TINY_RESNET), url_bad, progress=False)
    # the right bytes are cached under the name, and then serve either URL (they are checked)
    model = ResNet(TINY_RESNET)
    assert load_backbone_weights(model, url_good, progress=False).source == str(cache / "checkpoints" / name)
    assert_state(model, tiny_state(3))
    gets = bad.gets
    pretrained.load_pretrained(url_bad, progress=False)
    assert seen == [cache / "checkpoints" / name] and bad.gets == gets
    # a cached file that no longer matches its name is fetched again
    (cache / "checkpoints" / name).write_bytes(b"corrupt")
    assert load_backbone_weights(ResNet(TINY_RESNET), url_good, progress=False).ok
    assert hashlib.sha256((cache / "checkpoints" / name).read_bytes()).hexdigest() == digest
