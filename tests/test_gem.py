"""GeM forward and backward against eager torch in float64."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ALL_ISAS, gem_float64

import pylandmark as plm
from pylandmark import _C
from pylandmark.nn import GeM, gem_torch

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# ---- error bounds of the float32 kernels against float64 on the same (rounded) inputs ---------
# The kernels compute xc^p as vexp(p * vlog(xc)) (xc = max(x, eps); x*x*x for p = 3), sum the
# terms in float32 in any order, divide by HW and take powf(mean, 1/p); the backward forms
# (xc/y)^(p-1) = vexp((vlog(xc) - log y)(p - 1)). vlog and vexp are Cephes' logf/expf, whose
# documented peak relative errors are 7.6e-8 (1.3u) and 1.7e-7 (2.9u), u = 2^-24; with other FMA
# contractions per ISA taken as at most 2u and 3u; logf and powf (glibc) within 1 ulp (2u).
U = 2.0 ** -24
LOG_ERR, EXP_ERR, LIBM_ERR = 2 * U, 3 * U, 2 * U
# vexp returns 0 below e^-87.33 ~ 2^-126 and float32 results below 2^-126 are subnormal (each
# rounding then off by up to 2^-150 absolute): the absolute floor of the relative bounds
TINY, SUB = 2.0 ** -126, 2.0 ** -150


def gamma(n):
    """n u / (1 - n u): the relative error of n float32 roundings (Higham, Lemma 3.1)."""
    return n * U / (1 - n * U)


def half_spacing(v, dtype):
    """The most rounding |v| to dtype moves it (half the spacing of dtype there), 0 for float32
    and float64 (the kernels' own float32 rounding is in the bounds already)."""
    bits, emin = {torch.float16: (11, -14), torch.bfloat16: (8, -126)}.get(dtype, (None, None))
    if bits is None:
        return torch.zeros_like(v)
    return torch.exp2(torch.floor(torch.log2(v.abs().clamp(min=2.0 ** emin))) - bits)


def _terms(x, p, eps):
    """float64 xc, |ln xc| and the relative error bound rho of the kernel's float32 xc^p: the
    Cephes vlog (LOG_ERR relative), p and the product p ln xc rounded (2u), vexp (EXP_ERR); the
    cube x*x*x rounds twice. eps in float32 is 1e-6 (1 - 2.5e-9): clamped values xc^p off by p u."""
    xd = x.detach().double()
    xc = xd.clamp(min=eps)
    lx = xc.log().abs()
    rho = torch.full_like(xc, gamma(2)) if p == 3 else (LOG_ERR + 2 * U) * p * lx + EXP_ERR
    return xd, xc, lx, rho + p * U * (xd < eps)


def gem_bound(x, p, eps=1e-6, out_dtype=None):
    """(B, C) bound on |GeM of the kernel - gem_float64| (p a number or 1-element tensor): the
    mean's relative error is the t-weighted rho of its terms plus gamma_HW for the sum (positive
    terms, any order) and u for / HW; powf(m, 1/p) divides it by p (p >= 1) and adds 1/p's rounding
    (u for p = 3, 2u else: p's too) times |ln m| / p = |ln y|, and powf's own error. Then rounding
    to out_dtype (x's dtype by default)."""
    p = float(p.detach()) if isinstance(p, torch.Tensor) else float(p)
    assert p >= 1
    _, xc, _, rho = _terms(x, p, eps)
    t = xc.pow(p)
    n = t.shape[-1] * t.shape[-2]
    y = t.mean((-2, -1)).pow(1 / p)
    if x.dtype == torch.float64:
        # the kernel's double loop (pow within 1 ulp, n-term sum, /HW, pow(m, 1/p) with 1/p rounded)
        # against gem_float64, the same arithmetic done by torch: each is off by this much
        u = 2.0 ** -53
        em = 2 * u + n * u / (1 - n * u) + u
        return 2 * (em / p + u * y.log().abs() + 2 * u) * y
    # terms below 2^-126 may come back as 0 from vexp or lose bits as subnormals: at most 2^-126
    # each, against a sum of at least 2^-80 (smaller sums are redone in double, more exactly)
    em = ((t * rho).sum((-2, -1)) + n * TINY) / t.sum((-2, -1)).clamp(min=2.0 ** -81) + gamma(n) + U
    ey = em / p + (U if p == 3 else gamma(2)) * y.log().abs() + LIBM_ERR
    bound = ey * y
    return bound + half_spacing(y + bound, x.dtype if out_dtype is None else out_dtype)


def assert_within(got, want, bound):
    err = (got.detach().double() - want.detach().double()).abs()
    assert (err <= bound).all(), f"max error {err.max():.3g}; excess {(err - bound).max():.3g} over the bound"


def gem_grad_bounds(x, p, gy, eps=1e-6):
    """Bounds on |dL/dx - float64| (x's shape) and |dL/dp - float64| for L = sum gy * gem(x, p),
    the kernel's backward run on the forward's float32 output (kept before rounding to x's
    dtype): y is off by ey = gem_bound(float32) / y relative, which (xc/y)^(p-1) turns into
    |p-1| ey. The non-cube path:
    d = vlog(xc) - logf(y) is off by LOG_ERR |ln xc| + 2u |ln y| + u |d| (absolute), (p-1) d by
    |p-1| that + u (p + |p-1|) |d| + u |(p-1) d|, vexp adds EXP_ERR; the cube: r = xc * (1/y) 2u,
    r*r 5u. dx = (gy / HW) t: 2u more, then rounding to x's dtype. dL/dp = sum gy y s / (p HW) with
    s = sum t r d (terms of either sign: bounded through sum |t r| (|d| rel + dd)), the float32 sum
    of s gamma_HW of sum |t r d|; the final double sum is exact enough (2^-53). Results that
    underflow (t below 2^-126, subnormal products) add the absolute TINY and SUB terms."""
    p = float(p.detach()) if isinstance(p, torch.Tensor) else float(p)
    _, xc, _, _ = _terms(x, p, eps)
    yd = gem_float64(x, p, eps)
    ey = (gem_bound(x, p, eps, out_dtype=torch.float32) / yd)[..., None, None]
    ly = yd.log()[..., None, None]
    n = xc.shape[-1] * xc.shape[-2]
    d = xc.log() - ly
    r = (xc.log() - ly).exp()
    t = r.pow(p - 1)
    if p == 3:
        dd = LOG_ERR * xc.log().abs() + 2 * U * ly.abs() + U * d.abs()  # only s uses d
        rho_t = gamma(5) + 2 * ey
    else:
        dd = LOG_ERR * xc.log().abs() + 2 * U * ly.abs() + U * d.abs()
        rho_t = abs(p - 1) * (dd + ey) + U * (p + abs(p - 1)) * d.abs() + U * (abs(p - 1) * d).abs() + EXP_ERR
    gyd = gy.detach().double()[..., None, None]
    dx = gyd / n * t * (x.detach().double() >= eps)
    bound_dx = dx.abs() * (rho_t + gamma(2)) + gyd.abs() / n * TINY + 2 * SUB
    bound_dx = bound_dx + half_spacing(dx.abs() + bound_dx, x.dtype)
    rho_r = gamma(2) + ey
    trd = (t * r * d).abs()
    ds = ((t * r).abs() * (d.abs() * (rho_t + rho_r + gamma(2)) + dd) + (r * d).abs() * TINY + 3 * SUB).sum((-2, -1)) \
        + gamma(n) * trd.sum((-2, -1))
    s = (t * r * d).sum((-2, -1))
    g = gy.detach().double().abs() * yd / (p * n)
    bound_dp = (g * (ds + s.abs() * ey[..., 0, 0])).sum()
    return bound_dx, bound_dp



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
    assert_within(y, gem_float64(x, p), gem_bound(x, p))


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
        assert_within(y, y64, gem_bound(x, p))
        bound_dx, bound_dp = gem_grad_bounds(x, p, g)
        assert_within(x.grad, x64.grad, bound_dx)
        assert_within(p.grad, p64.grad, bound_dp)
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
    assert abs(gem_float64(x, 3.0).item() - expected) <= 1e-15
    assert_within(y, gem_float64(x, 3.0), gem_bound(x, 3.0))
    y.sum().backward()
    assert x.grad[0, 0, 0, 0] == 0 and x.grad[0, 0, 0, 1] == 0 and x.grad[0, 0, 1, 1] == 0
    assert x.grad[0, 0, 1, 0] > 0


def test_strided_input_is_handled():
    base = make_x((2, 8, 10, 12), "float32", seed=5)
    x = base[:, ::2, 1:9:2, ::3]  # neither spatial nor channel axis contiguous
    assert_within(plm.gem(x, 3.0), gem_float64(x, 3.0), gem_bound(x, 3.0))


def test_numpy_input(rng):
    x = rng.random((3, 11, 6, 7)).astype(np.float32)
    y = plm.gem(x, p=2.5)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    ref = np.mean(np.maximum(x.astype(np.float64), 1e-6) ** 2.5, axis=(2, 3)) ** (1 / 2.5)
    assert_within(torch.from_numpy(y), torch.from_numpy(ref), gem_bound(torch.from_numpy(x), 2.5))
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
    (lambda: plm.gem(np.ones((1, 2, 3, 4), np.float32), eps=0.0), ValueError, "eps must be a finite number > 0"),
    (lambda: plm.gem(np.ones((1, 2, 0, 4), np.float32)), ValueError, "H, W >= 1"),
    (lambda: gem_torch(torch.ones(1, 2, 3, 4), torch.ones(2)), ValueError, "1-element tensor"),
    (lambda: GeM(p=-1.0), ValueError, "p must be a finite number > 0"),
])
def test_bad_input(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    assert words in str(info.value)


def test_fallback_reference_matches_native():
    """The plain-torch path (used for devices without a native kernel) agrees with the kernel."""
    from pylandmark.nn.functional import gem_reference

    x = make_x((2, 9, 5, 6), "float32", seed=9)
    p = torch.tensor([2.4])
    want, bound = gem_float64(x, p), gem_bound(x, p)
    assert_within(gem_torch(x, p), want, bound)
    # the plain-torch path: float32 pow (within 1 ulp), mean and pow: bounded as the kernel's
    assert_within(gem_reference(x, p, 1e-6), want, bound)


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
    # the float32 path's bounds also hold for the channels redone in double (the scaled form)
    assert_within(y, y64, gem_bound(x, p))
    assert torch.isfinite(x.grad).all() and torch.isfinite(p.grad).all()
    bound_dx, bound_dp = gem_grad_bounds(x, p, torch.ones_like(y))
    assert_within(x.grad, x64.grad, bound_dx)
    assert_within(p.grad, p64.grad, bound_dp)


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
        assert_within(y[finite], gem_float64(x, p)[finite], gem_bound(x, p)[finite])


@pytest.mark.parametrize("eps", [float("inf"), float("nan"), 0.0, -1.0])
def test_eps_must_be_finite_and_positive(eps):
    for x in (torch.ones(1, 2, 3, 3), np.ones((1, 2, 3, 3), np.float32)):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            plm.gem(x, eps=eps)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        GeM(eps=eps)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
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
