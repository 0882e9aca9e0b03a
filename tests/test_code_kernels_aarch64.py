"""The AArch64 code scans (generic C and sdot), cross-compiled and run under qemu.

The sdot kernel (csrc/cpu/code_kernels.cpp, variant neondot) runs only on AArch64, so this test
builds tests/native/code_scan_check.cpp with it for AArch64 and runs it under qemu-aarch64 with
every CPU feature (-cpu max), which checks every pair's bounds against an exact integer
reference. It needs a cross compiler and qemu (Debian: `apt-get install g++-aarch64-linux-gnu
qemu-user`) and skips without them: it checks the logic of the kernel, not its speed.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX, QEMU = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
pytestmark = pytest.mark.skipif(not (CXX and QEMU), reason="needs aarch64-linux-gnu-g++ and qemu-aarch64")

VARIANTS = {  # object: (flags, defines), as CMakeLists.txt builds them for AArch64
    "generic": ([], ["PLM_ISA_generic=1", "PLM_ISA_NS=isa_generic"]),
    "neondot": (["-march=armv8.2-a+dotprod"], ["PLM_CODE_NEONDOT=1", "PLM_ISA_NS=isa_neondot"]),
}


def test_aarch64_code_scans_match_the_exact_reference(tmp_path):
    objects = []
    for name, (flags, defines) in VARIANTS.items():
        obj = tmp_path / f"{name}.o"
        subprocess.run([CXX, "-std=c++17", "-O3", "-fno-math-errno", "-fno-trapping-math", *flags,
                        *(f"-D{d}" for d in defines), f"-I{ROOT / 'csrc'}", "-c",
                        str(ROOT / "csrc/cpu/code_kernels.cpp"), "-o", str(obj)], check=True)
        objects.append(str(obj))
    exe = tmp_path / "code_scan_check"
    subprocess.run([CXX, "-std=c++17", "-O2", "-static", "-DPLM_HAVE_GENERIC=1", "-DPLM_HAVE_NEONDOT=1",
                    f"-I{ROOT / 'csrc'}", str(ROOT / "tests/native/code_scan_check.cpp"), *objects, "-o", str(exe)],
                   check=True)
    run = subprocess.run([QEMU, "-cpu", "max", str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout + run.stderr
    assert int(run.stdout.split()[1]) > 10_000
