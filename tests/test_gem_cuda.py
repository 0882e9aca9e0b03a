"""Fused CUDA GeM against eager torch in float64 (skips without a GPU)."""
from __future__ import annotations

import pytest
import torch
from conftest import gem_float64

import pylandmark as plm
from pylandmark.nn import GeM, gem_torch
from pylandmark.nn.functional import HAVE_CUDA_KERNELS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not HAVE_CUDA_KERNELS, reason="pylandmark built without CUDA"),
]

DTYPES = {"float32": (torch.float32, 2e-5), "float16": (torch.float16, 1.5e-3), "bfloat16": (torch.bfloat16, 1e-2)}
SHAPES = [(1, 1, 1, 1), (2, 3, 1, 1), (3, 17, 7, 5), (2, 64, 13, 17), (64, 1024, 32, 24), (300, 33, 3, 3),
          (2, 5, 1, 19)]


def make(shape, dtype, seed, channels_last=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.rand(shape, generator=g, device="cuda", dtype=torch.float64) * 3 - 0.2).to(dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("p0", [3.0, 2.37])
def test_forward_backward_match_float64(shape, dtype, channels_last, p0):
    tdtype, rtol = DTYPES[dtype]
    x = make(shape, tdtype, seed=sum(shape), channels_last=channels_last).requires_grad_()
    p = torch.tensor([p0], device="cuda", requires_grad=True)
    y = gem_torch(x, p)
    g = torch.randn(y.shape, device="cuda").to(tdtype).float()
    (y.float() * g).sum().backward()
    x64 = x.detach().double().requires_grad_()
    p64 = p.detach().double().requires_grad_()
    y64 = gem_float64(x64, p64)
    (y64 * g.double()).sum().backward()
    torch.testing.assert_close(y.double(), y64, rtol=rtol, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2 * rtol, atol=1e-6)
    torch.testing.assert_close(p.grad.double(), p64.grad, rtol=2e-3, atol=1e-4)
    assert x.grad.dtype == x.dtype and y.device == x.device


def test_matches_cpu_kernel():
    x = make((4, 100, 9, 11), torch.float32, seed=1)
    torch.testing.assert_close(gem_torch(x, 2.9).cpu(), gem_torch(x.cpu(), 2.9), rtol=1e-5, atol=1e-6)


def test_runs_on_the_callers_stream_and_reads_inputs_written_there():
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        x = torch.empty(8, 256, 16, 16, device="cuda")
        x.copy_(torch.rand(8, 256, 16, 16, device="cuda") + 0.5)  # written on s
        y = gem_torch(x, 3.0)  # must be ordered after the write on s
    s.synchronize()
    torch.testing.assert_close(y.double(), gem_float64(x, 3.0), rtol=2e-5, atol=1e-6)


def test_autocast_and_module_on_gpu():
    pool = GeM().cuda()
    conv = torch.nn.Conv2d(3, 64, 3).cuda().to(memory_format=torch.channels_last)
    img = torch.rand(2, 3, 33, 29, device="cuda").to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.float16):
        feats = conv(img)
        y = pool(feats)
    y.float().sum().backward()
    assert pool.p.grad is not None and torch.isfinite(pool.p.grad).all()
    torch.testing.assert_close(y.double(), gem_float64(feats.detach(), pool.p.detach()), rtol=2e-3, atol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    x = make((2, 40, 5, 5), torch.float32, seed=3).to("cuda:1")
    y = gem_torch(x, torch.tensor([3.0], device="cuda:1"))
    assert y.device == x.device
    torch.testing.assert_close(y.double(), gem_float64(x, 3.0), rtol=2e-5, atol=1e-6)


def test_mixed_devices_are_rejected():
    x = make((2, 4, 3, 3), torch.float32, seed=4)
    with pytest.raises(ValueError, match="p is on"):
        gem_torch(x.cpu(), torch.tensor([3.0], device="cuda"))


def test_cupy_input():
    cupy = pytest.importorskip("cupy")
    x = cupy.random.rand(3, 20, 6, 7, dtype=cupy.float32)
    y = plm.gem(x, p=2.5)
    ref = ((cupy.maximum(x.astype(cupy.float64), 1e-6) ** 2.5).mean(axis=(2, 3))) ** (1 / 2.5)
    assert isinstance(y, cupy.ndarray)
    cupy.testing.assert_allclose(y, ref, rtol=2e-5)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("scale,p0", [(1e-7, 12.0), (1e4, 12.0)])
def test_extreme_values_use_the_scaled_form(channels_last, scale, p0):
    x = (make((2, 19, 5, 7), torch.float64, seed=5) * scale).float()
    x[0, 0] = 0.0
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    p = torch.tensor([p0], device="cuda", requires_grad=True)
    gem_torch(x, p).sum().backward()
    x64 = x.detach().double().requires_grad_()
    p64 = p.detach().double().requires_grad_()
    y64 = gem_float64(x64, p64)
    y64.sum().backward()
    torch.testing.assert_close(gem_torch(x.detach(), p.detach()).double(), y64.detach(), rtol=1e-4, atol=0)
    assert torch.isfinite(x.grad).all() and torch.isfinite(p.grad).all()
    torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-3, atol=1e-6)
