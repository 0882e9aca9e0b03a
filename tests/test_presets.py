"""Weight presets: the registry against the published list, the download into the cache (a
local HTTP server started here; nothing leaves the machine), the torch.hub-style hash check,
offline use from the cache and the one-line error before, and the CLI (`pylandmark models`,
`--weights NAME`, `--scales`, `--whitening`)."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import json
import math
import socket
import threading

import cirtorch_ref as ref
import numpy as np
import pytest
import torch

import pylandmark as plm
from pylandmark.cli import main, parse_scales
from pylandmark.models import LandmarkNet, from_cirtorch, load_network
from pylandmark.models.presets import CIRTORCH_BASE_URL, WEIGHT_PRESETS, hub_hash
from pylandmark.models.pretrained import WeightsHashMismatch, WeightsNotFound

NAME = "retrievalSfM120k-vgg16-gem"
LW = "retrieval-SfM-120k"
MS_UP = (1.0, math.sqrt(2.0), 1.0 / math.sqrt(2.0))


def test_registry_matches_the_published_list():
    """Names, files and hashes as cirtorch publishes them (issue 19), and the published mAP."""
    files = {
        "retrievalSfM120k-vgg16-gem": "retrieval-SfM-120k/retrievalSfM120k-vgg16-gem-b4dcdc6.pth",
        "retrievalSfM120k-resnet101-gem": "retrieval-SfM-120k/retrievalSfM120k-resnet101-gem-b80fb85.pth",
        "rSfM120k-tl-resnet50-gem-w": "retrieval-SfM-120k/rSfM120k-tl-resnet50-gem-w-97bf910.pth",
        "rSfM120k-tl-resnet101-gem-w": "retrieval-SfM-120k/rSfM120k-tl-resnet101-gem-w-a155e54.pth",
        "rSfM120k-tl-resnet152-gem-w": "retrieval-SfM-120k/rSfM120k-tl-resnet152-gem-w-f39cada.pth",
        "gl18-tl-resnet50-gem-w": "gl18/gl18-tl-resnet50-gem-w-83fdc30.pth",
        "gl18-tl-resnet101-gem-w": "gl18/gl18-tl-resnet101-gem-w-a4d43db.pth",
        "gl18-tl-resnet152-gem-w": "gl18/gl18-tl-resnet152-gem-w-21278d5.pth",
    }
    assert set(WEIGHT_PRESETS) == {*files, "cspdarknet53-imagenet"}
    for name, file in files.items():
        p = WEIGHT_PRESETS[name]
        assert p.kind == "cirtorch" and p.url == CIRTORCH_BASE_URL + file
        assert p.sha256 == file.rsplit("-", 1)[1][:-4] == hub_hash(p.url) and len(p.sha256) == 7
        assert p.architecture in file and p.dim == ref.DIMS[p.architecture]
        assert p.filename == file.split("/")[1] and p.image_size == 1024
        if name.endswith("-w"):
            assert p.whitening == "end-to-end" and p.eval_whitening is None
            assert p.eval_scales == pytest.approx(MS_UP)
        else:
            assert p.eval_whitening == LW and p.eval_scales == pytest.approx((1, 2 ** -0.5, 0.5))
    published = {"retrievalSfM120k-vgg16-gem": (60.9, 32.9, 69.3, 44.2),
                 "retrievalSfM120k-resnet101-gem": (65.4, 40.1, 76.7, 55.2),
                 "gl18-tl-resnet101-gem-w": (67.3, 44.3, 80.6, 61.5)}
    for name, (om, oh, pm, ph) in published.items():
        assert WEIGHT_PRESETS[name].accuracy == {"roxford5k/medium": om, "roxford5k/hard": oh,
                                                 "rparis6k/medium": pm, "rparis6k/hard": ph}
    assert WEIGHT_PRESETS["cspdarknet53-imagenet"].kind == "backbone"


@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    requests = []

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state = {"root": root, "base": f"http://127.0.0.1:{server.server_address[1]}", "requests": requests}

    def stop():
        if not state.get("stopped"):
            server.shutdown()
            server.server_close()
            state["stopped"] = True

    state["stop"] = stop
    yield state
    stop()


@pytest.fixture(scope="module")
def vgg_ckpt():
    return ref.make_checkpoint("vgg16", seed=21, p=3.2, lw_names=(LW,))


@pytest.fixture
def served(http_server, vgg_ckpt, tmp_path, monkeypatch):
    """The vgg16 preset pointed at a checkpoint served on 127.0.0.1, named torch.hub-style with
    the start of its own SHA-256; an empty cache."""
    src = tmp_path / "src.pth"
    torch.save(vgg_ckpt, src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    fname = f"{NAME}-{digest[:7]}.pth"
    src.rename(http_server["root"] / fname)
    preset = dataclasses.replace(WEIGHT_PRESETS[NAME], url=f"{http_server['base']}/{fname}", sha256=digest[:7],
                                 filename="")
    assert preset.filename == fname
    monkeypatch.setitem(WEIGHT_PRESETS, NAME, preset)
    monkeypatch.setenv("PYLANDMARK_CACHE", str(tmp_path / "cache"))
    return {**http_server, "preset": preset, "digest": digest, "file": http_server["root"] / fname}


def _same_weights(a: LandmarkNet, b: LandmarkNet) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_preset_download_is_checked_cached_and_works_offline(served, vgg_ckpt, capsys):
    expected = from_cirtorch(vgg_ckpt)
    net = LandmarkNet.from_pretrained(NAME, progress=False)
    cached = served["preset"].cached_path
    assert cached.is_file() and hashlib.sha256(cached.read_bytes()).hexdigest() == served["digest"]
    assert [f.name for f in cached.parent.iterdir()] == [cached.name]  # no partial or staging file left
    assert _same_weights(net, expected) and LW in net.whitenings
    assert len(served["requests"]) == 1
    served["stop"]()  # offline from now on
    again = load_network(NAME, progress=False)
    assert not again.training and _same_weights(again, expected)
    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[NAME]["cached"] is True and rows[NAME]["path"] == str(cached)
    assert rows["gl18-tl-resnet101-gem-w"]["cached"] is False
    assert rows["gl18-tl-resnet101-gem-w"]["accuracy"]["rparis6k/hard"] == 61.5
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert f"{NAME}  [cached]" in text and "gl18-tl-resnet101-gem-w  [not cached]" in text
    assert "--scales '1,sqrt(2),1/sqrt(2)'" in text and "--whitening retrieval-SfM-120k" in text


def test_hash_mismatch_after_download_names_both_hashes(served, monkeypatch):
    wrong = "0000000" if not served["digest"].startswith("0000000") else "1111111"
    monkeypatch.setitem(WEIGHT_PRESETS, NAME, dataclasses.replace(served["preset"], sha256=wrong))
    with pytest.raises(WeightsHashMismatch) as info:
        load_network(NAME, progress=False)
    msg = str(info.value)
    kept = served["preset"].cached_path.with_name(served["preset"].filename + ".download")
    assert "\n" not in msg and wrong in msg and served["digest"] in msg
    assert "if you trust this file pass it by path" in msg and str(kept) in msg
    assert kept.is_file() and not served["preset"].cached_path.exists()
    trusted = load_network(str(kept), progress=False)  # by path: the user's decision, no hash check
    assert LW in trusted.whitenings
    with pytest.raises(WeightsHashMismatch):  # a second try downloads afresh and fails the same way
        load_network(NAME, progress=False)
    assert len(served["requests"]) == 2


def test_corrupt_cached_file_is_refused(served):
    load_network(NAME, progress=False)
    cached = served["preset"].cached_path
    with open(cached, "ab") as f:
        f.write(b"\0")
    with pytest.raises(WeightsHashMismatch, match="the cached file .* delete it to download it again"):
        LandmarkNet.from_pretrained(NAME)


def test_offline_before_download_is_one_clear_line(served, monkeypatch, capsys, tmp_path):
    served["stop"]()
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{served['preset'].filename}"
    monkeypatch.setitem(WEIGHT_PRESETS, NAME, dataclasses.replace(served["preset"], url=url))
    with pytest.raises(WeightsNotFound) as info:
        load_network(NAME, progress=False)
    msg = str(info.value)
    assert "\n" not in msg and url in msg and f"put it at {served['preset'].cached_path}" in msg
    photo = ref.write_photos(tmp_path, [(40, 30)])[0]
    code = main(["extract", str(photo), "--out", str(tmp_path / "d.npy"), "--weights", NAME, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and url in err


def test_cli_weights_scales_and_whitening(served, tmp_path, capsys):
    photos = ref.write_photos(tmp_path / "db" / "a", [(70, 52), (45, 61)], seed=1) + \
        ref.write_photos(tmp_path / "db" / "b", [(66, 50)], seed=2)
    net = load_network(NAME, progress=False)
    want = plm.extract(net, photos, image_size=48, scales=MS_UP, whitening=LW, progress=False)
    out = tmp_path / "d.npy"
    assert main(["extract", *map(str, photos), "--out", str(out), "--weights", NAME, "--image-size", "48",
                 "--scales", "1, sqrt(2), 1/sqrt(2)", "--whitening", LW, "--quiet"]) == 0
    assert np.array_equal(np.load(out), want)
    # the index records scales and whitening; search uses them unless told otherwise
    index = tmp_path / "i.plmi"
    assert main(["index", "build", str(tmp_path / "db"), "--labels-from-folders", "--weights", NAME,
                 "--image-size", "48", "--scales", "1,1.4142135623730951,0.7071067811865476",
                 "--whitening", LW, "--out", str(index), "--quiet"]) == 0
    meta = plm.Index.load(index).metadata
    assert meta["weights"] == NAME and meta["whitening"] == LW and meta["scales"] == pytest.approx(MS_UP)
    capsys.readouterr()
    assert main(["search", str(index), str(photos[0]), "-k", "3", "--json", "--quiet"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["neighbours"]
    row = {str(p): j for j, p in enumerate(photos)}

    def check(hits, desc):  # the scores are the float32 dot products of the API's descriptors
        d = desc.astype(np.float32)
        for h in hits:
            assert h["score"] == pytest.approx(float(d[row[h["path"]]] @ d[0]), abs=1e-3)

    assert len(hits) == 3 and hits[0]["path"] == str(photos[0])
    check(hits, want)
    # --whitening none overrides the index's recorded one for the query
    assert main(["search", str(index), str(photos[0]), "-k", "3", "--json", "--quiet", "--whitening",
                 "none"]) == 0
    plain = json.loads(capsys.readouterr().out)[0]["neighbours"]
    raw = plm.extract(net, [photos[0]], image_size=48, scales=MS_UP, progress=False)
    for h in plain:
        d = want[row[h["path"]]].astype(np.float32)
        assert h["score"] == pytest.approx(float(d @ raw[0].astype(np.float32)), abs=1e-3)
    assert abs(plain[1]["score"] - hits[1]["score"]) > 1e-2


def test_scales_options_conflict():
    from pylandmark.cli import build_parser
    from pylandmark.cli.commands import _opts

    args = build_parser().parse_args(["extract", "x.jpg", "--out", "o.npy", "--multiscale", "--scales", "1"])
    with pytest.raises(ValueError, match="--multiscale and --scales both given"):
        _opts(args)
    args = build_parser().parse_args(["extract", "x.jpg", "--out", "o.npy", "--multiscale", "--whitening", "None"])
    opts = _opts(args)
    assert opts.scales == pytest.approx((1, 2 ** -0.5, 0.5)) and opts.whitening is None


def test_parse_scales():
    assert parse_scales("1,0.7071,0.5") == (1.0, 0.7071, 0.5)
    assert parse_scales("1, sqrt(2), 1/sqrt(2)") == pytest.approx(MS_UP)
    assert parse_scales("1/2,.25,2e-1") == (0.5, 0.25, 0.2)
    for bad, words in [("1,abc", "cannot read 'abc'"), ("__import__('os')", "cannot read"),
                       ("1/0", "division by zero"), ("0", "(0, 4]"), ("5", "(0, 4]"), ("", "cannot read")]:
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("]", r"\]")):
            parse_scales(bad)
