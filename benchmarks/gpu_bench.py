"""GPU benchmark: fused GeM against eager torch and torch.compile (one command, table last).

    python benchmarks/gpu_bench.py [--json out.json] [--no-compile]

Each case is first checked against an eager float64 reference; times are CUDA-event medians
after warm-up. Effective bandwidth counts one read of x (forward) or a read of x plus a write of
dx (forward+backward reads x twice: once forward, once backward).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import pylandmark as plm
from pylandmark.bench import cuda_median_ms
from pylandmark.nn.functional import HAVE_CUDA_KERNELS

SHAPES = [(64, 1024, 32, 24), (256, 1024, 12, 12), (8, 2048, 64, 48)]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1.5e-2}


def eager(x, p, eps=1e-6):
    return x.float().clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p).to(x.dtype)


def gem_rows(use_compile: bool):
    candidates = {"pylandmark": lambda x, p: plm.nn.gem_torch(x, p), "torch eager": eager}
    if use_compile:
        candidates["torch.compile"] = torch.compile(eager)
    rows = []
    for shape in SHAPES:
        for dname, dtype in DTYPES.items():
            x = (torch.rand(shape, device="cuda") * 2).to(dtype)
            p = torch.nn.Parameter(torch.tensor([3.0], device="cuda"))
            ref = x.double().clamp(min=1e-6).pow(3.0).mean(dim=(-2, -1)).pow(1 / 3.0)
            nbytes = x.numel() * x.element_size()
            for mode in ("forward", "forward+backward"):
                res = {}
                for name, f in candidates.items():
                    if mode == "forward":
                        with torch.no_grad():
                            err = ((f(x, p).double() - ref).abs() / ref.abs()).max().item()
                            ms = cuda_median_ms(lambda: f(x, p))
                        moved = nbytes
                    else:
                        xg = x.detach().requires_grad_()

                        def step():
                            f(xg, p).float().sum().backward()

                        err = float("nan")
                        ms = cuda_median_ms(step)
                        moved = 3 * nbytes
                    res[name] = (ms, err, moved / ms / 1e9)
                ours = res["pylandmark"][0]
                for name, (ms, err, tbps) in res.items():
                    if mode == "forward" and not err < TOL[dname]:
                        raise SystemExit(f"{name} {shape} {dname}: relative error {err:.2e} over {TOL[dname]}")
                    rows.append(dict(op=f"gem {mode}", shape=list(shape), dtype=dname, method=name, ms=ms,
                                     tb_per_s=tbps, rel_err=err, x_vs_ours=ms / ours))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark", file=sys.stderr)
        return 1
    if not HAVE_CUDA_KERNELS:
        print("pylandmark was built without CUDA kernels", file=sys.stderr)
        return 1
    rows = gem_rows(not args.no_compile)
    device = torch.cuda.get_device_name()
    print(f"\n{device}, torch {torch.__version__}, pylandmark {plm.__version__}")
    print(f"{'op':<22}{'shape':<20}{'dtype':<10}{'method':<15}{'ms':>9}{'TB/s':>8}{'rel err':>10}{'x ours':>8}")
    for r in rows:
        err = "" if r["rel_err"] != r["rel_err"] else f"{r['rel_err']:.1e}"
        print(f"{r['op']:<22}{'x'.join(map(str, r['shape'])):<20}{r['dtype']:<10}{r['method']:<15}"
              f"{r['ms']:>9.3f}{r['tb_per_s']:>8.2f}{err:>10}{r['x_vs_ours']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
