#!/usr/bin/env python3
"""Smoke test of an installed pylandmark wheel with numpy alone (no torch, no source tree).

    python tools/wheel_smoke.py [--expect-cuda] [--not-under DIR]

Checks that the package imports without torch from site-packages, that it finds the CPU
kernel variants /proc/cpuinfo says this machine runs, that search on each of them gives the
exact top-k of a float64 numpy reference, that GeM matches its float64 formula, and that bad
input raises a clear error. Exits 1 on a failure.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def check_search(plm, _C, rng) -> int:
    """Every ISA x dtype x metric on shapes that are not multiples of any tile; returns checks run."""
    dtypes = [np.float16, np.float32]
    try:
        import ml_dtypes

        dtypes.append(ml_dtypes.bfloat16)
    except ImportError:
        pass
    runs = 0
    before = _C.cpu_isa()
    try:
        for isa in _C.build_info()["cpu_isas"]:
            _C.set_cpu_isa(isa)
            for dtype in dtypes:
                for metric in ("cosine", "ip"):
                    Q, N, D, k = 7, 1031, 77, 9
                    q = rng.standard_normal((Q, D)).astype(dtype)
                    db = rng.standard_normal((N, D)).astype(dtype)
                    scores, idx = plm.search(q, db, k=k, metric=metric)
                    q64, d64 = q.astype(np.float64), db.astype(np.float64)
                    if metric == "cosine":
                        q64 /= np.linalg.norm(q64, axis=1, keepdims=True)
                        d64 /= np.linalg.norm(d64, axis=1, keepdims=True)
                        scale = 1.0
                    else:
                        scale = np.linalg.norm(q64, axis=1).max() * np.linalg.norm(d64, axis=1).max()
                    ref = q64 @ d64.T
                    # float32 accumulation over D terms: a few ulp per term, relative to |q||db|.
                    tol = 1.2e-6 * np.sqrt(D) * scale + 1e-7
                    where = f"search isa={isa} dtype={np.dtype(dtype).name} metric={metric}"
                    assert scores.shape == (Q, k) and idx.shape == (Q, k), where
                    assert scores.dtype == np.float32 and idx.dtype == np.int64, where
                    true = np.take_along_axis(ref, idx, axis=1)
                    assert np.abs(scores - true).max() <= tol, f"{where}: scores are not the true scores"
                    kth = np.sort(ref, axis=1)[:, ::-1][:, :k]
                    assert np.abs(true - kth).max() <= 2 * tol, f"{where}: not the top {k}"
                    assert (np.diff(scores, axis=1) <= 0).all(), f"{where}: not sorted best first"
                    runs += 1
    finally:
        _C.set_cpu_isa(before)
    return runs


def check_isa_detection(info) -> None:
    """On x86-64 Linux the wheel must find the vector kernels that /proc/cpuinfo says this CPU
    runs (the ISA tests skip variants the module reports unsupported, so a broken CPU check in
    the wheel's toolchain would otherwise pass as a slow wheel)."""
    import platform

    if platform.machine() != "x86_64" or not Path("/proc/cpuinfo").is_file():
        return
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            break
    want = {"avx2": {"avx2", "fma", "f16c"},
            "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"}}
    for isa, needs in want.items():
        if needs <= flags:
            assert isa in info["cpu_isas"], f"this CPU has {isa} but the wheel runs only {info['cpu_isas']}"


def check_gem(plm, rng) -> None:
    x = rng.random((3, 11, 6, 7)).astype(np.float32)
    ref = np.mean(np.maximum(x.astype(np.float64), 1e-6) ** 2.5, axis=(2, 3)) ** (1 / 2.5)
    # float32 accumulation of 42 positive terms, then a root: well under 1e-5 relative.
    np.testing.assert_allclose(plm.gem(x, p=2.5), ref, rtol=2e-5)


def check_errors(plm) -> None:
    db = np.zeros((4, 8), np.float32)
    for call, words in [(lambda: plm.search(np.zeros((2, 5), np.float32), db), "D="),
                        (lambda: plm.search(np.zeros((2, 8), np.float32), db, k=0), "k"),
                        (lambda: plm.search(np.zeros((2, 8), np.float32), db[:0]), "db")]:
        try:
            call()
        except (ValueError, TypeError) as err:
            assert words in str(err), f"unclear error: {err}"
        else:
            raise AssertionError("bad input was accepted")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--expect-cuda", action="store_true", help="the wheel must hold the CUDA kernels")
    ap.add_argument("--not-under", type=Path, help="fail if pylandmark is imported from here")
    args = ap.parse_args()

    import pylandmark as plm
    from pylandmark import _C

    where = Path(plm.__file__).resolve()
    if args.not_under and args.not_under.resolve() in where.parents:
        print(f"FAIL pylandmark was imported from the source tree ({where})")
        return 1
    assert "torch" not in sys.modules, "import pylandmark imported torch"
    assert plm.__version__ != "0.0.0+unknown", "the wheel's metadata does not give a version"
    info = _C.build_info()
    assert info["cuda"] == args.expect_cuda, f"build_info()['cuda'] is {info['cuda']}"
    check_isa_detection(info)
    has_gpu = plm.cuda_available()  # must answer (False without a driver), never crash
    rng = np.random.default_rng(20240515)
    runs = check_search(plm, _C, rng)
    check_gem(plm, rng)
    check_errors(plm)
    print(f"smoke: pylandmark {plm.__version__} from {where.parent}; isas {info['cpu_isas']}; "
          f"cuda built {info['cuda']}, usable {has_gpu}; {runs} search checks, gem, errors: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
