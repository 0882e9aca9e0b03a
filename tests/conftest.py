"""Shared fixtures. Tests that need ../shared data skip cleanly where it is absent."""
from __future__ import annotations

import re
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
