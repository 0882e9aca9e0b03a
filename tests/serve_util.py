"""Helpers for the web service tests: a tiny network, a PNU index, and the real server in a
subprocess on a free loopback port."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TINY = {"depths": [1, 1, 1, 1, 1], "out_chs": [8, 16, 24, 32, 48]}
SIZE = 128


def tiny_weights(folder: Path) -> Path:
    import torch

    from pylandmark.models import LandmarkNet

    torch.manual_seed(0)
    return LandmarkNet(backbone_args=TINY).save(folder / "tiny")


def build_index(pnu: Path, weights: Path | str, out: Path, size: int = SIZE) -> Path:
    from pylandmark.cli import main

    assert main(["index", "build", str(pnu / "train"), "--labels-from-folders", "--out", str(out),
                 "--weights", str(weights), "--image-size", str(size), "--quiet", "--json"]) == 0
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> list[str]:
    """Local IPv4/IPv6 addresses in LISTEN state on ``port``, from /proc/net/tcp{,6} (Linux)."""
    out = []
    for name in ("tcp", "tcp6"):
        table = Path("/proc/net") / name
        if not table.is_file():
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            addr, p = local.split(":")
            if int(p, 16) != port or state != "0A":  # 0A = LISTEN
                continue
            if name == "tcp":
                out.append(socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1]))
            else:
                raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, 32, 8))
                out.append(socket.inet_ntop(socket.AF_INET6, raw))
    return out


class Server:
    """`python -m pylandmark serve ...` in a subprocess; ``url`` once /health answers."""

    def __init__(self, index: Path, *args: str, log: Path, port: int | None = None, timeout: float = 240):
        import httpx

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "pylandmark", "serve", str(index), "--port", str(self.port),
                                      *args], stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self._log_file.close()
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not answer within {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log_file.close()
        return self.proc.returncode

    def text(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")


def brute_force_topk(weights: Path, index_path: Path, photo: Path, k: int, size: int = SIZE):
    """float64 cosine top-k of the photo's descriptor (plm.extract) against the stored rows:
    (scores (k,), ids (k,))."""
    import pylandmark as plm
    from pylandmark.models import LandmarkNet

    index = plm.Index.load(index_path)
    db = index.descriptors.astype(np.float64)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q = plm.extract(LandmarkNet.from_pretrained(weights), [str(photo)], image_size=size, progress=False)[0]
    q = q.astype(np.float64) / np.linalg.norm(q.astype(np.float64))
    s = db @ q
    order = np.argsort(-s, kind="stable")[:k]
    return s[order], index.ids[order]
