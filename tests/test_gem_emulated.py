"""The GPU GeM kernels, run on the host CUDA emulator (tests/cuda_emu), against float64 autograd.

tests/cuda_emu/gem_emu.cpp compiles csrc/cuda/gem_kernels.cuh (layout choice, rows kernels for
NCHW, columns kernels for channels_last, forward and backward with the dL/dp terms) with g++
against the emulator. This checks the kernels' logic; tests/test_gem_cuda.py runs on a real GPU.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from conftest import gem_float64
from search_checks import DTYPE_CODES

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
EPS = 1e-6


@pytest.fixture(scope="module")
def emu_gem(emu_library):
    lib = emu_library("gem_emu.cpp")
    ptr, i64p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)
    f32, u64, i32 = ctypes.c_float, ctypes.c_uint64, ctypes.c_int
    lib.plm_emu_gem_forward.argtypes = [ptr, i32, i64p, i64p, ptr, f32, ptr, u64, ctypes.c_char_p, i32]
    lib.plm_emu_gem_backward.argtypes = [ptr, i32, i64p, i64p, ptr, f32, ptr, ptr, ptr, ptr, u64,
                                         ctypes.c_char_p, i32]
    return lib


def geometry(x):
    """(dims, strides) as the kernels take them: (B, C, H*W) and (sb, sc, shw)."""
    B, C, H, W = x.shape
    sb, sc, sh, sw = x.stride()
    assert H == 1 or W == 1 or sh == W * sw
    shw = sw if W > 1 else (sh if H > 1 else 1)
    return (ctypes.c_int64 * 3)(B, C, H * W), (ctypes.c_int64 * 3)(sb, sc, shw)


def check_rc(rc, info):
    if rc:
        raise RuntimeError(info.value.decode())


def emu_forward(emu_gem, x, p, seed=0):
    dims, strides = geometry(x)
    y = torch.empty(x.shape[:2], dtype=torch.float32)
    p_buf = torch.tensor([p], dtype=torch.float32)
    info = ctypes.create_string_buffer(512)
    check_rc(emu_gem.plm_emu_gem_forward(x.data_ptr(), DTYPE_CODES[x.dtype], dims, strides, p_buf.data_ptr(),
                                         EPS, y.data_ptr(), seed, info, 512), info)
    return y


def emu_backward(emu_gem, x, p, gy, y, seed=0):
    dims, strides = geometry(x)
    dx = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype).fill_(float("nan"))
    terms = torch.full(x.shape[:2], float("nan"), dtype=torch.float32)
    p_buf = torch.tensor([p], dtype=torch.float32)
    info = ctypes.create_string_buffer(512)
    check_rc(emu_gem.plm_emu_gem_backward(x.data_ptr(), DTYPE_CODES[x.dtype], dims, strides, p_buf.data_ptr(),
                                          EPS, gy.data_ptr(), y.data_ptr(), dx.data_ptr(), terms.data_ptr(),
                                          seed, info, 512), info)
    return dx, terms


def reference(x, p, gy):
    """float64 forward, dx and dL/dp by autograd, for the loss sum(gy * y)."""
    x64 = x.double().requires_grad_()
    p64 = torch.tensor(float(p), dtype=torch.float64, requires_grad=True)
    y = gem_float64(x64, p64, EPS)
    (y * gy.double()).sum().backward()
    return y.detach(), x64.grad, p64.grad


def make(rng, shape, dtype, channels_last, scale=1.0):
    x = torch.from_numpy(rng.random(shape, dtype=np.float32) * 2.0 * scale - 0.2 * scale).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


SHAPES = [(2, 5, 3, 3), (1, 45, 7, 5), (3, 33, 1, 1), (2, 40, 9, 11), (1, 70, 16, 12), (4, 3, 1, 37)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("p", [3.0, 2.5])
def test_forward_backward_and_dp_match_float64(emu_gem, rng, shape, dtype, channels_last, p):
    x = make(rng, shape, dtype, channels_last)
    gy = torch.from_numpy(rng.standard_normal(shape[:2], dtype=np.float32))
    y_ref, dx_ref, dp_ref = reference(x, p, gy)
    y = emu_forward(emu_gem, x, p)
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-5, atol=0)
    dx, terms = emu_backward(emu_gem, x, p, gy, y)
    assert dx.stride() == x.stride()
    scale = dx_ref.abs().max().item()
    torch.testing.assert_close(dx.double(), dx_ref, rtol=TOL[dtype], atol=TOL[dtype] * scale)
    # dL/dp is a sum of terms that cancel (exactly 0 when H = W = 1): compare to their size
    size = (gy.double().abs() * y_ref.abs()).sum().item()
    assert terms.sum().item() == pytest.approx(dp_ref.item(), rel=1e-3, abs=1e-5 * size)
    again = emu_forward(emu_gem, x, p, seed=5)
    assert torch.equal(y, again), "forward depends on the thread schedule"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("scale,p", [(1e30, 3.0), (1e-5, 9.0), (1.0, 40.0)])
def test_extreme_values_take_the_scaled_form(emu_gem, rng, channels_last, scale, p):
    """x^p overflows (1e30^3) or underflows (values near eps, p = 9 / 40) in float32: the kernels
    redo those rows as M (mean (x/M)^p)^(1/p) and stay finite and exact."""
    x = make(rng, (2, 36, 5, 4), torch.float32, channels_last, scale)
    gy = torch.ones(x.shape[:2])
    y_ref, dx_ref, _ = reference(x, p, gy)
    y = emu_forward(emu_gem, x, p)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=0)
    dx, _ = emu_backward(emu_gem, x, p, gy, y)
    assert torch.isfinite(dx).all()
    torch.testing.assert_close(dx.double(), dx_ref, rtol=1e-3, atol=1e-3 * dx_ref.abs().max().item())


def test_backward_without_dp_terms_and_the_clamp_gradient(emu_gem, rng):
    """Entries below eps get no gradient (the clamp); a null terms pointer skips dL/dp."""
    x = make(rng, (2, 8, 4, 4), torch.float32, False)
    x[0, 0, :2] = -1.0
    gy = torch.ones(x.shape[:2])
    y = emu_forward(emu_gem, x, 3.0)
    dims, strides = geometry(x)
    dx = torch.full_like(x, float("nan"))
    p_buf = torch.tensor([3.0])
    info = ctypes.create_string_buffer(512)
    check_rc(emu_gem.plm_emu_gem_backward(x.data_ptr(), 0, dims, strides, p_buf.data_ptr(), EPS, gy.data_ptr(),
                                          y.data_ptr(), dx.data_ptr(), None, 0, info, 512), info)
    assert (dx[0, 0, :2] == 0).all()
    _, dx_ref, _ = reference(x, 3.0, gy)
    torch.testing.assert_close(dx.double(), dx_ref, rtol=2e-5, atol=1e-7)


def test_a_layout_with_neither_axis_contiguous_is_rejected(emu_gem, rng):
    x = make(rng, (2, 6, 4, 5), torch.float32, False).transpose(2, 3)  # W stride != 1, C stride != 1
    dims = (ctypes.c_int64 * 3)(2, 6, 20)
    strides = (ctypes.c_int64 * 3)(*x.stride()[:2], 5)
    info = ctypes.create_string_buffer(512)
    y = torch.empty(2, 6)
    p_buf = torch.tensor([3.0])
    rc = emu_gem.plm_emu_gem_forward(x.data_ptr(), 0, dims, strides, p_buf.data_ptr(), EPS, y.data_ptr(), 0, info, 512)
    assert rc == 1 and b"contiguous spatial axis" in info.value


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("p", [3.0, 2.5])
def test_an_infinite_value_gives_infinity(emu_gem, rng, channels_last, dtype, p):
    """A channel holding +inf pools to +inf (the scaled form divided inf by inf: NaN)."""
    x = make(rng, (2, 36, 5, 4), dtype, channels_last) + 0.5
    x[1, 7, 2, 3] = float("inf")
    y = emu_forward(emu_gem, x, p)
    assert torch.isinf(y[1, 7]) and y[1, 7] > 0
    y_ref = gem_float64(x, p, EPS)
    finite = torch.isfinite(y_ref)
    assert finite.sum() == y.numel() - 1
    torch.testing.assert_close(y[finite].double(), y_ref[finite], rtol=2e-5, atol=0)
