"""download_url against a local HTTP server on 127.0.0.1 (never the network)."""
from __future__ import annotations

import hashlib
import http.server
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from pylandmark.data.download import ChecksumError, DownloadError, cache_dir, download_url


class Server:
    """Serves ``files`` (name -> bytes) with optional Range support; records every request."""

    def __init__(self, files):
        self.files = dict(files)
        self.requests = []  # (path, Range header or None)
        self.sent = 0  # body bytes sent
        self.honour_range = True
        self.cut_after = None  # send only this many body bytes, then close
        self.endless = False  # no Content-Length, zeros until the client hangs up
        self.drip_s = None  # send the body one byte per this many seconds
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.lstrip("/")
                rng = self.headers.get("Range")
                outer.requests.append((name, rng))
                if outer.endless:
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.close_connection = True
                    try:
                        while outer.sent < 1 << 32:
                            self.wfile.write(bytes(1 << 16))
                            outer.sent += 1 << 16
                    except OSError:
                        pass
                    return
                if name not in outer.files:
                    self.send_error(404, "not here")
                    return
                body = outer.files[name]
                start, status = 0, 200
                if rng and outer.honour_range:
                    m = re.fullmatch(r"bytes=(\d+)-", rng)
                    start = int(m.group(1))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                part = body[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(part)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                if outer.cut_after is not None:
                    part = part[: outer.cut_after]
                    self.close_connection = True
                drip = outer.drip_s
                if drip is not None:
                    try:
                        for i in range(len(part)):
                            self.wfile.write(part[i:i + 1])
                            self.wfile.flush()
                            outer.sent += 1
                            time.sleep(drip)
                    except OSError:
                        self.close_connection = True
                    return
                outer.sent += len(part)  # before the write: the client may be done before it returns
                self.wfile.write(part)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    def url(self, name):
        return f"http://127.0.0.1:{self.port}/{name}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def payload(rng):
    return rng.integers(0, 256, size=3 * (1 << 20) + 12345, dtype="uint8").tobytes()


@pytest.fixture
def server(payload):
    s = Server({"data.bin": payload})
    yield s
    s.close()


def sums(b):
    return hashlib.sha256(b).hexdigest(), hashlib.md5(b).hexdigest()


def test_download_verifies_and_skips_existing(server, payload, tmp_path):
    sha, md5 = sums(payload)
    dest = tmp_path / "sub" / "data.bin"
    out = download_url(server.url("data.bin"), dest, sha256=sha, md5=md5, progress=False)
    assert out == dest and dest.read_bytes() == payload
    assert not (tmp_path / "sub" / "data.bin.part").exists()
    assert server.requests == [("data.bin", None)]
    # a verified file is returned without a request
    assert download_url(server.url("data.bin"), dest, sha256=sha, progress=False) == dest
    assert len(server.requests) == 1
    # a directory as dest takes the URL's file name
    assert download_url(server.url("data.bin"), tmp_path / "sub", md5=md5, progress=False) == dest
    assert len(server.requests) == 1


def test_existing_file_with_wrong_hash_is_downloaded_again(server, payload, tmp_path):
    dest = tmp_path / "data.bin"
    dest.write_bytes(b"stale")
    out = download_url(server.url("data.bin"), dest, sha256=sums(payload)[0], progress=False)
    assert out.read_bytes() == payload and len(server.requests) == 1


def test_resume_with_range(server, payload, tmp_path):
    dest = tmp_path / "data.bin"
    half = len(payload) // 2 + 7
    (tmp_path / "data.bin.part").write_bytes(payload[:half])
    download_url(server.url("data.bin"), dest, sha256=sums(payload)[0], progress=False)
    assert dest.read_bytes() == payload
    assert server.requests == [("data.bin", f"bytes={half}-")]
    assert server.sent == len(payload) - half  # only the rest travelled


def test_server_ignoring_range_sends_whole_file(server, payload, tmp_path):
    server.honour_range = False
    (tmp_path / "data.bin.part").write_bytes(b"garbage that must be overwritten")
    out = download_url(server.url("data.bin"), tmp_path / "data.bin", md5=sums(payload)[1],
                       progress=False)
    assert out.read_bytes() == payload and server.sent == len(payload)


def test_complete_part_is_finished_after_416(server, payload, tmp_path):
    (tmp_path / "data.bin.part").write_bytes(payload)
    out = download_url(server.url("data.bin"), tmp_path / "data.bin", sha256=sums(payload)[0],
                       progress=False)
    assert out.read_bytes() == payload and server.sent == 0


def test_interrupted_download_keeps_part_and_resumes(server, payload, tmp_path):
    dest = tmp_path / "data.bin"
    server.cut_after = 1 << 20
    with pytest.raises(DownloadError, match="resume") as err:
        download_url(server.url("data.bin"), dest, sha256=sums(payload)[0], progress=False,
                     timeout=10)
    assert server.url("data.bin") in str(err.value)
    part = tmp_path / "data.bin.part"
    assert part.stat().st_size == 1 << 20 and not dest.exists()
    server.cut_after = None
    download_url(server.url("data.bin"), dest, sha256=sums(payload)[0], progress=False)
    assert dest.read_bytes() == payload
    assert server.requests[-1] == ("data.bin", f"bytes={1 << 20}-")


def test_hash_mismatch_deletes_part(server, payload, tmp_path):
    dest = tmp_path / "data.bin"
    with pytest.raises(ChecksumError, match="sha256") as err:
        download_url(server.url("data.bin"), dest, sha256="0" * 64, progress=False)
    assert server.url("data.bin") in str(err.value)
    assert not dest.exists() and not (tmp_path / "data.bin.part").exists()
    with pytest.raises(ChecksumError, match="md5"):
        download_url(server.url("data.bin"), dest, md5="f" * 32, progress=False)


def test_http_error_and_no_network_name_url_and_destination(server, tmp_path):
    dest = tmp_path / "x.bin"
    with pytest.raises(DownloadError, match="404") as err:
        download_url(server.url("missing.bin"), dest, progress=False)
    assert str(dest) in str(err.value)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/gnd.pkl"
    with pytest.raises(DownloadError) as err:
        download_url(url, dest, md5="a" * 32, progress=False, timeout=5)
    msg = str(err.value)
    assert url in msg and str(dest) in msg and "a" * 32 in msg and "by other means" in msg
    assert isinstance(err.value, OSError)


def test_file_url(payload, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(payload)
    out = download_url(src.as_uri(), tmp_path / "out" / "copy.bin", sha256=sums(payload)[0],
                       progress=False)
    assert out.read_bytes() == payload
    # a stale part is overwritten (file:// has no ranges)
    (tmp_path / "out" / "copy2.bin.part").write_bytes(b"xx")
    out = download_url(src.as_uri(), tmp_path / "out" / "copy2.bin", md5=sums(payload)[1],
                       progress=False)
    assert out.read_bytes() == payload
    with pytest.raises(DownloadError, match="nope"):
        download_url((tmp_path / "nope").as_uri(), tmp_path / "n", progress=False)


@pytest.mark.parametrize("kwargs,pattern", [
    ({"url": "gopher://x/y"}, "url"),
    ({"url": "relative/path"}, "url"),
    ({"sha256": "abc"}, "sha256"),
    ({"md5": "z" * 32}, "md5"),
    ({"timeout": 0}, "timeout"),
    ({"min_rate": -1}, "min_rate"),
    ({"min_rate": float("nan")}, "min_rate"),
])
def test_bad_arguments(tmp_path, kwargs, pattern):
    args = {"url": "http://127.0.0.1:9/x", "dest": tmp_path / "x"} | kwargs
    with pytest.raises(ValueError, match=pattern):
        download_url(args.pop("url"), args.pop("dest"), **args)


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PYLANDMARK_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PYLANDMARK_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == Path(tmp_path) / ".cache" / "pylandmark"


# ---- bounded downloads and extractions -------------------------------------------------------

def test_an_endless_response_stops_at_the_limit(server, tmp_path):
    server.endless = True
    dest = tmp_path / "zeros.bin"
    with pytest.raises(DownloadError, match="max_bytes") as err:
        download_url(server.url("zeros"), dest, max_bytes=3 << 20, progress=False, timeout=10)
    assert "\n" not in str(err.value)
    assert not dest.exists() and not (tmp_path / "zeros.bin.part").exists()
    assert server.sent < 64 << 20  # stopped near the limit, not at the server's 4 GiB


def test_a_server_that_drips_bytes_is_stopped_and_the_part_resumes(server, payload, tmp_path, monkeypatch):
    import pylandmark.data.download as dl

    monkeypatch.setattr(dl, "RATE_WINDOW_S", 0.5)  # the check's stretch, shortened from a minute
    server.drip_s = 0.01  # about 100 bytes/s, far below min_rate
    dest = tmp_path / "d.bin"
    start = time.monotonic()
    with pytest.raises(DownloadError, match="too slow") as err:
        download_url(server.url("data.bin"), dest, min_rate=10_000, progress=False, timeout=10)
    assert time.monotonic() - start < 5  # one stretch and a bit, not the hours the body would take
    assert "\n" not in str(err.value) and "resume" in str(err.value)
    part = tmp_path / "d.bin.part"
    kept = part.read_bytes()
    assert 0 < len(kept) < 1000 and kept == payload[:len(kept)] and not dest.exists()
    server.drip_s = None  # a better connection: the run resumes from the part
    assert download_url(server.url("data.bin"), dest, progress=False).read_bytes() == payload
    assert server.requests[-1] == ("data.bin", f"bytes={len(kept)}-")


def test_an_announced_size_beyond_the_limit_is_refused_before_the_body(server, payload, tmp_path):
    with pytest.raises(DownloadError, match="max_bytes"):
        download_url(server.url("data.bin"), tmp_path / "d.bin", max_bytes=1 << 20, progress=False)
    assert not (tmp_path / "d.bin.part").exists() and not (tmp_path / "d.bin").exists()


def test_expected_size(server, payload, tmp_path):
    dest = tmp_path / "d.bin"
    with pytest.raises(ChecksumError, match=f"{len(payload)} bytes.*expected {len(payload) - 1}"):
        download_url(server.url("data.bin"), dest, size=len(payload) - 1, progress=False)
    assert not dest.exists() and not (tmp_path / "d.bin.part").exists()
    assert download_url(server.url("data.bin"), dest, size=len(payload), progress=False).read_bytes() == payload
    dest.write_bytes(b"short")  # an existing file of the wrong size is fetched again
    assert download_url(server.url("data.bin"), dest, size=len(payload), progress=False).read_bytes() == payload


def test_file_urls_must_name_regular_files(tmp_path):
    dest = tmp_path / "zero.bin"
    with pytest.raises(DownloadError, match="not a regular file"):
        download_url("file:///dev/zero", dest, progress=False)
    assert not dest.exists() and not (tmp_path / "zero.bin.part").exists()


@pytest.mark.parametrize("kwargs,pattern", [({"size": -1}, "size"), ({"size": 1.5}, "size"),
                                            ({"max_bytes": 0}, "max_bytes"), ({"max_bytes": None}, "max_bytes")])
def test_bad_size_arguments(tmp_path, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        download_url("http://127.0.0.1:9/x", tmp_path / "x", **kwargs)


def test_an_archive_that_expands_without_bound_is_stopped(tmp_path):
    import io
    import tarfile

    from pylandmark.data.download import extract_tar

    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"ims/zeros{i}.jpg")
            info.size = 32 << 20
            tar.addfile(info, io.BytesIO(bytes(info.size)))
    assert archive.stat().st_size < 1 << 20
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="expands to more than") as err:
        extract_tar(archive, out, lambda p: p)
    assert "\n" not in str(err.value)
    assert sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) <= 64 << 20
    assert not list(out.rglob("*.tmp"))
    assert extract_tar(archive, tmp_path / "ok", lambda p: p, max_bytes=100 << 20) == 3


