"""The real service in a subprocess on a loopback port, spoken to with a real HTTP client: answers
against the CLI's --json and a float64 brute-force search, thumbnails, and 4xx errors that leave
the worker alive."""
from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402
from serve_util import SIZE, Server, brute_force_topk, build_index, listening_addresses, tiny_weights  # noqa: E402

MAX_UPLOAD_MB = 4  # the PNU photos are at most 1.7 MB


@pytest.fixture(scope="module")
def pnu(shared_data) -> Path:
    return shared_data / "pnu_landmarks"


@pytest.fixture(scope="module")
def setup(pnu, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    weights = tiny_weights(d)
    index = build_index(pnu, weights, d / "pnu.plmi")
    return weights, index, d


@pytest.fixture(scope="module")
def server(setup):
    weights, index, d = setup
    srv = Server(index, "--max-upload-mb", str(MAX_UPLOAD_MB), "--max-images", "4", "--max-k", "20",
                 "--max-pixels", "50000000", "--threads", "1", log=d / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def photos(pnu: Path) -> list[Path]:
    return sorted((pnu / "test").rglob("*.png"))


def upload(path: Path) -> tuple:
    return ("image", (path.name, path.read_bytes(), "image/png"))


def cli_json(capsys, *argv) -> list:
    from pylandmark.cli import main

    assert main([str(a) for a in argv] + ["--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


# ---- answers --------------------------------------------------------------------------------

def test_health_and_info(client, setup):
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert info["index"]["count"] == 35 and info["index"]["classes"] == 5 and info["index"]["memory_mapped"]
    assert info["index"]["labels"] == {c: 7 for c in ("cse", "hh", "rg", "wb", "wjj")}
    assert info["network"]["image_size"] == SIZE and info["network"]["dim"] == 48
    assert info["limits"]["max_upload_bytes"] == MAX_UPLOAD_MB << 20 and info["limits"]["max_k"] == 20
    assert str(setup[2]) not in json.dumps(info)  # no server paths in the answer


def test_recognize_scores_are_the_exact_top_k(client, pnu, setup):
    """Each photo's neighbours are the float64 brute-force top-5 of plm.extract's descriptor.
    Tolerance: the service's and extract's float16 descriptors may differ by one float16 step
    per entry (<= 2^-11 for |v| < 1, see test_serve_batching); by Cauchy-Schwarz against a unit
    db row that moves a score by at most sqrt(48) * 2^-11 = 3.4e-3."""
    weights, index, _ = setup
    for photo in photos(pnu)[::3]:
        r = client.post("/recognize", files=[upload(photo)])
        assert r.status_code == 200, r.text
        (res,) = r.json()
        assert res["query"] == photo.name and res["known"] is True
        want_scores, want_ids = brute_force_topk(weights, index, photo, 5)
        got = res["neighbours"]
        np.testing.assert_allclose([h["score"] for h in got], want_scores, atol=3.5e-3)
        for j, h in enumerate(got):
            # an id may differ from the reference only where two scores are that close
            if h["id"] != want_ids[j]:
                assert abs(want_scores[j] - h["score"]) < 3.5e-3
            assert h["label"] == Path(h["path"]).parent.name
        votes = sum(h["label"] == res["label"] for h in got)
        assert res["votes"] == votes and res["confidence"] == pytest.approx(votes / 5)


def test_the_json_is_the_clis(client, pnu, setup, capsys):
    weights, index, _ = setup
    photo = photos(pnu)[4]
    got = client.post("/recognize", params={"k": 4, "vote": "weighted"}, files=[upload(photo)]).json()
    want = cli_json(capsys, "recognize", index, photo, "-k", 4, "--vote", "weighted")
    assert len(got) == len(want) == 1
    g, w = got[0], want[0]
    # the CLI adds "truth" for a query in a class folder; an upload has no folder
    assert g.keys() == w.keys() - {"truth"} and g["query"] == Path(w["query"]).name
    assert [h.keys() for h in g["neighbours"]] == [h.keys() for h in w["neighbours"]]
    if [h["id"] for h in g["neighbours"]] == [h["id"] for h in w["neighbours"]]:
        assert (g["label"], g["votes"], g["known"]) == (w["label"], w["votes"], w["known"])
        assert g["confidence"] == pytest.approx(w["confidence"], abs=3.5e-3)
    got = client.post("/search", params={"k": 7}, files=[upload(photo)]).json()
    want = cli_json(capsys, "search", index, photo, "-k", 7)
    assert got[0].keys() == want[0].keys()
    assert [h.keys() for h in got[0]["neighbours"]] == [h.keys() for h in want[0]["neighbours"]]
    assert [h["rank"] for h in got[0]["neighbours"]] == list(range(1, 8))
    np.testing.assert_allclose([h["score"] for h in got[0]["neighbours"]],
                               [h["score"] for h in want[0]["neighbours"]], atol=3.5e-3)


def test_raw_body_and_several_photos_give_the_same_answers(client, pnu):
    ps = photos(pnu)[1:4]
    singles = [client.post("/search", content=p.read_bytes(), headers={"content-type": "image/png"}).json()[0]
               for p in ps]
    assert all(s["query"] == "image0" for s in singles)
    many = client.post("/search", files=[upload(p) for p in ps])
    assert many.status_code == 200
    many = many.json()
    assert [m["query"] for m in many] == [p.name for p in ps]
    for s, m in zip(singles, many):
        assert [h["id"] for h in s["neighbours"]] == [h["id"] for h in m["neighbours"]]
        np.testing.assert_allclose([h["score"] for h in s["neighbours"]], [h["score"] for h in m["neighbours"]],
                                   atol=3.5e-3)


def test_thumbnails_are_the_indexed_photos(client, setup):
    import pylandmark as plm

    index = plm.Index.load(setup[1])
    for i in (0, 17, 34):
        image_id, path = int(index.ids[i]), index.paths[i]
        r = client.get(f"/images/{image_id}", params={"size": 96})
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        thumb = Image.open(io.BytesIO(r.content))
        with Image.open(path) as orig:
            w, h = orig.size
            ref = orig.convert("RGB")
        assert max(thumb.size) == 96 and thumb.size[0] / thumb.size[1] == pytest.approx(w / h, rel=0.05)
        # same picture: mean colour within JPEG and resampling error of the original's
        ref.thumbnail((96, 96))
        ref = ref.resize(thumb.size)
        diff = np.abs(np.asarray(thumb, np.float32) - np.asarray(ref, np.float32)).mean()
        assert diff < 12, diff
    assert client.get("/images/99999").status_code == 404
    assert client.get("/images/99999").json()["error"].startswith("no indexed photo")
    assert client.get("/images/..%2F..%2Fetc%2Fpasswd").status_code in (400, 404)
    assert client.get("/images/3", params={"size": 5000}).status_code == 400


def test_page_and_its_assets(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js">' in r.text and "script-src 'self'" in r.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
    assert client.get("/static/serve.log").status_code == 404


# ---- bad requests ---------------------------------------------------------------------------

def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming width x height, then a bit of IDAT: a decompression bomb's
    header (nothing has to be decoded to know it is too large)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))


@pytest.mark.parametrize("case", ["text", "empty", "truncated", "bomb_over_limit", "bomb_huge", "too_big_body",
                                  "too_big_chunked", "too_many", "no_image_field", "text_field", "no_boundary"])
def test_bad_uploads_get_4xx_json(client, pnu, case):
    photo = photos(pnu)[0]
    big = b"\0" * ((MAX_UPLOAD_MB << 20) + 1000)
    if case == "text":
        r = client.post("/recognize", files=[("image", ("notes.txt", b"hello, not a photo", "text/plain"))])
        status, words = 400, "notes.txt is not an image"
    elif case == "empty":
        r = client.post("/recognize", content=b"")
        status, words = 400, "no image"
    elif case == "truncated":
        data = photo.read_bytes()
        r = client.post("/recognize", files=[("image", ("half.png", data[: len(data) // 2], "image/png"))])
        status, words = 400, "half.png is unreadable"
    elif case == "bomb_over_limit":  # 60 Mpx: over this server's --max-pixels, under PIL's own limit
        r = client.post("/recognize", files=[("image", ("bomb.png", png_header(10000, 6000), "image/png"))])
        status, words = 413, "10000 x 6000 pixels"
    elif case == "bomb_huge":
        r = client.post("/recognize", files=[("image", ("bomb.png", png_header(100000, 100000), "image/png"))])
        status, words = 413, "too large"
    elif case == "too_big_body":
        r = client.post("/recognize", content=big, headers={"content-type": "image/png"})
        status, words = 413, "--max-upload-mb"
    elif case == "too_big_chunked":  # no Content-Length: counted while reading
        r = client.post("/recognize", content=iter([big[:1 << 20]] * (MAX_UPLOAD_MB + 1)))
        status, words = 413, "--max-upload-mb"
    elif case == "too_many":
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (200, 80, 10)).save(buf, "PNG")
        r = client.post("/search", files=[("image", ("small.png", buf.getvalue(), "image/png"))] * 5)
        status, words = 400, "files"
    elif case == "no_image_field":
        r = client.post("/search", files=[("photo", ("a.png", photo.read_bytes(), "image/png"))])
        status, words = 400, "unexpected form field 'photo'"
    elif case == "text_field":
        r = client.post("/search", files={"image": (None, "just text")})
        status, words = 400, "must be a file upload"
    else:
        r = client.post("/search", content=b"--x\r\n garbage", headers={"content-type": "multipart/form-data"})
        status, words = 400, "boundary"
    assert r.status_code == status, r.text
    body = r.json()
    assert body["status"] == status and words in body["error"] and "\n" not in body["error"], body


@pytest.mark.parametrize("params,words", [
    ({"k": 0}, "k must be in [1, 20]"), ({"k": 21}, "k must be in [1, 20]"), ({"k": "five"}, "k must be an integer"),
    ({"vote": "loudest"}, "vote must be one of majority, weighted"), ({"min_score": "nan"}, "min_score must be finite"),
    ({"min_score": "high"}, "min_score must be a number"), ({"kk": 3}, "unknown query parameter 'kk'"),
])
def test_wrong_parameters_get_400_naming_them(client, pnu, params, words):
    r = client.post("/recognize", params=params, files=[upload(photos(pnu)[0])])
    assert r.status_code == 400 and words in r.json()["error"], r.text


def test_min_score_answers_unknown(client, pnu):
    (res,) = client.post("/recognize", params={"min_score": 1.5}, files=[upload(photos(pnu)[2])]).json()
    assert res["label"] == "unknown" and res["known"] is False


def test_wrong_method_and_path_are_json(client):
    assert client.get("/recognize").status_code == 405 and "error" in client.get("/recognize").json()
    r = client.get("/no/such/thing")
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]


def test_the_worker_survives_bad_requests(client, pnu, server):
    """After every kind of bad request above, the same worker process answers correctly."""
    pid = client.get("/info").json()["worker"]["pid"]
    for _ in range(3):
        client.post("/recognize", content=b"\x89PNG\r\n\x1a\n garbage")
        client.post("/recognize", content=png_header(100000, 100000))
    r = client.post("/recognize", files=[upload(photos(pnu)[5])])
    assert r.status_code == 200 and r.json()[0]["neighbours"]
    assert client.get("/info").json()["worker"]["pid"] == pid == server.proc.pid
    assert server.proc.poll() is None


def test_binds_loopback_by_default_and_says_so(server):
    addrs = listening_addresses(server.port)
    if not Path("/proc/net/tcp").is_file():
        pytest.skip("no /proc/net/tcp to read the listening address from")
    assert addrs == ["127.0.0.1"], addrs
    assert "listening on 127.0.0.1 only: other machines cannot connect" in server.text()


# ---- start-up -------------------------------------------------------------------------------

def test_missing_extras_name_the_pip_command(monkeypatch, capsys, setup):
    import importlib.util

    from pylandmark.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert main(["serve", str(setup[1]), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "pylandmark[serve]"' in err and "uvicorn" in err


def test_start_up_errors_are_one_line(setup, tmp_path, capsys):
    """A network that does not fit the index, or a port in use, fails before serving."""
    from pylandmark.cli import main

    weights, index, _ = setup
    assert main(["serve", str(index), "--weights", "random", "--quiet", "--port", "8123"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (and the random warning)
    assert len(errors) == 1 and "1024-d descriptors but the index holds 48-d" in errors[0]
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", str(index), "--quiet", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and err.count("\n") == 1


@pytest.mark.slow
def test_two_workers_share_the_index_and_agree(setup, pnu, tmp_path):
    """--workers 2: two processes, each with its own network, same answers."""
    weights, index, _ = setup
    srv = Server(index, "--workers", "2", "--threads", "1", log=tmp_path / "w2.log")
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            photo = photos(pnu)[7]
            answers = [c.post("/search", files=[upload(photo)]).json() for _ in range(6)]
            info = c.get("/info").json()
        assert info["worker"]["workers"] == 2 and info["index"]["memory_mapped"]
        ids = {tuple(h["id"] for h in a[0]["neighbours"]) for a in answers}
        assert len(ids) == 1
    finally:
        srv.stop()


# ---- who may ask ----------------------------------------------------------------------------

def test_foreign_host_headers_are_refused(client, server):
    """DNS rebinding: a web page whose name now points at 127.0.0.1 sends its own name as Host;
    the service answers 400 (naming the option that allows a name) and leaks nothing (on 2229dde
    every Host was answered)."""
    port = server.port
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", ""):
        r = client.get("/info", headers={"Host": host})
        assert r.status_code == 400, host
        assert "--allowed-host" in r.json()["error"] and "index" not in r.json()
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}"):
        assert client.get("/health", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_rules():
    import socket

    from pylandmark.serve.hosts import allowed_hosts, host_of

    assert host_of("[::1]:8000") == "::1" and host_of("Example.COM:80") == "example.com"
    assert host_of("::1") == "::1" and host_of("localhost") == "localhost"
    loop = allowed_hosts("127.0.0.1", ["Photos.Lan"])
    assert {"127.0.0.1", "localhost", "::1", "photos.lan"} <= loop and socket.gethostname().lower() not in loop
    assert socket.gethostname().lower() in allowed_hosts("0.0.0.0")  # a wildcard answers this machine's names
    assert allowed_hosts("127.0.0.1", ["*"]) is None


def test_an_exposed_service_warns_even_when_quiet(setup, tmp_path):
    """--host 0.0.0.0 --quiet: the warning that the unauthenticated service is reachable from other
    machines is printed (warnings are not progress; on 2229dde --quiet hid it)."""
    weights, index, _ = setup
    srv = Server(index, "--host", "0.0.0.0", "--quiet", "--threads", "1", log=tmp_path / "exposed.log")
    try:
        assert "reachable from other machines" in srv.text()
        with httpx.Client(base_url=srv.url, timeout=60) as c:  # the machine's own name is answered
            import socket

            assert c.get("/health", headers={"Host": socket.gethostname()}).status_code == 200
    finally:
        srv.stop()
