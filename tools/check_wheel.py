#!/usr/bin/env python3
"""Checks a built pylandmark wheel against the manylinux policy and the size budget, with readelf.

    python tools/check_wheel.py WHEEL --glibc 2.28 --max-mb 5 [--dist pylandmark] [--cuda]

For every ELF file in the wheel: NEEDED holds only the C library of the platform (no libstdc++,
libgcc_s, libcudart or libcuda: the C++ and CUDA runtimes are linked in, the driver is loaded at
run time); no symbol needs a GLIBC version newer than --glibc, nor any GLIBCXX/CXXABI/GCC version;
no undefined symbol other than the Python C API is left without a version (a symbol the old
glibc lacks would otherwise bind to whatever the newer one offers, and fail on old systems only
when first called). Prints one line per finding and exits 1 on any.
`check_wheel.py --requires WHEEL` prints the wheel's runtime requirements instead.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# The C library of the platform, which every Linux system has in a compatible version.
ALLOWED_NEEDED = {
    "libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1",
    "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1",
}
# Undefined without a version is fine for these: resolved against the interpreter, or weak
# hooks that are allowed to stay null.
UNVERSIONED_OK = re.compile(r"^(_?Py|__gmon_start__$|_ITM_|__cxa_finalize$|_Jv_RegisterClasses$)")


def readelf(*args: str) -> str:
    return subprocess.run(["readelf", "-W", *args], check=True, capture_output=True, text=True).stdout


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def check_elf(path: Path, name: str, glibc: tuple[int, ...]) -> list[str]:
    problems = []
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", readelf("-d", str(path)))
    for lib in needed:
        if lib not in ALLOWED_NEEDED:
            problems.append(f"{name}: NEEDED {lib} (only the C library may be needed; link it in)")
    newest = (0,)
    for line in readelf("--dyn-syms", str(path)).splitlines():
        cols = line.split()
        if len(cols) < 8 or cols[6] != "UND":
            continue
        sym = cols[7]
        if "@" not in sym:
            if cols[4] != "WEAK" and not UNVERSIONED_OK.match(sym):
                problems.append(f"{name}: undefined symbol {sym} has no version (the target glibc "
                                "lacks it; it would fail on old systems when first called)")
            continue
        ver = sym.split("@")[-1]
        m = re.fullmatch(r"GLIBC_(\d+(?:\.\d+)*)", ver)
        if m:
            newest = max(newest, version_tuple(m.group(1)))
        elif re.match(r"(GLIBCXX|CXXABI|GCC)_", ver):
            problems.append(f"{name}: needs {sym} from the system C++ runtime (link it statically)")
    if newest > glibc:
        problems.append(f"{name}: needs GLIBC_{'.'.join(map(str, newest))}, newer than the policy's "
                        f"{'.'.join(map(str, glibc))}")
    print(f"  {name}: NEEDED {', '.join(needed) or '-'}; newest GLIBC_{'.'.join(map(str, newest))}")
    return problems


def requires(whl: Path) -> list[str]:
    """The wheel's unconditional requirements (Requires-Dist without an extra marker)."""
    with zipfile.ZipFile(whl) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode().splitlines()
    reqs = [ln.partition(":")[2].strip() for ln in lines if ln.startswith("Requires-Dist:")]
    return [r for r in reqs if "extra ==" not in r]


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--requires":  # used by build_wheels.sh
        print("\n".join(requires(Path(sys.argv[2]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheel", type=Path)
    ap.add_argument("--glibc", default="2.28", help="oldest glibc the wheel must run on")
    ap.add_argument("--max-mb", type=float, required=True, help="size budget in MB (10^6 bytes)")
    ap.add_argument("--dist", default="pylandmark", help="expected distribution name")
    ap.add_argument("--cuda", action="store_true", help="the wheel must contain the CUDA kernels")
    args = ap.parse_args()

    whl: Path = args.wheel
    problems = []
    size = whl.stat().st_size
    print(f"{whl.name}: {size / 1e6:.2f} MB (budget {args.max_mb:g} MB)")
    if size > args.max_mb * 1e6:
        problems.append(f"{whl.name}: {size / 1e6:.2f} MB is over the {args.max_mb:g} MB budget")
    dist = args.dist.replace("-", "_")
    if not whl.name.startswith(dist + "-"):
        problems.append(f"{whl.name}: expected distribution {args.dist}")
    tag = f"manylinux_{args.glibc.replace('.', '_')}_"
    if tag not in whl.name:
        problems.append(f"{whl.name}: platform tag is not {tag}<arch>")
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(whl) as zf:
        zf.extractall(tmp)
        elves = [p for p in Path(tmp).rglob("*") if p.is_file() and p.read_bytes()[:4] == b"\x7fELF"]
        if not any(p.name.startswith("_C.") for p in elves):
            problems.append(f"{whl.name}: no pylandmark/_C extension inside")
        for p in elves:
            problems += check_elf(p, str(p.relative_to(tmp)), version_tuple(args.glibc))
            if args.cuda and p.name.startswith("_C."):
                # Device code for every architecture lives in the module's fat binary section.
                if ".nv_fatbin" not in readelf("-S", str(p)):
                    problems.append(f"{p.name}: no .nv_fatbin section (CUDA kernels missing)")
    for line in problems:
        print(f"FAIL {line}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