# ---- servers that answer something other than what was asked (issue 26) ---------------------

class Scripted:
    """A server whose answer to each GET is ``respond(range_header) -> (status, headers, body)``;
    ``body`` may be shorter than the Content-Length it announces (the connection then closes
    early). Records the Range header of every request."""

    def __init__(self, respond):
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                outer.requests.append(rng)
                status, headers, body = respond(rng)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/w.bin"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted():
    servers = []

    def start(respond):
        servers.append(Scripted(respond))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


FILE = bytes(range(250)) * 4  # 1000 bytes


def partial(start, end, *, content_range=None, length=None, body=None):
    """A 206 for FILE[start:end + 1] (the header values and the body can be made to lie)."""
    body = FILE[start:end + 1] if body is None else body
    cr = f"bytes {start}-{end}/{len(FILE)}" if content_range is None else content_range
    headers = {"Content-Length": str(len(body) if length is None else length)}
    if cr:
        headers["Content-Range"] = cr
    return 206, headers, body


def whole(rng):
    return 200, {"Content-Length": str(len(FILE))}, FILE


def test_a_206_to_a_request_for_the_whole_file_is_never_saved(scripted, tmp_path):
    """The server answers the first 100 bytes, 206, to a request without Range: that is not the
    file, whatever the status line says (the old code saved those 100 bytes as the download)."""
    server = scripted(lambda rng: partial(0, 99))
    dest = tmp_path / "w.bin"
    with pytest.raises(DownloadError) as err:
        download_url(server.url, dest, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and server.url in msg and str(dest) in msg
    assert "206" in msg and "bytes 0-99/1000" in msg
    assert not dest.exists() and server.requests == [None]
    # with the size known it is refused as well
    with pytest.raises((DownloadError, ChecksumError)):
        download_url(server.url, dest, size=len(FILE), progress=False)
    assert not dest.exists()


def test_a_206_with_a_short_body_and_honest_headers_is_not_saved(scripted, tmp_path):
    server = scripted(lambda rng: partial(0, 99, content_range=f"bytes 0-999/{len(FILE)}", length=1000))
    dest = tmp_path / "w.bin"
    with pytest.raises(DownloadError) as err:
        download_url(server.url, dest, progress=False)
    assert "\n" not in str(err.value) and server.url in str(err.value)
    assert not dest.exists()


@pytest.mark.parametrize("answer", [
    # no Content-Range at all, and the whole file (the old code appended it to the part)
    lambda rng: (206, {"Content-Length": str(len(FILE))}, FILE),
    # the whole file under a range that says so: not what was asked
    lambda rng: partial(0, 999),
    # the asked start, but a Content-Length that does not fit the range (the whole file)
    lambda rng: partial(500, 999, length=len(FILE), body=FILE),
    # a range that ends past the file's end
    lambda rng: partial(500, 999, content_range=f"bytes 500-1499/{len(FILE)}"),
], ids=["no-content-range", "other-start", "length-not-range", "past-the-end"])
def test_a_206_that_is_not_the_asked_range_restarts_cleanly(scripted, tmp_path, answer):
    """A resume whose 206 does not hold the bytes asked for starts again from zero (and the
    second answer, a 200 with the whole file, is what ends up in the cache)."""
    server = scripted(lambda rng: answer(rng) if rng else whole(rng))
    dest = tmp_path / "w.bin"
    (tmp_path / "w.bin.part").write_bytes(FILE[:500])
    assert download_url(server.url, dest, progress=False).read_bytes() == FILE
    assert server.requests == ["bytes=500-", None]


def test_a_server_that_only_ever_sends_a_wrong_206_fails_clearly(scripted, tmp_path):
    server = scripted(lambda rng: (206, {"Content-Length": str(len(FILE))}, FILE))
    dest = tmp_path / "w.bin"
    (tmp_path / "w.bin.part").write_bytes(FILE[:500])
    with pytest.raises(DownloadError, match="206") as err:
        download_url(server.url, dest, progress=False)
    assert "\n" not in str(err.value) and server.url in str(err.value)
    assert not dest.exists() and server.requests == ["bytes=500-", None]


@pytest.mark.parametrize("answer,arrived", [
    # the asked range, announced in full, but the body stops after 100 bytes
    (lambda rng: partial(500, 999, length=500, body=FILE[500:600]), 600),
    # a shorter range than asked: bytes 500-599 of 1000
    (lambda rng: partial(500, 599), 600),
], ids=["body-short", "range-short"])
def test_a_short_206_to_a_resume_is_kept_as_a_part_not_as_the_file(scripted, tmp_path, answer, arrived):
    server = scripted(lambda rng: answer(rng) if rng else whole(rng))
    dest = tmp_path / "w.bin"
    part = tmp_path / "w.bin.part"
    part.write_bytes(FILE[:500])
    with pytest.raises(DownloadError, match="resume") as err:
        download_url(server.url, dest, progress=False, timeout=10)
    msg = str(err.value)
    assert "\n" not in msg and server.url in msg and f"{arrived} of {len(FILE)} bytes" in msg
    assert not dest.exists() and part.read_bytes() == FILE[:arrived]


def test_a_200_shorter_than_its_content_length_is_not_saved(scripted, tmp_path):
    server = scripted(lambda rng: (200, {"Content-Length": str(len(FILE))}, FILE[:300]))
    dest = tmp_path / "w.bin"
    with pytest.raises(DownloadError, match="300 of 1000 bytes") as err:
        download_url(server.url, dest, progress=False, timeout=10)
    assert "\n" not in str(err.value) and server.url in str(err.value)
    assert not dest.exists()
