"""GeM forward and backward against eager torch in float64."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pylandmark as plm
from pylandmark import _C
from pylandmark.nn import GeM, gem_torch

from conftest import ALL_ISAS, gem_float64

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# output tolerance by input dtype: float32 accumulation, result rounded to the input dtype
RTOL = {"float32": 2e-5, "float16": 1.5e-3, "bfloat16": 1e-2}


def make_x(shape, dtype, seed, channels_last=False, low=-0.2):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=g, dtype=torch.float64) * 3 + low).to(TORCH_DTYPES[dtype])
    return x.to(memory_format=torch.channels_last) if channels_last else x


SHAPES = [(2, 3, 1, 1), (3, 17, 7, 5), (2, 64, 13, 17), (1, 1000, 3, 3), (4, 33, 32, 24), (2, 5, 1, 19)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
@pytest.mark.parametrize("p", [3.0, 1.0, 2.37, 6.5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_matches_float64_reference(shape, dtype, p, channels_last):
    x = make_x(shape, dtype, seed=sum(shape), channels_last=channels_last)
    y = plm.gem(x, p=p)
    assert y.dtype == x.dtype and y.shape == shape[:2]
    torch.testing.assert_close(y.double(), gem_float64(x, p), rtol=RTOL[dtype], atol=1e-7)


@pytest.mark.parametrize("cpu_isa", ALL_ISAS, indirect=True)
@pytest.mark.parametrize("dtype", list(TORCH_DTYPES))
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_and_backward_every_isa(cpu_isa, dtype, channels_last):
    for p0 in (3.0, 2.6):
        x = make_x((3, 37, 5, 9), dtype, seed=7, channels_last=channels_last).requires_grad_()
        p = torch.tensor([p0], requires_grad=True)
        y = gem_torch(x, p)
        # y's gradient arrives in y's dtype, so the reference uses the same rounded weights
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(x.dtype).float()
        (y.float() * g).sum().backward()

        x64 = x.detach().double().requires_grad_()
        p64 = p.detach().double().requires_grad_()
        y64 = gem_float64(x64, p64)
        (y64 * g.double()).sum().backward()
        torch.testing.assert_close(y.double(), y64, rtol=RTOL[dtype], atol=1e-7)
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=RTOL[dtype] * 2, atol=1e-6)
        torch.testing.assert_close(p.grad.double(), p64.grad, rtol=5e-4, atol=1e-5)
        assert x.grad.dtype == x.dtype
        assert x.grad.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 2, 1, 1), (2, 4, 3, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_float64_x_and_p(shape, channels_last):
    x = make_x(shape, "float32", seed=11, channels_last=channels_last, low=0.05).double()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    p = torch.tensor([2.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: gem_torch(a, b, 1e-6), (x, p), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradcheck(lambda a: gem_torch(a, 3.0, 1e-6), (x,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_values_below_eps_are_clamped_and_get_no_gradient():
    x = torch.tensor([[[[-1.0, 0.0], [2.0, 1e-9]]]], requires_grad=True)
    y = gem_torch(x, 3.0, eps=1e-6)
    expected = ((3 * 1e-18 + 8.0) / 4) ** (1 / 3)
    assert abs(y.item() - expected) < 1e-6
    y.sum().backward()
    assert x.grad[0, 0, 0, 0] == 0 and x.grad[0, 0, 0, 1] == 0 and x.grad[0, 0, 1, 1] == 0
    assert x.grad[0, 0, 1, 0] > 0


def test_strided_input_is_handled():
    base = make_x((2, 8, 10, 12), "float32", seed=5)
    x = base[:, ::2, 1:9:2, ::3]  # neither spatial nor channel axis contiguous
    torch.testing.assert_close(plm.gem(x, 3.0).double(), gem_float64(x, 3.0), rtol=2e-5, atol=1e-7)


def test_numpy_input(rng):
    x = rng.random((3, 11, 6, 7)).astype(np.float32)
    y = plm.gem(x, p=2.5)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    ref = np.mean(np.maximum(x.astype(np.float64), 1e-6) ** 2.5, axis=(2, 3)) ** (1 / 2.5)
    np.testing.assert_allclose(y, ref, rtol=2e-5)
    y16 = plm.gem(x.astype(np.float16), p=3.0)
    assert y16.dtype == np.float16


def test_thread_count_does_not_change_results():
    x = make_x((8, 512, 9, 9), "float32", seed=1)
    try:
        plm.set_num_threads(1)
        a = plm.gem(x, 2.9)
        plm.set_num_threads(2)
        b = plm.gem(x, 2.9)
    finally:
        plm.set_num_threads(0)
    assert torch.equal(a, b)


def test_module_learns_p_and_shows_it():
    pool = GeM()
    assert "p=3.0000" in repr(pool)
    x = make_x((2, 16, 4, 4), "float32", seed=2)
    loss = pool(x).sum()
    loss.backward()
    assert pool.p.grad is not None and pool.p.grad.shape == (1,)
    torch.optim.SGD(pool.parameters(), lr=0.1).step()
    assert pool.p.item() != 3.0
    assert f"p={pool.p.item():.4f}" in repr(pool)
    fixed = GeM(p=2.0, learn_p=False)
    assert list(fixed.parameters()) == [] and "learn_p=False" in repr(fixed)


def test_state_dict_round_trip():
    a = GeM(p=2.2)
    b = GeM()
    b.load_state_dict(a.state_dict())
    assert b.p.item() == pytest.approx(2.2)


@pytest.mark.parametrize("call,exc,words", [
    (lambda: plm.gem(np.zeros((2, 3, 4), np.float32)), ValueError, "x must be (B, C, H, W)"),
    (lambda: plm.gem(np.zeros((1, 2, 3, 4), np.int32)), TypeError, "x has dtype int32"),
    (lambda: plm.gem(np.ones((1, 2, 3, 4), np.float32), p=0.0), ValueError, "p must be"),
    (lambda: plm.gem(np.ones((1, 2, 3, 4), np.float32), p="a"), TypeError, "p must be"),
    (lambda: plm.gem(np.ones((1, 2, 3, 4), np.float32), eps=0.0), ValueError, "eps must be > 0"),
    (lambda: plm.gem(np.ones((1, 2, 0, 4), np.float32)), ValueError, "H, W >= 1"),
    (lambda: gem_torch(torch.ones(1, 2, 3, 4), torch.ones(2)), ValueError, "1-element tensor"),
    (lambda: GeM(p=-1.0), ValueError, "p must be > 0"),
])
def test_bad_input(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    assert words in str(info.value)


def test_fallback_reference_matches_native():
    """The plain-torch path (used for devices without a native kernel) agrees with the kernel."""
    from pylandmark.nn.functional import gem_reference

    x = make_x((2, 9, 5, 6), "float32", seed=9)
    torch.testing.assert_close(gem_reference(x, torch.tensor([2.4]), 1e-6), gem_torch(x, torch.tensor([2.4])),
                               rtol=2e-5, atol=1e-7)


def test_isa_switch_rejects_unknown_names():
    with pytest.raises(ValueError, match="not available"):
        _C.set_cpu_isa("sse9")


@pytest.mark.parametrize("cpu_isa", ALL_ISAS, indirect=True)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("scale,p0", [(1e-7, 12.0), (3e-6, 9.0), (2e-5, 9.0), (1e4, 12.0), (1e-7, 3.0)])
def test_extreme_values_neither_underflow_nor_overflow(cpu_isa, channels_last, scale, p0):
    """x^p beyond float32's range (large p near eps, or huge activations) must still give the
    float64 answer and finite gradients: the kernels fall back to the scaled form."""
    g = torch.Generator().manual_seed(5)
    x = (torch.rand((2, 19, 5, 7), generator=g, dtype=torch.float64) * scale).float()
    x[0, 0] = 0.0  # one channel entirely below eps
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    p = torch.tensor([p0], requires_grad=True)
    y = gem_torch(x, p)
    y.sum().backward()
    x64 = x.detach().double().requires_grad_()
    p64 = p.detach().double().requires_grad_()
    y64 = gem_float64(x64, p64)
    y64.sum().backward()
    torch.testing.assert_close(y.double(), y64, rtol=1e-4, atol=0)
    assert torch.isfinite(x.grad).all() and torch.isfinite(p.grad).all()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-3, atol=1e-6 * float(x64.grad.abs().max()))
    torch.testing.assert_close(p.grad.double(), p64.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("cpu_isa", ALL_ISAS, indirect=True)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_an_infinite_value_gives_infinity(cpu_isa, channels_last, dtype):
    """(mean x^p)^(1/p) of a channel holding +inf is +inf (float64 always said so; the float32
    scaled form computed inf / inf = NaN)."""
    x = torch.rand(2, 3, 4, 5, dtype=dtype) + 0.5
    x[1, 2, 3, 1] = float("inf")
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    for p in (3.0, 2.5):
        y = plm.gem(x, p=p)
        assert torch.isinf(y[1, 2]) and y[1, 2] > 0
        finite = torch.ones_like(y, dtype=torch.bool)
        finite[1, 2] = False
        torch.testing.assert_close(y[finite].double(), gem_float64(x, p)[finite], rtol=2e-3, atol=0)


@pytest.mark.parametrize("eps", [float("inf"), float("nan"), 0.0, -1.0])
def test_eps_must_be_finite_and_positive(eps):
    for x in (torch.ones(1, 2, 3, 3), np.ones((1, 2, 3, 3), np.float32)):
        with pytest.raises(ValueError, match="eps must be > 0 and finite"):
            plm.gem(x, eps=eps)
    with pytest.raises(ValueError, match="eps must be > 0 and finite"):
        GeM(eps=eps)
    with pytest.raises(ValueError, match="eps must be > 0 and finite"):
        gem_torch(torch.ones(1, 2, 3, 3), 3.0, eps)


def test_negative_views_are_pooled_by_value():
    x = torch.rand(2, 3, 1, 1) + 0.1
    for view in (torch._neg_view(-x), torch.complex(torch.zeros_like(x), -x).conj().imag):
        assert view.is_neg()
        torch.testing.assert_close(plm.gem(view, p=3.0), plm.gem(x, p=3.0))
        xx = x.clone().requires_grad_(True)
        y = plm.gem(torch._neg_view(-xx), p=3.0)  # differentiable through the view
        y.sum().backward()
        ref = x.clone().requires_grad_(True)
        plm.gem(ref, p=3.0).sum().backward()
        torch.testing.assert_close(xx.grad, ref.grad)
