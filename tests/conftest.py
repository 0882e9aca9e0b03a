"""Shared fixtures. Tests that need ../shared data skip cleanly where it is absent."""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def timm_keys(shared_data) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every tensor in timm's cspdarknet53 checkpoint, from the published list."""
    out = []
    for line in (shared_data / "cspdarknet53_state_dict.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"(\S+) \(([\d, ]*)\)", line.strip())
        assert m, line
        out.append((m.group(1), tuple(int(v) for v in m.group(2).replace(" ", "").split(",") if v)))
    return out


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A fresh generator per test, seeded from the test's name (reproducible, not shared)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def cpu_isa(request):
    """Runs the test under one of the CPU kernel variants this machine supports, then restores."""
    from pylandmark import _C

    name = request.param
    if name not in _C.build_info()["cpu_isas"]:
        pytest.skip(f"this CPU cannot run the {name} kernels")
    before = _C.cpu_isa()
    _C.set_cpu_isa(name)
    yield name
    _C.set_cpu_isa(before)


ALL_ISAS = ["generic", "avx2", "avx512"]


EMU_DIR = Path(__file__).resolve().parent / "cuda_emu"
CSRC = EMU_DIR.parents[1] / "csrc"


def cuda_include_dir() -> Path | None:
    """Where cuda_fp16.h lives (CUDA_HOME, CUDA_PATH, /usr/local/cuda, or next to nvcc)."""
    candidates = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates.append(Path("/usr/local/cuda/include"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    return next((c for c in candidates if (c / "cuda_fp16.h").is_file() and (c / "cuda_bf16.h").is_file()), None)


@pytest.fixture(scope="session")
def emu_library(tmp_path_factory):
    """emu_library("name.cpp") -> ctypes.CDLL of tests/cuda_emu/name.cpp compiled by g++ against
    the host CUDA emulator (csrc/ and tests/cuda_emu/ on the include path). Skips without g++ or
    the CUDA headers; cached per session by the hash of every source it can include."""
    if sys.platform != "linux":
        pytest.skip("the CUDA emulator uses Linux ucontext fibers")
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ not found on PATH")
    cuda_inc = cuda_include_dir()
    if cuda_inc is None:
        pytest.skip("CUDA headers (cuda_fp16.h) not found: set CUDA_HOME or put nvcc on PATH")
    cache = tmp_path_factory.mktemp("cuda_emu")
    loaded: dict[str, ctypes.CDLL] = {}

    def build(source: str) -> ctypes.CDLL:
        if source in loaded:
            return loaded[source]
        cmd = [cxx, "-std=c++17", "-O1", "-g0", "-shared", "-fPIC", "-DPLM_CUDA_EMULATE", f"-I{CSRC}",
               f"-I{EMU_DIR}", f"-I{cuda_inc}", "-Wno-unknown-pragmas", str(EMU_DIR / source)]
        h = hashlib.sha256(" ".join(cmd).encode())
        for f in sorted([*EMU_DIR.glob("*"), *CSRC.glob("cuda/*"), CSRC / "dtype.h"]):
            h.update(f.read_bytes())
        lib = cache / f"{Path(source).stem}-{h.hexdigest()[:16]}.so"
        if not lib.is_file():
            proc = subprocess.run([*cmd, "-o", str(lib)], check=False, capture_output=True, text=True)
            if proc.returncode != 0:
                pytest.fail(f"compiling {source} against the CUDA emulator failed:\n{proc.stderr[-4000:]}")
        loaded[source] = ctypes.CDLL(str(lib))
        return loaded[source]

    return build


@pytest.fixture(scope="session")
def emu_search(emu_library):
    """search(q, db, k, metric, **device) -> (scores, indices, info): the GPU search
    (tests/cuda_emu/search_emu.cpp) on the emulator; device limits as keywords."""
    import torch
    from search_checks import DTYPE_CODES

    fn = emu_library("search_emu.cpp").plm_emu_search
    fn.restype = ctypes.c_int
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    fn.argtypes = [ptr, i32, i64, ptr, i32, i64, i64, i64, i64, i64, i32, i32, i32, i64, i32, i64,
                   ctypes.c_uint64, ptr, ptr, ctypes.c_char_p, i32]

    def search(q, db, k, metric="cosine", *, cc=90, smem=227 * 1024, sms=3, blocks_per_sm=1,
               max_chunk=65536, seed=0):
        Q, N = q.shape[0], db.shape[0]
        assert q.stride(1) == 1 and db.stride(1) == 1
        scores = torch.empty((Q, k), dtype=torch.float32)
        indices = torch.empty((Q, k), dtype=torch.int64)
        info = ctypes.create_string_buffer(512)
        rc = fn(q.data_ptr(), DTYPE_CODES[q.dtype], q.stride(0), db.data_ptr(), DTYPE_CODES[db.dtype],
                db.stride(0), Q, N, db.shape[1], k, int(metric == "cosine"), sms, cc, smem, blocks_per_sm,
                max_chunk, seed, scores.data_ptr(), indices.data_ptr(), info, len(info))
        if rc:
            raise RuntimeError(info.value.decode())
        return scores, indices, info.value.decode()

    return search


def gem_float64(x, p, eps=1e-6):
    """Eager float64 GeM of (B, C, H, W) torch x on the same (already rounded) values: the
    reference every GeM test compares with (differentiable in x and in a tensor p)."""
    p = p.double().reshape(()) if hasattr(p, "double") else p
    return x.double().clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)
